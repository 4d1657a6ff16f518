"""``anomaly_deploy.serve.http`` served by a real uvicorn on 127.0.0.1, over real connections.

A small fake inferencer stands in for an export (the app takes any object with ``predict`` and
``metadata``): bright images are anomalous, dark ones normal, and the anomaly map is the
brightness, so every number in a response can be checked.
"""

from __future__ import annotations

import base64
import contextlib
import io
import os
import socket
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import uvicorn
from PIL import Image

from anomaly_deploy.serve._common import decode_image, heatmap_overlay
from anomaly_deploy.serve.http import DEFAULT_MAX_UPLOAD_BYTES, create_app

# Every test here talks to a server on 127.0.0.1; pytest-socket blocks sockets elsewhere.
pytestmark = pytest.mark.enable_socket

LIMIT = 4 * 1024 * 1024  # above Starlette's 1 MiB spooling threshold, to prove nothing spools
MAX_PIXELS = 1_000_000
SERVER_THREAD = "uvicorn-under-test"


@dataclass(frozen=True)
class FakePrediction:
    pred_score: float
    pred_label: bool
    anomaly_map: np.ndarray
    pred_mask: np.ndarray
    image: np.ndarray
    source: str = "array"


@dataclass
class FakeInferencer:
    """Scores brightness; records what it was given and in which thread."""

    metadata: dict[str, Any] = field(
        default_factory=lambda: {"model": "fake_model", "format": "onnx", "precision": "fp32"}
    )
    images: list[np.ndarray] = field(default_factory=list)
    threads: list[str] = field(default_factory=list)

    def predict(self, image: np.ndarray) -> FakePrediction:
        self.images.append(image.copy())
        self.threads.append(threading.current_thread().name)
        return fake_prediction(image)


def fake_prediction(image: np.ndarray) -> FakePrediction:
    anomaly_map = image.astype(np.float32).mean(axis=2) / 255.0
    score = float(anomaly_map.mean())
    return FakePrediction(score, score >= 0.5, anomaly_map, anomaly_map >= 0.5, image)


@contextlib.contextmanager
def running_server(app: Any) -> Iterator[str]:
    """Run ``app`` with uvicorn in a thread on a free 127.0.0.1 port; yield its base URL."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
    thread = threading.Thread(
        target=server.run, kwargs={"sockets": [sock]}, name=SERVER_THREAD, daemon=True
    )
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive(), "uvicorn stopped during start-up"
        assert time.monotonic() < deadline, "uvicorn did not start within 30 s"
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()


@pytest.fixture(scope="module")
def fake() -> FakeInferencer:
    return FakeInferencer()


@pytest.fixture(scope="module")
def base_url(fake: FakeInferencer) -> Iterator[str]:
    app = create_app(fake, max_upload_bytes=LIMIT, max_pixels=MAX_PIXELS)
    with running_server(app) as url:
        yield url


@pytest.fixture
def client(base_url: str, fake: FakeInferencer) -> Iterator[httpx.Client]:
    fake.images.clear()
    fake.threads.clear()
    with httpx.Client(base_url=base_url, timeout=30) as http:
        yield http


def encode(array: np.ndarray, fmt: str = "PNG", **options: Any) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format=fmt, **options)
    return buffer.getvalue()


def decode_png(text: str) -> np.ndarray:
    data = base64.b64decode(text, validate=True)
    assert data.startswith(b"\x89PNG\r\n\x1a\n")
    return np.asarray(Image.open(io.BytesIO(data)))


def gradient(height: int, width: int, low: int, high: int) -> np.ndarray:
    row = np.linspace(low, high, width).round().astype(np.uint8)
    return np.repeat(np.repeat(row[None, :, None], height, axis=0), 3, axis=2)


def assert_one_line_error(response: httpx.Response, status: int) -> str:
    assert response.status_code == status, response.text
    detail = response.json()["detail"]
    assert isinstance(detail, str)
    assert detail
    assert "\n" not in detail
    return detail


# --- health and good images ------------------------------------------------------------


def test_health_names_the_model(client: httpx.Client) -> None:
    response = client.get("/health")

    assert response.status_code == 200
    assert response.json() == {
        "status": "ok",
        "model": "fake_model",
        "format": "onnx",
        "precision": "fp32",
    }


def test_png_upload_returns_scores_and_heatmap(client: httpx.Client, fake: FakeInferencer) -> None:
    image = gradient(48, 64, 100, 255)
    expected = fake_prediction(image)

    response = client.post("/predict", files={"file": ("part.png", encode(image), "image/png")})

    assert response.status_code == 200, response.text
    body = response.json()
    assert set(body) == {
        "pred_score",
        "pred_label",
        "label",
        "image_size",
        "model",
        "heatmap_png",
    }
    assert body["pred_score"] == pytest.approx(expected.pred_score, abs=1e-6)
    assert body["pred_label"] is True
    assert body["label"] == "anomalous"
    assert body["image_size"] == {"height": 48, "width": 64}
    assert body["model"] == "fake_model"
    np.testing.assert_array_equal(fake.images[-1], image)  # decoded losslessly, RGB
    heatmap = decode_png(body["heatmap_png"])
    assert heatmap.shape == (48, 64, 3)
    np.testing.assert_array_equal(heatmap, heatmap_overlay(image, expected.anomaly_map))


def test_grayscale_jpeg_is_scored_as_rgb(client: httpx.Client, fake: FakeInferencer) -> None:
    gray = gradient(40, 30, 0, 90)[..., 0]

    response = client.post(
        "/predict", files={"file": ("dark.jpg", encode(gray, "JPEG", quality=95), "image/jpeg")}
    )

    assert response.status_code == 200, response.text
    body = response.json()
    assert body["label"] == "normal"
    assert body["pred_label"] is False
    assert body["image_size"] == {"height": 40, "width": 30}
    received = fake.images[-1]
    assert received.shape == (40, 30, 3)
    assert received.dtype == np.uint8
    assert np.array_equal(received[..., 0], received[..., 1])
    assert np.array_equal(received[..., 0], received[..., 2])
    assert np.abs(received[..., 0].astype(int) - gray.astype(int)).max() <= 8  # JPEG loss
    assert body["pred_score"] == pytest.approx(fake_prediction(received).pred_score, abs=1e-6)


def test_rgba_png_composites_alpha_onto_black(client: httpx.Client, fake: FakeInferencer) -> None:
    rgba = np.full((20, 20, 4), 255, dtype=np.uint8)
    rgba[:, :10, 3] = 0  # left half transparent white

    response = client.post("/predict", files={"file": ("alpha.png", encode(rgba), "image/png")})

    assert response.status_code == 200, response.text
    received = fake.images[-1]
    assert received.shape == (20, 20, 3)
    assert (received[:, :10] == 0).all()
    assert (received[:, 10:] == 255).all()
    assert response.json()["pred_score"] == pytest.approx(0.5, abs=1e-6)


def test_output_mask_returns_the_mask_only(client: httpx.Client) -> None:
    image = gradient(16, 32, 0, 255)

    response = client.post(
        "/predict", params={"output": "mask"}, files={"file": ("g.png", encode(image))}
    )

    assert response.status_code == 200, response.text
    body = response.json()
    assert "heatmap_png" not in body
    mask = decode_png(body["mask_png"])
    assert mask.shape == (16, 32)
    assert set(np.unique(mask)) == {0, 255}
    np.testing.assert_array_equal(mask == 255, fake_prediction(image).pred_mask)


def test_output_none_returns_scores_only(client: httpx.Client) -> None:
    response = client.post(
        "/predict",
        params={"output": "none"},
        files={"file": ("g.png", encode(gradient(8, 8, 0, 10)))},
    )

    assert response.status_code == 200, response.text
    assert "heatmap_png" not in response.json()
    assert "mask_png" not in response.json()
    assert response.json()["label"] == "normal"


def test_decoding_matches_training_for_16_bit_and_palette_images() -> None:
    sixteen = Image.fromarray(np.array([[0, 32768, 65535]], dtype=np.uint16))
    palette = Image.new("P", (2, 1))
    palette.putpalette([255, 0, 0, 0, 255, 0])
    palette.putpixel((1, 0), 1)
    palette.info["transparency"] = 0  # the red pixel is transparent

    wide = decode_image(encode_pil(sixteen))
    indexed = decode_image(encode_pil(palette))

    assert wide.shape == (1, 3, 3)
    assert wide[0, :, 0].tolist() == [0, 128, 255]
    assert indexed.tolist() == [[[0, 0, 0], [0, 255, 0]]]


def encode_pil(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


# --- bad requests: 4xx with one line, never a 500 ----------------------------------------


def _png_bytes() -> bytes:
    return encode(gradient(32, 32, 0, 255))


def _noise_png() -> bytes:
    return encode(np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8))


@pytest.mark.parametrize(
    ("files", "data", "content", "headers", "status", "words"),
    [
        pytest.param(
            {"file": ("x.png", b"this is not an image", "image/png")},
            None,
            None,
            None,
            415,
            "not an image",
            id="corrupt-bytes",
        ),
        pytest.param(
            {"file": ("x.png", _noise_png()[:2000], "image/png")},
            None,
            None,
            None,
            422,
            "cannot be decoded",
            id="truncated-png",
        ),
        pytest.param(
            {"file": ("x.png", b"", "image/png")}, None, None, None, 400, "empty", id="empty"
        ),
        pytest.param(
            {"image": ("x.png", _png_bytes(), "image/png")},
            None,
            None,
            None,
            422,
            "no field 'file'",
            id="wrong-field",
        ),
        pytest.param(
            [("file", ("a.png", _png_bytes())), ("file", ("b.png", _png_bytes()))],
            None,
            None,
            None,
            422,
            "more than one 'file' field",
            id="two-files",
        ),
        pytest.param(
            None,
            None,
            _png_bytes(),
            {"content-type": "image/png"},
            415,
            "multipart/form-data",
            id="raw-body",
        ),
        pytest.param(
            None, {"file": "hello"}, None, None, 415, "multipart/form-data", id="url-encoded"
        ),
        pytest.param(
            None,
            None,
            b'--B\r\nContent-Disposition: form-data; name="file"\r\n\r\nabc',
            {"content-type": "multipart/form-data; boundary=B"},
            400,
            "ended early",
            id="unterminated-multipart",
        ),
        pytest.param(
            None,
            None,
            b"whatever",
            {"content-type": "multipart/form-data"},
            400,
            "boundary",
            id="no-boundary",
        ),
    ],
)
def test_bad_uploads_get_one_line_4xx(
    client: httpx.Client,
    fake: FakeInferencer,
    files: Any,
    data: Any,
    content: bytes | None,
    headers: dict[str, str] | None,
    status: int,
    words: str,
) -> None:
    response = client.post("/predict", files=files, data=data, content=content, headers=headers)

    detail = assert_one_line_error(response, status)
    assert words in detail
    assert fake.images == []
    assert client.get("/health").status_code == 200


def test_bad_output_parameter_is_one_line_422(client: httpx.Client) -> None:
    response = client.post(
        "/predict", params={"output": "jpeg"}, files={"file": ("g.png", _png_bytes())}
    )

    detail = assert_one_line_error(response, 422)
    assert "output" in detail
    assert "'jpeg'" in detail


def test_too_many_pixels_is_413_before_decoding(client: httpx.Client, fake: FakeInferencer) -> None:
    huge = np.zeros((1001, 1000), dtype=np.uint8)  # small file, 1.001 MP decoded

    response = client.post("/predict", files={"file": ("big.png", encode(huge))})

    detail = assert_one_line_error(response, 413)
    assert "1000 x 1001" in detail
    assert fake.images == []


def test_input_error_from_the_inferencer_is_422(base_url: str) -> None:
    errors = pytest.importorskip("anomaly_deploy.errors")

    class Refusing(FakeInferencer):
        def predict(self, image: np.ndarray) -> FakePrediction:
            msg = "image is 8 x 8 pixels; the model needs at least 32 x 32"
            raise errors.InputError(msg)

    with running_server(create_app(Refusing())) as url, httpx.Client(base_url=url) as http:
        response = http.post("/predict", files={"file": ("g.png", _png_bytes())})

    assert assert_one_line_error(response, 422) == (
        "image is 8 x 8 pixels; the model needs at least 32 x 32"
    )


# --- size limit ----------------------------------------------------------------------------


def test_default_limit_is_20_mib() -> None:
    assert DEFAULT_MAX_UPLOAD_BYTES == 20 * 1024 * 1024


def test_oversized_upload_is_413(client: httpx.Client, fake: FakeInferencer) -> None:
    payload = os.urandom(LIMIT + 1024)

    response = client.post("/predict", files={"file": ("big.png", payload, "image/png")})

    detail = assert_one_line_error(response, 413)
    assert "4 MiB" in detail
    assert "--max-upload-mb" in detail
    assert fake.images == []
    assert client.get("/health").status_code == 200


def _port(base_url: str) -> int:
    return int(base_url.rsplit(":", 1)[1])


def _status_line(conn: socket.socket) -> bytes:
    received = b""
    while b"\r\n" not in received:
        chunk = conn.recv(4096)
        if not chunk:
            break
        received += chunk
    return received.split(b"\r\n", 1)[0]


def test_declared_oversized_body_is_refused_before_it_is_sent(base_url: str) -> None:
    head = (
        b"POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        b"Content-Type: multipart/form-data; boundary=B\r\n"
        b"Content-Length: " + str(100 * LIMIT).encode() + b"\r\n\r\n"
    )
    with socket.create_connection(("127.0.0.1", _port(base_url)), timeout=10) as conn:
        conn.sendall(head)  # the body never comes: the answer must not wait for it

        assert _status_line(conn) == b"HTTP/1.1 413 Request Entity Too Large"


def test_limit_is_enforced_while_streaming(base_url: str) -> None:
    """A chunked body with no declared length is cut off at the limit, not read to its end."""
    head = (
        b"POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        b"Content-Type: multipart/form-data; boundary=B\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n"
    )
    part = b'--B\r\nContent-Disposition: form-data; name="file"; filename="x.png"\r\n\r\n'
    block = b"\0" * 65536
    with socket.create_connection(("127.0.0.1", _port(base_url)), timeout=10) as conn:
        conn.sendall(head + b"%x\r\n%s\r\n" % (len(part), part))
        with contextlib.suppress(OSError):  # the server may close once it has answered
            for _ in range(LIMIT // len(block) + 2):
                conn.sendall(b"%x\r\n%s\r\n" % (len(block), block))
        # The body is still open (no final 0-chunk): only a streaming check can answer now.

        assert _status_line(conn) == b"HTTP/1.1 413 Request Entity Too Large"


# --- no disk, no client file names, no blocking -------------------------------------------


class FileWrites:
    """Audit hook recording files opened for writing, in any thread, while ``active``."""

    def __init__(self) -> None:
        self.active = False
        self.records: list[tuple[str, str]] = []

    def __call__(self, event: str, args: tuple[Any, ...]) -> None:
        if not self.active:
            return
        if event == "open" and args and isinstance(args[0], str | bytes | os.PathLike):
            mode, flags = args[1], args[2]
            writing = (isinstance(mode, str) and any(c in mode for c in "wax+")) or (
                isinstance(flags, int) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT)
            )
            if writing:
                self.records.append((event, os.fsdecode(args[0])))
        elif event in {"os.mkdir", "os.rename", "os.symlink", "os.link", "tempfile.mkstemp"}:
            self.records.append((event, repr(args)))


@pytest.fixture(scope="module")
def file_writes() -> Iterator[FileWrites]:
    recorder = FileWrites()
    sys.addaudithook(recorder)  # audit hooks cannot be removed; this one is inert when inactive
    yield recorder
    recorder.active = False


def test_upload_stays_in_memory_and_its_file_name_is_ignored(
    client: httpx.Client, file_writes: FileWrites, tmp_path: Path
) -> None:
    token = uuid.uuid4().hex
    noise = np.random.default_rng(0).integers(0, 256, (700, 700, 3), dtype=np.uint8)
    payload = encode(noise, compress_level=0)
    assert 1024 * 1024 < len(payload) < LIMIT  # larger than what Starlette keeps in memory
    names = [f"../../../{token}.png", f"/tmp/{token}.png", f"..\\..\\{token}.png"]

    file_writes.active = True
    try:
        responses = [
            client.post("/predict", files={"file": (name, payload, "image/png")}) for name in names
        ]
    finally:
        file_writes.active = False

    assert [r.status_code for r in responses] == [200, 200, 200]
    assert file_writes.records == []
    for folder in (Path.cwd(), *Path.cwd().parents, tmp_path, Path("/tmp")):
        assert not (folder / f"{token}.png").exists()


def test_inference_runs_in_a_worker_thread_and_never_blocks_the_loop() -> None:
    entered, release = threading.Event(), threading.Event()

    class Slow(FakeInferencer):
        def predict(self, image: np.ndarray) -> FakePrediction:
            entered.set()
            assert release.wait(30)
            return super().predict(image)

    slow = Slow()
    results: list[httpx.Response] = []
    with running_server(create_app(slow)) as url, httpx.Client(base_url=url, timeout=30) as http:

        def post() -> None:
            results.append(http.post("/predict", files={"file": ("g.png", _png_bytes())}))

        poster = threading.Thread(target=post)
        poster.start()
        assert entered.wait(30)
        started = time.monotonic()
        health = httpx.get(f"{url}/health", timeout=10)  # while the prediction is stuck
        waited = time.monotonic() - started
        release.set()
        poster.join(30)

    assert health.status_code == 200
    assert waited < 5
    assert [r.status_code for r in results] == [200]
    assert slow.threads
    assert SERVER_THREAD not in slow.threads


def test_create_app_rejects_bad_limits(fake: FakeInferencer) -> None:
    for keyword in ("max_upload_bytes", "max_pixels", "concurrency"):
        with pytest.raises(ValueError, match=keyword):
            create_app(fake, **{keyword: 0})


# --- a real export ---------------------------------------------------------------------------


def test_serves_a_real_onnx_export_through_load_inferencer(onnx_export: Path, helpers: Any) -> None:
    from anomaly_deploy.inference import load_inferencer

    image = helpers.make_half_bright((48, 64))
    score, anomaly_map = helpers.reference(image)

    with (
        running_server(create_app(load_inferencer(onnx_export))) as url,
        httpx.Client(base_url=url, timeout=30) as http,
    ):
        health = http.get("/health").json()
        heat = http.post("/predict", files={"file": ("half.png", encode(image))}).json()
        masked = http.post(
            "/predict", params={"output": "mask"}, files={"file": ("half.png", encode(image))}
        ).json()

    assert health == {"status": "ok", "model": "tiny", "format": "onnx", "precision": "fp32"}
    assert heat["pred_score"] == pytest.approx(score, abs=1e-4)
    assert heat["label"] == ("anomalous" if score >= 0.5 else "normal")
    assert heat["image_size"] == {"height": 48, "width": 64}
    expected_heat = heatmap_overlay(image, anomaly_map).astype(int)
    assert np.abs(decode_png(heat["heatmap_png"]).astype(int) - expected_heat).max() <= 2
    mask = decode_png(masked["mask_png"]) == 255
    assert mask[:, -8:].all()
    assert not mask[:, :8].any()
    assert (mask != (anomaly_map >= 0.5)).mean() < 0.02  # at most the boundary may differ
