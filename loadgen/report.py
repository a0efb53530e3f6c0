"""Reports: the self-describing JSON, the per-request CSV, PNG plots and the side-by-side comparison."""
from __future__ import annotations

import csv
import json
import platform
import sys
import time
from importlib import metadata

from loadgen.metrics import RequestResult

REPORT_VERSION = 1
LATENCIES = ("ttft", "tpot", "e2e", "itl")


def versions() -> dict:
    out = {"python": platform.python_version(), "platform": platform.platform()}
    for dist in ("tandem-serve", "numpy", "aiohttp", "grpcio", "matplotlib"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = None
    return out


def build_report(*, target: dict, workload: dict, seed: int, summary: dict, options: dict,
                 search: dict | None = None) -> dict:
    return {"report_version": REPORT_VERSION, "tool": "loadgen",
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "command": " ".join(sys.argv), "target": target, "seed": seed, "workload": workload,
            "options": options, "versions": versions(), "summary": summary, "search": search}


def write_json(report: dict, path: str) -> None:
    with open(path, "w") as f:
        json.dump(report, f, indent=2, default=float)
        f.write("\n")


def write_csv(results: list[RequestResult], path: str) -> None:
    write_rows([r.row() for r in results] or [dict.fromkeys(RequestResult(0, 0.0).row())], path, header_only=not results)


def write_rows(rows: list[dict], path: str, header_only: bool = False) -> None:
    """A CSV of `rows` whose columns are the union of their keys, in first-seen order (missing: empty)."""
    fields = list(dict.fromkeys(k for row in rows for k in row))
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        if not header_only:
            writer.writerows(rows)


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot_cdfs(results: list[RequestResult], path: str, title: str = "") -> None:
    """One PNG with the CDFs of TTFT, TPOT and E2E over completed requests."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    done = [r for r in results if r.ok]
    for ax, (name, get) in zip(axes, (("TTFT", lambda r: r.ttft_s), ("TPOT", lambda r: r.tpot_s),
                                      ("E2E", lambda r: r.e2e_s))):
        xs = sorted(v for v in map(get, done) if v is not None)
        if xs:
            ax.step(xs, [(i + 1) / len(xs) for i in range(len(xs))], where="post")
        ax.set_xlabel(f"{name} (s)")
        ax.set_ylabel("fraction of requests")
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_search(search: dict, path: str) -> None:
    """Attainment, goodput and latency percentiles against offered rate, from a goodput search."""
    plt = _pyplot()
    probes = sorted(search["probes"], key=lambda p: p["rate"])
    rates = [p["rate"] for p in probes]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    axes[0].plot(rates, [p["attainment"] for p in probes], "o-")
    axes[0].axhline(search["target_attainment"], ls="--", color="grey")
    axes[0].set_ylabel("SLO attainment")
    axes[1].plot(rates, [p["goodput_requests_s"] for p in probes], "o-")
    axes[1].set_ylabel("goodput (req/s)")
    for metric in ("ttft", "tpot"):
        for q in ("p50", "p99"):
            axes[2].plot(rates, [(p[metric] or {}).get(q) for p in probes], "o-", label=f"{metric} {q}")
    axes[2].set_ylabel("latency (s)")
    axes[2].legend(fontsize=7)
    for ax in axes:
        ax.set_xlabel("offered rate (req/s)")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ------------------------------------------------------------------------------------ comparison

COMPARE_ROWS = ([(m, q) for m in ("ttft", "tpot", "e2e") for q in ("mean", "p50", "p90", "p99")]
                + [("throughput_tokens_s", None), ("completed", None), ("failed", None),
                   ("attainment", None), ("goodput_requests_s", None)])


def _value(summary: dict, metric: str, q: str | None):
    v = summary.get(metric)
    if q is not None:
        v = (v or {}).get(q)
    return v


def load_report(path: str) -> dict:
    with open(path) as f:
        report = json.load(f)
    if "summary" not in report:
        raise ValueError(f"{path}: not a loadgen report (no summary)")
    return report


def compare_table(reports: list[tuple[str, dict]]) -> str:
    """A text table, one column per report, with each value's ratio to the first report's."""
    names = [name for name, _ in reports]
    lines = [f"{'metric':<24}" + "".join(f"{n[:22]:>24}" for n in names)]
    for metric, q in COMPARE_ROWS:
        label = metric if q is None else f"{metric} {q}"
        base = _value(reports[0][1]["summary"], metric, q)
        cells = []
        for i, (_, rep) in enumerate(reports):
            v = _value(rep["summary"], metric, q)
            if v is None:
                cells.append("-")
                continue
            cell = f"{v:.4g}"
            if i and isinstance(base, (int, float)) and base:
                cell += f" ({v / base:.2f}x)"
            cells.append(cell)
        lines.append(f"{label:<24}" + "".join(f"{c:>24}" for c in cells))
    best = [(rep.get("search") or {}).get("best_rate_rps") for _, rep in reports]
    if any(b is not None for b in best):
        cells = [("-" if b is None else f"{b:.4g}" + (f" ({b / best[0]:.2f}x)" if i and best[0] else ""))
                 for i, b in enumerate(best)]
        lines.append(f"{'best rate (search)':<24}" + "".join(f"{c:>24}" for c in cells))
    return "\n".join(lines)


def plot_compare(reports: list[tuple[str, dict]], out_dir: str) -> list[str]:
    """One PNG per latency metric (p50/p90/p99 bars, every system on it) and one for goodput."""
    import os
    plt = _pyplot()
    paths = []
    for metric in ("ttft", "tpot", "e2e"):
        fig, ax = plt.subplots(figsize=(6, 3.8))
        width = 0.8 / len(reports)
        for i, (name, rep) in enumerate(reports):
            vals = [_value(rep["summary"], metric, q) or 0.0 for q in ("p50", "p90", "p99")]
            ax.bar([x + i * width for x in range(3)], vals, width, label=name)
        ax.set_xticks([x + width * (len(reports) - 1) / 2 for x in range(3)], ["p50", "p90", "p99"])
        ax.set_ylabel(f"{metric.upper()} (s)")
        ax.legend(fontsize=7)
        fig.tight_layout()
        path = os.path.join(out_dir, f"compare_{metric}.png")
        fig.savefig(path, dpi=100)
        plt.close(fig)
        paths.append(path)
    fig, ax = plt.subplots(figsize=(6, 3.8))
    ax.bar([n for n, _ in reports], [r["summary"].get("goodput_requests_s") or 0.0 for _, r in reports])
    ax.set_ylabel("goodput (req/s)")
    fig.tight_layout()
    path = os.path.join(out_dir, "compare_goodput.png")
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return paths + [path]
