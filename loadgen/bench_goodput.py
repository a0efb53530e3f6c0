"""Goodput of a disaggregated cluster vs the colocated baseline (and vLLM's CPU server when installed).

    python -m loadgen.bench_goodput --model small --out-dir bench-goodput

In one run, on the same workload and SLOs: a 1 prefill + 1 decode cluster pinned to separate
cores, 2 colocated instances (one per core), and — when ../shared/peers' vLLM venv exists — vLLM's
OpenAI server. Each system gets `python -m loadgen run --search-goodput`; reports, plots and the
comparison (`compare.txt`, `compare_*.png`) land in --out-dir. Meant for `make bench-goodput`.
"""
from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

from tandem.local_cluster import LocalCluster

PEERS = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "peers")
TRACE = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "traces", "AzureLLMInferenceTrace_conv.csv")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m loadgen.bench_goodput", description=__doc__.splitlines()[0])
    p.add_argument("--model", default="small")
    p.add_argument("--trace", default=TRACE)
    p.add_argument("--max-requests", type=int, default=200,
                   help="requests per probe; short probes only measure how big a burst a fast system absorbs")
    p.add_argument("--max-input-tokens", type=int, default=512,
                   help="clip prompts (a 512-token prefill takes ~0.2 s on one core here: room under the TTFT SLO)")
    p.add_argument("--max-output-tokens", type=int, default=128)
    p.add_argument("--rate", type=float, default=2.0, help="starting rate of the search (req/s)")
    p.add_argument("--ttft-slo", type=float, default=2.0,
                   help="seconds; a 512-token prefill alone takes 0.2-0.4 s on one shared core here")
    p.add_argument("--tpot-slo", type=float, default=0.1)
    p.add_argument("--attainment", type=float, default=0.9)
    p.add_argument("--search-steps", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--warmup", type=int, default=4, help="unrecorded requests sent to each system first")
    p.add_argument("--no-pin", action="store_true", help="do not pin workers to cores")
    p.add_argument("--skip-vllm", action="store_true")
    p.add_argument("--systems", default="disaggregated,colocated,vllm",
                   help="which systems to run; the comparison also takes reports already in --out-dir")
    p.add_argument("--out-dir", default="bench-goodput")
    return p


def _loadgen_run(args, name: str, target: str, extra: list[str] = ()) -> str:
    out = os.path.join(args.out_dir, f"{name}.json")
    cmd = [sys.executable, "-m", "loadgen", "run", "--target", target, "--trace", args.trace,
           "--max-requests", str(args.max_requests), "--max-input-tokens", str(args.max_input_tokens),
           "--max-output-tokens", str(args.max_output_tokens), "--rate", str(args.rate), "--seed", str(args.seed),
           "--warmup", str(args.warmup), "--ttft-slo", str(args.ttft_slo), "--tpot-slo", str(args.tpot_slo), "--attainment", str(args.attainment),
           "--search-goodput", "--search-steps", str(args.search_steps), "--out", out,
           "--csv", os.path.join(args.out_dir, f"{name}.csv"), "--plot", os.path.join(args.out_dir, f"{name}.png"),
           *extra]
    print(f"bench-goodput: {name}: {' '.join(cmd[1:])}", file=sys.stderr)
    subprocess.run(cmd, check=True)
    return out


def _cluster(args, name: str, **shape) -> str:
    with LocalCluster(args.model, pin_cores=not args.no_pin, log_dir=os.path.join(args.out_dir, f"{name}-logs"),
                      **shape) as c:
        return _loadgen_run(args, name, f"grpc://{c.address}")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _vllm(args) -> str | None:
    """vLLM's CPU OpenAI server on an exported copy of the model, or None when its venv is missing."""
    venv = os.environ.get("PEER_VENV", os.path.expanduser("~/.cache/tandem-peers/vllm-cpu"))
    if args.skip_vllm or not os.path.exists(os.path.join(venv, "bin", "python")):
        print("bench-goodput: vLLM's CPU venv not found; skipping it (../shared/peers/setup-vllm-cpu.sh)",
              file=sys.stderr)
        return None
    model_dir = os.path.join(args.out_dir, f"model-{args.model}")
    if not os.path.isdir(model_dir):
        subprocess.run([sys.executable, "-m", "tandem.cli", "export-model", args.model, model_dir], check=True)
    port = _free_port()
    script = (f". {PEERS}/env.sh && exec \"$PEER_VENV/bin/python\" {PEERS}/vllm_cli.py serve {model_dir} "
              f"--host 127.0.0.1 --port {port} --load-format dummy --dtype bfloat16 --max-model-len 4096 --seed 0")
    log = open(os.path.join(args.out_dir, "vllm.log"), "w")
    server = subprocess.Popen(["bash", "-c", script], stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        _wait_http(f"http://127.0.0.1:{port}/v1/models", server, timeout_s=600)
        return _loadgen_run(args, "vllm", f"http://127.0.0.1:{port}", ["--vocab-size", "32000"])
    finally:
        os.killpg(server.pid, signal.SIGINT)        # the session this function started
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
        log.close()


def _wait_http(url: str, server: subprocess.Popen, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"vLLM server exited with {server.returncode} before serving (see vllm.log)")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(1.0)
    raise RuntimeError(f"vLLM server not serving {url} after {timeout_s:.0f} s")


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    os.makedirs(args.out_dir, exist_ok=True)
    systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    unknown = set(systems) - {"disaggregated", "colocated", "vllm"}
    if unknown:
        print(f"bench-goodput: --systems: unknown {sorted(unknown)}; use disaggregated, colocated, vllm",
              file=sys.stderr)
        return 2
    if "disaggregated" in systems:
        _cluster(args, "disaggregated", prefill=1, decode=1)
    if "colocated" in systems:
        _cluster(args, "colocated", prefill=0, decode=0, colocated=2)
    if "vllm" in systems:
        _vllm(args)
    reports = [(name, path) for name in ("disaggregated", "colocated", "vllm")
               if os.path.exists(path := os.path.join(args.out_dir, f"{name}.json"))]
    table = subprocess.run([sys.executable, "-m", "loadgen", "compare", *(p for _, p in reports),
                            "--names", ",".join(n for n, _ in reports), "--plot-dir", args.out_dir],
                           check=True, capture_output=True, text=True).stdout
    with open(os.path.join(args.out_dir, "compare.txt"), "w") as f:
        f.write(f"SLOs: TTFT <= {args.ttft_slo} s, TPOT <= {args.tpot_slo} s, attainment >= {args.attainment}\n")
        f.write(table + "\n")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
