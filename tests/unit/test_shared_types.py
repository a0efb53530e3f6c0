"""The shared pieces of issue 21: cdiv, Role/WorkerState and their proto mapping, freeness."""
from __future__ import annotations

import pytest

from router.freeness import freeness
from router.migration.policy import PolicyConfig, freeness as policy_freeness
from router.request.placement import freeness as placement_freeness
from services.engine.blocks import cdiv
from services.roles import LIVE_STATES, ROLE_LABELS, Role, WORKER_STATES, WorkerState, role_label
from tandem.v1 import worker_pb2


@pytest.mark.parametrize("a,b,want", [(0, 16, 0), (1, 16, 1), (16, 16, 1), (17, 16, 2), (32, 16, 2), (5, 1, 5)])
def test_cdiv(a, b, want):
    assert cdiv(a, b) == want


def test_role_is_the_proto_value():
    assert [(r, r.value) for r in Role] == [(Role.COLOCATED, worker_pb2.ROLE_COLOCATED),
                                           (Role.PREFILL, worker_pb2.ROLE_PREFILL), (Role.DECODE, worker_pb2.ROLE_DECODE)]
    assert Role.from_proto(worker_pb2.ROLE_DECODE) is Role.DECODE
    assert Role.from_proto(worker_pb2.ROLE_UNSPECIFIED) is None and Role.from_proto(99) is None
    assert Role.from_label("Prefill") is Role.PREFILL and Role.from_label("both") is None
    assert ROLE_LABELS == ("colocated", "prefill", "decode")
    assert role_label(worker_pb2.ROLE_PREFILL) == "prefill" and role_label(0) == "?"
    assert worker_pb2.LoadReport(role=Role.DECODE).role == worker_pb2.ROLE_DECODE


def test_worker_state_is_the_wire_string():
    assert [str(s) for s in WORKER_STATES] == ["starting", "serving", "draining", "drained", "stopping"]
    assert WorkerState.SERVING == "serving" and f"{WorkerState.DRAINED}" == "drained"
    assert worker_pb2.LoadReport(state=WorkerState.DRAINING).state == "draining"
    assert "serving" in LIVE_STATES and "starting" not in LIVE_STATES


def test_freeness_callers_keep_their_numbers():
    assert freeness(10, 0) == 10 and freeness(-3, 2) == -1.5
    r = worker_pb2.LoadReport(free_blocks=40, running=2, waiting=1)
    assert placement_freeness(r) == 40 / 3 and placement_freeness(r, extra_running=1, extra_blocks=8) == 32 / 4
    load = worker_pb2.LoadReport(instance_id="d", total_blocks=100, free_blocks=40, running=3, waiting=2,
                                 head_waiting_blocks=5, high_priority_running=1, state="serving")
    cfg = PolicyConfig()                      # 16 blocks of headroom per high-priority request
    assert policy_freeness(load, cfg) == (100 - (60 + 5 + 16)) / 3
    assert policy_freeness(worker_pb2.LoadReport(total_blocks=100, free_blocks=40, state="draining"), cfg) == float("-inf")


def test_pool_role_is_the_home_role_when_there_is_one():
    from services.roles import pool_role
    assert pool_role(worker_pb2.LoadReport(role=Role.COLOCATED, home_role=Role.DECODE)) == Role.DECODE
    assert pool_role(worker_pb2.LoadReport(role=Role.PREFILL)) == Role.PREFILL       # no home reported
