"""The real model smollm2-135m on a real cluster (router, 1 prefill + 2 decode workers, Redis, KV over
TCP), float32: chat prompts through its template give transformers' greedy tokens through the
prefill → decode path, a request live-migrated between the decode instances mid-stream too, and
nothing leaks."""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest

from tandem.client import Client
from tandem.local_cluster import LocalCluster
from tests.golden import smollm2_reference as ref
from tests.integration.cluster_helpers import assert_no_leaks, generate
from tests.integration.migration_helpers import Stream, holder, other

pytestmark = pytest.mark.timeout(600)

WORKER_ARGS = ["--dtype", "float32", "--num-blocks", "256", "--max-num-batched-tokens", "64"]
MIGRATED_TOKENS = 40      # long enough that the move lands mid-stream


def migrated(address: str, prompt: list[int], at_index: int, attempts: int = 4):
    """A stream moved to the other decode instance once it has `at_index` tokens: (stream, outcome).
    A request that finished before the move landed is let go and a fresh one tried."""
    for attempt in range(attempts):
        s = Stream(address, f"move-{attempt}", prompt, MIGRATED_TOKENS)
        assert s.reached(at_index), "the request ended before the migration point"
        src = holder(address, s.request_id)
        if src is not None:
            with Client(address) as c:
                r = c.migrate(s.request_id, other(address, src.instance_id).instance_id)
            if r["abort_reason"] != "request_finished":
                return s, r
        s.result()
    raise AssertionError(f"the request finished before its migration {attempts} times")


def test_smollm2_cluster_and_migration_match_transformers(redis_url, tmp_path):
    path = ref.smollm2_file()
    prompts = ref.chat_prompts(path)
    expected = ref.hf_greedy(path, prompts, ref.MAX_NEW)
    long_expected = ref.hf_greedy(path, prompts[1:2], MIGRATED_TOKENS)[0]
    with LocalCluster("smollm2-135m", prefill=1, decode=2, redis_url=redis_url, worker_args=WORKER_ARGS,
                      router_args=["--no-reschedule"], log_dir=str(tmp_path)) as c:
        with ThreadPoolExecutor(len(prompts)) as pool:
            results = list(pool.map(lambda p: generate(c.address, list(p), ref.MAX_NEW), prompts))
        for i, ((tokens, messages), want) in enumerate(zip(results, expected)):
            assert tuple(tokens) == want, f"prompt {i}"
            assert messages[0].prefill_instance and messages[0].decode_instance   # the split path
        s, r = migrated(c.address, list(prompts[1]), at_index=4)
        assert r["committed"], r
        assert tuple(s.result()) == long_expected
        moves = s.decode_instances()
        assert len(moves) == 2 and moves[0][1] != moves[1][1] and moves[1][0] == r["next_index"], moves
        assert_no_leaks(c.address)
