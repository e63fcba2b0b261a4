"""Build ``.whl/site.tar.xz``: the Python packages the lent GPU machine lacks, for Python 3.12 on x86-64, ready to
unpack into one directory on ``PYTHONPATH`` (scripts/gpu_check.sh does that there). Run here, where pip reaches
the package index:

    scripts/gpu_check.sh prepare          # = python3 scripts/gpu_bundle.py

What the machine has is in /work/.library/device/KINDS.md (torch 2.11 + CUDA 13, transformers, numpy, pandas,
pyarrow, aiohttp, grpcio, ...); what the project imports beyond that was traced here by running the service
with an import hook in every process (engine, TransformerLens, SAE Lens, Ray Serve, FastAPI). Ray's wheel (79 MB)
alone is over the 64 MiB a call may carry; without its Java jar (32 MB), its dashboard's web client and RLlib /
LLM, and packed with xz, the whole bundle is 26 MiB (measured), leaving room for the working tree (9 MiB).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CARRY_LIMIT = 64 << 20

# Pinned to what .venv holds here (the tested stack). Only packages the GPU image lacks: a second copy of one it has
# would shadow it (PYTHONPATH comes first) and could break torch's own dependencies.
PACKAGES = """
transformer-lens==3.9.0 sae-lens==6.54.12 better-abc==0.0.3 fancy-einsum==0.0.3 typeguard==4.6.1 datasets==5.2.0
dill==0.4.1 multiprocess==0.70.19 docstring-parser==0.18.0 simple-parsing==0.1.9 python-dotenv==1.2.4 tenacity==9.2.1
pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5
fastapi==0.165.0 starlette==1.10.0 uvicorn==0.54.0 httptools==0.9.0 websockets==17.4 watchfiles==1.3.0 sniffio==1.3.1
jsonschema==4.26.0 jsonschema-specifications==2025.9.1 referencing==0.37.0 rpds-py==2026.9.1 aiohttp-cors==0.8.1
colorful==0.5.8 opencensus==0.11.4 opencensus-context==0.1.3 opentelemetry-api==1.45.2 opentelemetry-sdk==1.45.2
opentelemetry-proto==1.45.2 opentelemetry-exporter-prometheus==0.66b2 opentelemetry-semantic-conventions==0.66b2
grpcio-reflection==1.85.1 platformdirs==4.14.9 google-api-core==2.44.0
ray==2.60.0
""".split()

# Parts of Ray a Serve application on one node never loads.
DROP = ("ray/jars/", "ray/dashboard/client/build/", "ray/rllib/", "ray/llm/")

# TransformerLens imports these at import time and uses neither for inference.
STUBS = {
    "wandb/__init__.py": "# stand-in (scripts/gpu_bundle.py): TransformerLens imports wandb; inference never uses it\n",
    "transformers_stream_generator/__init__.py": "def init_stream_support(*args, **kwargs):\n    pass\n",
}

PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64", "manylinux_2_5_x86_64",
             "manylinux1_x86_64"]


def download(dest: Path, python_version: str) -> list[Path]:
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", "--python-version",
           python_version, "--implementation", "cp", "-d", str(dest)]
    for plat in PLATFORMS:
        cmd += ["--platform", plat]
    subprocess.run(cmd + PACKAGES, check=True)
    return sorted(dest.glob("*.whl"))


def unpack(wheels: list[Path], site: Path) -> int:
    """Each wheel's files into ``site`` (a wheel is its site-packages layout), keeping executable bits (Ray's
    raylet and gcs_server are programs) and leaving out ``DROP``."""
    n = 0
    for w in wheels:
        with zipfile.ZipFile(w) as z:
            for info in z.infolist():
                if info.filename.startswith(DROP) or info.is_dir():
                    continue
                path = Path(z.extract(info, site))
                mode = (info.external_attr >> 16) & 0o777
                if mode:
                    os.chmod(path, mode)
                n += 1
    for rel, text in STUBS.items():
        (site / rel).parent.mkdir(parents=True, exist_ok=True)
        (site / rel).write_text(text)
    return n


def pack(site: Path, archive: Path) -> None:
    with tarfile.open(archive, "w:xz", preset=9) as tar:
        for p in sorted(site.iterdir()):
            tar.add(p, arcname=p.name)


def tree_bytes() -> int:
    """What else travels: tracked and untracked-not-ignored files of the working tree."""
    out = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO, capture_output=True).stdout
    return sum((REPO / f).stat().st_size for f in out.decode().split("\0") if f and (REPO / f).is_file())


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(REPO / ".whl"))
    p.add_argument("--python-version", default="3.12")
    a = p.parse_args(argv)
    out = Path(a.out)
    work = out / "build"
    shutil.rmtree(work, ignore_errors=True)
    (work / "wheels").mkdir(parents=True)
    wheels = download(work / "wheels", a.python_version)
    n = unpack(wheels, work / "site")
    archive = out / "site.tar.xz"
    pack(work / "site", archive)
    shutil.rmtree(work)
    size, tree = archive.stat().st_size, tree_bytes()
    print(f"{archive}: {len(wheels)} wheels, {n} files, {size / 2**20:.1f} MiB; working tree {tree / 2**20:.1f} MiB; "
          f"together {(size + tree) / 2**20:.1f} of {CARRY_LIMIT / 2**20:.0f} MiB")
    if size + tree > CARRY_LIMIT:
        print("!! over what one device call may carry", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

