"""A `Tokenizer` built from a GGUF file's tokenizer metadata (a GGUF ships no tokenizer.json).

llama.cpp writes the vocabulary under `tokenizer.ggml.*`:

    model        "gpt2" (byte-level BPE: tokens spelled in GPT-2's byte alphabet, merges "a b")
    pre          the pre-tokenizer's name ("smollm", "llama-bpe", ...): how text is split
                 before BPE, i.e. how the merges were learned
    tokens       the vocabulary, index = token id
    token_type   1 normal, 2 unknown, 3 control (special), 4 user-defined, 5 unused, 6 byte
    merges       BPE merges, best first
    bos/eos/eot/padding_token_id, add_bos_token

Only byte-level BPE ("gpt2") vocabularies are built; a SentencePiece ("llama") one is refused
with a ModelConfigError naming what is supported. Control tokens become special added tokens
(matched whole in text, skipped by decode), user-defined ones plain added tokens.
"""
from __future__ import annotations

import logging

from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as _Backend

from services.engine.config import ModelConfigError
from services.engine.tokenizer import Tokenizer

log = logging.getLogger(__name__)

TOKEN_TYPE_CONTROL = 3
TOKEN_TYPE_USER_DEFINED = 4

# llama.cpp's split for Llama 3 style vocabularies (numbers in runs of up to 3 digits).
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")


def _gpt2_split() -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)


def _smollm_split() -> pre_tokenizers.PreTokenizer:
    # SmolLM / SmolLM2's own tokenizer.json: every digit alone, then GPT-2's split.
    return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), _gpt2_split()])


def _llama3_split() -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(_LLAMA3_SPLIT), behavior="isolated"),
                                    pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])


PRE_TOKENIZERS = {
    "default": _gpt2_split, "gpt2": _gpt2_split, "gpt-2": _gpt2_split,
    "smollm": _smollm_split,
    "llama-bpe": _llama3_split, "llama3": _llama3_split, "llama-v3": _llama3_split,
}
SUPPORTED_TOKENIZER_MODELS = ("gpt2",)


def gguf_tokenizer(meta: dict, where: str) -> Tokenizer:
    """The tokenizer `meta` (GGUF metadata: key → value, arrays as lists) describes.

    Raises ModelConfigError when the vocabulary is missing or of a kind not supported."""
    kind = meta.get("tokenizer.ggml.model")
    if kind not in SUPPORTED_TOKENIZER_MODELS:
        what = "has no tokenizer.ggml.model" if kind is None else f"has a {kind!r} tokenizer"
        raise ModelConfigError(f"{where} {what}; Tandem builds GGUF tokenizers of kind "
                               f"{', '.join(SUPPORTED_TOKENIZER_MODELS)} (byte-level BPE)")
    tokens: list[str] = meta.get("tokenizer.ggml.tokens") or []
    merges: list[str] = meta.get("tokenizer.ggml.merges") or []
    if not tokens or not merges:
        raise ModelConfigError(f"{where} has no tokenizer.ggml.tokens/merges; re-convert it with llama.cpp's "
                               "convert_hf_to_gguf.py")
    types = meta.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    vocab = {tok: i for i, tok in enumerate(tokens)}
    backend = _Backend(models.BPE(vocab=vocab, merges=[tuple(m.split(" ", 1)) for m in merges]))
    pre = meta.get("tokenizer.ggml.pre", "default")
    if pre not in PRE_TOKENIZERS:
        log.warning("%s: pre-tokenizer %r is not known here; splitting text as GPT-2 does (known: %s)",
                    where, pre, ", ".join(sorted(PRE_TOKENIZERS)))
    backend.pre_tokenizer = PRE_TOKENIZERS.get(pre, _gpt2_split)()
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                for t, k in zip(tokens, types) if k == TOKEN_TYPE_CONTROL])
    backend.add_tokens([AddedToken(t, special=False, normalized=False)
                        for t, k in zip(tokens, types) if k == TOKEN_TYPE_USER_DEFINED])
    bos = meta.get("tokenizer.ggml.bos_token_id")
    add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", False))
    return Tokenizer(backend, bos_token_id=bos if add_bos else None, eos_token_ids=gguf_eos_ids(meta),
                     pad_token_id=meta.get("tokenizer.ggml.padding_token_id"),
                     model_max_length=meta.get(f"{meta.get('general.architecture')}.context_length"))


def gguf_eos_ids(meta: dict) -> tuple[int, ...]:
    """End-of-generation ids: eos, then end-of-turn / end-of-message when the file names them."""
    ids: list[int] = []
    for key in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id"):
        value = meta.get(key)
        if value is not None and int(value) not in ids:
            ids.append(int(value))
    return tuple(ids)


def gguf_special_tokens(meta: dict) -> dict[str, str]:
    """`bos_token`, `eos_token`, ... as text, the variables a chat template reads."""
    tokens = meta.get("tokenizer.ggml.tokens") or []
    out = {}
    for name, key in (("bos_token", "bos_token_id"), ("eos_token", "eos_token_id"),
                      ("unk_token", "unknown_token_id"), ("pad_token", "padding_token_id")):
        value = meta.get(f"tokenizer.ggml.{key}")
        if value is not None and 0 <= int(value) < len(tokens):
            out[name] = tokens[int(value)]
    return out
