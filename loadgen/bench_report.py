"""What `make bench-goodput` writes: the summary JSON, its last printed line, the table and the plots.

A system's record (`system_record`) is plain JSON: `status` "ok" | "unavailable" | "failed",
`reason`, its own unloaded latencies, its probes, and per SLO level the goodput with its bracket.
Goodput is null for a system that could not run (or failed mid-search); 0.0 when even the lowest
probed rate missed the SLOs.
"""
from __future__ import annotations

import itertools
import json
from collections.abc import Mapping, Sequence

from loadgen.goodput import LEVELS, Goodput, Slo

# The final line's key order; ratios are taken in this order too (each system over those after it).
ORDER = ("vllm", "fixed", "adaptive", "colocated", "single")
RATIO_ORDER = ("adaptive", "fixed", "colocated", "single", "vllm")


def goodput_record(g: Goodput) -> dict:
    return {"goodput_rps": g.goodput, "bracket_rps": [g.lo, g.hi], "complete": g.complete}


def system_record(status: str, reason: str | None = None, unloaded: tuple[float, float] | None = None,
                  probes: Sequence[dict] = (), goodputs: Mapping[str, Goodput] | None = None,
                  **extra) -> dict:
    return {"status": status, "reason": reason,
            "unloaded": None if unloaded is None else {"ttft_s": unloaded[0], "tpot_s": unloaded[1]},
            "goodput": {lv: goodput_record(g) for lv, g in (goodputs or {}).items()},
            "probes": list(probes), **extra}


def goodput_of(record: Mapping | None, level: str) -> float | None:
    """The system's goodput at `level`, or None when it did not run to a result."""
    if not record or record.get("status") != "ok":
        return None
    g = (record.get("goodput") or {}).get(level)
    return None if g is None else g["goodput_rps"]


def final_line(slos: Mapping[str, Slo] | None, systems: Mapping[str, Mapping]) -> dict:
    """`{"tight": {"ttft_slo_s", "tpot_slo_s", "vllm", "fixed", "adaptive", "colocated", "single"}, "relaxed": {…}}`;
    a system not in `systems` (not asked for) is null like one that could not run; the SLOs are
    null when `slos` is None (no system could be measured)."""
    return {lv: {"ttft_slo_s": slos[lv].ttft_s if slos else None, "tpot_slo_s": slos[lv].tpot_s if slos else None,
                 **{name: goodput_of(systems.get(name), lv) for name in ORDER}} for lv in LEVELS}


def ratios(systems: Mapping[str, Mapping]) -> dict[str, dict[str, float | None]]:
    """Per level, every pair "a/b" of systems (a before b in RATIO_ORDER): goodput a ÷ goodput b,
    null when either is null or b is 0."""
    out = {}
    for lv in LEVELS:
        out[lv] = {}
        for a, b in itertools.combinations(RATIO_ORDER, 2):
            ga, gb = goodput_of(systems.get(a), lv), goodput_of(systems.get(b), lv)
            out[lv][f"{a}/{b}"] = None if ga is None or gb is None or gb == 0 else ga / gb
    return out


def summary(*, host: Mapping, dtype: Mapping, workload: Mapping, reference: Mapping, slos: Mapping[str, Slo] | None,
            attainment: float, systems: Mapping[str, Mapping], wall_s: float) -> dict:
    """The whole summary.json; `slos` None when no system could be measured."""
    return {"host": dict(host), "dtype": dict(dtype), "workload": dict(workload), "reference": dict(reference),
            "attainment": attainment,
            "slos": {lv: {"scale": reference.get("scales", {}).get(lv), "ttft_s": s.ttft_s, "tpot_s": s.tpot_s}
                     for lv, s in (slos or {}).items()},
            "systems": {name: systems[name] for name in ORDER if name in systems},
            "ratios": ratios(systems), "goodput": final_line(slos, systems), "wall_s": wall_s}


def write_summary(doc: dict, path: str) -> None:
    with open(path, "w") as f:
        json.dump(doc, f, indent=2)
        f.write("\n")


# ------------------------------------------------------------------------------------------- text

def _num(v, unit: str = "") -> str:
    return "null" if v is None else f"{v:.3g}{unit}"


def table(doc: Mapping) -> str:
    """The human-readable summary printed before the final JSON line."""
    ref, slos = doc["reference"], doc["slos"]
    h = doc["host"]
    host = " · ".join(str(x) for x in (h.get("cpu"), f"torch CPU capability {h.get('torch_cpu_capability')}",
                                        f"{h.get('cores')} cores", ",".join(h.get("features") or []) or None,
                                        f"load {h['load_avg_1m_at_start']} at start" if "load_avg_1m_at_start" in h
                                        else None) if x)
    lines = [f"host: {host}", f"dtype: {doc['dtype']['dtype']} ({doc['dtype']['source']}), every system",
             f"workload: {doc['workload']['description']}",
             f"reference: {ref['system']} unloaded TTFT {_num(ref['ttft_s'], ' s')}, TPOT {_num(ref['tpot_s'], ' s')}"
             f" ({ref['how']})" + (f"; NOTE: {ref['note']}" if ref.get("note") else "")]
    for lv in LEVELS:
        s = slos[lv]
        lines.append(f"SLO {lv:<7} ({s['scale']:g}x): TTFT <= {s['ttft_s']:.4g} s, TPOT <= {s['tpot_s']:.4g} s, "
                     f"attainment >= {doc['attainment']:g}")
    lines.append(f"{'system':<10} {'unloaded TTFT / TPOT':>22}  " + "  ".join(f"{lv + ' goodput [bracket]':>30}"
                                                                            for lv in LEVELS) + "  probes")
    for name in ORDER:
        rec = doc["systems"].get(name)
        if rec is None:
            lines.append(f"{name:<10} not run (--systems)")
            continue
        if rec["status"] != "ok":
            lines.append(f"{name:<10} null: {rec['reason']}")
            continue
        u = rec["unloaded"] or {}
        cells = []
        for lv in LEVELS:
            g = rec["goodput"][lv]
            lo, hi = g["bracket_rps"]
            cells.append(f"{g['goodput_rps']:.3g} req/s [{_num(lo)}, {_num(hi)}]" + ("" if g["complete"] else " (budget)"))
        probes = ", ".join(f"{p['rate']:g}" + "".join(("+" if p[lv]["passed"] else "-" if p[lv]["passed"] is False
                                                       else "?") for lv in LEVELS) for p in rec["probes"])
        lines.append(f"{name:<10} {_num(u.get('ttft_s'), ' s'):>10} / {_num(u.get('tpot_s'), ' s'):>9}  "
                     + "  ".join(f"{c:>30}" for c in cells) + f"  {probes}")
    lines.append("probes: rate then tight/relaxed verdict (+ pass, - fail, ? not decided: the probe stopped early)")
    for lv in LEVELS:
        pairs = [f"{k} {_num(v)}" for k, v in doc["ratios"][lv].items() if v is not None]
        lines.append(f"ratios {lv}: " + (", ".join(pairs) if pairs else "none (fewer than two goodputs > 0)"))
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------ plots

def plot_latency_vs_rate(doc: Mapping, level: str, path: str) -> None:
    """Attainment, TTFT and TPOT (p50 dashed, p90 solid) against offered rate for every system that
    ran, with this level's SLOs; hollow markers are probes stopped early (their latencies cover only
    the requests that had finished)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker
    slo = doc["slos"][level]
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    for i, name in enumerate(ORDER):
        rec = doc["systems"].get(name)
        if not rec or not rec["probes"]:
            continue
        color = f"C{i}"
        probes = sorted(rec["probes"], key=lambda p: p["rate"])
        rates = [p["rate"] for p in probes]
        series = ((0, [p[level]["attainment"] for p in probes], "-", name),
                  (1, [(p["ttft"] or {}).get("p90") for p in probes], "-", f"{name} p90"),
                  (1, [(p["ttft"] or {}).get("p50") for p in probes], "--", f"{name} p50"),
                  (2, [(p["tpot"] or {}).get("p90") for p in probes], "-", f"{name} p90"),
                  (2, [(p["tpot"] or {}).get("p50") for p in probes], "--", f"{name} p50"))
        for ax_i, ys, style, label in series:
            ax = axes[ax_i]
            ax.plot(rates, ys, style, color=color, label=label)
            for r, y, p in zip(rates, ys, probes):
                if y is not None:
                    ax.plot([r], [y], "o", color=color, fillstyle="none" if p["stopped_early"] else "full")
    axes[0].axhline(doc["attainment"], ls=":", color="grey")
    axes[0].set_ylabel(f"attainment ({level} SLOs)")
    axes[1].axhline(slo["ttft_s"], ls=":", color="grey")
    axes[1].set_ylabel("TTFT (s)")
    axes[2].axhline(slo["tpot_s"], ls=":", color="grey")
    axes[2].set_ylabel("TPOT (s)")
    plain = matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}")
    some = matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}" if f"{v:e}"[0] in "25" else "")
    for ax in axes:
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(plain)
        ax.xaxis.set_minor_formatter(some)
        ax.set_xlabel("offered rate (req/s)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    for ax in axes[1:]:
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(plain)
        ax.yaxis.set_minor_formatter(some)
    fig.suptitle(f"{level} SLOs: TTFT <= {slo['ttft_s']:.3g} s, TPOT <= {slo['tpot_s']:.3g} s "
                 f"({slo['scale']:g}x {doc['reference']['system']} unloaded)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
