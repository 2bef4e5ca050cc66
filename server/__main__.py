"""``python -m server``: start, stop and probe a vLLM server; build the tiny model.

    python -m server up --profile cpu-tiny [--port N] [--run-dir DIR] [-- extra vLLM flags]
    python -m server status [--state FILE | --url URL]
    python -m server down [--state FILE]
    python -m server build-tiny-model DIR [--seed 0]

Errors print one line on stderr and exit 2 (bad input) or 1 (launch failure, with the log tail).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import NoReturn, Sequence

__all__ = ["main"]

DEFAULT_STATE = Path("runs") / ".server-state.json"


class _UsageError(Exception):
    """Bad input: exit code 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line, not argparse's usage block
        raise _UsageError(f"{message} (see: {self.prog} --help)")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m server", description="Launch and probe vLLM servers.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    up = sub.add_parser("up", help="start a server from a profile and leave it running")
    up.add_argument("--profile", required=True, help="profile name (see server/profiles/) or path to a .yaml file")
    up.add_argument("--port", type=int, default=None, help="port (default: a free one)")
    up.add_argument("--host", default="127.0.0.1")
    up.add_argument("--run-dir", default=None, help="where server.log and server.json go (default: runs/server-<time>)")
    key = up.add_mutually_exclusive_group()
    key.add_argument("--api-key-env", default=None, help="environment variable holding the API key to require")
    key.add_argument("--api-key-file", default=None, help="file whose first line is the API key to require")
    up.add_argument("--timeout", type=float, default=None, help="seconds to wait for health (default: the profile's)")
    up.add_argument("--state", default=str(DEFAULT_STATE), help=f"state file (default {DEFAULT_STATE})")
    up.add_argument("--python", default=sys.executable, help="python interpreter that has vLLM installed")

    down = sub.add_parser("down", help="stop the server started by 'up'")
    down.add_argument("--state", default=str(DEFAULT_STATE))
    down.add_argument("--grace", type=float, default=15.0, help="seconds between SIGTERM and SIGKILL")

    status = sub.add_parser("status", help="probe the server started by 'up', or any server by URL")
    status.add_argument("--state", default=str(DEFAULT_STATE))
    status.add_argument("--url", default=None)
    skey = status.add_mutually_exclusive_group()
    skey.add_argument("--api-key-env", default=None)
    skey.add_argument("--api-key-file", default=None)

    build = sub.add_parser("build-tiny-model", help="build the tiny random-weight Qwen3 model into DIR")
    build.add_argument("dir")
    build.add_argument("--seed", type=int, default=0)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; return the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    extra: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, extra = argv[:cut], argv[cut + 1 :]
    try:
        args = _parser().parse_args(argv)
    except _UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    from envelope.config import ConfigError
    from envelope.secrets import SecretError
    from server.launcher import LaunchError

    try:
        if args.command == "up":
            return _up(args, extra)
        if extra:
            raise _UsageError("extra arguments after '--' are only for 'up'")
        if args.command == "down":
            return _down(args)
        if args.command == "status":
            return _status(args)
        return _build(args)
    except (_UsageError, ConfigError, SecretError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except LaunchError as exc:
        print(f"error: {exc.summary}", file=sys.stderr)
        if exc.log_tail:
            print(f"--- last lines of the server log ---\n{exc.log_tail}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def _api_key(args: argparse.Namespace):
    from envelope.secrets import resolve_api_key

    if args.api_key_env is None and args.api_key_file is None:
        return None
    key = resolve_api_key(env_var=args.api_key_env, file=args.api_key_file)
    if args.api_key_env is not None and key is None:
        raise _UsageError(f"environment variable {args.api_key_env} is not set or empty")
    return key


def _up(args: argparse.Namespace, extra: list[str]) -> int:
    from server.launcher import VllmServer
    from server.profiles import load_profile

    profile = load_profile(args.profile)
    api_key = _api_key(args)
    if args.port is not None and not 0 <= args.port <= 65535:
        raise _UsageError(f"--port must be 0..65535 (got {args.port})")
    state_path = Path(args.state)
    if state_path.exists():
        state = _read_state(state_path)
        if _leader_alive(state):
            raise _UsageError(
                f"a server from {state_path} is still running (pid {state['pid']}, {state['base_url']}); "
                "run 'python -m server down' first or pass --state"
            )
    run_dir = Path(args.run_dir or Path("runs") / time.strftime("server-%Y%m%d-%H%M%S"))
    server = VllmServer(
        profile, run_dir=run_dir, host=args.host, port=args.port, api_key=api_key, extra_args=extra, python=args.python
    )
    print(f"starting {profile.name} (log: {server.log_path}) ...", file=sys.stderr, flush=True)
    try:
        info = server.start(timeout_s=args.timeout)
    except KeyboardInterrupt:
        server._kill_quietly()
        raise
    import psutil

    state = {
        "pid": server.pid,
        "pgid": server.pid,
        "create_time": psutil.Process(server.pid).create_time(),
        "base_url": server.base_url,
        "run_dir": str(run_dir.resolve()),
        "server_json": str(server.server_json_path.resolve()),
        "log_path": str(server.log_path.resolve()),
        "profile": profile.name,
        "api_key_set": bool(api_key),
    }
    state_path.parent.mkdir(parents=True, exist_ok=True)
    state_path.write_text(json.dumps(state, indent=2) + "\n", encoding="utf-8")
    print(f"{profile.name} ready in {info['time_to_healthy_s']:.1f} s", file=sys.stderr)
    print(server.base_url)
    print(server.server_json_path)
    return 0


def _read_state(path: Path) -> dict:
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise _UsageError(f"{path}: no state file (nothing started with 'python -m server up'?)") from None
    except (OSError, ValueError) as exc:
        raise _UsageError(f"{path}: cannot read the state file ({exc})") from None
    if not isinstance(state, dict) or not isinstance(state.get("pgid"), int):
        raise _UsageError(f"{path}: not a server state file")
    return state


def _leader_alive(state: dict) -> bool:
    import psutil

    try:
        proc = psutil.Process(state["pid"])
        # a reused pid is not our server
        return abs(proc.create_time() - state.get("create_time", 0)) < 1.0 and proc.status() != psutil.STATUS_ZOMBIE
    except (psutil.Error, KeyError, TypeError):
        return False


def _down(args: argparse.Namespace) -> int:
    from server.launcher import LaunchError
    from server.process import group_members, stop_process_group

    path = Path(args.state)
    state = _read_state(path)
    leader = _leader_alive(state)
    if not leader and not group_members(state["pgid"]):
        path.unlink(missing_ok=True)
        print(f"not running (pid {state['pid']}); removed {path}", file=sys.stderr)
        return 0
    survivors = stop_process_group(state["pgid"], grace_s=args.grace)
    if survivors:
        raise LaunchError(f"processes still alive after SIGKILL: {survivors}")
    path.unlink(missing_ok=True)
    print(f"stopped {state.get('profile', 'server')} at {state.get('base_url')} (pid {state['pid']})", file=sys.stderr)
    return 0


def _status(args: argparse.Namespace) -> int:
    from server.probe import probe_server

    url = args.url
    if url is None:
        url = _read_state(Path(args.state))["base_url"]
    info = probe_server(url, api_key=_api_key(args))
    print(json.dumps(info, indent=2))
    return 0 if info["ok"] else 1


def _build(args: argparse.Namespace) -> int:
    from server.tiny_model import TinyModelError, build_tiny_model

    out = Path(args.dir)
    if out.exists() and not out.is_dir():
        raise _UsageError(f"{out} exists and is not a directory")
    try:
        t0 = time.monotonic()
        build_tiny_model(out, seed=args.seed)
    except TinyModelError as exc:
        raise _UsageError(str(exc)) from None
    print(f"built tiny Qwen3 (seed {args.seed}) in {out} in {time.monotonic() - t0:.1f} s", file=sys.stderr)
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
