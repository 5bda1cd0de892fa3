"""``/metrics`` over HTTP for a Prometheus registry: the one server the coordinator and the
edge agents both use (docs/architecture.md section 9). Loaded only where metrics are served."""

from __future__ import annotations

from threading import Thread
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, start_http_server


class MetricsServer:
    """``/metrics`` over HTTP on ``host:port`` for one registry (a daemon thread)."""

    def __init__(self, registry: CollectorRegistry, host: str, port: int) -> None:
        self.registry = registry
        self.host, self.port = host, port
        self._server: WSGIServer | None = None
        self._thread: Thread | None = None

    def start(self) -> None:
        """Listen; ``OSError`` (port in use) names the address. ``port`` 0 becomes the
        port chosen."""
        try:
            self._server, self._thread = start_http_server(
                self.port, addr=self.host, registry=self.registry
            )
        except OSError as err:
            raise OSError(f"metrics: cannot listen on {self.host}:{self.port}: {err}") from err
        self.port = self._server.server_port

    def stop(self) -> None:
        """Stop listening and wait for the thread (blocks up to half a second)."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._server = self._thread = None
