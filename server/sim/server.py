"""Running the simulated server: in this process's background thread, or as a child process.

``SimServer(config).start_in_thread()`` gives a base URL for tests;
``start_in_subprocess()`` runs ``python -m server.sim`` in its own process
group (so a benchmarked client does not share its GIL), logging to a file.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import orjson

from server.sim.app import SimApp
from server.sim.config import SimConfig, config_to_dict

__all__ = ["SimServer", "SimProcess", "new_event_loop", "serve"]

_API_KEY_ENV = "ENVELOPE_SIM_API_KEY"


def new_event_loop() -> asyncio.AbstractEventLoop:
    """A uvloop loop when uvloop is installed, else asyncio's default."""
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


async def _open(app: SimApp, host: str, port: int) -> asyncio.AbstractServer:
    loop = asyncio.get_running_loop()
    return await loop.create_server(app.protocol, host, port, reuse_address=True, backlog=4096)


class SimServer:
    """The simulated server on its own event loop in a background thread (or in a child process)."""

    def __init__(self, config: SimConfig | None = None, *, host: str = "127.0.0.1", port: int = 0) -> None:
        self.config = config or SimConfig()
        self.host = host
        self.port = port
        self.base_url: str | None = None
        self.app: SimApp | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    def __repr__(self) -> str:
        return f"SimServer(base_url={self.base_url!r}, config={self.config!r})"

    def start_in_thread(self, *, timeout_s: float = 10.0) -> str:
        """Start serving on a background thread; return the base URL."""
        ready = threading.Event()
        errors: list[BaseException] = []

        def run() -> None:
            loop = new_event_loop()
            self._loop = loop
            asyncio.set_event_loop(loop)
            try:
                self.app = SimApp(self.config, loop=loop)
                server = loop.run_until_complete(_open(self.app, self.host, self.port))
                self.port = server.sockets[0].getsockname()[1]
                self.base_url = f"http://{self.host}:{self.port}"
            except BaseException as exc:  # reported to the caller
                errors.append(exc)
                ready.set()
                loop.close()
                return
            ready.set()
            try:
                loop.run_forever()
            finally:
                server.close()
                self.app.close()
                loop.run_until_complete(asyncio.sleep(0))
                loop.close()

        self._thread = threading.Thread(target=run, name="sim-server", daemon=True)
        self._thread.start()
        if not ready.wait(timeout_s):
            raise RuntimeError("the simulated server did not start in time")
        if errors:
            raise errors[0]
        return self.base_url  # type: ignore[return-value]

    def call(self, fn, *args) -> None:
        """Run ``fn(*args)`` on the server's loop (thread-safe)."""
        if self._loop is not None:
            self._loop.call_soon_threadsafe(fn, *args)

    def stop(self, *, timeout_s: float = 10.0) -> None:
        """Stop the loop, drop open connections, join the thread."""
        if self._thread is None or self._loop is None:
            return
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout_s)
        self._thread = None
        self._loop = None

    def __enter__(self) -> "SimServer":
        self.start_in_thread()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start_in_subprocess(self, *, timeout_s: float = 30.0, log_path: str | os.PathLike[str] | None = None,
                            python: str = sys.executable) -> "SimProcess":
        """Run the server as ``python -m server.sim`` in a child process; return its handle."""
        return SimProcess.start(self.config, host=self.host, port=self.port, timeout_s=timeout_s,
                                log_path=log_path, python=python)


class SimProcess:
    """A child process running the simulated server: ``base_url``, ``pid``, ``log_path``, ``stop()``."""

    def __init__(self, proc: subprocess.Popen, base_url: str, log_path: Path, tmpdir: tempfile.TemporaryDirectory):
        self.proc = proc
        self.pid = proc.pid
        self.base_url = base_url
        self.log_path = log_path
        self._tmpdir = tmpdir

    def __repr__(self) -> str:
        return f"SimProcess(pid={self.pid}, base_url={self.base_url!r})"

    @classmethod
    def start(cls, config: SimConfig, *, host: str = "127.0.0.1", port: int = 0, timeout_s: float = 30.0,
              log_path: str | os.PathLike[str] | None = None, python: str = sys.executable) -> "SimProcess":
        tmpdir = tempfile.TemporaryDirectory(prefix="envelope-sim-")
        cfg_path = Path(tmpdir.name) / "sim.json"
        cfg_path.write_bytes(orjson.dumps(config_to_dict(config)))
        log = Path(log_path) if log_path else Path(tmpdir.name) / "sim.log"
        env = dict(os.environ)
        args = [python, "-m", "server.sim", "--config", str(cfg_path), "--host", host, "--port", str(port)]
        if config.api_key:
            env[_API_KEY_ENV] = config.api_key
            args += ["--api-key-env", _API_KEY_ENV]
        with open(log, "ab") as out:
            proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    env=env, start_new_session=True, cwd=str(Path(__file__).resolve().parents[2]))
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            text = log.read_text(errors="replace") if log.exists() else ""
            for line in text.splitlines():
                if line.startswith("listening on "):
                    return cls(proc, line.split(" ", 2)[2].strip(), log, tmpdir)
            if proc.poll() is not None:
                tmpdir.cleanup()
                raise RuntimeError(f"the simulated server exited with {proc.returncode}: {text[-2000:]}")
            time.sleep(0.02)
        _kill_group(proc)
        tmpdir.cleanup()
        raise RuntimeError(f"the simulated server did not report its port within {timeout_s:g} s")

    def stop(self, *, timeout_s: float = 5.0) -> int | None:
        """SIGTERM, then SIGKILL after ``timeout_s``; returns the exit status."""
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                _kill_group(self.proc)
        self._tmpdir.cleanup()
        return self.proc.returncode

    def __enter__(self) -> "SimProcess":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def serve(config: SimConfig, *, host: str = "127.0.0.1", port: int = 0, out=None) -> None:
    """Serve in the foreground until SIGTERM or SIGINT; prints ``listening on URL`` first."""
    out = out or sys.stdout
    loop = new_event_loop()
    asyncio.set_event_loop(loop)
    app = SimApp(config, loop=loop)
    server = loop.run_until_complete(_open(app, host, port))
    sock: socket.socket = server.sockets[0]
    bound_host, bound_port = sock.getsockname()[:2]
    print(f"listening on http://{bound_host}:{bound_port}", file=out, flush=True)
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, loop.stop)
    try:
        loop.run_forever()
    finally:
        server.close()
        app.close()
        loop.run_until_complete(asyncio.sleep(0))
        loop.close()
