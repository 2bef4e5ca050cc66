"""The web UI's LLM tab in a real browser: a ramp started from Locust's page, its numbers checked against the records.

Locust runs our locustfile with its web UI (not headless, no ``--web-host``)
against the simulated server, which answers on a fixed schedule and serves
vLLM-named ``/metrics`` (its KV cache is sized so the gauge moves, and its batch
is smaller than the user count so requests wait). Debian's Chromium, driven by
Playwright, fills in Locust's start form, opens the LLM tab, and reads the
numbers the console page shows; the test recomputes the same window from the
record files with :mod:`envelope.metrics` and compares. Locust itself runs as a
child process: it must not be imported here (gevent patches the standard library).

The screenshot of the LLM tab goes to ``tmp_path`` and to ``artifacts/webui-llm-tab.png``
under the repository (git-ignored).
"""

from __future__ import annotations

import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import psutil
import pytest

from envelope import metrics
from envelope.records import iter_record_files, read_records
from server.sim import SimConfig, SimServer

REPO = Path(__file__).resolve().parents[2]
LOCUSTFILE = REPO / "locustfiles" / "llm.py"
CHROMIUM = Path("/usr/bin/chromium")
ARTIFACT = REPO / "artifacts" / "webui-llm-tab.png"
KEY = "sk-webui-e2e-0123456789abcdef"  # the server's API key: must reach the server, never the page
USERS, SPAWN_RATE = 6, 3
MIN_WINDOW_REQUESTS = 40  # wait for this many requests in the window before reading it (p95 from a fair sample)

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

SCENARIO = """\
name: webui
seed: 3
defaults:
  client: fasthttp
  timeouts: {connect_s: 5, first_token_s: 20, total_s: 30}
  workload: {prompt_tokens: 48, output_tokens: 32, fixed_output: true}
  slos: {ttft_p95_ms: 2000, e2e_p95_ms: 10000, error_rate_max: 0.01}
passes:
  - name: webui
    stages:
      - {users: 1, duration_s: 3600}
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def sim():
    # 48 + 32 tokens a request: 6 in a batch of 4 fill a 1,000-token KV cache to about a third; 2 wait
    proc = SimServer(SimConfig(api_key=KEY, ttft_s=0.05, itl_s=0.01, max_model_len=4096, batch_limit=4,
                               kv_cache_capacity_tokens=1000)).start_in_subprocess()
    try:
        yield proc
    finally:
        proc.stop()


class LocustWebUI:
    """``locust -f locustfiles/llm.py`` with its web UI, in its own process group, output to a log file."""

    def __init__(self, tmp_path: Path, host: str, *extra: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.run_dir = tmp_path / "run"
        self.log_path = tmp_path / "locust.log"
        scenario = tmp_path / "webui.yaml"
        scenario.write_text(SCENARIO)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("ENVELOPE_", "LOCUST_"))}
        env["ENVELOPE_API_KEY"] = KEY
        cmd = [sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--host", host, "--web-port", str(self.port),
               "--run-dir", str(self.run_dir), "--scenario", str(scenario), "--manual", *extra]
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_ready(self, timeout_s: float = 60.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"Locust exited ({self.proc.returncode}):\n{self.log()[-3000:]}")
            try:
                if httpx.get(self.url + "/", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        pytest.fail(f"Locust's web UI did not answer within {timeout_s:.0f} s:\n{self.log()[-3000:]}")

    def stop(self) -> None:
        for sig, wait_s in ((signal.SIGTERM, 10), (signal.SIGKILL, 5)):
            try:
                os.killpg(self.proc.pid, sig)  # the group: --processes forks workers
            except ProcessLookupError:
                break
            try:
                self.proc.wait(timeout=wait_s)
                break
            except subprocess.TimeoutExpired:
                continue
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)  # workers left behind by the master
        except ProcessLookupError:
            pass


@pytest.fixture
def browser():
    if not CHROMIUM.exists():
        pytest.skip("Debian's chromium is not installed at /usr/bin/chromium (apt-get install chromium)")
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", "--no-first-run"])
        try:
            yield b
        finally:
            b.close()


def records_on_disk(run_dir: Path) -> list[dict]:
    return list(read_records(iter_record_files(run_dir)))


def expected_window(recs: list[dict], window_s: float) -> dict:
    """The window the page shows once the test is stopped, recomputed from the records with envelope.metrics.

    Written out here rather than taken from locustfiles.live, so the page is checked against a second reading.
    """
    def done(r):
        return r["wall_start_unix_s"] + r["t_done_s"] - r["t_start_s"]

    end = max(done(r) for r in recs)
    inside = [r for r in recs if end - window_s < done(r) <= end]
    good = [r for r in inside if r["error_category"] is None]
    out = {"end_unix_s": end, "requests": len(inside), "ok": len(good),
           "output_tokens_per_s": sum(r["output_tokens"] for r in good) / window_s,
           "per_user_output_tokens_per_s": float(np.median([metrics.request_output_tokens_per_s(r) for r in good]))}
    for name, fn in (("ttft", metrics.ttft_s), ("tpot", metrics.tpot_s), ("e2e", metrics.e2e_s)):
        pct = metrics.percentiles([fn(r) * 1000.0 for r in good if fn(r) is not None], qs=(50, 95))
        out[f"{name}_p50_ms"], out[f"{name}_p95_ms"] = pct["p50"], pct["p95"]
    return out


def shown_number(text: str) -> tuple[float, float]:
    """The number in a displayed text like ``1,234 tokens/s`` or ``56.2``, and half its last digit (its rounding)."""
    m = re.search(r"-?[\d,]+(?:\.(\d+))?", text)
    assert m, text
    decimals = len(m.group(1) or "")
    return float(m.group(0).replace(",", "")), 0.5 * 10 ** -decimals


def read_console(frame) -> dict:
    """Every ``data-*`` of the console's window section and the raw value and text of each ``#v-*`` element."""
    return frame.evaluate("""() => {
        const out = {window: {...document.getElementById('window').dataset}, values: {}};
        for (const el of document.querySelectorAll('[id^="v-"]'))
            out.values[el.id] = {value: el.dataset.value, text: el.textContent};
        return out;
    }""")


def value(console: dict, element_id: str) -> float:
    raw = console["values"][element_id]["value"]
    return float(raw) if raw not in ("", None) else math.nan


def start_ramp_from_the_page(page, url: str) -> None:
    """Fill in Locust's start form and press Start."""
    page.goto(url + "/")
    page.fill("input[name=userCount]", str(USERS))
    page.fill("input[name=spawnRate]", str(SPAWN_RATE))
    page.click("button[type=submit]")


def open_llm_tab(page):
    page.get_by_role("tab", name="LLM").click()
    page.wait_for_selector("#envelope-llm-console", timeout=30_000)
    frame = page.frame_locator("#envelope-llm-console")
    frame.locator("#window[data-state]").wait_for(timeout=30_000)
    return page.locator("#envelope-llm-console").element_handle().content_frame()


def wait_in_frame(frame, js: str, timeout_s: float, arg=None) -> None:
    frame.wait_for_function(js, arg=arg, timeout=timeout_s * 1000, polling=250)


def wait_for_a_full_window(frame, min_requests: int) -> None:
    """Until the ramp has run a whole window's length (the window is shorter before) and it holds enough requests."""
    wait_in_frame(frame, """(n) => {
        const w = document.getElementById('window').dataset;
        return w.windowFullS !== '' && Number(w.windowS) >= Number(w.windowFullS) && Number(w.requests) >= n &&
               document.getElementById('v-server-kv').dataset.value !== '';
    }""", 120, arg=min_requests)


def stop_and_check_exact_window(page, frame, ui: LocustWebUI) -> dict:
    """Stop the test from Locust's page; once every record is on the page, its window must equal the records'."""
    page.get_by_role("button", name=re.compile("^stop$", re.I)).click()
    wait_in_frame(frame, "() => document.getElementById('window').dataset.state === 'stopped' && "
                         "document.getElementById('window').dataset.frozen === 'true'", 60)
    deadline = time.monotonic() + 30
    while True:  # the console reads the record files once a second
        recs = records_on_disk(ui.run_dir)
        console = read_console(frame)
        if int(console["window"]["totalRequests"]) == len(recs) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert int(console["window"]["totalRequests"]) == len(recs) > 0
    window_s = float(console["window"]["windowS"])
    assert window_s == float(console["window"]["windowFullS"])  # the test ran longer than a window
    want = expected_window(recs, window_s)

    # The page and this test read the same records with the same float arithmetic, so the raw values the
    # page carries (data-value, a JavaScript number's shortest round-trip text) agree to rounding error
    # (rel 1e-9); the text a person reads is the same value rounded to its last shown digit.
    assert float(console["window"]["endUnixS"]) == pytest.approx(want["end_unix_s"], rel=1e-12)
    assert int(console["window"]["requests"]) == want["requests"]
    assert value(console, "v-requests") == want["requests"]
    checks = {"v-output-tokens-per-s": "output_tokens_per_s",
              "v-per-user-tokens-per-s": "per_user_output_tokens_per_s"}
    for name in ("ttft", "tpot", "e2e"):
        checks[f"v-{name}-p50"] = f"{name}_p50_ms"
        checks[f"v-{name}-p95"] = f"{name}_p95_ms"
    for element_id, key in checks.items():
        assert value(console, element_id) == pytest.approx(want[key], rel=1e-9), element_id
        shown, half_digit = shown_number(console["values"][element_id]["text"])
        assert abs(shown - want[key]) <= half_digit + 1e-9, (element_id, console["values"][element_id], want[key])
    return console


@pytest.mark.timeout(420)
def test_llm_tab_shows_the_live_envelope_and_agrees_with_the_records(sim, browser, tmp_path):
    ui = LocustWebUI(tmp_path, sim.base_url)
    try:
        ui.wait_ready()
        # Bound to 127.0.0.1 by default (no --web-host given), and says so.
        listening = {c.laddr.ip for c in psutil.Process(ui.proc.pid).net_connections(kind="tcp")
                     if c.status == psutil.CONN_LISTEN and c.laddr.port == ui.port}
        assert listening == {"127.0.0.1"}
        assert f"Starting web interface at http://127.0.0.1:{ui.port}" in ui.log()

        page = browser.new_page(viewport={"width": 1440, "height": 1000})
        start_ramp_from_the_page(page, ui.url)
        frame = open_llm_tab(page)

        # Live: once a whole window of the ramp has passed, tokens/s and TTFT are on the page, and the gauges.
        wait_for_a_full_window(frame, MIN_WINDOW_REQUESTS)
        live = read_console(frame)
        assert live["window"]["state"] == "running" and live["window"]["frozen"] == "false"
        assert value(live, "v-users") == USERS
        assert value(live, "v-output-tokens-per-s") > 0 and live["values"]["v-output-tokens-per-s"]["text"].endswith(
            "tokens/s")
        assert value(live, "v-ttft-p50") > 0 and value(live, "v-ttft-p95") >= value(live, "v-ttft-p50")
        assert value(live, "v-server-kv") > 0 and value(live, "v-server-running") > 0
        assert live["values"]["v-slo"]["text"] == "PASS"
        data = httpx.get(ui.url + "/llm/data", timeout=10).json()
        assert max(p["output_tokens_per_s"] for p in data["history"]) > 0  # the charts have points
        assert max(p["kv_cache_usage_ratio"] or 0 for p in data["history"]) > 0
        assert {p["slo_pass"] for p in data["history"]} >= {True}

        page.wait_for_timeout(1500)  # one more poll, so every chart has drawn the latest points
        tab = tmp_path / "webui-llm-tab.png"
        page.screenshot(path=str(tab), full_page=True)
        ARTIFACT.parent.mkdir(exist_ok=True)
        shutil.copyfile(tab, ARTIFACT)
        print(f"screenshot of the LLM tab: {ARTIFACT}")

        stop_and_check_exact_window(page, frame, ui)

        # Downloads, through the browser: the records as they are on disk, and the envelope report (analysis now).
        with page.expect_download(timeout=30_000) as got:
            frame.locator("#dl-records").click()
        downloaded = tmp_path / "records.jsonl"
        got.value.save_as(downloaded)
        assert sorted(r["request_id"] for r in read_records(downloaded)) == sorted(
            r["request_id"] for r in records_on_disk(ui.run_dir))
        with page.expect_download(timeout=180_000) as got:
            frame.locator("#dl-report-html").click()
        report = tmp_path / "envelope.html"
        got.value.save_as(report)
        assert "Service envelope" in report.read_text()
        assert (ui.run_dir / "report" / "envelope.md").is_file()

        # Locust's own Download Data tab lists them too.
        page.get_by_role("tab", name=re.compile("download data", re.I)).click()
        assert page.get_by_role("link", name=re.compile("LLM request records")).count() == 1

        # The API key reached the server (requests succeeded) but nothing the browser was given.
        served = [page.content()] + [httpx.get(ui.url + path, timeout=30).text for path in (
            "/", "/llm/", "/llm/data", "/llm/llm.js", "/llm/inject.js", "/stats/requests", "/llm/records.jsonl")]
        assert [i for i, text in enumerate(served) if KEY in text] == []
        assert KEY not in downloaded.read_text() and KEY not in report.read_text()
    finally:
        ui.stop()


@pytest.mark.timeout(420)
def test_with_processes_the_master_shows_every_worker(sim, browser, tmp_path):
    ui = LocustWebUI(tmp_path, sim.base_url, "--processes", "2")
    try:
        ui.wait_ready()
        page = browser.new_page(viewport={"width": 1440, "height": 1000})
        start_ramp_from_the_page(page, ui.url)
        frame = open_llm_tab(page)
        wait_for_a_full_window(frame, 20)
        data = httpx.get(ui.url + "/llm/data", timeout=10).json()
        assert data["workers"] == 2 and data["users"] == USERS
        stop_and_check_exact_window(page, frame, ui)
        files = iter_record_files(ui.run_dir)
        assert len(files) == 2 and all(f.stat().st_size > 0 for f in files)  # both workers sent, both counted
    finally:
        ui.stop()
