"""Talk to a running vLLM server: wait for it to become ready, and describe it.

Readiness is ``/health`` answering 200 and then ``/v1/models`` (with the API key)
listing a model. Both the launcher and ``probe_server`` (for a server someone
else started) use these functions.
"""

from __future__ import annotations

import time
from typing import Any, Callable
from urllib.parse import urlsplit

import httpx

from envelope.secrets import Secret

__all__ = ["NotReadyError", "ServerExitedError", "probe_server", "wait_until_answering", "wait_until_ready"]


class NotReadyError(RuntimeError):
    """The server did not become ready before the deadline; ``str()`` is one line."""


class ServerExitedError(RuntimeError):
    """The server process exited while we waited for it; ``returncode`` says how."""

    def __init__(self, returncode: int) -> None:
        super().__init__(f"exited with code {returncode}")
        self.returncode = returncode


def _headers(api_key: Secret | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key.get()}"} if api_key else {}


def wait_until_ready(
    base_url: str,
    *,
    timeout_s: float,
    api_key: Secret | None = None,
    poll_interval_s: float = 0.5,
    exit_code: Callable[[], int | None] = lambda: None,
    client: httpx.Client | None = None,
) -> dict[str, Any]:
    """Poll ``/health`` then ``/v1/models`` until both answer 200; return the models JSON.

    ``exit_code`` is called between polls; a non-None result raises
    :class:`ServerExitedError`. A 401/403 from ``/v1/models`` raises at once
    (waiting longer will not fix a wrong key). Raises :class:`NotReadyError`
    naming the last thing seen when ``timeout_s`` passes.
    """
    deadline = time.monotonic() + timeout_s
    own = client is None
    client = client or httpx.Client(timeout=5.0)
    last = "no answer yet"
    try:
        while True:
            code = exit_code()
            if code is not None:
                raise ServerExitedError(code)
            try:
                health = client.get(f"{base_url}/health")
                if health.status_code != 200:
                    last = f"/health answered {health.status_code}"
                else:
                    models = client.get(f"{base_url}/v1/models", headers=_headers(api_key))
                    if models.status_code in (401, 403):
                        raise NotReadyError(
                            f"/v1/models answered {models.status_code}: the API key was rejected"
                        )
                    if models.status_code == 200:
                        return models.json()
                    last = f"/v1/models answered {models.status_code}"
            except httpx.TransportError as exc:
                last = f"cannot connect ({type(exc).__name__})"
            remaining_s = deadline - time.monotonic()
            if remaining_s <= 0:
                raise NotReadyError(f"not ready after {timeout_s:g} s (last: {last})")
            time.sleep(min(poll_interval_s, remaining_s))
    finally:
        if own:
            client.close()


def wait_until_answering(
    base_url: str,
    *,
    model: str,
    timeout_s: float,
    poll_interval_s: float = 0.5,
    exit_code: Callable[[], int | None] = lambda: None,
    client: httpx.Client | None = None,
) -> dict[str, Any]:
    """Poll ``/health`` until 200, then send one short chat completion for ``model`` until it is answered;
    return a models JSON naming ``model`` (for a server whose ``/v1/models`` does not list what it serves).

    The completion is the warm-up: a server that builds its batching machinery on the first request
    (``transformers serve --continuous-batching``) must do so before the first stage, not in it.
    Raises :class:`ServerExitedError` or :class:`NotReadyError` as :func:`wait_until_ready` does; a 4xx
    answer raises at once (the request itself is wrong: waiting will not fix it).
    """
    deadline = time.monotonic() + timeout_s
    own = client is None
    client = client or httpx.Client(timeout=httpx.Timeout(5.0, read=max(5.0, timeout_s)))
    body = {"model": model, "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 2, "stream": False}
    last = "no answer yet"
    try:
        while True:
            code = exit_code()
            if code is not None:
                raise ServerExitedError(code)
            try:
                health = client.get(f"{base_url}/health")
                if health.status_code != 200:
                    last = f"/health answered {health.status_code}"
                else:
                    answer = client.post(f"{base_url}/v1/chat/completions", json=body)
                    if answer.status_code == 200:
                        return {"object": "list", "data": [{"id": model}]}
                    detail = answer.text.strip().replace("\n", " ")[:200]
                    if 400 <= answer.status_code < 500:
                        raise NotReadyError(f"a warm-up chat completion answered HTTP {answer.status_code}: {detail}")
                    last = f"a warm-up chat completion answered HTTP {answer.status_code}: {detail}"
            except httpx.TransportError as exc:
                last = f"cannot connect ({type(exc).__name__})"
            remaining_s = deadline - time.monotonic()
            if remaining_s <= 0:
                raise NotReadyError(f"not ready after {timeout_s:g} s (last: {last})")
            time.sleep(min(poll_interval_s, remaining_s))
    finally:
        if own:
            client.close()


def probe_server(url: str, *, api_key: Secret | None = None, timeout_s: float = 5.0) -> dict[str, Any]:
    """Describe an already-running server at ``url``, in the shape of ``server.json`` with ``launched: false``.

    Never raises for an unreachable server: the answer says what failed.
    """
    base_url = url.rstrip("/")
    if base_url.endswith("/v1"):
        base_url = base_url[: -len("/v1")]
    info: dict[str, Any] = {
        "launched": False,
        "base_url": base_url,
        "metrics_url": f"{base_url}/metrics",
        "probed_unix_s": time.time(),
        "api_key_set": bool(api_key),
    }
    with httpx.Client(timeout=timeout_s) as client:
        info["health"] = _status(client, f"{base_url}/health")
        if isinstance(info["health"], str):
            # nothing answers: asking the other endpoints would only wait out the same timeout again
            info.update(models_status=info["health"], vllm_version=None, metrics_ok=False, ok=False, hardware=None)
            return info
        models_status, models = _json(client, f"{base_url}/v1/models", _headers(api_key))
        info["models_status"] = models_status
        data = models.get("data") if isinstance(models, dict) else None
        if isinstance(data, list) and data:
            info["served_model_names"] = [m.get("id") for m in data]
            info["served_model_name"] = data[0].get("id")
            info["model"] = data[0].get("root") or data[0].get("id")
            info["max_model_len"] = data[0].get("max_model_len")
        _, version = _json(client, f"{base_url}/version", {})
        info["vllm_version"] = version.get("version") if isinstance(version, dict) else None
        info["metrics_ok"] = _status(client, f"{base_url}/metrics") == 200
    info["ok"] = info["health"] == 200 and models_status == 200
    if _is_loopback(base_url):
        from server.hardware import describe_hardware

        info["hardware"] = describe_hardware()
    else:
        info["hardware"] = None  # the server runs elsewhere; this machine's hardware says nothing about it
    return info


def _status(client: httpx.Client, url: str) -> int | str:
    try:
        return client.get(url).status_code
    except httpx.HTTPError as exc:
        return f"error: {type(exc).__name__}"


def _json(client: httpx.Client, url: str, headers: dict[str, str]) -> tuple[int | str, Any]:
    try:
        response = client.get(url, headers=headers)
    except httpx.HTTPError as exc:
        return f"error: {type(exc).__name__}", None
    try:
        return response.status_code, response.json() if response.status_code == 200 else None
    except ValueError:
        return response.status_code, None


def _is_loopback(base_url: str) -> bool:
    host = urlsplit(base_url).hostname or ""
    return host in {"localhost", "::1"} or host.startswith("127.")
