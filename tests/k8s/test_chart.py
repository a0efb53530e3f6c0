"""The Helm chart k8s/tandem: renders with Helm's own engine (helm-python-sdk), every manifest is
valid for Kubernetes 1.30 and 1.34 (strict schemas), the values schema rejects bad values, lint is
clean, the golden examples are current, and the pods run the flags the processes actually accept."""
from __future__ import annotations

import copy
import re

import pytest
import yaml

helm = pytest.importorskip("helm_python", reason="helm-python-sdk (Helm's Go SDK for Python) is not installed")
import kubernetes_validate  # noqa: E402

from k8s import render as chart_render  # noqa: E402

K8S_VERSIONS = ("1.30.0", "1.34.0")
# Kinds from CRDs: kubernetes-validate has no schema for them; only the all-features render makes one.
CRD_KINDS = {"ServiceMonitor"}

ALL_FEATURES = {
    "colocated": {"replicas": 2},
    "decode": {"drainOnStop": True, "drainTimeoutSeconds": 300},
    "rbac": {"create": True},
    "tls": {"enabled": True, "secretName": "tandem-tls"},
    "router": {"http": {"enabled": True}, "metrics": {"enabled": True}},
    "workers": {"metrics": {"enabled": True}},
    "metrics": {"serviceMonitor": {"enabled": True}},
    "networkPolicy": {"metricsFrom": [{"namespaceSelector": {"matchLabels": {"name": "monitoring"}}}]},
    "engine": {"maxModelLen": 4096},
    "redis": {"bundled": False, "urlSecret": {"name": "redis-url", "key": "url"}},
}


def objects(values: dict | None = None) -> list[dict]:
    rendered = chart_render.render(values)
    return [d for d in yaml.safe_load_all(chart_render.to_manifest(rendered)) if d]


def by_kind_name(objs: list[dict]) -> dict[tuple[str, str], dict]:
    return {(o["kind"], o["metadata"]["name"]): o for o in objs}


def example(name: str) -> dict:
    return chart_render.load_values(chart_render.EXAMPLES / f"values-{name}.yaml")


CASES = {"default": lambda: {}, "cpu": lambda: example("cpu"), "gpu": lambda: example("gpu"),
         "all-features": lambda: copy.deepcopy(ALL_FEATURES)}


def test_schema_versions_bundled():
    bundled = {kubernetes_validate.utils.major_minor(v) for v in kubernetes_validate.utils.all_versions()}
    for v in K8S_VERSIONS:
        assert kubernetes_validate.utils.major_minor(v) in bundled, f"kubernetes-validate lacks {v} schemas"


@pytest.mark.parametrize("k8s_version", K8S_VERSIONS)
@pytest.mark.parametrize("case", sorted(CASES))
def test_manifests_validate_strict(case, k8s_version):
    objs = objects(CASES[case]())
    assert objs
    for obj in objs:
        if obj["kind"] in CRD_KINDS:
            assert case == "all-features", f"{obj['kind']} rendered by default"
            continue
        # Raises SchemaNotFoundError for a kind/apiVersion unknown to that Kubernetes version.
        got = kubernetes_validate.validate(obj, k8s_version, strict=True)
        assert got == kubernetes_validate.utils.major_minor(k8s_version)


@pytest.mark.parametrize("values, message", [
    ({"prefill": {"replicas": -1}}, "/prefill/replicas"),
    ({"decode": {"replicas": -2}}, "/decode/replicas"),
    ({"router": {"replicas": -1}}, "/router/replicas"),
    ({"colocated": {"replicas": -1}}, "/colocated/replicas"),
    ({"kvTransport": "rdma"}, "/kvTransport"),
    ({"gpu": {"enabled": True}}, "count"),
    ({"gpu": {"enabled": True, "count": 0}}, "/gpu/count"),
    ({"redis": {"bundled": False}}, "externalUrl"),
    ({"tls": {"enabled": True}}, "secretName"),
    ({"prefil": {"replicas": 1}}, "prefil"),
])
def test_schema_rejects_bad_values(values, message):
    with pytest.raises(helm.HelmValuesError) as e:
        chart_render.render(values)
    assert message in str(e.value)


def test_schema_accepts_gpu_with_count():
    objs = by_kind_name(objects({"gpu": {"enabled": True, "count": 2}, "kvTransport": "nccl"}))
    for role in ("prefill", "decode"):
        c = objs[("Deployment", f"tandem-{role}")]["spec"]["template"]["spec"]["containers"][0]
        assert c["resources"]["limits"]["nvidia.com/gpu"] == 2


def test_servicemonitor_needs_a_metrics_port():
    with pytest.raises(helm.HelmError, match="no metrics port"):
        chart_render.render({"metrics": {"serviceMonitor": {"enabled": True}}})


@pytest.mark.parametrize("case", ["default", "cpu", "gpu", "all-features"])
def test_lint_clean(case, tmp_path):
    report = helm.lint(chart_render.CHART, CASES[case](), strict=True, kube_version="v1.30.0")
    assert report["errors"] == []
    problems = [m for m in report["messages"] if m["severity"] >= 2]
    assert problems == []


@pytest.mark.parametrize("name", chart_render.EXAMPLE_NAMES)
def test_goldens_up_to_date(name):
    path, text = chart_render.golden(name)
    assert path.read_text() == text, f"{path} is out of date: run python k8s/render.py"


def _normalise_worker(dep: dict) -> dict:
    """The Deployment with what may legitimately differ between roles blanked out."""
    d = copy.deepcopy(dep)
    role = d["metadata"]["labels"]["app.kubernetes.io/component"]
    text = yaml.safe_dump(d).replace(f"--role={role}", "--role=ROLE").replace(f"tandem-{role}", "tandem-ROLE")
    d = yaml.safe_load(text.replace(f"component: {role}", "component: ROLE"))
    d["spec"]["replicas"] = None
    c = d["spec"]["template"]["spec"]["containers"][0]
    c["resources"] = None
    c.pop("lifecycle", None)
    d["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] = None
    for key in ("nodeSelector", "tolerations", "affinity"):
        d["spec"]["template"]["spec"].pop(key, None)
    return d


@pytest.mark.parametrize("case", sorted(CASES))
def test_worker_pods_come_from_one_template(case):
    values = CASES[case]()
    values = copy.deepcopy(values)
    values.setdefault("colocated", {})["replicas"] = 1
    objs = by_kind_name(objects(values))
    deps = {r: objs[("Deployment", f"tandem-{r}")] for r in ("prefill", "decode", "colocated")}
    assert _normalise_worker(deps["prefill"]) == _normalise_worker(deps["decode"]) == _normalise_worker(deps["colocated"])
    for role, dep in deps.items():
        assert f"--role={role}" in dep["spec"]["template"]["spec"]["containers"][0]["args"]


def test_colocated_off_by_default():
    kinds = by_kind_name(objects())
    assert ("Deployment", "tandem-colocated") not in kinds


def _expand(args: list[str], env: dict[str, str]) -> list[str]:
    """Kubernetes' $(VAR) expansion of container args."""
    def sub(m):
        assert m.group(1) in env, f"$({m.group(1)}) is not defined in the container's env"
        return env[m.group(1)]
    return [re.sub(r"\$\(([A-Z0-9_]+)\)", sub, a) for a in args]


def _container_env(objs, container) -> dict[str, str]:
    """The container's environment as the kubelet builds it, with a fake pod name and IP."""
    fields = {"metadata.name": "tandem-decode-abc12", "status.podIP": "10.1.2.3"}
    env = {}
    for src in container.get("envFrom", []):
        env.update(objs[("ConfigMap", src["configMapRef"]["name"])]["data"])
    for e in container.get("env", []):
        ref = e.get("valueFrom", {})
        if "fieldRef" in ref:
            env[e["name"]] = fields[ref["fieldRef"]["fieldPath"]]
        elif "secretKeyRef" in ref:
            env[e["name"]] = f"<secret {ref['secretKeyRef']['name']}>"
        else:
            env[e["name"]] = e["value"]
    return env


@pytest.mark.parametrize("case", ["default", "cpu", "gpu"])
def test_worker_args_parse_with_the_worker_cli(case):
    from services.worker.__main__ import parse_args

    objs = by_kind_name(objects(CASES[case]()))
    cm = objs[("ConfigMap", "tandem-config")]["data"]
    for role in ("prefill", "decode"):
        c = objs[("Deployment", f"tandem-{role}")]["spec"]["template"]["spec"]["containers"][0]
        assert c["command"] == ["python", "-m", "services.worker"]
        opts = parse_args(_expand(c["args"], _container_env(objs, c)))
        assert opts.role == role
        assert opts.host == "10.1.2.3" and opts.instance_id == "tandem-decode-abc12"
        assert (opts.port, opts.kv_port) == (50061, 50062)
        assert opts.kv_transport == cm["TANDEM_ARG_KV_TRANSPORT"]
        assert opts.redis_url == cm["TANDEM_ARG_REDIS_URL"] and opts.cluster == "tandem"
        assert opts.device == ("cuda" if case == "gpu" else "cpu")
        ports = {p["name"]: p["containerPort"] for p in c["ports"]}
        assert ports == {"grpc": 50061, "kv": 50062}
        for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
            assert c[probe]["grpc"]["port"] == 50061


@pytest.mark.parametrize("case", ["default", "cpu", "gpu"])
def test_router_args_parse_with_the_router_cli(case, monkeypatch):
    import router.__main__ as router_main

    seen = {}

    def fake_router(model, redis_url, **kw):
        seen.update(model=model, redis_url=redis_url, **kw)
        return object()

    async def fake_serve(_router):
        return None

    monkeypatch.setattr(router_main, "Router", fake_router)
    monkeypatch.setattr(router_main, "serve", fake_serve)
    objs = by_kind_name(objects(CASES[case]()))
    c = objs[("Deployment", "tandem-router")]["spec"]["template"]["spec"]["containers"][0]
    assert c["command"] == ["python", "-m", "router"]
    assert router_main.main(_expand(c["args"], _container_env(objs, c))) == 0
    assert seen["host"] == "0.0.0.0" and seen["port"] == 50051 and seen["cluster"] == "tandem"
    assert seen["model"] == objs[("ConfigMap", "tandem-config")]["data"]["TANDEM_ARG_MODEL"]
    assert [p["name"] for p in c["ports"]] == ["grpc"]
    assert c["readinessProbe"]["grpc"]["port"] == 50051


def test_http_and_metrics_ports_only_when_enabled():
    def ports(objs):
        out = set()
        for o in objs:
            spec = o.get("spec", {})
            for p in spec.get("ports", []):
                out.add((o["kind"], o["metadata"]["name"], p["name"]))
            for c in spec.get("template", {}).get("spec", {}).get("containers", []):
                for p in c.get("ports", []):
                    out.add(("container", o["metadata"]["name"], p["name"]))
        return out

    default = ports(objects())
    assert not {p for p in default if p[2] in ("http", "metrics")}
    full = ports(objects(copy.deepcopy(ALL_FEATURES)))
    assert ("Service", "tandem-router", "http") in full
    assert ("Service", "tandem-router", "metrics") in full
    assert ("Service", "tandem-workers", "metrics") in full
    assert ("container", "tandem-decode", "metrics") in full


def test_drain_hook_only_when_enabled_and_grace_covers_it():
    objs = by_kind_name(objects({"decode": {"drainOnStop": False}}))
    spec = objs[("Deployment", "tandem-decode")]["spec"]["template"]["spec"]
    assert "lifecycle" not in spec["containers"][0]
    assert spec["terminationGracePeriodSeconds"] == 15
    objs = by_kind_name(objects({"decode": {"drainOnStop": True, "drainTimeoutSeconds": 300}}))
    spec = objs[("Deployment", "tandem-decode")]["spec"]["template"]["spec"]
    hook = " ".join(spec["containers"][0]["lifecycle"]["preStop"]["exec"]["command"])
    assert "tandem admin --addr tandem-router:50051 drain \"$POD_NAME\" --wait --timeout 300" in hook
    assert spec["terminationGracePeriodSeconds"] == 300 + 10 + 5
    prefill = objs[("Deployment", "tandem-prefill")]["spec"]["template"]["spec"]
    assert "lifecycle" not in prefill["containers"][0]


def _peer(**labels):
    return {"podSelector": {"matchLabels": {"app.kubernetes.io/name": "tandem",
                                            "app.kubernetes.io/instance": "tandem", **labels}}}


def test_network_policy_workers():
    objs = by_kind_name(objects())
    np = objs[("NetworkPolicy", "tandem-workers")]["spec"]
    assert np["podSelector"]["matchLabels"]["tandem/worker"] == "true"
    assert np["policyTypes"] == ["Ingress"]
    router, workers = _peer(**{"app.kubernetes.io/component": "router"}), _peer(**{"tandem/worker": "true"})
    assert np["ingress"] == [
        {"from": [router, workers], "ports": [{"port": 50061, "protocol": "TCP"}]},
        {"from": [workers], "ports": [{"port": 50062, "protocol": "TCP"}]},
    ]
    # Every worker Deployment carries the label the policy selects.
    for role in ("prefill", "decode"):
        labels = objs[("Deployment", f"tandem-{role}")]["spec"]["template"]["metadata"]["labels"]
        assert labels["tandem/worker"] == "true"
    redis = objs[("NetworkPolicy", "tandem-redis")]["spec"]
    assert redis["ingress"] == [{"from": [router, workers], "ports": [{"port": 6379, "protocol": "TCP"}]}]


def test_rbac_only_when_asked_and_minimal():
    kinds = {o["kind"] for o in objects()}
    assert not kinds & {"Role", "RoleBinding", "ServiceAccount", "ClusterRole", "ClusterRoleBinding"}
    for values in ({"rbac": {"create": True}}, {"autoscaler": {"enabled": True}}):
        objs = by_kind_name(objects(values))
        assert not any(k in ("ClusterRole", "ClusterRoleBinding") for k, _ in objs)
        role = objs[("Role", "tandem-autoscaler")]
        assert role["rules"] == [
            {"apiGroups": ["apps"], "resources": ["deployments"], "verbs": ["get", "list"]},
            {"apiGroups": ["apps"], "resources": ["deployments/scale"],
             "resourceNames": ["tandem-prefill", "tandem-decode", "tandem-colocated"],
             "verbs": ["get", "patch", "update"]},
        ]
        binding = objs[("RoleBinding", "tandem-autoscaler")]
        assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "tandem-autoscaler"}
        assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "tandem", "namespace": "tandem"}]
        router = objs[("Deployment", "tandem-router")]["spec"]["template"]["spec"]
        assert router["serviceAccountName"] == "tandem"
        decode = objs[("Deployment", "tandem-decode")]["spec"]["template"]["spec"]
        assert decode["automountServiceAccountToken"] is False


@pytest.mark.parametrize("case", sorted(CASES))
def test_pods_non_root_read_only(case):
    for o in objects(CASES[case]()):
        if o["kind"] != "Deployment":
            continue
        pod = o["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        for c in pod["containers"]:
            sc = c["securityContext"]
            assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False
            assert sc["capabilities"]["drop"] == ["ALL"]
            assert c["resources"]["requests"]["memory"]
        if o["metadata"]["name"] != "tandem-redis":
            mounts = {m["mountPath"] for m in pod["containers"][0]["volumeMounts"]}
            assert {"/tmp", "/cache"} <= mounts


def test_gpu_example_resources_and_transport():
    objs = by_kind_name(objects(example("gpu")))
    assert objs[("ConfigMap", "tandem-config")]["data"]["TANDEM_ARG_KV_TRANSPORT"] == "nccl"
    assert ("Deployment", "tandem-redis") not in objs
    for role, n in (("prefill", 4), ("decode", 8)):
        dep = objs[("Deployment", f"tandem-{role}")]
        assert dep["spec"]["replicas"] == n
        c = dep["spec"]["template"]["spec"]["containers"][0]
        assert c["resources"]["limits"]["nvidia.com/gpu"] == 1
        assert "/dev/shm" in {m["mountPath"] for m in c["volumeMounts"]}
    cpu = by_kind_name(objects(example("cpu")))
    for role in ("prefill", "decode"):
        c = cpu[("Deployment", f"tandem-{role}")]["spec"]["template"]["spec"]["containers"][0]
        assert "nvidia.com/gpu" not in c["resources"].get("limits", {})
        assert "nvidia.com/gpu" not in c["resources"].get("requests", {})
    assert ("Deployment", "tandem-redis") in cpu


def test_pdbs_for_prefill_and_decode():
    objs = by_kind_name(objects())
    for role in ("prefill", "decode"):
        pdb = objs[("PodDisruptionBudget", f"tandem-{role}")]["spec"]
        assert pdb["maxUnavailable"] == 1
        assert pdb["selector"]["matchLabels"]["app.kubernetes.io/component"] == role


def test_tls_secret_mounted_read_only_and_named_to_every_member():
    objs = by_kind_name(objects({"tls": {"enabled": True, "secretName": "tandem-tls", "serverName": "w.tandem"}}))
    for name in ("tandem-router", "tandem-prefill", "tandem-decode"):
        pod = objs[("Deployment", name)]["spec"]["template"]["spec"]
        assert {"name": "tls", "secret": {"secretName": "tandem-tls"}} in pod["volumes"]
        assert {"name": "tls", "mountPath": "/etc/tandem/tls", "readOnly": True} in pod["containers"][0]["volumeMounts"]
        env = {e["name"]: e.get("value") for e in pod["containers"][0]["env"]}
        assert (env["TANDEM_TLS_CERT"], env["TANDEM_TLS_KEY"], env["TANDEM_TLS_CA"], env["TANDEM_TLS_SERVER_NAME"]) == \
            ("/etc/tandem/tls/tls.crt", "/etc/tandem/tls/tls.key", "/etc/tandem/tls/ca.crt", "w.tandem")


@pytest.mark.parametrize("metrics", [True, False])
def test_tls_workers_are_probed_without_grpc(metrics):
    """The kubelet's gRPC probe cannot present a client certificate: TCP, and /health for readiness."""
    values = {"tls": {"enabled": True, "secretName": "tandem-tls"}, "workers": {"metrics": {"enabled": metrics}}}
    objs = by_kind_name(objects(values))
    c = objs[("Deployment", "tandem-decode")]["spec"]["template"]["spec"]["containers"][0]
    assert "grpc" not in c["startupProbe"] and "grpc" not in c["livenessProbe"] and "grpc" not in c["readinessProbe"]
    assert "tcpSocket" in c["livenessProbe"]
    assert ("httpGet" in c["readinessProbe"]) == metrics
    plain = by_kind_name(objects())[("Deployment", "tandem-decode")]["spec"]["template"]["spec"]["containers"][0]
    assert plain["readinessProbe"]["grpc"]["service"] == "tandem.v1.Worker"
    assert "TANDEM_TLS_CERT" not in {e["name"] for e in plain["env"]}
