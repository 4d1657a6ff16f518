"""The default job (``anomaly run`` on the built-in demo) and runs on the real photographs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from anomaly._cli import main

MTD = Path(__file__).resolve().parents[2].parent / "shared" / "datasets" / "mtd"


def test_default_run_on_the_demo(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("ANOMALY_CACHE_DIR", str(tmp_path / "cache"))
    # The default job, at a smaller image size to keep the suite fast.
    code = main(["run", "--data.image_size", "128", "--results_dir", str(tmp_path / "r"), "--json"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    report = json.loads(captured.out)
    assert report["model"] == "patchcore"
    assert report["data"] == "demo"
    assert report["metrics"]["image_auroc"] > 0.9
    assert report["metrics"]["pixel_auroc"] > 0.9
    assert Path(report["exports"]["torch"]).is_dir()


def test_console_script_reports_errors_without_traceback(tmp_path):
    env = {**os.environ, "NO_COLOR": "1"}
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "anomaly",
            "run",
            "--data",
            "folder",
            "--data.root",
            str(tmp_path / "x"),
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        check=False,
        timeout=120,
    )
    assert done.returncode == 1
    assert "DataError" in done.stderr
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "results").exists()


@pytest.mark.slow
@pytest.mark.skipif(not MTD.is_dir(), reason=f"real magnetic-tile photographs not found at {MTD}")
def test_patchcore_on_real_magnetic_tiles(tmp_path, capsys):
    code = main(
        [
            "run",
            "--data",
            "mvtec_ad",
            "--data.root",
            str(MTD),
            "--data.category",
            "magnetic_tile",
            "--data.image_size",
            "128",
            "--visualizer",
            "null",
            "--export.formats",
            "[]",
            "--results_dir",
            str(tmp_path),
            "--json",
        ]
    )
    captured = capsys.readouterr()
    assert code == 0, captured.err
    report = json.loads(captured.out)
    assert report["train_images"] == 761
    assert report["metrics"]["image_auroc"] > 0.8
    assert (
        report["metrics"]["pixel_auroc"] > 0.7
    )  # large, subtle "uneven" defects keep pixel AUROC modest on this data
