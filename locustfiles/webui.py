"""The LLM tab in Locust's web UI: the service envelope, live, from the run's request records.

Imported by the locustfile, which registers the listeners below. On the process
that serves the web UI (the master, or the single local process; workers and
``--headless`` runs have no web UI and get nothing) it:

- reads ``RUN/records/*.jsonl`` once a second with
  :class:`envelope.progress.RecordTailer`: every sending process writes its own
  file into the run directory, so with ``--processes N`` (or workers sharing
  the run directory) the master shows the whole load; the numbers come from
  :mod:`locustfiles.live`;
- reads ``RUN/search.json`` (:mod:`envelope.search_log`) on the same tick: for
  each search pass the tab shows the probe running, the probes so far and the
  bracket (or, once done, why the search ended);
- scrapes the target server's ``/metrics`` every 2 s (requests waiting,
  KV-cache usage, preemptions) when it answers;
- adds an "LLM" tab with Locust's extension points: ``extended_tabs`` and
  ``extended_tables`` template args, the table's rows as ``extended_stats`` in
  ``/stats/requests``, and ``extended_csv_files`` links for the downloads;
- serves the console page (live numbers, charts, downloads) at
  ``<web-base-path>/llm/``. A small script added to Locust's index page puts
  that page in the LLM tab in place of the plain table; should a Locust version
  change the page so that the script finds no place, the table stays;
- serves ``llm/data`` (JSON), ``llm/records.jsonl`` and the envelope report
  (``python -m analysis RUN`` in a subprocess, on demand, so analysis never
  shares this gevent-patched process).

The web UI binds to 127.0.0.1 unless ``--web-host`` (or ``LOCUST_WEB_HOST``, or
a config file) says otherwise; ``--web-host '*'`` listens on every interface,
Locust's own default. The API key goes only to the server (this module sends
it with the ``/metrics`` scrape); nothing served to the browser carries it.
"""

from __future__ import annotations

import io
import json
import logging
import os
import subprocess
import sys
import time
import zipfile
from collections import deque
from dataclasses import asdict
from pathlib import Path
from typing import Any, Iterator
from urllib.parse import urlsplit

import gevent
import gevent.lock
from flask import Blueprint, Response, jsonify, make_response, request, send_file, send_from_directory
from locust import events

from envelope.attainment import preload_statistics
from envelope.progress import RecordTailer
from locustfiles import live

__all__ = ["LiveConsole", "DEFAULT_WEB_HOST", "TAB_KEY", "TABLE_TITLE"]

log = logging.getLogger("envelope")

DEFAULT_WEB_HOST = "127.0.0.1"
TAB_KEY = "llm"
TABLE_TITLE = "LLM service envelope (live)"  # inject.js finds the tab's table by this column title
ASSETS = Path(__file__).with_name("webui_assets")
_ASSET_FILES = {"llm.js", "llm.css", "inject.js"}
_REPO = Path(__file__).resolve().parents[1]
TICK_S = 1.0
SCRAPE_S = 2.0
REPORT_TIMEOUT_S = 600.0
_LIVE_STATES = {"spawning", "running"}  # otherwise the window stops at the last completion seen
_ACTIVE_STATES = _LIVE_STATES | {"stopping", "cleanup"}  # a test is on: the charts get a point per tick


@events.init_command_line_parser.add_listener
def _default_web_host(parser, **_kw) -> None:
    # Locust listens on every interface by default; a load tester's console should not. A default, so
    # --web-host, LOCUST_WEB_HOST and config files still win. (``locust --help`` is printed before the
    # locustfile is imported, so it still shows Locust's own default; the startup line shows the address.)
    parser.set_defaults(web_host=DEFAULT_WEB_HOST)


@events.init.add_listener
def _on_init(environment, web_ui=None, **_kw) -> None:
    if web_ui is None or environment.parsed_options is None:
        return
    LiveConsole(environment).install(web_ui)


class LiveConsole:
    """The LLM tab's data and routes for one web UI.

    ``environment.envelope`` (the locustfile's run context) is read when needed,
    not at construction: Locust fires ``init`` listeners in registration order
    and this module's may run before the locustfile's.
    """

    def __init__(self, environment, *, window_s: float = live.WINDOW_S, tick_s: float = TICK_S,
                 scrape_s: float = SCRAPE_S) -> None:
        self.environment = environment
        self.window_s = window_s
        self.tick_s = tick_s
        self.scrape_s = scrape_s
        self.history = live.History()
        self.aggregator: live.LiveAggregator | None = None
        self.tailer: RecordTailer | None = None
        self.server: dict[str, Any] = {"ok": False, "error": "not read yet"}
        self._preemptions: deque[tuple[float, float]] = deque(maxlen=3600)
        self._snapshot: dict[str, Any] = {}
        self._report_lock = gevent.lock.Semaphore()
        self._greenlets: list[gevent.Greenlet] = []
        self._failures_logged: set[str] = set()

    def __repr__(self) -> str:
        return f"LiveConsole(window_s={self.window_s}, points={len(self.history)})"

    @property
    def ctx(self):
        return getattr(self.environment, "envelope", None)

    # -- wiring ------------------------------------------------------------------------------
    def install(self, web_ui) -> None:
        """Register the routes, the tab and the page script on ``web_ui``; start the readers."""
        app = web_ui.app
        options = self.environment.parsed_options
        base = (getattr(options, "web_base_path", None) or "").rstrip("/")
        guard = web_ui.auth_required_if_enabled
        bp = Blueprint("envelope_llm", __name__, url_prefix=f"{base}/llm")
        bp.add_url_rule("/", "page", guard(self._page))
        bp.add_url_rule("/data", "data", guard(self._data))
        bp.add_url_rule("/records.jsonl", "records", guard(self._records))
        bp.add_url_rule("/report.html", "report_html", guard(self._report_html))
        bp.add_url_rule("/report.zip", "report_zip", guard(self._report_zip))
        bp.add_url_rule("/<name>", "asset", guard(self._asset))
        app.register_blueprint(bp)
        app.after_request(self._extend_locust_response)

        args = web_ui.template_args
        args.setdefault("extended_tabs", []).append({"title": "LLM", "key": TAB_KEY})
        args.setdefault("extended_tables", []).append({"key": TAB_KEY, "structure": [
            {"key": "metric", "title": TABLE_TITLE}, {"key": "value", "title": "Value"}]})
        args.setdefault("extended_csv_files", []).extend([
            {"href": "./llm/records.jsonl", "title": "Download LLM request records (JSON lines)"},
            {"href": "./llm/report.html", "title": "Download the envelope report (HTML; runs the analysis now)"},
            {"href": "./llm/report.zip", "title": "Download the envelope report with tables and graphs (zip)"},
        ])
        self.environment.events.reset_stats.add_listener(self._on_reset_stats)
        preload_statistics()  # the tab's attainment interval: not imported mid-load, stalling the requests
        self._greenlets = [gevent.spawn(self._tick_loop), gevent.spawn(self._scrape_loop)]

    def _on_reset_stats(self, **_kw) -> None:
        """Locust's Reset button: the totals and the window start again (the record files are untouched)."""
        if self.aggregator is not None:
            self.aggregator.reset()

    def _extend_locust_response(self, response: Response) -> Response:
        endpoint = request.endpoint
        if endpoint == "locust.request_stats" and response.is_json:
            data = response.get_json()
            extended = [e for e in (data.get("extended_stats") or []) if e.get("key") != TAB_KEY]
            extended.append({"key": TAB_KEY, "data": live.tab_rows(self._snapshot)})
            data["extended_stats"] = extended
            response.set_data(json.dumps(data))
        elif endpoint == "locust.index" and response.mimetype == "text/html" and not response.direct_passthrough:
            html = response.get_data(as_text=True)
            if "llm/inject.js" not in html and "</body>" in html:
                html = html.replace("</body>", '<script src="./llm/inject.js"></script>\n</body>', 1)
                response.set_data(html)
        return response

    # -- reading -----------------------------------------------------------------------------
    def _tick_loop(self) -> None:
        while True:
            try:
                self.tick()
            except Exception as exc:  # the console must never take Locust down; say so once per kind
                what = f"{type(exc).__name__}: {exc}"
                if what not in self._failures_logged:
                    self._failures_logged.add(what)
                    log.exception("envelope: the LLM tab could not update")
            gevent.sleep(self.tick_s)

    def tick(self, now_unix_s: float | None = None) -> None:
        """Read new records and refresh the snapshot; add a chart point while a test runs."""
        ctx = self.ctx
        runner = self.environment.runner
        if ctx is None or runner is None:
            return
        if self.tailer is None and ctx.run_dir is not None:
            self.tailer = RecordTailer(Path(ctx.run_dir) / "records")
            keep_itl = any(k.startswith("itl_") for s in ctx.stages for k in dict(s.slos))
            self.aggregator = live.LiveAggregator(window_s=self.window_s, keep_itl=keep_itl)
        if self.aggregator is None or self.tailer is None:
            return
        self.aggregator.add(self.tailer.poll())
        now = time.time() if now_unix_s is None else now_unix_s
        state = str(runner.state)
        latest = self.aggregator.latest_end_unix_s
        frozen = state not in _LIVE_STATES and latest is not None
        window = self.aggregator.window(latest if frozen else now)
        stage = ctx.stage_log[-1] if ctx.stage_log else None
        slos = dict(stage.slos) if stage is not None else {}
        results = live.check_slos(window, slos)
        slo_pass = live.overall_slo(results)
        server = dict(self.server)
        if server.get("ok"):
            server["preemptions_in_window"] = live.counter_increase(list(self._preemptions), window.start_unix_s,
                                                                    window.end_unix_s)
        users = int(runner.user_count)
        in_flight, workers = self._in_flight(ctx, runner)
        records_dir = Path(ctx.run_dir) / "records"
        snapshot = {
            "now_unix_s": now,
            "state": state,
            "run_id": ctx.run_id,
            "manual": bool(ctx.manual),
            "users": users,
            "in_flight": in_flight,
            "workers": workers,
            "workers_ended": _workers_ended(ctx),
            "record_files": len(list(records_dir.glob("*.jsonl"))) if records_dir.is_dir() else 0,
            "unreadable_lines": self.tailer.skipped_lines,
            "window": {**window.to_dict(), "frozen": frozen, "full_s": self.window_s},
            "totals": self.aggregator.totals(),
            "stage": None if stage is None else {
                "index": stage.stage_index, "pass_name": stage.pass_name,
                "stage_name": stage.stage_name, "target_users": stage.target_users,
                "target_rate_per_s": stage.target_rate_per_s, "ended": stage.end_unix_s is not None,
            },
            "slos": slos,
            "slo_results": results,
            "slo_pass": slo_pass,
            "server": server,
            "search": live.search_section(ctx.run_dir),
        }
        self._snapshot = live.json_safe(snapshot)
        if state in _ACTIVE_STATES:
            self.history.append(live.HistoryPoint(
                t_unix_s=now, users=users, in_flight=in_flight,
                output_tokens_per_s=window.output_tokens_per_s,
                ttft_p95_ms=window.latency_ms["ttft"]["p95"],
                kv_cache_usage_ratio=server.get("kv_cache_usage_ratio") if server.get("ok") else None,
                requests_waiting=server.get("requests_waiting") if server.get("ok") else None,
                slo_pass=slo_pass,
                stage_index=None if stage is None else stage.stage_index,
                stage_name=None if stage is None else stage.stage_name,
                ttft_p95_slo_ms=slos.get("ttft_p95_ms"),
            ))

    @staticmethod
    def _in_flight(ctx, runner) -> tuple[int | None, int | None]:
        """Requests being sent now (a master sums its workers' last reports, at most 3 s old) and the worker count."""
        clients = getattr(runner, "clients", None)
        if clients is None:  # local runner: this process sends
            return int(ctx.in_flight), None
        ids = {node_id for node_id, node in clients.items() if getattr(node, "state", None) != "missing"}
        reports = [r for cid, r in ctx.worker_reports.items() if cid in ids]
        return sum(r.in_flight for r in reports), len(ids)

    def _scrape_loop(self) -> None:
        import httpx

        client: httpx.Client | None = None
        try:
            while True:
                ctx = self.ctx
                host = self.environment.host
                if ctx is not None and host:
                    if client is None:
                        client = httpx.Client(timeout=2.0, headers=ctx.auth_headers())
                        # httpx logs every request at INFO: a scrape every 2 s would drown Locust's log
                        logging.getLogger("httpx").addFilter(_NotMetricsScrape())
                    self._scrape(client, host)
                gevent.sleep(self.scrape_s)
        finally:
            if client is not None:
                client.close()

    def _scrape(self, client, host: str) -> None:
        from envelope.telemetry import MetricsSampler

        url = host.rstrip("/") + "/metrics"
        sample = MetricsSampler(url, timeout_s=2.0, client=client).sample()
        parts = urlsplit(url)
        shown = f"{parts.scheme}://{parts.hostname or ''}{f':{parts.port}' if parts.port else ''}{parts.path}"
        if not sample.get("ok"):
            self.server = {"ok": False, "url": shown, "t_unix_s": sample["t_unix_s"], "error": sample.get("error")}
            return
        keep = ("requests_running", "requests_waiting", "kv_cache_usage_ratio", "kv_cache_usage_max_ratio",
                "preemptions_total")
        self.server = {"ok": True, "url": shown, "t_unix_s": sample["t_unix_s"], **{k: sample.get(k) for k in keep}}
        if sample.get("preemptions_total") is not None:
            self._preemptions.append((sample["t_unix_s"], float(sample["preemptions_total"])))

    # -- routes ------------------------------------------------------------------------------
    def _page(self) -> Response:
        response = send_from_directory(ASSETS, "llm.html")
        response.headers["Cache-Control"] = "no-store"
        return response

    def _asset(self, name: str) -> Response:
        if name not in _ASSET_FILES:
            return make_response("not found", 404)
        response = send_from_directory(ASSETS, name)
        response.headers["Cache-Control"] = "no-store"
        return response

    def data(self, since: int = 0) -> dict[str, Any]:
        """The latest snapshot and the chart points numbered above ``since``."""
        points = [asdict(p) for p in self.history.since(since)]
        return {**self._snapshot, "history": live.json_safe(points), "history_seq": self.history.seq,
                "ready": bool(self._snapshot)}

    def _data(self) -> Response:
        try:
            since = int(request.args.get("since", "0"))
        except ValueError:
            since = 0
        response = jsonify(self.data(since))
        response.headers["Cache-Control"] = "no-store"
        return response

    def _run_dir(self) -> Path | None:
        ctx = self.ctx
        return None if ctx is None or ctx.run_dir is None else Path(ctx.run_dir)

    def _records(self) -> Response:
        run_dir = self._run_dir()
        if run_dir is None:
            return _text("no run directory yet: start a test first", 409)
        paths = sorted((run_dir / "records").glob("*.jsonl"))
        response = Response(_complete_lines(paths), mimetype="application/x-ndjson")
        response.headers["Content-Disposition"] = f'attachment; filename="{run_dir.name}-records.jsonl"'
        return response

    def make_report(self) -> tuple[Path | None, str]:
        """Run ``python -m analysis RUN_DIR`` (one at a time); the report directory, or None and why not."""
        run_dir = self._run_dir()
        if run_dir is None or not any((run_dir / "records").glob("*.jsonl")):
            return None, "no request records yet: start a test first"
        env = {k: v for k, v in os.environ.items() if not k.startswith("ENVELOPE_")}
        key_env = getattr(self.ctx.options, "api_key_env", None)
        if key_env:  # analysis needs no key; keep it out of the child's environment
            env.pop(key_env, None)
        with self._report_lock:
            try:
                proc = subprocess.run([sys.executable, "-m", "analysis", str(run_dir.resolve())], cwd=_REPO, env=env,
                                      stdin=subprocess.DEVNULL, capture_output=True, text=True,
                                      timeout=REPORT_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                return None, f"the analysis took longer than {REPORT_TIMEOUT_S:.0f} s and was stopped"
            except OSError as exc:
                return None, f"could not start the analysis: {exc}"
        if proc.returncode != 0:
            lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
            return None, f"the analysis failed: {lines[-1] if lines else f'exit status {proc.returncode}'}"
        report = run_dir / "report"
        if not (report / "envelope.html").is_file():
            return None, "the analysis wrote no envelope.html"
        return report, ""

    def _report_html(self) -> Response:
        report, why = self.make_report()
        if report is None:
            return _text(why, 409 if why.startswith("no request") else 500)
        return send_file(report / "envelope.html", mimetype="text/html", as_attachment=True,
                         download_name=f"{report.parent.name}-envelope.html", max_age=0)

    def _report_zip(self) -> Response:
        report, why = self.make_report()
        if report is None:
            return _text(why, 409 if why.startswith("no request") else 500)
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
            for path in sorted(report.rglob("*")):
                if path.is_file():
                    zf.write(path, f"{report.parent.name}/report/{path.relative_to(report)}")
        buf.seek(0)
        return send_file(buf, mimetype="application/zip", as_attachment=True,
                         download_name=f"{report.parent.name}-report.zip", max_age=0)


class _NotMetricsScrape(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "/metrics" not in str(record.args)


def _workers_ended(ctx) -> list[dict[str, Any]]:
    """Workers lost or gone mid-run, from the master's ledger (records they shipped are in the tab)."""
    ledger = getattr(ctx, "ledger", None)
    if ledger is None:
        return []
    return [{"worker": e.worker_id or e.node_id, "status": e.status, "ended_unix_s": e.ended_unix_s}
            for e in ledger.entries.values() if e.status in ("lost", "left")]


def _text(message: str, status: int) -> Response:
    response = make_response(message + "\n", status)
    response.mimetype = "text/plain"
    return response


def _complete_lines(paths: list[Path], chunk_bytes: int = 1 << 16) -> Iterator[bytes]:
    """The complete lines of each file as it is now (a line still being written is left out)."""
    for path in paths:
        try:
            fh = open(path, "rb")
        except OSError:
            continue
        with fh:
            carry = b""
            while True:
                chunk = fh.read(chunk_bytes)
                if not chunk:
                    break
                data = carry + chunk
                cut = data.rfind(b"\n") + 1
                if cut:
                    yield data[:cut]
                carry = data[cut:]
