"""`/metrics` over HTTP for any component, inside its own asyncio loop (aiohttp).

    server = MetricsServer(registry, "0.0.0.0", 9091, health=lambda: worker.state == "serving")
    address = await server.start()        # "0.0.0.0:9091"; port 0 picks a free one
    ...
    await server.stop()

`/metrics` answers in the Prometheus text format, or OpenMetrics when the scraper asks for it
(Accept header); `/health` is 200 while `health()` is true, else 503. The collectors run in the
loop's thread: they only read snapshots, so a scrape never waits on an engine step.
"""
from __future__ import annotations

from collections.abc import Callable

import prometheus_client
from aiohttp import web
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder

# `_created` series double every counter and histogram and no dashboard reads them.
prometheus_client.disable_created_metrics()


def metrics_response(registry: CollectorRegistry, request: web.Request) -> web.Response:
    """The exposition of `registry` in the format the scraper's Accept header asks for."""
    encoder, content_type = choose_encoder(request.headers.get("Accept", ""))
    resp = web.Response(body=encoder(registry))
    resp.headers["Content-Type"] = content_type
    return resp


class MetricsServer:
    """An aiohttp site serving /metrics (and /health) for one registry. stop() is idempotent."""

    def __init__(self, registry: CollectorRegistry, host: str, port: int,
                 health: Callable[[], bool] | None = None):
        self.registry, self.host, self.port = registry, host, port
        self._health = health or (lambda: True)
        self._runner: web.AppRunner | None = None
        self.address = ""

    async def _metrics(self, request: web.Request) -> web.Response:
        return metrics_response(self.registry, request)

    async def _health_check(self, request: web.Request) -> web.Response:
        ok = self._health()
        return web.json_response({"status": "ok" if ok else "unavailable"}, status=200 if ok else 503)

    async def start(self) -> str:
        """Listen; returns host:port. Raises OSError naming the port when it cannot be bound."""
        app = web.Application()
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/health", self._health_check)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port, reuse_address=True)
        try:
            await site.start()
        except OSError as e:
            await self._runner.cleanup()
            self._runner = None
            raise OSError(f"cannot serve /metrics on {self.host}:{self.port} ({e.strerror or e}); "
                          f"choose another --metrics-port") from e
        port = self._runner.addresses[0][1]
        self.address = f"{self.host}:{port}"
        return self.address

    async def stop(self) -> None:
        if self._runner is not None:
            runner, self._runner = self._runner, None
            await runner.cleanup()
