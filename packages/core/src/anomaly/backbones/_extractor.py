"""``FeatureExtractor``: frozen multi-scale feature maps from any timm backbone."""

from __future__ import annotations

import difflib
import logging
import os
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import timm
import torch
from torch import nn

from anomaly._errors import BackboneWeightsError, ConfigError
from anomaly.backbones._runtime import (
    BackboneRuntime,
    CompiledRunner,
    OpenVinoRunner,
    parse_runtime,
)
from anomaly.backbones._weights import StateDict, resolve_weights

if TYPE_CHECKING:
    from anomaly._plugins import PluginManager

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "FeatureExtractor", "imagenet_normalize"]

logger = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def imagenet_normalize(image: torch.Tensor) -> torch.Tensor:
    """Standardize images with the ImageNet channel mean and standard deviation.

    Args:
        image: (B, 3, H, W) float in [0, 1].

    Returns:
        (B, 3, H, W) float, what ImageNet-trained backbones expect.
    """
    mean = torch.tensor(IMAGENET_MEAN, dtype=image.dtype, device=image.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=image.dtype, device=image.device).view(1, 3, 1, 1)
    return (image - mean) / std


def _create(backbone: str, **kwargs: Any) -> nn.Module:
    # pretrained=False always: timm would otherwise download; weights are loaded by us.
    model: nn.Module = timm.create_model(backbone, pretrained=False, features_only=True, **kwargs)
    return model


def _check_backbone(backbone: str) -> None:
    if timm.is_model(backbone):
        return
    close = difflib.get_close_matches(backbone, timm.list_models(), n=3)
    hint = f"did you mean {', '.join(map(repr, close))}? " if close else ""
    msg = (
        f"backbone {backbone!r} is not a timm model; {hint}"
        f"see timm.list_models() for the names that exist"
    )
    raise ConfigError(msg)


def _resolve_indices(
    backbone: str,
    reductions: list[int],
    strides: Sequence[int] | None,
    out_indices: Sequence[int] | None,
) -> list[int]:
    if out_indices is not None:
        chosen = [int(index) for index in out_indices]
        bad = [index for index in chosen if not 0 <= index < len(reductions)]
        if not chosen or bad:
            msg = (
                f"out_indices {list(out_indices)!r} do not fit backbone {backbone!r}, which has "
                f"feature levels 0 to {len(reductions) - 1} (strides {reductions}); pick from those"
            )
            raise ConfigError(msg)
    else:
        if not strides:
            msg = f"strides {strides!r} is empty; give at least one of {sorted(set(reductions))}"
            raise ConfigError(msg)
        chosen = []
        for stride in strides:
            if stride not in reductions:
                msg = (
                    f"stride {stride!r} is not a feature level of backbone {backbone!r}; "
                    f"available strides: {sorted(set(reductions))}"
                )
                raise ConfigError(msg)
            # The first level of that stride: later ones (ViTs repeat strides) need out_indices.
            chosen.append(reductions.index(stride))
    if len(set(chosen)) != len(chosen):
        msg = f"feature levels {chosen!r} of backbone {backbone!r} repeat; list each level once"
        raise ConfigError(msg)
    return chosen


def _truncate(model: nn.Module) -> None:
    """Drop blocks after the deepest requested level of timm's EfficientNet/MobileNet features.

    Their ``forward`` runs every block even when the deepest level asked for is shallow;
    timm's generic feature wrappers already stop after the last requested module.
    """
    stage_out = getattr(model, "_stage_out_idx", None)
    blocks = getattr(model, "blocks", None)
    if (
        isinstance(stage_out, dict)
        and isinstance(blocks, nn.Sequential)
        and getattr(model, "feature_hooks", True) is None
    ):
        last_stage = max(stage_out)
        if last_stage < len(blocks):
            model.blocks = blocks[:last_stage]


# Images per forward pass of a frozen torch backbone on a CPU (see ``FeatureExtractor._run``).
_CPU_MICRO_BATCH = 4


def _tracing() -> bool:
    """Tell whether torch is tracing (jit, ONNX export, dynamo or torch.export)."""
    return bool(
        torch.jit.is_tracing()  # type: ignore[attr-defined,no-untyped-call]  # untyped in torch
        or torch.onnx.is_in_onnx_export()
        or torch.compiler.is_compiling()
        or torch.compiler.is_exporting()
    )


class FeatureExtractor(nn.Module):
    """Frozen timm backbone that returns the feature maps of chosen levels.

    Levels are chosen by stride (``strides=(8, 16)``: the first level downsampling the input by
    8 and by 16), which means the same thing for every timm backbone, or by timm's
    ``out_indices``. Weights are never downloaded: see ``pretrained_weights``.

    Args:
        backbone: timm model name.
        strides: Strides of the levels to return, in the order returned.
        out_indices: timm feature indices to return instead of ``strides``.
        pretrained: Load pretrained weights; False gives random initialization, only by choice.
        pretrained_weights: Local weight file (``.safetensors`` or a torch state dict) keyed
            like timm's model; when None, the backbone's registered weight provider is used.
        plugin_manager: Where to look up weight providers; the process-wide one by default.
        trainable: Keep the backbone trainable (train mode follows the parent module and
            gradients flow); by default it is frozen, always in eval mode and run without
            autograd.
        runtime: How the backbone runs (see ``BackboneRuntime``): ``"eager"``,
            ``"channels_last"``, ``"compile"`` or ``"openvino"``. All give the same features
            up to float rounding; trainable backbones take only the first two.
        runtime_threads: CPU threads of the ``"openvino"`` runtime; None leaves OpenVINO's
            default (every core). Torch runtimes follow ``torch.set_num_threads``.

    Attributes:
        strides: Stride of each returned map.
        channels: Channels of each returned map.
        out_indices: timm feature index of each returned map.
        runtime: The ``BackboneRuntime`` in use.

    Raises:
        ConfigError: For an unknown backbone, stride, index or runtime, a runtime a
            trainable backbone cannot use, or ``"openvino"`` without the openvino package.
        BackboneWeightsError: When ``pretrained`` and no local weights fit the backbone.
    """

    def __init__(
        self,
        backbone: str = "efficientnet_lite0",
        strides: Sequence[int] | None = (8, 16),
        *,
        out_indices: Sequence[int] | None = None,
        pretrained: bool = True,
        pretrained_weights: str | os.PathLike[str] | None = None,
        plugin_manager: PluginManager | None = None,
        trainable: bool = False,
        runtime: str = "eager",
        runtime_threads: int | None = None,
    ) -> None:
        super().__init__()
        _check_backbone(backbone)
        self.runtime = parse_runtime(runtime, trainable=trainable)
        if runtime_threads is not None and (
            self.runtime is not BackboneRuntime.OPENVINO
            or not isinstance(runtime_threads, int)
            or runtime_threads < 1
        ):
            msg = (
                f"runtime_threads {runtime_threads!r} needs runtime 'openvino' and a positive "
                f"int; torch runtimes follow torch.set_num_threads"
            )
            raise ConfigError(msg)
        self.runtime_threads = runtime_threads
        # Lazily built compiled forms of self.model: a plain dict, so they are neither
        # submodules nor state-dict entries.
        self._runners: dict[str, Callable[[torch.Tensor], list[torch.Tensor]]] = {}
        try:
            with torch.device("meta"):  # names, strides and channels only: no memory, no init
                probe = _create(backbone)
        except (RuntimeError, TypeError, AssertionError) as err:
            msg = f"backbone {backbone!r} cannot return feature maps ({err}); pick another"
            raise ConfigError(msg) from err
        info: Any = probe.feature_info  # timm's FeatureInfo, untyped
        reductions = [int(value) for value in info.reduction()]
        channels = [int(value) for value in info.channels()]
        chosen = _resolve_indices(backbone, reductions, strides, out_indices)
        state = (
            resolve_weights(backbone, pretrained_weights, plugin_manager) if pretrained else None
        )

        self.backbone_name = backbone
        self.out_indices = chosen
        self.strides = [reductions[index] for index in chosen]
        self.channels = [channels[index] for index in chosen]
        self.trainable = trainable
        ordered = sorted(chosen)
        # timm returns levels in increasing order; map them back to the requested order.
        self._order = [ordered.index(index) for index in chosen]
        self.model = _create(backbone, out_indices=tuple(ordered))
        _truncate(self.model)
        if state is not None:
            self._load(state, tuple(ordered))
        if not trainable:
            self.model.requires_grad_(False)
            self.train(False)
        if self.runtime is BackboneRuntime.CHANNELS_LAST:
            self.model.to(memory_format=torch.channels_last)

    def _load(self, state: StateDict, ordered: tuple[int, ...]) -> None:
        own = self.model.state_dict()
        missing = [key for key in own if key not in state]
        if not missing:
            for key, value in own.items():
                if state[key].shape != value.shape:
                    msg = (
                        f"pretrained weights do not fit backbone {self.backbone_name!r}: "
                        f"{key!r} has shape {tuple(state[key].shape)}, the model needs "
                        f"{tuple(value.shape)}; use weights made for {self.backbone_name!r}"
                    )
                    raise BackboneWeightsError(msg)
            with torch.device("meta"):
                full = timm.create_model(self.backbone_name, pretrained=False).state_dict()
            # Weights of a deeper sibling (lite1 into lite0) fit every shape of the shared
            # layers; their extra keys are what gives them away.
            unexpected = [key for key in state if key not in full]
            if unexpected:
                msg = (
                    f"pretrained weights do not fit backbone {self.backbone_name!r}: they hold "
                    f"{len(unexpected)} tensors it lacks (first: {unexpected[0]!r}); use "
                    f"weights made for {self.backbone_name!r}"
                )
                raise BackboneWeightsError(msg)
            self.model.load_state_dict({key: state[key] for key in own})
            return
        # Feature wrappers that rename modules (ConvNeXt stages, ViT getters): let timm load the
        # full-model state dict before wrapping. Every remote source is cleared so this path
        # can only read the tensors given here.
        overlay: dict[str, object] = {
            "state_dict": dict(state),
            "file": None,
            "url": None,
            "hf_hub_id": None,
            "source": "",
        }
        try:
            model: nn.Module = timm.create_model(
                self.backbone_name,
                pretrained=True,
                features_only=True,
                out_indices=ordered,
                pretrained_cfg_overlay=overlay,
            )
        except (RuntimeError, KeyError, ValueError) as err:
            msg = (
                f"pretrained weights do not fit backbone {self.backbone_name!r} ({missing[0]!r} "
                f"is missing or misshapen: {str(err).splitlines()[0]}); use weights made for it"
            )
            raise BackboneWeightsError(msg) from err
        _truncate(model)
        self.model = model

    def train(self, mode: bool = True) -> FeatureExtractor:
        """Follow ``mode`` only when trainable: a frozen backbone stays in eval mode.

        Lightning switches the whole LightningModule to train mode during fitting, which would
        otherwise update batch-norm statistics of the frozen backbone.
        """
        super().train(mode and self.trainable)
        return self

    def forward(self, image: torch.Tensor) -> list[torch.Tensor]:
        """Return the feature maps of the chosen levels.

        A frozen backbone runs under ``torch.no_grad()`` (not ``inference_mode``: its maps
        must stay ordinary tensors that trainable heads and saved buffers can use); inside
        ``torch.inference_mode()``, as in Lightning's validation and test loops, they are
        inference tensors like every other result there.

        Args:
            image: (B, 3, H, W) float, already normalized as the backbone expects (ImageNet
                statistics for the built-in weights; see ``imagenet_normalize``).

        Returns:
            One (B, C_i, H / s_i, W / s_i) contiguous map per level, in the order of
            ``strides`` (or ``out_indices``); sizes are rounded up for inputs not divisible by
            the stride.

        Raises:
            ConfigError: For runtime ``"openvino"`` with an input that is not on the CPU.
        """
        if self.trainable:
            features = self._run(image)
        else:
            with torch.no_grad():
                features = self._run(image)
        return [features[position] for position in self._order]

    def _run(self, image: torch.Tensor) -> list[torch.Tensor]:
        if (
            not _tracing()  # first: exporters must never see the size test below
            and self.runtime in (BackboneRuntime.EAGER, BackboneRuntime.CHANNELS_LAST)
            and not self.trainable
            and image.device.type == "cpu"
            and image.shape[0] > _CPU_MICRO_BATCH
        ):
            # Frozen torch backbones on a CPU run a few images at a time: the activations of
            # large batches outgrow the caches and the allocator's reusable blocks (each is
            # mapped and zeroed anew), which made batches of 16 two to five times slower per
            # image than batches of 4 at 256 px on a 2-core CPU.
            parts = [self._run_whole(part) for part in image.split(_CPU_MICRO_BATCH)]
            return [torch.cat(level) for level in zip(*parts, strict=True)]
        return self._run_whole(image)

    def _run_whole(self, image: torch.Tensor) -> list[torch.Tensor]:
        runtime = self.runtime
        if runtime is BackboneRuntime.EAGER or _tracing():
            # Exporters and torch.compile of a whole model trace plain torch operations.
            features: list[torch.Tensor] = self.model(image)
            return features
        if runtime is BackboneRuntime.CHANNELS_LAST:
            # Back to the default layout, so callers' .view() and exporters see what eager gives.
            features = self.model(image.contiguous(memory_format=torch.channels_last))
            return [feature.contiguous() for feature in features]
        runner = self._runners.get(runtime.value)
        if runner is None:
            if runtime is BackboneRuntime.COMPILE:
                runner = CompiledRunner(self.model)
            else:
                self._check_cpu(image.device)
                runner = OpenVinoRunner(self.model, image, self.runtime_threads)
            self._runners[runtime.value] = runner
        elif runtime is BackboneRuntime.OPENVINO:
            self._check_cpu(image.device)
        return runner(image)

    def _check_cpu(self, device: torch.device) -> None:
        if device.type != "cpu":
            msg = (
                f"backbone runtime 'openvino' runs on the CPU only, but got a tensor or module "
                f"on {str(device)!r}; keep the model on the CPU or use runtime 'eager'"
            )
            raise ConfigError(msg)

    def _weights_key(self) -> list[tuple[int, torch.dtype, torch.device]]:
        tensors = [*self.model.parameters(), *self.model.buffers()]
        return [(tensor.data_ptr(), tensor.dtype, tensor.device) for tensor in tensors]

    def _apply(self, fn: Callable[..., Any], recurse: bool = True) -> FeatureExtractor:
        # .to(), .cuda(), .double() and friends: compiled forms hold the old weights. Lightning
        # moves the model to its device before every fit and test; a move that changes nothing
        # keeps them.
        before = self._weights_key()
        super()._apply(fn, recurse)  # type: ignore[no-untyped-call]  # unannotated in torch
        if self._weights_key() != before:
            self._runners.clear()
        weight = next(self.model.parameters(), None)
        if self.runtime is BackboneRuntime.OPENVINO and weight is not None:
            self._check_cpu(weight.device)
        return self

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        # New weights: compiled forms made from the old ones are stale.
        self._runners.clear()
        super()._load_from_state_dict(*args, **kwargs)

    def __getstate__(self) -> dict[str, Any]:
        # Compiled forms are caches that cannot be pickled or deep-copied; they are rebuilt.
        state = dict(self.__dict__)
        state["_runners"] = {}
        return state
