"""Fixtures shared by unit tests: the OpenAI front door's model and tokenizer, the kernel variants."""
import pytest

from services.engine import attention_ops

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


# Each variant module is built once per session (load_kernels caches it per process): ~20 s each
# on a fresh kernel cache.
@pytest.fixture(scope="session", params=[v.name for v in attention_ops.VARIANTS])
def variant(request):
    """(name, module) for each variant this host runs; a runnable variant that fails to build fails."""
    name = request.param
    if name not in attention_ops.available_variants():
        pytest.skip(f"this CPU cannot run the {name} kernel variant")
    if attention_ops.load_kernels() is None:
        pytest.skip("CPU attention kernels unavailable (TANDEM_DISABLE_KERNELS set or no compiler; see log)")
    mod = attention_ops.load_kernels(name)
    if mod is None:
        pytest.fail(f"kernel variant {name} failed to build: {attention_ops._loader.error(name)}")
    return name, mod
