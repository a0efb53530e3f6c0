import json
import os

import pytest

from services.engine.tokenizer import IncrementalDetokenizer, Tokenizer, TokenizerLoadError

SAMPLES = [
    "hello world",
    "héllo wörld — ça va?",
    "emoji 🤖👍🏽 and 👨‍👩‍👧",
    "中文字符和日本語のテキスト, 한국어",
    "  leading spaces\n\ttabs\r\nand newlines  ",
    "<s> literal </s> <pad> <extra_300>",
    "",
    "\x00\x7f\u00ff\U0010ffff",
]


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.byte_level(512)


def test_byte_level_layout(tok):
    assert tok.vocab_size == 512
    assert tok.bos_token_id == 1 and tok.eos_token_ids == (2,)
    assert tok.encode("A", add_bos=False) == [3 + ord("A")]
    assert tok.encode("A") == [1, 3 + ord("A")]
    assert tok.encode("€", add_bos=False) == [3 + b for b in "€".encode()]
    with pytest.raises(ValueError):
        Tokenizer.byte_level(258)
    assert Tokenizer.byte_level(259).vocab_size == 259


@pytest.mark.parametrize("text", SAMPLES)
def test_byte_level_round_trip(tok, text):
    ids = tok.encode(text, add_bos=False)
    assert len(ids) == len(text.encode("utf-8"))
    assert tok.decode(ids) == text
    assert tok.decode(tok.encode(text)) == text  # bos is special: skipped


def test_specials_skipped_and_fillers_decode_deterministically(tok):
    assert tok.decode([1, 3 + ord("a"), 2, 0]) == "a"
    assert tok.decode([300]) == "<extra_300>"
    assert tok.decode([259, 3 + ord("x"), 511]) == "<extra_259>x<extra_511>"
    assert Tokenizer.byte_level(512).decode([400, 401]) == tok.decode([400, 401]) == "<extra_400><extra_401>"


def test_save_loads_in_transformers_and_from_dir(tok, tmp_path):
    transformers = pytest.importorskip("transformers")
    tok.save(str(tmp_path), model_max_length=2048)
    assert os.path.isfile(tmp_path / "tokenizer.json")
    cfg = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert cfg["bos_token"] == "<s>" and cfg["eos_token"] == "</s>" and cfg["model_max_length"] == 2048

    hf_file = transformers.PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "tokenizer.json"))
    hf_dir = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    assert hf_dir.bos_token_id == 1 and hf_dir.eos_token_id == 2 and hf_dir.model_max_length == 2048
    loaded = Tokenizer.from_dir(str(tmp_path), 1, (2,))
    assert loaded.vocab_size == tok.vocab_size and loaded.model_max_length == 2048
    for text in SAMPLES[:5]:
        ids = tok.encode(text)
        assert hf_file(text)["input_ids"] == ids
        assert hf_dir(text)["input_ids"] == ids
        assert hf_dir.encode(text, add_special_tokens=False) == tok.encode(text, add_bos=False)
        assert loaded.encode(text) == ids
        assert hf_dir.decode(ids, skip_special_tokens=True) == text
    assert hf_dir.decode([300]) == "<extra_300>"


def test_from_dir_errors_name_the_path(tmp_path):
    bad = tmp_path / "tokenizer.json"
    bad.write_text("{ this is not json")
    with pytest.raises(TokenizerLoadError) as err:
        Tokenizer.from_dir(str(tmp_path), 1, (2,))
    assert str(bad) in str(err.value) and err.value.path == str(bad)
    assert isinstance(err.value, ValueError)
    with pytest.raises(TokenizerLoadError) as err:
        Tokenizer.from_dir(str(tmp_path / "missing"), None, ())
    assert "missing" in str(err.value)


def stream(tok, ids, prompt=(), stop=()):
    detok = IncrementalDetokenizer(tok, list(prompt), stop)
    deltas = [detok.push(t) for t in ids]
    return detok, deltas


@pytest.mark.parametrize("text", SAMPLES)
def test_incremental_deltas_concatenate_to_decode(tok, text):
    ids = tok.encode(text, add_bos=False)
    detok, deltas = stream(tok, ids, prompt=tok.encode("prompt ✓"))
    assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) == detok.text == tok.decode(ids)
    assert detok.flush() == ""
    assert not detok.stopped


def test_multibyte_character_split_across_byte_tokens(tok):
    ids = tok.encode("a🤖b", add_bos=False)    # 'a', 4 bytes of the emoji, 'b'
    detok, deltas = stream(tok, ids)
    assert deltas == ["a", "", "", "", "🤖", "b"]
    assert detok.text == "a🤖b"


def test_incomplete_tail_is_released_by_flush(tok):
    ids = tok.encode("ok€", add_bos=False)[:-1]   # last character cut
    detok, deltas = stream(tok, ids)
    assert "".join(deltas) == "ok"
    assert detok.flush() == "\ufffd"
    assert detok.text == tok.decode(ids)


def test_invalid_bytes_do_not_stall(tok):
    # stray continuation bytes are invalid, not incomplete: they come out once followed by more
    ids = [3 + 0x80] * 100 + tok.encode("x€", add_bos=False)
    detok, deltas = stream(tok, ids)
    assert "".join(deltas) == detok.text == tok.decode(ids)
    assert detok.text.endswith("x€")
    assert len(detok._ids) - detok._prefix <= IncrementalDetokenizer.MAX_UNSTABLE_WINDOW + 1
    ids = [3 + 0xE2] * 100 + [3 + 0x80] * 100 + [3 + ord("a")] + [3 + 0xF0, 3 + 0x9F]
    detok, deltas = stream(tok, ids)
    assert "".join(deltas) + detok.flush() == detok.text == tok.decode(ids)


@pytest.fixture(scope="module")
def byte_fallback_tok():
    """A Llama-style (Metaspace + byte fallback) tokenizer built in code."""
    from tokenizers import Tokenizer as Backend, decoders, models, pre_tokenizers
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "\u2581Hello": 3, "\u2581world": 4, "!": 5, "\u2581": 6}
    vocab.update({f"<0x{b:02X}>": 7 + b for b in range(256)})
    backend = Backend(models.WordLevel(vocab, unk_token="<unk>"))
    backend.add_special_tokens(["<unk>", "<s>", "</s>"])
    backend.pre_tokenizer = pre_tokenizers.Metaspace()
    backend.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(),
                                         decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    return Tokenizer(backend, 1, (2,))


def byte_ids(text):
    return [7 + b for b in text.encode()]


@pytest.mark.parametrize("prompt", [[], [1, 3]])
def test_byte_fallback_tokenizer_streams_exactly(byte_fallback_tok, prompt):
    tok = byte_fallback_tok
    # "€€" as byte tokens: while a character is unfinished the whole byte group decodes to U+FFFD
    ids = [3, 4, 5, 6] + byte_ids("€€中文") + [4] + byte_ids("🤖") + [2, 3]
    detok, deltas = stream(tok, ids, prompt=prompt)
    assert all("\ufffd" not in d for d in deltas)
    full = "".join(deltas)
    assert full == detok.text
    if prompt:  # with context, the first token keeps its leading space
        assert full == " Hello world! €€中文 world🤖 Hello"
    else:
        assert full == tok.decode(ids) == "Hello world! €€中文 world🤖 Hello"


def test_byte_fallback_invalid_bytes(byte_fallback_tok):
    tok = byte_fallback_tok
    ids = [3] + [7 + 0x80] * 50 + byte_ids("€") + [4]
    detok, deltas = stream(tok, ids)
    assert "".join(deltas) + detok.flush() == detok.text == tok.decode(ids)


def test_stop_string_spanning_tokens(tok):
    ids = [3 + ord(c) for c in "Hello STOP world"]   # "ST" and "OP" are separate tokens
    detok, deltas = stream(tok, ids, stop=("STOP",))
    assert detok.stopped
    assert detok.text == "Hello "
    assert "".join(deltas) == "Hello "
    assert all("S" not in d for d in deltas)     # the stop string's start was held, never streamed
    assert detok.push(3 + ord("!")) == "" and detok.text == "Hello "


def test_stop_string_with_multitoken_fillers_and_earliest_match(tok):
    # a filler token's literal text can complete a stop string too
    ids = [3 + ord(c) for c in "ab<extra_3"] + [300]
    detok, _ = stream(tok, ids, stop=("xyz", "a_3", "extra"))
    assert detok.stopped and detok.text == "ab<"


def test_held_stop_prefix_is_released(tok):
    ids = [3 + ord(c) for c in "one ST"]
    detok, deltas = stream(tok, ids, stop=("STOP",))
    assert "".join(deltas) == "one "
    assert detok.text == "one ST" and not detok.stopped
    assert detok.flush() == "ST"
    ids2 = [3 + ord(c) for c in "one STAR"]
    detok, deltas = stream(tok, ids2, stop=("STOP",))
    assert "".join(deltas) == "one STAR" and not detok.stopped


def test_long_run_of_special_tokens_keeps_window_bounded(tok):
    ids = [3 + ord("a")] + [0] * 200 + [3 + ord("b")]
    detok, deltas = stream(tok, ids)
    assert "".join(deltas) == "ab"
    assert len(detok._ids) - detok._prefix <= IncrementalDetokenizer.MAX_UNSTABLE_WINDOW + 2


def test_stop_at_first_output_and_eos_skipped(tok):
    detok, deltas = stream(tok, [3 + ord("#"), 2], stop=("#",))
    assert detok.stopped and detok.text == "" and deltas == ["", ""]
    detok, deltas = stream(tok, [3 + ord("a"), 2])
    assert deltas == ["a", ""] and detok.text == "a"
