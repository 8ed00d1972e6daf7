"""Running the app on uvicorn: in the foreground (slm serve) or on a background thread (tests, benchmarks)."""

from __future__ import annotations

import threading
import time

import uvicorn

from ..errors import SlmError


def uvicorn_config(app, host: str, port: int, limit_concurrency: int | None, log_level: str = "info"):
    # limit_concurrency: past this many open connections uvicorn itself answers a bare 503 before the app runs —
    # the last guard of a burst, above the app's own in-flight bound (which answers with OpenAI's error body)
    return uvicorn.Config(app, host=host, port=port, log_level=log_level, limit_concurrency=limit_concurrency,
                          timeout_keep_alive=5, access_log=False, lifespan="on")


def run(app, host: str = "127.0.0.1", port: int = 8000, limit_concurrency: int | None = None) -> None:
    """Serve until Ctrl-C (uvicorn's signal handling: finish what is running, then stop)."""
    uvicorn.Server(uvicorn_config(app, host, port, limit_concurrency)).run()


class ServerThread:
    """The app served on a background thread; port 0 picks a free loopback port (read it from .port)."""

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0, limit_concurrency: int | None = None):
        self.server = uvicorn.Server(uvicorn_config(app, host, port, limit_concurrency, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, name="slmkit-http", daemon=True)
        self.host, self.port = host, port

    def start(self, timeout: float = 30.0) -> "ServerThread":
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise SlmError(f"the server did not start on {self.host}:{self.port}")
            time.sleep(0.02)
        self.port = self.server.servers[0].sockets[0].getsockname()[1]
        return self

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()
