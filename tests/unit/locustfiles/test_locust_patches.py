"""Locust work-arounds and the end-of-run drain, each run in a fresh interpreter (Locust
monkey-patches the standard library on import, which must not happen inside pytest)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

from helpers.locust_runs import REPO


def _run(code: str) -> dict:
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_a_spawn_message_builds_locusts_default_options_once_not_once_per_option():
    out = _run("""
        import json, locust
        from locust import argument_parser, runners
        builds = 0
        original_setup = argument_parser.setup_parser_arguments
        def counting(*a, **k):
            global builds
            builds += 1
            return original_setup(*a, **k)
        argument_parser.setup_parser_arguments = counting
        unpatched = argument_parser.default_args_dict()
        from locustfiles import patches
        patches.apply(); patches.apply()   # idempotent
        builds = 0
        # what WorkerRunner does with every spawn message: one lookup per option the master sent
        sent = {**{k: None for k in unpatched}, "scenario": "x.yaml", "run_dir": "/r"}
        custom = [k for k in sent if k not in argument_parser.default_args_dict()]
        got = argument_parser.default_args_dict()
        got["scenario"] = "mutated"
        print(json.dumps({"builds": builds, "lookups": len(sent), "custom": sorted(custom),
                          "same": argument_parser.default_args_dict() == unpatched,
                          "liveness": runners.HEARTBEAT_LIVENESS}))
    """)
    assert out["lookups"] > 50
    assert out["builds"] == 1  # was one parser build per option: seconds of blocked event loop
    assert out["custom"] == ["run_dir", "scenario"]
    assert out["same"]  # same defaults, and a caller's change does not leak into the cache
    assert out["liveness"] == 10


DRAIN = """
    import json, locust
    from locustfiles.llm import ScenarioShape
    from locustfiles.context import WorkerReport

    class Ctx:
        def __init__(self, is_master, in_flight=0):
            self.is_master, self.in_flight, self.worker_reports = is_master, in_flight, {}
            self.open_loop = None

    class Node:
        def __init__(self, state):
            self.state = state

    class Runner:
        def __init__(self, clients=(), user_count=0, missing=()):
            self.clients = {c: Node("running") for c in clients}
            self.clients.update({c: Node(locust.runners.STATE_MISSING) for c in missing})
            self.user_count = user_count

    def drained(ctx, runner, started=100.0):
        shape = ScenarioShape.__new__(ScenarioShape)
        shape.runner, shape._drain_started_s = runner, started
        return shape._drained(ctx)
"""


def test_master_drain_needs_a_fresh_idle_report_from_every_worker():
    out = _run(DRAIN + """
    ctx, runner = Ctx(True), Runner(["w1", "w2"])
    results = {"no reports": drained(ctx, runner)}
    ctx.worker_reports["w1"] = WorkerReport(in_flight=0, users=0, received_s=101.0)
    results["one of two"] = drained(ctx, runner)
    ctx.worker_reports["w2"] = WorkerReport(in_flight=0, users=0, received_s=99.0)
    results["stale (sent before the drain)"] = drained(ctx, runner)
    ctx.worker_reports["w2"] = WorkerReport(in_flight=1, users=0, received_s=102.0)
    results["a request in flight"] = drained(ctx, runner)
    ctx.worker_reports["w2"] = WorkerReport(in_flight=0, users=1, received_s=102.0)
    results["a user still running (between requests)"] = drained(ctx, runner)
    ctx.worker_reports["w2"] = WorkerReport(in_flight=0, users=0, open_loop=1, received_s=102.0)
    results["open-loop work left (a dispatcher or a request waiting for a slot)"] = drained(ctx, runner)
    ctx.worker_reports["w2"] = WorkerReport(in_flight=0, users=0, received_s=102.0)
    results["both idle"] = drained(ctx, runner)
    results["no workers left"] = drained(Ctx(True), Runner([]))
    # a worker Locust calls missing will never report again: the ledger names it, the drain goes on
    lost = Ctx(True)
    lost.worker_reports["w1"] = WorkerReport(in_flight=0, users=0, received_s=101.0)
    lost.worker_reports["w2"] = WorkerReport(in_flight=2, users=3, received_s=90.0)
    results["the other worker lost"] = drained(lost, Runner(["w1"], missing=["w2"]))
    print(json.dumps(results))
    """)
    assert out == {"no reports": False, "one of two": False, "stale (sent before the drain)": False,
                   "a request in flight": False, "a user still running (between requests)": False,
                   "open-loop work left (a dispatcher or a request waiting for a slot)": False,
                   "both idle": True, "no workers left": True, "the other worker lost": True}


def test_local_drain_waits_for_users_and_requests():
    out = _run(DRAIN + """
    class Loop:
        pending, dispatching = 0, True
    waiting = Ctx(False)
    waiting.open_loop = Loop()
    print(json.dumps([drained(Ctx(False, in_flight=1), Runner(user_count=0)),
                      drained(Ctx(False, in_flight=0), Runner(user_count=1)),
                      drained(waiting, Runner(user_count=0)),
                      drained(Ctx(False, in_flight=0), Runner(user_count=0))]))
    """)
    assert out == [False, False, False, True]


def test_the_csv_writer_ends_quietly_on_files_locust_closed_but_not_on_other_errors():
    out = _run("""
        import json, locust
        from locust import stats
        from locustfiles import patches
        patches.apply()
        class W:
            def __init__(self, exc): self.exc = exc
        def raising(self):
            raise self.exc
        results = {}
        for name, exc in (("closed", ValueError("I/O operation on closed file.")), ("other", ValueError("boom"))):
            stats.StatsCSVFileWriter.stats_writer = raising  # stands for Locust's writer meeting `exc`
            stats.StatsCSVFileWriter.stats_writer = patches._quiet_csv_writer()
            try:
                stats.StatsCSVFileWriter.stats_writer(W(exc))
                results[name] = "quiet"
            except ValueError as e:
                results[name] = str(e)
        print(json.dumps(results))
    """)
    assert out == {"closed": "quiet", "other": "boom"}


def test_open_loop_shares_follow_the_rank_among_live_workers():
    """Locust's worker indexes keep a gap where a worker was lost; the stage message gives ranks instead."""
    out = _run("""
    import json, locust
    from types import SimpleNamespace
    from locustfiles.context import EnvelopeRun

    class Node:
        def __init__(self, state):
            self.state = state

    sent = []
    indexes = {"a": 0, "b": 1, "c": 2}
    master_runner = SimpleNamespace(
        clients={"a": Node("running"), "b": Node(locust.runners.STATE_MISSING), "c": Node("running")},
        get_worker_index=indexes.__getitem__, send_message=lambda kind, data: sent.append(data))
    stages = [SimpleNamespace(name=f"p-{n}u", pass_name="p", index=n - 1, search=None) for n in (1, 2)]
    master = SimpleNamespace(is_master=True, environment=SimpleNamespace(runner=master_runner),
                             run_dir="runs/x", current_index=1, stage_clock=SimpleNamespace(stage=stages[1]))
    EnvelopeRun._broadcast(master)

    entered = []
    loop = SimpleNamespace(enter=lambda stage, processes, index: entered.append((processes, index)),
                           stop_dispatching=lambda: None)
    from pathlib import Path
    from locustfiles.run_files import RunFiles
    from locustfiles.stage_clock import StageClock
    worker = SimpleNamespace(files=RunFiles(Path("runs/x"), name="x"), stage_clock=StageClock(stages, manual=False),
                             _seen_stage=False, manual=False, open_loop=loop, stages=stages,
                             environment=SimpleNamespace(runner=SimpleNamespace(client_id="c", worker_index=2)))
    EnvelopeRun.on_stage_message(worker, sent[0])
    print(json.dumps({"message": sent[0], "entered": entered}))
    """)
    assert out["message"]["processes"] == 2 and out["message"]["ranks"] == {"a": 0, "c": 1}
    assert out["entered"] == [[2, 1]]  # worker c (Locust index 2) sends the second of two shares


def test_a_worker_runs_the_masters_scenario_whatever_it_was_given(tmp_path):
    """The master's scenario text and options arrive with Locust's spawn message; the worker's own
    --scenario (a stale copy, say) only earns a warning, and the master's file need not exist here."""
    mine = tmp_path / "mine.yaml"
    mine.write_text((REPO / "scenarios" / "smoke.yaml").read_text())
    out = _run(f"""
    import json, logging, locust
    from types import SimpleNamespace
    from locustfiles.context import EnvelopeRun

    warnings = []
    logging.getLogger("envelope").addHandler(type("H", (logging.Handler,), {{"emit": lambda self, r: warnings.append(r.getMessage())}})())
    options = SimpleNamespace(worker=True, master=False, scenario={str(mine)!r}, quick=False, duration_scale=None,
                              manual=False, model="", api_key_env="", api_key_file="", record_text=False,
                              run_dir="", csv_prefix=None)
    ctx = EnvelopeRun(SimpleNamespace(runner=None), options)
    before = [s.name for s in ctx.stages]
    options.envelope_scenario_yaml = open({str(REPO / "scenarios" / "capstone.yaml")!r}).read()
    options.scenario, options.quick, options.model = "/on/the/master/capstone.yaml", True, "tiny-qwen3"
    ctx.adopt_master_options(options)
    after = [(s.name, s.duration_s) for s in ctx.stages]
    ctx.adopt_master_options(options)  # the next test in the web UI: same again, no second warning
    print(json.dumps({{"before": before, "after": after, "model": ctx.model, "warnings": warnings,
                       "again": [(s.name, s.duration_s) for s in ctx.stages] == after}}))
    """)
    from envelope.scenario import load_scenario

    expected = [(s.name, s.duration_s) for s in load_scenario(REPO / "scenarios" / "capstone.yaml").resolve(quick=True)]
    assert out["before"] != [name for name, _ in expected]
    assert [tuple(x) for x in out["after"]] == expected and out["again"]
    assert out["model"] == "tiny-qwen3"
    assert out["warnings"] == ["envelope: this worker's --scenario differs from the master's; running the master's "
                               "(/on/the/master/capstone.yaml)"]


def test_a_scenario_with_openai_users_imports_the_sdk_before_the_load(tmp_path):
    """Imported on the first openai request, in the gevent loop, the SDK (1.7 s of CPU on a slow box)
    stalled every request in flight; a scenario with an openai client class has it imported when the run
    is set up, and one without never pays for it."""
    scenarios = {}
    for transport in ("fasthttp", "openai"):
        path = tmp_path / f"{transport}.yaml"
        path.write_text(f"name: mix\nclients:\n  - {{name: app, client: {transport}}}\n  - {{name: bench}}\n"
                        "passes:\n  - name: p\n    stages: [{users: 2, duration_s: 5}]\n")
        scenarios[transport] = str(path)
    out = _run(f"""
        import json, sys, locust
        from types import SimpleNamespace
        from locustfiles.context import EnvelopeRun

        seen = {{}}
        for transport, path in {scenarios!r}.items():
            options = SimpleNamespace(worker=False, master=False, scenario=path, quick=False, duration_scale=None,
                                      manual=False, model="", api_key_env="", api_key_file="", record_text=False,
                                      run_dir="", csv_prefix=None)
            ctx = EnvelopeRun(SimpleNamespace(runner=None), options)
            seen[transport] = ("openai" in sys.modules, sorted({{c.transport for s in ctx.stages for c in s.clients}}))
        print(json.dumps(seen))
    """)
    assert out["fasthttp"] == [False, ["fasthttp"]]  # set up first: nothing imported openai yet
    assert out["openai"] == [True, ["fasthttp", "openai"]]
