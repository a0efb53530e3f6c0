"""The chart's auth values: a Secret for API keys and the cluster token (or the operator's own), the
router reading TANDEM_API_KEYS and every pod TANDEM_CLUSTER_TOKEN from it; nothing without them."""
from __future__ import annotations

import pytest

pytest.importorskip("helm_python", reason="helm-python-sdk (Helm's Go SDK for Python) is not installed")

from tests.k8s.test_chart import by_kind_name, objects  # noqa: E402

PODS = ("tandem-router", "tandem-prefill", "tandem-decode")


def _env(objs: dict, name: str) -> dict[str, dict]:
    container = objs[("Deployment", name)]["spec"]["template"]["spec"]["containers"][0]
    return {e["name"]: e for e in container.get("env", [])}


def test_no_auth_values_no_secret_and_no_env():
    objs = by_kind_name(objects({}))
    assert not [k for k in objs if k[0] == "Secret"]
    for name in PODS:
        env = _env(objs, name)
        assert "TANDEM_CLUSTER_TOKEN" not in env and "TANDEM_API_KEYS" not in env


def test_values_make_a_secret_the_pods_read():
    objs = by_kind_name(objects({"auth": {"apiKeys": ["k1", "k2"], "clusterToken": "s3cret"}}))
    secret = objs[("Secret", "tandem-auth")]
    assert secret["stringData"] == {"api-keys": "k1,k2", "cluster-token": "s3cret"}
    for name in PODS:
        ref = _env(objs, name)["TANDEM_CLUSTER_TOKEN"]["valueFrom"]["secretKeyRef"]
        assert ref == {"name": "tandem-auth", "key": "cluster-token", "optional": False}
    assert _env(objs, "tandem-router")["TANDEM_API_KEYS"]["valueFrom"]["secretKeyRef"]["key"] == "api-keys"
    assert "TANDEM_API_KEYS" not in _env(objs, "tandem-decode")       # workers never see client keys


def test_existing_secret_is_used_as_is():
    objs = by_kind_name(objects({"auth": {"existingSecret": "my-auth"}}))
    assert not [k for k in objs if k[0] == "Secret"]
    for name in PODS:
        ref = _env(objs, name)["TANDEM_CLUSTER_TOKEN"]["valueFrom"]["secretKeyRef"]
        assert ref["name"] == "my-auth" and ref["optional"] is True
    assert _env(objs, "tandem-router")["TANDEM_API_KEYS"]["valueFrom"]["secretKeyRef"]["name"] == "my-auth"


def test_network_policies_stay():
    objs = by_kind_name(objects({"auth": {"clusterToken": "s3cret"}}))
    assert ("NetworkPolicy", "tandem-workers") in objs
