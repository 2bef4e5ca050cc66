"""The columnar record path (Arrow, Parquet copy) against the per-record one, value for value."""

from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path

import numpy as np
import orjson
import pandas as pd
import pytest

from analysis import record_files
from analysis.load import load_run, records_frame
from analysis.record_files import cache_path
from analysis.table import envelope_table
from analysis.tokens import token_audit
from envelope import metrics
from envelope.records import iter_record_files, read_records

T0 = 1_795_000_000.0


def _record(i: int, rng: np.random.Generator, **fields) -> dict:
    t_start = 100.0 + i * 0.37
    n = int(rng.integers(0, 9))
    offsets = np.round(0.05 + np.cumsum(rng.gamma(2.0, 0.01, n)), int(rng.integers(3, 12))).tolist()
    rec = {"run_id": "r", "request_id": f"q{i}", "worker_id": f"h:{i % 3}", "client": ("chat", "batch")[i % 2],
           "endpoint": "chat", "pass_name": "sweep", "stage_index": i % 3, "stage_name": f"sweep-{i % 3}",
           "wall_start_unix_s": T0 + i * 0.37 + 1e-7 * i, "t_start_s": t_start, "schema": 1,
           "prompt_tokens": 300 + i % 5, "requested_prompt_tokens": 300, "requested_output_tokens": 16,
           "user_id": f"h:{i % 3}/{i % 7}", "client_stall_max_ms": float(rng.uniform(0, 80))}
    if n:
        tokens = rng.integers(1, 4, n).tolist()
        rec.update(t_first_byte_s=t_start + 0.01, t_first_token_s=t_start + offsets[0],
                   t_last_token_s=t_start + offsets[-1], t_done_s=t_start + offsets[-1] + 0.002,
                   chunk_offsets_s=offsets, chunk_tokens=tokens, output_tokens=sum(tokens),
                   output_tokens_client_estimate=n, http_status=200)
    else:
        rec.update(t_done_s=t_start + 0.3, output_tokens=0, http_status=200)
    rec.update(fields)
    return rec


def _varied_records() -> list[dict]:
    """Every shape of record the loader distinguishes (see the comments)."""
    rng = np.random.default_rng(7)
    recs = [_record(i, rng) for i in range(120)]
    k = 120
    recs += [
        _record(k + 0, rng, chunk_offsets_s=[0.1, 0.2, 0.25], chunk_tokens=[1, 0, 2], output_tokens=3),  # a 0 count
        _record(k + 1, rng, chunk_offsets_s=[0.1, 0.2, 0.3], chunk_tokens=[1, 1], output_tokens=3),  # counts != chunks
        _record(k + 2, rng, chunk_offsets_s=[0.1, 0.2, 0.3], chunk_tokens=None, output_tokens=7),  # no counts: spread
        _record(k + 3, rng, chunk_offsets_s=[0.1, 0.2, 0.3], chunk_tokens=[1, 1, 1], output_tokens=5),  # sum != out
        _record(k + 4, rng, chunk_offsets_s=[0.1, 0.2], chunk_tokens=[2, 2], output_tokens=None,
                output_tokens_estimated=True),  # no usage
        _record(k + 5, rng, chunk_offsets_s=[], chunk_tokens=None, output_tokens=4),  # tokens, no chunk: at the end
        _record(k + 6, rng, chunk_offsets_s=None, output_tokens=None),  # nothing at all
        _record(k + 7, rng, chunk_offsets_s=[0.3], chunk_tokens=[5], output_tokens=5),  # one chunk: no ITL
        _record(k + 8, rng, error_category="http_500", http_status=500, output_tokens=None, chunk_offsets_s=[],
                t_first_token_s=None, t_last_token_s=None),  # failed before any token
        _record(k + 9, rng, error_category="connection_reset", http_status=200, chunk_offsets_s=[0.1, 0.2, 0.4],
                chunk_tokens=[1, 1, 1], output_tokens=3, t_done_s=None),  # failed mid-stream, with tokens
        _record(k + 10, rng, error_category="cancelled", output_tokens=None),
        _record(k + 11, rng, t_intended_s=99.5 + (k + 11) * 0.37, user_id=None),  # open loop
        _record(k + 12, rng, source_index=4, conversation_id="c-1", turn_index=2),
        _record(k + 13, rng, conversation_id="c-1", turn_index=3, source_index=None),
        _record(k + 14, rng, error_detail="réponse coupée ✂", error_category="malformed_sse"),  # not ASCII
        _record(k + 15, rng, output_tokens_client_estimate=None),
        _record(k + 16, rng, chunk_offsets_s=[0.1, 0.1, 0.1, 0.35], chunk_tokens=[1, 1, 1, 1],
                output_tokens=4),  # coalesced chunks: ITL 0
        _record(k + 17, rng, wall_start_unix_s=None, t_start_s=None),  # no times to place it
        _record(k + 18, rng, prompt_text="a" * 300, completion_text="NaN Infinity", extra_field={"x": [1, 2]}),
    ]
    old = _record(k + 19, rng)  # written before t_last_token_s was renamed
    old["t_end_s"] = old.pop("t_last_token_s", None)
    recs.append(old)
    return recs


BAD_LINES = [
    b'{"run_id": "r", "request_id": "torn", "t_start_s": 1',  # torn
    b"not json at all",
    b"null",
    b"[1, 2]",
    b"42",
    b'"a string"',
    b"",
    b"   ",
    b"{}",
    b'{"run_id": "r", "request_id": "nan", "t_start_s": NaN}',
    b'\xef\xbb\xbf{"run_id": "r", "request_id": "bom"}',
    b'{"request_id": "two"} {"request_id": "objects"}',
    b'{"request_id": "typed", "stage_name": 7}',  # a number where a string belongs
    b'{"request_id": "dup", "output_tokens": 1, "output_tokens": 2}',  # orjson keeps the last
]


def _write(root: Path, files: dict[str, list[bytes]]) -> Path:
    (root / "records").mkdir(parents=True)
    for name, lines in files.items():
        (root / "records" / name).write_bytes(b"\n".join(lines))
    (root / "stages.json").write_bytes(orjson.dumps([
        {"pass_index": 0, "pass_name": "sweep", "stage_index": i, "stage_name": f"sweep-{i}", "kind": "users",
         "target_users": 2, "spawn_rate": 10.0, "start_unix_s": T0 - 1 + i * 20, "end_unix_s": T0 + 19 + i * 20,
         "slos": {"ttft_p95_ms": 500}} for i in range(3)]))
    return root


def _varied_run(root: Path) -> Path:
    recs = [orjson.dumps(r) for r in _varied_records()]
    mid = len(recs) // 2
    return _write(root, {
        "a_1.jsonl": recs[:mid][:30] + BAD_LINES[1:9] + recs[:mid][30:] + [b""],
        "b_2.jsonl": recs[mid:][:20] + BAD_LINES[9:] + recs[mid:][20:] + BAD_LINES[:1],  # ends torn
    })


def _reference(root: Path):
    """What the per-record reader gives: the records, and the skipped lines as load_run always reported them."""
    skipped: list[str] = []
    records = []
    for rec in read_records(iter_record_files(root), skipped=skipped):
        if isinstance(rec, dict):
            records.append(rec)
        else:
            skipped.append(f"records/: a line holds {type(rec).__name__} {str(rec)[:40]!r}, not a JSON object; skipped")
    return records, skipped


def _old_chunk_attribution(records: list[dict], frame: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """Chunk arrivals and tokens as the loader built them before the columnar path (a copy of its code)."""
    times, tokens = [], []
    wall = frame["wall_start_unix_s"].to_numpy(dtype=float)
    end = frame["in_flight_end_unix_s"].to_numpy(dtype=float)
    for i, rec in enumerate(records):
        out = rec.get("output_tokens") or 0
        offsets = rec.get("chunk_offsets_s") or ()
        if out <= 0:
            continue
        if not offsets:
            times.append(end[i])
            tokens.append(float(out))
            continue
        times.extend(wall[i] + np.asarray(offsets, dtype=float))
        per_chunk = rec.get("chunk_tokens")
        if per_chunk is not None and len(per_chunk) == len(offsets) and sum(per_chunk) == out:
            tokens.extend(per_chunk)
        else:
            tokens.extend([out / len(offsets)] * len(offsets))
    return np.asarray(times, dtype=float), np.asarray(tokens, dtype=np.float32)


@pytest.fixture(params=["one block", "tiny blocks"])
def blocks(request, monkeypatch):
    if request.param == "tiny blocks":  # lines cut across blocks, and lines longer than a block
        monkeypatch.setattr(record_files, "BLOCK_BYTES", 700)
    return request.param


@pytest.mark.parametrize("cache", [None, 0], ids=["json", "parquet copy"])
def test_the_columnar_path_gives_what_the_per_record_path_gives(tmp_path, blocks, cache):
    root = _varied_run(tmp_path / "run")
    records, skipped = _reference(root)
    ref = records_frame(records)
    run = load_run(root, cache_min_bytes=cache)
    if cache is not None:  # the second load reads the copy the first wrote
        run = load_run(root, cache_min_bytes=cache)

    pd.testing.assert_frame_equal(run.frame, ref.frame, check_exact=True)
    assert run.skipped_lines == skipped
    assert len(skipped) == 9 and sum("unreadable record line" in s for s in skipped) == 5
    assert run.token_audit == token_audit(records) == ref.token_audit

    # ITL: envelope.metrics' values, rounded to float32 as the loader always kept them
    expected_itl = metrics.itl_values_ms(records).astype(np.float32)
    assert np.array_equal(run.chunks.itl_ms(), expected_itl)
    assert np.array_equal(ref.chunks.itl_ms(), expected_itl)
    assert run.chunks.itl_counts.tolist() == [len(metrics.itl_s(r)) for r in records]
    some = np.arange(len(records)) % 3 == 1
    expected_some = [v for r, keep in zip(records, some) if keep for v in metrics.itl_s(r)]
    expected_some = (np.asarray(expected_some, dtype=float) * 1000.0).astype(np.float32)
    assert np.array_equal(run.chunks.itl_ms(some), expected_some)
    assert (run.chunks.itl_ms() == 0).any()  # the coalesced chunks

    # TPOT and TTFT: the scalar definitions
    timed = np.array([r.get("t_start_s") is not None for r in records])
    for column, scalar in (("tpot_ms", metrics.tpot_s), ("ttft_ms", metrics.ttft_s), ("e2e_ms", metrics.e2e_s)):
        expected = [scalar(r) for r, t in zip(records, timed) if t]
        assert np.allclose(run.frame[column].to_numpy()[timed], [np.nan if v is None else v * 1000 for v in expected],
                           equal_nan=True, rtol=1e-12)

    # chunk arrivals and their tokens
    times, tokens = _old_chunk_attribution(records, ref.frame)
    got_t, got_tok = run.chunks.arrivals()
    assert np.array_equal(got_t, times, equal_nan=True)
    assert np.array_equal(got_tok, tokens)
    assert run.chunks.attributed_total() == pytest.approx(float(tokens.sum(dtype=np.float64)), rel=1e-15)


def test_derived_chunk_queries_agree_with_the_expanded_arrays(tmp_path):
    run = load_run(_varied_run(tmp_path / "run"), cache_min_bytes=None)
    c = run.chunks
    times, tokens = c.arrivals()
    ok_rows = run.frame["ok"].to_numpy()
    ok_times, ok_tokens = c.arrivals(np.flatnonzero(ok_rows))
    for ws, we in ((T0, T0 + 5), (T0 + 10.04, T0 + 31.3), (T0 - 100, T0 + 1000), (T0 + 44.123, T0 + 44.2)):
        inside = (ok_times >= ws) & (ok_times < we)
        assert c.tokens_between(ws, we, ok_rows) == pytest.approx(float(ok_tokens[inside].sum(dtype=np.float64)),
                                                                   rel=1e-12)
    for t in (T0 + 3.33, T0 + 20.0, T0 - 1, float(np.nanmax(times))):
        seen = times[times <= t]
        assert c.last_arrival_at_or_before(t) == (float(seen.max()) if seen.size else None)
    edges = np.arange(0, 60, 5.0)
    expected, _ = np.histogram(times - T0, bins=edges, weights=tokens)
    assert np.allclose(c.token_histogram(edges, T0), expected, rtol=1e-12)


def test_tables_from_either_path_are_equal(tmp_path):
    root = _varied_run(tmp_path / "run")
    run = load_run(root, cache_min_bytes=None)
    ref = records_frame(_reference(root)[0])
    by_records = dataclasses.replace(run, frame=ref.frame, chunks=ref.chunks)
    assert _cells(envelope_table(run)) == _cells(envelope_table(by_records))
    rows = envelope_table(run)
    assert sum(r.counts.itl_samples for r in rows) > 0 and all(r.throughput.aggregate_output_tokens_per_s > 0
                                                              for r in rows)


def _cells(rows) -> list[dict]:
    return [{k: "NaN" if isinstance(v, float) and math.isnan(v) else v for k, v in r.as_dict().items()} for r in rows]


def test_a_million_record_shape_stays_columnar(tmp_path, monkeypatch):
    """Clean lines never reach the per-record path."""
    rng = np.random.default_rng(3)
    root = _write(tmp_path / "run", {"w_1.jsonl": [orjson.dumps(_record(i, rng)) for i in range(200)] + [b""]})
    calls = []
    monkeypatch.setattr("analysis.columnar.RecordsAccumulator.add_records", lambda self, batch: calls.append(batch))
    run = load_run(root, cache_min_bytes=None)
    assert len(run.frame) == 200 and not calls and not run.skipped_lines


def _copy_of(root: Path) -> Path:
    return cache_path(root, root / "records" / "w_1.jsonl")


def test_the_parquet_copy_is_used_while_the_file_is_unchanged(tmp_path):
    rng = np.random.default_rng(5)
    lines = [orjson.dumps(_record(i, rng)) for i in range(50)]
    root = _write(tmp_path / "run", {"w_1.jsonl": lines + [b'{"torn": ']})
    first = load_run(root, cache_min_bytes=0)
    assert _copy_of(root).is_file()
    again = load_run(root, cache_min_bytes=0)
    pd.testing.assert_frame_equal(again.frame, first.frame, check_exact=True)
    assert again.skipped_lines == first.skipped_lines == [f"{root / 'records' / 'w_1.jsonl'}:51: unreadable record line skipped"]

    # the copy is read, not the JSON: a copy made of other records would show
    stale = os.stat(_copy_of(root)).st_mtime_ns
    assert load_run(root, cache_min_bytes=0).frame["request_id"].tolist() == [f"q{i}" for i in range(50)]
    assert os.stat(_copy_of(root)).st_mtime_ns == stale

    # the torn record completed and another appended: read afresh, copy rewritten
    with open(root / "records" / "w_1.jsonl", "wb") as fh:
        fh.write(b"\n".join(lines + [orjson.dumps(_record(50, rng)), orjson.dumps(_record(51, rng))]) + b"\n")
    grown = load_run(root, cache_min_bytes=0)
    assert len(grown.frame) == 52 and not grown.skipped_lines
    assert os.stat(_copy_of(root)).st_mtime_ns != stale


def test_a_same_size_rewrite_is_noticed(tmp_path):
    rng = np.random.default_rng(5)
    rec = _record(0, rng, request_id="aaaa")
    root = _write(tmp_path / "run", {"w_1.jsonl": [orjson.dumps(rec), b""]})
    assert load_run(root, cache_min_bytes=0).frame["request_id"].tolist() == ["aaaa"]
    path = root / "records" / "w_1.jsonl"
    st = path.stat()
    path.write_bytes(path.read_bytes().replace(b"aaaa", b"bbbb"))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))  # same size, same modification time
    assert load_run(root, cache_min_bytes=0).frame["request_id"].tolist() == ["bbbb"]


def test_no_copy_of_a_file_that_needed_the_per_record_path(tmp_path):
    rng = np.random.default_rng(5)
    root = _write(tmp_path / "run", {"w_1.jsonl": [orjson.dumps(_record(0, rng)), BAD_LINES[12], b""]})
    run = load_run(root, cache_min_bytes=0)
    assert run.frame["request_id"].tolist() == ["q0", "typed"]
    assert run.frame["stage_name"].tolist() == ["sweep-0", 7]
    assert not _copy_of(root).exists()
    assert not list((root / "cache" / "records").iterdir())  # no temporary file left behind


def test_small_files_and_read_only_runs_get_no_copy(tmp_path):
    rng = np.random.default_rng(5)
    root = _write(tmp_path / "run", {"w_1.jsonl": [orjson.dumps(_record(0, rng)), b""]})
    load_run(root)  # default threshold: far above this file
    assert not (root / "cache").exists()
    (root / "cache").write_text("not a folder")  # a copy cannot be written: the run is still read
    assert len(load_run(root, cache_min_bytes=0).frame) == 1


def test_percentiles_overwrite_input_gives_the_same_numbers():
    rng = np.random.default_rng(1)
    qs = (50, 90, 95, 99, 99.9)
    values = rng.gamma(2.0, 10.0, 10_001).astype(np.float32).astype(np.float64)
    values[::97] = np.nan
    expected = metrics.percentiles(values.copy(), qs=qs)
    assert metrics.percentiles(values, qs=qs, overwrite_input=True) == expected
    assert math.isnan(metrics.percentiles(np.array([np.nan]), overwrite_input=True)["p50"])


@pytest.mark.parametrize("shape", ["close neighbours", "mixed signs", "far apart", "ties", "one value"])
def test_float32_percentiles_are_the_float64_ones_bit_for_bit(shape):
    """A float32 array reordered in place gives what its float64 copy gives (the mean apart)."""
    rng = np.random.default_rng(2)
    values = {"close neighbours": rng.gamma(4.0, 10.0, 200_001), "mixed signs": rng.normal(0.0, 5.0, 5_001),
              "far apart": np.array([1e-9, 3.0, 7e5, 2e-3, 1.0]), "ties": rng.integers(0, 3, 1_000) * 1.0,
              "one value": np.array([4.25])}[shape].astype(np.float32)
    qs = (50, 90, 95, 99, 12.5)
    expected = metrics.percentiles(values.astype(np.float64), qs=qs)
    got = metrics.percentiles(values.copy(), qs=qs, overwrite_input=True)
    assert {k: v for k, v in got.items() if k != "mean"} == {k: v for k, v in expected.items() if k != "mean"}
    assert got["mean"] == pytest.approx(expected["mean"], rel=1e-12)


@pytest.mark.parametrize("tokens_per_chunk", [1, 2, None], ids=["one token", "two tokens", "mixed"])
def test_blocks_of_clean_records_take_the_short_way_to_the_same_numbers(tmp_path, tokens_per_chunk):
    """Blocks whose every record succeeded with counted chunks skip the per-chunk selection."""
    rng = np.random.default_rng(11)
    records = []
    for i in range(300):
        rec = _record(i, rng, chunk_offsets_s=[0.1 + 0.01 * j + 1e-5 * i for j in range(12)])
        counts = [tokens_per_chunk or int(c) for c in rng.integers(1, 4, 12)]
        rec.update(chunk_tokens=counts, output_tokens=sum(counts))
        records.append(rec)
    root = _write(tmp_path / "run", {"w_1.jsonl": [orjson.dumps(r) for r in records] + [b""]})
    chunks = load_run(root, cache_min_bytes=None).chunks
    assert len(chunks.blocks) == 1 and chunks.blocks[0].tokens.strides == ((0,) if tokens_per_chunk else (1,))
    assert np.array_equal(chunks.itl_ms(), metrics.itl_values_ms(records).astype(np.float32))
    times, tokens = chunks.arrivals()
    edges = np.arange(0, 130, 5.0)
    expected, _ = np.histogram(times - T0, bins=edges, weights=tokens)
    assert np.allclose(chunks.token_histogram(edges, T0), expected, rtol=1e-12)
    assert chunks.tokens_between(T0 + 20, T0 + 60) == float(tokens[(times >= T0 + 20) & (times < T0 + 60)].sum())


def test_a_copy_that_cannot_be_written_leaves_the_records_read(tmp_path, monkeypatch):
    rng = np.random.default_rng(5)
    root = _write(tmp_path / "run", {"w_1.jsonl": [orjson.dumps(_record(i, rng)) for i in range(40)] + [b""]})
    monkeypatch.setattr(record_files, "CACHE_ROWS", 10)

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(record_files.pq.ParquetWriter, "write_table", full_disk)
    assert len(load_run(root, cache_min_bytes=0).frame) == 40
    assert not _copy_of(root).exists() and not list((root / "cache" / "records").iterdir())
