"""Control RPCs of a worker, for every role: Release, live migration (Migrate on the source;
MigrationStage and CancelMigration on the destination), SetState, SetRole and Stats.
"""
from __future__ import annotations

import logging

import grpc

from services.roles import Role, WorkerState
from services.engine.engine_thread import EngineDeadError
from services.engine.sampling_params import InvalidRequestError
from services.worker import metrics as worker_metrics
from services.worker.migration_in import MigrationRefused
from services.worker.migration_out import MigrationError
from tandem.v1 import worker_pb2

log = logging.getLogger("tandem.worker")


class ControlRpcs:
    """Release, migration, state, role and stats. A part of WorkerServicer (servicer.py)."""

    async def Release(self, request: worker_pb2.ReleaseRequest, context):
        rid = request.request_id
        # First, and before any await: also marks rid so that a stream of it whose cancel this Release
        # overtook is not parked after it (parked.py).
        found = self.parked.drop(rid, "released by the router")
        found = await self.leases.release(rid, "released by the router") or found
        lease = self.leases.claim(rid)
        if lease is not None:
            lease.stream.cancel()
            found = True
        stream = self._prefills.get(rid)
        if stream is not None:
            stream.cancel()
            found = True
        self.et.abort(rid)
        try:
            await self._engine_call(lambda e: e.release(rid))
        except EngineDeadError:
            pass
        found = await self.targets.cancel(rid, "released by the router") or found
        moved = self.sources.moved_to(rid)
        if moved is not None:               # it decodes elsewhere now: pass the Release on
            self.peers.release_later(moved.address, rid)
            found = True
        return worker_pb2.ReleaseResponse(found=found)

    # ---- live migration ----------------------------------------------------------------------
    def _migration_event(self, event: str, *, reason: str = "", downtime_s: float = 0.0, stages: int = 1) -> None:
        if event == "started":
            worker_metrics.migration_started(self.instance_id)
        elif event == "committed":
            worker_metrics.migration_committed(self.instance_id, downtime_s, stages)
        else:
            worker_metrics.migration_aborted(self.instance_id, reason)

    async def Migrate(self, request: worker_pb2.MigrateRequest, context):
        await self._require_role(context, Role.DECODE, Role.COLOCATED, what="Migrate")
        try:
            return await self.sources.migrate(request)
        except MigrationError as e:
            await context.abort(e.code, str(e))

    async def MigrationStage(self, request: worker_pb2.MigrationStageRequest, context):
        await self._require_role(context, Role.DECODE, Role.COLOCATED, what="MigrationStage")
        rid = request.request_id
        if not rid:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "request_id: is empty")
        prompt = params = None
        if request.stage == 0:
            try:
                prompt, params = self._request_fields(request.request)
            except InvalidRequestError as e:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        try:
            blocks = await self.targets.stage(rid, request.stage, request.num_tokens, prompt=prompt, params=params,
                                              priority=request.request.priority,
                                              source_instance_id=request.source_instance_id,
                                              lease_ms=request.lease_ms or 10_000)
        except MigrationRefused as e:
            await context.abort(grpc.StatusCode[e.code], str(e))
        return worker_pb2.MigrationStageResponse(kv_address=self.kv_address, num_blocks=blocks)

    async def CancelMigration(self, request: worker_pb2.CancelMigrationRequest, context):
        found = await self.targets.cancel(request.request_id, request.reason or "cancelled by the source")
        return worker_pb2.ReleaseResponse(found=found)

    async def SetState(self, request: worker_pb2.SetStateRequest, context):
        if request.state not in (WorkerState.DRAINING, WorkerState.SERVING):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"state: {request.state!r} is not draining or serving")
        if request.state == WorkerState.DRAINING and self.home_role == Role.PREFILL:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, "only decode and colocated instances drain "
                                "by migration; stop a prefill instance directly (its requests are short)")
        if self.set_state_fn is None or self.state_fn() not in (WorkerState.SERVING, WorkerState.DRAINING, WorkerState.DRAINED):
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"instance is {self.state_fn()}")
        self.set_state_fn(WorkerState(request.state))
        return self.report_fn()

    async def SetRole(self, request: worker_pb2.SetRoleRequest, context):
        """Adaptive pools: serve `role` from now on (see worker.proto). The engine's role and step
        cap change in one engine call, then this servicer's role and the published record."""
        allowed = {Role.PREFILL: (Role.PREFILL, Role.COLOCATED), Role.DECODE: (Role.DECODE, Role.COLOCATED),
                   Role.COLOCATED: (Role.COLOCATED,)}[self.home_role]
        role = Role.from_proto(request.role)
        if role not in allowed:
            names = " or ".join(r.name.lower() for r in allowed)
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"role: a {self.home_role.name.lower()} instance "
                                f"switches to {names} only")
        if self.state_fn() != WorkerState.SERVING:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"instance {self.instance_id} is "
                                f"{self.state_fn()}; roles change only while serving (undo the drain first)")
        cap = request.mixed_prefill_tokens
        try:
            await self._engine_call(lambda e: e.set_role(role, cap))
        except EngineDeadError as e:
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"engine stopped: {e}")
        old, self.role, self.mixed_prefill_tokens = self.role, role, cap
        self.role_switches += old != role          # the same role again only sets a new cap
        log.info("role %s -> %s (home %s; prompt tokens per step beside decodes: %s): %s", old.name.lower(),
                 role.name.lower(), self.home_role.name.lower(), cap or "no cap", request.reason or "SetRole")
        self.on_role_change()
        return self.report_fn()

    async def Stats(self, request, context):
        report = self.report_fn()
        if request.list_requests:
            try:
                report.requests.extend(await self._engine_call(_running_requests))
            except EngineDeadError as e:
                await context.abort(grpc.StatusCode.UNAVAILABLE, f"engine stopped: {e}")
            self.parked.mark(report.requests)
        if request.check_integrity:
            def check(engine):
                try:
                    engine.check_integrity()
                    return "", engine.kv.num_free_blocks
                except Exception as e:       # report, don't crash: this is a diagnostic
                    return str(e), engine.kv.num_free_blocks
            try:
                report.integrity_error, report.free_blocks = await self._engine_call(check)
            except EngineDeadError as e:
                await context.abort(grpc.StatusCode.UNAVAILABLE, f"engine stopped: {e}")
        return report


def _running_requests(engine) -> list[worker_pb2.RunningRequest]:
    """What runs or waits on this engine (engine thread)."""
    s = engine.scheduler
    return [worker_pb2.RunningRequest(request_id=r.request_id, priority=r.priority, num_tokens=r.num_tokens,
                                      num_output_tokens=r.num_output_tokens,
                                      num_blocks=len(engine.kv.block_table(r.request_id)), running=r in s.running)
            for r in s.running + s.waiting]
