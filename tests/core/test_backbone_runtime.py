"""Backbone runtimes: channels-last, torch.compile and OpenVINO give eager's features."""

from __future__ import annotations

import copy
import importlib.util
import io
import logging
import os

import pytest
import torch

from anomaly import ConfigError
from anomaly.backbones import BackboneRuntime, FeatureExtractor, _runtime

# Out of order on purpose: every runtime must return the levels in the requested order.
STRIDES = (8, 4)
SHAPES = [(1, 3, 64, 64), (3, 3, 96, 64)]
HAS_OPENVINO = importlib.util.find_spec("openvino") is not None
needs_openvino = pytest.mark.skipif(not HAS_OPENVINO, reason="openvino is not installed")


def _extractor(runtime: str = "eager", **options: object) -> FeatureExtractor:
    torch.manual_seed(0)  # random weights, the same for every runtime
    return FeatureExtractor(
        "efficientnet_lite0",
        STRIDES,
        pretrained=False,
        runtime=runtime,
        **options,  # type: ignore[arg-type]
    )


def _assert_same_features(got: list[torch.Tensor], want: list[torch.Tensor]) -> None:
    assert len(got) == len(want)
    for mine, reference in zip(got, want, strict=True):
        assert mine.shape == reference.shape
        assert mine.dtype == reference.dtype
        assert mine.is_contiguous()
        scale = float(reference.abs().max())
        torch.testing.assert_close(mine, reference, rtol=0, atol=1e-4 * scale)


@pytest.fixture(scope="module")
def eager() -> FeatureExtractor:
    return _extractor()


@pytest.fixture(scope="module")
def openvino_extractor() -> FeatureExtractor:
    return _extractor("openvino", runtime_threads=2)


@pytest.fixture(scope="module")
def channels_last() -> FeatureExtractor:
    return _extractor("channels_last")


@pytest.mark.parametrize("shape", SHAPES, ids=["b1_64x64", "b3_96x64"])
@pytest.mark.parametrize(
    "runtime", ["channels_last", pytest.param("openvino", marks=needs_openvino)]
)
def test_runtimes_give_eager_features(
    runtime: str, shape: tuple[int, ...], eager: FeatureExtractor, request: pytest.FixtureRequest
) -> None:
    fast = request.getfixturevalue("openvino_extractor" if runtime == "openvino" else runtime)
    assert fast.runtime is BackboneRuntime(runtime)
    image = torch.randn(shape, generator=torch.Generator().manual_seed(len(shape) + shape[0]))
    features = fast(image)
    _assert_same_features(features, eager(image))
    assert [feature.shape[1] for feature in features] == [40, 24]


def test_channels_last_weights_and_state_dict(
    channels_last: FeatureExtractor, eager: FeatureExtractor
) -> None:
    conv = next(module for module in channels_last.modules() if isinstance(module, torch.nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    assert list(channels_last.state_dict()) == list(eager.state_dict())


@needs_openvino
def test_openvino_model_stays_out_of_state_dict_and_pickles(
    openvino_extractor: FeatureExtractor, eager: FeatureExtractor
) -> None:
    image = torch.rand(2, 3, 64, 64)
    openvino_extractor(image)  # builds the OpenVINO model
    assert "openvino" in openvino_extractor._runners
    compiled = openvino_extractor._runners["openvino"].compiled  # type: ignore[attr-defined]
    assert int(compiled.get_property("INFERENCE_NUM_THREADS")) == 2
    assert list(openvino_extractor.state_dict()) == list(eager.state_dict())
    openvino_extractor.to("cpu")  # as Lightning does before each fit and test: no new weights
    assert "openvino" in openvino_extractor._runners
    assert copy.deepcopy(openvino_extractor)._runners == {}
    buffer = io.BytesIO()
    torch.save(openvino_extractor, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert loaded._runners == {}
    assert loaded.runtime is BackboneRuntime.OPENVINO
    _assert_same_features(loaded(image), eager(image))  # converted afresh


@needs_openvino
def test_openvino_follows_loaded_weights() -> None:
    extractor = _extractor("openvino")
    image = torch.rand(1, 3, 64, 64)
    before = extractor(image)
    other = FeatureExtractor("efficientnet_lite0", STRIDES, pretrained=False)  # other weights
    extractor.load_state_dict(other.state_dict())
    assert extractor._runners == {}  # the converted model had the old weights
    after = extractor(image)
    _assert_same_features(after, other(image))
    assert not torch.allclose(after[0], before[0])


@needs_openvino
def test_openvino_refuses_other_devices(openvino_extractor: FeatureExtractor) -> None:
    with pytest.raises(ConfigError, match=r"'openvino' runs on the CPU only.*'meta'"):
        openvino_extractor(torch.empty(1, 3, 64, 64, device="meta"))
    moved = copy.deepcopy(openvino_extractor)
    with pytest.raises(ConfigError, match=r"CPU only.*use runtime 'eager'"):
        moved.to("meta")


@needs_openvino
def test_tracing_sees_plain_torch(openvino_extractor: FeatureExtractor) -> None:
    # Exporters trace the model: the traced graph must hold torch operations, not OpenVINO.
    image = torch.rand(1, 3, 32, 32)
    traced = torch.jit.trace(openvino_extractor, image)  # type: ignore[no-untyped-call]
    assert any(node.kind() == "aten::_convolution" for node in traced.inlined_graph.nodes())
    _assert_same_features(traced(image), openvino_extractor(image))


def test_frozen_features_have_no_graph_and_stay_ordinary_tensors(
    eager: FeatureExtractor,
) -> None:
    image = torch.rand(1, 3, 64, 64, requires_grad=True)
    features = eager(image)
    assert all(not feature.requires_grad for feature in features)
    # Ordinary tensors: trainable heads can save them for backward, buffers can hold them.
    assert all(not feature.is_inference() for feature in features)
    head = torch.nn.Conv2d(40, 1, 1)
    head(features[0]).sum().backward()
    assert head.weight.grad is not None


def test_trainable_channels_last_trains() -> None:
    extractor = _extractor("channels_last", trainable=True)
    extractor.train()
    assert extractor.training
    features = extractor(torch.rand(2, 3, 32, 32))
    sum(feature.mean() for feature in features).backward()
    grads = [weight.grad for weight in extractor.parameters()]
    assert all(grad is not None for grad in grads)


@pytest.mark.parametrize("runtime", ["compile", "openvino"])
def test_trainable_backbones_refuse_compiled_runtimes(runtime: str) -> None:
    with pytest.raises(ConfigError, match=r"only runs frozen backbones.*trainable=True"):
        _extractor(runtime, trainable=True)


@pytest.mark.parametrize(
    ("runtime", "match"),
    [
        ("openvno", r"unknown backbone runtime 'openvno'; did you mean 'openvino'\?"),
        ("channel_last", r"did you mean 'channels_last'\?"),
        ("tensorrt", r"'tensorrt'; choose one of \['eager', 'channels_last'"),
    ],
)
def test_bad_runtime_names(runtime: str, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        _extractor(runtime)


@pytest.mark.parametrize(("runtime", "threads"), [("eager", 2), ("openvino", 0), ("openvino", 1.5)])
def test_bad_runtime_threads(runtime: str, threads: object) -> None:
    if runtime == "openvino" and not HAS_OPENVINO:
        pytest.skip("openvino is not installed")
    with pytest.raises(ConfigError, match=r"runtime_threads .* needs runtime 'openvino'"):
        _extractor(runtime, runtime_threads=threads)


def test_missing_openvino_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec

    def find_spec(name: str, *args: object) -> object:
        return None if name == "openvino" else real(name, *args)  # type: ignore[arg-type]

    monkeypatch.setattr("importlib.util.find_spec", find_spec)
    with pytest.raises(ConfigError, match=r"pip install openvino.*or use runtime 'eager'"):
        _extractor("openvino")


@pytest.mark.parametrize("stage", ["build", "call"])
def test_failed_compilation_falls_back_to_eager_with_one_warning(
    stage: str,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    eager: FeatureExtractor,
) -> None:
    def broken_compile(model: torch.nn.Module) -> object:
        def run(image: torch.Tensor) -> list[torch.Tensor]:
            raise RuntimeError(msg)

        msg = "no C++ compiler found"
        if stage == "build":
            raise RuntimeError(msg)
        return run

    monkeypatch.setattr("torch.compile", broken_compile)
    monkeypatch.setattr(_runtime, "_warned", set())
    image = torch.rand(1, 3, 64, 64)
    with caplog.at_level(logging.WARNING, logger="anomaly.backbones._runtime"):
        first = _extractor("compile")
        _assert_same_features(first(image), eager(image))
        _assert_same_features(first(image), eager(image))
        _assert_same_features(_extractor("compile")(image), eager(image))
    warnings = [record for record in caplog.records if record.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "torch.compile of the backbone failed (RuntimeError: no C++ compiler found)" in (
        warnings[0].getMessage()
    )


@pytest.mark.skipif(
    os.environ.get("ANOMALY_TEST_COMPILE") != "1",
    reason=(
        "torch.compile of a backbone takes minutes on a small CPU (over 60 s on 2 cores), too "
        "slow for the suite; set ANOMALY_TEST_COMPILE=1 to run it"
    ),
)
def test_compile_gives_eager_features(eager: FeatureExtractor) -> None:
    compiled = _extractor("compile")
    for shape in SHAPES:
        image = torch.randn(shape)
        _assert_same_features(compiled(image), eager(image))
    runner = compiled._runners["compile"]
    assert not runner.failed  # type: ignore[attr-defined]
    assert list(compiled.state_dict()) == list(eager.state_dict())
