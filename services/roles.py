"""An instance's role and state: one definition for the engine, the worker, the router, the
autoscaler and the simulator, and the only place they meet the proto.

- `Role` takes the numbers of `tandem.v1.Role` (worker.proto), so a Role is the proto value: it
  goes into a message as is, `Role(report.role)` reads one back, and `Role.DECODE ==
  worker_pb2.ROLE_DECODE`. `ROLE_UNSPECIFIED` (0) is not a Role: `Role.from_proto` answers None.
- `WorkerState` is the lifecycle a worker publishes in `LoadReport.state` (a string on the wire).
  It is a StrEnum: its members compare equal to, and format as, those strings.
"""
from __future__ import annotations

import enum

from tandem.v1 import worker_pb2


class Role(enum.IntEnum):
    COLOCATED = worker_pb2.ROLE_COLOCATED   # prefill and decode mixed in one step (the baseline; "both")
    PREFILL = worker_pb2.ROLE_PREFILL       # prefill only; a request leaves after its first token
    DECODE = worker_pb2.ROLE_DECODE         # decode only; prompts arrive as KV (or are recomputed)

    @property
    def label(self) -> str:
        """The lower-case name used on command lines, in logs, metrics and the admin JSON."""
        return self.name.lower()

    @classmethod
    def from_proto(cls, value: int) -> "Role | None":
        """The Role of a proto enum value; None for ROLE_UNSPECIFIED or an unknown number."""
        try:
            return cls(value)
        except ValueError:
            return None

    @classmethod
    def from_label(cls, label: str) -> "Role | None":
        """The Role named `label` (case-insensitive: prefill, decode, colocated); None otherwise."""
        return cls.__members__.get(label.upper())


ROLE_LABELS = tuple(r.label for r in (Role.COLOCATED, Role.PREFILL, Role.DECODE))


def pool_role(report) -> int:
    """The pool an instance belongs to: its home role (the role it was started in), which adaptive
    pools never change; its current role when it reports no home (ROLE_UNSPECIFIED). A decode
    instance serving both phases for a while (a standing prefill share) is still a decode instance
    to the autoscaler, the rescheduler and placement's comparisons."""
    return report.home_role or report.role


def role_label(value: int, unknown: str = "?") -> str:
    """`prefill` for a proto or engine role value; `unknown` for ROLE_UNSPECIFIED or another number."""
    role = Role.from_proto(value)
    return unknown if role is None else role.label


class WorkerState(enum.StrEnum):
    STARTING = "starting"   # loading; not registered for work yet
    SERVING = "serving"     # takes new requests
    DRAINING = "draining"   # takes none; its running requests finish or migrate away
    DRAINED = "drained"     # draining and empty
    STOPPING = "stopping"   # shutting down


WORKER_STATES = tuple(WorkerState)                                       # in lifecycle order
LIVE_STATES = (WorkerState.SERVING, WorkerState.DRAINING, WorkerState.DRAINED)   # can hold requests
OUT_OF_SERVICE = frozenset({WorkerState.DRAINING, WorkerState.DRAINED})  # still replicas, take no work
