"""Fixtures of the plugin tests: fake plugin distributions on ``sys.path``.

The helpers live in ``tests/fixtures/plugin_dist.py`` next to the example plugin they install;
``tests`` is no package, so its folder is put on ``sys.path`` to import them.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

_FIXTURES = str(Path(__file__).resolve().parents[1] / "fixtures")
if _FIXTURES not in sys.path:
    sys.path.insert(0, _FIXTURES)

from plugin_dist import PluginSite  # noqa: E402 - needs the sys.path entry above


@pytest.fixture
def plugin_site(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[PluginSite]:
    """Return an empty site to install fake plugin distributions into, for this test only."""
    site = PluginSite(tmp_path / "site", monkeypatch)
    yield site
    site.cleanup()


@pytest.fixture
def example_plugin(plugin_site: PluginSite, monkeypatch: pytest.MonkeyPatch) -> PluginSite:
    """Install ``anomaly-example-plugin`` and load it alone (``ANOMALY_LOAD_PLUGINS``)."""
    plugin_site.add_example()
    monkeypatch.setenv("ANOMALY_LOAD_PLUGINS", "anomaly-example-plugin")
    return plugin_site
