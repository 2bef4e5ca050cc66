"""Command line: ``envelope report RUN [--out DIR]`` and ``envelope compare A B [--out DIR]``.

``python -m analysis RUN`` and ``python -m analysis --compare A B`` are the same
commands (:func:`main`). Progress and errors are one line each on stderr;
unusable input exits with status 2 and one line, never a traceback. Nothing
heavy is imported until a command runs, so ``--help`` is fast.
"""

from __future__ import annotations

import argparse
import io
import sys
from pathlib import Path
from typing import Callable, Sequence, TextIO

from envelope.usage import HELP_FORMAT, OneLineParser, examples, paragraph, parse_or_say

__all__ = ["main", "add_report_arguments", "add_compare_arguments", "run_report", "run_compare",
           "REPORT_HELP", "REPORT_DESCRIPTION", "COMPARE_HELP", "COMPARE_DESCRIPTION"]

REPORT_HELP = "write a run's report and print its envelope"
COMPARE_HELP = "compare two runs stage by stage"
REPORT_DESCRIPTION = paragraph("Analyse a run directory: write RUN/report/ (table.csv and table.md, graphs, envelope.md, "
                               "envelope.html with the graphs embedded) and print the envelope.")
COMPARE_DESCRIPTION = paragraph("Compare two run directories stage by stage: write compare.md and compare.png "
                                "(default B/report/compare/).")


def add_report_arguments(p: argparse.ArgumentParser) -> None:
    """``RUN``, ``--out``, ``--settle-s`` and an example epilog on ``p``."""
    p.formatter_class = HELP_FORMAT
    p.epilog = examples(f"{p.prog} runs/20250101-120000-capstone",
                        f"{p.prog} runs/20250101-120000-capstone --out /tmp/report --settle-s 10")
    p.add_argument("run_dir", metavar="RUN", help="run directory (the report goes to RUN/report/)")
    _add_common(p, out_help="output directory (default: RUN/report)")


def add_compare_arguments(p: argparse.ArgumentParser) -> None:
    """``A B``, ``--out``, ``--settle-s`` and an example epilog on ``p``."""
    p.formatter_class = HELP_FORMAT
    p.epilog = examples(f"{p.prog} runs/20250101-120000-capstone runs/20250102-090000-capstone")
    p.add_argument("run_a", metavar="A", help="the first run directory (the baseline)")
    p.add_argument("run_b", metavar="B", help="the second run directory")
    _add_common(p, out_help="output directory (default: B/report/compare)")


def _add_common(p: argparse.ArgumentParser, *, out_help: str) -> None:
    p.add_argument("--out", help=out_help)
    p.add_argument("--settle-s", type=float, default=5.0, help="settle margin after the ramp (default 5 s)")


def run_report(args: argparse.Namespace, *, out: TextIO | None = None, err: TextIO | None = None,
               prefix: str = "analysis") -> int:
    """Write ``args.out`` (default ``RUN/report``); returns 0 ok, 2 unusable input, 1 failure while writing.

    The report's headline (a partial run says so first) goes to ``out``; progress to ``err``.
    """
    err = err or sys.stderr
    out_stream = out or sys.stdout

    def say(line: str) -> None:
        print(f"{prefix}: {line}", file=err)

    def work() -> int:
        # Imports only now: they are slow and --help should not wait.
        from analysis.load import load_run
        from analysis.report import summary_lines, write_report
        from analysis.table import WindowRule, envelope_table

        rule = WindowRule(settle_s=args.settle_s)
        say(f"loading {args.run_dir}")
        run = load_run(args.run_dir)
        target = Path(args.out) if args.out else Path(args.run_dir) / "report"
        say(f"{len(run.frame)} records, {len(run.stages)} stages; writing {target}")
        rows = envelope_table(run, rule=rule)
        write_report(run, target, rule=rule, rows=rows)
        if run.missing:
            say(f"{len(run.missing)} missing part(s) listed in {target / 'envelope.md'}")
        say(f"wrote {target / 'envelope.md'}")
        print("\n".join(summary_lines(run, rows)), file=out_stream)
        return 0

    return _guarded(work, say)


def run_compare(args: argparse.Namespace, *, err: TextIO | None = None, prefix: str = "analysis") -> int:
    """Write ``compare.md`` and ``compare.png`` to ``args.out`` (default ``B/report/compare``); exit status as above."""
    err = err or sys.stderr

    def say(line: str) -> None:
        print(f"{prefix}: {line}", file=err)

    def work() -> int:
        from analysis import envelope as env
        from analysis.compare import compare_rows, plot_compare, write_compare_markdown
        from analysis.load import load_run
        from analysis.report import render_figure_png
        from analysis.table import WindowRule, envelope_table

        rule = WindowRule(settle_s=args.settle_s)
        runs = []
        for d in (args.run_a, args.run_b):
            say(f"loading {d}")
            runs.append(load_run(d))
        a, b = (envelope_table(r, rule=rule) for r in runs)
        target = Path(args.out) if args.out else Path(args.run_b) / "report" / "compare"
        target.mkdir(parents=True, exist_ok=True)
        sentences = tuple(env.envelope_sentence(env.find_envelope(rows)) if rows else "no stages"
                          for rows in (a, b))
        buf = io.StringIO()
        write_compare_markdown(compare_rows(a, b), buf, name_a=runs[0].name, name_b=runs[1].name,
                               sentences=sentences)  # type: ignore[arg-type]
        buf.write("\n![throughput and TTFT, A vs B](compare.png)\n")
        for tag, r in (("A", runs[0]), ("B", runs[1])):
            if r.missing:
                buf.write(f"\nMissing in {tag}:\n" + "".join(f"- {m}\n" for m in r.missing))
        (target / "compare.md").write_text(buf.getvalue(), encoding="utf-8")
        png = render_figure_png(
            lambda axes: plot_compare(axes, a, b, name_a=runs[0].name, name_b=runs[1].name),
            nrows=2, size_in=(9.0, 8.0),
        )
        (target / "compare.png").write_bytes(png)
        say(f"wrote {target / 'compare.md'}")
        return 0

    return _guarded(work, say)


def _guarded(work: Callable[[], int], say: Callable[[str], None]) -> int:
    """``work()``, with unusable input as one line and status 2 (a write that failed: status 1)."""
    from analysis.load import RunDirError

    try:
        return work()
    except RunDirError as exc:
        say(str(exc))
        return 2
    except OSError as exc:
        say(f"{exc.filename or ''}: {exc.strerror or exc}")
        return 1
    except (ValueError, TypeError, KeyError) as exc:
        # malformed content that got past the loader's checks (e.g. a record field of the wrong type)
        say(f"unusable input: {type(exc).__name__}: {' '.join(str(exc).split())[:300]}")
        return 2


def main(argv: Sequence[str] | None = None, *, err: TextIO | None = None, out: TextIO | None = None) -> int:
    """``python -m analysis RUN`` or ``python -m analysis --compare A B``; returns the exit status.

    The same commands as ``envelope report`` and ``envelope compare`` (0 ok, 2 unusable input,
    1 failure while writing).
    """
    err = err or sys.stderr
    p = OneLineParser(prog="python -m analysis", formatter_class=HELP_FORMAT,
                      description=paragraph("Analyse an Envelope run directory (the same commands as "
                                            "'envelope report' and 'envelope compare')."),
                      epilog=examples("python -m analysis runs/20250101-120000-capstone",
                                      "python -m analysis --compare runs/RUN_A runs/RUN_B"))
    p.add_argument("run_dir", nargs="?", help="run directory (report goes to RUN_DIR/report/)")
    p.add_argument("--compare", nargs=2, metavar=("RUN_A", "RUN_B"), help="compare two run directories")
    _add_common(p, out_help="output directory")
    args = parse_or_say(p, argv, prefix="analysis: ", err=err)
    if args is None:
        return 2
    if args.compare:
        args.run_a, args.run_b = args.compare
        return run_compare(args, err=err)
    if not args.run_dir:
        print("analysis: give RUN_DIR or --compare RUN_A RUN_B", file=err)
        return 2
    return run_report(args, out=out, err=err)
