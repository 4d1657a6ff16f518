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


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    """Undo the CLI's logging set-up (handlers, levels, captured warnings) after each test."""
    import logging

    names = ("anomaly", "py.warnings", "lightning.pytorch", "lightning.fabric")
    saved = {
        name: (
            logging.getLogger(name).handlers[:],
            logging.getLogger(name).level,
            logging.getLogger(name).propagate,
        )
        for name in names
    }
    yield
    logging.captureWarnings(False)
    for name, (handlers, level, propagate) in saved.items():
        logger = logging.getLogger(name)
        logger.handlers = handlers
        logger.setLevel(level)
        logger.propagate = propagate
