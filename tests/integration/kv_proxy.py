"""A real TCP proxy in front of a decode worker's KV data plane, breaking it on demand.

Start the decode worker with `--kv-port P --kv-advertise-address <proxy.address>` and the proxy
with target ("127.0.0.1", P): every prefill worker's KV then goes through it. Modes (set_mode):

    forward    every byte, both ways; connections a stall held resume
    stall N    forward N more bytes towards the receiver, then hold the rest (the sender's commit
               times out; the receiver, if caught inside a frame, times out and closes)
    drop N     forward N more bytes towards the receiver, then close every connection both ways
    refuse     close every connection and stop listening: connecting is refused until the next mode

When either end of a connection closes, the proxy closes the other end too.
"""
from __future__ import annotations

import socket
import threading


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _shutdown(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


class _Pair:
    """One proxied connection: the sender's socket and ours to the receiver."""

    def __init__(self, client: socket.socket, upstream: socket.socket):
        self.client, self.upstream = client, upstream
        self.dead = False

    def kill(self) -> None:
        self.dead = True
        _shutdown(self.client)
        _shutdown(self.upstream)


class KVProxy:
    def __init__(self, target: tuple[str, int], host: str = "127.0.0.1"):
        self.target, self.host = target, host
        self._cond = threading.Condition()
        self._mode, self._budget = "forward", 0
        self._pairs: set[_Pair] = set()
        self._threads: list[threading.Thread] = []
        self._closed = False
        self._listener: socket.socket | None = None
        self.port = 0
        self._listen()
        self.address = f"{host}:{self.port}"

    # ---- control ----------------------------------------------------------------------------
    def set_mode(self, mode: str, after_bytes: int = 0) -> None:
        """forward | stall | drop (after `after_bytes` more bytes towards the receiver) | refuse."""
        if mode not in ("forward", "stall", "drop", "refuse"):
            raise ValueError(f"mode {mode!r}: use forward, stall, drop or refuse")
        with self._cond:
            self._mode, self._budget = mode, after_bytes
            listener, pairs = self._listener, list(self._pairs)
            if mode == "refuse":
                self._listener = None
            self._cond.notify_all()
        if mode == "refuse":
            if listener is not None:
                _shutdown(listener)      # wakes accept(); connecting is refused from now on
                listener.close()
            for pair in pairs:
                pair.kill()
        elif listener is None:
            self._listen()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            listener, self._listener = self._listener, None
            pairs = list(self._pairs)
            self._cond.notify_all()
        if listener is not None:
            _shutdown(listener)
            listener.close()
        for pair in pairs:
            pair.kill()
        for t in list(self._threads):
            t.join(30)

    def __enter__(self) -> "KVProxy":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- threads ----------------------------------------------------------------------------
    def _listen(self) -> None:
        listener = socket.create_server((self.host, self.port))       # the same port again after a refuse
        self.port = listener.getsockname()[1]
        with self._cond:
            self._listener = listener
        self._start(self._accept_loop, listener)

    def _start(self, fn, *args) -> None:
        t = threading.Thread(target=fn, args=args, daemon=True, name=f"kv-proxy {fn.__name__}")
        self._threads.append(t)
        t.start()

    def _accept_loop(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return                             # refused or closed
            try:
                upstream = socket.create_connection(self.target, timeout=10)
                upstream.settimeout(None)
            except OSError:
                client.close()
                continue
            pair = _Pair(client, upstream)
            with self._cond:
                if self._closed or self._mode == "refuse":
                    client.close()
                    upstream.close()
                    continue
                self._pairs.add(pair)
            self._start(self._serve, pair)

    def _serve(self, pair: _Pair) -> None:
        up = threading.Thread(target=self._pump_up, args=(pair,), daemon=True, name="kv-proxy up")
        up.start()
        try:
            while data := pair.upstream.recv(1 << 16):        # receiver → sender: ACKs, HELLO_OK
                pair.client.sendall(data)
        except OSError:
            pass
        with self._cond:
            pair.kill()
            self._cond.notify_all()                # an up pump held by a stall sees the pair is dead
        up.join()
        with self._cond:
            self._pairs.discard(pair)
        pair.client.close()
        pair.upstream.close()

    def _pump_up(self, pair: _Pair) -> None:
        """Sender → receiver, through the fault budget."""
        try:
            while data := pair.client.recv(1 << 16):
                view = memoryview(data)
                while view:
                    n = self._allow(pair, len(view))
                    pair.upstream.sendall(view[:n])
                    view = view[n:]
        except OSError:
            pass
        with self._cond:
            pair.kill()
            self._cond.notify_all()

    def _allow(self, pair: _Pair, n: int) -> int:
        """How many of the next `n` bytes may go now; waits while stalled; raises OSError once the
        pair is dead or dropped."""
        with self._cond:
            while True:
                if pair.dead or self._closed:
                    raise OSError("connection closed by the proxy")
                if self._mode == "forward":
                    return n
                if self._budget > 0:
                    k = min(n, self._budget)
                    self._budget -= k
                    return k
                if self._mode in ("drop", "refuse"):
                    for p in self._pairs:
                        p.kill()
                    self._cond.notify_all()
                    raise OSError("connection dropped by the proxy")
                self._cond.wait()                  # stall: until the mode changes or the pair dies
