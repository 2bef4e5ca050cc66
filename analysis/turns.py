"""TTFT by conversation turn: per stage, how the first token's wait changed as a conversation went on.

A multi-turn workload sends each conversation's turns in order, every turn's prompt holding the turns
before it; the server's prefix cache may serve that shared history, so a later turn's TTFT can stay
flat although its prompt grew. Records carry ``turn_index`` (0-based); stages whose records carry none
have no rows here.

The population per stage is its table row's (:func:`analysis.table.window_samples`): requests that
started in the steady-state window; TTFT percentiles over the successful ones (numpy's linear
interpolation, as the table); prompt tokens are the server's usage counts.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from typing import IO, Any, Iterable, Sequence

import numpy as np
import pandas as pd

from analysis.table import WindowSample, format_cell

__all__ = ["TurnRow", "has_turns", "turn_table", "turn_lines", "turn_summary_table", "write_turns_csv", "TURN_COLUMNS"]


@dataclass(frozen=True, slots=True, kw_only=True)
class TurnRow:
    """One turn of one stage's conversations over the stage's window.

    ``requests``: the window's requests at this turn (cancelled ones apart); ``ok_requests``: those
    that succeeded, the population of the TTFT percentiles and of ``prompt_tokens_p50``.
    """

    pass_name: str
    stage_name: str
    stage_index: int
    turn_index: int
    requests: int
    ok_requests: int
    ttft_p50_ms: float
    ttft_p95_ms: float
    prompt_tokens_p50: float


TURN_COLUMNS: tuple[str, ...] = ("pass_name", "stage_name", "stage_index", "turn_index", "requests", "ok_requests",
                                 "ttft_p50_ms", "ttft_p95_ms", "prompt_tokens_p50")
"""The columns of ``turns.csv``, the fields of :class:`TurnRow` in order."""


def has_turns(frame: pd.DataFrame) -> bool:
    """Whether any record of ``frame`` carries a conversation turn."""
    return bool(len(frame)) and "turn_index" in frame.columns and bool(frame["turn_index"].notna().any())


def turn_table(frame: pd.DataFrame, samples: Sequence[WindowSample]) -> list[TurnRow]:
    """Per stage (in ``samples`` order) and turn (ascending), the window's requests at that turn.

    ``frame``: the run's records frame (``Run.frame``, with its ``turn_index`` column); ``samples``:
    :func:`analysis.table.window_samples` of the same run. Empty when no record carries a turn.
    """
    if not has_turns(frame):
        return []
    turn = pd.to_numeric(frame["turn_index"], errors="coerce").to_numpy(dtype=float, na_value=np.nan)
    ttft = _num(frame, "ttft_ms")
    prompt = _num(frame, "prompt_tokens")
    out: list[TurnRow] = []
    for sample in samples:
        counted = sample.counted & ~np.isnan(turn)
        for t in np.unique(turn[counted]):
            at = counted & (turn == t)
            ok = at & sample.ok
            p50, p95 = _percentiles(ttft[ok], (50, 95))
            out.append(TurnRow(pass_name=sample.stage.pass_name, stage_name=sample.stage.stage_name,
                               stage_index=sample.stage.stage_index, turn_index=int(t), requests=int(at.sum()),
                               ok_requests=int(ok.sum()), ttft_p50_ms=p50, ttft_p95_ms=p95,
                               prompt_tokens_p50=_percentiles(prompt[ok], (50,))[0]))
    return out


def turn_lines(rows: Sequence[TurnRow]) -> list[str]:
    """Per stage with two turns or more: its first turn set against its last, in one sentence."""
    by_stage: dict[int, list[TurnRow]] = {}
    for r in rows:
        by_stage.setdefault(r.stage_index, []).append(r)
    lines = []
    for turns in by_stage.values():
        measured = [r for r in turns if r.ok_requests]
        if len(measured) < 2:
            continue
        first, last = measured[0], measured[-1]
        lines.append(f"{first.stage_name}: TTFT p50 {_at_turn(first)} and {_at_turn(last)}.")
    return lines


TURN_SUMMARY_COLUMNS = ("pass", "stage", "turn", "requests", "n", "TTFT p50 ms", "TTFT p95 ms", "prompt tokens p50")


def turn_summary_table(rows: Sequence[TurnRow]) -> list[tuple[str, ...]]:
    """The turn table for the report (turns counted from 1), header first."""
    out = [TURN_SUMMARY_COLUMNS]
    for r in rows:
        out.append((r.pass_name, r.stage_name, str(r.turn_index + 1), f"{r.requests:,}", f"{r.ok_requests:,}",
                    format_cell("ttft_p50_ms", r.ttft_p50_ms), format_cell("ttft_p95_ms", r.ttft_p95_ms),
                    _tokens(r.prompt_tokens_p50)))
    return out


def _at_turn(r: TurnRow) -> str:
    prompt = f"{_tokens(r.prompt_tokens_p50)} prompt tokens, " if math.isfinite(r.prompt_tokens_p50) else ""
    requests = f"{r.ok_requests:,} request" + ("" if r.ok_requests == 1 else "s")
    return f"{_ms(r.ttft_p50_ms)} ms at turn {r.turn_index + 1} ({prompt}{requests})"


def write_turns_csv(rows: Iterable[TurnRow], sink: IO[str]) -> None:
    """Write the turn table as CSV to a text sink (``turn_index`` 0-based, as in the records)."""
    writer = csv.writer(sink, lineterminator="\n")
    writer.writerow(TURN_COLUMNS)
    for r in rows:
        writer.writerow([_cell(getattr(r, c)) for c in TURN_COLUMNS])


def _cell(value: Any) -> Any:
    if isinstance(value, float):
        return "" if math.isnan(value) else repr(round(value, 6))
    return value


def _percentiles(values: np.ndarray, qs: tuple[float, ...]) -> list[float]:
    values = values[~np.isnan(values)]
    if not values.size:
        return [math.nan] * len(qs)
    return [float(v) for v in np.percentile(values, qs)]


def _num(frame: pd.DataFrame, column: str) -> np.ndarray:
    if column not in frame.columns:
        return np.full(len(frame), np.nan)
    return pd.to_numeric(frame[column], errors="coerce").to_numpy(dtype=float, na_value=np.nan)


def _ms(value: float) -> str:
    return "-" if not math.isfinite(value) else f"{value:,.0f}" if abs(value) >= 10 else f"{value:.2g}"


def _tokens(value: float) -> str:
    return "-" if not math.isfinite(value) else f"{value:,.0f}"
