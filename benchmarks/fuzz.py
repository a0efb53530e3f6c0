"""`make fuzz`: hostile input against a live cluster (issue 18, item 5).

A tiny 1P+1D LocalCluster (Redis, two workers, the router with its HTTP API) takes, with
hypothesis (seeded, no shrinking: every case is counted, none stops the run):

- grpc: every method of tandem.v1.Serving, tandem.v1.Admin and tandem.v1.Worker (on both workers)
  with messages built from the descriptors, malformed and extreme fields
  (benchmarks/fuzz_strategies.py); a streaming call is read briefly, then cancelled;
- raw: garbage bytes on every gRPC port and every KV data-plane port (pure noise, an HTTP/2
  preface then noise, a KV frame header (protocol v4) then noise), then a health check;
- http: schemathesis against the OpenAPI document the router serves (GET /openapi.json):
  /v1/completions, /v1/chat/completions, /v1/models, /v1/models/{model_id}.

Crash: a process of the cluster died, or a call answered gRPC INTERNAL / UNKNOWN (an unhandled
exception) or HTTP 500, or an HTTP body with a traceback. Hang: a call with neither an answer nor
an error within its deadline (a stream's initial metadata or first message counts as an answer),
or a health check that fails after garbage. Leaks: assert_no_leaks fails after the run (0 or 1).
State-changing cases (SetState, SetRole, Drain) are undone after each case.

    python benchmarks/fuzz.py [--cases 10000] [--seed 0] [--share grpc=0.7,raw=0.05,http=0.25]

The host line comes first; the last line printed is {"cases": N, "crashes": N, "hangs": N,
"leaks": N} (and per-kind counts and the first few findings on the lines before it).
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import socket
import sys
import threading
import time
from dataclasses import dataclass, field

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, Phase, given, seed as hseed, settings, strategies as st

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.fuzz_strategies import messages  # noqa: E402
from benchmarks.host_info import host_line  # noqa: E402
from services.transport import framing  # noqa: E402
from tandem.local_cluster import LocalCluster  # noqa: E402
from tandem.v1 import admin_pb2, admin_pb2_grpc, serving_pb2, serving_pb2_grpc, worker_pb2, worker_pb2_grpc  # noqa: E402

CALL_DEADLINE_S = 15.0         # a unary call, or a stream's first answer
STREAM_READ_S = 0.5            # a stream that answers (its headers) is read this long, then cancelled
HTTP_DEADLINE_S = 30.0
CRASH_CODES = (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN)
# What a Python traceback leaking into an answer starts with (not the bare word: an error message may
# quote a fuzzed value that happens to be "Traceback").
TRACEBACK = "Traceback (most recent call last)"
SERVICES = ((serving_pb2, "Serving", serving_pb2_grpc.ServingStub, "router"),
            (admin_pb2, "Admin", admin_pb2_grpc.AdminStub, "router"),
            (worker_pb2, "Worker", worker_pb2_grpc.WorkerStub, "workers"))
HTTP2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


@dataclass
class Findings:
    cases: collections.Counter = field(default_factory=collections.Counter)      # kind → cases run
    crashes: list = field(default_factory=list)
    hangs: list = field(default_factory=list)
    statuses: collections.Counter = field(default_factory=collections.Counter)

    def crash(self, what: str) -> None:
        self.crashes.append(what[:400])

    def hang(self, what: str) -> None:
        self.hangs.append(what[:400])


# ---- gRPC methods --------------------------------------------------------------------------------
def methods():
    """(label, module, service name, stub class, target, method name, input class, server-streaming)."""
    for module, service, stub_class, target in SERVICES:
        desc = module.DESCRIPTOR.services_by_name[service]
        for m in desc.methods:
            yield (f"{service}.{m.name}", module, service, stub_class, target, m.name,
                   _message_class(m.input_type), m.server_streaming)


def _message_class(descriptor):
    from google.protobuf import message_factory
    return message_factory.GetMessageClass(descriptor)


def call_once(stub, name: str, request, streaming: bool, label: str, found: Findings) -> None:
    method = getattr(stub, name)
    try:
        if not streaming:
            method(request, timeout=CALL_DEADLINE_S)
            found.statuses[f"{label} OK"] += 1
            return
        call = method(request, timeout=CALL_DEADLINE_S)
        answered = False
        stop = threading.Timer(STREAM_READ_S, call.cancel)     # a long-lived stream (Outputs) sends nothing
        try:
            call.initial_metadata()                 # blocks until headers or the end
            answered = True
            stop.start()
            for _ in call:
                pass
            found.statuses[f"{label} OK"] += 1
        finally:
            stop.cancel()
            call.cancel()
    except grpc.RpcError as e:
        code = e.code()
        if code == grpc.StatusCode.CANCELLED and streaming:     # our own cancel after reading
            found.statuses[f"{label} OK"] += 1
            return
        found.statuses[f"{label} {code.name}"] += 1
        if code in CRASH_CODES or TRACEBACK in (e.details() or ""):
            found.crash(f"{label}: {code.name}: {e.details()} <- {_short(request)}")
        elif code == grpc.StatusCode.DEADLINE_EXCEEDED and not (streaming and answered):
            found.hang(f"{label}: no answer in {CALL_DEADLINE_S} s <- {_short(request)}")


def _short(request) -> str:
    text = str(request).replace("\n", " ")
    return text if len(text) < 300 else text[:300] + "..."


def undo(label: str, stub, worker_roles: dict, router_admin, instances) -> None:
    """Put back what a state-changing case may have changed."""
    try:
        if label == "Worker.SetState" or label == "Admin.Drain":
            for inst in instances:
                worker_pb2_grpc.WorkerStub(grpc.insecure_channel(inst.address)).SetState(
                    worker_pb2.SetStateRequest(state="serving"), timeout=10)
        if label == "Worker.SetRole":
            for inst in instances:
                worker_pb2_grpc.WorkerStub(grpc.insecure_channel(inst.address)).SetRole(
                    worker_pb2.SetRoleRequest(role=worker_roles[inst.instance_id]), timeout=30)
    except grpc.RpcError:
        pass


def fuzz_grpc(cluster: LocalCluster, budget: int, seed: int, found: Findings) -> None:
    router = grpc.insecure_channel(cluster.address)
    admin = admin_pb2_grpc.AdminStub(router)
    instances = list(admin.ListInstances(admin_pb2.ListInstancesRequest(), timeout=10).instances)
    roles = {i.instance_id: i.role for i in instances}
    worker_channels = [grpc.insecure_channel(i.address) for i in instances]
    all_methods = list(methods())
    rounds = 0
    while found.cases["grpc"] < budget and not dead(cluster):   # small message spaces run out early:
        left = budget - found.cases["grpc"]                       # go round again, another seed
        for label, module, service, stub_class, target, name, cls, streaming in all_methods:
            stubs = [stub_class(router)] if target == "router" else [stub_class(c) for c in worker_channels]
            _fuzz_method(cluster, label, name, cls, streaming, stubs, max(1, left // len(all_methods)),
                         seed + rounds, found, lambda lb, st_: undo(lb, st_, roles, admin, instances))
            if dead(cluster):
                found.crash(f"after {label}: {dead(cluster)}")
                return
        rounds += 1


def requests_for(cls):
    """Fuzzed messages of `cls`; for the router's Generate half of them start from a valid request
    (a short prompt, 4 tokens) with fuzzed fields merged over it, to reach past validation."""
    fuzzed = messages(cls)
    if cls is not serving_pb2.GenerateRequest:
        return fuzzed

    def over_valid(m):
        base = serving_pb2.GenerateRequest(prompt_token_ids=[1, 2, 3, 4], params=serving_pb2.SamplingParams(
            max_tokens=4))
        base.MergeFrom(m)
        return base
    return st.one_of(fuzzed, fuzzed.map(over_valid))


def _fuzz_method(cluster, label, name, cls, streaming, stubs, examples, seed, found, undo_fn) -> None:
    @settings(max_examples=examples, database=None, deadline=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    @hseed(seed)
    @given(request=requests_for(cls), which=st.integers(0, len(stubs) - 1))
    def case(request, which):
        if dead(cluster):
            return
        found.cases["grpc"] += 1
        call_once(stubs[which], name, request, streaming, label, found)
        if label in ("Worker.SetState", "Worker.SetRole", "Admin.Drain"):
            undo_fn(label, stubs[which])
    case()


# ---- raw bytes -----------------------------------------------------------------------------------
def garbage_payloads():
    noise = st.binary(min_size=1, max_size=4096)
    header = st.builds(lambda ftype, rid_len, rest: framing.MAGIC + bytes([ftype % 256]) + rid_len + rest,
                       st.integers(0, 255), st.binary(min_size=0, max_size=8), noise)
    return st.one_of(noise, noise.map(lambda b: HTTP2_PREFACE + b), header,
                     st.just(b"\xff" * 65536), st.just(framing.MAGIC * 20000))


def send_garbage(address: str, payload: bytes) -> None:
    host, port = address.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=5) as s:
        try:
            s.sendall(payload)
            s.shutdown(socket.SHUT_WR)
            s.settimeout(1.0)
            while s.recv(65536):
                pass
        except OSError:
            pass                             # the server closed on us: that is an answer


def healthy(address: str, worker: bool) -> str | None:
    """None when `address` answers a health / Stats call in time, else why not."""
    try:
        with grpc.insecure_channel(address) as channel:
            if worker:
                worker_pb2_grpc.WorkerStub(channel).Stats(worker_pb2.StatsRequest(), timeout=CALL_DEADLINE_S)
            else:
                health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=CALL_DEADLINE_S)
        return None
    except grpc.RpcError as e:
        return f"{address}: {e.code().name}: {e.details()}"


def fuzz_raw(cluster: LocalCluster, budget: int, seed: int, found: Findings) -> None:
    with grpc.insecure_channel(cluster.address) as channel:
        instances = list(admin_pb2_grpc.AdminStub(channel).ListInstances(
            admin_pb2.ListInstancesRequest(), timeout=10).instances)
    targets = [(cluster.address, "router gRPC")]
    targets += [(i.address, f"{i.instance_id} gRPC") for i in instances]
    targets += [(i.kv_address, f"{i.instance_id} KV") for i in instances if i.kv_address]
    if cluster.http_address:
        targets.append((cluster.http_address, "router HTTP"))

    @settings(max_examples=budget, database=None, deadline=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    @hseed(seed)
    @given(payload=garbage_payloads(), which=st.integers(0, len(targets) - 1))
    def case(payload, which):
        if dead(cluster):
            return
        found.cases["raw"] += 1
        address, what = targets[which]
        try:
            send_garbage(address, payload)
        except OSError as e:
            found.hang(f"raw {what}: could not connect: {e}")
    case()
    for address, worker in [(cluster.address, False)] + [(i.address, True) for i in instances]:
        why = healthy(address, worker)
        if why:
            found.hang(f"after garbage: {why}")


# ---- HTTP (schemathesis) -------------------------------------------------------------------------
def _bounded(case) -> None:
    """Keep generation short: a body's token budget is capped at 16 (extreme budgets are the gRPC
    part's, which reads a stream briefly); every other field is as generated."""
    body = case.body
    if isinstance(body, dict):
        for key in ("max_tokens", "max_completion_tokens"):
            if isinstance(body.get(key), int) and not isinstance(body.get(key), bool) and body[key] > 16:
                body[key] = 16
        if "messages" in body and "max_tokens" not in body and "max_completion_tokens" not in body:
            body["max_tokens"] = 16
        for key in ("n", "best_of"):
            if isinstance(body.get(key), int) and not isinstance(body.get(key), bool) and body[key] > 4:
                body[key] = 4


def fuzz_http(cluster: LocalCluster, budget: int, seed: int, found: Findings) -> None:
    import requests
    import schemathesis

    base = f"http://{cluster.http_address}"
    schema = schemathesis.openapi.from_url(f"{base}/openapi.json")
    operations = [op.ok() for op in schema.get_all_operations()]
    session = requests.Session()
    rounds = 0
    while found.cases["http"] < budget and not dead(cluster):
        left = budget - found.cases["http"]
        for op in operations:
            _fuzz_operation(cluster, op, base, session, max(1, left // len(operations)), seed + rounds, found)
        rounds += 1


def _fuzz_operation(cluster, op, base: str, session, per_op: int, seed: int, found: Findings) -> None:
    import requests

    @settings(max_examples=per_op, database=None, deadline=None, phases=[Phase.explicit, Phase.generate],
              suppress_health_check=list(HealthCheck))
    @hseed(seed)
    @given(case=op.as_strategy())
    def case(case):
        if dead(cluster):
            return
        found.cases["http"] += 1
        _bounded(case)
        try:
            response = case.call(base_url=base, session=session, timeout=HTTP_DEADLINE_S)
        except requests.Timeout:
            found.hang(f"HTTP {op.label}: no answer in {HTTP_DEADLINE_S} s <- {str(case.body)[:200]}")
            return
        except requests.ConnectionError as e:
            found.crash(f"HTTP {op.label}: connection error {e} <- {str(case.body)[:200]}")
            return
        found.statuses[f"HTTP {op.label} {response.status_code}"] += 1
        if response.status_code == 500 or TRACEBACK in response.text:
            found.crash(f"HTTP {op.label}: {response.status_code} {response.text[:200]} <- {str(case.body)[:200]}")
    case()


# ---- the run -------------------------------------------------------------------------------------
def dead(cluster: LocalCluster) -> str | None:
    gone = [f"{name} exited {p.returncode}" for name, p in cluster.procs.items() if p.poll() is not None]
    return "; ".join(gone) or None


def run(cases: int, seed: int, share: dict[str, float], log=print) -> dict:
    found = Findings()
    with LocalCluster("tiny", prefill=1, decode=1, pools="fixed", http_port=0,
                      worker_args=["--lease-ms", "3000"]) as cluster:
        started = time.monotonic()
        for kind, fn in (("grpc", fuzz_grpc), ("raw", fuzz_raw), ("http", fuzz_http)):
            budget = int(cases * share.get(kind, 0))
            if budget > 0 and not dead(cluster):
                fn(cluster, budget, seed, found)
                log(json.dumps({"part": kind, "cases": found.cases[kind], "crashes": len(found.crashes),
                                "hangs": len(found.hangs), "elapsed_s": round(time.monotonic() - started, 1)}),
                    flush=True)
        why = dead(cluster)
        if why:
            found.crash(f"a cluster process died: {why}")
        from tests.integration.cluster_helpers import assert_no_leaks
        leaks = 0
        if not why:
            try:
                assert_no_leaks(cluster.address, timeout_s=60)
            except AssertionError as e:
                leaks, found.crashes = 1, found.crashes
                log(json.dumps({"leak": str(e)[:400]}), flush=True)
    return {"cases": sum(found.cases.values()), "crashes": len(found.crashes), "hangs": len(found.hangs),
            "leaks": leaks, "by_kind": dict(found.cases), "examples": (found.crashes + found.hangs)[:5],
            "statuses": dict(found.statuses)}


def parse_share(text: str) -> dict[str, float]:
    out = {}
    for part in text.split(","):
        kind, _, value = part.partition("=")
        if kind not in ("grpc", "raw", "http"):
            raise SystemExit(f"--share {text!r}: kinds are grpc, raw, http (e.g. grpc=0.7,raw=0.05,http=0.25)")
        out[kind] = float(value)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cases", type=int, default=10_000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--share", default="grpc=0.7,raw=0.05,http=0.25", help="the cases' split between the parts")
    a = p.parse_args(argv)
    print(json.dumps({"host": host_line()}), flush=True)
    result = run(a.cases, a.seed, parse_share(a.share))
    print(json.dumps({"statuses": result.pop("statuses"), "by_kind": result.pop("by_kind"),
                      "examples": result.pop("examples")}), flush=True)
    print(json.dumps(result), flush=True)
    return 0 if result["crashes"] == result["hangs"] == result["leaks"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
