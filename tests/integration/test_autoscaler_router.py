"""`python -m router --autoscale` as a real process with a real Redis: it takes the leader lock,
reads the Deployments through the kubernetes client (a local scale-subresource server standing in
for the API server) and brings them into their bounds, then stops cleanly on SIGTERM."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.unit.test_k8s_scaler import NS, FakeApiServer, write_kubeconfig

ROOT = Path(__file__).resolve().parents[2]
BOUND_S = 60.0


def test_router_process_autoscales_into_bounds(redis_url, tmp_path):
    with FakeApiServer() as api:
        api.add("tandem-prefill", 0)              # below min 1: raised
        api.add("tandem-decode", 9)               # above max 8: lowered (nothing to drain)
        env = {k: v for k, v in os.environ.items() if k != "KUBERNETES_SERVICE_HOST"}
        proc = subprocess.Popen(
            [sys.executable, "-m", "router", "--model", "tiny", "--redis", redis_url, "--port", "0",
             "--cluster", "autoscale-test", "--autoscale", f"--autoscale-namespace={NS}",
             "--autoscale-prefill-deployment=tandem-prefill",
             "--autoscale-decode-deployment=tandem-decode",
             f"--autoscale-kubeconfig={write_kubeconfig(tmp_path / 'kubeconfig', api.url)}",
             "--autoscale-interval-s=0.2", "--autoscale-decode-max=8"],
            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            line = proc.stdout.readline()
            assert line.startswith("ready "), f"{line!r} {proc.stderr.read() if proc.poll() is not None else ''}"
            deadline = time.monotonic() + BOUND_S
            while (api.deployments[(NS, "tandem-prefill")]["replicas"],
                   api.deployments[(NS, "tandem-decode")]["replicas"]) != (1, 8):
                assert proc.poll() is None, proc.stderr.read()
                assert time.monotonic() < deadline, f"no scaling; requests: {api.methods()}"
                time.sleep(0.05)
            proc.send_signal(signal.SIGTERM)
            _, err = proc.communicate(timeout=BOUND_S)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    assert proc.returncode == 0, err
    assert "autoscaler: tandem-prefill 0 → 1 replicas: below min_replicas 1" in err
    assert "autoscaler: tandem-decode 9 → 8 replicas: above max_replicas 8" in err
    assert "Traceback" not in err
