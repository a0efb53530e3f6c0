"""gRPC server options that keep overload visible to the application (router and workers).

gRPC C-core holds each incoming call in a "pending" queue until the Python asyncio server asks
for it, and drops pending calls at random once more than `grpc.server.max_pending_requests`
(default 1,000) wait, surely past `..._hard_limit` (3,000): random early detection. The drop
reaches the client as `CANCELLED: CANCELLED` with no message and never reaches the application,
so nothing is logged or counted. A burst of 2,000 streams on one channel lost ~200 calls this way
(issue 18: "99 ended CANCELLED with no reason and no trace in the router log").

So the servers turn that drop off (limits far above any real backlog) and bound the backlog
where it can be refused with a status that says why: the router's --max-queued-requests
(RESOURCE_EXHAUSTED naming the flag, with retry-after), and per connection at the HTTP/2 layer
with `grpc.max_concurrent_streams` (a client past it waits for a free stream on its side; its
deadline still applies), which bounds the calls C-core holds for the application.
"""
from __future__ import annotations

NO_SILENT_DROP = 1 << 30                  # pending calls before C-core would drop one (never, in practice)
MAX_STREAMS_PER_CONNECTION = 16_384       # HTTP/2 streams one client connection may have open at once

SERVER_BACKLOG_OPTIONS = [
    ("grpc.server.max_pending_requests", NO_SILENT_DROP),
    ("grpc.server.max_pending_requests_hard_limit", NO_SILENT_DROP),
    ("grpc.max_concurrent_streams", MAX_STREAMS_PER_CONNECTION),
]
