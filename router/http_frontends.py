"""The router's HTTP listeners, in its asyncio loop beside the gRPC server:

  --http-port     the OpenAI-compatible API (router/openai_api), which also serves /metrics and /health
  --metrics-port  /metrics and /health only (for a scrape port kept apart from client traffic)

Either may be off (None) or 0 (a free port). `start()` after the gRPC server is up; `stop()` lets
in-flight HTTP requests finish for the grace period, then cancels them (which releases what they
hold on the workers).
"""
from __future__ import annotations

import logging

from aiohttp import web

from router.openai_api.app import OpenAIApi
from router.openai_api.chat_template import ChatTemplate
from services.engine.loader import LoadedModel, resolve_model
from services.metrics_http import MetricsServer

log = logging.getLogger("tandem.router")


def chat_template_for(loaded: LoadedModel) -> ChatTemplate:
    """The chat template a model file carries (GGUF metadata), else its directory's, else the default.
    Raises ModelConfigError when the template does not compile."""
    if loaded.chat_template:
        return ChatTemplate(loaded.model_file or "the model file", loaded.chat_template, add_bos=False,
                            special_tokens=loaded.chat_template_vars)
    return ChatTemplate.for_model(loaded.model_dir)


class HttpFrontends:
    def __init__(self, router, model: str, *, host: str, http_port: int | None = None,
                 metrics_port: int | None = None, http_host: str | None = None):
        """`model` is the router's --model (the chat template comes from its file or directory).
        Raises ModelConfigError when the model's chat template does not compile."""
        self.router = router
        self.host, self.http_host = host, http_host or host
        self.http_port, self.metrics_port = http_port, metrics_port
        self.api = None
        if http_port is not None:
            self.api = OpenAIApi(router, chat_template_for(resolve_model(model, weights=False)))
        self._runner: web.AppRunner | None = None
        self._metrics: MetricsServer | None = None
        self.http_address = self.metrics_address = ""

    async def start(self, grace_s: float = 5.0) -> None:
        """Listen on the configured ports. Raises OSError naming the flag when a port is taken."""
        if self.api is not None:
            self._runner = web.AppRunner(self.api.app(), access_log=None, handler_cancellation=True,
                                         shutdown_timeout=grace_s)
            await self._runner.setup()
            try:
                await web.TCPSite(self._runner, self.http_host, self.http_port, reuse_address=True).start()
            except OSError as e:
                await self._runner.cleanup()
                self._runner = None
                raise OSError(f"cannot serve HTTP on {self.http_host}:{self.http_port} ({e.strerror or e}); "
                              f"choose another --http-port") from e
            self.http_address = f"{self.http_host}:{self._runner.addresses[0][1]}"
            log.info("OpenAI-compatible API on http://%s/v1 (chat template: %s)", self.http_address,
                     self.api.template.source)
        if self.metrics_port is not None:
            self._metrics = MetricsServer(self.router.metrics.registry, self.host, self.metrics_port)
            self.metrics_address = await self._metrics.start()
            log.info("metrics on http://%s/metrics", self.metrics_address)

    def ready_suffix(self) -> str:
        """` http=HOST:PORT metrics=HOST:PORT` for the listeners that are on (for the ready line)."""
        return "".join(f" {k}={v}" for k, v in (("http", self.http_address), ("metrics", self.metrics_address)) if v)

    async def stop(self) -> None:
        """Idempotent."""
        if self._runner is not None:
            runner, self._runner = self._runner, None
            await runner.cleanup()
        if self._metrics is not None:
            metrics, self._metrics = self._metrics, None
            await metrics.stop()
