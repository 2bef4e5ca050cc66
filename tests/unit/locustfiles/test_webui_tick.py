"""The LLM tab's tick judges the live window's attainment without importing anything while the load runs.

The tab ticks in the gevent loop that times every request in flight. Its attainment interval comes from
scipy; imported there on first use (1.9 s of CPU on a slow 2-core box) it stalled every request in
flight, so installing the tab imports it (envelope.attainment.preload_statistics).
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import orjson

REPO = Path(__file__).resolve().parents[3]


def test_the_first_tick_with_an_attainment_slo_imports_nothing(tmp_path):
    records = tmp_path / "records"
    records.mkdir()
    with open(records / "h_1.jsonl", "wb") as fh:
        for i in range(20):  # 20 requests done within the window before t = 1000 s, half of them too slow
            done = 990.2 + 0.4 * i
            fh.write(orjson.dumps({"stage_index": 0, "pass_name": "p", "wall_start_unix_s": done - 1.0,
                                   "t_start_s": 10.0, "t_first_token_s": 10.1 + 0.2 * (i % 2),
                                   "t_last_token_s": 10.9, "t_done_s": 11.0, "output_tokens": 10,
                                   "error_category": None}) + b"\n")
    code = textwrap.dedent(f"""
        import json, sys, locust
        from types import SimpleNamespace
        from flask import Flask
        from locust.event import Events
        from locustfiles.webui import LiveConsole
        stage = SimpleNamespace(slos={{"ttft_ms": 200}}, stage_index=0, pass_name="p", stage_name="p-4u",
                                target_users=4, target_rate_per_s=None, end_unix_s=None)
        ctx = SimpleNamespace(run_dir={str(tmp_path)!r}, stages=[stage], stage_log=[stage], run_id="r1",
                              manual=False, in_flight=0, worker_reports={{}})
        env = SimpleNamespace(envelope=ctx, runner=SimpleNamespace(state="running", user_count=4),
                              parsed_options=SimpleNamespace(web_base_path=""), events=Events(), host=None)
        web_ui = SimpleNamespace(app=Flask("t"), template_args={{}}, auth_required_if_enabled=lambda f: f)
        console = LiveConsole(env)
        console.install(web_ui)
        before = set(sys.modules)
        console.tick(now_unix_s=1000.0)
        (judged,) = [r for r in console._snapshot["slo_results"] if r["key"] == "attainment_min"]
        imported = sorted(m for m in set(sys.modules) - before if m.split(".")[0] in ("scipy", "numpy", "pandas"))
        print(json.dumps({{"attainment": judged["measured"], "note": judged["note"], "imported": imported}}))
    """)
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["attainment"] == 0.5 and "95% CI" in out["note"], out  # the tick did judge the window
    assert out["imported"] == [], out
