"""``envelope sweep``: one scenario against several server configurations, and one report over them.

    envelope sweep --scenario S --profile cpu-tiny --set max_num_seqs=4,8,16 --set enable_prefix_caching=true,false
    envelope sweep --scenario S --profile qwen3-8b --configs configs.yaml
    envelope sweep --scenario S --host http://box-a:8000 --host http://box-b:8000

Part of the command line (the composition root, with :mod:`envelope.cli`):
every configuration is checked before anything starts (a setting a profile
field rejects, a host that does not answer: one line, exit 2). Then, one at a
time, each configuration is launched with the profile's health wait (or its
host is used), measured with the scenario and stopped, exactly as ``envelope
run`` does, into ``OUT/<time>-sweep-<scenario>/NN-<configuration>/``. A
configuration whose server does not start is recorded with its log's last
lines and the sweep goes on. ``sweep.json`` says after every configuration what
ran (:mod:`envelope.sweep`); at the end ``analysis.sweep`` writes
``sweep.md``/``sweep.html``/``sweep.png`` and the table is printed.

Exit status: 0 when every configuration ran to completion, 1 when one failed
(to start or during its run; the report still covers the others), 2 for bad
input before anything started, 130 when interrupted (the configurations done
so far are reported).
"""

from __future__ import annotations

import argparse
import copy
import signal
import time
from pathlib import Path
from typing import Any, TextIO

from envelope.cli import processes_arg
from envelope.config import ConfigError
from envelope.usage import HELP_FORMAT, UsageError, examples, paragraph

__all__ = ["SWEEP_HELP", "SWEEP_DESCRIPTION", "add_sweep_arguments", "run_sweep"]

SWEEP_HELP = "run one scenario against several server configurations and compare their envelopes"
SWEEP_DESCRIPTION = paragraph(
    "Run the scenario once per server configuration: a profile with --set KEY=V1,V2 grids (every combination) "
    "or a --configs YAML list of settings, launching and stopping the server for each; or several running "
    "servers (--host URL, repeated). One run directory per configuration under OUT/<time>-sweep-<scenario>/, "
    "and one sweep report (sweep.md, sweep.png): per configuration the boundary with its interval, "
    "throughput and cost there, and what broke first; the best configuration for each workload.")


def add_sweep_arguments(p: argparse.ArgumentParser) -> None:
    from envelope.cli import _add_cost_arguments

    p.formatter_class = HELP_FORMAT
    p.epilog = examples(
        "envelope sweep --scenario scenarios/sweep.yaml --profile cpu-tiny --set max_num_seqs=4,16",
        "envelope sweep --scenario scenarios/capstone.yaml --profile qwen3-8b --set max_num_seqs=32,64,128 "
        "--set enable_prefix_caching=true,false --usd-per-hour 3.50",
        "envelope sweep --scenario scenarios/capstone.yaml --configs my-configs.yaml --profile qwen3-8b",
        "envelope sweep --scenario scenarios/engines.yaml --profile cpu-tiny --profile cpu-tiny-transformers "
        "--profile cpu-tiny-transformers-cb",
        "envelope sweep --scenario scenarios/capstone.yaml --host http://box-a:8000 --host http://box-b:8000")
    p.add_argument("--scenario", required=True, help="scenario YAML file (normally with a search pass)")
    p.add_argument("--profile", action="append", default=[],
                   help="server profile the configurations are made from (a name or a .yaml path); repeat it to "
                        "sweep over profiles (engines side by side), one configuration each")
    p.add_argument("--set", action="append", default=[], metavar="KEY=V1,V2",
                   help="a profile setting and its values (repeat for a grid); a key that is not a profile field "
                        "is passed to vLLM as --key-name VALUE (true/false: --key-name / --no-key-name)")
    p.add_argument("--configs", metavar="FILE",
                   help="YAML list of configurations, each a mapping of settings with an optional name")
    p.add_argument("--host", action="append", default=[], metavar="URL",
                   help="an already-running server (repeat: one configuration per server; nothing is launched)")
    p.add_argument("--quick", action="store_true", help="shortened stage durations (the scenario's quick: section)")
    p.add_argument("--duration-scale", type=float, help="scale every stage duration by this factor")
    p.add_argument("--out", default="runs", help="parent directory of the sweep directory (default: runs)")
    p.add_argument("--processes", type=processes_arg,
                   help="Locust worker processes on this machine, or 'auto' (see envelope run --help)")
    p.add_argument("--api-key-env", help="environment variable holding the API key")
    p.add_argument("--api-key-file", help="file whose first line is the API key")
    p.add_argument("--model", help="served model name (default: the scenario's, else the first listed)")
    _add_cost_arguments(p)


def _run_args(args: argparse.Namespace, *, out: Path, profile: str | None, host: str | None) -> argparse.Namespace:
    """The ``envelope run`` arguments of one configuration."""
    a = copy.copy(args)
    a.out, a.profile, a.host = str(out), profile, host
    a.expect_workers = None
    a.master_bind_host = None
    a.master_bind_port = None
    a.record_text = False
    a.no_analysis = False
    return a


def _configs(args: argparse.Namespace) -> list[Any]:
    from envelope.sweep import grid_configs, host_configs, load_config_file

    if bool(args.profile) == bool(args.host):
        raise UsageError("give --profile NAME (with --set or --configs, or repeated) or --host URL (repeated), "
                         "not both or neither")
    if args.host:
        if args.set or args.configs:
            raise UsageError("--set and --configs apply to a --profile; with --host the servers are the configurations")
        if len(args.host) < 2:
            raise UsageError("a sweep over running servers needs at least two --host URLs (one is `envelope run`)")
        return host_configs(args.host)
    if len(args.profile) > 1:
        if args.set or args.configs:
            raise UsageError("with --profile repeated the profiles are the configurations: no --set or --configs")
        from envelope.sweep import profile_configs

        return profile_configs(args.profile)
    if args.set and args.configs:
        raise UsageError("give --set grids or a --configs file, not both")
    if not args.set and not args.configs:
        raise UsageError("a sweep needs configurations: --set KEY=V1,V2 (repeatable) or --configs FILE")
    configs = load_config_file(args.configs) if args.configs else grid_configs(args.set)
    if len(configs) < 2:
        raise UsageError("a sweep needs at least two configurations (for one, use `envelope run`)")
    return configs


def _plans(args: argparse.Namespace, configs: list[Any], sweep_dir_placeholder: Path) -> list[Any]:
    """Validate every configuration as ``envelope run`` would, before anything starts."""
    from envelope.cli import _validate
    from envelope.sweep import config_dir_name

    from server.profiles import load_profile, with_overrides

    bases: dict[str, Any] = {}
    for name in args.profile:
        try:
            bases[name] = load_profile(name)
        except ConfigError as exc:
            raise UsageError(str(exc)) from None
    plans = []
    for i, c in enumerate(configs):
        name = c.profile or (args.profile[0] if args.profile else None)
        override = None
        if name is not None:
            try:
                override = with_overrides(bases[name], c.settings)
            except ConfigError as exc:
                raise UsageError(f"{c.where or '--set'}: configuration {c.label!r}: {exc}") from None
        run_args = _run_args(args, out=sweep_dir_placeholder, profile=name, host=c.host)
        plan = _validate(run_args, profile_override=override)
        plan.run_name = config_dir_name(i, c)
        plan.sweep = {"label": c.label, "settings": dict(c.settings), "index": i}
        plans.append(plan)
    return plans


def _sweep_dir(out: str, scenario_name: str, now: float) -> Path:
    from envelope.cli import run_dir_name

    parent = Path(out)
    try:
        parent.mkdir(parents=True, exist_ok=True)
        base = run_dir_name(f"sweep-{scenario_name}", now)
        path, n = parent / base, 1
        while True:
            try:
                path.mkdir()
                return path
            except FileExistsError:
                n += 1
                path = parent / f"{base}-{n}"
    except OSError as exc:
        raise UsageError(f"--out {parent}: cannot create the sweep directory ({exc.strerror or exc})") from None


def _outcome(run_dir: Path, code: int) -> tuple[str, str | None, str | None]:
    """A configuration's status, failure line and server log tail, from its run directory."""
    import json

    from envelope.rundir import RUN_FILE, RunInfo
    from server.launcher import log_tail

    try:
        info = RunInfo.from_json(json.loads((run_dir / RUN_FILE).read_text(encoding="utf-8")))
        status = str(info.status or "failed")
        failure = info.failure.splitlines()[0] if info.failure else None  # the log tail is kept apart
    except (OSError, ValueError):  # an unreadable run.json is itself the finding
        status, failure = "failed", f"run.json unreadable (exit {code})"
    tail = None
    if status == "failed" and not (run_dir / "stages.json").exists():
        tail = log_tail(run_dir / "server.log") or None
        status = "failed_to_start" if tail is not None or failure else status
    return status, failure, tail


def run_sweep(args: argparse.Namespace, *, out: TextIO, err: TextIO) -> int:
    """The whole sweep; returns the exit status (see the module docstring)."""
    from envelope.cli import EXIT_FAILED, EXIT_INTERRUPTED, EXIT_OK, _Runner
    from envelope.scenario import load_scenario
    from envelope.sweep import SweepLog

    def say(line: str) -> None:
        err.write(f"envelope: {line}\n")
        err.flush()

    try:
        configs = _configs(args)
    except ConfigError as exc:
        raise UsageError(str(exc)) from None
    try:
        scenario = load_scenario(Path(args.scenario))
    except ConfigError as exc:
        raise UsageError(str(exc)) from None
    now = time.time()
    plans = _plans(args, configs, Path(args.out))  # validated before the sweep directory exists
    sweep_dir = _sweep_dir(args.out, scenario.name, now)
    options = {k: getattr(args, k, None) for k in ("quick", "duration_scale", "processes", "model", "usd_per_hour",
                                                    "power_w", "target_users", "target_rate")}
    log = SweepLog(sweep_dir, scenario=scenario.name, scenario_path=str(args.scenario),
                   profile=", ".join(args.profile) or None,
                   configs=configs, started_unix_s=now, options=options)
    say(f"sweep directory {sweep_dir} ({len(configs)} configurations)")
    code, interrupted = EXIT_OK, False
    for plan, entry in zip(plans, log.entries):
        plan.args.out = str(sweep_dir)
        say(f"configuration {entry.run_dir}: {entry.label}")
        entry.started_unix_s = time.time()
        entry.status = "running"
        log.write()
        crash = None
        try:
            rc = _Runner(plan, out=out, err=err).run()
        except KeyboardInterrupt:  # between the runner's own signal handling: stop here
            rc = EXIT_INTERRUPTED
        except Exception as exc:  # one configuration's bug must not lose the others: record it, go on
            rc, crash = EXIT_FAILED, f"{type(exc).__name__}: {exc}"
            say(f"configuration {entry.label}: {crash}")
        entry.ended_unix_s = time.time()
        entry.exit_code = rc
        run_dir = sweep_dir / entry.run_dir
        if run_dir.is_dir():
            entry.status, entry.failure, entry.log_tail = _outcome(run_dir, rc)
        else:
            entry.status, entry.failure = "failed", f"no run directory (exit {rc})"
        if crash is not None:
            entry.status, entry.failure = "failed", crash
        log.write()
        if entry.status == "failed_to_start":
            say(f"configuration {entry.label} did not start; the sweep goes on")
        if rc == EXIT_INTERRUPTED:
            interrupted = True
            break
        if rc != EXIT_OK or entry.status != "complete":
            code = EXIT_FAILED
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)  # the report is written whatever happens now
    try:
        log.finish("partial" if interrupted or code != EXIT_OK else "complete", time.time())
        _report(sweep_dir, out=out, say=say)
    finally:
        signal.signal(signal.SIGINT, previous)
    return EXIT_INTERRUPTED if interrupted else code


def _report(sweep_dir: Path, *, out: TextIO, say: Any) -> None:
    from analysis.sweep import write_sweep_report

    try:
        summary = write_sweep_report(sweep_dir)
    except Exception as exc:  # the runs are on disk; `envelope report` and a rerun can still read them
        say(f"the sweep report could not be written: {type(exc).__name__}: {exc}")
        return
    out.write(summary.text + f"\nsweep report: {sweep_dir / 'sweep.md'}\n")
    out.flush()
