"""Tokenizer wrapper (a `tokenizers.Tokenizer` underneath) and the incremental detokenizer.

`Tokenizer.byte_level(vocab_size)` builds a real GPT-2 style byte-level tokenizer in code for
models that ship no tokenizer.json (the named random-weight models):

    id 0 "<pad>", 1 "<s>" (bos), 2 "</s>" (eos)      special: skipped by decode
    ids 3..258   the 256 bytes, byte b is id 3 + b     (GPT-2 byte-to-unicode alphabet)
    ids 259..    "<extra_{id}>" filler tokens          e.g. id 300 decodes to "<extra_300>"

The BPE model has no merges, so encoding is one token per UTF-8 byte and the fillers are
never produced by encode; they exist because a random-weight model can emit any id, and
they decode to their literal name (all ASCII, so the byte-level decoder passes them
through). The tokenizer.json carries a post-processor that prepends "<s>", so transformers
loading a saved copy adds bos exactly like `encode(text, add_bos=True)`.

Literal special-token text: our byte-level tokenizer encodes the text "<s>" as its bytes
(decode(encode(s)) == s for every string). A copy loaded from disk (here or by
transformers) parses "<pad>", "<s>" and "</s>" in text as the special tokens, as Hugging
Face tokenizers do; for any other text the ids are identical.
"""
from __future__ import annotations

import json
import os
from functools import lru_cache
from typing import Iterable, Sequence

from tokenizers import AddedToken, decoders, models, pre_tokenizers, processors
from tokenizers import Tokenizer as _Backend

BYTE_LEVEL_SPECIALS = ("<pad>", "<s>", "</s>")
BYTE_OFFSET = len(BYTE_LEVEL_SPECIALS)          # id of byte 0
BYTE_LEVEL_MIN_VOCAB = BYTE_OFFSET + 256        # 259
_VERY_LARGE_MAX_LENGTH = int(1e30)              # transformers' "no limit" value


class TokenizerLoadError(ValueError):
    """tokenizer.json is missing or unreadable; the message names the path and what to do."""

    def __init__(self, path: str, message: str):
        super().__init__(message)
        self.path = path


@lru_cache(maxsize=1)
def _bytes_to_unicode() -> tuple[str, ...]:
    """GPT-2's reversible byte -> printable unicode character table, indexed by byte."""
    printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("\u00a1"), ord("\u00ac") + 1))
                 + list(range(ord("\u00ae"), ord("\u00ff") + 1)))
    table = {b: chr(b) for b in printable}
    n = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + n)
            n += 1
    return tuple(table[b] for b in range(256))


def _as_id_tuple(ids: int | Iterable[int] | None) -> tuple[int, ...]:
    if ids is None:
        return ()
    if isinstance(ids, int):
        return (ids,)
    return tuple(int(i) for i in ids)


class Tokenizer:
    """A thin wrapper around a `tokenizers.Tokenizer` plus the model's bos / eos ids."""

    def __init__(self, backend: _Backend, bos_token_id: int | None = None,
                 eos_token_ids: int | Iterable[int] | None = (), *, pad_token_id: int | None = None,
                 model_max_length: int | None = None):
        self.backend = backend
        self.vocab_size: int = backend.get_vocab_size(with_added_tokens=True)
        self.bos_token_id: int | None = bos_token_id
        self.eos_token_ids: tuple[int, ...] = _as_id_tuple(eos_token_ids)
        self.pad_token_id: int | None = pad_token_id
        self.model_max_length: int | None = model_max_length

    # -- encode / decode -------------------------------------------------------------------

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        """Token ids of `text`; with add_bos, starts with bos (added once, whether or not the
        backend's post-processor adds it)."""
        ids = self.backend.encode(text, add_special_tokens=add_bos).ids
        if add_bos and self.bos_token_id is not None and (not ids or ids[0] != self.bos_token_id):
            ids = [self.bos_token_id, *ids]
        return ids

    def decode(self, token_ids: Sequence[int]) -> str:
        """Text of `token_ids`, special tokens skipped; invalid UTF-8 becomes U+FFFD."""
        return self.backend.decode(list(token_ids), skip_special_tokens=True)

    def id_to_token(self, token_id: int) -> str | None:
        return self.backend.id_to_token(token_id)

    # -- persistence -----------------------------------------------------------------------

    def save(self, directory: str, model_max_length: int | None = None) -> None:
        """Write tokenizer.json and a minimal tokenizer_config.json, loadable by
        transformers.AutoTokenizer / PreTrainedTokenizerFast."""
        os.makedirs(directory, exist_ok=True)
        self.backend.save(os.path.join(directory, "tokenizer.json"))
        max_len = model_max_length or self.model_max_length or _VERY_LARGE_MAX_LENGTH
        config: dict = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "model_max_length": int(max_len),
            "clean_up_tokenization_spaces": False,
        }
        for key, tid in (("bos_token", self.bos_token_id),
                         ("eos_token", self.eos_token_ids[0] if self.eos_token_ids else None),
                         ("pad_token", self.pad_token_id)):
            tok = self.backend.id_to_token(tid) if tid is not None else None
            if tok is not None:
                config[key] = tok
        with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
            json.dump(config, f, indent=2)

    @classmethod
    def from_dir(cls, directory: str, bos_token_id: int | None = None,
                 eos_token_ids: int | Iterable[int] | None = ()) -> "Tokenizer":
        """Load directory/tokenizer.json (a path to the file itself works too)."""
        path = directory if os.path.isfile(directory) else os.path.join(directory, "tokenizer.json")
        if not os.path.isfile(path):
            raise TokenizerLoadError(path, (
                f"no tokenizer file at {path}; put the model's tokenizer.json there (e.g. "
                f"AutoTokenizer.from_pretrained(...).save_pretrained(dir) in transformers), or serve a "
                f"named model, which uses the built-in byte-level tokenizer"))
        try:
            backend = _Backend.from_file(path)
        except Exception as e:  # the Rust side raises a plain Exception with a parse message
            raise TokenizerLoadError(path, (
                f"could not load tokenizer {path}: {e}. The file is corrupt or in a format this "
                f"`tokenizers` version does not read; re-export it with a recent transformers "
                f"(tokenizer.save_pretrained(dir)) or replace it with the model's original tokenizer.json"
            )) from e
        max_len = None
        cfg_path = os.path.join(os.path.dirname(path), "tokenizer_config.json")
        try:
            with open(cfg_path) as f:
                value = json.load(f).get("model_max_length")
            if isinstance(value, int) and value < _VERY_LARGE_MAX_LENGTH:
                max_len = value
        except (OSError, ValueError, AttributeError):
            pass
        return cls(backend, bos_token_id, eos_token_ids, model_max_length=max_len)

    @classmethod
    def byte_level(cls, vocab_size: int) -> "Tokenizer":
        """The built-in byte-level tokenizer (layout in the module docstring)."""
        if vocab_size < BYTE_LEVEL_MIN_VOCAB:
            raise ValueError(f"the byte-level tokenizer needs vocab_size >= {BYTE_LEVEL_MIN_VOCAB} "
                             f"(3 special tokens + 256 bytes), got {vocab_size}")
        vocab = {tok: i for i, tok in enumerate(BYTE_LEVEL_SPECIALS)}
        for b, ch in enumerate(_bytes_to_unicode()):
            vocab[ch] = BYTE_OFFSET + b
        for i in range(BYTE_LEVEL_MIN_VOCAB, vocab_size):
            vocab[f"<extra_{i}>"] = i
        backend = _Backend(models.BPE(vocab=vocab, merges=[]))
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
        backend.decoder = decoders.ByteLevel()
        backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in BYTE_LEVEL_SPECIALS])
        backend.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)])
        backend.encode_special_tokens = True   # "<s>" in text is 3 bytes, not bos (not serialised)
        return cls(backend, bos_token_id=1, eos_token_ids=(2,), pad_token_id=0)


class IncrementalDetokenizer:
    """Turns a stream of token ids into text deltas; holds back bytes of an incomplete UTF-8
    character (never emits U+FFFD for a character split across tokens) and applies stop strings.

    Decoding works on a short window of ids (the last few prompt tokens give context, so
    e.g. SentencePiece's leading space is kept): each push decodes the window, emits the part
    not yet emitted, and holds back a trailing run of U+FFFD, which may be a character whose
    bytes are not all here yet. When the window decodes with no trailing U+FFFD everything in it is
    final and the window restarts at the tokens of that step.

    Stop strings: `push` never returns text that might be the start of a stop string (the
    longest suffix of the output that is a proper prefix of one is held back until the next
    tokens disambiguate it), so streamed deltas never contain any part of a matched stop
    string. Once one matches, `stopped` is True, `text` ends right before it and pushes
    return "". When the request ends for another reason (eos, length, abort) call `flush()`
    to get the held-back tail: a held stop-string prefix and a trailing incomplete character
    (as U+FFFD). Invariant: "".join(all push deltas) + flush() == text.
    `text` always includes text held back for a possible stop string.
    """

    CONTEXT_TOKENS = 5        # prompt tokens decoded in front of the output for context
    MAX_UNSTABLE_WINDOW = 32  # window length (tokens) after which an unstable window is split

    def __init__(self, tokenizer: Tokenizer, prompt_token_ids: Sequence[int], stop: Sequence[str] = ()):
        self._tok = tokenizer
        self._stops = tuple(s for s in stop if s)
        self._max_stop = max((len(s) for s in self._stops), default=0)
        context = list(prompt_token_ids[len(prompt_token_ids) - self.CONTEXT_TOKENS:]
                       if len(prompt_token_ids) > self.CONTEXT_TOKENS else prompt_token_ids)
        self._ids: list[int] = context        # window context + output ids (only the tail is decoded)
        self._num_output = 0
        self._prefix = 0                      # window = self._ids[self._prefix:]
        self._read = len(context)             # where the window restarts once it is stable
        self._done = len(tokenizer.decode(context)) if context else 0  # window chars consumed
        self._text = ""                       # output text: emitted + held for a stop string
        self._emitted = 0                     # len of the prefix of _text returned so far
        self._stopped = False
        self._finished = False

    @property
    def text(self) -> str:
        return self._text

    @property
    def stopped(self) -> bool:
        return self._stopped

    @property
    def num_output_tokens(self) -> int:
        return self._num_output

    def push(self, token_id: int) -> str:
        """Add one output token; return the newly completed text (may be "")."""
        if self._stopped or self._finished:
            return ""
        self._ids.append(int(token_id))
        self._num_output += 1
        window = self._tok.decode(self._ids[self._prefix:])
        # Hold back the whole trailing run of U+FFFD: with byte-fallback decoders (Llama-style
        # "<0xE2>" tokens) an unfinished group of byte tokens decodes to one U+FFFD per byte.
        stable = len(window.rstrip("\ufffd"))
        complete = stable == len(window)
        new = window[self._done:stable] if stable > self._done else ""
        self._done = max(self._done, stable)
        if complete:
            # Everything decoded is final: restart the window at the tokens since the last
            # restart -- unless they decode to nothing (special tokens, a lone "\u2581"), which
            # would make the next token the window's first and lose its leading space (bounded:
            # a long run of such tokens restarts anyway).
            restart_done = len(self._tok.decode(self._ids[self._read:]))
            if restart_done or len(self._ids) - self._prefix > self.MAX_UNSTABLE_WINDOW:
                self._prefix, self._read, self._done = self._read, len(self._ids), restart_done
        elif len(self._ids) - self._prefix > self.MAX_UNSTABLE_WINDOW:
            new += self._split_window(window)
        return self._append(new, final=False)

    def flush(self) -> str:
        """The request ended without a stop string: return everything still held back."""
        if self._stopped or self._finished:
            return ""
        self._finished = True
        tail = self._tok.decode(self._ids[self._prefix:])[self._done:] if self._prefix < len(self._ids) else ""
        return self._append(tail, final=True)

    # -- internals -------------------------------------------------------------------------

    def _split_window(self, window: str) -> str:
        """Bound a window that has stayed unstable for many tokens (a stream of invalid bytes):
        restart it a few tokens from the end at a token boundary where decoding splits
        cleanly (head + tail == window) and release the head, whose text is then final.
        Returns the newly released text ("" when no clean boundary was found)."""
        end = len(self._ids)
        for p in range(max(self._prefix + 1, end - 4), end):
            head = self._tok.decode(self._ids[self._prefix:p])
            if head + self._tok.decode(self._ids[p:]) == window:
                out = head[self._done:] if len(head) > self._done else ""
                self._done = max(0, self._done - len(head))
                self._prefix = self._read = p
                return out
        return ""

    def _append(self, new: str, final: bool) -> str:
        if not self._stops:
            self._text += new
            self._emitted = len(self._text)
            return new
        if new:
            search_from = max(0, len(self._text) - self._max_stop + 1)
            self._text += new
            hits = [pos for s in self._stops if (pos := self._text.find(s, search_from)) != -1]
            if hits:
                self._text = self._text[:min(hits)]
                self._stopped = True
                final = True
        end = len(self._text) if final else len(self._text) - self._stop_prefix_len()
        out = self._text[self._emitted:end] if end > self._emitted else ""
        self._emitted = max(self._emitted, end)
        return out

    def _stop_prefix_len(self) -> int:
        """Length of the longest suffix of the text that is a proper prefix of a stop string."""
        best = 0
        text = self._text
        for s in self._stops:
            for n in range(min(len(s) - 1, len(text)), best, -1):
                if text.endswith(s[:n]):
                    best = n
                    break
        return best
