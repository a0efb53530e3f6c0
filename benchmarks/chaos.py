"""`make chaos`: faults under steady load on a local cluster, every token checked (issue 18, item 7).

A tiny 2P+2D cluster with two router replicas serves a steady stream of greedy and seeded requests
from CLIENTS threads, each through the SDK (`Client([router, router-1], max_resumes=8)`: a stream
whose router dies resumes on the other one), while the script SIGKILLs a decode worker, SIGKILLs a
prefill worker, SIGKILLs a router and restarts Redis (empty), each ROUNDS times, FAULT_GAP_S apart;
killed processes are started again a moment later (a router on its own port). Then every
request is replayed once on the healed cluster without faults: its tokens are the golden ones
(greedy and seeded sampling do not depend on the batch, see services/engine/sampler.py). Workers run
float32: a resumed request recomputes its KV, and under bfloat16 that may flip a late near-tie.

Per request: golden (finished, tokens equal to the replay), mismatched (finished, tokens differ),
retryable_failures (ended UNAVAILABLE / RESOURCE_EXHAUSTED / ABORTED: the client may retry),
lost (any other end, or a gap in the indexes), duplicated_tokens (tokens sent at an index the
client already had). leaked: KV blocks, leases, reservations and requests still held by any
instance 30 s after the last request ended, plus integrity errors.

    python benchmarks/chaos.py [--rounds 2] [--clients 4] [--fault-gap-s 4] [--seed 0]

The host line comes first; the last line printed is one JSON object:
{"sent", "golden", "mismatched", "retryable_failures", "lost", "duplicated_tokens", "leaked", ...}.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import grpc

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.host_info import host_line  # noqa: E402
from tandem.client import Client  # noqa: E402
from tandem.errors import InternalError, TandemError  # noqa: E402
from tandem.local_cluster import LocalCluster  # noqa: E402
from services.load import used_blocks  # noqa: E402
from tandem.redis_server import RedisServer  # noqa: E402
from tandem.v1 import admin_pb2, admin_pb2_grpc, serving_pb2, serving_pb2_grpc, worker_pb2, worker_pb2_grpc  # noqa: E402

RETRYABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.ABORTED}
WORKER_ARGS = ["--dtype", "float32", "--num-blocks", "600", "--heartbeat-ttl-s", "1.5", "--heartbeat-interval-s", "0.5"]


@dataclass
class Outcome:
    spec: dict
    tokens: list[int] = field(default_factory=list)
    finished: bool = False
    code: grpc.StatusCode | None = None
    details: str = ""
    duplicated: int = 0
    gap: bool = False


def request_specs(rng: random.Random, n: int) -> list[dict]:
    """n requests: prompt ids, max_tokens, greedy or seeded."""
    specs = []
    for i in range(n):
        prompt = [rng.randrange(3, 512) for _ in range(rng.randint(8, 200))]
        params = dict(max_tokens=rng.randint(32, 160), ignore_eos=True)
        if i % 2:
            params.update(temperature=0.8, top_p=0.95, seed=rng.randrange(1 << 31))
        specs.append(dict(prompt=prompt, params=params))
    return specs


def run_one(address: str | list[str], spec: dict, request_id: str = "") -> Outcome:
    """Stream one request with raw stubs (one router address) or the SDK (several: it resumes on
    another router when one dies); count duplicated tokens and gaps instead of asserting (the SDK
    raises InternalError on either, counted as a gap)."""
    out = Outcome(spec)
    try:
        for index, token_ids, finished in _messages(address, spec, request_id):
            if index < len(out.tokens):
                out.duplicated += min(len(out.tokens) - index, len(token_ids))
                out.tokens = out.tokens[:index]
            elif index > len(out.tokens):
                out.gap = True
            out.tokens += list(token_ids)
            out.finished = finished
    except InternalError as e:
        out.gap, out.code, out.details = True, e.code, e.details
    except TandemError as e:
        out.code, out.details = e.code, e.details
    except grpc.RpcError as e:
        out.code, out.details = e.code(), e.details()
    return out


def _messages(address: str | list[str], spec: dict, request_id: str):
    """(index, token ids, finished) of each message of one request."""
    if isinstance(address, str):
        req = serving_pb2.GenerateRequest(prompt_token_ids=spec["prompt"], request_id=request_id,
                                          params=serving_pb2.SamplingParams(**spec["params"]))
        with grpc.insecure_channel(address) as channel:
            for m in serving_pb2_grpc.ServingStub(channel).Generate(req, timeout=180):
                yield m.index, m.token_ids, m.finished
        return
    with Client(address, max_resumes=8, timeout=180) as client:
        for c in client.generate(token_ids=spec["prompt"], request_id=request_id or None, **spec["params"]):
            yield c.index, c.token_ids, c.finished


def live_instances(address: str) -> list[worker_pb2.LoadReport]:
    with grpc.insecure_channel(address) as channel:
        return [i for i in admin_pb2_grpc.AdminStub(channel).ListInstances(admin_pb2.ListInstancesRequest(),
                                                                           timeout=10).instances
                if i.state == "serving"]


def wait_registered(cluster: LocalCluster, name: str, timeout_s: float = 120.0) -> None:
    """Until the restarted worker's new record (a running process behind it) is in the router's view."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for inst in live_instances(cluster.address):
            if inst.instance_id == name:
                try:
                    with grpc.insecure_channel(inst.address) as ch:
                        worker_pb2_grpc.WorkerStub(ch).Stats(worker_pb2.StatsRequest(), timeout=2)
                    return
                except grpc.RpcError:
                    pass
        time.sleep(0.2)
    raise RuntimeError(f"{name} did not register again within {timeout_s}s; logs in {cluster.log_dir}")


def leaked(address: str, timeout_s: float = 30.0) -> tuple[int, list[str]]:
    """(blocks + leases + requests still held, descriptions) once cleanup had timeout_s to finish."""
    deadline = time.monotonic() + timeout_s
    while True:
        total, problems = 0, []
        for inst in live_instances(address):
            with grpc.insecure_channel(inst.address) as ch:
                s = worker_pb2_grpc.WorkerStub(ch).Stats(worker_pb2.StatsRequest(check_integrity=True), timeout=30)
            held = used_blocks(s) + s.leases + s.reserved_blocks + s.running + s.waiting
            held += bool(s.integrity_error)
            if held:
                problems.append(f"{inst.instance_id}: used {used_blocks(s)}, leases {s.leases}, "
                                f"reserved {s.reserved_blocks}, running {s.running}, waiting {s.waiting}, "
                                f"integrity {s.integrity_error or 'ok'}")
            total += held
        if not total or time.monotonic() > deadline:
            return total, problems
        time.sleep(0.5)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="benchmarks/chaos.py", description=__doc__.split("\n")[0])
    p.add_argument("--model", default="tiny")
    p.add_argument("--rounds", type=int, default=2, help="times each fault is injected")
    p.add_argument("--clients", type=int, default=4, help="concurrent client streams")
    p.add_argument("--fault-gap-s", type=float, default=4.0)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    print(json.dumps({"host": host_line()}), flush=True)
    rng = random.Random(a.seed)
    specs = request_specs(rng, 100_000)
    faults = ["decode", "prefill", "router", "redis"] * a.rounds
    redis = RedisServer().start()
    port = redis.port
    outcomes: list[Outcome] = []
    log_dir = tempfile.mkdtemp(prefix="tandem-chaos-")
    started = time.monotonic()
    try:
        with LocalCluster(a.model, prefill=2, decode=2, redis_url=redis.url, worker_args=WORKER_ARGS,
                          router_args=["--poll-interval-s", "0.2"], pools="fixed", log_dir=log_dir) as cluster:
            routers = [cluster.address, cluster.add_router("router-1")]
            stop = threading.Event()
            counter = iter(range(len(specs)))
            lock = threading.Lock()

            def client(k: int):
                mine = routers[k % 2:] + routers[:k % 2]       # half the clients start on each router
                while not stop.is_set():
                    with lock:
                        i = next(counter)
                    o = run_one(mine, specs[i], request_id=f"chaos-{i}")
                    with lock:
                        outcomes.append(o)
            threads = [threading.Thread(target=client, args=(k,), daemon=True) for k in range(a.clients)]
            for t in threads:
                t.start()
            for fault in faults:
                time.sleep(a.fault_gap_s)
                if fault == "redis":
                    redis.stop()
                    time.sleep(2.0)                     # longer than the heartbeat TTL
                    redis = RedisServer(port=port).start()
                    print(json.dumps({"fault": "redis restarted", "at_s": round(time.monotonic() - started, 1)}),
                          flush=True)
                    continue
                if fault == "router":
                    victim = rng.choice(["router", "router-1"])
                    cluster.kill(victim)
                    print(json.dumps({"fault": f"SIGKILL {victim}", "at_s": round(time.monotonic() - started, 1)}),
                          flush=True)
                    time.sleep(1.0)
                    cluster.restart(victim)          # on its port: clients reach it at the same address
                    continue
                role = worker_pb2.ROLE_DECODE if fault == "decode" else worker_pb2.ROLE_PREFILL
                victim = rng.choice(sorted(i.instance_id for i in live_instances(cluster.address) if i.role == role))
                cluster.kill(victim)
                print(json.dumps({"fault": f"SIGKILL {victim}", "at_s": round(time.monotonic() - started, 1)}),
                      flush=True)
                time.sleep(1.0)
                cluster.restart(victim)
                wait_registered(cluster, victim)
            time.sleep(a.fault_gap_s)
            stop.set()
            for t in threads:
                t.join(300)
            leaked_count, problems = leaked(cluster.address)
            with ThreadPoolExecutor(a.clients) as pool:          # the golden run: no faults now
                golden = list(pool.map(lambda o: run_one(cluster.address, o.spec).tokens, outcomes))
    finally:
        redis.stop()
    summary = {"sent": len(outcomes), "golden": 0, "mismatched": 0, "retryable_failures": 0, "lost": 0,
               "duplicated_tokens": sum(o.duplicated for o in outcomes), "leaked": leaked_count}
    failures = {}
    for o, expected in zip(outcomes, golden):
        if o.code is None and o.finished and not o.gap:
            summary["golden" if o.tokens == expected else "mismatched"] += 1
        elif o.code in RETRYABLE and not o.gap:
            summary["retryable_failures"] += 1
            failures[o.details[:120]] = failures.get(o.details[:120], 0) + 1
        else:
            summary["lost"] += 1
            failures[f"{o.code}: {o.details[:120]}"] = failures.get(f"{o.code}: {o.details[:120]}", 0) + 1
    if failures:
        print(json.dumps({"failures": failures}), flush=True)
    if problems:
        print(json.dumps({"leaks": problems}), flush=True)
    print(json.dumps({"faults": faults, "duration_s": round(time.monotonic() - started, 1), "logs": log_dir}),
          flush=True)
    print(json.dumps(summary), flush=True)
    ok = summary["lost"] == 0 and summary["duplicated_tokens"] == 0 and summary["leaked"] == 0 \
        and summary["mismatched"] == 0
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
