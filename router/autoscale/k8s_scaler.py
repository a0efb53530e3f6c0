"""The autoscaler's actuator: replica counts of Deployments through the apps/v1 scale subresource.

    scaler = DeploymentScaler(load_api_client(), namespace="tandem")
    scaler.get_replicas("tandem-decode")                     # GET  .../deployments/NAME/scale
    scaler.set_replicas("tandem-decode", 3, expected=4)      # PATCH .../deployments/NAME/scale

Uses the official `kubernetes` client (synchronous: call it from a thread in asyncio code). The
router's ServiceAccount needs get and patch on `deployments/scale` (the chart's Role grants exactly
that). set_replicas is a compare-and-set: it reads the scale, refuses if spec.replicas is not the
`expected` count the caller decided from (someone else changed it), and patches with the read
resourceVersion as a precondition; a 409 (the Deployment changed in between, e.g. a status update)
re-reads and tries again, up to conflict_retries times. Every failure is one ScalerError subclass
with a message that says what to change; nothing here retries forever or logs tracebacks.
"""
from __future__ import annotations

import dataclasses
import json

from kubernetes import client as k8s
from kubernetes import config as k8s_config
from kubernetes.client.exceptions import ApiException
from kubernetes.config.config_exception import ConfigException
from urllib3.exceptions import HTTPError

from services import env

RBAC_HINT = ("the router's ServiceAccount needs get and patch on deployments/scale (the chart "
             "creates that Role with autoscaler.enabled=true)")
SERVICE_ACCOUNT_NAMESPACE = "/var/run/secrets/kubernetes.io/serviceaccount/namespace"


class ScalerError(Exception):
    """Base of every actuator failure; str() says what went wrong and what to change."""


class ScalerConfigError(ScalerError):
    """No usable cluster credentials (not in a pod, no kubeconfig) or a broken kubeconfig."""


class DeploymentNotFound(ScalerError):
    """404: no such Deployment in that namespace."""


class ScalePermissionDenied(ScalerError):
    """401/403: the credentials may not read or change the scale."""


class ScaleConflict(ScalerError):
    """The replica count changed under us (409 past the retries, or not the expected count)."""


class ScalerUnavailable(ScalerError):
    """The API server did not answer, or answered 429/5xx: try again later."""


@dataclasses.dataclass(frozen=True)
class Scale:
    name: str
    replicas: int
    resource_version: str


def load_api_client(kubeconfig: str | None = None, context: str | None = None,
                    retries: int = 1) -> k8s.ApiClient:
    """An ApiClient from, in order: the kubeconfig file given; the pod's ServiceAccount when
    KUBERNETES_SERVICE_HOST is set (in-cluster); $KUBECONFIG or ~/.kube/config. Raises
    ScalerConfigError when none works. retries: urllib3 retries of a failed connection."""
    cfg = k8s.Configuration()
    try:
        if kubeconfig is None and env.in_kubernetes():
            k8s_config.load_incluster_config(client_configuration=cfg)
        else:
            k8s_config.load_kube_config(config_file=kubeconfig, context=context,
                                        client_configuration=cfg, persist_config=False)
    except (ConfigException, OSError) as e:
        where = (f"kubeconfig {kubeconfig}" if kubeconfig else "the pod's ServiceAccount"
                 if env.in_kubernetes() else "$KUBECONFIG or ~/.kube/config")
        raise ScalerConfigError(f"cannot load Kubernetes credentials from {where}: {e}; run in a "
                                f"pod with a ServiceAccount or pass --autoscale-kubeconfig") from e
    cfg.retries = retries
    return k8s.ApiClient(cfg)


def default_namespace() -> str:
    """The pod's own namespace when in a pod, else "default"."""
    try:
        with open(SERVICE_ACCOUNT_NAMESPACE) as f:
            return f.read().strip() or "default"
    except OSError:
        return "default"


class DeploymentScaler:
    """Reads and sets spec.replicas of Deployments in one namespace. Thread-safe as the
    underlying ApiClient is (one call at a time is what the autoscaler does)."""

    def __init__(self, api_client: k8s.ApiClient, namespace: str, *, timeout_s: float = 10.0,
                 conflict_retries: int = 3, field_manager: str = "tandem-autoscaler"):
        if conflict_retries < 0:
            raise ValueError(f"conflict_retries must be >= 0, got {conflict_retries}")
        self.api = k8s.AppsV1Api(api_client)
        self.namespace, self.timeout_s = namespace, timeout_s
        self.conflict_retries, self.field_manager = conflict_retries, field_manager

    def read(self, name: str) -> Scale:
        """The Deployment's scale. Raises DeploymentNotFound, ScalePermissionDenied,
        ScalerUnavailable or ScalerError."""
        try:
            s = self.api.read_namespaced_deployment_scale(name, self.namespace,
                                                          _request_timeout=self.timeout_s)
        except (ApiException, HTTPError, OSError) as e:
            raise self._error(e, "read", name) from None
        return Scale(name, int(s.spec.replicas or 0), s.metadata.resource_version or "")

    def get_replicas(self, name: str) -> int:
        return self.read(name).replicas

    def set_replicas(self, name: str, replicas: int, *, expected: int | None = None) -> int:
        """Set spec.replicas to `replicas` and return it. expected: the count the caller decided
        from; if the Deployment holds another one, raise ScaleConflict without changing it. A
        no-op (no PATCH) when it already holds `replicas`. Raises ValueError for replicas < 0, and
        the errors of read() plus ScaleConflict when 409s outlast conflict_retries."""
        if replicas < 0:
            raise ValueError(f"replicas must be >= 0, got {replicas}")
        for _ in range(self.conflict_retries + 1):
            scale = self.read(name)
            if expected is not None and scale.replicas != expected:
                raise ScaleConflict(f"deployment {self.namespace}/{name} has {scale.replicas} "
                                    f"replicas, not the {expected} this decision was made from "
                                    f"(changed by someone else); not overriding it")
            if scale.replicas == replicas:
                return replicas
            body = {"metadata": {"resourceVersion": scale.resource_version},
                    "spec": {"replicas": replicas}}
            try:
                self.api.patch_namespaced_deployment_scale(
                    name, self.namespace, body, field_manager=self.field_manager,
                    _content_type="application/merge-patch+json", _request_timeout=self.timeout_s)
                return replicas
            except ApiException as e:
                if e.status != 409:
                    raise self._error(e, "patch", name) from None
            except (HTTPError, OSError) as e:
                raise self._error(e, "patch", name) from None
        raise ScaleConflict(f"deployment {self.namespace}/{name}: the scale kept changing under "
                            f"{self.conflict_retries + 1} attempts (HTTP 409 Conflict); will "
                            f"decide again")

    def _error(self, e: Exception, verb: str, name: str) -> ScalerError:
        what = f"{verb} deployments/scale {self.namespace}/{name}"
        if not isinstance(e, ApiException):
            host = self.api.api_client.configuration.host
            return ScalerUnavailable(f"cannot {what}: the Kubernetes API at {host} did not "
                                     f"answer ({type(e).__name__}: {e})")
        detail = _status_message(e)
        if e.status in (401, 403):
            return ScalePermissionDenied(f"forbidden to {what} (HTTP {e.status}: {detail}); "
                                         f"{RBAC_HINT}")
        if e.status == 404:
            return DeploymentNotFound(f"deployment {self.namespace}/{name} not found (HTTP 404: "
                                      f"{detail}); check --autoscale-namespace and the "
                                      f"--autoscale-*-deployment names")
        if e.status == 429 or (e.status or 0) >= 500:
            return ScalerUnavailable(f"cannot {what} now (HTTP {e.status}: {detail}); will retry")
        return ScalerError(f"cannot {what} (HTTP {e.status}: {detail})")


def _status_message(e: ApiException) -> str:
    """The `message` of the Status object the API server sends with an error, else the reason."""
    try:
        return json.loads(e.body)["message"]
    except (TypeError, ValueError, KeyError):
        return str(e.reason or "no details")
