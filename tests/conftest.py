"""Shared test set-up: strict plugin loading and a fresh plugin manager per test."""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator

import pytest

import anomaly

pytest_plugins = ["anomaly.testing"] if importlib.util.find_spec("anomaly.testing") else []


@pytest.fixture(autouse=True)
def _fresh_plugins(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Give every test strict plugin loading and a freshly discovered plugin manager."""
    monkeypatch.setenv("ANOMALY_STRICT_PLUGINS", "1")
    for name in ("ANOMALY_DISABLE_PLUGINS", "ANOMALY_LOAD_PLUGINS", "ANOMALY_TRACE_PLUGINS"):
        monkeypatch.delenv(name, raising=False)
    anomaly.reset_plugin_manager()
    yield
    anomaly.reset_plugin_manager()
