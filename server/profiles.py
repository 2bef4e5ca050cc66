"""Server profiles: how to launch one server configuration, as a validated YAML file.

A profile names the engine (``vllm``, the default, or ``transformers`` for
``transformers serve``), the model, the device and the engine settings that decide
the service envelope (max model length, batch size, KV-cache size).
``load_profile`` takes a name (a file in ``server/profiles/``) or a path.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator

from envelope.config import ConfigError, StrictModel, load_yaml_model

__all__ = [
    "BUILTIN_TINY_QWEN3",
    "ServerProfile",
    "available_profiles",
    "load_profile",
    "profiles_dir",
    "with_overrides",
    "override_flag",
]

BUILTIN_TINY_QWEN3 = "tiny-qwen3"


class BuiltinModel(StrictModel):
    """A model Envelope builds itself (``builtin: tiny-qwen3``), optionally at a chosen place."""

    builtin: Literal["tiny-qwen3"]
    seed: int = 0
    path: str | None = None


# Fields that are vLLM flags: a transformers profile that sets one is refused (it would be silently ignored).
_VLLM_ONLY = ("enforce_eager", "max_num_seqs", "gpu_memory_utilization", "num_gpu_blocks_override", "block_size",
              "cpu_kvcache_space_gib", "load_format", "enable_prefix_caching", "engine_nice")
# Fields of transformers serve's continuous batching (--cb-*): refused on a vLLM profile.
_TRANSFORMERS_ONLY = ("continuous_batching", "cb_num_blocks", "cb_block_size", "cb_max_batch_tokens")


class ServerProfile(StrictModel):
    """One way to launch a server. Field names follow the engine's flags where there is one."""

    name: str = Field(min_length=1)
    description: str = ""
    # vllm: python -m vllm.entrypoints.openai.api_server; transformers: transformers serve MODEL
    engine: Literal["vllm", "transformers"] = "vllm"
    device: Literal["cpu", "gpu"]
    model: str | BuiltinModel
    # the name requests ask for; transformers serve answers only to the model it was started with
    # (its path or hub id), so a transformers profile leaves this out
    served_model_name: str | None = Field(default=None, min_length=1)
    max_model_len: int = Field(gt=0)
    dtype: Literal["auto", "bfloat16", "float16", "float32", "half", "float"] = "auto"
    enforce_eager: bool = False
    max_num_seqs: int | None = Field(default=None, gt=0)
    gpu_memory_utilization: float | None = Field(default=None, gt=0, le=1)
    num_gpu_blocks_override: int | None = Field(default=None, gt=0)
    block_size: int | None = Field(default=None, gt=0)
    cpu_kvcache_space_gib: float | None = Field(default=None, gt=0)
    load_format: str | None = None
    # vLLM's automatic prefix caching: None leaves vLLM's default (on in vLLM 0.6+), True/False
    # pass --enable-prefix-caching / --no-enable-prefix-caching
    enable_prefix_caching: bool | None = None
    extra_args: tuple[str, ...] = ()
    env: dict[str, str] = Field(default_factory=dict)
    health_timeout_s: float = Field(default=600.0, gt=0)
    # Nice value for every thread of vLLM's engine processes (server/cpu_arrangement.py),
    # so that the API server and the load generator are not starved on a small CPU box.
    engine_nice: int | None = Field(default=None, ge=0, le=19)
    # What the box costs and draws, as the operator states them: the report prices each stage and plans
    # capacity from usd_per_hour; power_w gives energy per token where NVML does not measure the GPUs.
    usd_per_hour: float | None = Field(default=None, gt=0)
    power_w: float | None = Field(default=None, gt=0)
    # transformers serve only: --continuous-batching (paged attention, requests joined into running batches)
    # or one request at a time through generate(); the --cb-* sizes of its KV cache and batches
    continuous_batching: bool | None = None
    cb_num_blocks: int | None = Field(default=None, gt=0)
    cb_block_size: int | None = Field(default=None, gt=0)
    cb_max_batch_tokens: int | None = Field(default=None, gt=0)

    @field_validator("model")
    @classmethod
    def _model_not_empty(cls, value: str | BuiltinModel) -> str | BuiltinModel:
        if isinstance(value, str) and not value.strip():
            raise ValueError("model must be a Hugging Face id, a local path, or {builtin: tiny-qwen3}")
        return value

    @field_validator("env")
    @classmethod
    def _no_key_in_env(cls, value: dict[str, str]) -> dict[str, str]:
        if "VLLM_API_KEY" in value:
            raise ValueError("do not put VLLM_API_KEY in a profile; pass --api-key-env or --api-key-file")
        return value

    @field_validator("extra_args")
    @classmethod
    def _no_key_in_args(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if any(arg.split("=", 1)[0] == "--api-key" for arg in value):
            raise ValueError("do not put --api-key in a profile; pass --api-key-env or --api-key-file")
        return value

    @model_validator(mode="after")
    def _device_fields(self) -> "ServerProfile":
        if self.device == "cpu" and self.gpu_memory_utilization is not None:
            raise ValueError("gpu_memory_utilization applies to device: gpu only")
        if self.device == "gpu" and self.cpu_kvcache_space_gib is not None:
            raise ValueError("cpu_kvcache_space_gib applies to device: cpu only")
        return self

    @model_validator(mode="after")
    def _engine_fields(self) -> "ServerProfile":
        """A setting the engine does not have is an error, not silently dropped."""
        if self.engine == "vllm":
            if self.served_model_name is None:
                raise ValueError("served_model_name is required for engine: vllm")
            wrong = [f for f in _TRANSFORMERS_ONLY if getattr(self, f) is not None]
            if wrong:
                raise ValueError(f"{wrong[0]} applies to engine: transformers only")
        else:
            if self.served_model_name is not None:
                raise ValueError("transformers serve answers only to the model it was started with; "
                                 "leave served_model_name out of an engine: transformers profile")
            wrong = [f for f in _VLLM_ONLY if getattr(self, f) not in (None, False)]
            if wrong:
                raise ValueError(f"{wrong[0]} is a vLLM setting; engine: transformers does not have it")
            if not self.continuous_batching:
                cb = [f for f in _TRANSFORMERS_ONLY[1:] if getattr(self, f) is not None]
                if cb:
                    raise ValueError(f"{cb[0]} applies with continuous_batching: true only")
        return self

    @property
    def is_builtin_model(self) -> bool:
        """True when the model is one Envelope builds (the tiny Qwen3)."""
        return isinstance(self.model, BuiltinModel)


def profiles_dir() -> Path:
    """The directory of the profiles shipped with Envelope."""
    return Path(__file__).with_name("profiles")


def available_profiles() -> list[str]:
    """Names of the shipped profiles, sorted."""
    return sorted(p.stem for p in profiles_dir().glob("*.yaml"))


def load_profile(name_or_path: str | os.PathLike[str]) -> ServerProfile:
    """A shipped profile by name (``cpu-tiny``) or a profile file by path.

    Raises :class:`ConfigError` (one line) for an unknown name or an invalid file.
    """
    text = str(name_or_path)
    looks_like_path = os.sep in text or text.endswith((".yaml", ".yml")) or Path(text).is_file()
    if looks_like_path:
        return load_yaml_model(text, ServerProfile)
    path = profiles_dir() / f"{text}.yaml"
    if not path.is_file():
        names = ", ".join(available_profiles()) or "(none)"
        raise ConfigError(f"unknown server profile {text!r}; available: {names} (or give a path to a .yaml file)")
    return load_yaml_model(path, ServerProfile)


def override_flag(key: str, value: object) -> list[str]:
    """vLLM's flag for a setting that is not a profile field: ``enable_chunked_prefill=false`` ->
    ``--no-enable-chunked-prefill``, ``max_num_batched_tokens=2048`` -> ``--max-num-batched-tokens 2048``."""
    flag = "--" + key.replace("_", "-")
    if value is True:
        return [flag]
    if value is False:
        return ["--no-" + flag[2:]]
    if isinstance(value, (dict, list)):
        import json

        return [flag, json.dumps(value)]
    return [flag, str(value)]


def with_overrides(profile: ServerProfile, settings: dict[str, object], *, name: str | None = None) -> ServerProfile:
    """``profile`` with ``settings`` applied: a profile field is set (and validated as in a file); any
    other key becomes vLLM's flag for it (:func:`override_flag`), after the profile's own ``extra_args``.

    Raises :class:`ConfigError` (one line naming the setting) for a value the field does not accept, or a
    key that would carry the API key.
    """
    fields = set(ServerProfile.model_fields)
    data = profile.model_dump()
    extra = list(profile.extra_args)
    for key, value in settings.items():
        if key in ("name", "extra_args", "env"):
            raise ConfigError(f"setting {key}: cannot be overridden in a sweep (write a profile file instead)")
        if key in fields:
            data[key] = value
        else:
            if key.replace("_", "-") == "api-key":
                raise ConfigError("setting api_key: pass --api-key-env or --api-key-file, not a setting")
            extra += override_flag(key, value)
    data["extra_args"] = tuple(extra)
    if name is not None:
        data["name"] = name
    try:
        return ServerProfile.model_validate(data)
    except ValueError as exc:  # pydantic's ValidationError: name the setting, one line
        errors = getattr(exc, "errors", lambda: [])()
        if errors:
            first = errors[0]
            where = ".".join(str(p) for p in first.get("loc", ())) or "profile"
            raise ConfigError(f"setting {where}={settings.get(where, '?')}: {first.get('msg')}") from None
        raise ConfigError(f"settings {settings}: {exc}") from None
