"""Render the example values to the golden manifests beside them.

    python k8s/render.py            # rewrite k8s/examples/rendered-*.yaml
    python k8s/render.py --check    # exit 1 if a golden file is out of date

Uses the Helm engine embedded in the `helm-python-sdk` package (no helm binary needed). The test
tests/k8s/test_chart.py renders the same way and compares with the checked-in files.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

K8S = Path(__file__).resolve().parent
CHART = K8S / "tandem"
EXAMPLES = K8S / "examples"
RELEASE = "tandem"
NAMESPACE = "tandem"
EXAMPLE_NAMES = ("cpu", "gpu", "gpu-autoscale")


def render(values: dict | None = None, *, release: str = RELEASE, namespace: str = NAMESPACE) -> dict[str, str]:
    """Template path → rendered text (empty documents included), as `helm template` would produce."""
    import helm_python as helm

    chart = helm.Chart.load(CHART)
    try:
        return chart.render(values or {}, name=release, namespace=namespace, is_install=True)
    finally:
        chart.close()


def load_values(path: Path) -> dict:
    import yaml

    return yaml.safe_load(path.read_text()) or {}


def to_manifest(rendered: dict[str, str]) -> str:
    """One multi-document YAML in `helm template` form: `# Source:` headers, sorted, empty ones left out."""
    docs = []
    for path in sorted(rendered):
        if path.endswith("NOTES.txt"):
            continue
        for doc in rendered[path].split("\n---"):
            body = doc.strip("\n")
            if any(line.strip() and not line.lstrip().startswith("#") for line in body.splitlines()):
                docs.append(f"---\n# Source: {path}\n{body}\n")
    return "".join(docs)


def golden(name: str) -> tuple[Path, str]:
    """(golden file, freshly rendered text) for example `name`."""
    values = load_values(EXAMPLES / f"values-{name}.yaml")
    return EXAMPLES / f"rendered-{name}.yaml", to_manifest(render(values))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--check", action="store_true", help="only report out-of-date golden files")
    a = p.parse_args(argv)
    stale = []
    for name in EXAMPLE_NAMES:
        path, text = golden(name)
        if a.check:
            if not path.exists() or path.read_text() != text:
                stale.append(path)
        else:
            path.write_text(text)
            print(f"wrote {path.relative_to(K8S.parent)}")
    for path in stale:
        print(f"out of date: {path.relative_to(K8S.parent)} (run: python k8s/render.py)", file=sys.stderr)
    return 1 if stale else 0


if __name__ == "__main__":
    sys.exit(main())
