"""A sweep: one scenario against several server configurations, one run directory each.

The configurations come from a profile and ``--set KEY=V1,V2`` grids (every
combination, the first ``--set`` varying slowest), from a YAML list of settings
(``--configs FILE``), from several profiles (``--profile`` repeated: engines side
by side), or from ``--host`` URLs of servers already running. This
module holds the pure pieces: parsing the grid and the file into
:class:`SweepConfig`, naming each configuration's run directory, and the
``sweep.json`` log (:class:`SweepLog`) that the command keeps up to date as
each configuration finishes, so an interrupted sweep still says what ran.

``sweep.json`` (schema ``SWEEP_SCHEMA_VERSION``)::

    {"schema_version": 1, "scenario": "...", "scenario_path": "...", "profile": "cpu-tiny" | null,
     "started_unix_s": ..., "ended_unix_s": ... | null, "status": "running" | "complete" | "partial",
     "configs": [{"label": "max_num_seqs=4", "settings": {"max_num_seqs": 4}, "host": null, "profile": null,
                  "run_dir": "01-max_num_seqs-4", "status": "pending" | "complete" | "partial" |
                  "failed" | "failed_to_start", "exit_code": 0 | null, "failure": null | "...",
                  "log_tail": null | "...", "started_unix_s": ..., "ended_unix_s": ...}, ...]}
"""

from __future__ import annotations

import itertools
import json
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import yaml

from envelope.config import ConfigError, find_line

__all__ = [
    "SWEEP_SCHEMA_VERSION",
    "SWEEP_FILE",
    "SweepConfig",
    "SweepEntry",
    "SweepLog",
    "parse_set",
    "grid_configs",
    "load_config_file",
    "host_configs",
    "profile_configs",
    "config_dir_name",
    "read_sweep",
]

SWEEP_SCHEMA_VERSION = 1
SWEEP_FILE = "sweep.json"
_SET_RE = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*)=(.*)$")


@dataclass(frozen=True, slots=True, kw_only=True)
class SweepConfig:
    """One server configuration of a sweep: profile ``settings`` to override, or a running ``host``."""

    label: str  # "max_num_seqs=4, enable_prefix_caching=false", the host URL, or the profile's name
    settings: dict[str, Any] = field(default_factory=dict)
    host: str | None = None
    where: str | None = None  # "file:line" of a configuration read from a --configs file
    profile: str | None = None  # a sweep over profiles (--profile repeated): this configuration's profile


def _scalar(text: str) -> Any:
    """A value as YAML reads it: ``8`` -> 8, ``true`` -> True, ``0.9`` -> 0.9, ``abc`` -> "abc"."""
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    return text if value is None else value


def _text(value: Any) -> str:
    if value is True:
        return "true"
    if value is False:
        return "false"
    return str(value)


def _label(settings: dict[str, Any]) -> str:
    return ", ".join(f"{k}={_text(v)}" for k, v in settings.items()) or "profile as is"


def parse_set(text: str) -> tuple[str, list[Any]]:
    """``max_num_seqs=8,16,32`` -> ("max_num_seqs", [8, 16, 32]); raise :class:`ConfigError` naming the flag."""
    m = _SET_RE.match(text.strip())
    if not m:
        raise ConfigError(f"--set {text}: expected KEY=VALUE[,VALUE...] (for example --set max_num_seqs=8,16,32)")
    key, values = m.group(1), [v.strip() for v in m.group(2).split(",")]
    if not values or any(v == "" for v in values):
        raise ConfigError(f"--set {text}: a value is empty")
    parsed = [_scalar(v) for v in values]
    if len({json.dumps(v, sort_keys=True) for v in parsed}) != len(parsed):
        raise ConfigError(f"--set {text}: a value is listed twice")
    return key, parsed


def grid_configs(sets: Sequence[str]) -> list[SweepConfig]:
    """Every combination of the ``--set`` values, the first ``--set`` varying slowest."""
    axes: list[tuple[str, list[Any]]] = []
    for text in sets:
        key, values = parse_set(text)
        if any(key == k for k, _ in axes):
            raise ConfigError(f"--set {text}: {key} is set twice")
        axes.append((key, values))
    if not axes:
        return [SweepConfig(label=_label({}))]
    out = []
    for combo in itertools.product(*(values for _, values in axes)):
        settings = {k: v for (k, _), v in zip(axes, combo)}
        out.append(SweepConfig(label=_label(settings), settings=settings))
    return out


def load_config_file(path: str | os.PathLike[str]) -> list[SweepConfig]:
    """A YAML list of settings, at the top level or under ``configs:``; each item a mapping, with an
    optional ``name`` as its label. Raise :class:`ConfigError` as ``file:line: what``."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{p}: file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{p}: cannot read: {exc}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f":{mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{p}{line}: YAML syntax error: {getattr(exc, 'problem', None) or exc}") from None
    at: tuple[str | int, ...] = ()
    if isinstance(data, dict) and set(data) == {"configs"}:
        data, at = data["configs"], ("configs",)
    if not isinstance(data, list) or not data:
        raise ConfigError(f"{p}:1: expected a non-empty list of configurations (each a mapping of settings), "
                          f"at the top level or under 'configs:'")
    out, labels = [], set()
    for i, item in enumerate(data):
        line = find_line(p, (*at, i))
        where = f"{p}:{line}" if line else str(p)
        if not isinstance(item, dict):
            raise ConfigError(f"{where}: configuration {i + 1} must be a mapping of settings, got {item!r}")
        settings = {str(k): v for k, v in item.items() if k != "name"}
        if any(v is None for v in settings.values()):
            key = next(k for k, v in settings.items() if v is None)
            raise ConfigError(f"{where}: setting {key} has no value")
        label = str(item.get("name") or _label(settings))
        if label in labels:
            raise ConfigError(f"{where}: configuration {label!r} is listed twice")
        labels.add(label)
        out.append(SweepConfig(label=label, settings=settings, where=where))
    return out


def host_configs(hosts: Sequence[str]) -> list[SweepConfig]:
    """One configuration per ``--host`` URL (each must be http:// or https://, none twice)."""
    out = []
    for h in hosts:
        if not h.startswith(("http://", "https://")):
            raise ConfigError(f"--host must be an http:// or https:// URL (got {h!r})")
        if any(c.host == h.rstrip("/") for c in out):
            raise ConfigError(f"--host {h}: listed twice")
        out.append(SweepConfig(label=h.rstrip("/"), host=h.rstrip("/")))
    return out


def profile_configs(profiles: Sequence[str]) -> list[SweepConfig]:
    """One configuration per ``--profile`` (a name or a path; none twice): engines or whole setups side by side."""
    out: list[SweepConfig] = []
    for name in profiles:
        label = Path(name).stem if name.endswith((".yaml", ".yml")) else name
        if any(c.profile == name or c.label == label for c in out):
            raise ConfigError(f"--profile {name}: listed twice")
        out.append(SweepConfig(label=label, profile=name))
    return out


def config_dir_name(index: int, config: SweepConfig) -> str:
    """``01-max_num_seqs-4_enable_prefix_caching-false``: the configuration's run directory in the sweep."""
    if config.host is not None:
        body = re.sub(r"^https?://", "", config.host)
    elif config.settings:
        body = "_".join(f"{k}-{_text(v)}" for k, v in config.settings.items())
    else:
        body = config.label
    body = re.sub(r"[^A-Za-z0-9._-]+", "-", body).strip("-")[:80] or "config"
    return f"{index + 1:02d}-{body}"


@dataclass(slots=True, kw_only=True)
class SweepEntry:
    """One configuration's line in ``sweep.json``."""

    label: str
    settings: dict[str, Any]
    host: str | None
    run_dir: str  # relative to the sweep directory
    profile: str | None = None  # a sweep over profiles: the configuration's profile
    status: str = "pending"  # pending | complete | partial | failed | failed_to_start | not_run
    exit_code: int | None = None
    failure: str | None = None
    log_tail: str | None = None
    started_unix_s: float | None = None
    ended_unix_s: float | None = None


class SweepLog:
    """``sweep.json``: written whole (to a temporary file, then renamed) after every change."""

    def __init__(self, sweep_dir: Path, *, scenario: str, scenario_path: str, profile: str | None,
                 configs: Sequence[SweepConfig], started_unix_s: float, options: dict[str, Any]) -> None:
        self.path = Path(sweep_dir) / SWEEP_FILE
        self.doc: dict[str, Any] = {
            "schema_version": SWEEP_SCHEMA_VERSION, "scenario": scenario, "scenario_path": scenario_path,
            "profile": profile, "options": options, "started_unix_s": started_unix_s, "ended_unix_s": None,
            "status": "running",
        }
        self.entries = [SweepEntry(label=c.label, settings=dict(c.settings), host=c.host, profile=c.profile,
                                   run_dir=config_dir_name(i, c)) for i, c in enumerate(configs)]
        self.write()

    def write(self) -> None:
        doc = {**self.doc, "configs": [asdict(e) for e in self.entries]}
        tmp = self.path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(doc, indent=2, allow_nan=False) + "\n", encoding="utf-8")
        os.replace(tmp, self.path)

    def finish(self, status: str, ended_unix_s: float) -> None:
        self.doc.update(status=status, ended_unix_s=ended_unix_s)
        for e in self.entries:
            if e.status == "pending":
                e.status = "not_run"
        self.write()


def read_sweep(sweep_dir: str | os.PathLike[str]) -> tuple[dict[str, Any], list[SweepEntry]]:
    """``sweep.json``'s top-level fields and its entries; raise :class:`ConfigError` when unreadable."""
    path = Path(sweep_dir) / SWEEP_FILE
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{sweep_dir}: not a sweep directory (no {SWEEP_FILE})") from None
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path}: cannot read: {exc}") from None
    entries = [SweepEntry(**{k: v for k, v in c.items() if k in SweepEntry.__dataclass_fields__})
               for c in doc.pop("configs", [])]
    return doc, entries
