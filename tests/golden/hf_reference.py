"""Greedy reference outputs from transformers' LlamaForCausalLM on the same weights."""
from __future__ import annotations

import torch


def hf_greedy(model_dir: str, prompts: list[list[int]], max_new_tokens: int, ignore_eos: bool = False):
    """Per prompt: (generated token ids, chosen-token logprobs) from LlamaForCausalLM.generate.
    ignore_eos: generate max_new_tokens even past EOS (as SamplingParams.ignore_eos does)."""
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    if ignore_eos:
        model.generation_config.eos_token_id = None
    results = []
    for ids in prompts:
        inp = torch.tensor([ids])
        out = model.generate(inp, attention_mask=torch.ones_like(inp), max_new_tokens=max_new_tokens,
                             do_sample=False, return_dict_in_generate=True, output_logits=True)
        new = out.sequences[0, len(ids):].tolist()
        logps = [torch.log_softmax(step[0].float(), -1)[t].item() for step, t in zip(out.logits, new)]
        results.append((new, logps))
    return results
