"""The serving modules import, and build an app, with torch, Lightning and core unimportable."""

from __future__ import annotations

import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent(
    """
    import importlib.abc
    import sys

    BLOCKED = {"torch", "torchvision", "lightning", "pytorch_lightning", "timm", "anomaly"}
    attempts = []


    class Refuse(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.partition(".")[0] in BLOCKED:
                attempts.append(name)
                raise ImportError(f"{name} is blocked in this test")
            return None


    sys.meta_path.insert(0, Refuse())

    import numpy as np

    import anomaly_deploy.serve.gradio_ui
    from anomaly_deploy.serve.http import create_app


    class Fake:
        metadata = {"model": "fake", "format": "onnx", "precision": "fp32"}

        def predict(self, image):
            raise AssertionError("not called")


    app = create_app(Fake())
    paths = sorted(app.openapi()["paths"])
    loaded = sorted(name for name in sys.modules if name.partition(".")[0] in BLOCKED)
    print(paths, loaded, sorted(set(attempts)))

    try:
        import torch  # the blocker must really block, or this test proves nothing
    except ImportError as err:
        print(err)
    """
)


def test_serving_imports_without_torch_lightning_or_core() -> None:
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=120, check=False
    )

    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        "['/health', '/predict'] [] []",
        "torch is blocked in this test",
    ]
