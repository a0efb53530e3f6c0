"""A short seeded slice of `make fuzz` (benchmarks/fuzz.py): every gRPC method of Serving, Admin
and Worker, garbage bytes on the gRPC, HTTP and KV data-plane ports, schemathesis against the
router's /openapi.json; no crash, no hang, no leak. Plus the regressions of what the fuzzer found."""
from __future__ import annotations

import json
import urllib.request

import pytest

from benchmarks import fuzz
from tandem.local_cluster import LocalCluster

pytestmark = pytest.mark.timeout(600)


def test_a_seeded_slice_finds_no_crash_hang_or_leak():
    result = fuzz.run(300, seed=0, share={"grpc": 0.6, "raw": 0.1, "http": 0.3}, log=lambda *a, **k: None)
    assert result["cases"] >= 250, result
    assert (result["crashes"], result["hangs"], result["leaks"]) == (0, 0, 0), result["examples"]
    assert set(result["by_kind"]) == {"grpc", "raw", "http"}, result["by_kind"]


def _post(url: str, body: dict):
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        return response.status, dict(response.headers), json.loads(response.read())


def test_the_openapi_document_and_odd_unknown_field_names():
    """Regression (make fuzz): an unknown field named with a newline or non-ASCII went raw into
    X-Tandem-Ignored-Fields and aiohttp dropped the connection without any response."""
    with LocalCluster("tiny", prefill=1, decode=1, pools="fixed", http_port=0) as cluster:
        base = f"http://{cluster.http_address}"
        with urllib.request.urlopen(f"{base}/openapi.json", timeout=30) as response:
            doc = json.loads(response.read())
        assert doc["openapi"].startswith("3.") and {"/v1/completions", "/v1/chat/completions",
                                                    "/v1/models"} <= set(doc["paths"])
        status, headers, body = _post(f"{base}/v1/completions",
                                      {"prompt": "hi", "max_tokens": 2, "a\nb": 1, "é": 2, "x\r\ny": 3})
        assert status == 200 and body["choices"][0]["finish_reason"] in ("length", "stop")
        assert headers["X-Tandem-Ignored-Fields"] == "a%0Ab,%C3%A9,x%0D%0Ay"
