"""What a sending process learns from the server before load: model, max length, calibrated prompts.

No Locust, no gevent: plain ``httpx`` against the server, so it is tested against
the simulator directly.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from envelope.prompts import PromptFactory, TokenizerProbe, calibrate
from envelope.scenario import DatasetSource, Scenario, check_against_server
from envelope.sources import dataset_entries
from locustfiles.sources import MeasuredDataset, measure_dataset

__all__ = ["ServerFacts", "probe_server", "dataset_key"]


@dataclass(frozen=True, slots=True, kw_only=True)
class ServerFacts:
    """The probe's answer. ``problems``: one line each; any problem means no load may be sent."""

    model: str | None = None
    max_model_len: int | None = None
    factory: PromptFactory | None = None
    problems: tuple[str, ...] = field(default_factory=tuple)
    # the scenario's datasets measured with the server's tokenizer, by dataset_key()
    datasets: dict[tuple, MeasuredDataset] = field(default_factory=dict)


def dataset_key(source: DatasetSource, endpoint: str) -> tuple:
    """Which measurement of a dataset a client uses: the same file is measured once per endpoint."""
    return (source.path, source.format, source.limit, endpoint)


def probe_server(host: str, *, headers: dict[str, str], model: str | None, scenario: Scenario,
                 timeout_s: float = 30.0) -> ServerFacts:
    """Learn the served model (``model`` when named, else the first listed) and its max length,
    calibrate prompt lengths with the server's tokenizer (an estimate when it has no ``/tokenize``),
    and check the scenario's stages fit that length."""
    import httpx

    base = host.rstrip("/")
    with httpx.Client(base_url=base, headers=headers, timeout=timeout_s) as client:
        try:
            resp = client.get("/v1/models")
        except httpx.HTTPError as exc:
            return ServerFacts(model=model, problems=(f"--host {base}: cannot reach the server "
                                                      f"({type(exc).__name__}: {exc})",))
        if resp.status_code == 401:
            return ServerFacts(model=model, problems=(f"--host {base}: the server rejected the API key (HTTP 401)",))
        if resp.status_code != 200:
            return ServerFacts(model=model, problems=(f"--host {base}: GET /v1/models answered HTTP {resp.status_code}",))
        models = resp.json().get("data") or []
        names = [m.get("id") for m in models]
        if model is None:
            if not names:
                return ServerFacts(problems=(f"--host {base}: the server lists no models",))
            model = names[0]
        elif model not in names:
            return ServerFacts(model=model, problems=(
                f"model {model!r} is not served by {base} (it serves: {', '.join(map(str, names))})",))
        max_model_len = None
        for m in models:
            if m.get("id") == model and m.get("max_model_len"):
                max_model_len = int(m["max_model_len"])

        def post(path: str, body: dict) -> dict:
            r = client.post(path, json=body)
            r.raise_for_status()
            return r.json()

        probe: TokenizerProbe | None = TokenizerProbe(post, model)
        try:
            factory = calibrate(probe)
        except (httpx.HTTPError, KeyError, ValueError):
            factory, probe = calibrate(None), None  # not vLLM: prompt lengths are estimates
        problems = check_against_server(scenario, max_model_len=max_model_len) if max_model_len is not None else []
        datasets: dict[tuple, MeasuredDataset] = {}
        for stage in scenario.resolve():
            for c in stage.clients:
                source = c.workload.dataset
                if source is None or dataset_key(source, c.endpoint) in datasets:
                    continue
                try:
                    measured = measure_dataset(source, dataset_entries(source), endpoint=c.endpoint,
                                               workload=c.workload, probe=probe, max_model_len=max_model_len)
                except httpx.HTTPError as exc:
                    problems.append(f"{source.path}: could not measure its entries with the server's /tokenize "
                                    f"({type(exc).__name__}: {exc})")
                    continue
                datasets[dataset_key(source, c.endpoint)] = measured
                if not measured.usable:
                    problems.append(f"{source.path}: none of its {measured.entries} entries fits the server's "
                                    f"max_model_len {max_model_len} with its output")
    return ServerFacts(model=model, max_model_len=max_model_len, factory=factory, problems=tuple(problems),
                       datasets=datasets)
