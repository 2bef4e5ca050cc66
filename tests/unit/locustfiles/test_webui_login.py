"""With Locust's ``--web-login``, every ``/llm/`` route refuses a request that has not logged in.

Records, datasets and reports are private: the LLM tab's routes must sit behind
Locust's own guard (``WebUI.auth_required_if_enabled``). The routes are taken
from the Flask app's ``url_map``, so a new ``/llm/`` route added without the
guard fails here without anyone updating a list.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from envelope.records import RecordWriter, RequestRecord
from envelope.search_log import SearchEntry, write_search_log
from envelope.stages import StageRecord, write_stages
from helpers.locust_runs import REPO

# Private values planted in the run directory: none may appear in a refused response.
RUN_ID = "run-private-5e1c"
REQUEST_ID = "req-private-93ab"
PROMPT = "private prompt text 7d41"
STAGE_NAME = "stage-private-2f6e"
SEARCH_PASS = "search-private-b07a"
REPORT_TEXT = "envelope report private 41c9"
SECRETS = (RUN_ID, REQUEST_ID, PROMPT, STAGE_NAME, SEARCH_PASS, REPORT_TEXT)


def make_run_dir(run_dir: Path) -> None:
    """A run directory as a finished run leaves it: records, stages.json, search.json and a report."""
    with RecordWriter(run_dir / "records" / "worker-1.jsonl") as writer:
        for i in range(3):
            writer.write(RequestRecord(
                run_id=RUN_ID, request_id=f"{REQUEST_ID}-{i}", worker_id="w:1", client="default", endpoint="chat",
                pass_name="p", stage_index=0, stage_name=STAGE_NAME, wall_start_unix_s=1000.0 + i, t_start_s=10.0 + i,
                t_first_token_s=10.1 + i, t_last_token_s=10.5 + i, t_done_s=10.5 + i,
                chunk_offsets_s=(0.1, 0.3, 0.5), output_tokens=3, prompt_text=PROMPT, completion_text="a b c"))
    write_stages(run_dir, [StageRecord(stage_index=0, stage_name=STAGE_NAME, pass_name="p", target_users=2,
                                       spawn_rate=2.0, duration_s=10.0, slos={"ttft_p95_ms": 500.0},
                                       start_unix_s=999.0, end_unix_s=1010.0)])
    write_search_log(run_dir, [SearchEntry(pass_name=SEARCH_PASS, over="users", spec={}, target=0.9,
                                           thresholds={}, done=True, reason="done")])
    (run_dir / "report").mkdir()
    (run_dir / "report" / "envelope.html").write_text(f"<html><body>{REPORT_TEXT}</body></html>\n")


# Run in a fresh interpreter: Locust patches the standard library (gevent) on import.
_SCRIPT = textwrap.dedent("""
    import json, sys, warnings
    warnings.simplefilter("error")
    from types import SimpleNamespace
    from pathlib import Path

    import gevent
    import locust
    from flask_login import FlaskLoginClient, UserMixin
    from locust import HttpUser, argument_parser
    from locust.env import Environment

    import locustfiles.webui as webui
    from envelope.stages import read_stages

    run_dir = Path(sys.argv[1])
    web_login = sys.argv[2] == "on"
    report_calls = []

    def make_report(self):
        # the route's own code (send_file, the zip) runs; only the analysis subprocess is left out
        report_calls.append(1)
        return run_dir / "report", ""

    webui.LiveConsole.make_report = make_report

    class User(UserMixin):
        def __init__(self, user_id):
            self.id = user_id

    class Llm(HttpUser):
        host = "http://127.0.0.1:9"

    # as ``locust -f locustfiles/llm.py [--web-login]`` does: the parser (with our listeners), the web UI
    # created with a delayed start, then the init event that installs the LLM tab
    args = ["--web-port", "0"] + (["--web-login"] if web_login else [])
    options = argument_parser.get_parser(default_config_files=[]).parse_args(args)
    env = Environment(user_classes=[Llm], events=locust.events, parsed_options=options)
    stages = read_stages(run_dir)
    env.envelope = SimpleNamespace(run_dir=str(run_dir), stages=stages, stage_log=stages, run_id=%(run_id)r,
                                   manual=False, in_flight=0, worker_reports={})
    runner = env.create_local_runner()
    web_ui = env.create_web_ui(host=options.web_host, port=options.web_port, web_login=options.web_login,
                               web_base_path=options.web_base_path, delayed_start=True)
    if web_login:
        # what a --web-login deployment must provide (Locust's docs): a session key and a user loader
        web_ui.app.config["SECRET_KEY"] = "test-secret-key"
        web_ui.login_manager.user_loader(User)
    env.events.init.fire(environment=env, runner=runner, web_ui=web_ui)
    gevent.sleep(0.3)  # the LLM tab's reader ticks once: /llm/data and /stats/requests carry the run

    def answer(client, method, url):
        response = client.open(url, method=method)
        return {"method": method, "url": url, "status": response.status_code,
                "location": response.headers.get("Location"),
                "disposition": response.headers.get("Content-Disposition"),
                "body": response.get_data().decode("utf-8", "replace")}

    app = web_ui.app
    adapter = app.url_map.bind("localhost")
    llm_rules = [r for r in app.url_map.iter_rules() if r.rule.startswith("/llm")]
    anonymous = app.test_client()
    refused = []
    for rule in llm_rules:
        url = adapter.build(rule.endpoint, {name: "dummy" for name in rule.arguments})
        for method in sorted(rule.methods - {"OPTIONS"}):
            refused.append(answer(anonymous, method, url))
    # Locust's own routes that our after_request hook extends with the tab's rows
    extended = [answer(anonymous, "GET", "/stats/requests"), answer(anonymous, "GET", "/")]
    calls_anonymous = len(report_calls)

    app.test_client_class = FlaskLoginClient
    client = app.test_client(user=User("admin")) if web_login else app.test_client()
    admitted = {url: answer(client, "GET", url) for url in (
        "/llm/", "/llm/data", "/llm/records.jsonl", "/llm/report.html", "/llm/report.zip", "/stats/requests")}
    print(json.dumps({"rules": sorted(r.rule for r in llm_rules), "refused": refused, "extended": extended,
                      "report_calls_anonymous": calls_anonymous, "admitted": admitted}))
""") % {"run_id": RUN_ID}


def _serve(run_dir: Path, web_login: bool) -> dict:
    proc = subprocess.run([sys.executable, "-c", _SCRIPT, str(run_dir), "on" if web_login else "off"], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _refused(answer: dict) -> bool:
    """Locust's guard: flask_login redirects to the login page (401/403 would do as well)."""
    if answer["status"] in (401, 403):
        return True
    return answer["status"] in (302, 303) and (answer["location"] or "").split("?", 1)[0].endswith("/login")


def _leaks(answer: dict) -> list[str]:
    return [s for s in SECRETS if s in answer["body"]]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("run")
    make_run_dir(path)
    return path


@pytest.fixture(scope="module")
def served(run_dir) -> dict:
    return _serve(run_dir, web_login=True)


def test_every_llm_route_refuses_a_request_without_a_login(served):
    # the enumeration found the tab's routes (an empty url_map would pass vacuously)
    assert {"/llm/", "/llm/data", "/llm/records.jsonl", "/llm/report.html", "/llm/report.zip"} <= set(served["rules"])
    assert served["refused"]
    problems = []
    for answer in served["refused"]:
        where = f"{answer['method']} {answer['url']}"
        if not _refused(answer):
            problems.append(f"{where}: answered {answer['status']} (location {answer['location']!r}), not refused")
        if _leaks(answer):
            problems.append(f"{where}: the body carries {_leaks(answer)}")
        if answer["disposition"]:
            problems.append(f"{where}: a download ({answer['disposition']})")
    assert not problems, "\n".join(problems)
    assert served["report_calls_anonymous"] == 0  # a refused report request never starts the analysis


def test_locust_routes_the_tab_extends_refuse_too_and_carry_none_of_the_run(served):
    for answer in served["extended"]:
        assert _refused(answer), answer
        assert not _leaks(answer), answer


def test_a_logged_in_session_gets_the_data(served):
    # the control: the same app, same guard, logged in; without it the test above could pass on a broken app
    admitted = served["admitted"]
    for url in ("/llm/", "/llm/data", "/llm/records.jsonl", "/llm/report.html", "/llm/report.zip"):
        assert admitted[url]["status"] == 200, admitted[url]
    records = admitted["/llm/records.jsonl"]["body"]
    assert f"{REQUEST_ID}-0" in records and PROMPT in records
    data = json.loads(admitted["/llm/data"]["body"])
    assert data["ready"] and data["run_id"] == RUN_ID and data["totals"]
    assert data["search"]["passes"][0]["pass_name"] == SEARCH_PASS
    assert REPORT_TEXT in admitted["/llm/report.html"]["body"]
    assert "report.zip" in admitted["/llm/report.zip"]["disposition"]
    stats = json.loads(admitted["/stats/requests"]["body"])
    assert any(e["key"] == "llm" and e["data"] for e in stats["extended_stats"])


def test_without_web_login_the_routes_are_open(run_dir):
    served = _serve(run_dir, web_login=False)
    records = served["admitted"]["/llm/records.jsonl"]
    assert records["status"] == 200 and f"{REQUEST_ID}-2" in records["body"]
    assert served["admitted"]["/llm/data"]["status"] == 200
    assert all(a["status"] != 302 for a in served["refused"])
