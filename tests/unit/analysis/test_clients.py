"""Rows per client class, their envelope sentences, and whether one class hurt another, worked out by hand.

The run: stage chat-alone (2 users, all chat-app) then chat-with-eval (4 users: 2 chat-app, 2 eval-runner).
chat-app has SLOs of its own (TTFT p95 <= 500 ms); eval-runner has the stage's (TTFT p95 <= 2000 ms).
Windows (ramp = users / spawn rate 1, settle 5 s): chat-alone [1007, 1060], chat-with-eval [1069, 1120].
"""

from __future__ import annotations

import csv
import io

import pytest

from analysis import clients as cl
from analysis.load import load_run
from analysis.report import write_report
from analysis.rows import ClientRow, TableRow
from analysis.table import client_table, envelope_table

CHAT_SLOS = {"ttft_p95_ms": 500.0, "error_rate_max": 0.01}


def _mixed_run(builders, root, *, chat_users_with=2, user_ids=True):
    make_stage, make_record, write_run = builders
    alone = make_stage(0, 2, 1000.0, 1060.0, pass_name="mix")
    alone["stage_name"] = "chat-alone"
    both = make_stage(1, 4, 1060.0, 1120.0, pass_name="mix")
    both["stage_name"] = "chat-with-eval"
    for st in (alone, both):
        st["client_slos"] = {"chat-app": CHAT_SLOS}

    def rec(stage, t, ttft, client, user):
        r = make_record(stage, t, ttft)
        r["client"] = client
        r["user_id"] = user if user_ids else None
        return r

    recs = [rec(alone, 1010.0 + 10 * i, ttft, "chat-app", f"h:1/{i % 2}")
            for i, ttft in enumerate((0.1, 0.2, 0.3, 0.4))]
    recs += [rec(both, 1070.0 + 10 * i, ttft, "chat-app", f"h:1/{i % chat_users_with}")
             for i, ttft in enumerate((0.45, 0.55, 0.6, 0.7))]
    recs += [rec(both, 1075.0 + 10 * i, ttft, "eval-runner", f"h:1/{5 + i}") for i, ttft in enumerate((1.0, 1.2))]
    recs.append(rec(both, 1062.0, 3.0, "eval-runner", "h:1/5"))  # before the window: not counted
    return write_run(root, stages=[alone, both], records=recs)


@pytest.fixture
def mixed(builders, tmp_path):
    run = load_run(_mixed_run(builders, tmp_path / "mixed"))
    rows = envelope_table(run)
    return run, rows, client_table(run, rows=rows)


def test_rows_per_stage_and_class_over_the_stage_window(mixed):
    _, rows, clients = mixed
    assert [(c.row.stage_name, c.client) for c in clients] == [
        ("chat-alone", "chat-app"), ("chat-with-eval", "chat-app"), ("chat-with-eval", "eval-runner")]
    alone, chat, evals = clients
    assert alone.stage_clients == ("chat-app",)
    assert chat.stage_clients == evals.stage_clients == ("chat-app", "eval-runner")
    assert alone.client_users == chat.client_users == evals.client_users == 2
    # chat-alone: TTFT 100..400 ms; p95 at rank 0.95 * 3 = 2.85: 300 + 0.85 * 100
    assert alone.row.counts.requests == 4
    assert alone.row.latency.ttft_p50_ms == pytest.approx(250.0)
    assert alone.row.latency.ttft_p95_ms == pytest.approx(385.0)
    # chat-with-eval, chat-app only: 450, 550, 600, 700 ms -> p50 575, p95 600 + 0.85 * 100
    assert chat.row.counts.requests == 4
    assert chat.row.latency.ttft_p50_ms == pytest.approx(575.0)
    assert chat.row.latency.ttft_p95_ms == pytest.approx(685.0)
    assert chat.row.latency.tpot_p95_ms == pytest.approx(50.0)
    # the same window as the stage's row
    stage_row = rows[1]
    assert chat.row.window.window_start_s == stage_row.window.window_start_s == pytest.approx(69.0)
    assert stage_row.counts.requests == 6  # the stage row counts both classes
    # eval-runner: 1000 and 1200 ms (the one sent at 1062 is before the window)
    assert evals.row.counts.requests == 2
    assert evals.row.latency.ttft_p95_ms == pytest.approx(1190.0)


def test_each_class_is_judged_against_its_own_slos(mixed):
    _, rows, (alone, chat, evals) = mixed
    assert alone.slos == CHAT_SLOS and evals.slos == {"ttft_p95_ms": 2000, "error_rate_max": 0.01}
    assert alone.row.slo.slo_pass is True
    assert chat.row.slo.slo_pass is False
    ttft = next(r for r in chat.row.slo.slo_results if r.key == "ttft_p95_ms")
    assert (ttft.threshold, ttft.measured, ttft.passed) == (500.0, pytest.approx(685.0), False)
    # attainment against chat-app's 500 ms per-request threshold: only the 450 ms request was good
    assert chat.row.goodput.good_requests == 1 and chat.row.goodput.attainment == pytest.approx(0.25)
    assert evals.row.slo.slo_pass is True
    assert rows[1].slo.slo_pass is True  # the stage as a whole, against the stage's SLOs


def test_envelope_sentence_per_class(mixed):
    _, _, clients = mixed
    chat, evals = cl.client_findings(clients)
    assert (chat.client, chat.finding.status, evals.client, evals.finding.status) == (
        "chat-app", "broke", "eval-runner", "all_pass")
    assert cl.client_sentence(chat) == (
        "chat-app meets its SLOs (TTFT p95 <= 500 ms, errors <= 1%) up to stage chat-alone (2 users in all, 2 of "
        "them chat-app), TTFT p95 385 ms; at stage chat-with-eval (4 users in all, 2 of them chat-app) p95 TTFT "
        "rose to 0.69 s, over the 0.5 s SLO, because requests queued in the server (from 2 users, TTFT p50 x2.3 "
        "while TPOT p50 x1.0): TTFT broke first.")
    assert cl.client_sentence(evals) == (
        "eval-runner meets its SLOs (TTFT p95 <= 2,000 ms, errors <= 1%) at every stage it ran in, up to stage "
        "chat-with-eval (4 users in all, 2 of them eval-runner), where its TTFT p95 was 1,190 ms; its limit is "
        "above that.")
    assert cl.classes_headline([chat, evals]) == (
        "chat-app met its own SLOs up to stage chat-alone and broke them at stage chat-with-eval; eval-runner met "
        "its own SLOs at every stage it ran in.")


def test_one_class_hurting_another(mixed):
    _, _, clients = mixed
    (found,) = cl.find_interference(clients)
    assert (found.client, found.others, found.without_stage, found.with_stage) == (
        "chat-app", ("eval-runner",), "chat-alone", "chat-with-eval")
    assert found.change_ratio == pytest.approx(685.0 / 385.0 - 1)  # +77.9%
    assert found.same_load is True
    assert cl.interference_sentence(found) == (
        "chat-app's TTFT p95 was 385 ms without eval-runner (stage chat-alone) and 685 ms with it (stage "
        "chat-with-eval): +78%; its SLOs (TTFT p95 <= 500 ms, errors <= 1%) were met without it and broken with "
        "it. It had 2 users of its own in both.")


def test_interference_says_when_the_loads_differ_or_cannot_be_told(builders, tmp_path):
    run = load_run(_mixed_run(builders, tmp_path / "three", chat_users_with=3))
    (found,) = cl.find_interference(client_table(run))
    assert (found.users_without, found.users_with, found.same_load) == (2, 3, False)
    assert cl.interference_sentence(found).endswith(
        "The loads differ: chat-app had 2 users in chat-alone and 3 in chat-with-eval, so the change is not "
        "eval-runner's alone.")
    run = load_run(_mixed_run(builders, tmp_path / "anonymous", user_ids=False))
    clients = client_table(run)
    assert all(c.client_users is None for c in clients)
    (found,) = cl.find_interference(clients)
    assert found.same_load is None
    assert cl.interference_sentence(found).endswith(
        "chat-app's own users are not recorded, so whether its load was the same in both cannot be told.")


def _crow(client, stage, index, ttft_p95, present, *, users=2, passed=True, pass_name="p"):
    row = TableRow.from_cells(pass_name=pass_name, stage_name=stage, stage_index=index, ttft_p95_ms=ttft_p95,
                              ok_requests=10, slo_pass=passed)
    return ClientRow(client=client, client_users=users, stage_clients=present, slos={"ttft_p95_ms": 500.0}, row=row)


def test_the_baseline_is_a_stage_without_some_of_the_others_same_load_first():
    rows = [
        _crow("a", "a-alone-4", 0, 100.0, ("a",), users=4),
        _crow("a", "a-alone-2", 1, 80.0, ("a",)),
        _crow("a", "a-with-b", 2, 120.0, ("a", "b")),
        _crow("a", "a-with-b-c", 3, 300.0, ("a", "b", "c"), passed=False),
        _crow("b", "a-with-b", 2, 50.0, ("a", "b")),
    ]
    found = cl.find_interference(rows)
    # a-with-b: of the two stages where a ran alone, the one where a had as many users (2)
    # a-with-b-c: a-alone-2 and a-with-b both qualify with the same users; a-with-b is nearer (and lacks only c)
    assert [(f.client, f.without_stage, f.with_stage, f.others) for f in found] == [
        ("a", "a-alone-2", "a-with-b", ("b",)),
        ("a", "a-with-b", "a-with-b-c", ("c",)),
    ]
    assert cl.interference_sentence(found[1]).startswith(
        "a's TTFT p95 was 120 ms without c (stage a-with-b) and 300 ms with it (stage a-with-b-c): +150%; its SLO "
        "(TTFT p95 <= 500 ms) was met without it and broken with it.")


def test_report_section_and_csv(mixed, tmp_path):
    run, rows, _ = mixed
    out = tmp_path / "report"
    written = write_report(run, out, rows=rows)
    assert "clients.csv" in written and "turns.csv" not in written
    md = (out / "envelope.md").read_text(encoding="utf-8")
    assert md.index("## Summary") < md.index("## Per client class") < md.index("## Run")
    assert ("**Client classes**: chat-app met its own SLOs up to stage chat-alone and broke them at stage "
            "chat-with-eval; eval-runner met its own SLOs at every stage it ran in. See Per client class.") in md
    assert ("| mix | chat-with-eval | 4 users | chat-app | 2 | 4 | 575.0 | 685.0 | 50 | 25% (5-70%) | FAIL |"
            in md)
    assert "- chat-app's TTFT p95 was 385 ms without eval-runner (stage chat-alone)" in md
    assert "Per client class" in (out / "envelope.html").read_text(encoding="utf-8")
    got = list(csv.DictReader(io.StringIO((out / "clients.csv").read_text(encoding="utf-8"))))
    assert [(r["stage_name"], r["client"], r["client_users"], r["requests"], r["slo_pass"]) for r in got] == [
        ("chat-alone", "chat-app", "2", "4", "True"), ("chat-with-eval", "chat-app", "2", "4", "False"),
        ("chat-with-eval", "eval-runner", "2", "2", "True")]
    assert got[1]["ttft_p95_ms"] == "685.0" and got[1]["stage_clients"] == "chat-app eval-runner"
    assert got[1]["client_slos"] == "ttft_p95_ms=500; error_rate_max=0.01"


def test_one_class_no_rows_no_section(known_run, tmp_path):
    run = load_run(known_run)
    assert client_table(run) == []
    out = tmp_path / "report"
    written = write_report(run, out)
    assert "clients.csv" not in written and not (out / "clients.csv").exists()
    md = (out / "envelope.md").read_text(encoding="utf-8")
    assert "Per client class" not in md and "Client classes" not in md


def test_a_rate_quota_beside_the_users_is_not_another_stages_users(builders, tmp_path):
    """eval-runner sends on a schedule (its records carry an intended send time, no user) inside a 2-user stage:
    its requests are in flight on top of the users', which must not read as a window polluted by another stage."""
    make_stage, make_record, write_run = builders
    st = make_stage(0, 2, 1000.0, 1060.0, pass_name="mix")  # window [1007, 1060]: 53 s
    recs = []
    for i, (client, start, gap_s) in enumerate((("chat-app", 1010.0, 2.0), ("chat-app", 1010.0, 2.0),
                                                ("eval-runner", 1010.0, 4.99), ("eval-runner", 1011.0, 4.99))):
        r = make_record(st, start, 0.1, gap_s=gap_s)  # in flight 0.1 + 10 gaps: 20.1 s and 50 s
        r["client"] = client
        if client == "eval-runner":
            r["t_intended_s"] = r["t_start_s"] - 0.001
        else:
            r["user_id"] = f"h:1/{i}"
        recs.append(r)
    run = load_run(write_run(tmp_path / "quota", stages=[st], records=recs))
    (row,) = envelope_table(run)
    # in flight: chat 2 x 20.1 s, eval 50 s + 49 s (the second is cut at the window's end), over 53 s
    assert row.window.mean_in_flight == pytest.approx((2 * 20.1 + 99.0) / 53.0)  # 2.63: over 2 users + 0.5
    assert row.window.quota_mean_in_flight == pytest.approx(99.0 / 53.0)
    assert row.trust.trustworthy is True, row.trust.untrustworthy_reasons
    chat, evals = client_table(run, rows=[row])
    assert (chat.client, chat.client_users, evals.client, evals.client_users) == ("chat-app", 2, "eval-runner", None)
    assert chat.row.window.mean_in_flight == pytest.approx(40.2 / 53.0)
    assert chat.row.window.quota_mean_in_flight is None  # the class has no quota requests
    assert evals.row.window.quota_mean_in_flight == pytest.approx(99.0 / 53.0)
