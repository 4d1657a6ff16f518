"""Errors of anomaly-deploy's torch-free side: loading exports and reading inputs.

They do not derive from core's ``AnomalyError`` because the inference path never imports
core; the ``anomaly`` command line turns them into its own errors (``InputError`` into
``DataError``, every other one into ``ConfigError``) so they print as one line.
"""

from __future__ import annotations

__all__ = ["ArtefactError", "DeployError", "InputError", "OptionError"]


class DeployError(Exception):
    """Base of every error anomaly-deploy raises on purpose; its message is one line."""


class ArtefactError(DeployError):
    """An export folder is missing, incomplete or corrupt, or its format is unknown."""


class InputError(DeployError):
    """An input image, folder, video or camera cannot be read, or holds no images."""


class OptionError(DeployError, ValueError):
    """An inferencer option is invalid, or the runtime cannot use the requested device."""
