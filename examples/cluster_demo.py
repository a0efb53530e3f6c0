"""`make demo`: a 1 prefill + 1 decode cluster of the `small` model on this machine, a few prompts
streamed through the SDK with TTFT and TPOT per request, then a clean stop.

The model has seeded random weights (no hub access here), so the text is noise; the point is the
path: router → prefill worker → KV over TCP → decode worker → tokens streamed back.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from concurrent.futures import ThreadPoolExecutor

from tandem import Client
from tandem.local_cluster import LocalCluster


def printable(text: str) -> str:
    return "".join(ch if ch.isprintable() else "·" for ch in text)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="small")
    p.add_argument("--prompts", default="examples/prompts.jsonl")
    p.add_argument("--max-tokens", type=int, default=32)
    a = p.parse_args()
    prompts = [p["prompt"] for p in map(json.loads, filter(str.strip, open(a.prompts))) if "prompt" in p]
    t0 = time.monotonic()
    print(f"starting 1 prefill + 1 decode workers of {a.model!r} (pinned to separate cores), Redis and the router...",
          flush=True)
    with LocalCluster(a.model, prefill=1, decode=1, pin_cores=True) as cluster:      # --dtype auto
        print(f"ready {cluster.address} after {time.monotonic() - t0:.1f}s; logs in {cluster.log_dir}\n", flush=True)
        with Client(cluster.address) as client:
            for i, prompt in enumerate(prompts):
                print(f"[{i}] {prompt!r}\n    → ", end="", flush=True)
                start, first, n, last = time.monotonic(), None, 0, None
                for chunk in client.generate(prompt=prompt, max_tokens=a.max_tokens, ignore_eos=True):
                    now = time.monotonic()
                    first = first or now
                    n, last = n + len(chunk.token_ids), now
                    print(printable(chunk.text), end="", flush=True)
                tpot = (last - first) / (n - 1) if n > 1 else 0.0
                print(f"\n    {n} tokens  TTFT {1e3 * (first - start):.1f} ms  TPOT {1e3 * tpot:.1f} ms  "
                      f"(prefill {chunk.prefill_instance or 'prefill-0'} → decode {chunk.decode_instance or 'decode-0'})")
            print(f"\nall {len(prompts)} prompts at once:")
            with ThreadPoolExecutor(len(prompts)) as pool:
                results = list(pool.map(lambda q: client.complete(prompt=q, max_tokens=a.max_tokens, ignore_eos=True),
                                        prompts))
            for i, r in enumerate(results):
                print(f"[{i}] {len(r.token_ids)} tokens  TTFT {1e3 * r.ttft_s:.1f} ms  TPOT {1e3 * r.tpot_s:.1f} ms  "
                      f"finish={r.finish_reason}")
        print("\nstopping the cluster...", flush=True)
    print("stopped: no worker, router or Redis process is left.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
