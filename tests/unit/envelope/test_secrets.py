"""envelope.secrets: where the key comes from, and that it never prints itself."""

from __future__ import annotations

import pytest

from envelope.secrets import REDACTED, Secret, SecretError, redact, redact_argv, resolve_api_key

KEY = "sk-unit-5f2c9e"


def test_secret_never_shows_its_value():
    secret = Secret(KEY)
    assert secret.get() == KEY
    for text in (repr(secret), str(secret), f"{secret}", repr([secret]), repr({"k": secret})):
        assert KEY not in text
    assert repr(secret) == "Secret(***)"
    assert secret == Secret(KEY) and secret != Secret("other") and secret != KEY
    assert bool(secret) and not Secret("")


def test_key_from_a_file_is_its_first_non_blank_line_stripped(tmp_path):
    path = tmp_path / "key"
    path.write_text(f"  {KEY}  \nsecond line\n")
    assert resolve_api_key(file=path, environ={"ENVELOPE_API_KEY": "ignored"}) == Secret(KEY)
    path.write_text(f"\n   \n{KEY}\n")
    assert resolve_api_key(file=path) == Secret(KEY)


@pytest.mark.parametrize("content", ["", "\n", " \n\t\n"])
def test_empty_key_file_is_an_error_naming_the_file(tmp_path, content):
    path = tmp_path / "key"
    path.write_text(content)
    with pytest.raises(SecretError, match=rf"^API key file {path}: is empty$"):
        resolve_api_key(file=path)


def test_unreadable_key_file_is_one_line(tmp_path):
    with pytest.raises(SecretError) as info:
        resolve_api_key(file=tmp_path / "missing")
    assert str(info.value) == f"API key file {tmp_path / 'missing'}: cannot read (No such file or directory)"


def test_key_from_the_environment():
    assert resolve_api_key(environ={"ENVELOPE_API_KEY": KEY}) == Secret(KEY)
    assert resolve_api_key(env_var="MY_KEY", environ={"MY_KEY": KEY, "ENVELOPE_API_KEY": "x"}) == Secret(KEY)
    assert resolve_api_key(env_var="MY_KEY", environ={"ENVELOPE_API_KEY": KEY}) is None  # only the named one
    assert resolve_api_key(environ={"ENVELOPE_API_KEY": ""}) is None
    assert resolve_api_key(environ={}) is None


def test_redact_replaces_every_occurrence_of_every_secret():
    text = f"Bearer {KEY} and again {KEY}; other sk-2"
    assert redact(text, [Secret(KEY), "sk-2", None, Secret("")]) == f"Bearer {REDACTED} and again {REDACTED}; other ***"
    assert redact("nothing here", [Secret(KEY)]) == "nothing here"


def test_redact_argv_masks_flag_values_and_known_secrets():
    argv = ["vllm", "--api-key", KEY, "--api-key=" + KEY, "--hf-token", "hf_x", "--model", "m", f"--x={KEY}"]
    assert redact_argv(argv, [Secret(KEY)]) == [
        "vllm", "--api-key", REDACTED, f"--api-key={REDACTED}", "--hf-token", REDACTED, "--model", "m", f"--x={REDACTED}",
    ]
