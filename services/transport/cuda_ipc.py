"""The ``cuda_ipc`` payload path: two processes on one GPU (NCCL refuses two ranks on one device).

The sender exports its whole cache once per connection, in the SETUP frame, as a CUDA IPC handle
(torch's own sharing of CUDA tensors between processes: ``torch.multiprocessing.reductions``,
with every field sent as plain JSON, never pickled). The receiver maps it; after that a DATA
frame carries only the sender's block ids, and the receiver copies ``peer_kv[src, l0:l1]`` into
``kv[dst, l0:l1]`` on its own stream, waiting for the copy before it reads the next frame.
The sender waits for the compute marker of a push before it announces the frame, so the receiver
never copies layers that are still being written.
"""
from __future__ import annotations

import base64
import json

import torch
from torch.multiprocessing.reductions import rebuild_cuda_tensor, reduce_tensor

from .base import KVLayout
from .paths import ReceivePath, SendPath, compute_marker
from .staging import gather_blocks, scatter_blocks

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _b64(value: bytes | None) -> str | None:
    return None if value is None else base64.b64encode(value).decode()


def _unb64(value: str | None) -> bytes | None:
    return None if value is None else base64.b64decode(value)


def export_cache(kv: torch.Tensor) -> dict:
    """A JSON-able description of ``kv`` (a CUDA tensor) another process on the machine can map."""
    rebuild, args = reduce_tensor(kv)
    if rebuild is not rebuild_cuda_tensor:
        raise ValueError(f"cuda_ipc exports CUDA tensors; this cache is on {kv.device}")
    (_, size, stride, offset, _, dtype, device, handle, storage_bytes, storage_offset, _,
     ref_handle, ref_offset, event_handle, event_sync) = args
    return {"size": list(size), "stride": list(stride), "offset": int(offset),
            "dtype": str(dtype).removeprefix("torch."), "device": int(device), "handle": _b64(handle),
            "storage_bytes": int(storage_bytes), "storage_offset": int(storage_offset),
            "ref_handle": _b64(ref_handle), "ref_offset": int(ref_offset), "event_handle": _b64(event_handle),
            "event_sync": bool(event_sync)}


def import_cache(d: dict) -> torch.Tensor:
    """Map a cache described by ``export_cache`` (same machine). Raises ValueError when malformed."""
    try:
        return rebuild_cuda_tensor(
            torch.Tensor, torch.Size(d["size"]), tuple(d["stride"]), int(d["offset"]), torch.storage.TypedStorage,
            _DTYPES[d["dtype"]], int(d["device"]), _unb64(d["handle"]), int(d["storage_bytes"]),
            int(d["storage_offset"]), False, _unb64(d["ref_handle"]), int(d["ref_offset"]),
            _unb64(d["event_handle"]), bool(d["event_sync"]))
    except (KeyError, TypeError) as e:
        raise ValueError(f"malformed cuda_ipc SETUP: {e}") from e


class IpcSendPath(SendPath):
    inline = False

    def __init__(self, kv: torch.Tensor, layout: KVLayout):
        self.kv, self.layout = kv, layout

    def offer(self) -> str:
        return json.dumps(export_cache(self.kv))

    def stage(self, src_block_ids, layer_start, layer_end):
        return list(src_block_ids), compute_marker(self.kv)

    def emit(self, staged):
        ids, marker = staged
        marker.synchronize()            # the pushed layers are in memory before the receiver reads them
        return [], json.dumps({"src": ids})


class IpcReceivePath(ReceivePath):
    def __init__(self, kv: torch.Tensor, layout: KVLayout):
        self.kv, self.layout = kv, layout
        self.peer: torch.Tensor | None = None     # the sender's cache, mapped
        self.stream = torch.cuda.Stream(kv.device)

    def accept(self, text: str) -> None:
        try:
            peer = import_cache(json.loads(text))
        except json.JSONDecodeError as e:
            raise ValueError(f"malformed cuda_ipc SETUP: {e}") from e
        if peer.shape[1:] != self.kv.shape[1:] or peer.dtype != self.kv.dtype:    # block counts may differ
            raise ValueError(f"the sender's blocks {tuple(peer.shape[1:])} {peer.dtype} do not match this side's "
                             f"{tuple(self.kv.shape[1:])} {self.kv.dtype}")
        self.peer = peer

    def receive(self, sock, header, text, dst_block_ids, scratch):
        if dst_block_ids is None:
            return
        try:
            src = [int(b) for b in json.loads(text)["src"]]
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"a cuda_ipc DATA frame has no block ids: {e}") from e
        if len(src) != len(dst_block_ids) or any(not 0 <= b < self.peer.shape[0] for b in src):
            raise ValueError(f"a cuda_ipc DATA frame names blocks {src} for {len(dst_block_ids)} blocks "
                             f"(the sender has {self.peer.shape[0]})")
        l0, l1 = header.layer_start, header.layer_end
        with torch.cuda.stream(self.stream):
            scatter_blocks(self.kv, dst_block_ids, l0, l1, gather_blocks(self.peer, src, l0, l1))
        self.stream.synchronize()

    def close(self) -> None:
        self.peer = None
