"""Scenarios: the YAML a user writes, validated into frozen models, and its resolved form.

A scenario is a list of *passes* (one question each: "is it alive", "does it
batch", ...), each a list of *stages*: a number of users (closed loop) or a
request rate (open loop) held for a duration.
Settings cascade, merged key by key for ``workload``, ``slos`` and ``timeouts``::

    defaults  <  client  <  pass  <  stage

A later level overrides only the keys it sets; setting a key to ``null``
overrides it with null (for an SLO: no target; for ``output_tokens``: free
length). Client classes override only ``workload`` (plus their own transport
and endpoint); passes and stages override all three.

Token counts are either a positive integer or a distribution. ``prompt_tokens``
is the whole prompt as the server counts it, shared system prefix included, so
it is comparable with the server's ``prompt_tokens`` counters. When
``context_fill_ratio`` is set it wins over ``prompt_tokens``: the prompt is
``floor(ratio * max_model_len) - max(output_tokens)``, known only once the
server's ``max_model_len`` is.

:meth:`Scenario.resolve` flattens passes into :class:`ResolvedStage` objects,
which is all the load generator needs.
"""

from __future__ import annotations

import math
import os
import random
from pathlib import Path
from dataclasses import dataclass, replace
from typing import Annotated, Any, Literal, Self, Union

from pydantic import Discriminator, Field, Tag, field_validator, model_validator

from envelope.attainment import thresholds_from_slos
from envelope.config import ConfigError, FieldError, StrictModel, load_yaml_model
from envelope.search import SearchSpec
from envelope.stages import StageKind, StageRecord, WorkloadSummary

__all__ = [
    "pick_client_name",
    "ClientRotation",
    "assign_client",
    "Distribution",
    "TokenCount",
    "token_lower",
    "token_upper",
    "token_summary",
    "Timeouts",
    "Slos",
    "Workload",
    "DatasetSource",
    "Conversation",
    "TraceSource",
    "Defaults",
    "Client",
    "Arrival",
    "Stage",
    "Pass",
    "Quick",
    "Scenario",
    "ResolvedClient",
    "ResolvedStage",
    "load_scenario",
    "probe_stage_name",
    "check_against_server",
    "ConfigError",
]

PositiveInt = Annotated[int, Field(strict=True, gt=0)]
PositiveFloat = Annotated[float, Field(gt=0)]


class Distribution(StrictModel):
    """A distribution of token counts; :meth:`sample` draws a positive integer.

    - ``uniform``: integers in ``[min, max]``.
    - ``normal``: ``mean``, ``stddev``, rounded and clipped to ``[min, max]``.
    - ``lognormal``: ``mean`` (the distribution's mean, in tokens) and ``sigma``
      (the shape: standard deviation of the log), rounded and clipped to ``[min, max]``.
    - ``choice``: one of ``values``, with optional relative ``weights``.

    ``min`` defaults to 1; ``max`` is required except for ``choice``, so that a
    scenario's largest request is always known before it runs.
    """

    distribution: Literal["uniform", "normal", "lognormal", "choice"]
    min: PositiveInt | None = None
    max: PositiveInt | None = None
    mean: PositiveFloat | None = None
    stddev: Annotated[float, Field(ge=0)] | None = None
    sigma: Annotated[float, Field(ge=0)] | None = None
    values: list[PositiveInt] | None = None
    weights: list[PositiveFloat] | None = None

    @model_validator(mode="after")
    def _check_kind(self) -> Distribution:
        kind = self.distribution
        needed = {
            "uniform": ("min", "max"),
            "normal": ("mean", "stddev", "max"),
            "lognormal": ("mean", "sigma", "max"),
            "choice": ("values",),
        }[kind]
        allowed = set(needed) | {"min"} | ({"weights"} if kind == "choice" else set())
        if kind == "choice":
            allowed.discard("min")
        for key in ("min", "max", "mean", "stddev", "sigma", "values", "weights"):
            value = getattr(self, key)
            if key in needed and value is None:
                raise FieldError(f"a {kind} distribution needs {key!r}", at=())
            if key not in allowed and value is not None:
                raise FieldError(f"{key!r} does not apply to a {kind} distribution", at=(key,))
        if kind != "choice" and self.lower > self.upper:
            raise FieldError(f"min ({self.lower}) is greater than max ({self.upper})", at=("min",))
        if kind == "choice":
            assert self.values is not None
            if not self.values:
                raise FieldError("'values' must not be empty", at=("values",))
            if self.weights is not None and len(self.weights) != len(self.values):
                raise FieldError(
                    f"'weights' has {len(self.weights)} entries but 'values' has {len(self.values)}", at=("weights",)
                )
        return self

    @property
    def lower(self) -> int:
        """The smallest value :meth:`sample` can return."""
        if self.distribution == "choice":
            return min(self.values or [1])
        return self.min if self.min is not None else 1

    @property
    def upper(self) -> int:
        """The largest value :meth:`sample` can return."""
        if self.distribution == "choice":
            return max(self.values or [1])
        assert self.max is not None
        return self.max

    def sample(self, rng: random.Random) -> int:
        """Draw one value using ``rng`` (deterministic for a seeded ``rng``)."""
        kind = self.distribution
        if kind == "uniform":
            return rng.randint(self.lower, self.upper)
        if kind == "choice":
            assert self.values is not None
            return rng.choices(self.values, weights=self.weights, k=1)[0]
        if kind == "normal":
            assert self.mean is not None and self.stddev is not None
            raw = rng.gauss(self.mean, self.stddev)
        else:
            assert self.mean is not None and self.sigma is not None
            # mean of a lognormal is exp(mu + sigma^2 / 2)
            mu = math.log(self.mean) - self.sigma**2 / 2
            raw = rng.lognormvariate(mu, self.sigma)
        return min(self.upper, max(self.lower, round(raw)))

    def summary(self) -> str:
        """A short human label, e.g. ``uniform(100..500)``."""
        kind = self.distribution
        if kind == "uniform":
            return f"uniform({self.lower}..{self.upper})"
        if kind == "normal":
            return f"normal({_num(self.mean)}±{_num(self.stddev)}, {self.lower}..{self.upper})"
        if kind == "lognormal":
            return f"lognormal(mean {_num(self.mean)}, sigma {_num(self.sigma)}, {self.lower}..{self.upper})"
        return f"choice({', '.join(str(v) for v in self.values or [])})"


def _num(value: float | None) -> str:
    return "?" if value is None else (str(int(value)) if float(value).is_integer() else str(value))


def _token_kind(value: Any) -> str:
    return "dict" if isinstance(value, dict) or isinstance(value, Distribution) else "int"


# The tags "int" and "dict" are dropped from error paths by envelope.config.
TokenCount = Annotated[
    Union[Annotated[PositiveInt, Tag("int")], Annotated[Distribution, Tag("dict")]],
    Discriminator(_token_kind),
]
"""A positive integer or a :class:`Distribution`."""


def token_upper(value: int | Distribution | None) -> int | None:
    """The largest count ``value`` can produce; ``None`` stays ``None``."""
    if value is None or isinstance(value, int):
        return value
    return value.upper


def token_lower(value: int | Distribution | None) -> int | None:
    """The smallest count ``value`` can produce; ``None`` stays ``None``."""
    if value is None or isinstance(value, int):
        return value
    return value.lower


def token_summary(value: int | Distribution | None) -> int | str | None:
    """An int as itself, a distribution as its short label, ``None`` as ``None``."""
    if value is None or isinstance(value, int):
        return value
    return value.summary()


class _Mergeable(StrictModel):
    def merged(self, override: Self | None) -> Self:
        """A copy with the keys ``override`` explicitly set replacing ours."""
        if override is None:
            return self
        update = {key: getattr(override, key) for key in override.model_fields_set}
        return self.model_copy(update=update)


class Timeouts(_Mergeable):
    """Per-request timeouts, in seconds."""

    connect_s: PositiveFloat = 10.0
    first_token_s: PositiveFloat = 120.0
    total_s: PositiveFloat = 600.0


class Slos(_Mergeable):
    """Service-level objectives a stage is judged against; unset means no target."""

    ttft_p50_ms: PositiveFloat | None = None
    ttft_p90_ms: PositiveFloat | None = None
    ttft_p95_ms: PositiveFloat | None = None
    ttft_p99_ms: PositiveFloat | None = None
    tpot_p50_ms: PositiveFloat | None = None
    tpot_p90_ms: PositiveFloat | None = None
    tpot_p95_ms: PositiveFloat | None = None
    tpot_p99_ms: PositiveFloat | None = None
    itl_p50_ms: PositiveFloat | None = None
    itl_p90_ms: PositiveFloat | None = None
    itl_p95_ms: PositiveFloat | None = None
    itl_p99_ms: PositiveFloat | None = None
    e2e_p50_ms: PositiveFloat | None = None
    e2e_p90_ms: PositiveFloat | None = None
    e2e_p95_ms: PositiveFloat | None = None
    e2e_p99_ms: PositiveFloat | None = None
    error_rate_max: Annotated[float, Field(ge=0, le=1)] | None = None
    min_output_tokens_per_s: PositiveFloat | None = None
    # per-request thresholds (see envelope.attainment): a request is good when it meets all of them;
    # unset, a metric's percentile SLO gives its threshold
    ttft_ms: PositiveFloat | None = None
    tpot_ms: PositiveFloat | None = None
    e2e_ms: PositiveFloat | None = None
    # the share of good requests a stage must reach (None: 0.95 when any threshold is set)
    attainment_min: Annotated[float, Field(gt=0, le=1)] | None = None

    def as_dict(self) -> dict[str, float]:
        """The targets that are set, as a plain dict."""
        return {key: value for key, value in self.model_dump().items() if value is not None}


class DatasetSource(StrictModel):
    """Prompts from a local dataset file (:mod:`envelope.datasets`): ShareGPT JSON, JSON lines, or text.

    ``path`` is relative to the scenario file. Each request draws one entry with
    the scenario's seed, with ``replacement`` (default) or without (each entry
    once, in a seeded order, then again in a new order). An entry's own output
    length (a ShareGPT answer's length in the served model's tokens, a JSON-lines
    ``output_tokens``) wins over the workload's ``output_tokens``, which applies
    to entries without one. ``limit`` reads only the first N entries.
    """

    path: Annotated[str, Field(min_length=1)]
    format: Literal["auto", "sharegpt", "jsonl", "text"] = "auto"
    replacement: bool = True
    limit: PositiveInt | None = None


class Conversation(StrictModel):
    """Multi-turn chat: each user holds a conversation of ``turns`` turns, then starts a new one.

    Every turn sends the whole history so far plus a new user message: the first
    of ``prompt_tokens``, later ones of ``message_tokens`` (default: ``prompt_tokens``).
    The history holds the server's real answers (``answers: server``) or, for
    prompt lengths known in advance, stand-ins of ``answer_tokens`` tokens
    (``answers: fixed``; default: the turn's output length). ``think_time_s``
    passes between a turn's answer and the next turn.
    """

    turns: TokenCount = 4
    think_time_s: Annotated[float, Field(ge=0)] = 0.0
    message_tokens: TokenCount | None = None
    answers: Literal["server", "fixed"] = "server"
    answer_tokens: PositiveInt | None = None


class TraceSource(StrictModel):
    """A trace of timestamped requests replayed open loop (:mod:`envelope.traces`).

    ``speedup: 2`` halves the gaps; ``rate_per_s`` instead rescales time so the
    trace's mean rate is that (not both). Mooncake traces' shared ``hash_ids``
    become shared prompt prefixes of 512-token blocks.
    """

    path: Annotated[str, Field(min_length=1)]
    format: Literal["auto", "mooncake", "jsonl"] = "auto"
    speedup: PositiveFloat = 1.0
    rate_per_s: PositiveFloat | None = None

    @model_validator(mode="after")
    def _one_scale(self) -> TraceSource:
        if self.rate_per_s is not None and self.speedup != 1.0:
            raise FieldError("a trace takes 'speedup' or 'rate_per_s', not both", at=("rate_per_s",))
        return self


class Workload(_Mergeable):
    """What each request looks like.

    ``fixed_output`` asks for exactly ``output_tokens`` (``max_tokens = min_tokens``
    and ``ignore_eos``); ``output_tokens: null`` lets the server decide.
    ``system_prefix_tokens`` of the prompt are a prefix shared by every request
    (prefix-cache friendly); they count towards ``prompt_tokens``.
    ``dataset`` takes prompts from a file instead of generating them;
    ``conversation`` makes each user's requests the turns of a chat.
    """

    prompt_tokens: TokenCount = 300
    output_tokens: TokenCount | None = 128
    fixed_output: bool = True
    system_prefix_tokens: Annotated[int, Field(strict=True, ge=0)] = 0
    context_fill_ratio: Annotated[float, Field(gt=0, le=1)] | None = None
    temperature: Annotated[float, Field(ge=0)] = 0.0
    dataset: DatasetSource | None = None
    conversation: Conversation | None = None

    @model_validator(mode="after")
    def _one_prompt_source(self) -> Workload:
        if self.dataset is not None and self.context_fill_ratio is not None:
            raise FieldError("a workload takes 'dataset' or 'context_fill_ratio', not both", at=("dataset",))
        if self.dataset is not None and self.conversation is not None:
            raise FieldError("a workload takes 'dataset' or 'conversation', not both", at=("conversation",))
        if self.conversation is not None and self.context_fill_ratio is not None:
            raise FieldError("a workload takes 'conversation' or 'context_fill_ratio', not both",
                             at=("conversation",))
        return self

    @property
    def long_context(self) -> bool:
        """True when the prompt length comes from ``context_fill_ratio``."""
        return self.context_fill_ratio is not None

    def context_prompt_tokens(self, *, max_model_len: int) -> int:
        """The long-context prompt length: ``floor(ratio * max_model_len) - max(output_tokens)``."""
        if self.context_fill_ratio is None:
            raise ValueError("context_prompt_tokens needs a context_fill_ratio")
        return math.floor(self.context_fill_ratio * max_model_len) - (token_upper(self.output_tokens) or 0)

    def max_prompt_tokens(self, *, max_model_len: int | None = None) -> int | None:
        """The longest prompt this workload sends; ``None`` for long context without ``max_model_len``,
        a dataset (its entries are measured against the server) or a conversation (its history grows)."""
        if self.context_fill_ratio is not None:
            return None if max_model_len is None else self.context_prompt_tokens(max_model_len=max_model_len)
        if self.dataset is not None or self.conversation is not None:
            return None
        return token_upper(self.prompt_tokens)

    def sample_prompt_tokens(self, rng: random.Random, *, max_model_len: int | None = None) -> int:
        """One prompt length; long-context workloads need ``max_model_len``."""
        if self.context_fill_ratio is not None:
            if max_model_len is None:
                raise ValueError("a context_fill_ratio workload needs the server's max_model_len")
            return self.context_prompt_tokens(max_model_len=max_model_len)
        return _sample(self.prompt_tokens, rng)

    def sample_output_tokens(self, rng: random.Random) -> int | None:
        """One output length, or ``None`` for free length."""
        return None if self.output_tokens is None else _sample(self.output_tokens, rng)

    def summary(self, *, max_model_len: int | None = None) -> dict[str, Any]:
        """``{prompt_tokens, output_tokens, long_context}`` as written to stages.json.

        A long-context prompt is a number only when ``max_model_len`` is given,
        otherwise a label such as ``"fill 0.85 of max_model_len"``.
        """
        if self.context_fill_ratio is not None:
            prompt: int | str | None = (
                f"fill {_num(self.context_fill_ratio)} of max_model_len"
                if max_model_len is None
                else self.context_prompt_tokens(max_model_len=max_model_len)
            )
        elif self.dataset is not None:
            prompt = f"dataset {Path(self.dataset.path).name}"
        elif self.conversation is not None:
            prompt = f"{token_summary(self.conversation.turns)}-turn chat, first {token_summary(self.prompt_tokens)}"
        else:
            prompt = token_summary(self.prompt_tokens)
        output = token_summary(self.output_tokens)
        if self.dataset is not None:
            output = f"the dataset's, else {output}"
        return {"prompt_tokens": prompt, "output_tokens": output, "long_context": self.long_context}


def _sample(value: int | Distribution, rng: random.Random) -> int:
    return value if isinstance(value, int) else value.sample(rng)


Transport = Literal["fasthttp", "openai"]
Endpoint = Literal["chat", "completions"]


class Defaults(StrictModel):
    """Settings every stage starts from."""

    client: Transport = "fasthttp"
    endpoint: Endpoint = "chat"
    timeouts: Timeouts = Timeouts()
    workload: Workload = Workload()
    slos: Slos = Slos()


class Client(StrictModel):
    """A weighted class of simulated users with its own transport, endpoint, workload and SLOs.

    ``slos`` are the class's own targets: they win over the stage's and pass's,
    key by key, and the class is judged on its own requests. Instead of a share
    of the stage's users by ``weight``, a class can have a quota: ``rate_per_s``
    (its requests arrive open loop at that rate in every stage it is active in,
    whatever the stage's users) or ``max_concurrency`` (at most that many of the
    stage's users belong to it; the rest go to the other classes).
    """

    name: Annotated[str, Field(min_length=1)]
    weight: PositiveFloat = 1.0
    client: Transport | None = None
    endpoint: Endpoint | None = None
    workload: Workload | None = None
    slos: Slos | None = None
    rate_per_s: PositiveFloat | None = None
    max_concurrency: PositiveInt | None = None

    @model_validator(mode="after")
    def _one_quota(self) -> Client:
        if self.rate_per_s is not None and self.max_concurrency is not None:
            raise FieldError("a client class takes 'rate_per_s' or 'max_concurrency', not both",
                             at=("max_concurrency",))
        return self


Arrival = Literal["constant", "poisson", "gamma"]


class Stage(StrictModel):
    """One step of load, held for ``duration_s``: either closed or open loop.

    Closed loop: ``users`` each send a request as soon as their last one ends.
    Open loop: requests arrive at ``rate_per_s`` on a schedule fixed in advance
    (``arrival``: ``constant``, ``poisson`` or ``gamma`` with ``burstiness``; see
    :mod:`envelope.arrivals`), whether or not earlier ones have finished;
    ``max_concurrency`` optionally caps how many are in flight (later arrivals
    wait for a slot, and the wait shows as send lag).
    """

    name: Annotated[str, Field(min_length=1)] | None = None
    users: PositiveInt | None = None
    spawn_rate: PositiveFloat | None = None
    rate_per_s: PositiveFloat | None = None
    arrival: Arrival | None = None
    burstiness: PositiveFloat | None = None
    max_concurrency: PositiveInt | None = None
    trace: TraceSource | None = None
    duration_s: PositiveFloat | None = None
    clients: list[Annotated[str, Field(min_length=1)]] | None = None
    workload: Workload | None = None
    slos: Slos | None = None
    timeouts: Timeouts | None = None

    @model_validator(mode="after")
    def _closed_or_open(self) -> Stage:
        if self.trace is not None:
            for key in ("users", "rate_per_s", "arrival", "burstiness", "spawn_rate"):
                if getattr(self, key) is not None:
                    raise FieldError(f"a trace stage replays the trace's schedule: {key!r} does not apply "
                                     "(scale it with the trace's 'speedup' or 'rate_per_s')", at=(key,))
            return self
        if self.duration_s is None:
            raise FieldError("a stage needs 'duration_s' (only a trace stage may leave it out: then it lasts "
                             "as long as the trace)", at=())
        if self.users is None and self.rate_per_s is None:
            raise FieldError("a stage needs 'users' (closed loop), 'rate_per_s' (open loop) or 'trace'", at=())
        if self.users is not None and self.rate_per_s is not None:
            raise FieldError("a stage takes 'users' (closed loop) or 'rate_per_s' (open loop), not both",
                             at=("rate_per_s",))
        if self.users is not None:
            for key in ("arrival", "burstiness", "max_concurrency"):
                if getattr(self, key) is not None:
                    raise FieldError(f"{key!r} applies to open-loop stages (with 'rate_per_s'), not to 'users'",
                                     at=(key,))
        else:
            if self.spawn_rate is not None:
                raise FieldError("'spawn_rate' applies to 'users' stages, not to 'rate_per_s'", at=("spawn_rate",))
            if self.burstiness is not None and self.arrival != "gamma":
                raise FieldError("'burstiness' applies only to 'arrival: gamma'", at=("burstiness",))
        return self


class Pass(StrictModel):
    """A group of stages that answers one question, or a search for the highest load that meets the SLOs.

    Exactly one of ``stages`` (fixed levels) and ``search`` (levels chosen from
    the probes before them, see :mod:`envelope.search`).
    """

    name: Annotated[str, Field(min_length=1)]
    description: str = ""
    workload: Workload | None = None
    slos: Slos | None = None
    timeouts: Timeouts | None = None
    clients: list[Annotated[str, Field(min_length=1)]] | None = None
    stages: list[Stage] | None = None
    search: SearchSpec | None = None

    @field_validator("stages")
    @classmethod
    def _not_empty(cls, stages: list[Stage] | None) -> list[Stage] | None:
        if stages is not None and not stages:
            raise ValueError("a pass needs at least one stage")
        return stages

    @model_validator(mode="after")
    def _stages_or_search(self) -> Pass:
        if self.stages is None and self.search is None:
            raise FieldError("a pass needs 'stages' (fixed levels) or 'search' (find the highest level that meets "
                             "the SLOs)", at=())
        if self.stages is not None and self.search is not None:
            raise FieldError("a pass takes 'stages' or 'search', not both", at=("search",))
        return self


class Quick(StrictModel):
    """How ``--quick`` shortens the scenario."""

    duration_scale: Annotated[float, Field(gt=0, le=1)] = 0.25
    min_stage_s: Annotated[float, Field(ge=0)] = 10.0


_DEFAULT_CLIENTS = (Client(name="default", weight=1.0),)


class Scenario(StrictModel):
    """A whole scenario file."""

    name: Annotated[str, Field(min_length=1)]
    description: str = ""
    seed: int = 0
    model: str | None = None
    defaults: Defaults = Defaults()
    record_text: bool = False
    clients: list[Client] = Field(default_factory=lambda: list(_DEFAULT_CLIENTS))
    passes: list[Pass]
    quick: Quick = Quick()

    @field_validator("passes", "clients")
    @classmethod
    def _not_empty(cls, items: list, info) -> list:
        if not items:
            raise ValueError(f"{info.field_name!r} must not be empty")
        return items

    @model_validator(mode="after")
    def _check_names_and_prefix(self) -> Scenario:
        _check_unique([c.name for c in self.clients], "client", lambda i: ("clients", i, "name"))
        _check_unique([p.name for p in self.passes], "pass", lambda i: ("passes", i, "name"))
        seen: dict[str, tuple[str | int, ...]] = {}
        names = {c.name for c in self.clients}
        for pi, pass_ in enumerate(self.passes):
            for si, stage in [(None, pass_)] + list(enumerate(pass_.stages or ())):
                for ni, name in enumerate(stage.clients or ()):
                    if name not in names:
                        at = ("passes", pi) + (() if si is None else ("stages", si)) + ("clients", ni)
                        raise FieldError(f"no client class named {name!r} (the scenario's are "
                                         f"{', '.join(sorted(names))})", at=at)
            if pass_.search is not None:
                slos = self.defaults.slos.merged(pass_.slos).as_dict()
                if not thresholds_from_slos(slos).any:
                    raise FieldError(f"pass {pass_.name!r}: a search judges each request, so it needs a latency SLO "
                                     "(ttft_ms, tpot_ms, e2e_ms, or a percentile such as ttft_p95_ms)",
                                     at=("passes", pi, "search"))
            for si, stage in enumerate(_pass_stages(pass_)):
                name = _stage_name(pass_, stage)
                at: tuple[str | int, ...] = ((("passes", pi, "search") if pass_.search is not None
                                              else ("passes", pi, "stages", si)) + (("name",) if stage.name else ()))
                if name in seen:
                    raise FieldError(f"duplicate stage name {name!r}", at=at)
                seen[name] = at
                for client in self.clients:
                    workload = self._workload(client, pass_, stage)
                    low = token_lower(workload.prompt_tokens)
                    if (not workload.long_context and workload.dataset is None and low is not None
                            and workload.system_prefix_tokens >= low):
                        raise FieldError(
                            f"stage {name!r}, client {client.name!r}: system_prefix_tokens "
                            f"({workload.system_prefix_tokens}) must be less than the shortest prompt ({low}); "
                            "prompt_tokens includes the prefix",
                            at=("passes", pi, "stages", si),
                        )
        return self

    def _workload(self, client: Client, pass_: Pass, stage: Stage) -> Workload:
        return self.defaults.workload.merged(client.workload).merged(pass_.workload).merged(stage.workload)

    def resolve(self, *, quick: bool = False, duration_scale: float | None = None) -> list[ResolvedStage]:
        """Flatten passes into stages with every setting merged.

        With ``quick`` (or an explicit ``duration_scale``, which wins over
        ``quick.duration_scale``) each duration becomes
        ``max(quick.min_stage_s, duration_s * scale)``, but never longer than written.
        """
        if duration_scale is not None and duration_scale <= 0:
            raise ValueError(f"duration_scale must be positive (got {duration_scale!r})")
        scale = duration_scale if duration_scale is not None else (self.quick.duration_scale if quick else None)
        stages: list[ResolvedStage] = []
        for pi, pass_ in enumerate(self.passes):
            search = pass_.search
            if search is not None and scale is not None:
                search = search.scaled(scale, min_probe_s=self.quick.min_stage_s)
            for stage in _pass_stages(pass_, search):
                if stage.duration_s is None:
                    raise ValueError(f"stage {_stage_name(pass_, stage)!r}: a trace stage's length is known once "
                                     "its file is read (load the scenario with load_scenario)")
                duration_s = float(stage.duration_s)
                if scale is not None and search is None and stage.trace is None:
                    duration_s = min(duration_s, max(self.quick.min_stage_s, duration_s * scale))
                stage_slos = self.defaults.slos.merged(pass_.slos).merged(stage.slos)
                active = stage.clients or pass_.clients
                clients = tuple(
                    ResolvedClient(
                        name=client.name,
                        weight=client.weight,
                        transport=client.client or self.defaults.client,
                        endpoint=client.endpoint or self.defaults.endpoint,
                        workload=self._workload(client, pass_, stage),
                        slos=stage_slos.merged(client.slos).as_dict(),
                        rate_per_s=client.rate_per_s,
                        max_concurrency=client.max_concurrency,
                    )
                    for client in self.clients
                    if active is None or client.name in active
                )
                trace = stage.trace
                rate_per_s = stage.rate_per_s
                if trace is not None:
                    from envelope.sources import trace_plan

                    rate_per_s = trace_plan(trace).rate_per_s
                stages.append(
                    ResolvedStage(
                        index=len(stages),
                        pass_index=pi,
                        pass_name=pass_.name,
                        name=_stage_name(pass_, stage),
                        users=stage.users or 0,
                        spawn_rate=float(stage.spawn_rate or stage.users or 1),
                        rate_per_s=rate_per_s,
                        arrival=("trace" if trace is not None else
                                 None if stage.rate_per_s is None else (stage.arrival or "poisson")),
                        burstiness=(stage.burstiness or 1.0) if stage.arrival == "gamma" else None,
                        max_concurrency=stage.max_concurrency,
                        duration_s=duration_s,
                        slos=stage_slos.as_dict(),
                        timeouts=self.defaults.timeouts.merged(pass_.timeouts).merged(stage.timeouts),
                        clients=clients,
                        search=search,
                        trace=trace,
                    )
                )
        return stages


# A probe starts or stops its users at once (within a second, up to 100 users): it measures its level,
# not a ramp. Stopped at the usual rate (its users per second), the users leaving a step down (24 users
# to 4, say) went on sending with the new probe's workload for many seconds, and its first judged
# requests queued behind theirs.
PROBE_SPAWN_RATE = 100.0  # Locust warns above 100 a second ("known to sometimes cause issues")


def _pass_stages(pass_: Pass, search: SearchSpec | None = None) -> list[Stage]:
    """A pass's stages; a search pass has one, its first probe, held up to the longest a probe may run
    (the search ends each probe when it has judged it, see ``locustfiles/search_driver.py``)."""
    if pass_.stages is not None:
        return pass_.stages
    spec = search or pass_.search
    assert spec is not None
    if spec.over == "users":
        return [Stage(users=int(spec.start), spawn_rate=PROBE_SPAWN_RATE, duration_s=spec.probe_cap_s)]
    return [Stage(rate_per_s=spec.start, arrival=spec.arrival, max_concurrency=spec.max_concurrency,
                  duration_s=spec.probe_cap_s)]


def probe_stage_name(pass_name: str, level: float, *, over: str, repeat: int = 1) -> str:
    """``chat-search-8u`` (``-2`` on a level's second probe), or ``...-2.5rps`` for a rate."""
    base = f"{pass_name}-{int(level)}u" if over == "users" else f"{pass_name}-{_num(level)}rps"
    return base if repeat <= 1 else f"{base}-{repeat}"


def _stage_name(pass_: Pass, stage: Stage) -> str:
    if stage.name:
        return stage.name
    if stage.users is not None:
        return f"{pass_.name}-{stage.users}u"
    return f"{pass_.name}-{_num(stage.rate_per_s)}rps"


def _check_unique(names: list[str], what: str, at) -> None:
    seen: set[str] = set()
    for i, name in enumerate(names):
        if name in seen:
            raise FieldError(f"duplicate {what} name {name!r}", at=at(i))
        seen.add(name)


@dataclass(frozen=True, kw_only=True, slots=True)
class ResolvedClient:
    """One client class as it runs in a stage: weight, transport, endpoint, merged workload."""

    name: str
    weight: float
    transport: str
    endpoint: str
    workload: Workload
    slos: dict[str, float] | None = None  # the stage's SLOs with the class's own on top
    rate_per_s: float | None = None  # quota: the class's own open-loop rate
    max_concurrency: int | None = None  # quota: at most this many of the stage's users

    @property
    def has_quota_rate(self) -> bool:
        return self.rate_per_s is not None


@dataclass(frozen=True, kw_only=True, slots=True)
class ResolvedStage:
    """One stage with everything merged; ``index`` counts stages across passes from 0.

    Open-loop stages have ``rate_per_s`` (and ``arrival``, ``burstiness`` for
    gamma, an optional ``max_concurrency``) and ``users == 0``: no Locust user
    runs, a per-process dispatcher sends on schedule.
    """

    index: int
    pass_index: int
    pass_name: str
    name: str
    users: int
    spawn_rate: float
    duration_s: float
    slos: dict[str, float]
    timeouts: Timeouts
    clients: tuple[ResolvedClient, ...]
    rate_per_s: float | None = None
    arrival: str | None = None
    burstiness: float | None = None
    max_concurrency: int | None = None
    search: SearchSpec | None = None  # set on the probes of a search pass
    trace: TraceSource | None = None  # set on a trace replay (open loop, arrival "trace")

    @property
    def open_loop(self) -> bool:
        return self.rate_per_s is not None

    @property
    def level(self) -> float:
        """Users (closed loop) or requests/s (open loop)."""
        return float(self.rate_per_s) if self.open_loop else float(self.users)

    def probe(self, level: float, *, index: int, name: str) -> ResolvedStage:
        """This search probe's settings at another level (a new stage at ``index``)."""
        if self.search is None:
            raise ValueError(f"stage {self.name!r} is not a search probe")
        if self.open_loop:
            return replace(self, rate_per_s=float(level), index=index, name=name)
        return replace(self, users=int(level), spawn_rate=PROBE_SPAWN_RATE, index=index, name=name)

    def record(self, *, max_model_len: int | None = None) -> StageRecord:
        """This stage as a :class:`envelope.stages.StageRecord`, not yet started.

        ``workload`` summarises the first client; when client classes differ,
        ``clients`` maps each client name to its own summary. Pass the server's
        ``max_model_len`` to turn long-context prompt lengths into numbers.
        """
        summaries = [WorkloadSummary.from_json(client.workload.summary(max_model_len=max_model_len))
                     for client in self.clients]
        differ = any(s != summaries[0] for s in summaries[1:])
        return StageRecord(
            pass_index=self.pass_index,
            pass_name=self.pass_name,
            stage_index=self.index,
            stage_name=self.name,
            kind=StageKind.RATE if self.open_loop else StageKind.USERS,
            target_users=None if self.open_loop else self.users,
            spawn_rate=None if self.open_loop else self.spawn_rate,
            target_rate_per_s=self.rate_per_s,
            duration_s=self.duration_s,
            slos=dict(self.slos),
            workload=summaries[0],
            clients={c.name: s for c, s in zip(self.clients, summaries)} if differ else None,
            client_slos=({c.name: dict(c.slos or self.slos) for c in self.clients}
                         if any((c.slos or self.slos) != self.slos for c in self.clients) else None),
            arrival=self.arrival if self.open_loop else None,
            burstiness=self.burstiness if self.open_loop else None,
            max_concurrency=self.max_concurrency if self.open_loop else None,
        )


def load_scenario(path: str | os.PathLike[str], *, text: str | None = None) -> Scenario:
    """Load and validate a scenario file; errors are :class:`ConfigError` ``file:line: path: message``.

    Dataset and trace files it names are found relative to it, read and checked
    here (:func:`envelope.sources.anchor_sources`), so a bad data file fails now.
    """
    from envelope.sources import anchor_sources

    return anchor_sources(load_yaml_model(path, Scenario, text=text), path, text=text)


def check_against_server(scenario: Scenario, *, max_model_len: int) -> list[str]:
    """One line per stage and client whose largest request does not fit ``max_model_len``."""
    problems: list[str] = []
    for stage in scenario.resolve():
        for client in stage.clients:
            where = f"pass {stage.pass_name!r}, stage {stage.name!r}" + (
                f", client {client.name!r}" if len(stage.clients) > 1 else ""
            )
            workload = client.workload
            if workload.dataset is not None:
                continue  # entries too long are skipped and counted (a conversation's first turn is checked;
                # a later turn that would not fit starts a new conversation)
            output_max = token_upper(workload.output_tokens) or 0
            if workload.long_context:
                prompt = workload.context_prompt_tokens(max_model_len=max_model_len)
                if prompt <= workload.system_prefix_tokens:
                    problems.append(
                        f"{where}: context_fill_ratio {_num(workload.context_fill_ratio)} of max_model_len "
                        f"{max_model_len} leaves a {prompt}-token prompt after {output_max} output tokens "
                        f"(system prefix {workload.system_prefix_tokens})"
                    )
                continue
            prompt_max = token_upper(workload.prompt_tokens) or 0
            if prompt_max + output_max > max_model_len:
                problems.append(
                    f"{where}: prompt_tokens up to {prompt_max} + output_tokens up to {output_max} = "
                    f"{prompt_max + output_max} exceeds the server's max_model_len {max_model_len}"
                )
    return problems


def pick_client_name(names_weights: list[tuple[str, float]], n: int) -> str:
    """The client for the n-th user of this process: a smooth weighted round-robin.

    With weights 3:1 users 0..3 get a, a, b, a (never a long run of one client),
    so even a handful of users mixes clients in proportion. It walks the rotation
    from the start (O(n)); a caller that asks for one request after another uses
    :class:`ClientRotation`.
    """
    return ClientRotation(names_weights).at(n)


class ClientRotation:
    """The rotation of :func:`pick_client_name`, kept between calls: ``at(n)`` for a non-decreasing
    ``n`` costs only the steps since the last call (an open-loop dispatcher asks once per request;
    walking from the start each time made a stage's sends quadratic in its length)."""

    __slots__ = ("_names_weights", "_total", "_current", "_next", "_chosen")

    def __init__(self, names_weights: list[tuple[str, float]]) -> None:
        self._names_weights = list(names_weights)
        self._total = sum(w for _, w in self._names_weights)
        self._restart()

    def _restart(self) -> None:
        self._current = {name: 0.0 for name, _ in self._names_weights}
        self._next = 0  # the next position to compute
        self._chosen = self._names_weights[0][0]

    def at(self, n: int) -> str:
        """The client of position ``n`` (0-based)."""
        if len(self._names_weights) == 1:
            return self._chosen
        if n < self._next - 1:
            self._restart()
        current, names_weights, total = self._current, self._names_weights, self._total
        while self._next <= n:
            for name, weight in names_weights:
                current[name] += weight
            chosen = self._chosen = max(names_weights, key=lambda nw: current[nw[0]])[0]
            current[chosen] -= total
            self._next += 1
        return self._chosen


def assign_client(classes: list[tuple[str, float, int | None]], n: int) -> str | None:
    """The class of this process's n-th user, from ``(name, weight, cap)``: the smooth weighted
    round-robin of :func:`pick_client_name` among the classes still below their cap (None: no cap).
    None when every class is full: that user sends nothing in this stage."""
    if not classes:
        return None
    if len(classes) == 1:
        name, _, cap = classes[0]
        return name if cap is None or n < cap else None
    counts = {name: 0 for name, _, _ in classes}
    current = {name: 0.0 for name, _, _ in classes}
    chosen: str | None = None
    for _ in range(n + 1):
        open_ = [(name, weight) for name, weight, cap in classes if cap is None or counts[name] < cap]
        if not open_:
            return None
        total = sum(w for _, w in open_)
        for name, weight in open_:
            current[name] += weight
        chosen = max(open_, key=lambda nw: current[nw[0]])[0]
        current[chosen] -= total
        counts[chosen] += 1
    return chosen
