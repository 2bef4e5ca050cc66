"""Where a Locust process writes its run: the run directory, run.json, stages.json, workers.json.

No Locust, no gevent. The run directory comes from ``--run-dir``, else from the
``--csv`` prefix (``--csv RUN/locust/locust`` means ``RUN``), else it is chosen
when the run starts (``runs/<UTC time>-<scenario>``); a worker learns it from the master.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Mapping, Sequence

from envelope.rundir import WORKERS_FILE, RunInfo, RunJson, RunStatus, atomic_write_json, file_sha256, tool_versions
from envelope.stages import StageRecord, write_stages

__all__ = ["RunFiles", "run_dir_from_options"]


def run_dir_from_options(options: Any) -> Path | None:
    """``--run-dir``, else the folder of the ``--csv`` prefix; None when neither was given."""
    explicit = getattr(options, "run_dir", None)
    if explicit:
        return Path(explicit)
    csv_prefix = getattr(options, "csv_prefix", None)
    if csv_prefix:
        parent = Path(csv_prefix).parent
        # --csv RUN/locust/stats puts CSVs in RUN/locust/; the run directory is RUN
        return parent.parent if parent.name == "locust" else parent
    return None


class RunFiles:
    """The run directory of one Locust process and the files the master (or single process) owns in it."""

    def __init__(self, run_dir: Path | None, *, name: str) -> None:
        self.run_dir = run_dir
        self.name = name  # the scenario's name, or "manual": the tail of a directory chosen at start
        self._run_json: RunJson | None = None

    @property
    def run_id(self) -> str:
        return self.run_dir.name if self.run_dir else ""

    def ensure(self) -> Path:
        """The run directory, created (and chosen, when nobody said where)."""
        if self.run_dir is None:
            stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
            self.run_dir = Path("runs") / f"{stamp}-{self.name}"
        self.run_dir.mkdir(parents=True, exist_ok=True)
        return self.run_dir

    def adopt(self, run_dir: str | Path) -> None:
        """Worker: the master names the run directory (only the first time it matters)."""
        if self.run_dir is None and run_dir:
            self.run_dir = Path(run_dir)

    def write_stages(self, log: Sequence[StageRecord]) -> None:
        write_stages(self.ensure(), log)

    def write_workers(self, ledger_json: Mapping[str, Any]) -> None:
        """workers.json, as the master's ledger describes it (:meth:`locustfiles.cluster.WorkerLedger.to_json`)."""
        atomic_write_json(self.ensure() / WORKERS_FILE, dict(ledger_json))

    def write_run_json(self, status: RunStatus | str, *, scenario_path: str | None, quick: bool,
                       options: Mapping[str, Any], started_unix_s: float, argv: Sequence[str]) -> None:
        """Describe the run in run.json, unless an ``envelope run`` orchestrator already owns it."""
        run_dir = self.ensure()
        ended = time.time() if status != RunStatus.RUNNING else None
        if self._run_json is None:
            owner = RunJson(run_dir)
            info = RunInfo(run_id=self.run_id, status=RunStatus(status), scenario_path=scenario_path,
                           scenario_sha256=file_sha256(scenario_path), quick=quick, options=dict(options),
                           versions=tool_versions(), started_unix_s=started_unix_s, ended_unix_s=ended,
                           argv=tuple(a for a in argv if "key" not in a.lower()), written_by="locust")
            if owner.create(info, scenario_path=scenario_path):
                self._run_json = owner
            return
        self._run_json.update(status=RunStatus(status), ended_unix_s=ended)
