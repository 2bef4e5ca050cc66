"""Command line: ``python -m analysis RUN_DIR [--out DIR]`` and ``--compare RUN_A RUN_B``.

Progress and errors are one line each on stderr; unusable input exits with
status 2 and one line, never a traceback.
"""

from __future__ import annotations

import argparse
import io
import sys
from pathlib import Path
from typing import Sequence, TextIO

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m analysis", description="Analyse an Envelope run directory.")
    p.add_argument("run_dir", nargs="?", help="run directory (report goes to RUN_DIR/report/)")
    p.add_argument("--out", help="output directory")
    p.add_argument("--compare", nargs=2, metavar=("RUN_A", "RUN_B"), help="compare two run directories")
    p.add_argument("--settle-s", type=float, default=5.0, help="settle margin after the ramp (default 5 s)")
    return p


def main(argv: Sequence[str] | None = None, *, err: TextIO | None = None, out: TextIO | None = None) -> int:
    """Run the CLI; returns the exit status (0 ok, 2 unusable input, 1 failure while writing).

    The report's headline (a partial run says so first) goes to ``out``; progress to ``err``.
    """
    err = err or sys.stderr
    out_stream = out or sys.stdout
    args = _parser().parse_args(argv)
    if not args.run_dir and not args.compare:
        print("analysis: give RUN_DIR or --compare RUN_A RUN_B", file=err)
        return 2
    # Imports after argument parsing: they are slow and --help should not wait.
    from analysis.load import RunDirError, load_run
    from analysis.table import WindowRule

    rule = WindowRule(settle_s=args.settle_s)
    try:
        if args.compare:
            return _compare(args.compare[0], args.compare[1], args.out, rule, err)
        print(f"analysis: loading {args.run_dir}", file=err)
        run = load_run(args.run_dir)
        out = Path(args.out) if args.out else Path(args.run_dir) / "report"
        print(f"analysis: {len(run.frame)} records, {len(run.stages)} stages; writing {out}", file=err)
        from analysis.report import summary_lines, write_report
        from analysis.table import envelope_table

        rows = envelope_table(run, rule=rule)
        write_report(run, out, rule=rule, rows=rows)
        if run.missing:
            print(f"analysis: {len(run.missing)} missing part(s) listed in {out / 'envelope.md'}", file=err)
        print(f"analysis: wrote {out / 'envelope.md'}", file=err)
        print("\n".join(summary_lines(run, rows)), file=out_stream)
        return 0
    except RunDirError as exc:
        print(f"analysis: {exc}", file=err)
        return 2
    except OSError as exc:
        print(f"analysis: {exc.filename or ''}: {exc.strerror or exc}", file=err)
        return 1
    except (ValueError, TypeError, KeyError) as exc:
        # malformed content that got past the loader's checks (e.g. a record field of the wrong type)
        print(f"analysis: unusable input: {type(exc).__name__}: {' '.join(str(exc).split())[:300]}", file=err)
        return 2


def _compare(dir_a: str, dir_b: str, out_arg: str | None, rule, err: TextIO) -> int:
    from analysis import envelope as env
    from analysis.compare import compare_rows, plot_compare, write_compare_markdown
    from analysis.load import load_run
    from analysis.report import render_figure_png
    from analysis.table import envelope_table

    runs = []
    for d in (dir_a, dir_b):
        print(f"analysis: loading {d}", file=err)
        runs.append(load_run(d))
    a, b = (envelope_table(r, rule=rule) for r in runs)
    out = Path(out_arg) if out_arg else Path(dir_b) / "report" / "compare"
    out.mkdir(parents=True, exist_ok=True)
    sentences = tuple(env.envelope_sentence(env.find_envelope(rows)) if rows else "no stages" for rows in (a, b))
    buf = io.StringIO()
    write_compare_markdown(compare_rows(a, b), buf, name_a=runs[0].name, name_b=runs[1].name,
                           sentences=sentences)  # type: ignore[arg-type]
    buf.write("\n![throughput and TTFT, A vs B](compare.png)\n")
    for tag, r in (("A", runs[0]), ("B", runs[1])):
        if r.missing:
            buf.write(f"\nMissing in {tag}:\n" + "".join(f"- {m}\n" for m in r.missing))
    (out / "compare.md").write_text(buf.getvalue(), encoding="utf-8")
    png = render_figure_png(
        lambda axes: plot_compare(axes, a, b, name_a=runs[0].name, name_b=runs[1].name),
        nrows=2, size_in=(9.0, 8.0),
    )
    (out / "compare.png").write_bytes(png)
    print(f"analysis: wrote {out / 'compare.md'}", file=err)
    return 0
