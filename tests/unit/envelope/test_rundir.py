"""run.json's one writer and its record."""

from __future__ import annotations

import json

from envelope.rundir import RUN_SCHEMA_VERSION, RunInfo, RunJson, RunStatus


def test_create_update_and_read_back(tmp_path):
    scenario = tmp_path / "s.yaml"
    scenario.write_text("name: s\n")
    owner = RunJson(tmp_path)
    info = RunInfo(run_id="r1", status=RunStatus.RUNNING, started_unix_s=1.0, quick=True,
                   options={"api_key": "***"}, written_by="envelope run")
    assert owner.create(info, scenario_path=scenario)
    owner.update(status=RunStatus.COMPLETE, ended_unix_s=2.0)
    data = json.loads((tmp_path / "run.json").read_text())
    assert data["schema_version"] == RUN_SCHEMA_VERSION and data["status"] == "complete"
    assert (tmp_path / "scenario.yaml").read_text() == "name: s\n"
    back = RunInfo.from_json(data)
    assert back == owner.info


def test_a_second_writer_does_not_take_over(tmp_path):
    RunJson(tmp_path).create(RunInfo(run_id="r", status="running", written_by="envelope run"))
    other = RunJson(tmp_path)
    assert not other.create(RunInfo(run_id="r", status="running", written_by="locust"))
    other.update(status="complete")  # not its file: nothing happens
    assert json.loads((tmp_path / "run.json").read_text())["written_by"] == "envelope run"
    assert json.loads((tmp_path / "run.json").read_text())["status"] == "running"


def test_old_and_odd_run_json_reads_with_what_it_has():
    info = RunInfo.from_json({"status": "partial", "started_unix_s": 5, "quick": "yes", "planned_stages": True},
                             run_id="dir-name")
    assert (info.run_id, info.status, info.started_unix_s, info.schema_version) == ("dir-name", "partial", 5.0, 0)
    assert info.quick is None and info.planned_stages is None and info.ended_unix_s is None
