"""Clusters on GPUs: greedy tokens through 1P+1D (cuda_ipc on one GPU; nccl between two GPUs) and
after a live migration between two decode instances on one GPU equal transformers' in the same
dtype, and no block, lease or request is left behind. Skipped without a GPU (conftest.py).

bfloat16 is compared with the near-tie rule of hf_dtype_reference over short generations; the
long migration generations run in float32, where the engine and transformers agree to ~1e-6 and
every token is compared (in bfloat16 an exact top-2 tie every few dozen tokens would end the
comparison before the later moves)."""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from tandem.client import Client
from tandem.local_cluster import LocalCluster
from tests.conftest import random_prompts
from tests.gpu.hf_dtype_reference import assert_greedy_matches, hf_greedy_with_margins
from tests.integration.cluster_helpers import assert_no_leaks, generate
from tests.integration.migration_helpers import Stream, holder, other

pytestmark = pytest.mark.timeout(900)

LENGTHS = [1, 5, 16, 17, 40, 100, 200, 333]
MAX_TOKENS = 12
# small per-step budget: long prompts prefill in several chunks, each pushed layer by layer
ENGINE_ARGS = ["--max-num-batched-tokens", "64", "--num-blocks", "400", "--layer-group", "1"]
DTYPES = ["bfloat16", "float32"]


@pytest.fixture(scope="module")
def golden(export_named):
    """(model dir, 16 prompts, {dtype: transformers' greedy tokens on the GPU in that dtype})."""
    model_dir = export_named("tiny")
    prompts = random_prompts(LENGTHS * 2, 512, seed=5)
    refs = {dt: hf_greedy_with_margins(model_dir, prompts, MAX_TOKENS, getattr(torch, dt), "cuda") for dt in DTYPES}
    return model_dir, prompts, refs


def check_cluster(c: LocalCluster, prompts, refs, dtype: str) -> None:
    with ThreadPoolExecutor(len(prompts)) as pool:
        results = list(pool.map(lambda p: generate(c.address, p, MAX_TOKENS), prompts))
    assert_greedy_matches([tokens for tokens, _ in results], refs, getattr(torch, dtype))
    for (tokens, messages), prompt in zip(results, prompts):
        assert messages[-1].usage.prompt_tokens == len(prompt)
    assert_no_leaks(c.address)


@pytest.mark.parametrize("dtype", DTYPES)
def test_1p1d_on_one_gpu_over_cuda_ipc(golden, redis_url, tmp_path, dtype):
    model_dir, prompts, refs = golden
    args = ENGINE_ARGS + ["--dtype", dtype, "--device", "cuda:0", "--kv-transport", "cuda_ipc"]
    with LocalCluster(model_dir, prefill=1, decode=1, redis_url=redis_url, worker_args=args,
                      log_dir=str(tmp_path)) as c:
        check_cluster(c, prompts, refs[dtype], dtype)


@pytest.mark.nccl
@pytest.mark.multi_gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_1p1d_across_two_gpus_over_nccl(golden, redis_url, tmp_path, dtype):
    model_dir, prompts, refs = golden
    args = ENGINE_ARGS + ["--dtype", dtype, "--kv-transport", "nccl"]
    with LocalCluster(model_dir, prefill=1, decode=1, redis_url=redis_url, worker_args=args, log_dir=str(tmp_path),
                      role_args={"prefill": ["--device", "cuda:0"], "decode": ["--device", "cuda:1"]}) as c:
        check_cluster(c, prompts, refs[dtype], dtype)


MIGRATION_TOKENS = 200


def test_migration_between_decode_instances_on_one_gpu(export_named, redis_url, tmp_path):
    """A request moved decode→decode (cuda_ipc, both on one GPU) at three moments keeps
    transformers' tokens; the stream names the new instance at the move's index."""
    model_dir = export_named("tiny")
    prompts = random_prompts([310, 40], 512, seed=23)
    refs = hf_greedy_with_margins(model_dir, prompts, MIGRATION_TOKENS, torch.float32, "cuda")
    args = ["--dtype", "float32", "--device", "cuda:0", "--kv-transport", "cuda_ipc", "--num-blocks", "600",
            "--max-num-batched-tokens", "512"]
    with LocalCluster(model_dir, prefill=1, decode=2, redis_url=redis_url, worker_args=args,
                      router_args=["--no-reschedule"], log_dir=str(tmp_path)) as c:
        busy = [Stream(c.address, f"bg-{i}", prompts[1], MIGRATION_TOKENS) for i in range(3)]
        moved = []
        for name, at in {"early": 2, "middle": MIGRATION_TOKENS // 2, "late": MIGRATION_TOKENS - 40}.items():
            for attempt in range(4):                 # a request that finished before its move is tried again
                s = Stream(c.address, f"m-{name}-{attempt}", prompts[0], MIGRATION_TOKENS)
                assert s.reached(at), f"{name}: the request ended before token {at}"
                src = holder(c.address, s.request_id)
                outcome = None
                if src is not None:
                    with Client(c.address) as client:
                        outcome = client.migrate(s.request_id, other(c.address, src.instance_id).instance_id)
                if outcome is not None and outcome["abort_reason"] != "request_finished":
                    break
                s.result()
            assert outcome is not None and outcome["committed"], (name, outcome)
            moved.append((s, outcome))
        tokens = [s.result() for s, _ in moved]           # the whole stream, then where it ran
        for s, outcome in moved:
            moves = s.decode_instances()
            assert len(moves) == 2 and moves[1][0] == outcome["next_index"] and moves[0][1] != moves[1][1], moves
        assert_greedy_matches(tokens, [refs[0]] * len(moved), torch.float32, min_compared=1.0)
        assert_greedy_matches([b.result() for b in busy], [refs[1]] * len(busy), torch.float32, min_compared=1.0)
        assert_no_leaks(c.address)
