"""How a frozen backbone runs: torch eager, channels-last, ``torch.compile`` or OpenVINO.

The runtimes differ only in speed: each returns the feature maps of torch eager, in the same
order, shape, dtype and (contiguous) memory layout, up to float rounding. Compiled forms are
built lazily on the first call and are caches: they are never part of the state dict, are
dropped when the module is pickled, copied, moved or loaded, and rebuilt when needed.
"""

from __future__ import annotations

import difflib
import enum
import importlib.util
import logging
import threading
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from anomaly._errors import ConfigError

__all__ = [
    "BackboneRuntime",
    "CompiledRunner",
    "OpenVinoRunner",
    "check_openvino",
    "parse_runtime",
]

logger = logging.getLogger(__name__)

# Runtimes that keep autograd and train mode intact, hence the only ones a trainable backbone
# may use.
TRAINABLE_RUNTIMES = ("eager", "channels_last")

_warned: set[str] = set()


class BackboneRuntime(enum.StrEnum):
    """Execution engine of a ``FeatureExtractor``; the features are the same for each.

    - ``eager``: plain PyTorch.
    - ``channels_last``: PyTorch with weights and input in ``torch.channels_last`` memory
      format, which oneDNN's CPU convolutions run faster.
    - ``compile``: ``torch.compile`` (Inductor), built on the first call; slow to build (a
      minute or more on a small CPU), falls back to eager with one warning when it fails.
    - ``openvino``: the frozen model converted to OpenVINO on the first call and run on the
      CPU; needs the ``openvino`` package. Several times faster than eager on CPUs.
    """

    EAGER = "eager"
    CHANNELS_LAST = "channels_last"
    COMPILE = "compile"
    OPENVINO = "openvino"


def parse_runtime(value: object, *, trainable: bool = False) -> BackboneRuntime:
    """Return the runtime named ``value``, checked against ``trainable``.

    Raises:
        ConfigError: For an unknown name (with the closest match), for ``openvino`` when the
            package is missing, or, when ``trainable``, for a runtime that cannot train.
    """
    names = [member.value for member in BackboneRuntime]
    if not isinstance(value, str) or value not in names:
        close = difflib.get_close_matches(str(value), names, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        msg = f"unknown backbone runtime {value!r}; {hint}choose one of {names}"
        raise ConfigError(msg)
    runtime = BackboneRuntime(value)
    if trainable and runtime.value not in TRAINABLE_RUNTIMES:
        msg = (
            f"backbone runtime {runtime.value!r} only runs frozen backbones; use 'eager' or "
            f"'channels_last' with trainable=True"
        )
        raise ConfigError(msg)
    if runtime is BackboneRuntime.OPENVINO:
        check_openvino()
    return runtime


def check_openvino() -> None:
    """Raise ``ConfigError`` unless the ``openvino`` package can be imported."""
    if importlib.util.find_spec("openvino") is None:
        msg = (
            "backbone runtime 'openvino' needs the openvino package, which is not installed; "
            "run `pip install openvino` or use runtime 'eager'"
        )
        raise ConfigError(msg)


def warn_once(key: str, message: str, *args: object) -> None:
    """Log ``message`` as a warning the first time ``key`` is seen in this process."""
    if key not in _warned:
        _warned.add(key)
        logger.warning(message, *args)


class CompiledRunner:
    """``torch.compile`` of a frozen feature model, falling back to eager when it fails.

    ``torch.compile`` compiles on the first call (and again for new input shapes, then with
    dynamic shapes), so failures such as a missing C++ compiler surface there; from the first
    failure on, this runner calls the eager model.

    Args:
        model: The feature model, (B, 3, H, W) -> list of (B, C_i, h_i, w_i).
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.compiled: Callable[[torch.Tensor], list[torch.Tensor]] | None = None
        self.failed = False
        try:
            self.compiled = torch.compile(model)
        # Dynamo and Inductor fail in many ways (unsupported Python, no C++ compiler, backend
        # bugs) with exception types of their own; the eager model computes the same features.
        except Exception as err:
            self._fail(err)

    def _fail(self, err: Exception) -> None:
        self.compiled = None
        self.failed = True
        warn_once(
            "compile",
            "torch.compile of the backbone failed (%s: %s); running it in eager mode",
            type(err).__name__,
            str(err).splitlines()[0] if str(err) else "",
        )

    def __call__(self, image: torch.Tensor) -> list[torch.Tensor]:
        """Return the feature maps of ``image``."""
        if self.compiled is not None:
            try:
                return self.compiled(image)
            except Exception as err:  # see __init__
                self._fail(err)
        features: list[torch.Tensor] = self.model(image)
        return features


class OpenVinoRunner:
    """A frozen feature model converted to OpenVINO and compiled for the CPU.

    The model is traced once with dynamic batch size, height and width, so one compiled model
    serves every input size. Inference runs in float32 (OpenVINO would otherwise pick bfloat16
    on CPUs that have it), reads the input tensor's memory without a copy and returns torch
    tensors in the model's output order. Calls from several threads take turns, as the
    compiled model's one inference request serves them all.

    Args:
        model: The feature model in eval mode, (B, 3, H, W) -> list of (B, C_i, h_i, w_i).
        example: An input of the kind it will see, (B, 3, H, W) float32 on the CPU.
        threads: CPU threads of the inference; None: OpenVINO's default (every core).

    Raises:
        ConfigError: When the model cannot be converted.
    """

    def __init__(self, model: nn.Module, example: torch.Tensor, threads: int | None = None) -> None:
        import openvino as ov  # optional dependency, imported only when used

        example = example.detach().to(torch.float32).contiguous()
        try:
            with warnings.catch_warnings():
                # Tracing and conversion warn about their own internals (jit.trace's
                # deprecation, traced Python values); only the converted graph matters here.
                warnings.simplefilter("ignore")
                with torch.no_grad():
                    # Tracing here without trace checking halves conversion time compared to
                    # letting convert_model trace, which re-runs the model to check the trace.
                    traced = torch.jit.trace(  # type: ignore[no-untyped-call]  # unannotated
                        model, example, check_trace=False, strict=False
                    )
                # share_weights=False: the converted model owns its weights, so it never reads
                # torch memory that a later .to() or load_state_dict() frees or rewrites.
                converted = ov.convert_model(
                    traced,
                    example_input=example,
                    input=[ov.PartialShape([-1, 3, -1, -1])],
                    share_weights=False,
                )
        # The converter raises its own failure types and plain RuntimeErrors from tracing.
        except Exception as err:
            msg = (
                f"the backbone cannot be converted to OpenVINO ({type(err).__name__}: "
                f"{str(err).splitlines()[0] if str(err) else ''}); use runtime 'eager'"
            )
            raise ConfigError(msg) from err
        config: dict[str, Any] = {"INFERENCE_PRECISION_HINT": "f32"}
        if threads is not None:
            config["INFERENCE_NUM_THREADS"] = int(threads)
        self.compiled = ov.Core().compile_model(converted, "CPU", config)
        self._lock = threading.Lock()
        logger.debug("backbone converted to OpenVINO and compiled (%s)", config)

    def __call__(self, image: torch.Tensor) -> list[torch.Tensor]:
        """Return the feature maps of ``image`` ((B, 3, H, W) on the CPU)."""
        array = image.detach().to(torch.float32).contiguous().numpy()
        # share_inputs reads the array in place; share_outputs=False copies the outputs out of
        # the request's buffers, which the next inference overwrites.
        with self._lock:
            result = self.compiled(array, share_inputs=True, share_outputs=False)
        return [torch.from_numpy(output) for output in result.to_tuple()]
