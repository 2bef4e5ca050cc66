"""Live progress of a run, read from its run directory while Locust writes it.

:class:`RecordTailer` reads only the complete lines appended to each
``records/*.jsonl`` since its last call (one byte offset per file);
:class:`LiveWindow` keeps the counts and the last seconds of completed
requests and answers :meth:`LiveWindow.snapshot`. Both are pure of any
display; :class:`ProgressDisplay` renders a snapshot with rich on a terminal,
or as one plain line every ``plain_interval_s`` elsewhere (CI logs).

The window is over requests that *completed* in the last ``window_s``:
output tokens/s is their output tokens divided by the window, which in a
steady state equals the rate at which tokens are produced; p95 TTFT is over
the successful ones.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, TextIO

import numpy as np
import orjson

from envelope.records import upgrade_record
from envelope.search_log import read_search_log
from envelope.stages import read_stages

__all__ = [
    "LiveSnapshot",
    "LiveWindow",
    "RecordTailer",
    "StageInfo",
    "current_stage",
    "format_line",
    "ProgressDisplay",
]


@dataclass(frozen=True, slots=True, kw_only=True)
class LiveSnapshot:
    """Totals since the start and the last ``window_s`` of completed requests."""

    requests: int
    errors: int
    window_s: float
    window_requests: int
    output_tokens_per_s: float  # output tokens of requests completed in the window / window_s
    ttft_p95_ms: float  # NaN when no successful request completed in the window


class LiveWindow:
    """Running counts and a sliding window over completed request records (dicts)."""

    def __init__(self, *, window_s: float = 10.0) -> None:
        if window_s <= 0:
            raise ValueError("window_s must be positive")
        self.window_s = window_s
        self.requests = 0
        self.errors = 0
        self._recent: list[tuple[float, int, float]] = []  # (end_unix_s, output_tokens, ttft_ms or NaN)
        self._latest_end_unix_s = -math.inf

    def __repr__(self) -> str:
        return f"LiveWindow(window_s={self.window_s}, requests={self.requests}, errors={self.errors})"

    def add(self, records: Iterable[Mapping[str, Any]]) -> None:
        """Count ``records`` and keep what the window needs from each."""
        for rec in records:
            self.requests += 1
            ok = rec.get("error_category") is None
            if not ok:
                self.errors += 1
            t_start = rec.get("t_start_s")
            wall = rec.get("wall_start_unix_s")
            if t_start is None or wall is None:
                continue
            t_done = next((rec[k] for k in ("t_done_s", "t_last_token_s", "t_first_token_s")
                           if rec.get(k) is not None), t_start)
            end_unix_s = float(wall) + float(t_done) - float(t_start)
            ttft_ms = math.nan
            if ok and rec.get("t_first_token_s") is not None:
                ttft_ms = (float(rec["t_first_token_s"]) - float(t_start)) * 1000.0
            self._recent.append((end_unix_s, int(rec.get("output_tokens") or 0), ttft_ms))
            self._latest_end_unix_s = max(self._latest_end_unix_s, end_unix_s)
        # Keep a few windows' worth: records from several files arrive out of order.
        horizon = self._latest_end_unix_s - 6 * self.window_s
        if self._recent and self._recent[0][0] < horizon:
            self._recent = [r for r in self._recent if r[0] >= horizon]

    def snapshot(self, now_unix_s: float) -> LiveSnapshot:
        """The counts, and the requests that completed in ``(now - window_s, now]``."""
        lo = now_unix_s - self.window_s
        mine = [r for r in self._recent if lo < r[0] <= now_unix_s]
        ttfts = np.array([r[2] for r in mine], dtype=float)
        ttfts = ttfts[~np.isnan(ttfts)]
        return LiveSnapshot(
            requests=self.requests,
            errors=self.errors,
            window_s=self.window_s,
            window_requests=len(mine),
            output_tokens_per_s=sum(r[1] for r in mine) / self.window_s,
            ttft_p95_ms=float(np.percentile(ttfts, 95)) if ttfts.size else math.nan,
        )


class RecordTailer:
    """Reads the complete lines appended to ``records_dir/*.jsonl`` since the previous :meth:`poll`."""

    def __init__(self, records_dir: str | os.PathLike[str]) -> None:
        self.records_dir = Path(records_dir)
        self._offsets: dict[Path, int] = {}
        self.skipped_lines = 0

    def __repr__(self) -> str:
        return f"RecordTailer(records_dir={str(self.records_dir)!r}, files={len(self._offsets)})"

    def poll(self) -> list[dict]:
        """New complete records from every file (a line still being written waits for the next poll).

        Fields renamed since older runs come back under their current names
        (:func:`envelope.records.upgrade_record`).
        """
        out: list[dict] = []
        try:
            paths = sorted(self.records_dir.glob("*.jsonl"))
        except OSError:
            return out
        for path in paths:
            offset = self._offsets.get(path, 0)
            try:
                with open(path, "rb") as fh:
                    fh.seek(offset)
                    data = fh.read()
            except OSError:
                continue
            end = data.rfind(b"\n")
            if end < 0:
                continue
            self._offsets[path] = offset + end + 1
            for line in data[: end + 1].splitlines():
                if not line.strip():
                    continue
                try:
                    obj = orjson.loads(line)
                except orjson.JSONDecodeError:
                    self.skipped_lines += 1
                    continue
                if isinstance(obj, dict):
                    out.append(upgrade_record(obj))
        return out


@dataclass(frozen=True, slots=True, kw_only=True)
class StageInfo:
    """The stage running now, from ``stages.json``."""

    pass_name: str
    stage_name: str
    stage_number: int  # 1-based position in stages.json
    target_users: int | None
    target_rate_per_s: float | None
    start_unix_s: float
    duration_s: float | None
    ended: bool = False  # the last stage has an end time: the schedule is done, Locust is draining
    search_note: str | None = None  # a search probe: which one, and the answer so far (search.json)


def current_stage(run_dir: str | os.PathLike[str]) -> StageInfo | None:
    """The last stage listed in ``run_dir/stages.json``; None before the first (or if unreadable)."""
    try:
        stages = read_stages(run_dir)
    except (OSError, ValueError):  # not written yet, or caught mid-rename on a filesystem without atomic replace
        return None
    if not stages:
        return None
    s = stages[-1]
    note = _search_note(run_dir, s.pass_name)
    return StageInfo(
        pass_name=s.pass_name,
        stage_name=s.stage_name,
        stage_number=len(stages),
        target_users=s.target_users,
        target_rate_per_s=s.target_rate_per_s,
        start_unix_s=float(s.start_unix_s),
        duration_s=None if note is not None else s.duration_s,  # a probe's duration is only its longest
        ended=s.end_unix_s is not None,
        search_note=note,
    )


def _search_note(run_dir: str | os.PathLike[str], pass_name: str) -> str | None:
    """``probe 3 of the search; so far between 8 and 16 users`` for a search pass (None otherwise)."""
    try:
        searches = read_search_log(run_dir)
    except ValueError:
        return None
    entry = next((e for e in searches if e.pass_name == pass_name), None)
    if entry is None:
        return None
    unit = "users" if entry.over == "users" else "req/s"
    note = f"probe {len(entry.probes) + (0 if entry.done else 1)} of the search"
    if entry.highest_pass is not None and entry.lowest_fail is not None:
        note += f"; so far between {entry.highest_pass:g} and {entry.lowest_fail:g} {unit}"
    elif entry.highest_pass is not None:
        note += f"; so far passes at {entry.highest_pass:g} {unit}"
    elif entry.lowest_fail is not None:
        note += f"; so far fails at {entry.lowest_fail:g} {unit}"
    return note


def format_line(snap: LiveSnapshot, stage: StageInfo | None, *, now_unix_s: float, elapsed_s: float) -> str:
    """One plain line: time, stage, target, requests/errors, tokens/s and p95 TTFT over the window."""
    parts = [f"[{elapsed_s:5.0f} s]"]
    if stage is None:
        parts.append("waiting for the first stage")
    elif stage.ended:
        parts.append(f"schedule done after {stage.pass_name} / {stage.stage_name}; waiting for Locust to finish")
    else:
        into = now_unix_s - stage.start_unix_s
        of = f"/{stage.duration_s:.0f}" if stage.duration_s else ""
        parts.append(f"{stage.pass_name} / {stage.stage_name} ({into:.0f}{of} s"
                     + (f", {stage.search_note})" if stage.search_note else ")"))
        if stage.target_users is not None:
            parts.append(f"target {stage.target_users} users")
        elif stage.target_rate_per_s is not None:
            parts.append(f"target {stage.target_rate_per_s:g} req/s")
    parts.append(f"{snap.requests} requests, {snap.errors} errors")
    ttft = "-" if math.isnan(snap.ttft_p95_ms) else f"{snap.ttft_p95_ms:,.0f} ms"
    parts.append(f"last {snap.window_s:g} s: {snap.output_tokens_per_s:,.0f} out tok/s, p95 TTFT {ttft}")
    return " | ".join(parts)


class ProgressDisplay:
    """Shows progress of ``run_dir``: a rich live panel on a TTY, else a plain line every ``plain_interval_s``."""

    def __init__(self, run_dir: str | os.PathLike[str], *, stream: TextIO, tty: bool,
                 window_s: float = 10.0, plain_interval_s: float = 10.0) -> None:
        self.run_dir = Path(run_dir)
        self.stream = stream
        self.tty = tty
        self.plain_interval_s = plain_interval_s
        self.window = LiveWindow(window_s=window_s)
        self.tailer = RecordTailer(self.run_dir / "records")
        self._t0 = time.time()
        self._last_plain_s = -math.inf
        self._live: Any = None

    def __repr__(self) -> str:
        return f"ProgressDisplay(run_dir={str(self.run_dir)!r}, tty={self.tty})"

    def start(self) -> None:
        if self.tty:
            from rich.console import Console
            from rich.live import Live

            self._live = Live(console=Console(file=self.stream), refresh_per_second=2, transient=False)
            self._live.start()

    def update(self, now_unix_s: float | None = None, *, force: bool = False) -> None:
        """Read new records and refresh the display."""
        now = time.time() if now_unix_s is None else now_unix_s
        self.window.add(self.tailer.poll())
        line = format_line(self.window.snapshot(now), current_stage(self.run_dir),
                           now_unix_s=now, elapsed_s=now - self._t0)
        if self._live is not None:
            from rich.text import Text

            self._live.update(Text(line))
        elif force or now - self._last_plain_s >= self.plain_interval_s:
            self._last_plain_s = now
            self.stream.write(line + "\n")
            self.stream.flush()

    def stop(self) -> None:
        if self._live is not None:
            self._live.stop()
            self._live = None
