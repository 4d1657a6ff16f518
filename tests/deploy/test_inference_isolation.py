"""The inference path runs with torch, Lightning, timm and core blocked from importing."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

BLOCKED = ("torch", "lightning", "timm", "torchvision", "anomaly")

_SCRIPT = textwrap.dedent(
    """
    import importlib.abc
    import json
    import sys

    BLOCKED = {blocked!r}


    class Refuse(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                raise ImportError(f"{{name}} is blocked on the inference path")
            return None


    sys.meta_path.insert(0, Refuse())

    import numpy as np

    from anomaly_deploy.inference import PredictionWriter, load_inferencer, render

    onnx_folder, openvino_folder, image_folder, out = sys.argv[1:5]
    report = {{}}
    for folder in (onnx_folder, openvino_folder):
        inferencer = load_inferencer(folder)
        one = inferencer.predict(image_folder + "/bad/000.png")
        many = list(inferencer.predict_source(image_folder, batch_size=2))
        array = inferencer.predict(np.full((24, 40, 3), 200, dtype=np.uint8))
        assert render(one).ndim == 3
        with PredictionWriter(out + "/" + inferencer.format) as writer:
            for prediction in many:
                writer.write(prediction)
        report[inferencer.format] = [one.pred_score, len(many), array.pred_label]
    report["leaked"] = sorted(
        name for name in sys.modules if name.split(".")[0] in BLOCKED
    )
    print(json.dumps(report))
    """
)


def _run(code: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", code, *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_inference_runs_with_torch_and_core_blocked(
    onnx_export, openvino_export, image_folder, tmp_path
):
    script = _SCRIPT.format(blocked=BLOCKED)
    result = _run(script, str(onnx_export), str(openvino_export), str(image_folder), str(tmp_path))
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["leaked"] == []
    assert report["onnx"][1] == report["openvino"][1] == 5
    assert report["onnx"][0] > 0.5
    assert report["openvino"][0] > 0.5
    assert report["onnx"][2] is True  # a bright array is anomalous for the tiny model
    assert (tmp_path / "onnx" / "predictions.csv").is_file()
    assert len(list((tmp_path / "openvino" / "images").rglob("*.png"))) == 5


def test_the_blocker_really_blocks():
    script = _SCRIPT.format(blocked=BLOCKED).split("import numpy as np")[0] + "import torch\n"
    result = _run(script)
    assert result.returncode != 0
    assert "torch is blocked on the inference path" in result.stderr


def test_importing_the_package_and_its_errors_is_light():
    code = textwrap.dedent(
        """
        import json, sys
        import anomaly_deploy
        import anomaly_deploy.errors
        from anomaly_deploy import DeployError
        assert issubclass(anomaly_deploy.InputError, DeployError)
        light = sorted(name for name in sys.modules if name.split(".")[0] in {blocked!r})
        runtimes = sorted(
            name for name in ("onnxruntime", "openvino", "cv2", "numpy") if name in sys.modules
        )
        import anomaly_deploy.inference
        print(json.dumps({{
            "light": light,
            "runtimes": runtimes,
            "inference": sorted(
                name for name in sys.modules if name.split(".")[0] in {blocked!r}
            ),
        }}))
        """
    ).format(blocked=BLOCKED)
    result = _run(code)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report == {"light": [], "runtimes": [], "inference": []}
