"""``anomaly predict --model EXPORT SOURCE``: checkpoint-less prediction from the command line."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest
from PIL import Image

from anomaly._cli import main


def _results(out: Path) -> list[Path]:
    return sorted(path for path in out.glob("*") if path.is_dir()) if out.exists() else []


def _run_json(capsys: pytest.CaptureFixture[str], *args: str) -> dict:
    code = main(["predict", *args, "--json"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    return json.loads(captured.out)


def test_predict_a_folder_with_an_export(onnx_export, image_folder, tmp_path, capsys):
    out = tmp_path / "predictions"
    report = _run_json(capsys, "--model", str(onnx_export), "-o", str(out), str(image_folder))
    folder = Path(report["results_dir"])
    assert _results(out) == [folder]
    assert not list(out.glob(".*partial"))
    predictions = report["predictions"]
    assert [Path(row["image_path"]).parent.name for row in predictions] == ["bad"] * 2 + [
        "good"
    ] * 3
    assert [row["pred_label"] for row in predictions] == [1, 1, 0, 0, 0]
    with (folder / "predictions.csv").open(newline="") as handle:
        rows = list(csv.reader(handle))
    assert rows[0] == ["image_path", "pred_score", "pred_label", "gt_label"]
    assert len(rows) == 6
    assert json.loads((folder / "predictions.json").read_text()) == predictions
    # Core's image visualizer draws every prediction, named after the source.
    pictures = sorted(p.relative_to(folder / "images").as_posix() for p in folder.rglob("*.png"))
    assert pictures == [
        "bad/000.png",
        "bad/001.png",
        "good/000.png",
        "good/001.png",
        "good/002.png",
    ]


def test_predict_prints_a_summary_and_draws_a_progress_bar(
    openvino_export, image_folder, tmp_path, capsys
):
    out = tmp_path / "predictions"
    code = main(["predict", "--model", str(openvino_export), "-o", str(out), str(image_folder)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "5 images, 2 anomalous" in captured.out
    assert str(_results(out)[0]) in captured.out
    assert "predict" in captured.err
    assert "5/5" in captured.err


@pytest.mark.parametrize("fmt", ["onnx", "torch"])
def test_predict_a_video_file(fmt, video_file, tmp_path, capsys, request):
    export = request.getfixturevalue(f"{fmt}_export")
    out = tmp_path / "predictions"
    report = _run_json(
        capsys,
        "--model",
        str(export),
        "-o",
        str(out),
        "--batch-size",
        "4",
        "--device",
        "cpu",
        "--visualizer",
        "none",
        str(video_file),
    )
    rows = report["predictions"]
    assert [row["image_path"] for row in rows] == [f"frame:{i}" for i in range(6)]
    assert [row["pred_label"] for row in rows] == [0, 0, 0, 1, 1, 1]
    assert not (Path(report["results_dir"]) / "images").exists()


def test_predict_a_single_image_and_name_its_picture(onnx_export, image_folder, tmp_path, capsys):
    out = tmp_path / "predictions"
    image = image_folder / "bad" / "001.png"
    report = _run_json(
        capsys, "--model", str(onnx_export / "model.onnx"), "-o", str(out), str(image)
    )
    assert [row["image_path"] for row in report["predictions"]] == [str(image)]
    picture = Path(report["results_dir"]) / "images" / "bad" / "001.png"
    assert Image.open(picture).size[0] > 64  # four panels side by side


def _fails(capsys: pytest.CaptureFixture[str], args: list[str], out: Path, code: int = 1) -> str:
    result = main(["predict", *args, "-o", str(out)])
    captured = capsys.readouterr()
    assert result == code, captured.err
    assert "Traceback" not in captured.err
    assert _results(out) == []
    assert not list(out.glob(".*")) if out.exists() else True
    return captured.err


def test_exactly_one_of_ckpt_and_model(onnx_export, image_folder, tmp_path, capsys):
    out = tmp_path / "predictions"
    err = _fails(capsys, [str(image_folder)], out, code=2)
    assert "exactly one of --ckpt" in err
    err = _fails(
        capsys, ["--ckpt", "x.ckpt", "--model", str(onnx_export), str(image_folder)], out, code=2
    )
    assert "exactly one of --ckpt" in err


def test_bad_exports_fail_with_one_line(onnx_export, image_folder, tmp_path, capsys):
    out = tmp_path / "predictions"
    err = _fails(capsys, ["--model", str(tmp_path / "missing"), str(image_folder)], out)
    assert err.strip().splitlines() == [err.strip()]
    assert "ConfigError" in err
    assert "does not exist" in err

    broken = tmp_path / "broken"
    shutil.copytree(onnx_export, broken)
    (broken / "metadata.json").write_text("{corrupt")
    err = _fails(capsys, ["--model", str(broken), str(image_folder)], out)
    assert "ConfigError" in err
    assert "metadata.json" in err

    (broken / "metadata.json").write_text(json.dumps({"format": "checkpoint"}))
    err = _fails(capsys, ["--model", str(broken), str(image_folder)], out)
    assert "--ckpt" in err

    (broken / "metadata.json").write_text((onnx_export / "metadata.json").read_text())
    (broken / "model.onnx").write_bytes(b"not a graph")
    err = _fails(capsys, ["--model", str(broken), str(image_folder)], out)
    assert "ConfigError" in err
    assert "cannot load" in err

    err = _fails(capsys, ["--ckpt", str(onnx_export), str(image_folder)], out)
    assert "is a 'onnx' export; predict with --model" in err

    err = _fails(capsys, ["--ckpt", "model.ckpt", "--device", "tpu", str(image_folder)], out)
    assert "--device 'tpu' is not one of" in err

    err = _fails(capsys, ["--model", str(onnx_export), "--device", "tpu", str(image_folder)], out)
    assert "ConfigError" in err
    assert "device" in err


def test_bad_sources_fail_with_one_line_and_leave_nothing(
    onnx_export, image_folder, tmp_path, capsys
):
    out = tmp_path / "predictions"
    (tmp_path / "empty").mkdir()
    err = _fails(capsys, ["--model", str(onnx_export), str(tmp_path / "empty")], out)
    assert err.strip().splitlines() == [err.strip()]
    assert "DataError" in err
    assert "holds no images" in err

    mixed = tmp_path / "mixed"
    shutil.copytree(image_folder, mixed)
    (mixed / "zzz.png").write_bytes(b"\x89PNG broken")
    err = _fails(capsys, ["--model", str(onnx_export), str(mixed)], out)
    assert "DataError" in err
    assert "zzz.png" in err

    err = _fails(capsys, ["--model", str(onnx_export), "camera:42"], out)
    assert "DataError" in err
    assert "camera 42" in err

    err = _fails(capsys, ["--model", str(onnx_export), str(tmp_path / "nothing.png")], out)
    assert "DataError" in err
    assert "does not exist" in err
