"""What the OpenAI-API and observability tests share: one 1P+1D cluster with the HTTP API, /metrics
on every process and JSON logs, serving the exported `tiny` model with a chat template added to
its tokenizer_config.json; raw HTTP helpers; Prometheus scrapes as {(name, labels): value}."""
from __future__ import annotations

import json
import os
import shutil
import socket
import urllib.error
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tandem.local_cluster import LocalCluster

# A ChatML-like template with BOS, as real models ship them (rendered by transformers in the golden test).
CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}{{ eos_token }}\n"
                 "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}")
WORKER_ARGS = ["--dtype", "float32", "--num-blocks", "400", "--max-num-batched-tokens", "64", "--log-level", "debug"]


@pytest.fixture(scope="session")
def chat_model_dir(export_named, tmp_path_factory) -> str:
    """The exported tiny model plus a chat template in tokenizer_config.json."""
    path = tmp_path_factory.mktemp("tiny-chat") / "tiny-chat"
    shutil.copytree(export_named("tiny"), path)
    config_path = path / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["chat_template"] = CHAT_TEMPLATE
    config_path.write_text(json.dumps(config))
    return str(path)


@pytest.fixture(scope="session")
def openai_cluster(chat_model_dir, tmp_path_factory):
    # Fixed pools: every request takes the P -> D path, so the metrics tests can count transfers
    # exactly (adaptive pools may serve a request whole on the decode instance: test_adaptive_pools).
    with LocalCluster(chat_model_dir, prefill=1, decode=1, http_port=0, metrics_port=0, log_format="json",
                      worker_args=WORKER_ARGS, log_dir=str(tmp_path_factory.mktemp("openai-cluster-logs")),
                      pools="fixed") as c:
        yield c


@pytest.fixture(scope="session")
def client(openai_cluster):
    """The official openai client on the shared cluster's HTTP API (no retries: errors show)."""
    import openai
    with openai.OpenAI(base_url=f"http://{openai_cluster.http_address}/v1", api_key="unused", max_retries=0) as c:
        yield c


@pytest.fixture(scope="session")
def name(chat_model_dir) -> str:
    """The model name the shared cluster serves."""
    return model_id(chat_model_dir)


def model_id(model_dir: str) -> str:
    return os.path.basename(os.path.normpath(model_dir))


def http(address: str, path: str, body: bytes | dict | None = None, method: str | None = None,
         timeout: float = 60.0) -> tuple[int, dict | str]:
    """(status, parsed JSON or text) of one request; never raises on an HTTP error status."""
    data = json.dumps(body).encode() if isinstance(body, dict) else body
    req = urllib.request.Request(f"http://{address}{path}", data=data, method=method or ("POST" if data else "GET"),
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            status, raw = r.status, r.read()
    except urllib.error.HTTPError as e:
        status, raw = e.code, e.read()
    try:
        return status, json.loads(raw)
    except ValueError:
        return status, raw.decode(errors="replace")


def open_stream(address: str, path: str, body: dict) -> socket.socket:
    """Send a POST on a raw socket (so a test can hang up mid-response); returns the socket."""
    host, port = address.rsplit(":", 1)
    payload = json.dumps(body).encode()
    sock = socket.create_connection((host, int(port)), timeout=60)
    sock.sendall(f"POST {path} HTTP/1.1\r\nHost: {address}\r\nContent-Type: application/json\r\n"
                 f"Content-Length: {len(payload)}\r\n\r\n".encode() + payload)
    return sock


def read_until(sock: socket.socket, marker: bytes) -> bytes:
    got = b""
    while marker not in got:
        chunk = sock.recv(65536)
        if not chunk:
            raise AssertionError(f"connection closed before {marker!r}: {got[-500:]!r}")
        got += chunk
    return got


def scrape(address: str) -> dict[tuple[str, tuple], float]:
    """Every sample of a /metrics page as {(sample name, sorted label items): value}."""
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=30) as r:
        text = r.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def exposed_names(address: str) -> set[str]:
    """Every series name a scrape of `address` can hold, samples or not (a labeled metric with no
    child yet still declares itself): counters as NAME_total, histograms with their suffixes."""
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=30) as r:
        text = r.read().decode()
    names = set()
    for family in text_string_to_metric_families(text):
        suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count")}.get(family.type, ("",))
        names.update(family.name + s for s in suffixes)
        names.update(s.name for s in family.samples)
    return names


def value(samples: dict, name: str, **labels) -> float:
    """The sample's value, 0 when absent; labels not given must match any value (summed)."""
    total = 0.0
    for (n, items), v in samples.items():
        if n == name and all(dict(items).get(k) == str(x) for k, x in labels.items()):
            total += v
    return total
