"""Distributed runs (locustfiles.cluster): shipping records to the master, worker clocks, the ledger of workers."""

from __future__ import annotations

import random

import orjson
import pytest

from envelope.records import RequestRecord, iter_record_files, read_records
from locustfiles.cluster import (
    BatchError,
    ClockSync,
    RecordShipper,
    RecordSink,
    WorkerLedger,
    record_file_name,
)


def make_record(i: int, worker_id: str = "w1:7") -> RequestRecord:
    return RequestRecord(run_id="r", request_id=f"{worker_id}-{i}", worker_id=worker_id, client="c",
                         endpoint="chat", pass_name="p", stage_index=0, stage_name="s",
                         wall_start_unix_s=1000.0 + i, t_start_s=5.0 + i, t_done_s=5.5 + i,
                         chunk_offsets_s=(0.1, 0.2), output_tokens=2)


# -- shipping -------------------------------------------------------------------------------------
@pytest.mark.parametrize("compress", [False, True])
def test_shipped_batches_land_in_one_file_per_worker_byte_for_byte(tmp_path, compress):
    sink = RecordSink(lambda: tmp_path / "records")
    sent: list[dict] = []
    shippers = {w: RecordShipper(w, sent.append, max_bytes=2_000, compress=compress) for w in ("w1:7", "w2:9")}
    expected: dict[str, bytes] = {w: b"" for w in shippers}
    for i in range(60):
        w = "w1:7" if i % 3 else "w2:9"
        rec = make_record(i, w)
        shippers[w].write(rec)
        expected[w] += rec.to_json_line()
        if i % 17 == 0:
            shippers[w].flush()
    for s in shippers.values():
        s.close()
    assert all(s.pending == 0 and s.shipped == s.count for s in shippers.values())
    assert sum(p["n"] for p in sent) == 60 and len(sent) > 4  # several size- and call-triggered batches
    assert all(p["zlib"] is compress for p in sent)
    for payload in sent:
        received = sink.receive(payload)
        assert received.gap == 0 and received.records == payload["n"]
    sink.close()
    files = iter_record_files(tmp_path)
    assert [f.name for f in files] == ["w1_7.jsonl", "w2_9.jsonl"]
    for f in files:
        assert f.read_bytes() == expected[f.stem.replace("_", ":")]
    assert sorted(r["request_id"] for r in read_records(files)) == sorted(
        f"{'w1:7' if i % 3 else 'w2:9'}-{i}" for i in range(60))


def test_a_batch_that_could_not_be_sent_is_kept_for_the_next_try():
    attempts: list[dict] = []

    def flaky(payload):
        attempts.append(payload)
        if len(attempts) == 1:
            raise ConnectionError("master unreachable")

    shipper = RecordShipper("w:1", flaky)
    for i in range(3):
        shipper.write(make_record(i))
    with pytest.raises(ConnectionError):
        shipper.flush()
    assert (shipper.pending, shipper.shipped) == (3, 0)
    shipper.write(make_record(3))
    shipper.flush()
    assert (shipper.pending, shipper.shipped, shipper.count) == (0, 4, 4)
    lines = attempts[-1]["lines"].splitlines()
    assert [orjson.loads(x)["request_id"] for x in lines] == [f"w1:7-{i}" for i in range(4)]
    assert attempts[-1]["seq"] == 0


def test_a_missing_batch_shows_as_a_gap(tmp_path):
    sent: list[dict] = []
    shipper = RecordShipper("w:1", sent.append)
    for i in range(5):
        shipper.write(make_record(i))
        shipper.flush()
    sink = RecordSink(lambda: tmp_path / "records")
    gaps = [sink.receive(p).gap for i, p in enumerate(sent) if i not in (1, 2)]
    assert gaps == [0, 2, 0]


@pytest.mark.parametrize("worker_id, name", [
    ("gpu-box-3:1234", "gpu-box-3_1234.jsonl"),
    ("../../etc/passwd:1", "_.._etc_passwd_1.jsonl"),
    ("/abs:2", "_abs_2.jsonl"),
    ("", "unknown.jsonl"),
])
def test_a_worker_id_never_names_a_path_outside_records(tmp_path, worker_id, name):
    assert record_file_name(worker_id) == name
    sink = RecordSink(lambda: tmp_path / "records")
    line = make_record(0, worker_id).to_json_line()
    sink.receive({"worker_id": worker_id, "seq": 0, "n": 1, "lines": line})
    sink.close()
    assert [p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_file()] == [f"records/{name}"]


@pytest.mark.parametrize("payload, message", [
    ({"worker_id": "w:1", "seq": 0, "n": 1, "lines": b"not zlib", "zlib": True}, "cannot be read"),
    ({"worker_id": "w:1", "seq": 0, "n": 1, "lines": "{}\n"}, "cannot be read"),
    ({"worker_id": "w:1", "seq": 0, "n": 2, "lines": b'{"a":1}\n'}, "holds 1 whole lines, not 2"),
    ({"worker_id": "w:1", "seq": 0, "n": 1, "lines": b'{"a":1}\n{"b"'}, "holds 1 whole lines, not 1"),
    ({"seq": 0, "n": 1, "lines": b"{}\n"}, "cannot be read"),
])
def test_a_batch_that_is_not_whole_record_lines_is_refused_and_nothing_written(tmp_path, payload, message):
    sink = RecordSink(lambda: tmp_path / "records")
    with pytest.raises(BatchError, match=message):
        sink.receive(payload)
    assert not (tmp_path / "records").exists()


# -- clocks ---------------------------------------------------------------------------------------
def test_clock_offset_is_found_within_its_stated_uncertainty():
    """Simulated exchanges: the master's clock is 37.25 s ahead, message delays are random and asymmetric."""
    rng = random.Random(3)
    offset_true = 37.25
    sync = ClockSync(window=16)
    mono = 100.0
    for _ in range(40):
        up, down = rng.uniform(0.0002, 0.02), rng.uniform(0.0002, 0.02)
        wall = 1_700_000_000.0 + mono  # this worker's wall clock
        ping = ClockSync.ping(wall, mono)
        pong = ClockSync.pong(ping, wall + up + offset_true)  # the master reads its clock on arrival
        estimate = sync.on_pong(pong, mono + up + down)
        assert abs(estimate.offset_s - offset_true) <= estimate.uncertainty_s + 1e-9
        assert estimate.uncertainty_s == pytest.approx((up + down) / 2) or estimate.uncertainty_s < (up + down) / 2
        mono += 1.0
    assert estimate.samples == 16 and estimate.uncertainty_s < 0.004


def test_clock_uses_the_shortest_round_trip_of_the_recent_window():
    sync = ClockSync(window=3)
    sync.on_pong({"t0": 0.0, "m0": 0.0, "t1": 10.0}, 0.010)  # rtt 10 ms
    best = sync.on_pong({"t0": 1.0, "m0": 1.0, "t1": 11.0005}, 1.001)  # rtt 1 ms
    assert best.uncertainty_s == pytest.approx(0.0005) and best.offset_s == pytest.approx(10.0)
    sync.on_pong({"t0": 2.0, "m0": 2.0, "t1": 12.0}, 2.004)
    sync.on_pong({"t0": 3.0, "m0": 3.0, "t1": 13.0}, 3.004)
    later = sync.on_pong({"t0": 4.0, "m0": 4.0, "t1": 14.0}, 4.006)  # the 1 ms sample left the window
    assert later.uncertainty_s == pytest.approx(0.002)
    assert sync.on_pong({"t0": 5.0, "m0": 5.0}, 5.001) is later  # a malformed pong changes nothing
    assert sync.on_pong({"t0": 5.0, "m0": 6.0, "t1": 1.0}, 5.5) is later  # negative round trip ignored


# -- the ledger -----------------------------------------------------------------------------------
def _received(worker_id: str, n: int, gap: int = 0):
    from locustfiles.cluster import Received

    return Received(worker_id=worker_id, records=n, gap=gap)


def test_ledger_lost_left_and_finished_workers():
    ledger = WorkerLedger(heartbeat_timeout_s=10)
    ledger.sync({"a_1": "running", "b_2": "running", "c_3": "running"}, now_unix_s=100.0, stage_index=0)
    ledger.on_records("a_1", _received("a:11", 40), 101.0)
    ledger.on_records("b_2", _received("b:22", 30, gap=2), 101.5)
    ledger.on_report("b_2", {"envelope_worker_id": "b:22", "envelope_users": 3, "envelope_in_flight": 2,
                             "envelope_records_made": 32, "envelope_clock_offset_s": -30.0,
                             "envelope_clock_uncertainty_s": 0.0004}, 102.0)
    ended = ledger.sync({"a_1": "running", "b_2": "missing"}, now_unix_s=112.0, stage_index=1)
    assert {(e.node_id, e.status, e.ended_unix_s, e.stage_index_at_end) for e in ended} == {
        ("b_2", "lost", 112.0, 1), ("c_3", "left", 112.0, 1)}
    assert ledger.sync({"a_1": "running", "b_2": "missing"}, now_unix_s=113.0, stage_index=1) == []  # said once
    ledger.closing = True
    ledger.sync({}, now_unix_s=120.0, stage_index=None)  # a quits with the run: finished, not left
    ledger.close(121.0)
    doc = ledger.to_json(121.0)
    by_node = {w["node_id"]: w for w in doc["workers"]}
    assert by_node["a_1"]["status"] == "finished" and by_node["a_1"]["records_received"] == 40
    b = by_node["b_2"]
    assert (b["status"], b["worker_id"], b["last_heard_unix_s"], b["records_received"], b["record_gaps"]) == (
        "lost", "b:22", 102.0, 30, 2)
    assert b["last_report"] == {"users": 3, "in_flight": 2, "open_loop": 0}
    assert (b["clock_offset_s"], b["clock_uncertainty_s"], b["records_made_at_last_report"]) == (-30.0, 0.0004, 32)
    assert by_node["c_3"]["status"] == "left" and by_node["c_3"]["host"] == "c"
    assert doc["heartbeat_timeout_s"] == 10 and doc["ship_interval_s"] == 0.25


def test_a_worker_declared_missing_that_speaks_again_was_stalled_not_lost():
    ledger = WorkerLedger(heartbeat_timeout_s=10)
    ledger.heard("a_1", 100.0)
    assert [e.status for e in ledger.sync({"a_1": "missing"}, now_unix_s=111.0, stage_index=0)] == ["lost"]
    ledger.heard("a_1", 115.0)
    entry = ledger.entries["a_1"]
    assert (entry.status, entry.ended_unix_s, entry.outages) == ("running", None, [[100.0, 115.0]])
    assert ledger.sync({"a_1": "running"}, now_unix_s=116.0, stage_index=0) == []


def test_a_new_test_in_the_web_ui_reopens_the_workers_still_there():
    ledger = WorkerLedger(heartbeat_timeout_s=10)
    ledger.sync({"a_1": "running", "b_2": "running"}, now_unix_s=100.0, stage_index=0)
    ledger.closing = True  # Stop: workers report stopped and Locust drops them for a moment
    ledger.sync({}, now_unix_s=101.0, stage_index=None)
    assert {e.status for e in ledger.entries.values()} == {"finished"}
    ledger.reopen({"a_1"})  # Start again; only a_1 came back
    assert (ledger.entries["a_1"].status, ledger.entries["b_2"].status) == ("running", "finished")
    assert not ledger.closing
    assert [e.node_id for e in ledger.sync({}, now_unix_s=150.0, stage_index=0)] == ["a_1"]  # then it left
