"""Greedy references from transformers in a chosen dtype and device, and the comparison the
half-precision golden tests use (CUDA tests here; the same check runs on CPU in tests/unit).

In bfloat16 or float16 two implementations of one model round differently (a fused QKV GEMM
against three, another attention kernel), so their logits agree to a few units in the last place
and a near-tie between the two best tokens may go either way. The comparison is therefore exact
wherever the reference's choice is clear: the tokens must equal the reference's up to the first
step whose top-2 logit margin (in the reference's own logits) is below the dtype's tolerance; a
divergence is allowed only at such a step, and that prompt is not compared past it (the contexts
differ from there). Everything before it must match token for token.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

# Smallest top-2 logit gap (reference logits) at which a token must be reproduced exactly. A
# bfloat16 logit of magnitude 4..8 has a spacing of 1/32; a few ulps of disagreement is normal.
TIE_MARGIN = {torch.float32: 1e-3, torch.float16: 0.05, torch.bfloat16: 0.25}


@dataclass
class HfGreedy:
    token_ids: list[int]       # generated tokens
    margins: list[float]       # per step: top-1 minus top-2 logit of the reference


def hf_greedy_with_margins(model_dir: str, prompts: list[list[int]], max_new_tokens: int,
                           dtype: torch.dtype = torch.float32, device: str = "cpu") -> list[HfGreedy]:
    """LlamaForCausalLM.generate (greedy) in `dtype` on `device`, one prompt at a time."""
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device).eval()
    results = []
    for ids in prompts:
        inp = torch.tensor([ids], device=device)
        out = model.generate(inp, attention_mask=torch.ones_like(inp), max_new_tokens=max_new_tokens,
                             do_sample=False, return_dict_in_generate=True, output_logits=True)
        new = out.sequences[0, len(ids):].tolist()
        margins = []
        for step in out.logits:                                  # step: [1, vocab]
            top2 = step[0].float().topk(2).values
            margins.append(float(top2[0] - top2[1]))
        results.append(HfGreedy(new, margins))
    del model
    return results


def compare_greedy(ours: list[int], ref: HfGreedy, tie_margin: float) -> tuple[int, str | None]:
    """(tokens compared, None) when `ours` equals the reference up to its end or up to a divergence
    at a near-tie; (index, message) at the first divergence where the reference's choice was clear."""
    for i, (a, b) in enumerate(zip(ours, ref.token_ids)):
        if a != b:
            if ref.margins[i] < tie_margin:
                return i, None
            return i, (f"token {i}: {a} != {b} where the reference's top-2 margin is {ref.margins[i]:.3f} "
                       f">= {tie_margin}")
    if len(ours) != len(ref.token_ids):
        return min(len(ours), len(ref.token_ids)), f"{len(ours)} tokens != the reference's {len(ref.token_ids)}"
    return len(ours), None


def assert_greedy_matches(outputs: list[list[int]], refs: list[HfGreedy], dtype: torch.dtype,
                          min_compared: float = 0.5) -> None:
    """Every output matches its reference (see the module docstring), and at least `min_compared`
    of all reference tokens were compared before any near-tie divergence (the check is not vacuous)."""
    margin = TIE_MARGIN[dtype]
    compared = total = 0
    for k, (ours, ref) in enumerate(zip(outputs, refs, strict=True)):
        n, problem = compare_greedy(ours, ref, margin)
        assert problem is None, f"prompt {k}: {problem}\n ours {ours}\n ref  {ref.token_ids}"
        compared, total = compared + n, total + len(ref.token_ids)
    assert compared >= min_compared * total, f"only {compared} of {total} tokens compared before near-ties"
