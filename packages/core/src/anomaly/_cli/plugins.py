"""``anomaly plugins``: every plugin, what it registers and whether it works.

Plugin problems are shown in the status column, never raised: this is the command to run
when something is wrong with a plugin. Imports neither torch nor Lightning.
"""

from __future__ import annotations

import json
from typing import Any

import click
from rich.table import Table
from rich.text import Text

from anomaly._cli._console import console
from anomaly._plugins import PluginInfo, PluginStatus, get_plugin_manager
from anomaly._specs import ComponentKind

__all__ = ["plugin_rows", "plugins"]

_STATUS_STYLE = {
    PluginStatus.OK: "green",
    PluginStatus.BLOCKED: "dim",
    PluginStatus.BROKEN: "bold red",
    PluginStatus.CONFLICT: "yellow",
}


def plugin_rows(infos: list[PluginInfo]) -> list[dict[str, Any]]:
    """Return one JSON-ready record per plugin, with the same keys for every plugin.

    Keys: ``distribution``, ``version``, ``entry_point``, ``status`` (``ok``, ``blocked``,
    ``broken``, ``conflict``), ``reason`` (empty when ok), ``hooks`` (sorted hook names) and
    ``registers`` (every component kind to its sorted registered names, empty lists included).
    """
    return [
        {
            "distribution": info.distribution,
            "version": info.version,
            "entry_point": info.entry_point,
            "status": info.status.value,
            "reason": info.reason,
            "hooks": list(info.hooks),
            "registers": {kind.value: sorted(info.names(kind)) for kind in ComponentKind},
        }
        for info in infos
    ]


def _registers(info: PluginInfo) -> str:
    """One line per implemented hook: its kind and the names it registered."""
    lines = []
    for hook in info.hooks:
        kind = next((k for k in ComponentKind if hook == f"anomaly_register_{k.value}"), None)
        if kind is None:
            lines.append(hook.removeprefix("anomaly_"))
            continue
        lines.append(f"{kind.value}: {', '.join(sorted(info.names(kind))) or '(none)'}")
    return "\n".join(lines) or "-"


def _table(infos: list[PluginInfo]) -> Table:
    # Three columns fit an 80-column terminal: version and entry point go under the
    # distribution, each implemented hook is a line of the names it registered.
    table = Table(title="anomaly plugins", title_justify="left", show_lines=True)
    table.add_column("Plugin", overflow="fold")  # fold, never cut, a long name
    table.add_column("Registers, per hook", overflow="fold")
    table.add_column("Status", overflow="fold")
    for info in infos:
        plugin = Text(info.distribution, style="bold")
        plugin.append(f"\n{info.version}, entry point {info.entry_point}", style="not bold")
        status = Text(info.status.value, style=_STATUS_STYLE[info.status])
        if info.reason:
            status.append(f": {info.reason}", style="default")
        table.add_row(plugin, Text(_registers(info)), status)
    return table


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--json",
    "as_json",
    is_flag=True,
    default=False,
    show_default=True,
    help="Print plain JSON on stdout instead of a table.",
)
def plugins(as_json: bool) -> None:
    """List installed plugins and what each registers.

    Shows every distribution with an entry point in the group 'anomaly': its version, entry
    point, the hooks it implements, the names it registers per kind, and its status: ok,
    blocked (by ANOMALY_DISABLE_PLUGINS or ANOMALY_LOAD_PLUGINS), broken (failed to load;
    the cause follows) or conflict (registers a name another plugin registers too). Plugin
    problems are listed here, never raised.

    \b
    Examples:
      anomaly plugins
      anomaly plugins --json
      ANOMALY_DISABLE_PLUGINS=models_flow anomaly plugins
    """
    infos = get_plugin_manager().plugins()
    if as_json:
        click.echo(json.dumps({"plugins": plugin_rows(infos)}, indent=2))
        return
    if not infos:
        console.print(
            "No plugins found: not even anomaly-core's own entry point. Reinstall anomaly-core.",
            highlight=False,
        )
        return
    console.print(_table(infos))
