"""The clients users already run, unchanged, against a real Tandem cluster's OpenAI port.

Starts a 1P+1D LocalCluster of `small` (exported with its tokenizer, which `vllm bench serve`
needs), then on the same cluster, one after another on the same workload (random prompts of
--input tokens, --output tokens each with ignore_eos, --num requests at a Poisson --rate):

  vllm bench serve --backend openai       (/v1/completions, text prompts; sends repetition_penalty 1.0)
  vllm bench serve --backend openai-chat  (/v1/chat/completions)
  python -m loadgen run --target http://...  (Tandem's own load generator, the reference figures)

and prints one JSON line per run (completed, failed, mean/p99 TTFT and TPOT in ms, the first
errors if any), then a last line comparing each vLLM client's mean TTFT and TPOT with loadgen's
(ratio = client / loadgen) and the total failed requests (goal: 0). vLLM's client comes from the
CPU peer venv (../shared/peers; PEER_VENV to move it); a line says so when it is missing.

    .venv/bin/python benchmarks/bench_clients.py [--num 30] [--rate 2] [--input 256] [--output 32]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

from benchmarks.host_info import host_line  # noqa: E402
from services import env  # noqa: E402

PEER_VENV = env.peer_venv()
PEER_CLI = os.path.join(ROOT, "..", "shared", "peers", "vllm_cli.py")


def _emit(line: dict) -> None:
    print(json.dumps(line), flush=True)


def vllm_bench(backend: str, http: str, model_dir: str, model_id: str, args, out_dir: str) -> dict:
    endpoint = "/v1/chat/completions" if backend == "openai-chat" else "/v1/completions"
    name = f"vllm-{backend}.json"
    cmd = [os.path.join(PEER_VENV, "bin", "python"), PEER_CLI, "bench", "serve", "--backend", backend,
           "--base-url", f"http://{http}", "--endpoint", endpoint, "--model", model_id, "--tokenizer", model_dir,
           "--dataset-name", "random", "--random-input-len", str(args.input), "--random-output-len", str(args.output),
           "--num-prompts", str(args.num), "--request-rate", str(args.rate), "--seed", "0", "--ignore-eos",
           "--percentile-metrics", "ttft,tpot,itl,e2el", "--save-result", "--result-dir", out_dir,
           "--result-filename", name, "--disable-tqdm"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "VLLM_TARGET_DEVICE": "cpu", "LD_PRELOAD": ""}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=args.timeout)
    path = os.path.join(out_dir, name)
    if proc.returncode != 0 or not os.path.exists(path):
        return {"client": f"vllm bench serve --backend {backend}", "error": f"exit {proc.returncode}",
                "stderr_tail": proc.stderr[-1500:]}
    r = json.load(open(path))
    errors = [e for e in r.get("errors", []) if e]
    return {"client": f"vllm bench serve --backend {backend}", "completed": r["completed"], "failed": r["failed"],
            "mean_ttft_ms": round(r["mean_ttft_ms"], 2), "p99_ttft_ms": round(r["p99_ttft_ms"], 2),
            "mean_tpot_ms": round(r["mean_tpot_ms"], 2), "p99_tpot_ms": round(r["p99_tpot_ms"], 2),
            "request_throughput": round(r["request_throughput"], 3), "first_errors": errors[:3]}


def loadgen(http: str, model_dir: str, args, out_dir: str) -> dict:
    out = os.path.join(out_dir, "loadgen.json")
    cmd = [sys.executable, "-m", "loadgen", "run", "--target", f"http://{http}",
           "--trace", f"synthetic:n={args.num},input={args.input},output={args.output}", "--rate", str(args.rate),
           "--arrival", "poisson", "--seed", "0", "--tokenizer", model_dir, "--out", out, "--no-progress"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=args.timeout)
    if proc.returncode != 0 or not os.path.exists(out):
        return {"client": "loadgen", "error": f"exit {proc.returncode}", "stderr_tail": proc.stderr[-1500:]}
    s = json.load(open(out))["summary"]
    return {"client": "loadgen", "completed": s["completed"], "failed": s["failed"],
            "mean_ttft_ms": round(s["ttft"]["mean"] * 1e3, 2), "p99_ttft_ms": round(s["ttft"]["p99"] * 1e3, 2),
            "mean_tpot_ms": round(s["tpot"]["mean"] * 1e3, 2), "p99_tpot_ms": round(s["tpot"]["p99"] * 1e3, 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="small")
    ap.add_argument("--num", type=int, default=30)
    ap.add_argument("--rate", type=float, default=2.0)
    ap.add_argument("--input", type=int, default=256)
    ap.add_argument("--output", type=int, default=32)
    ap.add_argument("--timeout", type=float, default=900.0)
    args = ap.parse_args()
    from services.engine.builder import load_tokenizer
    from services.engine.loader import export_model, resolve_model
    from tandem.local_cluster import LocalCluster

    _emit(host_line())
    work = tempfile.mkdtemp(prefix="tandem-bench-clients-")
    model_dir = os.path.join(work, args.model)
    loaded = resolve_model(args.model)
    export_model(loaded, model_dir, load_tokenizer(loaded))
    model_id = os.path.basename(model_dir)
    results = []
    with LocalCluster(model_dir, prefill=1, decode=1, http_port=0, log_dir=os.path.join(work, "logs")) as cluster:
        _emit({"cluster": "1P+1D", "model": args.model, "http": cluster.http_address, "num": args.num,
               "rate": args.rate, "input": args.input, "output": args.output})
        runs = []
        if os.path.exists(os.path.join(PEER_VENV, "bin", "python")):
            runs += [lambda: vllm_bench("openai", cluster.http_address, model_dir, model_id, args, work),
                     lambda: vllm_bench("openai-chat", cluster.http_address, model_dir, model_id, args, work)]
        else:
            _emit({"skipped": "vllm bench serve", "why": f"no vLLM CPU venv at {PEER_VENV} (../shared/peers/setup-vllm-cpu.sh)"})
        runs.append(lambda: loadgen(cluster.http_address, model_dir, args, work))
        for run in runs:
            r = run()
            results.append(r)
            _emit(r)
    ref = next((r for r in results if r["client"] == "loadgen" and "error" not in r), None)
    summary = {"bench": "clients", "failed_total": sum(r.get("failed", 0) for r in results),
               "errored_runs": [r["client"] for r in results if "error" in r]}
    for r in results:
        if ref is not None and r is not ref and "error" not in r:
            key = r["client"].split()[-1]
            summary[f"{key}_ttft_vs_loadgen"] = round(r["mean_ttft_ms"] / ref["mean_ttft_ms"], 3)
            summary[f"{key}_tpot_vs_loadgen"] = round(r["mean_tpot_ms"] / ref["mean_tpot_ms"], 3)
    _emit(summary)


if __name__ == "__main__":
    main()
