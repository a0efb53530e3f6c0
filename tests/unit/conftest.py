"""Fixtures shared by the unit tests of the OpenAI front door."""
import pytest

from services.engine.loader import resolve_model
from services.engine.tokenizer import Tokenizer


@pytest.fixture(scope="session")
def model():
    """The tiny model's config (no weights)."""
    return resolve_model("tiny", weights=False).config


@pytest.fixture(scope="session")
def tok(model):
    """A byte-level tokenizer over the tiny model's vocabulary."""
    return Tokenizer.byte_level(model.vocab_size)
