"""envelope.config: YAML into strict models, errors as one ``file:line: path: message`` line."""

from __future__ import annotations

import pytest
from pydantic import model_validator

from envelope.config import ConfigError, FieldError, StrictModel, load_yaml_model, validate_data


class Inner(StrictModel):
    size: int
    label: str = "x"


class Outer(StrictModel):
    name: str
    items: list[Inner] = []

    @model_validator(mode="after")
    def _no_big_second_item(self) -> Outer:
        if len(self.items) > 1 and self.items[1].size > 100:
            raise FieldError("the second item is too big", at=("items", 1, "size"))
        return self


def _load(tmp_path, text: str, model=Outer):
    path = tmp_path / "conf.yaml"
    path.write_text(text)
    return path, load_yaml_model(path, model)


def _error(tmp_path, text: str, model=Outer) -> str:
    with pytest.raises(ConfigError) as info:
        _load(tmp_path, text, model)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_valid_file_loads(tmp_path):
    _, obj = _load(tmp_path, "name: a\nitems:\n  - size: 3\n")
    assert obj == Outer(name="a", items=[Inner(size=3)])


def test_models_are_frozen(tmp_path):
    _, obj = _load(tmp_path, "name: a\n")
    with pytest.raises(Exception):
        obj.name = "b"  # type: ignore[misc]


def test_unknown_key_points_at_its_line(tmp_path):
    path = tmp_path / "conf.yaml"
    assert _error(tmp_path, "name: a\nitems:\n  - size: 3\n    colour: red\n") == (
        f"{path}:4: items[0].colour: unknown key 'colour'"
    )


def test_bad_value_in_second_list_item(tmp_path):
    path = tmp_path / "conf.yaml"
    text = "name: a\nitems:\n  - size: 3\n  - size: many\n"
    assert _error(tmp_path, text).startswith(f"{path}:4: items[1].size: Input should be a valid integer")
    assert "(got 'many')" in _error(tmp_path, text)


def test_missing_key_points_at_the_mapping(tmp_path):
    path = tmp_path / "conf.yaml"
    assert _error(tmp_path, "name: a\nitems:\n  - size: 3\n  - label: b\n") == (
        f"{path}:4: items[1].size: missing required key 'size'"
    )


def test_missing_top_level_key(tmp_path):
    path = tmp_path / "conf.yaml"
    assert _error(tmp_path, "\n\nitems: []\n") == f"{path}:3: name: missing required key 'name'"


def test_field_error_blames_the_path_below_the_model(tmp_path):
    path = tmp_path / "conf.yaml"
    text = "name: a\nitems:\n  - size: 3\n  - label: b\n    size: 500\n"
    assert _error(tmp_path, text) == f"{path}:5: items[1].size: the second item is too big"


def test_yaml_syntax_error_has_a_line(tmp_path):
    path = tmp_path / "conf.yaml"
    # the unclosed flow list is noticed at the ':' on line 3
    assert _error(tmp_path, "name: a\nitems: [1, 2\nother: 3\n") == (
        f"{path}:3: YAML syntax error: expected ',' or ']', but got ':'"
    )


def test_empty_file(tmp_path):
    path = tmp_path / "conf.yaml"
    assert _error(tmp_path, "# only a comment\n") == f"{path}:1: the file is empty"


def test_top_level_must_be_a_mapping(tmp_path):
    path = tmp_path / "conf.yaml"
    assert _error(tmp_path, "- 1\n- 2\n") == f"{path}:1: expected a mapping of keys to values at the top level"


def test_missing_file(tmp_path):
    path = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError) as info:
        load_yaml_model(path, Outer)
    assert str(info.value) == f"{path}: file not found"


def test_text_argument_skips_reading(tmp_path):
    obj = load_yaml_model("virtual.yaml", Outer, text="name: z\n")
    assert obj.name == "z"


def test_validate_data_without_node_names_the_source():
    with pytest.raises(ConfigError) as info:
        validate_data({"name": "a", "extra": 1}, Outer, source="<cli>")
    assert str(info.value) == "<cli>: extra: unknown key 'extra'"


def test_config_error_is_a_value_error():
    assert issubclass(ConfigError, ValueError)
    assert FieldError("m", at=("a", 1)).at == ("a", 1)


def test_find_line_points_at_keys_and_list_items(tmp_path):
    from envelope.config import find_line

    path = tmp_path / "conf.yaml"
    path.write_text("name: a\n# a comment\nitems:\n  - size: 3\n  -\n    size: 4\n    label: y\n")
    assert find_line(path, ("name",)) == 1
    assert find_line(path, ("items",)) == 3
    assert find_line(path, ("items", 0)) == 4
    assert find_line(path, ("items", 1, "label")) == 7
    assert find_line(path, ("items", 2)) is None  # no third item
    assert find_line(path, ("colour",)) is None
    assert find_line(tmp_path / "missing.yaml", ("name",)) is None
    assert find_line(path, ("name",), text="x: 1\n\nname: b\n") == 3  # text wins over the file
    assert find_line(path, ("name",), text="name: [\n") is None  # YAML that does not parse
