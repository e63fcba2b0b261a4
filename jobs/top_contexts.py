"""Top-activating contexts per feature over a text dataset, through the running saeserve app (a Ray job).

    ray job submit --address http://HEAD:8265 --working-dir . -- \\
        python -m jobs.top_contexts --app saeserve --dataset /data/contexts.jsonl --source 1-res-demo \\
            --features 0,1,2 --top 10 --out /data/top_contexts.parquet

What a feature dashboard shows as "top activations": for each chosen feature, the ``--top`` texts of the
dataset on which it fires hardest. Each text counts once per feature, at its maximum (the first position of the
maximum), BOS excluded, as ``activation/all`` with ``ignore_bos`` reports it; texts where the feature never
fires (max <= 0) are not contexts. Ties rank by text, then position, so the output is deterministic.

How it scales: Ray Data reads the dataset (JSONL or Parquet with a ``text`` column) in blocks and streams them
through ``--concurrency`` actors; each actor splits its ``--batch-size`` rows into ``activation/all-batch``
requests of the app's ``max_batch_prompts`` and sends them all at once, with ``feature_filter`` = the chosen
features over the one ``--source`` SAE, so a request returns ``len(features) x tokens`` floats (the SAE is
encoded next to its model replica; dense activations never leave the cluster's SAE shard). Each actor keeps only
its batch's top ``--top`` per feature, and the driver merges those into the final top list in O(features x top)
memory. Texts over the app's token limit are skipped and counted (``n_skipped_too_long`` in the file's
metadata and the summary line), as are null texts. A local ``--dataset`` path is read on the driver's node (the
RayJob's ``/data`` is on the head only); ``s3://``-style URIs are read from any node.

Output: Parquet, one row per (feature, rank); see ``OUTPUT_SCHEMA``. The file's schema metadata ``saeserve``
holds a JSON summary (model, source, features, top, n_texts, n_skipped_too_long, n_skipped_empty).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from typing import Any, Iterable, Optional

import pyarrow as pa

from deployments.engine.errors import RequestError, translate_remote_error, unwrap_remote_error
from ingress import schemas as S

log = logging.getLogger("saeserve.jobs.top_contexts")

STATS_FEATURE = -1  # the per-batch counts row the actors emit beside their candidate rows

# What the actors emit: candidate contexts (feature >= 0) and one counts row per batch (feature == -1).
CANDIDATE_SCHEMA = pa.schema([
    ("feature", pa.int64()),
    ("activation", pa.float64()),
    ("token_index", pa.int64()),
    ("text", pa.string()),
    ("tokens", pa.list_(pa.string())),
    ("values", pa.list_(pa.float32())),
    ("n_texts", pa.int64()),
    ("n_too_long", pa.int64()),
    ("n_empty", pa.int64()),
])

OUTPUT_SCHEMA = pa.schema([
    pa.field("feature", pa.int64(), nullable=False),          # feature index in --source
    pa.field("rank", pa.int32(), nullable=False),             # 0 = the feature's strongest context
    pa.field("activation", pa.float64(), nullable=False),     # the feature's max over the text (BOS excluded)
    pa.field("source", pa.string(), nullable=False),          # the SAE id
    pa.field("text", pa.string(), nullable=False),            # the dataset row's text
    pa.field("token_index", pa.int64(), nullable=False),      # position of the max in `tokens` (0 = BOS)
    pa.field("token", pa.string(), nullable=False),           # tokens[token_index]
    pa.field("tokens", pa.list_(pa.string()), nullable=False),     # the text's tokens as the app sees them, BOS first
    pa.field("values", pa.list_(pa.float32()), nullable=False),    # the feature's activation at every token (BOS = 0)
    pa.field("context_left", pa.string(), nullable=False),    # up to --window tokens before token_index (BOS excluded)
    pa.field("context_right", pa.string(), nullable=False),   # up to --window tokens after token_index
])


def _rank_key(row: dict) -> tuple:
    """Best first: higher activation, then text, then position (a total order, so partial tops merge exactly)."""
    return (-row["activation"], row["text"], row["token_index"])


def _keep_top(rows: list[dict], top: int) -> list[dict]:
    rows.sort(key=_rank_key)
    del rows[top:]
    return rows


def parse_features(spec: str) -> list[int]:
    """``"0,1,5-7"`` -> ``[0, 1, 5, 6, 7]`` (order kept, duplicates dropped)."""
    out: list[int] = []
    for part in spec.split(","):
        part = part.strip()
        if not part:
            continue
        if "-" in part[1:]:
            a, b = part.split("-", 1)
            lo, hi = int(a), int(b)
            if hi < lo:
                raise ValueError(f"bad feature range {part!r}")
            out.extend(range(lo, hi + 1))
        else:
            out.append(int(part))
    if not out:
        raise ValueError("no features given")
    return list(dict.fromkeys(out))


def _is_retryable(e: BaseException) -> bool:
    """A 503 from the app (overloaded), or a replica that died or is unavailable (the app's own translation)."""
    err = translate_remote_error(e)
    return isinstance(err, RequestError) and err.status == 503


class _Scorer:
    """Ray Data actor: one batch of texts -> the batch's top candidates per feature, plus a counts row."""

    def __init__(self, handle, request: dict, feature_groups: list[list[int]], max_batch_prompts: int, top: int,
                 text_column: str, retries: int = 3):
        self.handle = handle
        self.request = request
        self.groups = feature_groups
        self.max_batch = max_batch_prompts
        self.top = top
        self.text_column = text_column
        self.retries = retries

    def _submit(self, prompts: list[str], features: list[int]):
        if len(prompts) == 1:
            req = S.ActivationAllRequest(prompt=prompts[0], feature_filter=features, num_results=len(features), **self.request)
            return self.handle.activation_all.remote(req)
        req = S.ActivationAllBatchRequest(prompts=prompts, feature_filter=features, num_results=len(features), **self.request)
        return self.handle.activation_all_batch.remote(req)

    def _result(self, prompts: list[str], features: list[int], pending) -> list[Optional[S.ActivationAllResponse]]:
        """Responses for ``prompts`` (None for a text over the token limit), retrying 503s and lost replicas."""
        for attempt in range(self.retries + 1):
            try:
                r = pending.result()
                return [r] if isinstance(r, S.ActivationAllResponse) else list(r.results)
            except Exception as e:
                inner = unwrap_remote_error(e)
                if inner is not None and inner.message.startswith("Text too long"):
                    if len(prompts) == 1:
                        return [None]
                    # One long text fails its whole batch request: redo the batch a prompt at a time.
                    singles = [self._submit([p], features) for p in prompts]
                    return [self._result([p], features, s)[0] for p, s in zip(prompts, singles)]
                if attempt < self.retries and _is_retryable(e):
                    time.sleep(min(2 ** attempt, 10))
                    pending = self._submit(prompts, features)
                    continue
                raise
        raise AssertionError("unreachable")

    def __call__(self, batch: pa.Table) -> pa.Table:
        texts = batch.column(self.text_column).to_pylist()
        n_empty = sum(1 for t in texts if not isinstance(t, str))
        texts = [t for t in texts if isinstance(t, str)]
        chunks = [texts[i:i + self.max_batch] for i in range(0, len(texts), self.max_batch)]
        best: dict[int, list[dict]] = {}
        too_long: set[int] = set()  # positions in `texts`
        for features in self.groups:
            # Every request of the batch in flight at once; the app batches model passes across them.
            pending = [self._submit(c, features) for c in chunks]
            for ci, (chunk, p) in enumerate(zip(chunks, pending)):
                for j, (text, resp) in enumerate(zip(chunk, self._result(chunk, features, p))):
                    if resp is None:
                        too_long.add(ci * self.max_batch + j)
                        continue
                    for a in resp.activations:
                        if a.max_value > 0:
                            rows = best.setdefault(a.index, [])
                            rows.append({"feature": a.index, "activation": a.max_value, "token_index": a.max_value_index,
                                         "text": text, "tokens": resp.tokens, "values": a.values})
                            if len(rows) > 4 * self.top:
                                _keep_top(rows, self.top)
        out = [r for rows in best.values() for r in _keep_top(rows, self.top)]
        for r in out:
            r.update(n_texts=0, n_too_long=0, n_empty=0)
        out.append({"feature": STATS_FEATURE, "activation": 0.0, "token_index": 0, "text": "", "tokens": [], "values": [],
                    "n_texts": len(texts) - len(too_long), "n_too_long": len(too_long), "n_empty": n_empty})
        return pa.Table.from_pylist(out, schema=CANDIDATE_SCHEMA)


def read_dataset(path: str, text_column: str = "text", num_cpus: float = 0.25, fmt: str = "auto"):
    """A Ray Dataset of a JSONL or Parquet file (or a directory of them) with a ``text_column``.

    A plain local path is read on the driver's node (read tasks carry a ``ray.io/node-id`` label selector, as
    Ray Data's deprecated ``local://`` scheme does): the job's files live there (the RayJob's ``/data`` is a
    head-only volume), so read tasks must not land on other nodes, and they ask for no CPU since a head is often
    started with ``num-cpus: 0``. URIs (``s3://``, ``gs://``, ...) are read anywhere, with
    ``num_cpus`` per read task (Ray Data's default of 1 could wait forever behind the Serve replicas)."""
    import os

    import ray
    import ray.data

    is_uri = "://" in path
    if is_uri:
        location, name, remote = path, path.rstrip("/"), dict(num_cpus=num_cpus)
    else:
        name = location = os.path.abspath(path)
        if not os.path.exists(name):
            raise ValueError(f"{path}: no such file or directory (on the driver's node)")
        remote = dict(num_cpus=0, label_selector={"ray.io/node-id": ray.get_runtime_context().get_node_id()})
    is_dir = not is_uri and os.path.isdir(name)
    if fmt not in ("auto", "jsonl", "parquet"):
        raise ValueError(f"format must be auto, jsonl or parquet, not {fmt!r}")
    if fmt != "auto":
        is_parquet = fmt == "parquet"
    elif is_dir:
        is_parquet = any(n.endswith((".parquet", ".pq")) for n in os.listdir(name))
    elif name.endswith((".parquet", ".pq")):
        is_parquet = True
    elif name.endswith((".jsonl", ".json", ".jsonl.gz", ".json.gz", ".ndjson")):
        is_parquet = False
    else:
        raise ValueError(f"{path}: cannot tell the format from the name; pass format (--format) jsonl or parquet")
    if is_parquet:
        # The V1 Parquet reader: V2 (Ray 2.60's default) lists files in a task that always asks for a whole CPU.
        ctx = ray.data.DataContext.get_current()
        v2 = getattr(ctx, "use_datasource_v2", None)
        if v2 is not None:
            ctx.use_datasource_v2 = False
        try:
            ds = ray.data.read_parquet(location, columns=[text_column], **remote)
        finally:
            if v2 is not None:
                ctx.use_datasource_v2 = v2
    else:
        ds = ray.data.read_json(location, lines=True, **remote,
                                file_extensions=["json", "jsonl", "ndjson", "gz"] if is_dir else None)
    cols = ds.columns()
    if text_column not in cols:
        raise ValueError(f"{path}: no {text_column!r} column (columns: {cols})")
    return ds


def capabilities(handle) -> S.CapabilitiesResponse:
    return handle.capabilities.remote().result(timeout_s=300)


def extract_top_contexts(
    handle,
    dataset_path: str,
    source: str,
    features: Iterable[int],
    top: int = 10,
    *,
    model: Optional[str] = None,
    batch_size: int = 64,
    concurrency: int = 1,
    window: int = 8,
    text_column: str = "text",
    num_cpus: float = 0.25,
    progress: bool = True,
    fmt: str = "auto",
) -> pa.Table:
    """Each feature's ``top`` contexts over the dataset, as a table of ``OUTPUT_SCHEMA``, sorted by feature (in
    the order given) then rank. ``handle`` is ``serve.get_app_handle(<app>)``; Ray must be initialised.
    ``model`` defaults to the app's own model id. Raises ValueError for a bad source or feature, and the
    app's RequestError for any other request the app refuses. A local ``dataset_path`` is read on this
    (the driver's) node; see ``read_dataset``."""
    from ray.data import DataContext

    features = list(dict.fromkeys(int(f) for f in features))
    if not features:
        raise ValueError("no features given")
    if top < 1 or batch_size < 1 or concurrency < 1:
        raise ValueError("top, batch_size and concurrency must be at least 1")
    caps = capabilities(handle)
    spec = next((s for s in caps.saes if s.id == source), None)
    if spec is None:
        raise ValueError(f"Invalid SAE ID or type: {source}. Served SAEs: {[s.id for s in caps.saes]}")
    bad = [f for f in features if not 0 <= f < spec.d_sae]
    if bad:
        raise ValueError(f"features {bad} are out of range for {source} (d_sae {spec.d_sae})")
    max_batch = max(1, caps.limits.get("max_batch_prompts", 16))
    max_results = max(1, caps.limits.get("max_num_results", 1000))
    groups = [features[i:i + max_results] for i in range(0, len(features), max_results)]
    request = dict(model=model or caps.model, source_set=spec.set, selected_sources=[source], sort_by_token_indexes=[],
                   ignore_bos=True)

    DataContext.get_current().enable_progress_bars = progress
    ds = read_dataset(str(dataset_path), text_column, num_cpus, fmt)
    scored = ds.map_batches(
        _Scorer,
        fn_constructor_kwargs=dict(handle=handle, request=request, feature_groups=groups, max_batch_prompts=max_batch,
                                   top=top, text_column=text_column),
        batch_size=batch_size,
        batch_format="pyarrow",
        concurrency=concurrency,
        num_cpus=num_cpus,
    )

    best: dict[int, list[dict]] = {f: [] for f in features}
    n_texts = n_too_long = n_empty = 0
    for part in scored.iter_batches(batch_format="pyarrow", batch_size=None):
        for r in part.to_pylist():
            if r["feature"] == STATS_FEATURE:
                n_texts += r["n_texts"]
                n_too_long += r["n_too_long"]
                n_empty += r["n_empty"]
                continue
            rows = best[r["feature"]]
            rows.append(r)
            if len(rows) > 4 * top:
                _keep_top(rows, top)

    out: list[dict[str, Any]] = []
    for f in features:
        for rank, r in enumerate(_keep_top(best[f], top)):
            toks, ti = r["tokens"], r["token_index"]
            out.append(dict(feature=f, rank=rank, activation=r["activation"], source=source, text=r["text"], token_index=ti,
                            token=toks[ti], tokens=toks, values=r["values"],
                            context_left="".join(toks[max(1, ti - window):ti]), context_right="".join(toks[ti + 1:ti + 1 + window])))
    summary = dict(model=request["model"], source=source, features=features, top=top, n_texts=n_texts,
                   n_skipped_too_long=n_too_long, n_skipped_empty=n_empty, n_rows=len(out))
    schema = OUTPUT_SCHEMA.with_metadata({"saeserve": json.dumps(summary)})
    return pa.Table.from_pylist(out, schema=schema)


def summary(table: pa.Table) -> dict:
    """The JSON summary stored in the table's schema metadata."""
    return json.loads((table.schema.metadata or {})[b"saeserve"])


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m jobs.top_contexts",
        description="Top-activating contexts per SAE feature over a text dataset, computed by the running saeserve "
                    "app (serve.get_app_handle). Writes Parquet, one row per (feature, rank).",
    )
    p.add_argument("--app", default="saeserve", help="Serve application name (default: saeserve)")
    p.add_argument("--dataset", required=True, help="JSONL or Parquet file (or directory) with a text column")
    p.add_argument("--source", required=True, help="SAE id, e.g. 1-res-demo")
    p.add_argument("--features", required=True, help="feature indexes: comma list, ranges allowed (0,1,5-9)")
    p.add_argument("--top", type=int, default=10, help="contexts per feature (default: 10)")
    p.add_argument("--out", required=True, help="output Parquet path")
    p.add_argument("--model", default=None, help="model id to send (default: the app's own, from its capabilities)")
    p.add_argument("--batch-size", type=int, default=64, help="dataset rows per Ray Data batch (default: 64); each batch "
                   "is sent as concurrent requests of the app's max_batch_prompts")
    p.add_argument("--concurrency", type=int, default=1, help="Ray Data actors sending requests (default: 1)")
    p.add_argument("--window", type=int, default=8, help="tokens of context_left/context_right (default: 8)")
    p.add_argument("--text-column", default="text", help="the dataset's text column (default: text)")
    p.add_argument("--format", default="auto", choices=["auto", "jsonl", "parquet"],
                   help="dataset format (default: auto, from the file names)")
    p.add_argument("--num-cpus", type=float, default=0.25, help="CPUs reserved per Ray Data actor and read task (default: 0.25; they mostly wait on the app)")
    p.add_argument("--address", default="auto", help="Ray cluster address (default: auto, the job's cluster)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    try:
        features = parse_features(args.features)
    except ValueError as e:
        print(f"error: --features: {e}", file=sys.stderr)
        return 2

    import pyarrow.parquet as pq
    import ray
    from ray import serve

    ray.init(address=args.address)
    try:
        handle = serve.get_app_handle(args.app)
    except Exception as e:
        print(f"error: Serve application {args.app!r} is not running on this cluster: {e}", file=sys.stderr)
        return 1
    t0 = time.monotonic()
    try:
        table = extract_top_contexts(handle, args.dataset, args.source, features, args.top, model=args.model,
                                     batch_size=args.batch_size, concurrency=args.concurrency, window=args.window,
                                     text_column=args.text_column, num_cpus=args.num_cpus, progress=not args.no_progress,
                                     fmt=args.format)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Exception as e:
        inner = unwrap_remote_error(e)
        if inner is None:
            raise
        print(f"error: the app refused a request ({inner.status}): {inner.message}", file=sys.stderr)
        return 1
    pq.write_table(table, args.out)
    s = summary(table)
    print(f"wrote {s['n_rows']} rows for {len(features)} features to {args.out} in {time.monotonic() - t0:.1f}s: "
          f"{s['n_texts']} texts scored, {s['n_skipped_too_long']} skipped as too long, {s['n_skipped_empty']} null")
    return 0


if __name__ == "__main__":
    sys.exit(main())
