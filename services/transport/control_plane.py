"""The KV control plane: framed sockets shared by every transport (wire format in framing.py).

Sender: one pooled connection per receiver address, i.e. per pair of instances. Its HELLO states
the layout and this side's endpoint; the receiver picks the transport (selection.py) and the
connection gets the matching payload path (paths.py: ``tcp`` inline and zero-copy, ``nccl``,
``cuda_ipc``), set up once through a SETUP frame. ``push`` only stages (memoryviews of the cache,
or a compute-stream marker); the connection's writer thread emits each frame's payload and
header in push order, and its reader thread matches ACK/NACK frames to committing transfers by
request id. Receiver: a thread per accepted connection reads frames in order and hands each
DATA frame to the connection's receive path, which writes ``kv[dst_block_ids[i], l0:l1]``;
``on_commit`` callbacks run on a small pool so a slow callback does not stall the connection.
A transfer may open before the receiver expects it (the decode instance reserves while the
prefill instance already computes): its OPEN frame announces it, and the connection holds its
first DATA or COMMIT frame until ``expect`` lands, up to ``open_wait_s`` after the OPEN; then the
transfer is refused (NACK), so the sender falls back at once instead of committing partial KV.
Any failure (socket, path, watchdog) fails the connection and every transfer on it; the next
``open`` to that address reconnects with a fresh path.
"""
from .control_receiver import ControlReceiver
from .control_sender import ControlSender

__all__ = ["ControlReceiver", "ControlSender"]
