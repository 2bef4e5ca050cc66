"""What a sending process learns from the server before load: model, max length, calibrated prompts,
and what the server does with vLLM's extensions (:mod:`envelope.capabilities`).

No Locust, no gevent: plain ``httpx`` against the server, so it is tested against
the simulator directly.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from envelope.capabilities import ServerCapabilities, probe_capabilities, with_local_tokenizer
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
    # what the server does with vLLM's extensions, and how this run fills its gaps
    capabilities: ServerCapabilities | None = None
    # the served model's tokenizer on this machine, where the run counts or sizes with it
    local_tokenizer: object | None = None


def dataset_key(source: DatasetSource, endpoint: str) -> tuple:
    """Which measurement of a dataset a client uses: the same file is measured once per endpoint."""
    return (source.path, source.format, source.limit, endpoint)


def probe_server(host: str, *, headers: dict[str, str], model: str | None, scenario: Scenario,
                 timeout_s: float = 30.0, tokenizer: str | None = None,
                 count_tokens: str = "server", capabilities: ServerCapabilities | None = None) -> ServerFacts:
    """Learn the served model (``model`` when named, else the first listed) and its max length,
    calibrate prompt lengths with the server's tokenizer (the local ``tokenizer``, or the model's
    directory, where it has no ``/tokenize``; an estimate without either), probe its capabilities
    (:func:`envelope.capabilities.probe_capabilities`) and check the scenario's stages fit that length.

    A server whose ``/v1/models`` does not answer (``transformers serve`` lists its download cache,
    not the model it was started with) is used when ``model`` is named. ``count_tokens="tokenizer"``
    counts every request's tokens with the local tokenizer, the server's usage kept beside it.
    ``capabilities``: what another process already probed (a worker gets the master's): not asked again."""
    import httpx

    from envelope.tokenizer import LocalTokenizer, find_local_tokenizer

    base = host.rstrip("/")
    with httpx.Client(base_url=base, headers=headers, timeout=timeout_s) as client:
        models: list[dict] = []
        try:
            resp = client.get("/v1/models")
        except httpx.HTTPError as exc:
            resp = None
            if model is None or not _answers_health(client):
                return ServerFacts(model=model, problems=(f"--host {base}: cannot reach the server "
                                                          f"({type(exc).__name__}: {exc})",))
        if resp is not None and resp.status_code == 401:
            return ServerFacts(model=model, problems=(f"--host {base}: the server rejected the API key (HTTP 401)",))
        if resp is not None and resp.status_code == 200:
            models = resp.json().get("data") or []
        elif model is None:
            status = "no answer" if resp is None else f"HTTP {resp.status_code}"
            return ServerFacts(problems=(f"--host {base}: GET /v1/models answered {status}; name the model "
                                         f"with --model",))
        names = [m.get("id") for m in models]
        listed = bool(names)
        if model is None:
            if not names:
                return ServerFacts(problems=(f"--host {base}: the server lists no models",))
            model = names[0]
        elif listed and model not in names:
            return ServerFacts(model=model, problems=(
                f"model {model!r} is not served by {base} (it serves: {', '.join(map(str, names))})",))
        max_model_len = None
        root = None
        for m in models:
            if m.get("id") == model:
                root = m.get("root")
                if m.get("max_model_len"):
                    max_model_len = int(m["max_model_len"])

        def post(path: str, body: dict) -> dict:
            r = client.post(path, json=body)
            r.raise_for_status()
            return r.json()

        probe: TokenizerProbe | LocalTokenizer | None = TokenizerProbe(post, model)
        has_tokenize = True
        try:
            factory = calibrate(probe)
        except (httpx.HTTPError, KeyError, ValueError):
            has_tokenize, probe = False, None
        local_path = find_local_tokenizer((tokenizer, capabilities.tokenizer_path if capabilities else None,
                                           model, root))
        if tokenizer and local_path is None:
            return ServerFacts(model=model, problems=(f"--tokenizer {tokenizer}: no tokenizer files there "
                                                      f"(tokenizer.json or tokenizer_config.json)",))
        length_problems = check_against_server(scenario, max_model_len=max_model_len) \
            if max_model_len is not None else []
        if length_problems:  # before the capability probe: nothing is sent to a server the scenario cannot use
            return ServerFacts(model=model, max_model_len=max_model_len, factory=factory,
                               problems=tuple(length_problems))
        paths = tuple(sorted({"/v1/chat/completions" if c.endpoint == "chat" else "/v1/completions"
                              for stage in scenario.resolve() for c in stage.clients}))
        caps = capabilities if capabilities is not None else probe_capabilities(
            client, model=model, paths=paths, models_listed=listed, tokenize=has_tokenize)
        caps = with_local_tokenizer(caps, local_path, count_with_tokenizer=count_tokens == "tokenizer")
        local = None
        if caps.tokenizer_path is not None:
            try:
                local = LocalTokenizer(caps.tokenizer_path)
            except (OSError, ValueError) as exc:
                return ServerFacts(model=model, problems=(f"{caps.tokenizer_path}: cannot load the model's "
                                                          f"tokenizer ({type(exc).__name__}: {exc})",))
        if not has_tokenize:
            if local is not None and caps.prompt_sizing == "tokenizer":
                probe = local
                factory = calibrate(local)
            else:
                factory = calibrate(None)  # no tokenizer anywhere: prompt lengths are estimates
        if caps.problems:
            return ServerFacts(model=model, max_model_len=max_model_len, factory=factory, problems=caps.problems,
                               capabilities=caps)
        problems: list[str] = []
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
                       datasets=datasets, capabilities=caps, local_tokenizer=local)


def _answers_health(client) -> bool:
    """Whether the server answers ``GET /health`` (it is up, though ``/v1/models`` failed)."""
    import httpx

    try:
        return client.get("/health").status_code == 200
    except httpx.HTTPError:
        return False
