"""``TorchInferencer``: run a ``torch.export`` program (``model.pt2``) with torch.

torch is imported only when this inferencer is built; the rest of the package never needs it.
"""

from __future__ import annotations

import logging
import pickle
import zipfile
from collections.abc import Mapping
from typing import Any

import numpy as np
import numpy.typing as npt

from anomaly_deploy.errors import ArtefactError, InputError, OptionError
from anomaly_deploy.inference._base import OUTPUT_NAMES, Inferencer

__all__ = ["TorchInferencer"]

logger = logging.getLogger(__name__)


class TorchInferencer(Inferencer):
    """Run a torch export (``torch.export.save`` of an ``ExportedProgram``) with torch.

    Args:
        path: The export folder (or its ``model.pt2``).
        device: ``"CPU"`` (default), ``"CUDA"``/``"GPU"`` or ``"cuda:N"``; case does not matter.

    Raises:
        ArtefactError: When the export is missing or the program cannot be loaded.
        OptionError: When ``device`` is not a torch device or CUDA is not available.
    """

    format = "torch"

    def _load(self) -> None:
        import torch

        name = self.device.lower()
        name = "cuda" + name[3:] if name.startswith("gpu") else name
        try:
            device = torch.device(name)
        except RuntimeError as err:
            msg = f"{self.device!r} is not a torch device; use 'CPU' or 'CUDA'"
            raise OptionError(msg) from err
        if device.type == "cuda" and not torch.cuda.is_available():
            msg = f"device {self.device!r} asked for, but torch sees no CUDA device; use 'CPU'"
            raise OptionError(msg)
        if device.type not in {"cpu", "cuda"}:
            msg = f"device {self.device!r} is not supported; use 'CPU' or 'CUDA'"
            raise OptionError(msg)
        try:
            program = torch.export.load(self.model_path)
        except (
            RuntimeError,
            OSError,
            ValueError,
            KeyError,
            EOFError,
            zipfile.BadZipFile,
            pickle.UnpicklingError,
        ) as err:
            reason = str(err).splitlines()[0] if str(err) else type(err).__name__
            msg = f"torch cannot load {str(self.model_path)!r} ({reason}); export the model again"
            raise ArtefactError(msg) from err
        if device.type != "cpu":
            from torch.export.passes import move_to_device_pass

            program = move_to_device_pass(program, device)
        self._torch = torch
        self._device = device
        self._module = program.module()

    def _run(self, batch: npt.NDArray[np.float32]) -> Mapping[str, np.ndarray]:
        torch = self._torch
        try:
            with torch.no_grad():
                outputs = self._module(torch.from_numpy(batch).to(self._device))
        except RuntimeError as err:
            reason = str(err).splitlines()[0] if str(err) else type(err).__name__
            msg = (
                f"torch failed on a batch of shape {batch.shape!r} ({reason}); "
                "try other images or batch_size=1"
            )
            raise InputError(msg) from err
        return {name: value.detach().cpu().numpy() for name, value in _named(outputs).items()}


def _named(outputs: Any) -> dict[str, Any]:
    """Name a program's outputs: a tuple in the contract's order, a mapping, or attributes."""
    if isinstance(outputs, Mapping):
        return {name: outputs[name] for name in OUTPUT_NAMES if name in outputs}
    if isinstance(outputs, tuple | list):
        names = OUTPUT_NAMES if len(outputs) == len(OUTPUT_NAMES) else OUTPUT_NAMES[::2]
        return dict(zip(names, outputs, strict=False))
    return {name: getattr(outputs, name) for name in OUTPUT_NAMES if hasattr(outputs, name)}
