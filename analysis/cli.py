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
                               "envelope.html with the graphs embedded, envelope.json) and print the envelope. "
                               "With a price per box (--usd-per-hour), the report adds costs and a capacity plan.")
COMPARE_DESCRIPTION = paragraph("Compare two run directories stage by stage: write compare.md and compare.png "
                                "(default B/report/compare/). With --gate, also judge whether B regressed from A "
                                "beyond measurement noise: print the verdict as Markdown, write gate.md (and JUnit "
                                "XML with --junit), and exit 1 on a regression, 0 otherwise, 2 on unusable input "
                                "(see docs/gate.md).")


def add_report_arguments(p: argparse.ArgumentParser) -> None:
    """``RUN``, ``--out``, ``--settle-s``, the cost flags and an example epilog on ``p``."""
    p.formatter_class = HELP_FORMAT
    p.epilog = examples(f"{p.prog} runs/20250101-120000-capstone",
                        f"{p.prog} runs/20250101-120000-capstone --out /tmp/report --settle-s 10",
                        f"{p.prog} runs/20250101-120000-capstone --usd-per-hour 2.50 --target-users 500")
    p.add_argument("run_dir", metavar="RUN", help="run directory (the report goes to RUN/report/)")
    _add_common(p, out_help="output directory (default: RUN/report)")
    p.add_argument("--usd-per-hour", type=_positive_number, metavar="USD",
                   help="price of one box (the server as tested) per hour; overrides run.json and the profile")
    p.add_argument("--power-w", type=_positive_number, metavar="W",
                   help="the box's stated power draw, for J per token where NVML measured none")
    p.add_argument("--target-users", type=_positive_number, metavar="N",
                   help="plan capacity for N concurrent users (default: 10x the tested boundary)")
    p.add_argument("--target-rate", type=_positive_number, metavar="PER_S", dest="target_rate_per_s",
                   help="plan capacity for this many requests/s (default: 10x the tested boundary)")


def _positive_number(text: str) -> float:
    """A flag's value that must be a finite number above 0 (argparse turns the error into one line)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not (value > 0 and value != float("inf")):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text!r}")
    return value


def add_compare_arguments(p: argparse.ArgumentParser) -> None:
    """``A B``, ``--out``, ``--settle-s``, the regression gate's flags and an example epilog on ``p``."""
    p.formatter_class = HELP_FORMAT
    p.epilog = examples(f"{p.prog} runs/20250101-120000-capstone runs/20250102-090000-capstone",
                        f"{p.prog} runs/BASE runs/NEW --gate --junit gate.xml --max-ttft-regression 15%")
    p.add_argument("run_a", metavar="A", help="the first run directory (the baseline)")
    p.add_argument("run_b", metavar="B", help="the second run directory")
    _add_common(p, out_help="output directory (default: B/report/compare)")
    g = p.add_argument_group("regression gate (with --gate; percentages as 10% or 0.10)")
    g.add_argument("--gate", action="store_true",
                   help="judge whether B is worse than A beyond measurement noise: exit 1 if so, 0 if not, "
                        "2 on unusable input (different scenarios, a failed run)")
    g.add_argument("--junit", metavar="FILE", help="also write the gate's checks as JUnit XML to FILE")
    g.add_argument("--max-ttft-regression", metavar="PCT", type=_fraction_arg,
                   help="how much higher B's p95 TTFT may be than A's at a stage, relative (default 10%%)")
    g.add_argument("--max-tpot-regression", metavar="PCT", type=_fraction_arg,
                   help="the same for p95 TPOT (default 10%%)")
    g.add_argument("--max-attainment-drop", metavar="PCT", type=_fraction_arg,
                   help="how many points B's SLO attainment may fall below A's at a stage (default 0%%: any "
                        "drop beyond noise counts)")
    g.add_argument("--confidence", metavar="LEVEL", type=_confidence_arg,
                   help="how sure the whole gate must be before it fails, shared out over its checks "
                        "(default 95%%: two runs of the same server fail at most 5%% of the time)")


_GATE_SETTINGS = ("max_ttft_regression", "max_tpot_regression", "max_attainment_drop", "confidence")
_GATE_FLAGS = ("junit", *_GATE_SETTINGS)


def _fraction(text: str) -> float:
    """``10%`` or ``0.10`` as 0.10; ValueError (one line) otherwise. A bare number above 1 is ambiguous."""
    s = text.strip()
    try:
        value = float(s[:-1]) / 100.0 if s.endswith("%") else float(s)
    except ValueError:
        raise ValueError(f"expected a percentage such as 10% or a fraction such as 0.10, got {text!r}") from None
    if not value >= 0.0 or value == float("inf"):
        raise ValueError(f"expected a percentage of 0% or more, got {text!r}")
    if not s.endswith("%") and value > 1.0:
        raise ValueError(f"{text!r} is ambiguous: write {s}% for {s} percent (a bare number is a fraction: "
                         f"0.10 is 10%)")
    return value


def _fraction_arg(text: str) -> float:
    try:
        return _fraction(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _confidence_arg(text: str) -> float:
    value = _fraction_arg(text)
    if not 0.5 < value < 1.0:
        raise argparse.ArgumentTypeError(f"expected a level between 50% and 100% such as 95% or 0.95, got {text!r}")
    return value


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
        from analysis.cost import Price
        from analysis.load import load_run
        from analysis.report import summary_lines, write_report
        from analysis.table import WindowRule, envelope_table

        rule = WindowRule(settle_s=args.settle_s)
        say(f"loading {args.run_dir}")
        run = load_run(args.run_dir)
        target = Path(args.out) if args.out else Path(args.run_dir) / "report"
        say(f"{len(run.frame)} records, {len(run.stages)} stages; writing {target}")
        rows = envelope_table(run, rule=rule)
        usd = getattr(args, "usd_per_hour", None)
        write_report(run, target, rule=rule, rows=rows,
                     price=Price(usd_per_hour=usd, source="--usd-per-hour") if usd is not None else None,
                     power_w=getattr(args, "power_w", None), target_users=getattr(args, "target_users", None),
                     target_rate_per_s=getattr(args, "target_rate_per_s", None))
        if run.missing:
            say(f"{len(run.missing)} missing part(s) listed in {target / 'envelope.md'}")
        say(f"wrote {target / 'envelope.md'}")
        print("\n".join(summary_lines(run, rows)), file=out_stream)
        return 0

    return _guarded(work, say)


def run_compare(args: argparse.Namespace, *, out: TextIO | None = None, err: TextIO | None = None,
                prefix: str = "analysis") -> int:
    """Write ``compare.md`` and ``compare.png`` to ``args.out`` (default ``B/report/compare``); exit status as above.

    With ``args.gate``: first the regression gate (:mod:`analysis.gate_runs`); its Markdown goes to
    ``out`` and ``gate.md``, its JUnit XML to ``args.junit``; exit 1 when B regressed, 0 when not,
    2 on unusable input (one line on ``err``, nothing written). Progress lines are left out then, so
    that ``err`` carries only what went wrong.
    """
    err = err or sys.stderr
    gate = bool(getattr(args, "gate", False))

    def say(line: str) -> None:
        print(f"{prefix}: {line}", file=err)

    given = [f"--{name.replace('_', '-')}" for name in _GATE_FLAGS if getattr(args, name, None) is not None]
    if given and not gate:
        say(f"{', '.join(given)} only make sense with --gate")
        return 2

    def work() -> int:
        from analysis import envelope as env
        from analysis.compare import compare_rows, plot_compare, write_compare_markdown
        from analysis.load import load_run
        from analysis.report import render_figure_png
        from analysis.table import WindowRule, envelope_table

        rule = WindowRule(settle_s=args.settle_s)
        runs = []
        for d in (args.run_a, args.run_b):
            if not gate:
                say(f"loading {d}")
            runs.append(load_run(d))
        a, b = (envelope_table(r, rule=rule) for r in runs)
        verdict = None
        if gate:
            from analysis.gate import GateSettings
            from analysis.gate_runs import GateInputError, gate_runs

            chosen = {name: getattr(args, name) for name in _GATE_SETTINGS if getattr(args, name, None) is not None}
            try:
                verdict = gate_runs(runs[0], runs[1], settings=GateSettings(**chosen), rule=rule, rows=(a, b))
            except GateInputError as exc:  # runs that cannot be gated: one line, nothing written
                say(str(exc))
                return 2
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
        if verdict is None:
            say(f"wrote {target / 'compare.md'}")
            return 0
        markdown = f"# Regression gate: BASE = {runs[0].name}, NEW = {runs[1].name}\n\n" + verdict.markdown()
        (target / "gate.md").write_text(markdown, encoding="utf-8")
        print(markdown, end="", file=out or sys.stdout)
        if args.junit:
            Path(args.junit).write_text(verdict.junit_xml(), encoding="utf-8")
        wrote = ", ".join(str(p) for p in (target / "gate.md", args.junit) if p)
        say(f"gate {'FAIL' if verdict.regressed else 'pass'}; wrote {wrote}")
        return verdict.exit_code

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
