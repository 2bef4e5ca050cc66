"""The simulated server's configuration: timing, load model, faults.

Plain keyword-only dataclasses, loadable from a YAML or JSON file (JSON is
YAML) with ``file:line: message`` errors. Durations are seconds; a timing field
is either a number (fixed) or a :class:`Distribution`.
"""

from __future__ import annotations

import math
import os
import random
from dataclasses import asdict, dataclass, field, replace
from typing import Annotated, Any, Literal

from pydantic import BeforeValidator, ConfigDict, Field

__all__ = [
    "Distribution",
    "FaultSpec",
    "SimConfig",
    "FAULT_KINDS",
    "STREAM_ONLY_FAULTS",
    "load_sim_config",
    "config_to_dict",
    "validate_sim_dict",
]

_STRICT = ConfigDict(extra="forbid")
# constraints that pydantic checks when a file is loaded, so its errors point at the key's line
# (__post_init__ checks the same for objects built in code)
_Seconds = Annotated[float, Field(ge=0)]
_Positive = Annotated[int, Field(ge=1)]
_NonNegative = Annotated[float, Field(ge=0)]

FAULT_KINDS: tuple[str, ...] = (
    "http_500",  # 500 with a vLLM-shaped JSON error body
    "http_503",
    "http_429",  # with a Retry-After header when retry_after_s is set
    "http_401",  # as if the API key were wrong: {"error": "Unauthorized"}
    "http_404",  # as if the model did not exist
    "refuse",  # close the connection at accept, before reading anything
    "reset",  # abort the connection after `after_chunks` content chunks (RST)
    "stall",  # pause `stall_s` after `after_chunks` content chunks, then go on
    "malformed",  # content chunk number `after_chunks` + 1 carries broken JSON
    "no_done",  # the stream ends without `data: [DONE]`
    "no_usage",  # no usage anywhere in the stream, even when asked for
    "error_event",  # 200 stream with a vLLM error event after `after_chunks` chunks
)
# faults that only make sense on a streamed response (reset and stall also apply to non-streamed ones)
STREAM_ONLY_FAULTS = frozenset({"malformed", "no_done", "no_usage", "error_event"})


@dataclass(frozen=True, kw_only=True)
class Distribution:
    """A duration drawn per request: fixed, uniform, normal (clipped) or lognormal.

    ``value_s`` is the fixed value, the normal mean or the lognormal median;
    ``low_s``/``high_s`` bound a uniform draw and clip the others.
    """

    __pydantic_config__ = _STRICT

    kind: Literal["fixed", "uniform", "normal", "lognormal"] = "fixed"
    value_s: float = 0.0
    low_s: float = 0.0
    high_s: float | None = None
    stddev_s: float = 0.0
    sigma: float = 0.0  # lognormal: standard deviation of the log

    def __post_init__(self) -> None:
        if self.value_s < 0 or self.low_s < 0 or self.stddev_s < 0 or self.sigma < 0:
            raise ValueError("durations and spreads must be >= 0")
        if self.kind == "uniform" and (self.high_s is None or self.high_s < self.low_s):
            raise ValueError("a uniform distribution needs high_s >= low_s")
        if self.high_s is not None and self.high_s < self.low_s:
            raise ValueError("high_s must be >= low_s")

    def sample_s(self, rng: random.Random) -> float:
        """One draw, in seconds, never negative."""
        kind = self.kind
        if kind == "fixed":
            return self.value_s
        if kind == "uniform":
            return rng.uniform(self.low_s, self.high_s)  # type: ignore[arg-type]
        if kind == "normal":
            v = rng.gauss(self.value_s, self.stddev_s)
        else:
            v = self.value_s * math.exp(rng.gauss(0.0, self.sigma))
        high = self.high_s if self.high_s is not None else math.inf
        return min(max(v, self.low_s), high)


@dataclass(frozen=True, kw_only=True)
class FaultSpec:
    """One injected fault and when it fires.

    Triggers: ``every_nth`` (the Nth, 2Nth... eligible request), ``probability``
    (a seeded draw per eligible request), or neither (every eligible request).
    ``count`` caps the injections (alone: the first ``count`` requests).
    Eligible events are completion requests that passed validation, or
    accepted connections for ``refuse``.
    """

    __pydantic_config__ = _STRICT

    kind: Literal[FAULT_KINDS]  # type: ignore[valid-type]
    probability: float | None = None
    every_nth: int | None = None
    count: int | None = None
    after_chunks: int = 0
    stall_s: float = 1.0
    retry_after_s: int | None = None

    def __post_init__(self) -> None:
        if self.kind not in FAULT_KINDS:
            raise ValueError(f"unknown fault kind {self.kind!r}; one of {', '.join(FAULT_KINDS)}")
        if self.probability is not None and not 0.0 <= self.probability <= 1.0:
            raise ValueError("probability must be between 0 and 1")
        if self.every_nth is not None and self.every_nth < 1:
            raise ValueError("every_nth must be >= 1")
        if self.count is not None and self.count < 0:
            raise ValueError("count must be >= 0")
        if self.after_chunks < 0 or self.stall_s < 0:
            raise ValueError("after_chunks and stall_s must be >= 0")


def _number_to_distribution(value: Any) -> Any:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return {"value_s": value}
    return value


# a number of seconds (fixed) or a Distribution; numbers become fixed distributions
_Timing = Annotated[Distribution, BeforeValidator(_number_to_distribution)]


@dataclass(frozen=True, kw_only=True)
class SimConfig:
    """Everything the simulated server does, in one place.

    Timing: first token after ``ttft_s`` (plus queue wait and
    ``prefill_s_per_token`` x prompt tokens), then one chunk every ``itl_s`` x
    tokens in the chunk (drawn per chunk, or once per request with
    ``itl_per_request``), stretched by ``1 + itl_batch_alpha * (running - 1)``.
    Output length is exactly ``max_tokens`` unless ``eos_after_tokens`` stops
    it earlier (not with ``ignore_eos``, never below ``min_tokens``).
    Load model: at most ``batch_limit`` requests run, the rest wait; with
    ``kv_cache_capacity_tokens`` a request is admitted only while its prompt
    fits, and a growing batch that overflows preempts its newest request.
    """

    __pydantic_config__ = _STRICT

    model: str = "sim-model"
    max_model_len: _Positive = 4096
    api_key: str | None = field(default=None, repr=False)
    seed: int = 0
    ttft_s: _Timing = 0.05  # type: ignore[assignment]
    itl_s: _Timing = 0.01  # type: ignore[assignment]
    itl_per_request: bool = False  # draw the ITL once per request instead of per chunk
    tokens_per_chunk: _Positive = 1
    multi_token_chunk_probability: Annotated[float, Field(ge=0, le=1)] = 0.0
    multi_token_chunk_tokens: _Positive = 2
    default_max_tokens: _Positive = 16
    eos_after_tokens: _Positive | None = None
    batch_limit: _Positive | None = None
    itl_batch_alpha: _NonNegative = 0.0
    prefill_s_per_token: _Seconds = 0.0
    kv_cache_capacity_tokens: _Positive | None = None
    chat_message_overhead_tokens: int = 5
    chat_generation_prompt_tokens: int = 6
    prompt_special_tokens: int = 0
    faults: tuple[FaultSpec, ...] = ()
    truth_file: str | None = None

    def __post_init__(self) -> None:
        for name in ("ttft_s", "itl_s"):
            value = getattr(self, name)
            if isinstance(value, (int, float)):
                if value < 0:
                    raise ValueError(f"{name} must be >= 0")
                object.__setattr__(self, name, Distribution(value_s=float(value)))
        object.__setattr__(self, "faults", tuple(self.faults))
        if self.max_model_len < 1 or self.default_max_tokens < 1:
            raise ValueError("max_model_len and default_max_tokens must be >= 1")
        if self.tokens_per_chunk < 1 or self.multi_token_chunk_tokens < 1:
            raise ValueError("tokens per chunk must be >= 1")
        if not 0.0 <= self.multi_token_chunk_probability <= 1.0:
            raise ValueError("multi_token_chunk_probability must be between 0 and 1")
        if self.batch_limit is not None and self.batch_limit < 1:
            raise ValueError("batch_limit must be >= 1")
        if self.kv_cache_capacity_tokens is not None and self.kv_cache_capacity_tokens < 1:
            raise ValueError("kv_cache_capacity_tokens must be >= 1")
        if self.itl_batch_alpha < 0 or self.prefill_s_per_token < 0:
            raise ValueError("itl_batch_alpha and prefill_s_per_token must be >= 0")

    def with_changes(self, **changes: Any) -> "SimConfig":
        """A copy with some fields replaced."""
        return replace(self, **changes)


def config_to_dict(config: SimConfig, *, include_secret: bool = False) -> dict:
    """A JSON-ready dict of ``config`` (the API key is left out unless asked for)."""
    data = asdict(config)
    data["faults"] = [dict(f) for f in data["faults"]]
    if not include_secret:
        data["api_key"] = None
    return data


class _Schema:
    """Adapts pydantic's TypeAdapter to ``envelope.config.validate_data``."""

    _adapter = None

    @classmethod
    def model_validate(cls, data: Any) -> SimConfig:
        if cls._adapter is None:
            from pydantic import TypeAdapter

            cls._adapter = TypeAdapter(SimConfig)
        return cls._adapter.validate_python(data)


def load_sim_config(path: str | os.PathLike[str], **overrides: Any) -> SimConfig:
    """Read a YAML or JSON config file; ``overrides`` replace its values.

    Raises ``envelope.config.ConfigError`` (one ``file:line: message`` line).
    """
    from envelope.config import load_yaml_model

    config = load_yaml_model(path, _Schema)  # type: ignore[arg-type]
    return replace(config, **overrides) if overrides else config


def validate_sim_dict(data: dict, *, source: str = "<config>") -> SimConfig:
    """Validate a plain dict (as from JSON) into a :class:`SimConfig`."""
    from envelope.config import validate_data

    return validate_data(data, _Schema, source=source)  # type: ignore[arg-type]
