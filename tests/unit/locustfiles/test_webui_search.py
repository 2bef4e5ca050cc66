"""The LLM tab's SLO-search section: the JSON built from ``search.json``, and the page that draws it."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from envelope.rundir import SEARCH_FILE
from envelope.search_log import ProbeEntry, SearchEntry, write_search_log
from helpers.locust_runs import REPO
from locustfiles import live

ASSETS = REPO / "locustfiles" / "webui_assets"
BRACKET = "between 6 and 7 users (95% confidence)"


def probe(index: int, level: float, good: int, judged: int, low: float, high: float, verdict: str,
          decision: str, next_level: float | None) -> ProbeEntry:
    return ProbeEntry(stage_index=index, stage_name=f"search-{level:g}", level=level, good=good, judged=judged,
                      duration_s=10.0, attainment=good / judged if judged else None, attainment_low=low, attainment_high=high,
                      verdict=verdict, decision_phase="grow", decision=decision, next_level=next_level)


def running_search() -> SearchEntry:
    return SearchEntry(
        pass_name="find-users", over="users", spec={"over": "users", "confidence": 0.95, "start": 4},
        target=0.9, thresholds={"ttft_ms": 500.0, "e2e_ms": 4000.0},
        probes=(probe(0, 4, 50, 50, 0.929, 1.0, "pass", "4 users passed: try 8", 8),
                probe(1, 8, 20, 50, 0.276, 0.538, "fail", "8 users failed: bisect to 6", 6),
                probe(2, 6, 49, 50, 0.895, 0.996, "unresolved", "6 users unresolved: hold at 6", 6)),
        running_level=6, bracket=BRACKET, highest_pass=4, lowest_fail=8, status="bracketed",
    )


def test_a_running_search_gives_its_running_probe_its_probes_and_its_bracket(tmp_path):
    write_search_log(tmp_path, [running_search()])
    section = live.search_section(tmp_path)
    assert section["error"] is None
    [s] = section["passes"]
    assert (s["pass_name"], s["over"], s["unit"], s["confidence"], s["target"]) == (
        "find-users", "users", "users", 0.95, 0.9)
    assert s["thresholds"] == {"ttft_ms": 500.0, "e2e_ms": 4000.0}
    assert (s["running_level"], s["done"], s["bracket"], s["reason"]) == (6, False, BRACKET, "")
    assert [(p["level"], p["judged"], p["good"], p["verdict"], p["next_level"]) for p in s["probes"]] == [
        (4, 50, 50, "pass", 8), (8, 50, 20, "fail", 6), (6, 50, 49, "unresolved", 6)]
    assert s["probes"][1]["attainment"] == pytest.approx(0.4)
    assert (s["probes"][1]["attainment_low"], s["probes"][1]["attainment_high"]) == (0.276, 0.538)
    assert s["probes"][1]["decision"] == "8 users failed: bisect to 6"
    json.dumps(section, allow_nan=False)  # served as-is by /llm/data


def test_a_finished_search_gives_its_reason_and_no_running_probe(tmp_path):
    done = SearchEntry(pass_name="find-rate", over="rate", spec={"confidence": 0.9}, target=0.95,
                       thresholds={"ttft_ms": 300.0}, probes=(probe(3, 2.5, 0, 0, 0.0, 1.0, "unresolved", "", None),),
                       running_level=None, done=True, reason="precision reached: 2.5 to 3 requests/s apart",
                       bracket="between 2.5 and 3 requests/s (90% confidence)", status="bracketed")
    write_search_log(tmp_path, [running_search(), done])
    first, second = live.search_section(tmp_path)["passes"]
    assert first["pass_name"] == "find-users" and not first["done"]
    assert (second["unit"], second["done"], second["running_level"]) == ("requests/s", True, None)
    assert second["reason"] == "precision reached: 2.5 to 3 requests/s apart"
    assert second["probes"][0]["attainment"] is None  # no request judged: no share, as the driver writes it


def test_a_spec_without_a_confidence_gives_none():
    entry = SearchEntry(pass_name="p", over="users", spec={}, target=0.9, thresholds={})
    view = live.search_pass_view(entry)
    assert view["confidence"] is None and view["probes"] == [] and view["running_level"] is None


def test_no_run_directory_or_no_file_gives_no_passes(tmp_path):
    assert live.search_section(None) == {"passes": [], "error": None}
    assert live.search_section(tmp_path) == {"passes": [], "error": None}
    assert live.search_section(tmp_path / "not-yet") == {"passes": [], "error": None}


@pytest.mark.parametrize("content", [
    b'{"schema_version": 1, "searches": [{"pass_name": "p"',  # cut short mid-write
    b"\xff\xfe not json",
    b"[1, 2, 3]",  # JSON, not a search log
    b'{"searches": [{"pass_name": "p", "probes": [42]}]}',
    b'{"searches": [{"pass_name": "p", "probes": [{"level": 1}]}]}',  # a probe missing its fields
    b'{"searches": "nope"}',
])
def test_a_damaged_file_gives_an_error_sentence_not_an_exception(tmp_path, content):
    (tmp_path / SEARCH_FILE).write_bytes(content)
    section = live.search_section(tmp_path)
    assert section["passes"] == []
    assert isinstance(section["error"], str) and section["error"]


def test_a_search_json_that_is_a_directory_is_an_error_too(tmp_path):
    (tmp_path / SEARCH_FILE).mkdir()
    section = live.search_section(tmp_path)
    assert section["passes"] == [] and SEARCH_FILE in section["error"]


# -- the page ------------------------------------------------------------------------------------

def test_the_page_has_a_search_section_and_the_script_draws_it_as_text():
    html = (ASSETS / "llm.html").read_text()
    js = (ASSETS / "llm.js").read_text()
    for element_id in ("search", "search-error", "search-passes"):
        assert f'id="{element_id}"' in html
    assert "renderSearch(d.search" in js
    for shown in ("Probing now: ", "Attainment (", "Verdict", "Decision", "So far: ", "Search over: "):
        assert shown in js
    # text from search.json goes in with textContent, never as HTML
    assert "innerHTML" not in js and "insertAdjacentHTML" not in js and "outerHTML" not in js


def _served(run_dir: Path) -> dict:
    """Install the LLM tab on a bare Flask app in a fresh interpreter (Locust patches the standard library
    on import), tick once, and fetch what the browser would: /llm/data, /llm/ and /llm/llm.js."""
    code = textwrap.dedent(f"""
        import json, locust
        from types import SimpleNamespace
        from flask import Flask
        from locust.event import Events
        from locustfiles.webui import LiveConsole
        ctx = SimpleNamespace(run_dir={str(run_dir)!r}, stages=[], stage_log=[], run_id="r1", manual=False,
                              in_flight=0, worker_reports={{}})
        env = SimpleNamespace(envelope=ctx, runner=SimpleNamespace(state="running", user_count=6),
                              parsed_options=SimpleNamespace(web_base_path=""), events=Events(), host=None)
        app = Flask("t")
        web_ui = SimpleNamespace(app=app, template_args={{}}, auth_required_if_enabled=lambda f: f)
        console = LiveConsole(env)
        console.install(web_ui)
        console.tick(now_unix_s=1000.0)
        client = app.test_client()
        out = {{"data": client.get("/llm/data").get_json(), "page": client.get("/llm/").get_data(as_text=True),
               "js": client.get("/llm/llm.js").get_data(as_text=True)}}
        print(json.dumps(out))
    """)
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_the_served_data_carries_the_search_and_the_served_page_draws_it(tmp_path):
    write_search_log(tmp_path, [running_search()])
    served = _served(tmp_path)
    [s] = served["data"]["search"]["passes"]
    assert served["data"]["search"]["error"] is None
    assert (s["pass_name"], s["running_level"], s["bracket"]) == ("find-users", 6, BRACKET)
    assert [p["verdict"] for p in s["probes"]] == ["pass", "fail", "unresolved"]
    assert 'id="search-passes"' in served["page"] and "function renderSearch" in served["js"]

    (tmp_path / SEARCH_FILE).write_text("{ damaged")
    damaged = _served(tmp_path)["data"]
    assert damaged["ready"] and damaged["search"]["passes"] == [] and "not readable JSON" in damaged["search"]["error"]


CHROMIUM = Path("/usr/bin/chromium")


@pytest.fixture
def page():
    if not CHROMIUM.exists():
        pytest.skip("Debian's chromium is not installed at /usr/bin/chromium (apt-get install chromium)")
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), headless=True,
                                    args=["--no-sandbox", "--disable-gpu", "--no-first-run"])
        try:
            yield browser.new_page()
        finally:
            browser.close()


def _show(page, data: dict) -> None:
    """The console page from its assets, its ``data`` answered with ``data`` (no server, no Locust)."""
    def answer(route):
        name = route.request.url.split("/llm/", 1)[1].split("?", 1)[0] or "llm.html"
        if name == "data":
            route.fulfill(status=200, content_type="application/json", body=json.dumps(data))
        elif name in ("llm.html", "llm.js", "llm.css"):
            route.fulfill(status=200, body=(ASSETS / name).read_bytes(),
                          content_type={"html": "text/html", "js": "text/javascript", "css": "text/css"}[
                              name.rsplit(".", 1)[1]])
        else:
            route.fulfill(status=404, body="")
    page.route("http://console.test/**", answer)
    page.goto("http://console.test/llm/")
    page.wait_for_function("() => Number(document.body.dataset.updates || 0) >= 1", timeout=20_000)


def test_the_browser_draws_the_probes_and_escapes_the_files_text(page, tmp_path):
    hostile = SearchEntry(pass_name="<img src=x onerror=\"document.title='pwned'\">", over="users", spec={},
                          target=0.9, thresholds={}, done=True, reason="<b>stopped</b>", bracket="<i>none</i>")
    write_search_log(tmp_path, [running_search(), hostile])
    _show(page, {"ready": True, "state": "running", "history": [], "history_seq": 0,
                 "search": live.search_section(tmp_path)})
    assert page.locator("#search").is_visible()
    first, second = page.locator(".search-pass").all()
    assert first.locator(".search-running").inner_text() == "Probing now: 6 users"
    rows = first.locator("tbody tr").all()
    cells = [[c.inner_text().strip() for c in r.locator("td").all()] for r in rows]
    assert cells[1] == ["8 users", "50", "20", "40.0% (27.6%–53.8%)", "fail", "8 users failed: bisect to 6"]
    assert [c[4] for c in cells] == ["pass", "fail", "unresolved"]
    assert first.locator(".search-bracket").inner_text() == "So far: " + BRACKET
    # the hostile pass: its text is shown as text, nothing in it became an element
    assert second.locator(".search-reason").inner_text() == "Search over: <b>stopped</b>"
    assert second.locator(".search-bracket").inner_text() == "Result: <i>none</i>"
    assert "<img src=x" in second.locator("h3").inner_text()
    assert page.locator("#search img, #search b, #search i").count() == 0
    assert page.title() != "pwned"


def test_the_browser_says_when_search_json_is_damaged_and_hides_the_section_without_searches(page):
    _show(page, {"ready": True, "state": "running", "history": [], "history_seq": 0,
                 "search": {"passes": [], "error": "search.json: not readable JSON (<oops>)"}})
    assert page.locator("#search-error").inner_text() == (
        "search.json could not be read: search.json: not readable JSON (<oops>)")
    assert page.locator(".search-pass").count() == 0
    _show(page, {"ready": True, "state": "running", "history": [], "history_seq": 0,
                 "search": {"passes": [], "error": None}})
    assert not page.locator("#search").is_visible()
