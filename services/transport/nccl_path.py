"""The ``nccl`` payload path: DATA headers go on the control socket, blocks through NCCL.

One communicator per connection, i.e. per pair of instances (prefill→decode, or decode→decode for
a migration): created when the connection is (lazily, on the first transfer to a peer), its
unique id sent in the SETUP frame over the control socket, torn down with the connection (peer
gone, failure, close). The sender is rank 0, the receiver rank 1.

Sender: ``stage`` records a marker on the compute stream (the pushed layers are queued there);
``emit`` makes the link's stream wait for it, gathers and sends, so the transfer overlaps the
rest of the prefill; the watchdog aborts the communicator if a send outlives the timeout, which
fails the connection and every transfer on it (the request then falls back to recompute).
Receiver: each frame is received and scattered, and waited for (bounded the same way) before
the reader moves on.
"""
from __future__ import annotations

import base64
import json
from collections.abc import Callable

import torch

from .base import KVLayout
from .nccl_link import NcclLink
from .paths import ReceivePath, SendPath, compute_marker
from .watchdog import Watchdog, wait


class NcclSendPath(SendPath):
    inline = False

    def __init__(self, kv: torch.Tensor, layout: KVLayout, timeout_s: float, watchdog: Watchdog,
                 on_broken: Callable[[str], None]):
        self.kv, self.layout, self.timeout_s = kv, layout, timeout_s
        self._watchdog, self._on_broken = watchdog, on_broken
        self._uid = NcclLink.new_unique_id()
        self.link: NcclLink | None = None

    def offer(self) -> str:
        return json.dumps({"nccl_id": base64.b64encode(self._uid).decode()})

    def join(self, timeout_s: float) -> None:
        self.link = NcclLink(self._uid, 2, 0, self.kv.device, init_timeout_s=timeout_s)

    def stage(self, src_block_ids, layer_start, layer_end):
        return src_block_ids, layer_start, layer_end, compute_marker(self.kv)

    def emit(self, staged):
        ids, l0, l1, marker = staged
        done = self.link.send_blocks(self.kv, ids, l0, l1, peer=1, after=marker)
        self._watchdog.watch(done, self.timeout_s, self._expired)
        return [], ""

    def _expired(self) -> None:
        self.link.abort()
        self._on_broken(f"an NCCL send did not complete within {self.timeout_s:g}s; the communicator was aborted")

    def close(self) -> None:
        if self.link is not None:
            self.link.close()


class NcclReceivePath(ReceivePath):
    def __init__(self, kv: torch.Tensor, layout: KVLayout, timeout_s: float):
        self.kv, self.layout, self.timeout_s = kv, layout, timeout_s
        self.link: NcclLink | None = None

    def accept(self, text: str) -> None:
        try:
            uid = base64.b64decode(json.loads(text)["nccl_id"])
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"malformed nccl SETUP: {e}") from e
        self.link = NcclLink(uid, 2, 1, self.kv.device, init_timeout_s=self.timeout_s)

    def receive(self, sock, header, text, dst_block_ids, scratch):
        done = self.link.recv_blocks(self.kv, dst_block_ids, header.layer_start, header.layer_end, peer=0,
                                     num_blocks=header.num_blocks)
        wait(done, self.timeout_s, self.link.abort, "an NCCL receive")

    def close(self) -> None:
        if self.link is not None:
            self.link.close()
