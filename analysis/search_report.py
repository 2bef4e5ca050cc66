"""The write-up of a search pass: the envelope paragraph, and how the boundary was found.

Pure functions over a :class:`analysis.search.SearchFinding` (the bracket recomputed from the
table, the rows of its probes, the cause at the boundary, the knee, and ``search.json`` as it ran).
Every number printed comes from the finding; a missing one is left out, never guessed.
The cause is worded as :mod:`analysis.envelope` words it (:data:`analysis.envelope.CAUSE_PHRASES`).
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

from analysis import envelope as env
from analysis.common import finite, plain_number
from analysis.rows import TableRow
from analysis.search import SearchFinding
from envelope.search import LevelResult

__all__ = ["search_paragraph", "probe_table", "live_difference", "max_num_seqs"]


def max_num_seqs(server: Mapping[str, Any] | None) -> int | None:
    """The server's ``max_num_seqs`` from server.json (the launcher records it), else None."""
    value = (server or {}).get("max_num_seqs")
    return int(value) if finite(value) and value > 0 else None


def _amount(level: float, unit: str, *, concurrent: bool = False) -> str:
    if unit == "users":
        word = "user" if level == 1 else "users"
        return f"{plain_number(level)} {'concurrent ' if concurrent else ''}{word}"
    return f"{level:g} requests/s"


def _pct(ratio: float) -> str:
    return f"{ratio * 100:.0f}%" if ratio * 100 >= 10 else f"{ratio * 100:.1f}%"


def _attainment(result: LevelResult) -> str:
    """``83% (95% CI 74-90%, 48 requests)``."""
    a = result.attainment
    if not a.judged:
        return "no requests judged"
    return (f"{_pct(a.share)} ({a.confidence * 100:g}% CI {a.low * 100:.0f}-{a.high * 100:.0f}%, "
            f"{a.judged:,} requests)")


def _level(finding: SearchFinding, level: float | None) -> LevelResult | None:
    return next((r for r in finding.bracket.levels if r.level == level), None)


def _workload(finding: SearchFinding) -> str:
    """``At ~300-token prompts and 128 output tokens`` (the medians of the probes), or empty."""
    pass_finding = env.find_envelope(finding.rows, pass_name=finding.pass_name)
    parts = []
    if pass_finding.prompt_tokens is not None:
        tokens = pass_finding.prompt_tokens
        parts.append(f"~{int(round(tokens, -1)) if tokens >= 100 else int(round(tokens))}-token prompts")
    if pass_finding.output_tokens is not None:
        parts.append(f"{plain_number(pass_finding.output_tokens)} output tokens")
    return ("At " + " and ".join(parts) + ", ") if parts else ""


def _slos(finding: SearchFinding) -> str:
    said = finding.thresholds.describe()
    share = f">= {_pct(finding.target)} of requests"
    return f"({said} for {share})" if said else f"(attainment {share})"


def _delivering(row: TableRow | None) -> str:
    if row is None:
        return ""
    parts = []
    tps = row.throughput.aggregate_output_tokens_per_s
    if finite(tps):
        parts.append(f"delivering {tps:,.0f} output tokens/s")
    good = row.goodput.goodput_requests_per_s
    if finite(good):
        parts.append(f"(goodput {good:.3g} requests/s)" if parts else f"with goodput {good:.3g} requests/s")
    return (", " + " ".join(parts)) if parts else ""


def _falls(finding: SearchFinding) -> str:
    """``at 7 users attainment falls to 83% (...) because requests queued in the server (evidence)``."""
    lf = _level(finding, finding.bracket.lowest_fail)
    if lf is None:
        return ""
    because = env.CAUSE_PHRASES.get(finding.cause or "", "")
    evidence = f" ({'; '.join(finding.evidence)})" if finding.evidence else ""
    text = f"at {_amount(lf.level, finding.unit)} attainment falls to {_attainment(lf)}{because}{evidence}"
    if finding.cause == "errors" and finding.fail_row is not None:
        cats = finding.fail_row.counts.errors_by_category
        text += f", because requests failed ({cats})" if cats else ", because requests failed"
    return text


def search_paragraph(finding: SearchFinding, *, server: Mapping[str, Any] | None = None) -> str:
    """The envelope of one search pass in one paragraph: up to what load the server meets its SLOs, what
    it delivers there, what breaks next and why, and what the search left open.

    ``server``: server.json (for ``max_num_seqs``, when the launcher recorded it).
    """
    f, b, unit = finding, finding.bracket, finding.unit
    hp, lf = _level(f, b.highest_pass), _level(f, b.lowest_fail)
    conf = f"{f.spec.confidence * 100:g}% confidence"
    head = f"{_workload(f)}this server" if _workload(f) else "This server"
    slos = _slos(f)
    if b.status == "bracketed" and hp is not None and lf is not None:
        text = (f"{head} meets its SLOs {slos} up to {_amount(hp.level, unit, concurrent=True)} "
                f"(between {plain_number(hp.level) if unit == 'users' else f'{hp.level:g}'} and "
                f"{_amount(lf.level, unit)} at {conf}){_delivering(f.safe_row)}; {_falls(f)}.")
    elif b.status == "wide" and hp is not None and lf is not None:
        precision = f.spec.precision_at(hp.level)
        live = f.live.reason if f.live is not None else ""
        between = [x for x in b.unresolved if hp.level < x < lf.level]
        if "budget spent" in live:
            why = "the search's budget ran out before it could narrow the gap"
        elif between:
            why = ("only levels that stayed unresolved lie between them ("
                   + ", ".join(_amount(x, unit) for x in between) + ")")
        else:
            why = "the search ended before it could narrow the gap"
        text = (f"{head} meets its SLOs {slos} at {_amount(hp.level, unit, concurrent=True)}"
                f"{_delivering(f.safe_row)} and fails them at {_amount(lf.level, unit)}: the limit lies between "
                f"the two ({conf}), wider than the precision asked ({_amount(precision, unit)}) because {why}; "
                f"{_falls(f)}.")
    elif b.status == "above_max" and hp is not None:
        text = (f"{head} meets its SLOs {slos} at every level up to the search's maximum, "
                f"{_amount(hp.level, unit, concurrent=True)} (attainment {_attainment(hp)} there, {conf})"
                f"{_delivering(f.safe_row)}; the limit is higher than the search looked.")
    elif b.status == "below_min" and lf is not None:
        text = (f"{head} does not meet its SLOs {slos} even at the search's minimum, "
                f"{_amount(lf.level, unit)}: {_falls(f)}.")
    else:
        text = f"{head} was searched for the highest load that meets its SLOs {slos}: {b.describe(unit)}."
        if lf is not None:
            text += f" At the lowest failing level, {_falls(f)}."
    others = [x for x in b.unresolved if not (hp is not None and lf is not None and b.status == "wide"
                                              and hp.level < x < lf.level)]
    if others:
        text += (" Unresolved (attainment straddles the target after the probes there): "
                 + ", ".join(f"{_amount(x, unit)} at {_attainment(_level(f, x))}" for x in others) + ".")
    if b.non_monotone:
        text += (" Passed above the lowest failure, so not trusted: "
                 + ", ".join(f"{_amount(x, unit)} at {_attainment(_level(f, x))}" for x in b.non_monotone) + ".")
    if f.knee is not None:
        text += (f" Throughput levels off at ~{_amount(f.knee.level, unit)} "
                 f"({f.knee.output_tokens_per_s:,.0f} output tokens/s, peak {f.knee.peak_output_tokens_per_s:,.0f}).")
    seqs = max_num_seqs(server)
    if seqs is not None:
        text += f" The server runs at most {seqs} sequences at once (max_num_seqs {seqs})."
    over = [r for r in f.rows if r.goodput.over_capacity]
    if over:
        text += " " + over_capacity_text(over)
    if not f.done:
        text += " The search was cut short before its own rules ended it."
    return text + env.flagged_caveat([r for r in (f.safe_row, f.fail_row) if r is not None])


def over_capacity_text(rows: Sequence[TableRow]) -> str:
    """``Over capacity: no steady state at 8 requests/s (in flight rose ...).``"""
    parts = []
    for r in rows:
        note = r.goodput.over_capacity_note
        parts.append(f"{env.level_text(r)} ({r.stage_name}{': ' + note if note else ''})")
    return "Over capacity: no steady state at " + "; ".join(parts) + "."


def probe_table(finding: SearchFinding) -> list[tuple[str, ...]]:
    """One row per probe, in the order they ran: level, requests judged, attainment with CI, verdict,
    and the decision sentence ``search.json`` logged for it (header first)."""
    live = {p.stage_index: p for p in (finding.live.probes if finding.live is not None else ())}
    head = ("probe", "stage", finding.unit, "requests judged", "good", "attainment (95% CI)", "verdict",
            "decision (as it ran)")
    out = [head]
    target = finding.target
    for i, r in enumerate(finding.rows, 1):
        g = r.goodput
        level = r.window.target_users if finding.over == "users" else r.window.target_rate_per_s
        if g.attainment is not None and g.attainment_low is not None and g.attainment_high is not None:
            att = (f"{_pct(g.attainment)} ({g.attainment_low * 100:.0f}-{g.attainment_high * 100:.0f}%)")
            verdict = ("pass" if g.attainment_low >= target else "fail" if g.attainment_high < target
                       else "unresolved")
        else:
            att, verdict = "-", "-"
        if g.over_capacity:
            verdict += "; over capacity: no steady state"
        p = live.get(r.stage_index)
        decision = p.decision if p is not None and p.decision else "-"
        out.append((str(i), r.stage_name, plain_number(level) if finite(level) else "-", f"{r.counts.requests:,}",
                    "-" if g.good_requests is None else f"{g.good_requests:,}", att, verdict, decision))
    return out


def live_difference(finding: SearchFinding) -> str:
    """Whether the live answer (search.json) and the recomputed one agree, in one sentence."""
    live = finding.live
    if live is None:
        return "The run has no search.json: the answer above is recomputed from the records alone."
    b = finding.bracket
    same = (live.highest_pass == b.highest_pass and live.lowest_fail == b.lowest_fail
            and (not live.status or live.status == b.status))
    if not live.done:
        head = "The search did not finish by its own rules" + (f" ({live.reason})" if live.reason else "") + "."
    else:
        head = f"The search ended: {live.reason}." if live.reason else "The search ended."
    unit = finding.unit
    if same:
        return (f"{head} The live answer (counts over each probe after its settle time) and the recomputed one "
                f"(each probe's steady-state window, as in the table) agree: {b.describe(unit)}.")

    def ends(hp: float | None, lf: float | None, status: str) -> str:
        return (f"highest pass {'-' if hp is None else f'{hp:g}'}, lowest fail {'-' if lf is None else f'{lf:g}'}"
                f"{', ' + status if status else ''}")

    return (f"{head} The live answer and the recomputed one differ: live {ends(live.highest_pass, live.lowest_fail, live.status)}; "
            f"recomputed {ends(b.highest_pass, b.lowest_fail, b.status)}. The live search counted each probe's "
            "requests after its settle time; the report uses each probe's steady-state window (the table's), "
            f"and states the recomputed answer: {b.describe(unit)}.")
