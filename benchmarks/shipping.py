"""What shipping records to the master costs, per record: worker CPU, master CPU, bytes on the wire.

    python benchmarks/shipping.py [--records 20000] [--repeats 5]

In a distributed run a worker does not write its records: it batches the JSON
lines and sends each batch through Locust's
messaging (msgpack over ZeroMQ); the master appends the batch to the worker's
file with one write (``locustfiles/cluster.py``). Batches can be zlib-compressed
(level 1); the rows marked zlib show why that is off by default. This measures
those steps in one process, without Locust or a network, for two record shapes
(a short answer and a 512-token stream with its per-chunk offsets), and compares
them with what a process writing its own file pays (``RecordWriter``, one
unbuffered write per record). Figures are medians over repeats, measured in one
run; the ratio is what carries over to other machines.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import msgpack  # noqa: E402  (Locust's wire format; importing it patches nothing)

from benchmarks._common import machine_line, table  # noqa: E402
from envelope.records import RecordWriter, RequestRecord  # noqa: E402
from locustfiles.cluster import SHIP_MAX_BYTES, RecordShipper, RecordSink  # noqa: E402


def make_records(n: int, tokens: int) -> list[RequestRecord]:
    """Records like a busy stage's: every timestamp has its own full-precision digits (as measured)."""
    rng = random.Random(9)
    out = []
    for i in range(n):
        t, offsets = 0.05 + rng.expovariate(20.0), []
        for _ in range(tokens):
            offsets.append(t)
            t += 0.0123 + rng.gauss(0.0, 0.002) ** 2
        offsets = tuple(offsets)
        out.append(RequestRecord(
            run_id="20261122-101500-capstone", request_id=f"gpu-worker-3:4242-{i}-a1b2", worker_id="gpu-worker-3:4242",
            client="default", endpoint="chat", pass_name="queueing", stage_index=2, stage_name="queueing-20u",
            wall_start_unix_s=1795342385.3 + i * 0.01, t_start_s=13479.876 + i * 0.01,
            t_first_byte_s=13479.9, t_first_event_s=13479.91, t_first_token_s=13479.93,
            t_last_token_s=13479.93 + 0.0123 * tokens, t_done_s=13479.94 + 0.0123 * tokens,
            chunk_offsets_s=offsets, chunk_tokens=None, prompt_tokens=312, output_tokens=tokens,
            output_tokens_client_estimate=tokens, requested_prompt_tokens=312, requested_output_tokens=tokens,
            http_status=200))
    return out


def one_repeat(records: list[RequestRecord], workdir: Path, compress: bool) -> dict[str, float]:
    """CPU seconds for: shipping (worker), receiving (master), writing locally; and bytes sent."""
    wire: list[bytes] = []

    def send(payload: dict) -> None:
        wire.append(msgpack.dumps(("envelope_records", payload, "node"), use_bin_type=True))

    shipper = RecordShipper("gpu-worker-3:4242", send, max_bytes=SHIP_MAX_BYTES, compress=compress)
    t0 = time.process_time()
    for i, rec in enumerate(records):
        shipper.write(rec)
        if i % 200 == 199:  # a batch every 0.25 s at 800 records/s
            shipper.flush()
    shipper.close()
    ship_s = time.process_time() - t0

    sink = RecordSink(lambda: workdir / "master" / "records")
    t0 = time.process_time()
    for blob in wire:
        _, payload, _ = msgpack.loads(blob, raw=False)
        sink.receive(payload)
    sink.close()
    receive_s = time.process_time() - t0

    writer = RecordWriter(workdir / "local" / "records" / "w.jsonl")
    t0 = time.process_time()
    for rec in records:
        writer.write(rec)
    writer.close()
    local_s = time.process_time() - t0

    shipped = (workdir / "master" / "records" / "gpu-worker-3_4242.jsonl").read_bytes()
    local = (workdir / "local" / "records" / "w.jsonl").read_bytes()
    if shipped != local:
        raise SystemExit("the master's file differs from the locally written one")
    return {"ship_s": ship_s, "receive_s": receive_s, "local_s": local_s,
            "wire_bytes": float(sum(len(b) for b in wire)), "json_bytes": float(len(local))}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--records", type=int, default=20_000)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args(argv)
    print(machine_line())
    rows = []
    for label, tokens, compress in (("short (16 tokens)", 16, False), ("short, zlib", 16, True),
                                    ("long (512 tokens)", 512, False), ("long, zlib", 512, True)):
        records = make_records(args.records, tokens)
        runs = []
        for _ in range(args.repeats):
            with tempfile.TemporaryDirectory() as tmp:
                runs.append(one_repeat(records, Path(tmp), compress))
        med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
        n = args.records
        rows.append([
            label,
            f"{med['json_bytes'] / n:,.0f}",
            f"{med['wire_bytes'] / n:,.0f}",
            f"{med['local_s'] / n * 1e6:.1f}",
            f"{med['ship_s'] / n * 1e6:.1f}",
            f"{med['ship_s'] / med['local_s']:.2f}",
            f"{med['receive_s'] / n * 1e6:.1f}",
            f"{n / med['receive_s']:,.0f}",
        ])
    print(f"{args.records:,} records per shape, median of {args.repeats} repeats (CPU time of this process)")
    print(table(["record", "JSON B/rec", "wire B/rec", "local write us/rec", "ship us/rec", "ship/local",
                 "master us/rec", "master rec/CPU-s"], rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
