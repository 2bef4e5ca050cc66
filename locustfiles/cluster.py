"""Load generation across processes and machines: records shipped to the master, clocks, the workers' ledger.

A Locust worker may run on another host, so it writes no record file. It
hands each record line to a :class:`RecordShipper`, which sends them to the
master in batches (at least every :data:`SHIP_INTERVAL_S`, and
before every stats report, so a report that says "nothing in flight" arrives
after every record it covers). The master's :class:`RecordSink` appends each
batch to that worker's file in the run directory with one write, so one run
directory holds every record, and what a worker shipped is kept if it dies.

Durations are differences of one worker's monotonic clock and never cross
hosts. Only ``wall_start_unix_s``, which places a record in time, needs a clock
shared by all hosts: each worker measures how far its wall clock is from the
master's (:class:`ClockSync`, a ping-pong over Locust's messages) and writes
its records on the master's clock.

The master keeps a :class:`WorkerLedger`: who sent what, each worker's clock
offset, and which workers were lost (no heartbeat) or left (quit) before the
schedule ended; it is written to ``workers.json``.

Nothing here imports Locust or gevent; ``locustfiles/llm.py`` wires it up.
"""

from __future__ import annotations

import os
import re
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

from envelope.rundir import WORKERS_FILE

__all__ = [
    "RECORDS_MESSAGE",
    "CLOCK_PING_MESSAGE",
    "CLOCK_PONG_MESSAGE",
    "FINISH_MESSAGE",
    "FINISHED_MESSAGE",
    "SHIP_INTERVAL_S",
    "WORKERS_FILE",
    "RecordShipper",
    "RecordSink",
    "BatchError",
    "ClockSync",
    "ClockEstimate",
    "WorkerLedger",
    "WorkerEntry",
    "record_file_name",
]

RECORDS_MESSAGE = "envelope_records"  # worker -> master: a batch of record lines
CLOCK_PING_MESSAGE = "envelope_clock_ping"  # worker -> master: what time is it?
CLOCK_PONG_MESSAGE = "envelope_clock_pong"  # master -> that worker: the master's wall clock
FINISH_MESSAGE = "envelope_finish"  # master -> workers: the run is interrupted; stop, ship everything, confirm
FINISHED_MESSAGE = "envelope_finished"  # worker -> master: stopped, every record shipped before this
SHIP_INTERVAL_S = 0.25  # the most a worker holds records before sending them
SHIP_MAX_BYTES = 256 * 1024  # a batch this large is sent at once (bounds one message, and one write)
WORKERS_SCHEMA_VERSION = 1  # workers.json; files before the rename said "schema"
MISSING = "missing"  # locust.runners.STATE_MISSING


def record_file_name(worker_id: str) -> str:
    """The record file of one load-generator process: ``host:pid`` -> ``host_pid.jsonl``.

    Worker ids come over the network on a master, so anything that is not a plain
    file-name character is replaced: a batch can never name a path outside ``records/``.
    """
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", worker_id).lstrip(".") or "unknown"
    return f"{safe[:200]}.jsonl"


class RecordShipper:
    """A worker's record writer: keeps JSON lines until :meth:`flush` sends them as one batch.

    ``send(payload)`` hands a batch to the master. ``count`` is every record
    written, ``shipped`` those sent; a batch carries the sequence number of its
    first record, so the master can tell if one never arrived.
    """

    def __init__(self, worker_id: str, send: Callable[[dict], None], *, max_bytes: int = SHIP_MAX_BYTES,
                 compress: bool = False) -> None:
        self.worker_id = worker_id
        # Off by default: zlib halves the bytes of a long stream's record but costs ~7x its JSON encoding
        # in worker CPU, the scarcest thing in a load test (benchmarks/shipping.py); a LAN does not mind.
        self.compress = compress
        self._send = send
        self._max_bytes = max_bytes
        self._lines: list[bytes] = []
        self._bytes = 0
        self.count = 0
        self.shipped = 0
        self.batches = 0

    @property
    def pending(self) -> int:
        return len(self._lines)

    def write(self, record) -> None:
        self.write_line(record.to_json_line())

    def write_line(self, line: bytes) -> None:
        self._lines.append(line)
        self._bytes += len(line)
        self.count += 1
        if self._bytes >= self._max_bytes:
            self.flush()

    def flush(self) -> None:
        if not self._lines:
            return
        lines, self._lines, self._bytes = self._lines, [], 0
        data = b"".join(lines)
        payload = {"worker_id": self.worker_id, "seq": self.shipped, "n": len(lines),
                   "lines": zlib.compress(data, 1) if self.compress else data, "zlib": self.compress}
        try:
            self._send(payload)
        except Exception:
            # not sent (the connection to the master is down): keep the lines for the next try
            self._lines[:0] = lines
            self._bytes += sum(len(line) for line in lines)
            raise
        self.shipped += len(lines)
        self.batches += 1

    def close(self) -> None:
        self.flush()

    def __repr__(self) -> str:
        return f"RecordShipper(worker_id={self.worker_id!r}, count={self.count}, shipped={self.shipped})"


class BatchError(ValueError):
    """A batch that cannot be a worker's record lines; ``str()`` is one line."""


@dataclass(frozen=True)
class Received:
    worker_id: str
    records: int
    gap: int  # records skipped in this worker's sequence before this batch (0 when none was lost)


class RecordSink:
    """The master's side: append every worker's batches to ``records/<worker>.jsonl``, one write each."""

    def __init__(self, records_dir: Callable[[], Path]) -> None:
        self._records_dir = records_dir
        self._fds: dict[str, int] = {}
        self._next_seq: dict[str, int] = {}

    def receive(self, payload: Mapping[str, Any]) -> Received:
        try:
            worker_id = str(payload["worker_id"])
            seq, n = int(payload["seq"]), int(payload["n"])
            data = payload["lines"]
            if payload.get("zlib"):
                data = zlib.decompress(data)
            if not isinstance(data, bytes):
                raise TypeError(f"lines are {type(data).__name__}, not bytes")
        except (KeyError, TypeError, ValueError, zlib.error) as exc:
            raise BatchError(f"a record batch that cannot be read ({type(exc).__name__}: {exc})") from None
        lines = data.count(b"\n")
        if n != lines or (data and not data.endswith(b"\n")):
            raise BatchError(f"a record batch from {worker_id} holds {lines} whole lines, not {n}")
        fd = self._fds.get(worker_id)
        if fd is None:
            path = self._records_dir() / record_file_name(worker_id)
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = self._fds[worker_id] = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        expected = self._next_seq.get(worker_id, 0)
        self._next_seq[worker_id] = seq + n
        return Received(worker_id=worker_id, records=n, gap=max(seq - expected, 0))

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()


@dataclass(frozen=True)
class ClockEstimate:
    """How far this worker's wall clock is behind the master's, and how sure we are."""

    offset_s: float  # master wall clock minus this worker's
    uncertainty_s: float  # half the round trip of the exchange it came from: the error is at most this
    samples: int


class ClockSync:
    """Offset of a worker's wall clock to the master's, from ping-pong exchanges.

    A ping carries the worker's wall and monotonic clocks; the pong adds the
    master's wall clock ``t1``. With the round trip ``rtt`` measured on the
    monotonic clock, the master read ``t1`` when the worker's wall clock said
    about ``t0 + rtt/2``, so ``offset = t1 - (t0 + rtt/2)``, wrong by at most
    ``rtt/2``. The estimate in use is the one with the shortest round trip
    among the latest ``window`` exchanges (a delayed message only widens the bound).
    """

    def __init__(self, *, window: int = 16) -> None:
        self._window = window
        self._samples: list[tuple[float, float]] = []  # (rtt_s, offset_s), newest last
        self.estimate: ClockEstimate | None = None

    @staticmethod
    def ping(wall_s: float, mono_s: float) -> dict:
        return {"t0": wall_s, "m0": mono_s}

    @staticmethod
    def pong(ping: Mapping[str, Any], master_wall_s: float) -> dict:
        return {"t0": ping["t0"], "m0": ping["m0"], "t1": master_wall_s}

    def on_pong(self, pong: Mapping[str, Any], mono_now_s: float) -> ClockEstimate | None:
        try:
            t0, m0, t1 = float(pong["t0"]), float(pong["m0"]), float(pong["t1"])
        except (KeyError, TypeError, ValueError):
            return self.estimate
        rtt = mono_now_s - m0
        if rtt < 0:
            return self.estimate
        self._samples.append((rtt, t1 - (t0 + rtt / 2.0)))
        del self._samples[:-self._window]
        best_rtt, best_offset = min(self._samples)
        self.estimate = ClockEstimate(offset_s=best_offset, uncertainty_s=best_rtt / 2.0, samples=len(self._samples))
        return self.estimate


@dataclass
class WorkerEntry:
    """What the master knows about one worker; a row of ``workers.json``."""

    node_id: str
    host: str
    first_seen_unix_s: float
    last_heard_unix_s: float
    worker_id: str | None = None
    status: str = "running"  # running | finished | lost | left
    ended_unix_s: float | None = None
    stage_index_at_end: int | None = None
    records_received: int = 0
    record_batches: int = 0
    record_gaps: int = 0
    records_made_at_last_report: int | None = None
    last_report: dict | None = None
    clock_offset_s: float | None = None
    clock_uncertainty_s: float | None = None
    # a worker called missing that spoke again: [[silent since, back at], ...] (master's clock)
    outages: list[list[float]] = field(default_factory=list)


class WorkerLedger:
    """The master's account of its workers, kept in step with Locust's list of them.

    ``sync`` is given Locust's workers and their states once a second: one that
    is missing (no heartbeat for the timeout) was *lost*; one that is gone
    (it quit) *left*; either only counts while the schedule runs. After the
    schedule ended (``closing``), workers that go were *finished*.
    """

    def __init__(self, *, heartbeat_timeout_s: float, ship_interval_s: float = SHIP_INTERVAL_S) -> None:
        self.heartbeat_timeout_s = heartbeat_timeout_s
        self.ship_interval_s = ship_interval_s
        self.entries: dict[str, WorkerEntry] = {}
        self.closing = False
        self.changed = False

    def heard(self, node_id: str, now_unix_s: float) -> WorkerEntry:
        entry = self.entries.get(node_id)
        if entry is None:
            entry = self.entries[node_id] = WorkerEntry(
                node_id=node_id, host=node_id.rsplit("_", 1)[0] if "_" in node_id else node_id,
                first_seen_unix_s=now_unix_s, last_heard_unix_s=now_unix_s)
            self.changed = True
        elif entry.status == "lost":  # declared missing, yet here it is: a stall, not a death
            entry.outages.append([entry.last_heard_unix_s, now_unix_s])
            entry.status, entry.ended_unix_s, entry.stage_index_at_end = "running", None, None
            self.changed = True
        entry.last_heard_unix_s = now_unix_s
        return entry

    def on_records(self, node_id: str, received: Received, now_unix_s: float) -> None:
        entry = self.heard(node_id, now_unix_s)
        entry.worker_id = received.worker_id
        entry.records_received += received.records
        entry.record_batches += 1
        entry.record_gaps += received.gap
        self.changed = True

    def on_report(self, node_id: str, data: Mapping[str, Any], now_unix_s: float) -> None:
        entry = self.heard(node_id, now_unix_s)
        if data.get("envelope_worker_id"):
            entry.worker_id = str(data["envelope_worker_id"])
        entry.last_report = {"users": int(data.get("envelope_users", 0)),
                             "in_flight": int(data.get("envelope_in_flight", 0)),
                             "open_loop": int(data.get("envelope_open_loop", 0))}
        if data.get("envelope_records_made") is not None:
            entry.records_made_at_last_report = int(data["envelope_records_made"])
        if data.get("envelope_clock_offset_s") is not None:
            entry.clock_offset_s = float(data["envelope_clock_offset_s"])
            entry.clock_uncertainty_s = float(data["envelope_clock_uncertainty_s"])
        self.changed = True

    def sync(self, states: Mapping[str, str], *, now_unix_s: float, stage_index: int | None) -> list[WorkerEntry]:
        """Compare with Locust's workers (``node_id -> state``); returns the workers that just went."""
        ended: list[WorkerEntry] = []
        for node_id in states:
            if node_id not in self.entries:
                self.heard(node_id, now_unix_s)
        for entry in self.entries.values():
            if entry.status != "running":
                continue
            state = states.get(entry.node_id)
            if state is not None and state != MISSING:
                continue
            if self.closing:
                if state is None:  # quit with the run
                    entry.status, entry.ended_unix_s = "finished", now_unix_s
                    self.changed = True
                continue
            entry.status = "left" if state is None else "lost"
            entry.ended_unix_s = now_unix_s
            entry.stage_index_at_end = stage_index
            ended.append(entry)
            self.changed = True
        return ended

    def reopen(self, present: list[str] | set[str]) -> None:
        """A new test starts (the web UI's Start after a Stop): workers still here are running again."""
        self.closing = False
        for node_id in present:
            entry = self.entries.get(node_id)
            if entry is not None and entry.status == "finished":
                entry.status, entry.ended_unix_s = "running", None
                self.changed = True

    def close(self, now_unix_s: float) -> None:
        """The run is over: every worker still counted as running finished with it."""
        self.closing = True
        for entry in self.entries.values():
            if entry.status == "running":
                entry.status, entry.ended_unix_s = "finished", now_unix_s
                self.changed = True

    def to_json(self, now_unix_s: float) -> dict:
        return {
            "schema_version": WORKERS_SCHEMA_VERSION,
            "written_unix_s": now_unix_s,
            "heartbeat_timeout_s": self.heartbeat_timeout_s,
            "ship_interval_s": self.ship_interval_s,
            "workers": [asdict(e) for e in sorted(self.entries.values(), key=lambda e: e.first_seen_unix_s)],
        }

    @staticmethod
    def describe_end(entry: WorkerEntry) -> str:
        """One line for the log when a worker goes mid-run."""
        who = entry.worker_id or entry.node_id
        if entry.status == "lost":
            return (f"load generator {who} was lost (no heartbeat); {entry.records_received} records it "
                    f"shipped are kept; requests it had in flight are not")
        return f"load generator {who} left mid-run; {entry.records_received} records it shipped are kept"
