"""The envelope per client class, and whether one class hurt another.

Pure functions over :class:`~analysis.rows.ClientRow` (see :func:`analysis.table.client_table`):

* :func:`client_findings`: per client class and pass, what :func:`analysis.envelope.find_envelope`
  finds over that class's rows, judged against the class's own SLOs;
* :func:`client_sentence`: that finding in words, with the stages named and the load given as the
  stage's users in all (and how many of them were the class's own);
* :func:`find_interference`: for a class measured in two stages whose other classes differ (it ran
  alone in one, beside another class in the other), its TTFT p95 in each; :func:`interference_sentence`
  says it, and whether the class's own load was the same in both (its distinct users), since a
  change of load explains a change of latency as well as a neighbour does.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Sequence

from analysis import envelope as env
from analysis.common import METRIC_NAMES, adaptive_percent, finite, grouped_number, plain_number, split_key
from analysis.rows import ClientRow, TableRow
from analysis.table import format_cell

__all__ = [
    "ClientFinding",
    "Interference",
    "client_findings",
    "client_sentence",
    "classes_headline",
    "find_interference",
    "interference_sentence",
    "client_summary_table",
    "slo_text",
    "CLIENT_SUMMARY_COLUMNS",
]

CLIENT_SUMMARY_COLUMNS = ("pass", "stage", "load", "class", "its users", "requests", "TTFT p50 ms", "TTFT p95 ms",
                          "TPOT p95 ms", "attainment", "SLOs")


@dataclass(frozen=True, slots=True, kw_only=True)
class ClientFinding:
    """What one client class's rows in one pass say about its envelope (``rows``: those rows)."""

    client: str
    pass_name: str
    finding: env.EnvelopeFinding
    rows: tuple[ClientRow, ...] = ()

    @property
    def slos(self) -> Mapping[str, float]:
        """The class's SLOs at its highest stage (a class keeps its SLOs across a pass's stages)."""
        return self.rows[-1].slos if self.rows else {}

    def client_row(self, row: TableRow | None) -> ClientRow | None:
        """The class row whose table row is ``row``."""
        return next((r for r in self.rows if row is not None and r.row is row), None)


@dataclass(frozen=True, slots=True, kw_only=True)
class Interference:
    """One class's TTFT p95 in a stage without some other classes and in one with them.

    ``others``: the classes that sent in ``with_stage`` and not in ``without_stage``.
    ``users_without``/``users_with``: the class's own distinct users in each (None: not recorded).
    ``slo_pass_*``: the class's SLO verdict in each stage (None: no SLOs checked).
    """

    client: str
    others: tuple[str, ...]
    without_stage: str
    with_stage: str
    ttft_p95_without_ms: float
    ttft_p95_with_ms: float
    users_without: int | None = None
    users_with: int | None = None
    slo_pass_without: bool | None = None
    slo_pass_with: bool | None = None
    slos: Mapping[str, float] = field(default_factory=dict)

    @property
    def change_ratio(self) -> float | None:
        """with / without - 1 (None when the TTFT without is not a positive number)."""
        a, b = self.ttft_p95_without_ms, self.ttft_p95_with_ms
        return b / a - 1.0 if finite(a) and finite(b) and a > 0 else None

    @property
    def same_load(self) -> bool | None:
        """Whether the class had as many users of its own in both stages (None: cannot be told)."""
        if self.users_without is None or self.users_with is None:
            return None
        return self.users_without == self.users_with


def client_findings(rows: Sequence[ClientRow]) -> list[ClientFinding]:
    """One finding per (class, pass), classes in name order, passes in the order they first appear."""
    groups: dict[tuple[str, str], list[ClientRow]] = {}
    passes: list[str] = []
    for r in rows:
        if r.row.pass_name not in passes:
            passes.append(r.row.pass_name)
        groups.setdefault((r.client, r.row.pass_name), []).append(r)
    out = []
    for (client, pass_name), mine in sorted(groups.items(), key=lambda kv: (kv[0][0], passes.index(kv[0][1]))):
        ordered = tuple(sorted(mine, key=lambda r: _level(r.row)))
        finding = env.find_envelope([r.row for r in ordered], pass_name=pass_name)
        out.append(ClientFinding(client=client, pass_name=pass_name, finding=finding, rows=ordered))
    return out


def client_sentence(found: ClientFinding) -> str:
    """The class's envelope in one or two sentences (see the module docstring)."""
    f, c = found.finding, found.client
    slos = slo_text(found.slos)
    its = f"its SLOs ({slos})" if slos else "its SLOs"

    def at(row: TableRow | None) -> str:
        assert row is not None
        return f"stage {row.stage_name} ({_load(row, found.client_row(row), c)})"

    if f.status == "server_stopped":
        return f"{c}: the server stopped answering before any stage {c} ran in finished, so its envelope is unknown."
    if f.status == "no_data":
        return f"{c}: no successful request of {c} fell inside a steady-state window, so no envelope can be stated."
    if f.status == "no_slos":
        r = f.safe_row
        assert r is not None
        text = (f"{c} had no SLOs, so no envelope is stated; its highest throughput was "
                f"{_tps(r.throughput.aggregate_output_tokens_per_s)} output tokens/s at {at(r)}, "
                f"TTFT p95 {_ms(r.latency.ttft_p95_ms)} ms.")
    elif f.status == "all_pass":
        r = f.safe_row
        assert r is not None
        text = (f"{c} meets {its} at every stage it ran in, up to {at(r)}, where its TTFT p95 was "
                f"{_ms(r.latency.ttft_p95_ms)} ms; its limit is above that.")
    elif f.status == "none_pass":
        text = f"{c} met {its} at no stage: at {at(f.broke_row)} {env.broke_text(f)}"
    else:  # broke
        safe = f.safe_row
        assert safe is not None
        text = (f"{c} meets {its} up to {at(safe)}, TTFT p95 {_ms(safe.latency.ttft_p95_ms)} ms; "
                f"at {at(f.broke_row)} {env.broke_text(f)}")
    return text + env.flagged_caveat([r for r in (f.safe_row, f.broke_row) if r is not None])


def classes_headline(findings: Sequence[ClientFinding]) -> str | None:
    """One line for the envelope's first screen: which classes met their own SLOs where (None: none judged)."""
    several = len({f.pass_name for f in findings}) > 1
    clauses = []
    for found in findings:
        f, c = found.finding, found.client
        where = f" in pass {found.pass_name}" if several else ""
        if f.status == "all_pass":
            clauses.append(f"{c} met its own SLOs at every stage{where}" if where
                           else f"{c} met its own SLOs at every stage it ran in")
        elif f.status == "broke" and f.safe_row is not None and f.broke_row is not None:
            clauses.append(f"{c} met its own SLOs up to stage {f.safe_row.stage_name} and broke them at stage "
                           f"{f.broke_row.stage_name}{where}")
        elif f.status == "none_pass" and f.broke_row is not None:
            clauses.append(f"{c} met its own SLOs at no stage{where} (from stage {f.broke_row.stage_name})")
    return "; ".join(clauses) + "." if clauses else None


def find_interference(rows: Sequence[ClientRow]) -> list[Interference]:
    """Per class and per stage where other classes sent beside it, the comparison with a stage without some of them.

    The stage compared against is one where the class sent with a strict subset of those other classes
    (alone, typically), chosen in this order: the class had as many users of its own there, it is in the
    same pass, it is the nearest stage. Stages where the server had stopped, or where the class had no
    successful request, are not compared.
    """
    by_client: dict[str, list[ClientRow]] = {}
    for r in rows:
        if r.row.trust.server_stopped or not r.row.counts.ok_requests:
            continue
        by_client.setdefault(r.client, []).append(r)
    out = []
    for client in sorted(by_client):
        mine = by_client[client]
        for b in mine:
            others_b = set(b.stage_clients) - {client}
            if not others_b:
                continue
            candidates = [a for a in mine if set(a.stage_clients) - {client} < others_b]
            if not candidates:
                continue

            def preference(a: ClientRow, b: ClientRow = b) -> tuple[int, int, int]:
                same_users = a.client_users is not None and a.client_users == b.client_users
                return (0 if same_users else 1, 0 if a.row.pass_name == b.row.pass_name else 1,
                        abs(a.row.stage_index - b.row.stage_index))

            a = min(candidates, key=preference)
            out.append(Interference(
                client=client, others=tuple(sorted(others_b - set(a.stage_clients))),
                without_stage=a.row.stage_name, with_stage=b.row.stage_name,
                ttft_p95_without_ms=a.row.latency.ttft_p95_ms, ttft_p95_with_ms=b.row.latency.ttft_p95_ms,
                users_without=a.client_users, users_with=b.client_users,
                slo_pass_without=a.row.slo.slo_pass, slo_pass_with=b.row.slo.slo_pass, slos=b.slos))
    return out


def interference_sentence(i: Interference) -> str:
    """``chat-app's TTFT p95 was 120 ms without eval-runner (stage chat-alone) and 480 ms with it ...``."""
    others = _join(i.others)
    it = "it" if len(i.others) == 1 else "them"
    change = i.change_ratio
    delta = "" if change is None else f": {'+' if change >= 0 else '-'}{adaptive_percent(abs(change))}"
    text = (f"{i.client}'s TTFT p95 was {_ms(i.ttft_p95_without_ms)} ms without {others} (stage {i.without_stage}) "
            f"and {_ms(i.ttft_p95_with_ms)} ms with {it} (stage {i.with_stage}){delta}; ")
    slos = slo_text(i.slos)
    several = len(_slo_parts(i.slos)) != 1
    subject = f"its SLO{'s' if several else ''}" + (f" ({slos})" if slos else "")
    verb = "were" if several else "was"
    a, b = i.slo_pass_without, i.slo_pass_with
    if a is None and b is None:
        text += "no SLO of it was checked."
    elif a == b:
        text += f"{subject} {verb} {_verdict(a)} in both."
    else:
        text += f"{subject} {verb} {_verdict(a)} without {it} and {_verdict(b)} with {it}."
    if i.same_load is True:
        text += f" It had {i.users_with} user{'s' if i.users_with != 1 else ''} of its own in both."
    elif i.same_load is False:
        text += (f" The loads differ: {i.client} had {i.users_without} user{'s' if i.users_without != 1 else ''} in "
                 f"{i.without_stage} and {i.users_with} in {i.with_stage}, so the change is not {others}'s alone.")
    else:
        text += (f" {i.client}'s own users are not recorded, so whether its load was the same in both cannot be told.")
    return text


def client_summary_table(rows: Sequence[ClientRow]) -> list[tuple[str, ...]]:
    """Per (stage, class): load, the class's users, requests, TTFT p50/p95, TPOT p95, attainment, SLOs; header first."""
    out = [CLIENT_SUMMARY_COLUMNS]
    for c in rows:
        r = c.row
        g = r.goodput
        if g.attainment is not None and g.attainment_low is not None and g.attainment_high is not None:
            att = f"{adaptive_percent(g.attainment)} ({g.attainment_low * 100:.0f}-{g.attainment_high * 100:.0f}%)"
        else:
            att = "-"
        slo = "not judged: server stopped" if r.trust.server_stopped else format_cell("slo_pass", r.slo.slo_pass)
        out.append((r.pass_name, r.stage_name, env.level_text(r), c.client,
                    "-" if c.client_users is None else f"{c.client_users:,}", f"{r.counts.requests:,}",
                    format_cell("ttft_p50_ms", r.latency.ttft_p50_ms), format_cell("ttft_p95_ms", r.latency.ttft_p95_ms),
                    format_cell("tpot_p95_ms", r.latency.tpot_p95_ms), att, slo))
    return out


def slo_text(slos: Mapping[str, float]) -> str:
    """SLOs in words: ``TTFT p95 <= 500 ms, errors <= 1%``."""
    return ", ".join(_slo_parts(slos))


def _slo_parts(slos: Mapping[str, float]) -> list[str]:
    parts = []
    for key, value in slos.items():
        if not finite(value):
            continue
        if key == "error_rate_max":
            parts.append(f"errors <= {adaptive_percent(value)}")
        elif key == "attainment_min":
            parts.append(f"attainment >= {adaptive_percent(value)}")
        elif key == "min_output_tokens_per_s":
            parts.append(f"output >= {grouped_number(value)} tokens/s")
        elif key in ("ttft_ms", "tpot_ms", "e2e_ms"):
            parts.append(f"{METRIC_NAMES[key[:-3]]} <= {grouped_number(value)} ms per request")
        elif key.endswith("_ms"):
            metric, pct = split_key(key)
            parts.append(f"{METRIC_NAMES.get(metric, metric.upper())} {pct} <= {grouped_number(value)} ms")
        else:
            parts.append(f"{key} {value:g}")
    return parts


def _load(row: TableRow, client_row: ClientRow | None, client: str) -> str:
    text = f"{env.level_text(row)} in all"
    if client_row is not None and client_row.client_users is not None:
        text += f", {client_row.client_users} of them {client}"
    return text


def _verdict(passed: bool | None) -> str:
    return {True: "met", False: "broken", None: "not checked"}[passed]


def _join(names: Sequence[str]) -> str:
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


def _level(r: TableRow) -> tuple[float, int]:
    for v in (r.window.target_users, r.window.target_rate_per_s, r.window.mean_in_flight):
        if finite(v):
            return float(v), r.stage_index
    return 0.0, r.stage_index


def _ms(value: float | None) -> str:
    return "?" if not finite(value) else f"{value:,.0f}" if abs(value) >= 10 else f"{value:.2g}"


def _tps(value: float | None) -> str:
    return "?" if not finite(value) else plain_number(round(value))

