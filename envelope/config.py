"""Load YAML into validated pydantic models, reporting errors as ``file:line: message``.

Scenarios and server profiles are both YAML files that users edit by hand, so a
mistake must point at the line to fix. The YAML is composed into a node tree
(which keeps line marks) alongside the plain data; a pydantic validation error's
location is walked down that tree to find the line.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

__all__ = ["ConfigError", "FieldError", "StrictModel", "find_line", "load_yaml_model", "validate_data"]

M = TypeVar("M", bound=BaseModel)


class ConfigError(ValueError):
    """A configuration file or value is wrong; ``str()`` is one line that says where and what."""


class FieldError(ValueError):
    """Raise from a model validator to blame a key below the model, not the model itself.

    ``at`` is the path from the validated model down to the offending value, for
    example ``("stages", 2, "name")``; the error's line and path then point there.
    """

    def __init__(self, message: str, *, at: tuple[str | int, ...] = ()) -> None:
        super().__init__(message)
        self.at = tuple(at)


class StrictModel(BaseModel):
    """Base for configuration models: unknown keys are rejected, instances are frozen."""

    model_config = ConfigDict(extra="forbid", frozen=True)


def load_yaml_model(path: str | os.PathLike[str], model: type[M], *, text: str | None = None) -> M:
    """Parse the YAML file at ``path`` and validate it as ``model``.

    Raises :class:`ConfigError` with ``file:line: message`` for unreadable files,
    YAML syntax errors and validation errors.
    """
    name = str(path)
    if text is None:
        try:
            text = Path(path).read_text(encoding="utf-8")
        except FileNotFoundError:
            raise ConfigError(f"{name}: file not found") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{name}: cannot read: {exc}") from None
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = f":{mark.line + 1}" if mark is not None else ""
        problem = exc.problem or exc.context or "invalid YAML"
        raise ConfigError(f"{name}{line}: YAML syntax error: {problem}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{name}: YAML error: {exc}") from None
    if data is None:
        raise ConfigError(f"{name}:1: the file is empty")
    return validate_data(data, model, source=name, node=node)


def validate_data(data: Any, model: type[M], *, source: str = "<config>", node: yaml.Node | None = None) -> M:
    """Validate already-parsed data; errors name ``source`` and, with ``node``, the line."""
    if not isinstance(data, dict):
        line = f":{node.start_mark.line + 1}" if node is not None else ""
        raise ConfigError(f"{source}{line}: expected a mapping of keys to values at the top level")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_first_error_line(exc, source, node)) from None


def find_line(path: str | os.PathLike[str], at: tuple[str | int, ...], *, text: str | None = None) -> int | None:
    """The 1-based line of the key (or list item) at ``at`` in a YAML file, or None when it is not there.

    For checks made after loading (a model name the server does not serve), so
    their message can still point at the line to fix.
    """
    try:
        text = Path(path).read_text(encoding="utf-8") if text is None else text
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return None
    current = node
    line = None
    for part in at:
        nxt = None
        if isinstance(current, yaml.MappingNode):
            for key_node, value_node in current.value:
                if key_node.value == str(part):
                    line, nxt = key_node.start_mark.line + 1, value_node
                    break
        elif isinstance(current, yaml.SequenceNode) and isinstance(part, int) and 0 <= part < len(current.value):
            nxt = current.value[part]
            line = nxt.start_mark.line + 1
        if nxt is None:
            return None
        current = nxt
    return line


def _first_error_line(exc: ValidationError, source: str, node: yaml.Node | None) -> str:
    err = exc.errors(include_url=False)[0]
    loc = tuple(err.get("loc", ()))
    # pydantic adds the name of a union member or a validator step to the loc; keep the data path.
    path = [p for p in loc if isinstance(p, int) or not _is_internal(p)]
    cause = (err.get("ctx") or {}).get("error")
    if isinstance(cause, FieldError):
        path.extend(cause.at)
    line = _line_for(node, path) if node is not None else None
    where = _format_path(path)
    msg = _friendly(err, path)
    prefix = f"{source}:{line}" if line is not None else source
    return f"{prefix}: {where}: {msg}" if where else f"{prefix}: {msg}"


def _is_internal(part: Any) -> bool:
    # union tags and function-validator markers look like "function-after[...]" or "int" / "str"
    return isinstance(part, str) and ("[" in part or part in {"int", "float", "str", "bool", "list", "dict"})


def _friendly(err: dict, path: list) -> str:
    kind = err.get("type", "")
    if kind == "extra_forbidden":
        return f"unknown key {path[-1]!r}" if path else "unknown key"
    if kind == "missing":
        return f"missing required key {path[-1]!r}" if path else "missing required key"
    msg = str(err.get("msg", "invalid value"))
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, ") :]
    if "input" in err and kind not in {"missing"} and not isinstance(err["input"], (dict, list)):
        msg = f"{msg} (got {err['input']!r})"
    return msg


def _format_path(path: list) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _line_for(node: yaml.Node, path: list) -> int:
    """The 1-based line of the deepest node on ``path`` that exists in the YAML."""
    current = node
    line = node.start_mark.line + 1
    for part in path:
        nxt = None
        if isinstance(current, yaml.MappingNode):
            for key_node, value_node in current.value:
                if key_node.value == str(part):
                    # for an unknown or bad key, the key's own line is what to fix
                    line = key_node.start_mark.line + 1
                    nxt = value_node
                    break
        elif isinstance(current, yaml.SequenceNode) and isinstance(part, int) and part < len(current.value):
            nxt = current.value[part]
        if nxt is None:
            break
        current = nxt
        line = current.start_mark.line + 1 if not isinstance(current, yaml.ScalarNode) else line
    return line
