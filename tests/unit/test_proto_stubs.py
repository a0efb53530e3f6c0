"""The checked-in stubs under tandem/v1 must be exactly what `make proto` generates."""
from __future__ import annotations

import glob
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_stubs_match_proto_files(tmp_path):
    pytest.importorskip("grpc_tools", reason="grpcio-tools is a dev dependency (pip install -e .[dev])")
    protos = sorted(glob.glob(os.path.join(ROOT, "proto", "tandem", "v1", "*.proto")))
    assert protos, "no .proto files under proto/tandem/v1"
    subprocess.run([sys.executable, "-m", "grpc_tools.protoc", f"-I{os.path.join(ROOT, 'proto')}",
                    f"--python_out={tmp_path}", f"--pyi_out={tmp_path}", f"--grpc_python_out={tmp_path}", *protos],
                   check=True)
    generated = sorted(os.path.relpath(p, tmp_path) for p in glob.glob(str(tmp_path / "tandem" / "v1" / "*")))
    assert generated, "protoc produced nothing"
    stale = []
    for rel in generated:
        checked_in = os.path.join(ROOT, rel)
        if not os.path.exists(checked_in) or open(checked_in, "rb").read() != (tmp_path / rel).read_bytes():
            stale.append(rel)
    assert not stale, f"stubs drifted from proto/: {stale}; run `make proto` and commit the result"


def test_stubs_import_and_expose_services():
    from tandem.v1 import admin_pb2_grpc, serving_pb2, serving_pb2_grpc, worker_pb2_grpc

    assert hasattr(serving_pb2_grpc, "ServingStub") and hasattr(worker_pb2_grpc, "WorkerStub")
    assert hasattr(admin_pb2_grpc, "AdminStub")
    req = serving_pb2.GenerateRequest(prompt="hi", params=serving_pb2.SamplingParams(max_tokens=3))
    assert serving_pb2.GenerateRequest.FromString(req.SerializeToString()) == req
