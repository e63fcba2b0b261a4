"""``neuronpedia-server``: the original inference server's flags → AppArgs → the same app as serve_config.yaml,
served in the foreground on a Ray instance of its own (Ctrl-C / SIGTERM shut Serve and Ray down).

    neuronpedia-server                                            # the bundled demo pack, set res-demo
    neuronpedia-server --model_id gpt2-small --sae_sets res-jb --include_sae '^(5|6)-'
    neuronpedia-server --model_id /data/my-pack --sae_sets res-demo --port 5002 --secret s3cret
    neuronpedia-server --sae_config my-saes.yaml                  # local SAEs outside SAE Lens's directory
    neuronpedia-server --list_models                              # models and SAE sets SAE Lens knows (offline)

Exit status: 0 after a clean shutdown, 2 for bad flags or values (unknown model, SAE set, dtype...), 1 if the
application fails to start.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from typing import Optional, Sequence

log = logging.getLogger("saeserve.cli")

DEFAULT_MODEL = "models/demo-lm"
DEFAULT_SETS = ["res-demo"]
APP_NAME = "saeserve"


def _setup_logging(level: int = logging.INFO) -> None:
    """Our loggers at INFO on stderr (the driver, and every Ray worker via worker_process_setup_hook)."""
    lg = logging.getLogger("saeserve")
    if not any(getattr(h, "_saeserve", False) for h in lg.handlers):
        h = logging.StreamHandler()
        h.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        h._saeserve = True  # type: ignore[attr-defined]
        lg.addHandler(h)
    lg.setLevel(level)
    lg.propagate = False


def setup_worker_logging() -> None:
    """Ray ``worker_process_setup_hook``: load progress logs from replicas reach the console."""
    _setup_logging()


def _list_arg(values: Optional[list[str]]) -> Optional[list[str]]:
    """Flags that take lists accept space-separated values, repeats, commas, or a JSON list (the old env style)."""
    if values is None:
        return None
    out: list[str] = []
    for v in values:
        v = v.strip()
        if v.startswith("["):
            import json

            try:
                out += [str(x) for x in json.loads(v)]
                continue
            except ValueError:
                pass
        out += [x for x in (p.strip() for p in v.split(",")) if x]
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="neuronpedia-server",
        description="Serve SAE interpretability inference (the Neuronpedia inference API) on Ray Serve, in the foreground.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="List flags (--sae_sets, --include_sae, --exclude_sae, --sae_dirs) take several values, commas, or a JSON list.",
    )
    a = p.add_argument
    a("--model_id", "--model-id", "--model", dest="model_id", default=None,
      help="TransformerLens model name (e.g. gpt2-small) or a local pack directory (served under the pack's model_name). "
           f"Default: {DEFAULT_MODEL}")
    a("--sae_sets", "--sae-sets", nargs="*", default=None,
      help="SAE sets to serve: Neuronpedia set names (e.g. res-jb), sets of the local pack, or sets of --sae_config. "
           f"Default: {' '.join(DEFAULT_SETS)} for the default model, all sets of --sae_config when given, else none")
    a("--sae_config", "--sae-config", default=None,
      help="YAML/JSON file listing SAE sets of local SAE Lens directories (see README 'Loading models and SAEs')")
    a("--sae_dirs", "--sae-dirs", nargs="*", default=None, help="Extra SAE Lens directories, served as '<dir>-<parent dir>'")
    a("--include_sae", "--include-sae", nargs="*", default=None, help="Serve only SAE ids matching one of these regexes")
    a("--exclude_sae", "--exclude-sae", nargs="*", default=None, help="Do not serve SAE ids matching any of these regexes")
    a("--override_model_id", "--override-model-id", default=None,
      help="Load these TransformerLens weights instead (e.g. gemma-2-2b-it under gemma-2-2b SAEs); both ids are accepted")
    a("--max_loaded_saes", "--max-loaded-saes", type=int, default=None, help="Most SAEs resident in one SAE shard replica (LRU)")
    a("--model_dtype", "--model-dtype", choices=["float32", "float16", "bfloat16"], default=None)
    a("--sae_dtype", "--sae-dtype", choices=["float32", "float16", "bfloat16"], default=None)
    a("--token_limit", "--token-limit", type=int, default=None, help="Most tokens in one prompt")
    a("--device", default=None, help="auto (cuda if the machine has GPUs, else cpu), cpu, or cuda")
    a("--num_gpus", "--num-gpus", type=float, default=None,
      help="GPUs per model replica and per SAE replica on a GPU device; fractions share a card "
           "(default 0.25 per model replica, 0.125 per SAE replica)")
    a("--model_num_gpus", "--model-num-gpus", type=float, default=None, help="GPUs per model replica (overrides --num_gpus)")
    a("--sae_num_gpus", "--sae-num-gpus", type=float, default=None, help="GPUs per SAE replica (overrides --num_gpus)")
    a("--host", default=os.environ.get("HOST", "127.0.0.1"), help="HTTP host (default 127.0.0.1, or $HOST)")
    a("--port", type=int, default=int(os.environ.get("PORT", "5002")), help="HTTP port (default 5002, or $PORT)")
    a("--secret", default=None, help="Require this X-SECRET-KEY on requests (default: $SECRET)")
    a("--ray_address", "--ray-address", default="local",
      help="'local' (default): start a Ray instance of our own and stop it on exit; 'auto' or host:port: use a running cluster")
    a("--ray_temp_dir", "--ray-temp-dir", default=None,
      help="Temp/log directory of our own Ray instance (default: Ray's, /tmp/ray); keep it short (socket paths)")
    a("--http_proxy", "--http-proxy", choices=("haproxy", "python"), default="haproxy",
      help="Our own Ray instance's HTTP ingress: Serve's HAProxy (default: HTTP goes straight to the ingress replicas) "
      "or its Python proxy. A running cluster (--ray_address) keeps its own (RAY_SERVE_ENABLE_HA_PROXY in its env)")
    a("--list_models", "--list-models", action="store_true",
      help="Print the models and SAE sets in SAE Lens's pretrained directory, and exit (offline, starts nothing)")
    return p


def list_models(out=sys.stdout) -> None:
    from deployments.specs import list_pretrained_models

    models = list_pretrained_models()
    print("Available models and SAE sets (SAE Lens pretrained directory; --model_id MODEL --sae_sets SET):", file=out)
    for model, sets in models.items():
        print(f"  {model}:", file=out)
        for name, n in sets.items():
            print(f"    - {name} ({n} SAE{'s' if n != 1 else ''})", file=out)


def args_from_flags(ns: argparse.Namespace, parser: argparse.ArgumentParser):
    """Validated AppArgs, or ``parser.error`` (exit 2) with a message a person can act on."""
    from pydantic import ValidationError

    from deployments.engine import pack
    from deployments.specs import REPO_ROOT, check_model, local_path

    from .args import AppArgs

    kw: dict = {}
    if ns.model_id is not None:
        kw["model"] = ns.model_id
        if local_path(ns.model_id) is None and (REPO_ROOT / "models" / ns.model_id).is_dir():
            kw["model"] = str(REPO_ROOT / "models" / ns.model_id)  # a bundled pack by name, e.g. demo-lm
    sets = _list_arg(ns.sae_sets)
    if sets is not None:
        kw["sae_sets"] = sets
    elif ns.model_id is None and ns.sae_config is None:
        kw["sae_sets"] = list(DEFAULT_SETS)
    elif ns.sae_config is None and local_path(kw["model"]) is not None:
        kw["sae_sets"] = pack.local_sae_sets(local_path(kw["model"]))  # a local pack: all of its sets
    for flag, field in (("sae_dirs", "sae_dirs"), ("include_sae", "include_sae"), ("exclude_sae", "exclude_sae")):
        v = _list_arg(getattr(ns, flag))
        if v is not None:
            kw[field] = v
    for field in ("sae_config", "override_model_id", "max_loaded_saes", "model_dtype", "sae_dtype", "token_limit", "device",
                  "num_gpus", "model_num_gpus", "sae_num_gpus"):
        v = getattr(ns, field)
        if v is not None:
            kw[field] = v
    secret = ns.secret if ns.secret is not None else os.environ.get("SECRET")
    if secret:
        kw["secret"] = secret
    if not 0 < ns.port < 65536:
        parser.error(f"--port must be 1..65535, got {ns.port}")
    try:
        args = AppArgs(**kw)
    except ValidationError as e:
        msgs = "; ".join(f"{'.'.join(map(str, err['loc'])) or 'args'}: {err['msg']}" for err in e.errors())
        parser.error(msgs)
    try:
        check_model(args.model.name, args.model.override)
    except ValueError as e:
        parser.error(str(e))
    return args


def _build(args, parser):
    """The application (resolving every SAE spec: unknown sets and bad SAE dirs are flag errors)."""
    from deployments.specs import resolve_sae_specs

    from .app import build_app

    try:
        s = args.saes
        specs = resolve_sae_specs(args.model.name, s.sets, s.dirs, s.include, s.exclude, sae_config=s.config)
        if not specs:
            parser.error(f"no SAEs to serve for model {args.model.name!r} (sets {s.sets}, include {s.include}, "
                         f"exclude {s.exclude}): name SAE sets with --sae_sets or --sae_config")
        return build_app(args), specs
    except ValueError as e:
        parser.error(str(e))


def serve_forever(args, app, host: str, port: int, ray_address: str = "local", ray_temp_dir: Optional[str] = None) -> int:
    import ray
    from ray import serve

    stop = threading.Event()
    serving = threading.Event()
    own_ray = ray_address == "local"
    env = {k: os.environ[k] for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HOME", "HF_HUB_CACHE",
                                      "RAY_AUTH_MODE") if k in os.environ}
    runtime_env = {"worker_process_setup_hook": "ingress.cli.setup_worker_logging"}
    if env:
        runtime_env["env_vars"] = env
    init_kw = dict(address=ray_address, runtime_env=runtime_env, log_to_driver=True)
    if own_ray:
        init_kw["include_dashboard"] = False
        if ray_temp_dir:
            init_kw["_temp_dir"] = os.path.abspath(ray_temp_dir)
    log.info("starting Ray (%s)", "a local instance of our own" if own_ray else ray_address)
    ray.init(**init_kw)

    def on_signal(signum, _frame):
        log.info("%s received: shutting down", signal.Signals(signum).name)
        stop.set()
        if not serving.is_set():
            raise KeyboardInterrupt  # abort a start-up that may take minutes (model and SAE loading)

    try:
        serve.start(http_options={"host": host, "port": port})
        # after ray.init / serve.start, so our handlers are the ones that run
        signal.signal(signal.SIGINT, on_signal)
        signal.signal(signal.SIGTERM, on_signal)
        log.info("deploying %s: model %s, SAE sets %s", APP_NAME, args.model.name, args.saes.sets)
        serve.run(app, name=APP_NAME, route_prefix="/")
        serving.set()
        log.info("serving model %s on http://%s:%d (Ctrl-C to stop)", args.served_model_id, host, port)
        while not stop.wait(1.0):
            pass
        return 0
    except KeyboardInterrupt:
        log.info("interrupted while starting: shutting down")
        return 0
    except Exception:
        log.exception("the application failed to start")
        return 1
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not cut the shutdown short
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        try:
            if own_ray:
                serve.shutdown()
            else:
                serve.delete(APP_NAME)
        except Exception:  # noqa: BLE001
            log.exception("Serve shutdown failed")
        ray.shutdown()
        log.info("stopped")


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    ns = parser.parse_args(argv)
    if ns.list_models:
        try:
            list_models()
        except BrokenPipeError:  # `neuronpedia-server --list_models | head`
            sys.stdout = None  # type: ignore[assignment]
        return 0
    args = args_from_flags(ns, parser)
    if ns.ray_address == "local":  # before Ray Serve is imported: it reads the setting then, as the Ray it starts does
        os.environ["RAY_SERVE_ENABLE_HA_PROXY"] = "1" if ns.http_proxy == "haproxy" else "0"
        if ns.http_proxy == "haproxy":
            from . import haproxy_env

            haproxy_env.isolate()  # its own files and side ports: another Ray's HAProxy on this machine stays apart
            haproxy_env.defaults()  # HTTP metrics from the ingress replicas, not parsed from HAProxy's log
        from .header_timeout import ray_env

        os.environ.update(ray_env(ns.http_proxy == "haproxy"))  # slow request headers get a 408
        # Serve gives a new proxy actor 5 s to report ready, then kills it, and serve.start fails with ActorDiedError:
        # seen when the CLI started on a busy 2-core machine. 30 s unless the user set it.
        os.environ.setdefault("RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S", "30")
    app, specs = _build(args, parser)
    _setup_logging()
    log.info("%d SAEs to serve: %s", len(specs), ", ".join(s.id for s in specs[:8]) + (" ..." if len(specs) > 8 else ""))
    rc = serve_forever(args, app, ns.host, ns.port, ns.ray_address, ns.ray_temp_dir)
    return rc


if __name__ == "__main__":
    sys.exit(main())
