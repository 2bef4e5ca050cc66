"""A sweep's configurations: --set grids, a YAML list, --host URLs; their run directories; sweep.json."""

from __future__ import annotations

import json

import pytest

from envelope.config import ConfigError
from envelope.sweep import (
    SweepConfig,
    SweepLog,
    config_dir_name,
    grid_configs,
    host_configs,
    load_config_file,
    parse_set,
    read_sweep,
)


def test_a_set_reads_its_values_as_yaml_scalars():
    assert parse_set("max_num_seqs=8,16,32") == ("max_num_seqs", [8, 16, 32])
    assert parse_set("enable_prefix_caching=true,false") == ("enable_prefix_caching", [True, False])
    assert parse_set("gpu_memory_utilization=0.8, 0.9") == ("gpu_memory_utilization", [0.8, 0.9])
    assert parse_set("kv_cache_dtype=auto,fp8") == ("kv_cache_dtype", ["auto", "fp8"])


@pytest.mark.parametrize("text, fragment", [
    ("max_num_seqs", "expected KEY=VALUE"),
    ("max_num_seqs=8,,16", "a value is empty"),
    ("max_num_seqs=", "a value is empty"),
    ("max_num_seqs=8,8", "listed twice"),
    ("1x=2", "expected KEY=VALUE"),
])
def test_a_bad_set_is_one_line_naming_it(text, fragment):
    with pytest.raises(ConfigError) as err:
        parse_set(text)
    assert str(err.value).startswith(f"--set {text}: ") and fragment in str(err.value)


def test_a_grid_is_every_combination_the_first_set_varying_slowest():
    configs = grid_configs(["max_num_seqs=4,16", "enable_prefix_caching=true,false"])
    assert [c.settings for c in configs] == [
        {"max_num_seqs": 4, "enable_prefix_caching": True}, {"max_num_seqs": 4, "enable_prefix_caching": False},
        {"max_num_seqs": 16, "enable_prefix_caching": True}, {"max_num_seqs": 16, "enable_prefix_caching": False}]
    assert configs[1].label == "max_num_seqs=4, enable_prefix_caching=false"
    assert all(c.host is None for c in configs)
    with pytest.raises(ConfigError, match="max_num_seqs is set twice"):
        grid_configs(["max_num_seqs=4", "max_num_seqs=8"])


def test_a_config_file_is_a_list_with_optional_names(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("configs:\n  - name: small\n    max_num_seqs: 4\n  - {max_num_seqs: 16, enable_prefix_caching: false}\n")
    a, b = load_config_file(path)
    assert (a.label, a.settings) == ("small", {"max_num_seqs": 4})
    assert (b.label, b.settings) == ("max_num_seqs=16, enable_prefix_caching=false",
                                     {"max_num_seqs": 16, "enable_prefix_caching": False})
    top = tmp_path / "top.yaml"
    top.write_text("- max_num_seqs: 4\n- max_num_seqs: 8\n")
    assert [c.settings["max_num_seqs"] for c in load_config_file(top)] == [4, 8]


@pytest.mark.parametrize("text, expect", [
    ("- max_num_seqs: 4\n- 7\n", ":2: configuration 2 must be a mapping"),
    ("- max_num_seqs: 4\n- max_num_seqs:\n", ":2: setting max_num_seqs has no value"),
    ("- {name: a, max_num_seqs: 4}\n- {name: a, max_num_seqs: 8}\n", ":2: configuration 'a' is listed twice"),
    ("configs: 3\n", ":1: expected a non-empty list"),
    ("- [\n", "YAML syntax error"),
])
def test_a_bad_config_file_names_its_line(tmp_path, text, expect):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_config_file(path)
    assert str(err.value).startswith(str(path)) and expect in str(err.value) and "\n" not in str(err.value)


def test_hosts_are_urls_each_once():
    a, b = host_configs(["http://a:8000/", "https://b:8000"])
    assert (a.label, a.host, b.host) == ("http://a:8000", "http://a:8000", "https://b:8000")
    with pytest.raises(ConfigError, match="http:// or https://"):
        host_configs(["a:8000"])
    with pytest.raises(ConfigError, match="listed twice"):
        host_configs(["http://a:8000", "http://a:8000/"])


def test_run_directory_names_are_numbered_and_safe():
    assert config_dir_name(0, SweepConfig(label="x", settings={"max_num_seqs": 4, "enable_prefix_caching": False})) \
        == "01-max_num_seqs-4_enable_prefix_caching-false"
    assert config_dir_name(11, SweepConfig(label="http://gpu-a:8000", host="http://gpu-a:8000")) == "12-gpu-a-8000"
    assert config_dir_name(2, SweepConfig(label="s", settings={"speculative_config": {"n": 4}})).startswith("03-")
    assert "/" not in config_dir_name(2, SweepConfig(label="s", settings={"speculative_config": {"n": 4}}))


def test_the_sweep_log_says_after_each_change_what_ran(tmp_path):
    configs = grid_configs(["max_num_seqs=4,16,32"])
    log = SweepLog(tmp_path, scenario="s", scenario_path="s.yaml", profile="cpu-tiny", configs=configs,
                   started_unix_s=1.0, options={"quick": False})
    doc, entries = read_sweep(tmp_path)
    assert doc["status"] == "running" and [e.status for e in entries] == ["pending"] * 3
    log.entries[0].status, log.entries[0].exit_code = "complete", 0
    log.entries[1].status, log.entries[1].log_tail = "failed_to_start", "error: bad flag"
    log.write()
    log.finish("partial", 2.0)
    doc, entries = read_sweep(tmp_path)
    assert (doc["status"], doc["ended_unix_s"], doc["schema_version"]) == ("partial", 2.0, 1)
    assert [e.status for e in entries] == ["complete", "failed_to_start", "not_run"]
    assert entries[1].log_tail == "error: bad flag" and entries[2].run_dir == "03-max_num_seqs-32"
    json.loads((tmp_path / "sweep.json").read_text())  # plain JSON
    with pytest.raises(ConfigError, match="not a sweep directory"):
        read_sweep(tmp_path / "nothing")
