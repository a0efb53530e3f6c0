"""vLLM's side of `make bench-engine`: the probes of engine_probes.py on vLLM's CPU build.

Runs inside vLLM's venv (../shared/peers), never Tandem's:

  $PEER_VENV/bin/python benchmarks/vllm_engine_probe.py MODEL_DIR --dtype bfloat16 [probe options]

MODEL_DIR needs a config.json (weights are vLLM's "dummy" random ones: speed does not depend on
their values). Prints one JSON object per probe, each with "system": "vllm-cpu".
"""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import engine_probes  # noqa: E402  (a sibling file, importable without Tandem installed)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("model")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--workloads", default="64x256x128,256x64x64")
    p.add_argument("--batches", default="1,8,32")
    p.add_argument("--context", type=int, default=512)
    p.add_argument("--decode-steps", type=int, default=32)
    p.add_argument("--prefill-lengths", default="128,512,2048")
    p.add_argument("--repeats", type=int, default=3)
    a = p.parse_args()
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    llm = LLM(model=a.model, load_format="dummy", skip_tokenizer_init=True, dtype=a.dtype, max_model_len=4096,
              max_num_seqs=256, seed=0, enable_prefix_caching=False)
    vocab = llm.llm_engine.model_config.get_vocab_size()

    def generate(prompts: list[list[int]], max_tokens: int) -> int:
        sp = SamplingParams(temperature=0.0, max_tokens=max_tokens, min_tokens=max_tokens, ignore_eos=True,
                            detokenize=False)
        outs = llm.generate([TokensPrompt(prompt_token_ids=t) for t in prompts], sp, use_tqdm=False)
        return sum(len(o.outputs[0].token_ids) for o in outs)

    generate(engine_probes.random_prompts(__import__("random").Random(1), 4, 64, vocab), 8)    # warm-up
    engine_probes.run_all(
        generate, vocab, workloads=engine_probes.parse_list(a.workloads), batches=engine_probes.parse_list(a.batches, int),
        context=a.context, decode_steps=a.decode_steps,
        prefill_lengths=engine_probes.parse_list(a.prefill_lengths, int), repeats=a.repeats,
        emit=lambda r: print(json.dumps({"system": "vllm-cpu", "dtype": a.dtype, **r}), flush=True))


if __name__ == "__main__":
    main()
