"""``envelope server``: start, stop and probe a vLLM server; build the tiny model.

    envelope server up --profile cpu-tiny [--port N] [--run-dir DIR] [-- extra vLLM flags]
    envelope server status [--run-dir DIR | --state FILE | --url URL]
    envelope server down [--run-dir DIR | --state FILE]
    envelope server build-tiny-model DIR [--seed 0]

``up``, ``status`` and ``down`` find the server through its state file: ``--state FILE``,
else ``DIR/server-state.json`` with ``--run-dir DIR``, else ``runs/.server-state.json``;
so ``down`` given the ``--run-dir`` (or ``--state``) that ``up`` was given stops that server.

``python -m server ...`` is the same command (:func:`main`). Errors print one line on
stderr and exit 2 (bad input) or 1 (launch failure, with the log tail). Nothing heavy is
imported until a command runs, so ``--help`` is fast; never Locust or gevent.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Sequence, TextIO

from envelope.usage import HELP_FORMAT, OneLineParser, UsageError, examples, paragraph, parse_or_say

__all__ = ["main", "add_arguments", "run", "state_path", "DEFAULT_STATE", "STATE_FILE_NAME", "HELP", "DESCRIPTION"]

DEFAULT_STATE = Path("runs") / ".server-state.json"
STATE_FILE_NAME = "server-state.json"  # in the run directory, with --run-dir and no --state
HELP = "a vLLM server: up, down, status; build-tiny-model"
DESCRIPTION = paragraph("Launch vLLM servers from profiles (server/profiles/), probe them, stop them; "
                        "build the tiny test model.")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Give ``parser`` the subcommands ``up``, ``down``, ``status``, ``build-tiny-model`` and an example epilog."""
    prog = parser.prog
    parser.formatter_class = HELP_FORMAT
    parser.epilog = examples(f"{prog} up --profile cpu-tiny --run-dir runs/srv",
                             f"{prog} down --run-dir runs/srv")
    # dest is not "command": under `envelope` that names the verb ("server")
    sub = parser.add_subparsers(dest="server_command", metavar="command", required=True)

    up = sub.add_parser(
        "up", help="start a server from a profile and leave it running", formatter_class=HELP_FORMAT,
        description=paragraph("Start a vLLM server from a profile, wait until it answers, and leave it running in its own "
                    "process group. Prints the base URL, then the path of server.json. Flags after '--' go to vLLM."),
        epilog=examples(f"{prog} up --profile cpu-tiny --run-dir runs/srv",
                        f"{prog} up --profile qwen3-8b --port 8000 -- --max-num-seqs 32"))
    up.add_argument("--profile", required=True, help="profile name (see server/profiles/) or path to a .yaml file")
    up.add_argument("--port", type=int, default=None, help="port (default: a free one)")
    up.add_argument("--host", default="127.0.0.1")
    _add_location(up, run_dir_help="where server.log, server.json and the state file go "
                                   "(default: runs/server-<time>, state in runs/.server-state.json)")
    _add_key(up, "to require")
    up.add_argument("--timeout", type=float, default=None, help="seconds to wait for health (default: the profile's)")
    up.add_argument("--python", default=sys.executable, help="python interpreter that has vLLM installed")

    down = sub.add_parser(
        "down", help="stop the server started by 'up'", formatter_class=HELP_FORMAT,
        description=paragraph("Stop the server 'up' started (SIGTERM to its whole process group, SIGKILL after --grace) "
                    "and remove its state file. Give the --run-dir or --state that 'up' was given."),
        epilog=examples(f"{prog} down --run-dir runs/srv"))
    _add_location(down, run_dir_help="the --run-dir given to 'up' (its state file is there)")
    down.add_argument("--grace", type=float, default=15.0, help="seconds between SIGTERM and SIGKILL")

    status = sub.add_parser(
        "status", help="probe the server started by 'up', or any server by URL", formatter_class=HELP_FORMAT,
        description=paragraph("Probe a server (/health, /v1/models, /version, /metrics; no load) and print what it "
                    "answered as JSON. Exit 0 when it answered as expected, else 1."),
        epilog=examples(f"{prog} status --run-dir runs/srv", f"{prog} status --url http://gpu-box:8000"))
    _add_location(status, run_dir_help="the --run-dir given to 'up' (its state file is there)")
    status.add_argument("--url", default=None, help="probe this server instead of the one in the state file")
    _add_key(status, "to send")

    build = sub.add_parser(
        "build-tiny-model", help="build the tiny random-weight Qwen3 model into DIR", formatter_class=HELP_FORMAT,
        description=paragraph("Build the tiny random-weight Qwen3 model (seconds, no network) into DIR. "
                    "A cpu-tiny launch builds it when it is missing."),
        epilog=examples(f"{prog} build-tiny-model /tmp/tiny-qwen3 --seed 0"))
    build.add_argument("dir")
    build.add_argument("--seed", type=int, default=0)


def _add_location(p: argparse.ArgumentParser, *, run_dir_help: str) -> None:
    """``--run-dir`` and ``--state``: the same options on ``up``, ``down`` and ``status``."""
    p.add_argument("--run-dir", default=None, metavar="DIR", help=run_dir_help)
    p.add_argument("--state", default=None, metavar="FILE",
                   help=f"state file (default: DIR/{STATE_FILE_NAME} with --run-dir, else {DEFAULT_STATE})")


def _add_key(p: argparse.ArgumentParser, what: str) -> None:
    key = p.add_mutually_exclusive_group()
    key.add_argument("--api-key-env", default=None, help=f"environment variable holding the API key {what}")
    key.add_argument("--api-key-file", default=None, help=f"file whose first line is the API key {what}")


def state_path(args: argparse.Namespace) -> Path:
    """``--state``; else ``RUN_DIR/server-state.json`` with ``--run-dir``; else :data:`DEFAULT_STATE`."""
    if args.state:
        return Path(args.state)
    if args.run_dir:
        return Path(args.run_dir) / STATE_FILE_NAME
    return DEFAULT_STATE


def run(args: argparse.Namespace, extra: Sequence[str] = (), *, prefix: str = "error",
        out: TextIO | None = None, err: TextIO | None = None) -> int:
    """Run the parsed subcommand; return the exit code. Errors are one line starting ``prefix: ``."""
    out = out or sys.stdout
    err = err or sys.stderr
    from envelope.config import ConfigError
    from envelope.secrets import SecretError
    from server.launcher import LaunchError

    try:
        if args.server_command == "up":
            return _up(args, list(extra), out, err)
        if extra:
            raise UsageError("extra arguments after '--' are only for 'up'")
        if args.server_command == "down":
            return _down(args, err)
        if args.server_command == "status":
            return _status(args, out)
        return _build(args, out, err)
    except (UsageError, ConfigError, SecretError) as exc:
        print(f"{prefix}: {exc}", file=err)
        return 2
    except LaunchError as exc:
        print(f"{prefix}: {exc.summary}", file=err)
        if exc.log_tail:
            print(f"--- last lines of the server log ---\n{exc.log_tail}", file=err)
        return 1
    except KeyboardInterrupt:
        print(f"{prefix}: interrupted", file=err)
        return 130


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m server``: parse ``argv`` and run; return the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    extra: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, extra = argv[:cut], argv[cut + 1 :]
    parser = OneLineParser(prog="python -m server", description=DESCRIPTION + "\n(The same command as 'envelope server'.)")
    add_arguments(parser)
    args = parse_or_say(parser, argv, prefix="error: ")
    return 2 if args is None else run(args, extra)


def _api_key(args: argparse.Namespace):
    from envelope.secrets import resolve_api_key

    if args.api_key_env is None and args.api_key_file is None:
        return None
    key = resolve_api_key(env_var=args.api_key_env, file=args.api_key_file)
    if args.api_key_env is not None and key is None:
        raise UsageError(f"environment variable {args.api_key_env} is not set or empty")
    return key


def _up(args: argparse.Namespace, extra: list[str], out: TextIO, err: TextIO) -> int:
    from server.launcher import VllmServer
    from server.profiles import load_profile

    profile = load_profile(args.profile)
    api_key = _api_key(args)
    if args.port is not None and not 0 <= args.port <= 65535:
        raise UsageError(f"--port must be 0..65535 (got {args.port})")
    path = state_path(args)
    if path.exists():
        state = _read_state(path)
        if _leader_alive(state):
            raise UsageError(
                f"a server from {path} is still running (pid {state['pid']}, {state['base_url']}); "
                "run 'envelope server down' with the same --run-dir or --state first, or pass another one"
            )
    run_dir = Path(args.run_dir or Path("runs") / time.strftime("server-%Y%m%d-%H%M%S"))
    server = VllmServer(
        profile, run_dir=run_dir, host=args.host, port=args.port, api_key=api_key, extra_args=extra, python=args.python
    )
    print(f"starting {profile.name} (log: {server.log_path}) ...", file=err, flush=True)
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
    if profile.engine_nice is not None:
        # this process exits now, and the launcher's renicing thread with it: a small
        # detached process keeps the engine's new threads niced until the group is gone
        state["engine_nice_pid"] = _keep_engine_niced(server.pid, profile.engine_nice, run_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(state, indent=2) + "\n", encoding="utf-8")
    print(f"{profile.name} ready in {info['time_to_healthy_s']:.1f} s", file=err)
    print(server.base_url, file=out)
    print(server.server_json_path, file=out, flush=True)
    return 0


def _keep_engine_niced(pgid: int, nice: int, run_dir: Path) -> int:
    """Start ``python -m server.cpu_arrangement PGID NICE`` in its own session; it ends with the server's group.

    posix_spawn rather than Popen: this command exits without waiting for it.
    """
    import os

    log = str(run_dir / "engine-nice.log")
    return os.posix_spawn(
        sys.executable,
        [sys.executable, "-m", "server.cpu_arrangement", str(pgid), str(nice)],
        os.environ,
        file_actions=[
            (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
            (os.POSIX_SPAWN_OPEN, 1, log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644),
            (os.POSIX_SPAWN_DUP2, 1, 2),
        ],
        setsid=True,
    )


def _read_state(path: Path) -> dict:
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UsageError(f"{path}: no state file (nothing started with 'envelope server up'? "
                         "give the --run-dir or --state that 'up' was given)") from None
    except (OSError, ValueError) as exc:
        raise UsageError(f"{path}: cannot read the state file ({exc})") from None
    if not isinstance(state, dict) or not isinstance(state.get("pgid"), int):
        raise UsageError(f"{path}: not a server state file")
    return state


def _leader_alive(state: dict) -> bool:
    import psutil

    try:
        proc = psutil.Process(state["pid"])
        # a reused pid is not our server
        return abs(proc.create_time() - state.get("create_time", 0)) < 1.0 and proc.status() != psutil.STATUS_ZOMBIE
    except (psutil.Error, KeyError, TypeError):
        return False


def _down(args: argparse.Namespace, err: TextIO) -> int:
    from server.launcher import LaunchError
    from server.process import group_members, stop_process_group

    path = state_path(args)
    state = _read_state(path)
    leader = _leader_alive(state)
    if not leader and not group_members(state["pgid"]):
        path.unlink(missing_ok=True)
        print(f"not running (pid {state['pid']}); removed {path}", file=err)
        return 0
    survivors = stop_process_group(state["pgid"], grace_s=args.grace)
    if survivors:
        raise LaunchError(f"processes still alive after SIGKILL: {survivors}")
    path.unlink(missing_ok=True)
    print(f"stopped {state.get('profile', 'server')} at {state.get('base_url')} (pid {state['pid']})", file=err)
    return 0


def _status(args: argparse.Namespace, out: TextIO) -> int:
    from server.probe import probe_server

    url = args.url
    if url is None:
        url = _read_state(state_path(args))["base_url"]
    info = probe_server(url, api_key=_api_key(args))
    print(json.dumps(info, indent=2), file=out)
    return 0 if info["ok"] else 1


def _build(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    from server.tiny_model import TinyModelError, build_tiny_model

    target = Path(args.dir)
    if target.exists() and not target.is_dir():
        raise UsageError(f"{target} exists and is not a directory")
    try:
        t0 = time.monotonic()
        build_tiny_model(target, seed=args.seed)
    except TinyModelError as exc:
        raise UsageError(str(exc)) from None
    print(f"built tiny Qwen3 (seed {args.seed}) in {target} in {time.monotonic() - t0:.1f} s", file=err)
    print(target, file=out)
    return 0
