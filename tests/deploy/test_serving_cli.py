"""``anomaly serve`` and ``anomaly gradio`` through core's CLI: errors, options, a real run."""

from __future__ import annotations

import io
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import uvicorn
from PIL import Image

from anomaly._cli import main
from anomaly_deploy import cli

COMMANDS = ["serve", "gradio"]


@dataclass(frozen=True)
class FakePrediction:
    pred_score: float
    pred_label: bool
    anomaly_map: np.ndarray
    pred_mask: np.ndarray


class FakeInferencer:
    metadata: dict[str, Any] = {"model": "fake_model", "format": "onnx", "precision": "int8"}  # noqa: RUF012

    def predict(self, image: np.ndarray) -> FakePrediction:
        anomaly_map = image.astype(np.float32).mean(axis=2) / 255.0
        score = float(anomaly_map.mean())
        return FakePrediction(score, score >= 0.5, anomaly_map, anomaly_map >= 0.5)


@pytest.fixture
def fake_loader(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, str]]:
    """Make the commands load a fake instead of an export; record what they were asked for."""
    calls: list[tuple[str, str]] = []

    def load(artefact: str, device: str) -> FakeInferencer:
        calls.append((artefact, device))
        return FakeInferencer()

    monkeypatch.setattr(cli, "_load_inferencer", load)
    return calls


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def png(value: int, size: tuple[int, int] = (24, 32)) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.full((*size, 3), value, dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


# --- help and errors ------------------------------------------------------------------------


@pytest.mark.parametrize(("command", "port"), [("serve", "8000"), ("gradio", "7860")])
def test_help_shows_defaults_and_warns_about_0_0_0_0(
    capsys: pytest.CaptureFixture[str], command: str, port: str
) -> None:
    code, out, _ = run(capsys, command, "--help")

    assert code == 0
    flat = " ".join(out.split())
    assert "EXPORT_FOLDER" in flat
    assert "[default: 127.0.0.1]" in flat
    assert f"[default: {port};" in flat
    assert "0.0.0.0 exposes the service" in flat
    assert "--max-upload-mb" in flat
    assert "--share" not in flat


@pytest.mark.parametrize("command", COMMANDS)
def test_missing_export_folder_is_one_red_line(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, command: str
) -> None:
    missing = tmp_path / "no_export"

    code, out, err = run(capsys, command, str(missing))

    assert code == 1
    assert out == ""
    assert err.strip().splitlines() == [
        f"ConfigError: export folder {str(missing)!r} does not exist; create one with "
        f"'anomaly export --ckpt MODEL.ckpt --format onnx' and pass its path"
    ]


@pytest.mark.parametrize("command", COMMANDS)
def test_broken_export_folder_is_one_red_line(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, command: str
) -> None:
    (tmp_path / "metadata.json").write_text("{not json", encoding="utf-8")

    code, out, err = run(capsys, command, str(tmp_path))

    assert code == 1
    assert "Traceback" not in out + err
    (line,) = err.strip().splitlines()
    assert line.startswith("ConfigError: ")
    assert "metadata.json" in line


@pytest.mark.enable_socket
@pytest.mark.parametrize("command", COMMANDS)
def test_busy_port_is_one_red_line(
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    fake_loader: list[tuple[str, str]],
    command: str,
) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]

        code, _, err = run(capsys, command, str(tmp_path), "--port", str(port), "--device", "GPU")

    assert code == 1
    assert fake_loader == [(str(tmp_path), "GPU")]
    (line,) = err.strip().splitlines()
    assert line.startswith(f"ConfigError: cannot listen on 127.0.0.1:{port} (")
    assert line.endswith("pick another --port or --host")


@pytest.mark.parametrize("value", ["0", "-1", "abc"])
def test_bad_upload_limit_is_a_usage_error(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, value: str
) -> None:
    code, _, err = run(capsys, "serve", str(tmp_path), "--max-upload-mb", value)

    assert code == 2
    assert "--max-upload-mb" in err


# --- a real run -----------------------------------------------------------------------------


@pytest.fixture
def captured_servers(monkeypatch: pytest.MonkeyPatch) -> list[uvicorn.Server]:
    """Keep every uvicorn.Server the command builds, so the test can stop it."""
    servers: list[uvicorn.Server] = []
    original = uvicorn.Server.__init__

    def init(self: uvicorn.Server, config: uvicorn.Config) -> None:
        original(self, config)
        servers.append(self)

    monkeypatch.setattr(uvicorn.Server, "__init__", init)
    return servers


@pytest.mark.enable_socket
def test_serve_runs_until_stopped_with_its_options(
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    fake_loader: list[tuple[str, str]],
    captured_servers: list[uvicorn.Server],
) -> None:
    port = free_port()
    codes: list[int] = []
    argv = ["serve", str(tmp_path), "--port", str(port), "--max-upload-mb", "0.01"]
    thread = threading.Thread(target=lambda: codes.append(main(argv)), daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not (captured_servers and captured_servers[0].started):
        assert thread.is_alive(), capsys.readouterr().err
        assert time.monotonic() < deadline
        time.sleep(0.02)
    try:
        url = f"http://127.0.0.1:{port}"
        health = httpx.get(f"{url}/health", timeout=10)
        small = httpx.post(f"{url}/predict", files={"file": ("a.png", png(250))}, timeout=10)
        large = httpx.post(
            f"{url}/predict", files={"file": ("b.png", os.urandom(20_000))}, timeout=10
        )
    finally:
        captured_servers[0].should_exit = True
        thread.join(30)

    assert codes == [0]
    assert fake_loader == [(str(tmp_path), "CPU")]
    assert health.json() == {
        "status": "ok",
        "model": "fake_model",
        "format": "onnx",
        "precision": "int8",
    }
    assert small.json()["label"] == "anomalous"
    assert large.status_code == 413
    assert "0.01 MiB" in large.json()["detail"]
    err = " ".join(capsys.readouterr().err.split())
    assert f"Serving fake_model (onnx, int8) on http://127.0.0.1:{port}" in err
    assert "Traceback" not in err


@pytest.fixture
def serve_process(onnx_export: Path) -> Iterator[tuple[subprocess.Popen[str], str]]:
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "anomaly", "serve", str(onnx_export), "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "NO_COLOR": "1", "COLUMNS": "200"},
    )
    try:
        yield process, f"http://127.0.0.1:{port}"
    finally:
        if process.poll() is None:
            process.kill()
        process.communicate(timeout=30)


@pytest.mark.enable_socket
def test_anomaly_serve_serves_a_real_onnx_export(
    serve_process: tuple[subprocess.Popen[str], str], helpers: Any
) -> None:
    process, url = serve_process
    deadline = time.monotonic() + 90
    health = None
    while health is None:
        assert process.poll() is None, process.communicate()[1]
        assert time.monotonic() < deadline, "anomaly serve did not answer within 90 s"
        try:
            health = httpx.get(f"{url}/health", timeout=5)
        except httpx.TransportError:
            time.sleep(0.2)
    bright = helpers.make_image(0.85, (48, 64), seed=1)
    buffer = io.BytesIO()
    Image.fromarray(bright).save(buffer, format="PNG")

    response = httpx.post(f"{url}/predict", files={"file": ("b.png", buffer.getvalue())})
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=30)

    assert health.json() == {"status": "ok", "model": "tiny", "format": "onnx", "precision": "fp32"}
    body = response.json()
    assert body["label"] == "anomalous"
    assert body["pred_score"] == pytest.approx(helpers.reference(bright)[0], abs=1e-4)
    assert body["image_size"] == {"height": 48, "width": 64}
    assert process.returncode in {0, 130}
    assert "Traceback" not in err


@pytest.mark.parametrize("command", COMMANDS)
def test_unusable_device_is_one_red_line(
    capsys: pytest.CaptureFixture[str], onnx_export: Path, command: str
) -> None:
    code, out, err = run(capsys, command, str(onnx_export), "--device", "TPU")

    assert code == 1
    assert "Traceback" not in out + err
    (line,) = err.strip().splitlines()
    assert line.startswith("ConfigError: ")
    assert "'TPU'" in line
