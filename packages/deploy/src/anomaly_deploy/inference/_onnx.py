"""``OnnxInferencer``: run an ONNX export with ONNX Runtime."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping

import numpy as np
import numpy.typing as npt

from anomaly_deploy.errors import ArtefactError, InputError, OptionError
from anomaly_deploy.inference._base import Inferencer

__all__ = ["OnnxInferencer"]

logger = logging.getLogger(__name__)

_PROVIDERS = {
    "CPU": ["CPUExecutionProvider"],
    "CUDA": ["CUDAExecutionProvider", "CPUExecutionProvider"],
    "GPU": ["CUDAExecutionProvider", "CPUExecutionProvider"],
    "TENSORRT": ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"],
}


def _runtime_errors() -> tuple[type[BaseException], ...]:
    """ONNX Runtime's own exception classes; they derive from ``Exception`` directly."""
    from onnxruntime.capi import onnxruntime_pybind11_state as state

    names = (
        "Fail",
        "InvalidArgument",
        "InvalidProtobuf",
        "NoSuchFile",
        "NoModel",
        "RuntimeException",
        "InvalidGraph",
        "NotImplemented",
        "EPFail",
        "ModelLoaded",
    )
    found = [getattr(state, name) for name in names if hasattr(state, name)]
    return (*found, RuntimeError, OSError)


class OnnxInferencer(Inferencer):
    """Run an ONNX export with ONNX Runtime; numpy and Pillow only, no torch.

    Args:
        path: The export folder (or its ``model.onnx``).
        device: ``"CPU"`` (default), or ``"CUDA"``/``"GPU"`` with ``onnxruntime-gpu``
            installed (CPU then runs what CUDA cannot).
        num_threads: Threads for one operator; None leaves ONNX Runtime's default (the
            physical cores).

    Raises:
        ArtefactError: When the export is missing or the graph cannot be loaded.
        OptionError: When ``device`` has no execution provider here, or on a bad
            ``num_threads``.
    """

    format = "onnx"

    def __init__(
        self,
        path: str | os.PathLike[str],
        device: str = "CPU",
        *,
        num_threads: int | None = None,
    ) -> None:
        if num_threads is not None and (
            isinstance(num_threads, bool) or not isinstance(num_threads, int) or num_threads < 1
        ):
            msg = f"num_threads must be a positive integer or None, got {num_threads!r}"
            raise OptionError(msg)
        self.num_threads = num_threads
        super().__init__(path, device)

    def _load(self) -> None:
        import onnxruntime as ort

        providers = _PROVIDERS.get(self.device.upper())
        available = ort.get_available_providers()
        if providers is None or providers[0] not in available:
            msg = (
                f"ONNX Runtime cannot run on device {self.device!r} here (providers: "
                f"{available!r}); use 'CPU', or install onnxruntime-gpu for 'CUDA'"
            )
            raise OptionError(msg)
        options = ort.SessionOptions()
        options.log_severity_level = 3  # errors only: the runtime's notices are not ours
        if self.num_threads is not None:
            options.intra_op_num_threads = self.num_threads
        try:
            self._session = ort.InferenceSession(
                str(self.model_path),
                sess_options=options,
                providers=[name for name in providers if name in available],
            )
        except _runtime_errors() as err:
            reason = str(err).splitlines()[0] if str(err) else type(err).__name__
            msg = (
                f"ONNX Runtime cannot load {str(self.model_path)!r} ({reason}); "
                "export the model again"
            )
            raise ArtefactError(msg) from err
        inputs = self._session.get_inputs()
        if len(inputs) != 1:
            msg = (
                f"the graph in {str(self.model_path)!r} takes {len(inputs)} inputs, not one "
                "'image'; export the model again"
            )
            raise ArtefactError(msg)
        self._input_name = inputs[0].name
        self._output_names = [output.name for output in self._session.get_outputs()]

    def _run(self, batch: npt.NDArray[np.float32]) -> Mapping[str, np.ndarray]:
        try:
            values = self._session.run(None, {self._input_name: batch})
        except _runtime_errors() as err:
            reason = str(err).splitlines()[0] if str(err) else type(err).__name__
            msg = (
                f"ONNX Runtime failed on a batch of shape {batch.shape!r} ({reason}); "
                "try other images or batch_size=1"
            )
            raise InputError(msg) from err
        return dict(zip(self._output_names, values, strict=True))
