"""``envelope``: the one front door. Its verbs:

    envelope run --scenario scenarios/capstone.yaml --profile cpu-tiny --quick
    envelope report RUN [--out DIR]          (analysis.cli; also python -m analysis RUN)
    envelope compare A B [--out DIR]         (analysis.cli; also python -m analysis --compare A B)
    envelope sweep --scenario S --profile P --set KEY=V1,V2 | --configs FILE | --host URL --host URL
                                             (envelope.sweep_cli: one run per server configuration)
    envelope server up|down|status|build-tiny-model   (server.cli; also python -m server)
    envelope sim [--port 0 ...]              (server.sim.cli; also python -m server.sim)

Each package defines its verbs' options (``add_arguments``) and runs them; this
module builds the parsers and dispatches. ``run`` lives here:

Everything is checked before anything starts (bad input: one line on stderr
naming the file:line or the flag, exit 2): the scenario, the flags, the key,
and the server. A ``--host`` is probed (reachable, key accepted, model served,
stages within its max model length; no load is sent); a ``--profile`` is
checked for the model and the length from the profile itself. The command then
creates ``OUT/<UTC yyyymmdd-HHMMSS>-<scenario>/``, owns its ``run.json``,
launches (``--profile``) or uses (``--host``) the server, records telemetry, runs Locust as a child process in its own process
group (the API key only in the child's environment, never on its command
line), shows live progress, and finally writes the report and prints the
envelope. Ctrl-C or SIGTERM stops Locust cleanly, marks the run ``partial``,
still analyses what was recorded, and exits 130. A server this command
started is always stopped.

This module is the composition root: of the core modules under ``envelope/`` it
alone imports from ``server`` and ``analysis``, and only inside functions, so
importing it stays fast (and free of Locust and gevent).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence, TextIO

from envelope.config import ConfigError
from envelope.rundir import RunInfo, RunJson, RunStatus, file_sha256, tool_versions
from envelope.secrets import DEFAULT_API_KEY_ENV, REDACTED, Secret, SecretError, redact, resolve_api_key
from envelope.usage import HELP_FORMAT, OneLineParser, UsageError, examples, paragraph

__all__ = ["main", "UsageError", "run_dir_name", "locust_command", "locust_env", "locustfile_path", "processes_arg"]

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
LOCUST_STOP_GRACE_S = 60.0  # after forwarding SIGINT: Locust stops its users and writes its CSVs


RUN_HELP = "run a scenario against a server and write the report"
RUN_DESCRIPTION = paragraph("Launch (--profile) or use (--host) a server, run the scenario with Locust, record "
                            "telemetry, and write the run directory and its report (OUT/<time>-<scenario>/report/).")

_Parser = OneLineParser  # one line on bad input, not argparse's usage block (see envelope.usage)


def _parser() -> argparse.ArgumentParser:
    """The whole ``envelope`` parser: each verb's options come from the package that runs it."""
    from analysis import cli as analysis_cli
    from server import cli as server_cli
    from server.sim import cli as sim_cli

    p = _Parser(prog="envelope", formatter_class=HELP_FORMAT,
                description="Measure the service envelope of a self-hosted LLM server.",
                epilog=examples("envelope run --scenario scenarios/capstone.yaml --profile cpu-tiny --quick",
                                "envelope report runs/20250101-120000-capstone",
                                "envelope VERB --help"))
    sub = p.add_subparsers(dest="command", title="verbs")
    _add_run_arguments(sub.add_parser("run", help=RUN_HELP, description=RUN_DESCRIPTION, formatter_class=HELP_FORMAT))
    analysis_cli.add_report_arguments(sub.add_parser("report", help=analysis_cli.REPORT_HELP,
                                                     description=analysis_cli.REPORT_DESCRIPTION))
    analysis_cli.add_compare_arguments(sub.add_parser("compare", help=analysis_cli.COMPARE_HELP,
                                                      description=analysis_cli.COMPARE_DESCRIPTION))
    from envelope import sweep_cli

    sweep_cli.add_sweep_arguments(sub.add_parser("sweep", help=sweep_cli.SWEEP_HELP,
                                                 description=sweep_cli.SWEEP_DESCRIPTION))
    server_cli.add_arguments(sub.add_parser("server", help=server_cli.HELP, description=server_cli.DESCRIPTION))
    sim_cli.add_arguments(sub.add_parser("sim", help=sim_cli.HELP, description=sim_cli.DESCRIPTION))
    return p


def _add_run_arguments(r: argparse.ArgumentParser) -> None:
    r.epilog = examples("envelope run --scenario scenarios/capstone.yaml --profile cpu-tiny --quick",
                        "envelope run --scenario scenarios/chat-mixed.yaml --host http://gpu-box:8000 "
                        "--api-key-env MY_KEY")
    r.add_argument("--scenario", required=True, help="scenario YAML file")
    r.add_argument("--profile", help="server profile to launch (a name in server/profiles/ or a .yaml path)")
    r.add_argument("--host", help="URL of an already-running OpenAI-compatible server (nothing is launched)")
    r.add_argument("--quick", action="store_true", help="shortened stage durations (the scenario's quick: section)")
    r.add_argument("--duration-scale", type=float, help="scale every stage duration by this factor")
    r.add_argument("--out", default="runs", help="parent directory of the run directory (default: runs)")
    r.add_argument("--processes", type=processes_arg,
                   help="Locust worker processes on this machine, or 'auto': as many as the scenario's peak streams "
                        "or rate need by the per-process budget (envelope/client_budget.json), up to the cores "
                        "(default: auto when the peak needs more than one process, else one process)")
    r.add_argument("--expect-workers", type=int,
                   help="run as the master of N Locust workers started elsewhere "
                        "(locust -f locustfiles/llm.py --worker --master-host THIS-HOST)")
    r.add_argument("--master-bind-host", help="with --expect-workers: the interface workers connect to (default: all)")
    r.add_argument("--master-bind-port", type=int, help="with --expect-workers: the port workers connect to (default 5557)")
    r.add_argument("--api-key-env", help=f"environment variable holding the API key (default {DEFAULT_API_KEY_ENV})")
    r.add_argument("--api-key-file", help="file whose first line is the API key")
    r.add_argument("--model", help="served model name (default: the scenario's, else the first listed)")
    r.add_argument("--record-text", action="store_true",
                   help="store prompt and completion text in the records (off by default)")
    r.add_argument("--tokenizer", metavar="DIR",
                   help="the served model's tokenizer directory, for a server without /tokenize or usage "
                        "(default: the model's own directory when it is on this machine)")
    r.add_argument("--count-tokens", choices=("server", "tokenizer"),
                   help="server (default): tokens from the server's usage, the tokenizer only where it gives none; "
                        "tokenizer: count every request with the local tokenizer, as client-side tools do, "
                        "the server's usage kept beside it")
    r.add_argument("--no-analysis", action="store_true", help="do not write the report at the end")
    _add_cost_arguments(r)


def _add_cost_arguments(r: argparse.ArgumentParser) -> None:
    g = r.add_argument_group("cost and capacity (recorded in run.json; the report prices the run with them)")
    g.add_argument("--usd-per-hour", type=float,
                   help="what the server box costs per hour, in US dollars (default: the profile's usd_per_hour)")
    g.add_argument("--power-w", type=float,
                   help="the box's power draw in watts, for energy per token where NVML does not measure it")
    g.add_argument("--target-users", type=float,
                   help="plan capacity for this many concurrent users (default: 10x the tested boundary)")
    g.add_argument("--target-rate", type=float,
                   help="plan capacity for this many requests/s (default: 10x the tested boundary)")


def _check_cost_arguments(args: argparse.Namespace) -> None:
    for flag in ("usd_per_hour", "power_w", "target_users", "target_rate"):
        value = getattr(args, flag, None)
        if value is not None and not (value > 0 and value != float("inf")):
            raise UsageError(f"--{flag.replace('_', '-')} must be a positive number (got {value:g})")


# --------------------------------------------------------------------------- pure pieces


def processes_arg(text: str) -> int | str:
    """``--processes``: a number (checked later: at least 1) or ``auto``."""
    if text.strip().lower() == "auto":
        return "auto"
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid value {text!r}: a number of processes or 'auto'") from None


def run_dir_name(scenario_name: str, now_unix_s: float) -> str:
    """``<UTC yyyymmdd-HHMMSS>-<scenario name>``."""
    return time.strftime("%Y%m%d-%H%M%S", time.gmtime(now_unix_s)) + f"-{scenario_name}"


def locustfile_path() -> Path:
    """``llm.py`` of the installed ``locustfiles`` package, found without importing it (no gevent here)."""
    spec = importlib.util.find_spec("locustfiles")
    if spec is None or not spec.submodule_search_locations:
        raise UsageError("the locustfiles package is not installed (pip install -e .)")
    return Path(list(spec.submodule_search_locations)[0]) / "llm.py"


def locust_command(
    *,
    locustfile: Path,
    scenario: Path,
    host: str,
    run_dir: Path,
    quick: bool = False,
    duration_scale: float | None = None,
    processes: int | None = None,
    expect_workers: int | None = None,
    master_bind_host: str | None = None,
    master_bind_port: int | None = None,
    model: str | None = None,
    record_text: bool = False,
    tokenizer: str | None = None,
    count_tokens: str | None = None,
    python: str = sys.executable,
) -> list[str]:
    """Locust's argv. It never carries the API key: that goes in the environment (:func:`locust_env`)."""
    argv = [
        python, "-m", "locust", "-f", str(locustfile), "--headless",
        "--scenario", str(scenario), "--host", host, "--run-dir", str(run_dir),
        "--csv", str(run_dir / "locust" / "locust"), "--html", str(run_dir / "locust" / "report.html"),
        "--only-summary",
        # failed requests are findings (the report counts them), not a reason for a non-zero exit
        "--exit-code-on-error", "0",
    ]
    if quick:
        argv.append("--quick")
    if duration_scale is not None:
        argv += ["--duration-scale", repr(float(duration_scale))]
    if processes is not None:
        argv += ["--processes", str(processes)]
    if expect_workers is not None:
        # the master of workers on other hosts; it gives up (exit 1) if they have not all come in 10 minutes
        argv += ["--master", "--expect-workers", str(expect_workers), "--expect-workers-max-wait", "600"]
        if master_bind_host:
            argv += ["--master-bind-host", master_bind_host]
        if master_bind_port is not None:
            argv += ["--master-bind-port", str(master_bind_port)]
    if model:
        argv += ["--model", model]
    if record_text:
        argv.append("--record-text")
    if tokenizer:
        argv += ["--tokenizer", str(tokenizer)]
    if count_tokens:
        argv += ["--count-tokens", count_tokens]
    return argv


def locust_env(api_key: Secret | None, base: dict[str, str] | None = None) -> dict[str, str]:
    """The child's environment: ``base`` (default ``os.environ``) with ``ENVELOPE_API_KEY`` set to the key, or removed."""
    env = dict(os.environ if base is None else base)
    env.pop(DEFAULT_API_KEY_ENV, None)
    if api_key:
        env[DEFAULT_API_KEY_ENV] = api_key.get()
    return env


# --------------------------------------------------------------------------- validation


@dataclass
class _Plan:
    """Everything validated, before anything starts."""

    args: argparse.Namespace
    scenario_path: Path
    scenario_name: str
    planned_stages: list[Any]
    profile: Any = None
    api_key: Secret | None = None
    server_info: dict[str, Any] | None = None  # --host: the probe made while validating
    processes: int | None = None  # Locust's --processes (None: one process, or workers elsewhere)
    process_choice: Any = None  # envelope.client_budget.ProcessChoice, when the auto rule decided
    run_name: str | None = None  # the run directory's name (default: <time>-<scenario>)
    sweep: dict[str, Any] | None = None  # a sweep's configuration: recorded in run.json's options
    extra: dict[str, Any] = field(default_factory=dict)
    launched_model: str | None = None  # the model name a launched server answers to, when it does not list it


def _validate(args: argparse.Namespace, *, profile_override: Any = None) -> _Plan:
    """Check everything before anything starts; ``profile_override``: a ready profile (a sweep's configuration)."""
    from envelope.scenario import load_scenario

    path = Path(args.scenario)
    try:
        scenario = load_scenario(path)
    except ConfigError as exc:
        raise UsageError(str(exc)) from None
    if args.duration_scale is not None and not args.duration_scale > 0:
        raise UsageError(f"--duration-scale must be positive (got {args.duration_scale:g})")
    if isinstance(args.processes, int) and args.processes < 1:
        raise UsageError(f"--processes must be at least 1 (got {args.processes})")
    if args.expect_workers is not None:
        if args.expect_workers < 1:
            raise UsageError(f"--expect-workers must be at least 1 (got {args.expect_workers})")
        if args.processes is not None:
            raise UsageError("give --processes (workers on this machine) or --expect-workers (workers elsewhere), "
                             "not both")
    elif args.master_bind_host or args.master_bind_port is not None:
        raise UsageError("--master-bind-host and --master-bind-port need --expect-workers N")
    if args.master_bind_port is not None and not 0 < args.master_bind_port < 65536:
        raise UsageError(f"--master-bind-port must be a TCP port, 1-65535 (got {args.master_bind_port})")
    try:
        stages = scenario.resolve(quick=args.quick, duration_scale=args.duration_scale)
    except (ConfigError, ValueError) as exc:
        raise UsageError(f"{path}: {exc}") from None
    if bool(args.profile) == bool(args.host):
        raise UsageError("give exactly one of --profile NAME (launch a server) or --host URL (use a running one)")
    if args.host and not args.host.startswith(("http://", "https://")):
        raise UsageError(f"--host must be an http:// or https:// URL (got {args.host!r})")
    if args.api_key_env and args.api_key_file:
        raise UsageError("give at most one of --api-key-env and --api-key-file")
    _check_cost_arguments(args)
    tokenizer = getattr(args, "tokenizer", None)
    if tokenizer:
        from envelope.tokenizer import find_local_tokenizer

        if find_local_tokenizer([tokenizer]) is None:
            raise UsageError(f"--tokenizer {tokenizer}: not a directory with a tokenizer "
                             f"(tokenizer.json or tokenizer_config.json)")
    profile = profile_override
    if args.profile and profile is None:
        from server.profiles import load_profile

        try:
            profile = load_profile(args.profile)
        except ConfigError as exc:
            raise UsageError(str(exc)) from None
    try:
        key = resolve_api_key(env_var=args.api_key_env, file=args.api_key_file)
    except SecretError as exc:
        raise UsageError(str(exc)) from None
    if args.api_key_env and key is None:
        raise UsageError(f"--api-key-env {args.api_key_env}: the variable is not set or empty")
    plan = _Plan(args=args, scenario_path=path, scenario_name=scenario.name, planned_stages=stages,
                 profile=profile, api_key=key)
    plan.processes, plan.process_choice = _choose_processes(args, stages, server_here=profile is not None)
    if profile is not None:
        # what the launched server will serve is known now: no need to wait for vLLM to find out
        if profile.served_model_name is not None:  # transformers serve answers to its model's path
            _check_model(plan, scenario, f"profile {profile.name}", [profile.served_model_name])
        _check_length(plan, scenario, f"profile {profile.name}", profile.max_model_len)
    else:
        plan.server_info = _preflight_host(plan, scenario)
    return plan


def _choose_processes(args: argparse.Namespace, stages: Sequence[Any], *, server_here: bool) -> tuple[int | None, Any]:
    """Locust's ``--processes`` for this run, and the auto rule's choice when it decided (see
    :mod:`envelope.client_budget`): an explicit number wins; workers elsewhere (``--expect-workers``)
    are the user's arrangement; otherwise auto, used when asked or when the peak needs more than one."""
    if args.expect_workers is not None or isinstance(args.processes, int):
        return (args.processes if isinstance(args.processes, int) else None), None
    from envelope.client_budget import choose_processes, load_generator_cores, scenario_peak

    peak = scenario_peak(stages)
    try:
        choice = choose_processes(peak_streams=peak.streams, peak_rate_per_s=peak.rate_per_s,
                                  cores=load_generator_cores(server_here=server_here))
    except ValueError as exc:  # the stored budget is unreadable
        raise UsageError(str(exc)) from None
    if args.processes is None and choice.needed <= 1:
        return None, None  # one process does it: nothing to choose
    return choice.locust_processes, choice


def _key_source(args: argparse.Namespace) -> str:
    if args.api_key_file:
        return f"--api-key-file {args.api_key_file}"
    return args.api_key_env or DEFAULT_API_KEY_ENV


def _preflight_host(plan: _Plan, scenario: Any) -> dict[str, Any]:
    """Probe ``--host`` before anything starts; a server that cannot take the scenario is bad input.

    Only ``/health``, ``/v1/models``, ``/version`` and ``/metrics`` are asked: no load.
    """
    from server.probe import probe_server

    args = plan.args
    info = probe_server(args.host, api_key=plan.api_key)
    url = info["base_url"]
    health, models = info.get("health"), info.get("models_status")
    if isinstance(health, str) and isinstance(models, str):  # "error: ConnectError" and the like
        raise UsageError(f"--host {url}: cannot reach the server ({health.removeprefix('error: ')})")
    if models in (401, 403):
        if plan.api_key is None:
            raise UsageError(f"--host {url}: the server wants an API key (GET /v1/models answered HTTP {models}); "
                             f"set {DEFAULT_API_KEY_ENV} or pass --api-key-env / --api-key-file")
        raise UsageError(f"--host {url}: the server rejected the API key from {_key_source(args)} "
                         f"(GET /v1/models answered HTTP {models})")
    if models != 200:
        what = f"answered HTTP {models}" if isinstance(models, int) else f"failed ({models.removeprefix('error: ')})"
        if health == 200 and (args.model or scenario.model):
            # it is up, and the model is named: a server that does not list what it serves (transformers
            # serve lists its download cache); the probe before load learns what else it lacks
            return info
        raise UsageError(f"--host {url}: GET /v1/models {what}; is this an OpenAI-compatible server? "
                         f"(if it serves a model it does not list, name it with --model)")
    names = [n for n in info.get("served_model_names") or [] if n]
    if not names:
        raise UsageError(f"--host {url}: the server lists no models (GET /v1/models)")
    model = _check_model(plan, scenario, url, names)
    if info.get("max_model_len") and (model is None or model == info.get("served_model_name")):
        _check_length(plan, scenario, url, int(info["max_model_len"]))
    return info


def _check_model(plan: _Plan, scenario: Any, server: str, names: list[str]) -> str | None:
    """The model the run will ask for, when named; raise naming ``--model`` or the scenario's line if not served."""
    served = ", ".join(names)
    if plan.args.model:
        if plan.args.model not in names:
            raise UsageError(f"--model {plan.args.model}: not served by {server} (it serves: {served})")
        return plan.args.model
    if scenario.model:
        if scenario.model not in names:
            raise UsageError(f"{_where(plan.scenario_path, ('model',))}: model {scenario.model!r} is not served "
                             f"by {server} (it serves: {served}; or pass --model)")
        return scenario.model
    return None


def _check_length(plan: _Plan, scenario: Any, server: str, max_model_len: int) -> None:
    """Raise, naming the first stage's line, when a stage's requests cannot fit ``max_model_len``."""
    from envelope.scenario import check_against_server

    problems = check_against_server(scenario, max_model_len=max_model_len)
    if not problems:
        return
    first = problems[0]
    at: tuple[str | int, ...] = ()
    position: dict[int, int] = {}  # pass index -> stages of that pass seen so far
    for stage in scenario.resolve():
        n = position[stage.pass_index] = position.get(stage.pass_index, -1) + 1
        # the problem names its stage as "pass 'p', stage 's'" (envelope.scenario.check_against_server)
        if first.startswith(f"pass {stage.pass_name!r}, stage {stage.name!r}"):
            at = ("passes", stage.pass_index, "stages", n)
            break
    more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
    raise UsageError(f"{_where(plan.scenario_path, at)}: {first} ({server}){more}")


def _where(path: Path, at: tuple[str | int, ...]) -> str:
    from envelope.config import find_line

    line = find_line(path, at) if at else None
    return f"{path}:{line}" if line else str(path)


# --------------------------------------------------------------------------- the run


class _Interrupt:
    """Signal state: before Locust runs a signal raises KeyboardInterrupt; while it runs, it is noted."""

    def __init__(self) -> None:
        self.count = 0
        self.deferred = False
        self.signal_name = ""

    def __call__(self, signum: int, _frame: Any) -> None:
        self.count += 1
        self.signal_name = signal.Signals(signum).name
        if not self.deferred:
            raise KeyboardInterrupt


class _Runner:
    def __init__(self, plan: _Plan, *, out: TextIO, err: TextIO) -> None:
        self.plan = plan
        self.args = plan.args
        self.out = out
        self.err = err
        self.run_dir: Path | None = None
        self.run_json: RunJson | None = None  # this command owns run.json
        self.interrupt = _Interrupt()
        self.server: Any = None  # the VllmServer this command launched

    def say(self, line: str) -> None:
        self.err.write(f"envelope: {redact(line, [self.plan.api_key])}\n")
        self.err.flush()

    # -- run directory --

    def create_run_dir(self) -> Path:
        out = Path(self.args.out)
        now = time.time()
        base = self.plan.run_name or run_dir_name(self.plan.scenario_name, now)
        try:
            out.mkdir(parents=True, exist_ok=True)
            run_dir = out / base
            n = 1
            while True:
                try:
                    run_dir.mkdir()
                    break
                except FileExistsError:
                    n += 1
                    run_dir = out / f"{base}-{n}"
        except OSError as exc:
            raise UsageError(f"--out {out}: cannot create the run directory ({exc.strerror or exc})") from None
        self.run_dir = run_dir
        args = self.args
        info = RunInfo(
            run_id=run_dir.name,
            status=RunStatus.RUNNING,
            scenario_path=str(self.plan.scenario_path),
            scenario_sha256=file_sha256(self.plan.scenario_path),
            quick=bool(args.quick),
            options={
                "host": args.host,
                "profile": args.profile,
                "duration_scale": args.duration_scale,
                "processes": self.plan.processes,
                "processes_requested": args.processes,
                "processes_auto": (self.plan.process_choice.describe()
                                   if self.plan.process_choice is not None else None),
                "expect_workers": args.expect_workers,
                "master_bind_host": args.master_bind_host,
                "master_bind_port": args.master_bind_port,
                "model": args.model,
                "out": str(args.out),
                "api_key": REDACTED if self.plan.api_key else None,
                "api_key_env": args.api_key_env,
                "api_key_file": args.api_key_file,
                "record_text": bool(args.record_text),
                "tokenizer": getattr(args, "tokenizer", None),
                "count_tokens": getattr(args, "count_tokens", None),
                "no_analysis": bool(args.no_analysis),
                "usd_per_hour": getattr(args, "usd_per_hour", None),
                "power_w": getattr(args, "power_w", None),
                "target_users": getattr(args, "target_users", None),
                "target_rate_per_s": getattr(args, "target_rate", None),
                **({"sweep": self.plan.sweep} if self.plan.sweep is not None else {}),
            },
            versions=tool_versions(),
            planned_stages=len(self.plan.planned_stages),
            started_unix_s=now,
            written_by="envelope run",
        )
        self.run_json = RunJson(run_dir)
        self.run_json.create(info, scenario_path=self.plan.scenario_path)
        return run_dir

    def finish_run_json(self, status: str, **extra: Any) -> None:
        if self.run_json is None:
            return
        self.run_json.update(status=RunStatus(status), ended_unix_s=time.time(), **extra)

    # -- the whole thing --

    def run(self) -> int:
        choice = self.plan.process_choice
        if choice is not None:
            self.say(f"--processes auto: {choice.describe()}")
            if choice.warning():
                self.say(f"warning: {choice.warning()}")
        run_dir = self.create_run_dir()
        self.say(f"run directory {run_dir}")
        previous = {s: signal.signal(s, self.interrupt) for s in (signal.SIGINT, signal.SIGTERM)}
        status, code, locust_rc = "failed", EXIT_FAILED, None
        try:
            try:
                base_url = self._server(run_dir)
            except _LaunchFailed as exc:
                self.say(str(exc))
                self.finish_run_json("failed", failure=str(exc))
                return EXIT_FAILED
            locust_rc = self._load(run_dir, base_url)
            status, code = self._verdict(run_dir, locust_rc)
        except KeyboardInterrupt:
            status, code = "partial", EXIT_INTERRUPTED
            self.say(f"interrupted ({self.interrupt.signal_name or 'SIGINT'}) before the load started")
        finally:
            self.interrupt.deferred = True  # a signal now must not cut the clean-up short
            try:
                if self.server is not None and self.server.pid is not None:
                    self.say("stopping the server")
                    try:
                        self.server.stop()
                    except Exception as exc:  # LaunchError: something survived SIGKILL
                        self.say(f"stopping the server: {exc}")
            finally:
                self.finish_run_json(status, locust_exit_code=locust_rc)
                for s, handler in previous.items():
                    signal.signal(s, handler)
        if self.interrupt.count and code == EXIT_OK:
            code = EXIT_INTERRUPTED
        if not self.args.no_analysis:
            self._analyse(run_dir)
        else:
            self.out.write(f"run directory: {run_dir}\n")
        return code

    def _server(self, run_dir: Path) -> str:
        """Launch or probe the server; returns its base URL. ``self.server`` is set before the launch."""
        if self.plan.profile is not None:
            from server.launcher import LaunchError, VllmServer

            server = self.server = VllmServer(self.plan.profile, run_dir=run_dir, api_key=self.plan.api_key)
            engine = "vLLM" if self.plan.profile.engine == "vllm" else "transformers serve"
            self.say(f"launching {engine} (profile {self.plan.profile.name}); log: {server.log_path}")
            try:
                info = server.start()
            except LaunchError as exc:
                raise _LaunchFailed(redact(str(exc), [self.plan.api_key])) from None
            self.say(f"{engine} ready at {server.base_url} after {info.get('time_to_healthy_s')} s")
            if self.plan.profile.engine != "vllm" and not self.args.model:
                # a server that does not list what it serves: the launcher knows the name it answers to
                self.plan.launched_model = info.get("served_model_name")
            return server.base_url
        from server.probe import probe_server

        from server.server_json import write_server_json

        info = write_server_json(run_dir, self.plan.server_info or probe_server(self.args.host, api_key=self.plan.api_key))
        if not info.get("ok"):
            self.say(f"warning: {info['base_url']} did not answer as expected "
                     f"(/health: {info.get('health')}, /v1/models: {info.get('models_status')})")
        return info["base_url"]

    def _load(self, run_dir: Path, base_url: str) -> int:
        """Telemetry, Locust and the progress display; returns Locust's exit code."""
        from envelope.progress import ProgressDisplay
        from envelope.telemetry import GpuSampler, HostSampler, MetricsSampler, TelemetryRecorder

        args = self.args
        argv = locust_command(locustfile=locustfile_path(), scenario=self.plan.scenario_path.resolve(),
                              host=base_url, run_dir=run_dir.resolve(), quick=args.quick,
                              duration_scale=args.duration_scale, processes=self.plan.processes,
                              expect_workers=args.expect_workers, master_bind_host=args.master_bind_host,
                              master_bind_port=args.master_bind_port,
                              model=args.model or self.plan.launched_model,
                              record_text=args.record_text, tokenizer=getattr(args, "tokenizer", None),
                              count_tokens=getattr(args, "count_tokens", None))
        (run_dir / "locust").mkdir(exist_ok=True)
        log_path = run_dir / "locust" / "locust.log"
        proc: subprocess.Popen[bytes] | None = None
        recorder = TelemetryRecorder(
            run_dir / "telemetry",
            {"metrics": MetricsSampler(base_url + "/metrics"), "gpu": GpuSampler(),
             "host": HostSampler(lambda: _tree_pids(proc.pid if proc is not None else None))},
            interval_s=1.0,
        )
        display = ProgressDisplay(run_dir, stream=self.out, tty=self.out.isatty())
        recorder.start()
        try:
            self.interrupt.deferred = True
            with open(log_path, "wb") as log:
                proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                        env=locust_env(self.plan.api_key), start_new_session=True)
            self.say(f"Locust started (pid {proc.pid}); log: {log_path}")
            display.start()
            try:
                rc = self._watch(proc, display)
            finally:
                display.stop()
        finally:
            if proc is not None and proc.poll() is None:  # an exception in our own loop
                _stop_group(proc, grace_s=10.0)
            recorder.stop()
        if rc != 0 and not self.interrupt.count:
            self._surface_locust_errors(log_path, rc)
        return rc

    def _watch(self, proc: subprocess.Popen[bytes], display: Any) -> int:
        forwarded_at: float | None = None
        seen = 0
        while True:
            try:
                rc = proc.wait(timeout=0.5)
                display.update(force=True)
                return rc
            except subprocess.TimeoutExpired:
                pass
            display.update()
            if self.interrupt.count > seen:
                seen = self.interrupt.count
                if forwarded_at is None:
                    self.say(f"{self.interrupt.signal_name}: stopping Locust (it writes its statistics first)")
                    _signal_group(proc.pid, signal.SIGINT)
                    forwarded_at = time.monotonic()
                else:  # asked twice: do not wait any longer
                    self.say("stopping Locust now")
                    _stop_group(proc, grace_s=5.0)
            if forwarded_at is not None and time.monotonic() - forwarded_at > LOCUST_STOP_GRACE_S:
                self.say(f"Locust did not stop within {LOCUST_STOP_GRACE_S:g} s; terminating it")
                _stop_group(proc, grace_s=10.0)

    def _surface_locust_errors(self, log_path: Path, rc: int) -> None:
        try:
            lines = log_path.read_text(encoding="utf-8", errors="replace").splitlines()
        except OSError:
            lines = []
        ours = [line for line in lines if line.startswith("envelope: ")]
        self.say(f"Locust exited with code {rc} (log: {log_path})")
        for line in ours or [f"  {line}" for line in lines[-10:]]:
            self.err.write(redact(line, [self.plan.api_key]) + "\n")
        self.err.flush()

    def _verdict(self, run_dir: Path, locust_rc: int) -> tuple[str, int]:
        if self.interrupt.count:
            return "partial", EXIT_INTERRUPTED
        if locust_rc == 0 and schedule_completed(run_dir, self.plan.planned_stages):
            return "complete", EXIT_OK
        if locust_rc == 0:
            self.say("Locust exited before the schedule ran to its end")
            return "partial", EXIT_FAILED
        no_load = not (run_dir / "stages.json").exists()
        return ("failed" if no_load else "partial"), (EXIT_USAGE if locust_rc == 2 else EXIT_FAILED)

    def _analyse(self, run_dir: Path) -> None:
        from analysis.load import RunDirError, load_run
        from analysis.report import summary_lines, write_report
        from analysis.table import envelope_table

        try:
            run = load_run(run_dir)
        except RunDirError as exc:
            self.say(f"no analysis: {exc}")
            self.out.write(f"run directory: {run_dir}\n")
            return
        if run.frame.empty:
            self.say("no requests were recorded; the report says what is missing")
        rows = envelope_table(run)
        write_report(run, run_dir / "report", rows=rows)
        # the same headline as `envelope report`: partial or not, the envelope, what broke, failures
        lines = summary_lines(run, rows) + [f"report: {run_dir / 'report' / 'envelope.md'}"]
        self.out.write("\n".join(lines) + "\n")
        self.out.flush()


class _LaunchFailed(Exception):
    """The server could not be launched; ``str()`` is what to print."""


def schedule_completed(run_dir: Path, planned_stages: Sequence[Any], *, slack_s: float = 2.0) -> bool:
    """True when ``stages.json`` lists every planned stage, each ended, the last one after its full duration."""
    from envelope.stages import read_stages, schedule_completed as completed

    try:
        return completed(read_stages(run_dir), planned_stages, slack_s=slack_s)
    except (OSError, ValueError):
        return False


def _tree_pids(pid: int | None) -> list[int]:
    """``pid`` and its descendants (Locust's master and workers)."""
    if pid is None:
        return []
    import psutil

    try:
        root = psutil.Process(pid)
        return [pid] + [c.pid for c in root.children(recursive=True)]
    except psutil.Error:
        return []


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _stop_group(proc: subprocess.Popen[bytes], *, grace_s: float) -> None:
    from server.process import stop_process_group

    stop_process_group(proc.pid, grace_s=grace_s)
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        pass


def main(argv: Sequence[str] | None = None, *, out: TextIO | None = None, err: TextIO | None = None) -> int:
    """Run the CLI; returns the exit status (0 ok, 1 failed, 2 bad input, 130 interrupted)."""
    out = out or sys.stdout
    err = err or sys.stderr
    argv = list(sys.argv[1:] if argv is None else argv)
    extra: list[str] = []
    if "--" in argv:  # `envelope server up ... -- VLLM FLAGS`: the rest is vLLM's
        cut = argv.index("--")
        argv, extra = argv[:cut], argv[cut + 1 :]
    try:
        parser = _parser()
        args, unknown = parser.parse_known_args(argv)
        if unknown:  # argparse would name the top parser; name the verb's, whose --help lists its options
            verb = " ".join(filter(None, ["envelope", args.command, getattr(args, "server_command", None)]))
            raise UsageError(f"unrecognized arguments: {' '.join(unknown)} (see: {verb} --help)")
        if args.command is None:
            err.write(parser.format_usage().replace("\n", " ").strip() + " (see: envelope --help)\n")
            return EXIT_USAGE
        if extra and args.command != "server":
            raise UsageError(f"extra arguments after '--' are only for 'envelope server up' (see: envelope "
                             f"{args.command} --help)")
        return _dispatch(args, extra, out=out, err=err)
    except UsageError as exc:
        err.write(f"envelope: {exc}\n")
        return EXIT_USAGE
    except KeyboardInterrupt:
        err.write("envelope: interrupted\n")
        return EXIT_INTERRUPTED


def _dispatch(args: argparse.Namespace, extra: list[str], *, out: TextIO, err: TextIO) -> int:
    """Run the parsed verb (its implementation lives in its package)."""
    if args.command == "run":
        plan = _validate(args)
        return _Runner(plan, out=out, err=err).run()
    if args.command == "sweep":
        from envelope.sweep_cli import run_sweep

        return run_sweep(args, out=out, err=err)
    if args.command in ("report", "compare"):
        from analysis import cli as analysis_cli

        if args.command == "report":
            return analysis_cli.run_report(args, out=out, err=err, prefix="envelope")
        return analysis_cli.run_compare(args, out=out, err=err, prefix="envelope")
    if args.command == "server":
        from server import cli as server_cli

        return server_cli.run(args, extra, prefix="envelope", out=out, err=err)
    from server.sim import cli as sim_cli

    return sim_cli.run(args, prefix="envelope", out=out, err=err)


if __name__ == "__main__":  # python -m envelope.cli
    sys.exit(main())
