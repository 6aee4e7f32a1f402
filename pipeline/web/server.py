"""Serving the web app: in the foreground (`slowfast web`) or beside a run (`slowfast run`/`demo`)."""

from __future__ import annotations

import contextlib
import ipaddress
import os
import socket
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import uvicorn

from .app import create_app

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8080
PORT_TRIES = 20  # with `next_free`, ports DEFAULT_PORT .. +19
TOKEN_ENV = "SLOWFAST_WEB_TOKEN"


class WebError(ValueError):
    """The web app cannot be served as asked (bad address, port taken, token missing)."""


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def parse_address(value: str) -> tuple[str, int]:
    """`HOST:PORT`, `HOST`, `:PORT` or `PORT` (IPv6 as `[::1]:8080`)."""
    if value.startswith("["):
        host, _, rest = value[1:].partition("]")
        port = rest.removeprefix(":")
    elif value.count(":") == 1:
        host, port = value.split(":")
    elif value.isdigit():
        host, port = "", value
    else:
        host, port = value, ""
    try:
        number = int(port) if port else DEFAULT_PORT
    except ValueError:
        raise WebError(f"--web {value!r}: expected HOST:PORT, e.g. 127.0.0.1:8080") from None
    if not 0 <= number <= 65535:
        raise WebError(f"--web {value!r}: port {number} is out of range")
    return host or DEFAULT_HOST, number


def check_token(host: str, token: str | None) -> str | None:
    """The token to require: given or from the environment; a non-loopback bind must have one."""
    token = token or os.environ.get(TOKEN_ENV) or None
    if token is None and not is_loopback(host):
        raise WebError(f"serving on {host} (not loopback) needs a token: --token or {TOKEN_ENV}")
    return token


def bind(host: str, port: int, next_free: bool) -> socket.socket:
    """A listening socket on host:port, or on the next free port after it with `next_free`."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    last_error: OSError | None = None
    for candidate in range(port, min(port + (PORT_TRIES if next_free else 1), 65536)):
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, candidate))
            sock.listen(128)
        except OSError as exc:
            sock.close()
            last_error = exc
            continue
        sock.set_inheritable(True)
        return sock
    tried = f"ports {port}-{port + PORT_TRIES - 1}" if next_free else f"port {port}"
    raise WebError(f"cannot serve the web page on {host}, {tried}: {last_error.strerror if last_error else 'taken'}")


class _Server(uvicorn.Server):
    """Ends the open update streams first on Ctrl-C, so shutdown does not wait on them."""

    def __init__(self, config: uvicorn.Config, on_exit) -> None:
        super().__init__(config)
        self.on_exit = on_exit

    def handle_exit(self, sig: int, frame) -> None:
        self.on_exit()
        super().handle_exit(sig, frame)


@dataclass
class WebServer:
    """A uvicorn server on an already bound socket, run in a thread or in the foreground."""

    redis_url: str
    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    token: str | None = None
    next_free: bool = False

    def __post_init__(self) -> None:
        self.token = check_token(self.host, self.token)
        self.socket = bind(self.host, self.port, self.next_free)
        self.port = self.socket.getsockname()[1]
        app = create_app(self.redis_url, token=self.token, local_only=is_loopback(self.host))
        self.app = app
        config = uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=3, access_log=False)
        self.server = _Server(config, on_exit=app.state.hub.end_streams)
        self.thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/"

    def run(self) -> None:
        """Serve in this thread until Ctrl-C / SIGTERM."""
        try:
            self.server.run(sockets=[self.socket])
        except KeyboardInterrupt:
            pass  # uvicorn re-raises the Ctrl-C it handled; stopping is the expected outcome
        finally:
            self.socket.close()

    def start(self) -> WebServer:
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.socket]},
                                       name="sfs-web", daemon=True)
        self.thread.start()
        return self

    def stop(self) -> None:
        self.app.state.hub.end_streams()  # so shutdown need not wait on the open update streams
        self.server.should_exit = True
        if self.thread is not None:
            self.thread.join(timeout=10)
        self.socket.close()


@contextlib.contextmanager
def serving(redis_url: str, address: str | None, token: str | None = None) -> Iterator[WebServer | None]:
    """The web app beside a run: on `address` (HOST:PORT), or 127.0.0.1:8080 and the next free
    port when not given; `address=""` disables it."""
    if address == "":
        yield None
        return
    host, port = parse_address(address) if address else (DEFAULT_HOST, DEFAULT_PORT)
    server = WebServer(redis_url, host, port, token, next_free=address is None).start()
    try:
        yield server
    finally:
        server.stop()


def web_beside(address: str | None, token: str | None, on_url: Callable[[str], None]):
    """The `beside` context of run_pipeline serving the web page while the run lasts; its
    `url` attribute is the page's address once served. A bad address or a missing token
    raises WebError here, before anything starts."""
    if address is not None:
        check_token(parse_address(address)[0], token)

    @contextlib.contextmanager
    def beside(redis_url: str) -> Iterator[None]:
        with serving(redis_url, address, token) as server:
            on_url(server.url)
            beside.url = server.url
            yield

    beside.url = None
    return beside
