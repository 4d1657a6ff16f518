"""Tiny exports in every format, built here, and small images for the inference tests.

The model is a few lines of torch that honour the export contract: input ``image`` (N, 3, H, W)
float32 in [0, 1] with dynamic N, H and W; inside, an antialiased bilinear resize to 32 x 32;
outputs ``pred_score`` (mean brightness), ``pred_label``, ``anomaly_map`` (the blurred channel
mean, resized back to H x W) and ``pred_mask``. Bright images are therefore "anomalous" and
bright regions light up the map, so expectations are easy to state.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
from PIL import Image

INPUT_SIZE = (32, 32)
OUTPUT_NAMES = ["pred_score", "pred_label", "anomaly_map", "pred_mask"]


def tiny_net() -> Any:
    """Return the contract-following torch module (torch imported here, not at collection)."""
    import torch
    import torch.nn.functional as F

    class TinyNet(torch.nn.Module):
        def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, ...]:
            height, width = image.shape[-2:]
            resized = F.interpolate(
                image, size=INPUT_SIZE, mode="bilinear", antialias=True, align_corners=False
            )
            gray = resized.mean(dim=1, keepdim=True)
            blurred = F.avg_pool2d(gray, 3, stride=1, padding=1, count_include_pad=False)
            anomaly_map = F.interpolate(
                blurred, size=(height, width), mode="bilinear", align_corners=False
            )[:, 0]
            score = resized.mean(dim=(1, 2, 3))
            return score, score >= 0.5, anomaly_map, anomaly_map >= 0.5

    return TinyNet().eval()


def reference(image: np.ndarray) -> tuple[float, np.ndarray]:
    """Score and map of the torch module for one (H, W, 3) uint8 image at its own size."""
    import torch

    batch = torch.from_numpy(image.astype(np.float32).transpose(2, 0, 1)[None] / 255.0)
    with torch.no_grad():
        score, _, anomaly_map, _ = tiny_net()(batch)
    return float(score[0]), anomaly_map[0].numpy()


def _metadata(fmt: str, model_file: str, runtime: dict[str, str]) -> dict[str, Any]:
    height, width = INPUT_SIZE
    return {
        "schema_version": 1,
        "format": fmt,
        "model": "tiny",
        "model_file": model_file,
        "input": {
            "height": height,
            "width": width,
            "channels": "RGB",
            "range": [0.0, 1.0],
            "resize": "bilinear",
            "normalization": "inside the model",
        },
        "post_processing": {
            "image_threshold": 0.5,
            "pixel_threshold": 0.5,
            "image_min": 0.0,
            "image_max": 1.0,
            "pixel_min": 0.0,
            "pixel_max": 1.0,
            "normalized_threshold": 0.5,
        },
        "precision": "fp32",
        "inputs": {"image": "float32 N x 3 x H x W RGB in [0, 1], any N, H, W"},
        "outputs": OUTPUT_NAMES,
        "versions": runtime,
    }


def _write_metadata(folder: Path, fmt: str, model_file: str, runtime: dict[str, str]) -> None:
    text = json.dumps(_metadata(fmt, model_file, runtime), indent=2)
    (folder / "metadata.json").write_text(text, encoding="utf-8")


def _example() -> Any:
    import torch

    return torch.rand(2, 3, 40, 48, generator=torch.Generator().manual_seed(0))


def tiny_onnx_model() -> Any:
    """Return the tiny model as an ONNX graph (opset 18), written node by node.

    Writing it by hand takes milliseconds where ``torch.onnx.export`` takes seconds; the
    nodes are what that exporter emits for the torch module (checked against it in tests).
    """
    import onnx
    from onnx import TensorProto, helper

    def const(name: str, values: list[int] | list[float], dtype: int) -> onnx.NodeProto:
        tensor = helper.make_tensor(name, dtype, [len(values)], values)
        return helper.make_node("Constant", [], [name], value=tensor)

    int64, float32 = TensorProto.INT64, TensorProto.FLOAT
    resize = {"mode": "linear", "coordinate_transformation_mode": "half_pixel"}
    nodes = [
        const("two", [2], int64),
        const("four", [4], int64),
        const("zero", [0], int64),
        const("one", [1], int64),
        const("model_size", list(INPUT_SIZE), int64),
        const("channel_axis", [1], int64),
        const("all_axes", [1, 2, 3], int64),
        const("half", [0.5], float32),
        helper.make_node("Shape", ["image"], ["shape"]),
        helper.make_node("Slice", ["shape", "zero", "two"], ["batch_channels"]),
        helper.make_node("Slice", ["shape", "zero", "one"], ["batch"]),
        helper.make_node("Slice", ["shape", "two", "four"], ["height_width"]),
        helper.make_node("Concat", ["batch_channels", "model_size"], ["in_sizes"], axis=0),
        helper.make_node(
            "Resize",
            ["image", "", "", "in_sizes"],
            ["resized"],
            antialias=1,
            exclude_outside=1,
            **resize,
        ),
        helper.make_node("ReduceMean", ["resized", "channel_axis"], ["gray"], keepdims=1),
        helper.make_node(
            "AveragePool",
            ["gray"],
            ["blurred"],
            kernel_shape=[3, 3],
            strides=[1, 1],
            pads=[1, 1, 1, 1],
            count_include_pad=0,
        ),
        helper.make_node("Concat", ["batch", "one", "height_width"], ["out_sizes"], axis=0),
        helper.make_node("Resize", ["blurred", "", "", "out_sizes"], ["map4d"], **resize),
        helper.make_node("Squeeze", ["map4d", "channel_axis"], ["anomaly_map"]),
        helper.make_node("ReduceMean", ["resized", "all_axes"], ["pred_score"], keepdims=0),
        helper.make_node("GreaterOrEqual", ["pred_score", "half_scalar"], ["pred_label"]),
        helper.make_node("GreaterOrEqual", ["anomaly_map", "half_scalar"], ["pred_mask"]),
        helper.make_node("Squeeze", ["half"], ["half_scalar"]),
    ]
    # Topological order: the scalar threshold before its users.
    nodes.insert(len(nodes) - 3, nodes.pop())
    graph = helper.make_graph(
        nodes,
        "tiny",
        [helper.make_tensor_value_info("image", float32, ["N", 3, "H", "W"])],
        [
            helper.make_tensor_value_info("pred_score", float32, ["N"]),
            helper.make_tensor_value_info("pred_label", TensorProto.BOOL, ["N"]),
            helper.make_tensor_value_info("anomaly_map", float32, ["N", "H", "W"]),
            helper.make_tensor_value_info("pred_mask", TensorProto.BOOL, ["N", "H", "W"]),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


@pytest.fixture(scope="session")
def onnx_export(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An ONNX export folder of the tiny model (model.onnx + metadata.json)."""
    import onnx

    folder = tmp_path_factory.mktemp("export_onnx")
    onnx.save(tiny_onnx_model(), str(folder / "model.onnx"))
    _write_metadata(folder, "onnx", "model.onnx", {"onnx": onnx.__version__})
    return folder


@pytest.fixture(scope="session")
def openvino_export(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An OpenVINO IR export folder of the tiny model (model.xml/.bin + metadata.json).

    Converted from the torch module, not from the ONNX file: OpenVINO's ONNX front end
    computes antialiased resizes differently from torch and ONNX Runtime.
    """
    import openvino as ov

    folder = tmp_path_factory.mktemp("export_openvino")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = ov.convert_model(
            tiny_net(),
            example_input=_example(),
            input=[("image", ov.PartialShape([-1, 3, -1, -1]), ov.Type.f32)],
        )
    for port, name in zip(model.outputs, OUTPUT_NAMES, strict=True):
        port.get_tensor().set_names({name})
    ov.save_model(model, str(folder / "model.xml"), compress_to_fp16=False)
    _write_metadata(folder, "openvino", "model.xml", {"openvino": ov.__version__})
    return folder


@pytest.fixture(scope="session")
def torch_export(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A torch export folder of the tiny model (model.pt2 + metadata.json)."""
    import torch
    from torch.export import Dim

    folder = tmp_path_factory.mktemp("export_torch")
    program = torch.export.export(
        tiny_net(),
        (_example(),),
        dynamic_shapes={"image": {0: Dim.DYNAMIC, 2: Dim.DYNAMIC, 3: Dim.DYNAMIC}},
    )
    torch.export.save(program, folder / "model.pt2")
    _write_metadata(folder, "torch", "model.pt2", {"torch": torch.__version__})
    return folder


@pytest.fixture(params=["onnx", "openvino", "torch"])
def export_folder(request: pytest.FixtureRequest) -> tuple[str, Path]:
    """Each export format in turn: ``(format, folder)``."""
    fmt: str = request.param
    return fmt, request.getfixturevalue(f"{fmt}_export")


def make_image(brightness: float, size: tuple[int, int], seed: int = 0) -> np.ndarray:
    """Return an (H, W, 3) uint8 image of about ``brightness`` with mild noise."""
    rng = np.random.default_rng(seed)
    values = brightness + 0.05 * rng.standard_normal((*size, 3))
    return np.clip(np.round(values * 255.0), 0, 255).astype(np.uint8)


def make_half_bright(size: tuple[int, int]) -> np.ndarray:
    """Return a dark image whose right half is bright: a partial mask, a mid score."""
    image = make_image(0.15, size, seed=3)
    image[:, size[1] // 2 :] = make_image(0.9, size, seed=4)[:, size[1] // 2 :]
    return image


@pytest.fixture(scope="session")
def image_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder of 48 x 64 PNGs in two subfolders, plus files a folder source must skip.

    ``good/`` holds dark images (normal), ``bad/`` bright and half-bright ones (anomalous);
    a hidden file, a hidden folder and a text file sit alongside.
    """
    root = tmp_path_factory.mktemp("images")
    (root / "good").mkdir()
    (root / "bad").mkdir()
    (root / ".cache").mkdir()
    for index in range(3):
        Image.fromarray(make_image(0.2, (48, 64), seed=index)).save(root / f"good/{index:03d}.png")
    Image.fromarray(make_image(0.85, (48, 64), seed=10)).save(root / "bad/000.png")
    Image.fromarray(make_half_bright((48, 64))).save(root / "bad/001.png")
    Image.fromarray(make_image(0.5, (48, 64))).save(root / ".hidden.png")
    Image.fromarray(make_image(0.5, (48, 64))).save(root / ".cache/skipped.png")
    (root / "notes.txt").write_text("not an image", encoding="utf-8")
    return root


def write_video(path: Path, frames: list[np.ndarray], fps: float = 5.0) -> Path:
    """Write RGB frames as a video OpenCV reads back (MJPG in .avi, mp4v in .mp4)."""
    import cv2

    height, width = frames[0].shape[:2]
    codec = "MJPG" if path.suffix == ".avi" else "mp4v"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter.fourcc(*codec), fps, (width, height))
    assert writer.isOpened(), f"OpenCV cannot write {path.suffix} here"
    for frame in frames:
        writer.write(cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))
    writer.release()
    return path


@pytest.fixture(scope="session")
def video_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 6-frame 48 x 64 .avi: three dark frames, then three bright ones."""
    frames = [make_image(0.15 if i < 3 else 0.85, (48, 64), seed=i) for i in range(6)]
    return write_video(tmp_path_factory.mktemp("video") / "clip.avi", frames)


@pytest.fixture(scope="session")
def helpers() -> SimpleNamespace:
    """The helpers above, for tests: ``make_image``, ``make_half_bright``, ``reference``,
    ``write_video``, ``tiny_net``."""
    return SimpleNamespace(
        make_image=make_image,
        make_half_bright=make_half_bright,
        reference=reference,
        write_video=write_video,
        tiny_net=tiny_net,
        tiny_onnx_model=tiny_onnx_model,
    )
