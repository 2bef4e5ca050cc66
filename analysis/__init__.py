"""Analysis of an Envelope run directory: load, tables, plots, write-up, compare.

Modules: :mod:`analysis.load` (run directory to frames; records read column by column by
:mod:`analysis.record_files` and :mod:`analysis.columnar`, their chunks kept in
:mod:`analysis.chunks`), :mod:`analysis.table`
(the envelope table), :mod:`analysis.envelope` (what is safe, what broke
first), :mod:`analysis.server_latency` (the server's own latency histograms per
window), :mod:`analysis.broke` (events in time order, token cross-check),
:mod:`analysis.failures` (failed requests by category, a server that stopped
answering), :mod:`analysis.tokens` (token-count audit), :mod:`analysis.plots`
(graphs on given axes), :mod:`analysis.prefix_cache` (the server's prefix-cache hit rate per window),
:mod:`analysis.clients` (the envelope per client class, one class's effect on another),
:mod:`analysis.turns` (TTFT by conversation turn), :mod:`analysis.sources` (the dataset and trace
files a run drew from), :mod:`analysis.report` (report files),
:mod:`analysis.compare` and :mod:`analysis.cli` (``envelope report`` and ``envelope compare``; alias
``python -m analysis``). Nothing is imported here, so importing the package is cheap.
"""

__all__: list[str] = []
