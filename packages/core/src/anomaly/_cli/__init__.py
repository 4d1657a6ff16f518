"""The ``anomaly`` command line: a click group whose commands load lazily.

Only this package talks to people: results go to stdout through rich, logs, warnings and
progress to stderr. ``anomaly --help`` and ``anomaly plugins`` import neither torch nor
Lightning.
"""

from __future__ import annotations

import enum
import importlib
import logging
import sys
import warnings
from collections.abc import Sequence

import click

from anomaly._cli._console import err_console, setup_logging
from anomaly._errors import AnomalyError, PluginLoadWarning

__all__ = ["ExitCode", "cli", "main"]

_BUILTIN_COMMANDS = {
    "run": "anomaly._cli.run:run",
    "fit": "anomaly._cli.stages:fit",
    "test": "anomaly._cli.stages:test",
    "train": "anomaly._cli.stages:train",
    "predict": "anomaly._cli.stages:predict",
    "export": "anomaly._cli.stages:export",
    "plugins": "anomaly._cli.plugins:plugins",
    "models": "anomaly._cli.models:models",
}

ENVIRONMENT_HELP = """\b
Environment:
  ANOMALY_DISABLE_PLUGINS=a,b   block these entry points or distributions
  ANOMALY_LOAD_PLUGINS=d1,d2    load only these distributions (empty: none)
  ANOMALY_STRICT_PLUGINS=1      fail instead of warning when a plugin breaks
  ANOMALY_TRACE_PLUGINS=1       log every hook call (with -v)
  ANOMALY_CACHE_DIR=DIR         where the demo dataset is cached
"""


class ExitCode(enum.IntEnum):
    """Exit codes of the ``anomaly`` command."""

    OK = 0
    ERROR = 1
    USAGE = 2
    BUG = 3
    INTERRUPTED = 130


def _load_command(target: str) -> click.Command:
    module_name, _, attribute = target.partition(":")
    command = getattr(importlib.import_module(module_name), attribute)
    if not isinstance(command, click.Command):
        msg = f"{target!r} is not a click command"
        raise TypeError(msg)
    return command


class _LazyGroup(click.Group):
    """Import each command's module only when that command runs or help lists it."""

    def _plugin_commands(self) -> dict[str, str]:
        from anomaly._plugins import get_plugin_manager

        found: dict[str, str] = {}
        for spec in get_plugin_manager().commands():
            if spec.name in _BUILTIN_COMMANDS:
                message = (
                    f"plugin command {spec.name!r} from {spec.provider!r} clashes with a "
                    f"built-in command and was skipped; rename it in that plugin"
                )
                warnings.warn(message, PluginLoadWarning, stacklevel=2)
                continue
            found[spec.name] = spec.target
        return found

    def _safe_plugin_commands(self) -> dict[str, str]:
        # A broken plugin must not break help or the built-in commands: the failure shows
        # in 'anomaly plugins' and when the plugin's own components are used.
        try:
            return self._plugin_commands()
        except AnomalyError as err:
            logging.getLogger("anomaly").warning("plugin commands unavailable: %s", err)
            return {}

    def list_commands(self, ctx: click.Context) -> list[str]:
        return [*_BUILTIN_COMMANDS, *sorted(self._safe_plugin_commands())]

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        target = _BUILTIN_COMMANDS.get(cmd_name) or self._safe_plugin_commands().get(cmd_name)
        if target is None:
            return None
        return _load_command(target)


@click.group(
    cls=_LazyGroup,
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
    epilog=ENVIRONMENT_HELP,
)
@click.version_option(package_name="anomaly-core", prog_name="anomaly")
@click.option("-v", "--verbose", count=True, help="Log more (-v info, -vv debug).")
@click.option("-q", "--quiet", is_flag=True, default=False, help="Log only errors.")
@click.option("--traceback", is_flag=True, default=False, help="Show the traceback of errors.")
@click.pass_context
def cli(ctx: click.Context, verbose: int, quiet: bool, traceback: bool) -> None:
    """Detect and localize visual anomalies: train, test, export and predict.

    With no options, 'anomaly run' trains the default model on the built-in demo dataset.

    \b
    Examples:
      anomaly run
      anomaly run --model padim --data folder --data.root ./bottles
      anomaly plugins
    """
    ctx.ensure_object(dict)
    ctx.obj["traceback"] = traceback
    ctx.obj["quiet"] = quiet
    ctx.obj["verbose"] = verbose
    setup_logging(verbose=verbose, quiet=quiet)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI and return its exit code (used by the ``anomaly`` console script)."""
    args = list(sys.argv[1:] if argv is None else argv)
    show_traceback = "--traceback" in args
    try:
        cli.main(args=args, prog_name="anomaly", standalone_mode=False)
    except click.exceptions.Exit as exc:
        return int(exc.exit_code)
    except click.ClickException as exc:
        exc.show()
        return ExitCode.USAGE
    except click.exceptions.Abort:
        err_console.print("[red]Aborted.[/red]")
        return ExitCode.INTERRUPTED
    except KeyboardInterrupt:
        err_console.print("[red]Interrupted.[/red]")
        return ExitCode.INTERRUPTED
    except AnomalyError as exc:
        if show_traceback:
            err_console.print_exception()
        err_console.print(f"[bold red]{type(exc).__name__}:[/bold red] {exc}", highlight=False)
        return ExitCode.ERROR
    except Exception:
        err_console.print_exception()
        err_console.print(
            "[bold red]This is a bug in anomaly or one of its plugins; please report it "
            "with the traceback above.[/bold red]"
        )
        return ExitCode.BUG
    return ExitCode.OK


def _entry() -> None:
    sys.exit(main())


logging.getLogger(__name__).addHandler(logging.NullHandler())
