import pytest

from envelope.config import ConfigError
from server.profiles import BuiltinModel, ServerProfile, available_profiles, load_profile


def test_shipped_profiles_load():
    assert available_profiles() == ["cpu-tiny", "cpu-tiny-transformers", "cpu-tiny-transformers-cb", "qwen3-8b",
                                    "qwen3-8b-dummy"]
    tiny = load_profile("cpu-tiny")
    assert tiny.model == BuiltinModel(builtin="tiny-qwen3", seed=0)
    assert (tiny.max_model_len, tiny.num_gpu_blocks_override, tiny.enforce_eager) == (4096, 128, True)
    q = load_profile("qwen3-8b")
    assert (q.model, q.dtype, q.max_model_len, q.gpu_memory_utilization, q.max_num_seqs) == (
        "Qwen/Qwen3-8B", "bfloat16", 16384, 0.9, 64,
    )  # fmt: skip
    assert load_profile("qwen3-8b-dummy").load_format == "dummy"


def test_unknown_name_lists_the_available_ones():
    with pytest.raises(ConfigError) as err:
        load_profile("qwen3-7b")
    assert str(err.value) == (
        "unknown server profile 'qwen3-7b'; available: cpu-tiny, cpu-tiny-transformers, cpu-tiny-transformers-cb, "
        "qwen3-8b, qwen3-8b-dummy (or give a path to a .yaml file)"
    )


def _write(tmp_path, text):
    path = tmp_path / "p.yaml"
    path.write_text(text)
    return path


BASE = "name: x\ndevice: cpu\nmodel: /m\nserved_model_name: x\nmax_model_len: 100\n"


def test_load_by_path(tmp_path):
    profile = load_profile(_write(tmp_path, BASE + "extra_args: [--seed, '3']\nenv: {A: b}\n"))
    assert profile.extra_args == ("--seed", "3")
    assert profile.env == {"A": "b"}


@pytest.mark.parametrize(
    "extra, expected",
    [
        ("max_num_seq: 4\n", ":6: max_num_seq: unknown key 'max_num_seq'"),
        ("max_model_len_x: 1\nblock_size: 0\n", ":7: block_size: Input should be greater than 0 (got 0)"),
        ("\ndtype: fp8\n", ":7: dtype: Input should be"),
        ("gpu_memory_utilization: 0.9\n", "gpu_memory_utilization applies to device: gpu only"),
        ("env:\n  VLLM_API_KEY: x\n", ":7: env: do not put VLLM_API_KEY in a profile"),
        ("extra_args: [--api-key=abc]\n", ":6: extra_args: do not put --api-key in a profile"),
        ("model:\n  builtin: tiny-llama\n", "model"),
    ],
)
def test_validation_errors_name_file_and_line(tmp_path, extra, expected):
    path = _write(tmp_path, BASE.replace("model: /m\n", "") + extra if extra.startswith("model") else BASE + extra)
    with pytest.raises(ConfigError) as err:
        load_profile(path)
    message = str(err.value)
    assert message.startswith(str(path))
    assert expected in message
    assert "\n" not in message


def test_missing_required_key(tmp_path):
    path = _write(tmp_path, "name: x\ndevice: cpu\nmodel: /m\nmax_model_len: 100\n")
    with pytest.raises(ConfigError, match=r"p.yaml:1: served_model_name is required for engine: vllm$"):
        load_profile(path)


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="nope.yaml: file not found"):
        load_profile(tmp_path / "nope.yaml")


# --- a sweep's overrides (server.profiles.with_overrides) ---------------------------------------------

from server.launcher import build_command  # noqa: E402
from server.profiles import override_flag, with_overrides  # noqa: E402


def test_an_override_of_a_profile_field_is_validated_like_the_file():
    tiny = load_profile("cpu-tiny")
    four = with_overrides(tiny, {"max_num_seqs": 4, "enable_prefix_caching": False})
    assert (four.max_num_seqs, four.enable_prefix_caching, four.name) == (4, False, "cpu-tiny")
    argv = build_command(four, model="/m", host="127.0.0.1", port=1)
    assert argv[argv.index("--max-num-seqs") + 1] == "4"
    assert "--no-enable-prefix-caching" in argv and "--enable-prefix-caching" not in argv
    assert tiny.max_num_seqs == 16  # the base profile is untouched
    with pytest.raises(ConfigError) as err:
        with_overrides(tiny, {"max_num_seqs": 0})
    assert str(err.value).startswith("setting max_num_seqs=0: ") and "\n" not in str(err.value)


def test_a_setting_that_is_not_a_profile_field_becomes_vllms_flag_after_the_profiles_own():
    base = load_profile("qwen3-8b")
    p = with_overrides(base, {"max_num_batched_tokens": 2048, "enable_chunked_prefill": False,
                              "speculative_config": {"method": "ngram", "num_speculative_tokens": 4}})
    assert p.extra_args[: len(base.extra_args)] == base.extra_args
    assert p.extra_args[len(base.extra_args):] == (
        "--max-num-batched-tokens", "2048", "--no-enable-chunked-prefill",
        "--speculative-config", '{"method": "ngram", "num_speculative_tokens": 4}')
    assert override_flag("enforce_eager", True) == ["--enforce-eager"]


@pytest.mark.parametrize("key", ["name", "env", "extra_args", "api_key"])
def test_settings_that_a_sweep_may_not_change_are_refused_in_one_line(key):
    with pytest.raises(ConfigError) as err:
        with_overrides(load_profile("cpu-tiny"), {key: "x"})
    assert key in str(err.value) and "\n" not in str(err.value)


def test_price_and_power_are_profile_fields():
    p = load_profile("cpu-tiny")
    assert p.usd_per_hour is None and p.power_w is None
    priced = with_overrides(p, {"usd_per_hour": 2.5, "power_w": 700})
    assert (priced.usd_per_hour, priced.power_w) == (2.5, 700)
    with pytest.raises(ConfigError):
        with_overrides(p, {"usd_per_hour": -1})


def test_engine_settings_belong_to_their_engine():
    from envelope.config import ConfigError, validate_data

    base = dict(name="t", engine="transformers", device="cpu", model="/m", max_model_len=64)
    assert validate_data(base, ServerProfile, source="p").served_model_name is None
    cases = {
        "max_num_seqs is a vLLM setting": dict(base, max_num_seqs=4),
        "leave served_model_name out": dict(base, served_model_name="x"),
        "cb_num_blocks applies with continuous_batching: true only": dict(base, cb_num_blocks=8),
        "continuous_batching applies to engine: transformers only": dict(base, engine="vllm", served_model_name="x",
                                                                         continuous_batching=True),
        "served_model_name is required for engine: vllm": dict(base, engine="vllm"),
    }
    for message, data in cases.items():
        with pytest.raises(ConfigError, match=message):
            validate_data(data, ServerProfile, source="p")
    for name in ("cpu-tiny-transformers", "cpu-tiny-transformers-cb"):
        p = load_profile(name)
        assert p.engine == "transformers" and p.model == load_profile("cpu-tiny").model  # the same tiny model
    assert load_profile("cpu-tiny-transformers-cb").continuous_batching is True
