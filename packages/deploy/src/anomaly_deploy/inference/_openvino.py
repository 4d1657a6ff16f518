"""``OpenVINOInferencer``: run an OpenVINO IR export with OpenVINO Runtime."""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Mapping

import numpy as np
import numpy.typing as npt

from anomaly_deploy.errors import ArtefactError, InputError, OptionError
from anomaly_deploy.inference._base import OUTPUT_NAMES, Inferencer

__all__ = ["OpenVINOInferencer"]

logger = logging.getLogger(__name__)

_HINTS = ("LATENCY", "THROUGHPUT", "CUMULATIVE_THROUGHPUT")
_VIRTUAL_DEVICES = ("AUTO", "MULTI", "HETERO", "BATCH")


class OpenVINOInferencer(Inferencer):
    """Run an OpenVINO export with OpenVINO Runtime; numpy and Pillow only, no torch.

    Nothing is written to disk: no model cache directory is set.

    Args:
        path: The export folder (or its ``model.xml``; ``model.bin`` lies next to it).
        device: An OpenVINO device: ``"CPU"`` (default), ``"GPU"``, ``"NPU"``, ``"AUTO"``...
        performance_hint: ``"LATENCY"`` (default, best for one image at a time) or
            ``"THROUGHPUT"`` (more parallel streams, for large batches or many threads).
        inference_precision: Precision of floating-point layers on CPU and GPU; ``"f32"``
            (default) gives the same numbers as the other runtimes, None leaves the
            device's default (bf16 on CPUs that have it, f16 on GPUs: faster, less exact).

    Raises:
        ArtefactError: When the export is missing or the IR cannot be read or compiled.
        OptionError: When ``device`` is not available, or on a bad hint or precision.
    """

    format = "openvino"

    def __init__(
        self,
        path: str | os.PathLike[str],
        device: str = "CPU",
        *,
        performance_hint: str = "LATENCY",
        inference_precision: str | None = "f32",
    ) -> None:
        hint = performance_hint.upper() if isinstance(performance_hint, str) else ""
        if hint not in _HINTS:
            msg = f"performance_hint must be one of {list(_HINTS)!r}, got {performance_hint!r}"
            raise OptionError(msg)
        if inference_precision not in (None, "f32", "f16", "bf16"):
            msg = (
                f"inference_precision must be 'f32', 'f16', 'bf16' or None, "
                f"got {inference_precision!r}"
            )
            raise OptionError(msg)
        self.performance_hint = hint
        self.inference_precision = inference_precision
        self._local = threading.local()
        super().__init__(path, device)

    def _load(self) -> None:
        import openvino as ov

        core = ov.Core()
        device = self.device.upper()
        base = device.split(":")[0].split(".")[0]
        available = list(core.available_devices)
        if (
            base not in _VIRTUAL_DEVICES
            and device not in available
            and base not in {name.split(".")[0] for name in available}
        ):
            msg = (
                f"OpenVINO has no device {self.device!r} here (available: {available!r}); "
                "use 'CPU' or 'AUTO'"
            )
            raise OptionError(msg)
        config: dict[str, str] = {"PERFORMANCE_HINT": self.performance_hint}
        if self.inference_precision is not None and base in {"CPU", "GPU"}:
            config["INFERENCE_PRECISION_HINT"] = self.inference_precision
        try:
            model = core.read_model(str(self.model_path))
            self._compiled = core.compile_model(model, device, config)
        except RuntimeError as err:
            reason = str(err).strip().splitlines()[0] if str(err).strip() else "unknown error"
            msg = (
                f"OpenVINO cannot load {str(self.model_path)!r} on {device} ({reason}); "
                "export the model again"
            )
            raise ArtefactError(msg) from err
        if len(self._compiled.inputs) != 1:
            msg = (
                f"the model in {str(self.model_path)!r} takes {len(self._compiled.inputs)} "
                "inputs, not one 'image'; export the model again"
            )
            raise ArtefactError(msg)
        self._outputs = {}
        for port in self._compiled.outputs:
            names = port.get_names()
            known = [name for name in OUTPUT_NAMES if name in names]
            self._outputs[known[0] if known else port.get_any_name()] = port

    def _run(self, batch: npt.NDArray[np.float32]) -> Mapping[str, np.ndarray]:
        # One infer request per thread: a request is not safe to share, and under the
        # THROUGHPUT hint parallel requests are what keeps every stream busy.
        request = getattr(self._local, "request", None)
        if request is None:
            request = self._compiled.create_infer_request()
            self._local.request = request
        try:
            results = request.infer({0: batch})
        except RuntimeError as err:
            reason = str(err).strip().splitlines()[0] if str(err).strip() else "unknown error"
            msg = (
                f"OpenVINO failed on a batch of shape {batch.shape!r} ({reason}); "
                "try other images or batch_size=1"
            )
            raise InputError(msg) from err
        # The request reuses its output buffers on the next call, so copy them out.
        return {name: np.array(results[port], copy=True) for name, port in self._outputs.items()}
