"""The examples in ``docs/`` run: ``>>>`` sessions everywhere, ``python`` blocks of the plugin docs.

``docs/`` lies outside ``testpaths``, so pytest's ``--doctest-glob`` never sees it; this
module runs the examples instead. Each ``python`` fenced block of ``docs/plugins/*.md`` runs
in a fresh namespace with the example plugin installed, and its argument-free ``test_*``
functions are called, so the snippets a plugin author copies are known to work.
"""

from __future__ import annotations

import doctest
import inspect
import io
import re
from pathlib import Path

import pytest
from plugin_dist import PluginSite

DOCS = Path(__file__).resolve().parents[2] / "docs"
FENCE = re.compile(r"^```python[ \t]*\n(.*?)^```[ \t]*$", re.DOTALL | re.MULTILINE)


def _markdown_files() -> list[Path]:
    return sorted(DOCS.rglob("*.md"))


def _python_blocks() -> list[tuple[Path, int, str]]:
    """Every ```python block of docs/plugins/*.md with the line it starts on."""
    blocks = []
    for path in sorted((DOCS / "plugins").glob("*.md")):
        text = path.read_text(encoding="utf-8")
        for match in FENCE.finditer(text):
            line = text.count("\n", 0, match.start()) + 2
            blocks.append((path, line, match.group(1)))
    return blocks


def test_plugin_docs_exist() -> None:
    names = {path.name for path in (DOCS / "plugins").glob("*.md")}

    assert {"hooks.md", "authoring.md"} <= names
    assert len(_python_blocks()) >= 10


@pytest.mark.parametrize("path", _markdown_files(), ids=lambda path: str(path.relative_to(DOCS)))
def test_markdown_doctests(path: Path, example_plugin: PluginSite) -> None:
    text = path.read_text(encoding="utf-8")
    parser = doctest.DocTestParser()
    test = parser.get_doctest(text, {}, path.name, str(path), 0)
    report = io.StringIO()
    runner = doctest.DocTestRunner(
        optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE, verbose=False
    )

    runner.run(test, out=report.write)

    assert runner.failures == 0, report.getvalue()
    if "docs/plugins" in path.as_posix():
        assert runner.tries > 0, f"{path.name} has no >>> example"


@pytest.mark.parametrize(
    ("path", "line", "source"),
    _python_blocks(),
    ids=[f"{path.name}:{line}" for path, line, _ in _python_blocks()],
)
def test_python_blocks_run(path: Path, line: int, source: str, example_plugin: PluginSite) -> None:
    namespace: dict[str, object] = {"__name__": f"docs_{path.stem}_{line}"}
    # Pad with blank lines so tracebacks point at the line in the markdown file.
    code = compile("\n" * (line - 1) + source, str(path), "exec")

    exec(code, namespace)  # running the documentation is the point

    for name, value in namespace.items():
        if name.startswith("test_") and callable(value) and not inspect.signature(value).parameters:
            value()
