"""Rich consoles and logging set-up for the CLI; nothing else in anomaly prints."""

from __future__ import annotations

import logging
import warnings

from rich.console import Console
from rich.logging import RichHandler

__all__ = ["console", "err_console", "quiet_lightning", "setup_logging"]

console = Console(soft_wrap=True)
err_console = Console(stderr=True, soft_wrap=True)


def quiet_lightning(verbose: int = 0) -> None:
    """Silence Lightning's start-up banners (accelerator found, tips) below ``-vv``.

    Lightning sets its loggers up when it is first imported, so this runs after that import.
    """
    import lightning.pytorch  # noqa: F401 - imported for its logging set-up

    level = logging.INFO if verbose >= 2 else logging.WARNING
    for name in ("lightning.pytorch", "lightning.fabric", "lightning"):
        logging.getLogger(name).setLevel(level)


def setup_logging(*, verbose: int = 0, quiet: bool = False) -> None:
    """Route the ``anomaly`` logger and captured warnings to stderr through rich."""
    level = (
        logging.ERROR if quiet else (logging.WARNING, logging.INFO, logging.DEBUG)[min(verbose, 2)]
    )
    handler = RichHandler(console=err_console, show_time=False, show_path=verbose > 1)
    for name in ("anomaly", "py.warnings"):
        logger = logging.getLogger(name)
        logger.handlers = [handler]
        logger.setLevel(level)
        logger.propagate = False
    # Lightning's start-up banners (accelerator found, tips) are noise on the command line.
    logging.getLogger("lightning.pytorch").setLevel(
        logging.WARNING if verbose < 2 else logging.INFO
    )
    logging.getLogger("lightning.fabric").setLevel(logging.WARNING if verbose < 2 else logging.INFO)
    logging.captureWarnings(True)
    warnings.simplefilter("default")
