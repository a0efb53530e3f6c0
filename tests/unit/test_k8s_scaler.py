"""The actuator with the real `kubernetes` client against a local HTTP server that implements the
apps/v1 Deployment scale subresource (GET and PATCH, resourceVersion preconditions, Status errors)."""
from __future__ import annotations

import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import yaml

from router.autoscale.k8s_scaler import (DeploymentNotFound, DeploymentScaler, ScaleConflict,
                                         ScalePermissionDenied, ScalerConfigError, ScalerError,
                                         ScalerUnavailable, load_api_client)

NS = "tandem"
TOKEN = "test-token"
SCALE_PATH = re.compile(r"^/apis/apps/v1/namespaces/([^/]+)/deployments/([^/]+)/scale$")


class FakeApiServer:
    """deployments: (namespace, name) → {"replicas", "rv"}. fail: a queue of (method, status)
    answered instead of the real handling, in order, for the next matching requests. Every
    request lands in `log` as (method, path, query, headers, body)."""

    def __init__(self):
        self.deployments = {}
        self.fail: list[tuple[str, int]] = []
        self.before_patch = None          # called before each PATCH is applied (races)
        self.log = []
        self.lock = threading.Lock()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def add(self, name, replicas, ns=NS):
        self.deployments[(ns, name)] = {"replicas": replicas, "rv": 100}

    def bump(self, name, ns=NS):
        """What a status update does: a new resourceVersion, same spec."""
        self.deployments[(ns, name)]["rv"] += 1

    def methods(self):
        return [m for m, *_ in self.log]

    def _handler(server):
        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                self._handle("GET")

            def do_PATCH(self):
                self._handle("PATCH")

            def _handle(self, method):
                path, _, query = self.path.partition("?")
                n = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(n)) if n else None
                with server.lock:
                    server.log.append((method, path, query, {k.lower(): v for k, v in self.headers.items()}, body))
                    status, payload = server._answer(method, path, body, self.headers)
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
        return Handler

    def _answer(self, method, path, body, headers):
        if headers.get("Authorization") != f"Bearer {TOKEN}":
            return status_body(401, "Unauthorized", "Unauthorized")
        if self.fail and self.fail[0][0] == method:
            _, code = self.fail.pop(0)
            reason = {403: "Forbidden", 404: "NotFound", 409: "Conflict",
                      422: "Invalid"}.get(code, "InternalError")
            return status_body(code, reason, f"injected {code} for {path}")
        m = SCALE_PATH.match(path)
        if not m or (m.group(1), m.group(2)) not in self.deployments:
            return status_body(404, "NotFound", f'deployments.apps "{m and m.group(2)}" not found')
        ns, name = m.groups()
        dep = self.deployments[(ns, name)]
        if method == "PATCH":
            if headers.get("Content-Type") not in ("application/merge-patch+json",
                                                   "application/strategic-merge-patch+json"):
                return status_body(415, "UnsupportedMediaType", headers.get("Content-Type"))
            if self.before_patch:
                self.before_patch()
            rv = (body.get("metadata") or {}).get("resourceVersion")
            if rv is not None and rv != str(dep["rv"]):
                return status_body(409, "Conflict", f'Operation cannot be fulfilled on '
                                   f'deployments.apps "{name}": the object has been modified; '
                                   f'please apply your changes to the latest version and try again')
            replicas = body["spec"]["replicas"]
            if replicas < 0:
                return status_body(422, "Invalid", "spec.replicas: must be >= 0")
            dep["replicas"], dep["rv"] = replicas, dep["rv"] + 1
        return 200, {"kind": "Scale", "apiVersion": "autoscaling/v1",
                     "metadata": {"name": name, "namespace": ns, "resourceVersion": str(dep["rv"])},
                     "spec": {"replicas": dep["replicas"]},
                     "status": {"replicas": dep["replicas"], "selector": f"app={name}"}}

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


def status_body(code, reason, message):
    return code, {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                  "message": message, "reason": reason, "code": code}


def write_kubeconfig(path, server_url, token=TOKEN):
    path.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "test",
        "clusters": [{"name": "test", "cluster": {"server": server_url}}],
        "users": [{"name": "test", "user": {"token": token}}],
        "contexts": [{"name": "test", "context": {"cluster": "test", "user": "test",
                                                  "namespace": NS}}]}))
    return str(path)


@pytest.fixture
def api():
    with FakeApiServer() as server:
        server.add("tandem-decode", 4)
        server.add("tandem-prefill", 2)
        yield server


@pytest.fixture
def scaler(api, tmp_path, monkeypatch):
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    client = load_api_client(write_kubeconfig(tmp_path / "kubeconfig", api.url), retries=0)
    return DeploymentScaler(client, NS, timeout_s=5.0, conflict_retries=2)


def test_reads_replicas_through_the_scale_subresource(api, scaler):
    assert scaler.get_replicas("tandem-decode") == 4
    scale = scaler.read("tandem-prefill")
    assert (scale.replicas, scale.resource_version) == (2, "100")
    method, path, _, headers, _ = api.log[-1]
    assert (method, path) == ("GET", "/apis/apps/v1/namespaces/tandem/deployments/tandem-prefill/scale")
    assert headers["authorization"] == f"Bearer {TOKEN}"


def test_set_replicas_patches_with_a_resource_version_precondition(api, scaler):
    assert scaler.set_replicas("tandem-decode", 3, expected=4) == 3
    assert api.deployments[(NS, "tandem-decode")]["replicas"] == 3
    assert api.methods() == ["GET", "PATCH"]
    _, path, query, headers, body = api.log[-1]
    assert path.endswith("/deployments/tandem-decode/scale")
    assert body == {"metadata": {"resourceVersion": "100"}, "spec": {"replicas": 3}}
    assert headers["content-type"] == "application/merge-patch+json"
    assert "fieldManager=tandem-autoscaler" in query


def test_set_replicas_is_a_no_op_at_the_target(api, scaler):
    assert scaler.set_replicas("tandem-decode", 4) == 4
    assert api.methods() == ["GET"]


def test_409_rereads_and_retries(api, scaler):
    # A status update lands between our read and our patch, once.
    bumps = [1]

    def race():
        if bumps:
            bumps.pop()
            api.bump("tandem-decode")
    api.before_patch = race
    assert scaler.set_replicas("tandem-decode", 6, expected=4) == 6
    assert api.methods() == ["GET", "PATCH", "GET", "PATCH"]
    assert api.deployments[(NS, "tandem-decode")]["replicas"] == 6


def test_409_that_persists_gives_up_with_a_clear_error(api, scaler):
    api.before_patch = lambda: api.bump("tandem-decode")
    with pytest.raises(ScaleConflict, match="409 Conflict"):
        scaler.set_replicas("tandem-decode", 6)
    assert api.methods() == ["GET", "PATCH"] * 3         # conflict_retries=2: three attempts
    assert api.deployments[(NS, "tandem-decode")]["replicas"] == 4


def test_injected_409_answer_is_retried(api, scaler):
    api.fail = [("PATCH", 409)]
    assert scaler.set_replicas("tandem-prefill", 3) == 3
    assert api.methods() == ["GET", "PATCH", "GET", "PATCH"]


def test_someone_else_changed_the_count(api, scaler):
    with pytest.raises(ScaleConflict, match="has 4 replicas, not the 5"):
        scaler.set_replicas("tandem-decode", 6, expected=5)
    assert api.methods() == ["GET"]
    assert api.deployments[(NS, "tandem-decode")]["replicas"] == 4


@pytest.mark.parametrize("method", ["GET", "PATCH"])
def test_403_is_a_permission_error_with_the_rbac_hint(api, scaler, method):
    api.fail = [(method, 403)]
    with pytest.raises(ScalePermissionDenied) as e:
        scaler.set_replicas("tandem-decode", 5)
    assert "HTTP 403" in str(e.value) and "injected 403" in str(e.value)
    assert "deployments/scale" in str(e.value) and "autoscaler.enabled" in str(e.value)
    assert len(api.log) == (1 if method == "GET" else 2)           # not retried


def test_401_with_a_wrong_token(api, tmp_path, monkeypatch):
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    client = load_api_client(write_kubeconfig(tmp_path / "kc", api.url, token="wrong"), retries=0)
    with pytest.raises(ScalePermissionDenied, match="HTTP 401"):
        DeploymentScaler(client, NS).get_replicas("tandem-decode")


def test_404_names_the_deployment_and_the_flags(api, scaler):
    with pytest.raises(DeploymentNotFound) as e:
        scaler.get_replicas("tandem-nope")
    assert "tandem/tandem-nope" in str(e.value) and "--autoscale-namespace" in str(e.value)
    assert 'deployments.apps "tandem-nope" not found' in str(e.value)
    api.fail = [("PATCH", 404)]                # deleted between read and patch
    with pytest.raises(DeploymentNotFound):
        scaler.set_replicas("tandem-decode", 5)


def test_5xx_and_unreachable_are_unavailable(api, scaler, tmp_path):
    api.fail = [("GET", 500)]
    with pytest.raises(ScalerUnavailable, match="HTTP 500"):
        scaler.get_replicas("tandem-decode")
    dead = FakeApiServer()                      # bound, never served, then closed
    url = dead.url
    dead.httpd.server_close()
    client = load_api_client(write_kubeconfig(tmp_path / "dead", url), retries=0)
    with pytest.raises(ScalerUnavailable, match="did not answer"):
        DeploymentScaler(client, NS, timeout_s=2.0).get_replicas("tandem-decode")


def test_422_and_bad_arguments(api, scaler):
    with pytest.raises(ValueError, match="replicas must be >= 0"):
        scaler.set_replicas("tandem-decode", -1)
    assert api.log == []
    api.fail = [("PATCH", 422)]
    with pytest.raises(ScalerError, match="HTTP 422") as e:
        scaler.set_replicas("tandem-decode", 5)
    assert type(e.value) is ScalerError                     # neither retried nor "unavailable"
    assert api.methods() == ["GET", "PATCH"]
    with pytest.raises(ValueError):
        DeploymentScaler(scaler.api.api_client, NS, conflict_retries=-1)


def test_no_credentials_anywhere_is_a_config_error(tmp_path, monkeypatch):
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    with pytest.raises(ScalerConfigError, match="--autoscale-kubeconfig"):
        load_api_client(str(tmp_path / "missing"))


def test_in_cluster_without_a_service_account_token_is_a_config_error(monkeypatch):
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.0.0.1")
    monkeypatch.setenv("KUBERNETES_SERVICE_PORT", "443")
    with pytest.raises(ScalerConfigError, match="ServiceAccount"):
        load_api_client()
