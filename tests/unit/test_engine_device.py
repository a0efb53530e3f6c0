"""Device handling of the engine that can be checked on a CPU machine: which attention path serves
which device, where the runner puts a step's tensors (and the packing CUDA uses), device names and
dtypes, the KV memory plan, half precision against transformers, and that nothing on the CPU path
initialises CUDA or imports CuPy. The same code on a GPU is covered by tests/gpu."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from services.engine import attention_ops
from services.engine.attention_ops import (decode_attention_backend, paged_decode_attention,
                                           paged_decode_attention_gathered, paged_decode_attention_reference)
from services.engine.builder import build_engine
from services.engine.config import ModelConfigError
from services.engine.device import plan_num_blocks, resolve_device, torch_device
from services.engine.runner import StepInputs, pack_inputs, place_inputs, unpack_inputs
from services.engine.sampling_params import SamplingParams
from tests.conftest import random_prompts

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


# ---- attention dispatch ------------------------------------------------------------------------
def test_backend_is_keyed_on_device_type():
    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)     # descriptors only: nothing is allocated
    assert decode_attention_backend(cpu, torch.float32) == "cpu_kernel"
    assert decode_attention_backend(cpu, torch.bfloat16) == "cpu_kernel"
    assert decode_attention_backend(cpu, torch.float16) == "reference"
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        assert decode_attention_backend(cuda, dtype) == "gathered_sdpa"


def paged_case(seq_lens, heads, kv_heads, head_dim=32, block_size=8, dtype=torch.float32, seed=0):
    """Finite random paged K/V (the gathered path's precondition), tables padded with valid ids."""
    g = torch.Generator().manual_seed(seed)
    needed = [-(-n // block_size) for n in seq_lens]
    num_blocks = sum(needed) + 3
    cache = torch.randn(num_blocks, 2, 2, block_size, kv_heads, head_dim, generator=g).to(dtype)  # 2 layers
    perm = torch.randperm(num_blocks, generator=g).tolist()
    width = max(needed) + 1
    tables, at = [], 0
    for nb in needed:
        ids = perm[at:at + nb]
        at += nb
        tables.append(ids + [perm[-1]] * (width - nb))          # padding: a valid block, masked out
    q = torch.randn(len(seq_lens), heads, head_dim, generator=g).to(dtype)
    return (q, cache[:, 1, 0], cache[:, 1, 1], torch.tensor(tables, dtype=torch.int32),
            torch.tensor(seq_lens, dtype=torch.int32))


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2), (torch.float16, 3e-3)])
@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (8, 2)])
def test_gathered_path_equals_reference(dtype, tol, heads, kv_heads):
    """The CUDA path's arithmetic, run on CPU tensors: the same result as the reference."""
    seq_lens = [1, 7, 8, 9, 30]
    q, k, v, bt, sl = paged_case(seq_lens, heads, kv_heads, dtype=dtype)
    out = paged_decode_attention_gathered(q, k, v, bt, sl, 0.2, max(seq_lens))
    ref = paged_decode_attention_reference(q, k, v, bt, sl, 0.2)
    assert out.shape == q.shape and out.dtype == dtype
    torch.testing.assert_close(out.float(), ref.float(), atol=tol, rtol=tol)
    # int64 tables and lengths (what the runner places on a GPU) give the same result
    out64 = paged_decode_attention_gathered(q, k, v, bt.long(), sl.long(), 0.2, max(seq_lens))
    assert torch.equal(out64, out)


def test_cpu_dispatch_never_takes_the_gathered_path(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("the gathered path ran for CPU tensors")
    monkeypatch.setattr(attention_ops, "paged_decode_attention_gathered", fail)
    q, k, v, bt, sl = paged_case([3, 12], 4, 2)
    ref = paged_decode_attention_reference(q, k, v, bt, sl, 0.3)
    torch.testing.assert_close(paged_decode_attention(q, k, v, bt, sl, 0.3, 12), ref, atol=1e-5, rtol=1e-5)


# ---- the runner's tensor placement -----------------------------------------------------------------
def scheduled_engine(dtype="float32"):
    """A tiny engine with one decoding request and one prefill chunk scheduled next."""
    engine = build_engine("tiny", dtype=dtype, num_blocks=64, block_size=8, max_num_batched_tokens=20)
    engine.add_request(list(range(3, 14)), SamplingParams(max_tokens=8), request_id="a")
    engine.step()                                          # a: prompt computed, first token sampled
    engine.add_request(list(range(20, 60)), SamplingParams(max_tokens=8), request_id="b")
    return engine


def test_step_inputs_follow_the_engine_device_and_dtypes():
    engine = scheduled_engine()
    runner = engine.runner
    assert runner.device == torch.device("cpu") and runner.kv.device == runner.device
    out = engine.scheduler.schedule()
    assert len(out.decodes) == 1 and len(out.prefills) == 1      # a decodes, b's first chunk (19 tokens)
    inputs = runner.build_inputs(out)
    meta = inputs.meta
    assert inputs.input_ids.tolist()[0] == engine.scheduler.requests["a"].output_token_ids[-1]
    assert inputs.positions.tolist() == [11] + list(range(0, 19))
    assert meta.decode_max_len == 12 and meta.decode_seq_lens.tolist() == [12]
    assert meta.decode_block_tables.dtype == torch.int32 and meta.decode_seq_lens.dtype == torch.int32
    assert inputs.logits_indices.tolist() == [0]                 # b's chunk does not reach its end: no sample
    for t in inputs.tensors():
        assert t.device == runner.device
    assert place_inputs(inputs, runner.device) is inputs        # CPU: no copy at all

    seen = {}
    hook = runner.model.register_forward_pre_hook(lambda module, args: seen.setdefault("args", args))
    try:
        runner.execute(out)
    finally:
        hook.remove()
    ids, positions, kv, placed, logits_indices, _ = seen["args"]
    assert kv is runner.kv and kv.dtype == engine.config.dtype
    for t in [ids, positions, logits_indices] + StepInputs(ids, positions, logits_indices, placed).tensors():
        assert t.device == runner.device


def test_pack_unpack_round_trip_is_what_a_gpu_receives():
    """place_inputs on CUDA = unpack(pin(pack(x)) copied over): check the packing on the host."""
    engine = scheduled_engine()
    inputs = engine.runner.build_inputs(engine.scheduler.schedule())
    flat, shapes = pack_inputs(inputs)
    assert flat.dtype == torch.int64 and flat.dim() == 1
    back = unpack_inputs(flat.clone(), shapes, inputs)
    for a, b in zip(inputs.tensors(), back.tensors(), strict=True):
        assert b.dtype == torch.int64 and a.shape == b.shape and torch.equal(a.long(), b)
    m, n = inputs.meta, back.meta
    assert (n.num_decode, n.decode_max_len) == (m.num_decode, m.decode_max_len)
    def shape(meta):
        return [(p.q_start, p.q_len, p.ctx_len) for p in meta.prefills]
    assert shape(n) == shape(m)


def test_empty_decode_set_packs():
    engine = build_engine("tiny", num_blocks=16, block_size=8)
    engine.add_request([5, 6, 7], SamplingParams(max_tokens=2))
    inputs = engine.runner.build_inputs(engine.scheduler.schedule())
    assert inputs.meta.num_decode == 0 and inputs.meta.decode_block_tables.shape == (0, 0)
    back = unpack_inputs(*pack_inputs(inputs), inputs)
    assert back.meta.decode_block_tables.shape == (0, 0) and back.input_ids.tolist() == [5, 6, 7]


# ---- names, dtypes, memory ------------------------------------------------------------------------
def test_device_names():
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto") == expected
    assert resolve_device("cpu") == "cpu"
    assert torch_device("cpu") == torch.device("cpu")
    for bad in ("tpu", "gpu", "cuda0"):
        with pytest.raises(ModelConfigError, match="auto, cpu or cuda"):
            resolve_device(bad)
    if not torch.cuda.is_available():
        with pytest.raises(ModelConfigError, match="no CUDA GPU is visible; use --device cpu"):
            resolve_device("cuda:0")
        with pytest.raises(ModelConfigError, match="no CUDA GPU"):
            build_engine("tiny", device="cuda", num_blocks=8)


def test_kv_memory_plan_on_cpu_ignores_gpu_utilization():
    engine = build_engine("tiny", kv_memory_gib=0.001, gpu_memory_utilization=0.9)
    cfg = engine.config
    assert plan_num_blocks(cfg, torch.device("cpu")) == cfg.resolve_num_blocks()
    assert engine.kv.num_blocks == cfg.resolve_num_blocks() == int(0.001 * (1 << 30)) // cfg.kv_bytes_per_block()


def test_bfloat16_on_cpu_matches_transformers_in_that_dtype(export_named):
    """The half-precision golden check the GPU tests use, here on the CPU: the engine in bf16 against
    transformers in bf16 (float16 is refused on a CPU: dtype_policy; the GPU tests cover it)."""
    dtype = "bfloat16"
    from tests.gpu.hf_dtype_reference import assert_greedy_matches, hf_greedy_with_margins

    d = export_named("tiny")
    prompts = random_prompts([1, 9, 17, 60], 512, seed=11)
    engine = build_engine(d, dtype=dtype, block_size=8, max_num_batched_tokens=32, num_blocks=100)
    outs = engine.generate(prompts, SamplingParams(max_tokens=16, logprobs=0))
    torch_dtype = getattr(torch, dtype)
    assert engine.runner.kv.dtype == torch_dtype
    assert_greedy_matches([o.token_ids for o in outs], hf_greedy_with_margins(d, prompts, 16, torch_dtype), torch_dtype)
    engine.check_integrity()
    assert engine.kv.num_used_blocks == 0


# ---- a CPU machine never touches CUDA -----------------------------------------------------------------
_NO_CUDA_PROBE = r"""
import json, sys
import tandem, tandem.cli, tandem.cli_up, tandem.local_cluster, tandem.client      # noqa: F401
import router.server, services.worker.server, services.transport, loadgen           # noqa: F401
import torch
from services.engine.sampling_params import SamplingParams
from services.worker.server import Worker, WorkerOptions

worker = Worker(WorkerOptions(role="colocated", model="tiny", device="auto", num_blocks=32, kv_transport="auto"))
params = SamplingParams(max_tokens=3, temperature=0.8, top_p=0.9, seed=1)
out = worker.engine_thread.submit([5, 6, 7], params).result()
worker.engine_thread.shutdown()
worker.sender.close()
worker.receiver.close()
print(json.dumps({"device": worker.engine.config.device, "tokens": len(out.token_ids),
                  "cuda_initialized": torch.cuda.is_initialized(), "cupy": "cupy" in sys.modules}))
"""


@pytest.mark.slow          # a fresh interpreter (~4 s)
def test_cpu_machine_never_initialises_cuda_or_imports_cupy():
    """Import the packages, build a worker (engine, engine thread, its KV sender and receiver) on
    device "auto" and generate: with no GPU visible, CUDA stays uninitialised and CuPy unimported."""
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", PYTHONPATH=ROOT)
    proc = subprocess.run([sys.executable, "-c", _NO_CUDA_PROBE], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result == {"device": "cpu", "tokens": 3, "cuda_initialized": False, "cupy": False}
