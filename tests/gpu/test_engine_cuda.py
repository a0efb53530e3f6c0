"""The engine on a CUDA GPU: greedy tokens against transformers in bfloat16 and float16, a step that
never synchronises with the host before sampling, sampling on the GPU, KV hand-off between two
engines, and the KV memory plan. Skipped without a GPU (conftest.py)."""
from __future__ import annotations

import pytest
import torch

from services.engine.builder import build_engine
from services.engine.config import ModelConfigError, Role
from services.engine.request import FinishReason
from services.engine.runner import place_inputs
from services.engine.sampling_params import SamplingParams
from tests.conftest import random_prompts
from tests.gpu.hf_dtype_reference import assert_greedy_matches, hf_greedy_with_margins

pytestmark = pytest.mark.timeout(900)

PROMPT_LENGTHS = [1, 7, 16, 17, 45, 128, 201, 300]
MAX_NEW = 24
DTYPES = ["bfloat16", "float16"]


@pytest.fixture(scope="module")
def tiny_refs(export_named):
    """Per dtype: transformers' greedy tokens (and margins) on the GPU for the tiny model."""
    d = export_named("tiny")
    prompts = random_prompts(PROMPT_LENGTHS, 512, seed=1)
    refs = {dt: hf_greedy_with_margins(d, prompts, MAX_NEW, getattr(torch, dt), "cuda") for dt in DTYPES}
    return d, prompts, refs


def run_golden(engine, prompts, refs, dtype: str) -> None:
    outs = engine.generate(prompts, SamplingParams(max_tokens=MAX_NEW, logprobs=0))
    for o in outs:
        assert all(lp == lp and lp <= 0 for lp in o.logprobs), "logprobs must be finite and <= 0"
    assert_greedy_matches([o.token_ids for o in outs], refs, getattr(torch, dtype))
    engine.check_integrity()
    assert engine.kv.num_used_blocks == 0


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("block_size,budget", [(16, 2048), (8, 37)])
def test_tiny_on_cuda_matches_hf(tiny_refs, dtype, block_size, budget):
    d, prompts, refs = tiny_refs
    engine = build_engine(d, dtype=dtype, device="cuda", block_size=block_size, max_num_batched_tokens=budget,
                          num_blocks=400)
    assert engine.runner.kv.is_cuda and engine.runner.kv.dtype == getattr(torch, dtype)
    assert all(p.is_cuda and p.dtype == getattr(torch, dtype) for p in engine.runner.model.parameters())
    run_golden(engine, prompts, refs[dtype], dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_small_on_cuda_matches_hf(export_named, dtype):
    d = export_named("small")
    prompts = random_prompts(PROMPT_LENGTHS, 32000, seed=2)
    refs = hf_greedy_with_margins(d, prompts, MAX_NEW, getattr(torch, dtype), "cuda")
    engine = build_engine(d, dtype=dtype, device="cuda", block_size=16, max_num_batched_tokens=100, num_blocks=200)
    run_golden(engine, prompts, refs, dtype)


def test_a_step_does_not_synchronise_before_sampling(export_named):
    """Placing a mixed step's inputs and running the model (every layer, decodes and a chunked
    prefill with cached context) raises under torch's sync debug mode "error" if anything reads a
    device value on the host; only the sampler reads tokens back."""
    engine = build_engine(export_named("tiny"), dtype="bfloat16", device="cuda", block_size=8,
                          max_num_batched_tokens=40, num_blocks=100)
    for i, n in enumerate([30, 50]):
        engine.add_request(random_prompts([n], 512, seed=i)[0], SamplingParams(max_tokens=8), request_id=f"r{i}")
    engine.step()                                  # r0 prefilled (30) + the first 10 of r1
    engine.add_request(random_prompts([20], 512, seed=9)[0], SamplingParams(max_tokens=8), request_id="r2")
    out = engine.scheduler.schedule()
    assert out.decodes and out.prefills and any(c.request.num_computed_tokens for c in out.prefills)
    runner = engine.runner
    host_inputs = runner.build_inputs(out)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        inputs = place_inputs(host_inputs, runner.device)
        logits = runner.model(inputs.input_ids, inputs.positions, runner.kv, inputs.meta, inputs.logits_indices)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert logits.is_cuda and logits.shape == (len(host_inputs.logits_indices), engine.config.model.vocab_size)
    for t in inputs.tensors():
        assert t.device == runner.device
    assert torch.isfinite(logits.float()).all()


def test_sampling_on_cuda(export_named):
    """Seeded rows repeat whatever batch they sit in; temperature / top-k / top-p rows give valid
    tokens; unseeded rows draw from the GPU's shared generator. float32: another batch shape must
    not move the logits enough to flip a sample (bfloat16 GEMMs of other shapes may round apart)."""
    engine = build_engine(export_named("tiny"), dtype="float32", device="cuda", num_blocks=200)
    prompt = random_prompts([12], 512, seed=3)[0]
    seeded = SamplingParams(max_tokens=16, temperature=0.9, top_p=0.8, top_k=50, seed=1234, logprobs=0,
                            ignore_eos=True)
    alone = engine.generate([prompt], seeded)[0].token_ids
    others = random_prompts([5, 40, 77], 512, seed=4)
    mixed = engine.generate(others[:1] + [prompt] + others[1:],
                            [SamplingParams(max_tokens=16, temperature=1.0, ignore_eos=True), seeded,
                             SamplingParams(max_tokens=16, ignore_eos=True),
                             SamplingParams(max_tokens=16, temperature=0.7, top_p=0.5, ignore_eos=True)])
    assert mixed[1].token_ids == alone
    for o in mixed:
        assert len(o.token_ids) == 16 and all(0 <= t < 512 for t in o.token_ids)
    assert all(lp == lp and lp <= 0 for lp in mixed[1].logprobs)
    engine.check_integrity()


def test_prefill_to_decode_handoff_on_cuda(export_named):
    """export_kv / import_request between two GPU engines (the cluster's hand-off without a
    transport): tokens as transformers', no block left behind."""
    d = export_named("tiny")
    prompts = random_prompts([1, 9, 33, 120], 512, seed=21)
    refs = hf_greedy_with_margins(d, prompts, 20, torch.bfloat16, "cuda")
    kw = dict(dtype="bfloat16", device="cuda", block_size=8, num_blocks=200)
    p_engine = build_engine(d, role=Role.PREFILL, max_num_batched_tokens=40, **kw)
    d_engine = build_engine(d, role=Role.DECODE, **kw)
    params = SamplingParams(max_tokens=20)
    for i, (out, prompt) in enumerate(zip(p_engine.generate(prompts, params), prompts)):
        assert out.finish_reason == FinishReason.HANDOFF
        kv = p_engine.export_kv(out.request_id)
        assert kv.is_cuda
        p_engine.release(out.request_id)
        d_engine.import_request(prompt, out.token_ids, params, kv.cpu(), request_id=f"d-{i}")   # any device in
    finals = {}
    while d_engine.has_unfinished():
        for o in d_engine.step():
            if o.finished:
                finals[o.request_id] = o.token_ids
    assert_greedy_matches([finals[f"d-{i}"] for i in range(len(prompts))], refs, torch.bfloat16)
    for e in (p_engine, d_engine):
        e.check_integrity()
        assert e.kv.num_used_blocks == 0


def test_kv_memory_plan_on_cuda():
    _, total = torch.cuda.mem_get_info()
    engine = build_engine("small", dtype="bfloat16", device="cuda", gpu_memory_utilization=0.1,
                          max_num_batched_tokens=256, max_num_seqs=16)
    kv_bytes = engine.runner.kv.numel() * engine.runner.kv.element_size()
    assert engine.kv.num_blocks > 1 and kv_bytes <= 0.1 * total
    del engine
    torch.cuda.empty_cache()
    with pytest.raises(ModelConfigError, match="lower --kv-memory-gib or --num-blocks"):
        build_engine("tiny", dtype="bfloat16", device="cuda", kv_memory_gib=2 * total / (1 << 30))
    with pytest.raises(ModelConfigError, match="gpu_memory_utilization"):
        build_engine("tiny", device="cuda", gpu_memory_utilization=1.5)
    with pytest.raises(ModelConfigError, match="cuda:"):
        build_engine("tiny", device=f"cuda:{torch.cuda.device_count()}")
