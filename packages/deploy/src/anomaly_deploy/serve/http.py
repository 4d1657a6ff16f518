"""HTTP API for an exported model: ``POST /predict`` an image, ``GET /health``.

The upload is parsed as it streams in, kept in memory and decoded there: nothing is written to
disk and the client's file name is never used. The request-size limit is enforced while
reading, so an oversized or endless upload is refused after at most the limit in bytes.
Decoding, inference and PNG encoding run in worker threads; the event loop only moves bytes.

Start it with ``anomaly serve EXPORT_FOLDER``, or build the app yourself and run it with any
ASGI server::

    from anomaly_deploy.inference import load_inferencer
    from anomaly_deploy.serve.http import create_app

    app = create_app(load_inferencer("results/export/onnx"))
"""

from __future__ import annotations

import base64
import enum
import logging
from collections.abc import Callable
from typing import Annotated, Any, Literal

import anyio
import anyio.to_thread
import numpy as np
import numpy.typing as npt
from fastapi import FastAPI, HTTPException, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect

from anomaly_deploy.serve._common import (
    DEFAULT_MAX_PIXELS,
    ImageDecodeError,
    ImageTooLargeError,
    InferencerLike,
    NotAnImageError,
    PredictionLike,
    decode_image,
    encode_png,
    heatmap_overlay,
    input_error_types,
    mask_image,
    model_info,
    verdict,
)

__all__ = [
    "DEFAULT_MAX_UPLOAD_BYTES",
    "HealthResponse",
    "ImageSize",
    "Output",
    "PredictResponse",
    "create_app",
]

logger = logging.getLogger(__name__)

DEFAULT_MAX_UPLOAD_BYTES = 20 * 1024 * 1024
"""Default limit on the size of a ``POST /predict`` request body: 20 MiB."""

FILE_FIELD = "file"
"""Name of the multipart form field that carries the image."""


class Output(enum.StrEnum):
    """Which picture ``POST /predict`` returns with the scores."""

    HEATMAP = "heatmap"
    MASK = "mask"
    NONE = "none"


class ImageSize(BaseModel):
    """Size of the decoded image in pixels."""

    height: int
    width: int


class PredictResponse(BaseModel):
    """Result of ``POST /predict``; the picture fields appear only when requested."""

    pred_score: float = Field(description="Image score in [0, 1]; anomalous from 0.5.")
    pred_label: bool = Field(description="True when the image is anomalous.")
    label: Literal["anomalous", "normal"]
    image_size: ImageSize
    model: str = Field(description="Name of the exported model.")
    heatmap_png: str | None = Field(
        default=None,
        description="Base64 PNG: the anomaly map in jet colours blended onto the image.",
    )
    mask_png: str | None = Field(
        default=None, description="Base64 PNG: the predicted mask, 255 anomalous, 0 normal."
    )


class HealthResponse(BaseModel):
    """Result of ``GET /health``."""

    status: Literal["ok"]
    model: str
    format: str
    precision: str


_UPLOAD_SCHEMA: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": [FILE_FIELD],
                    "properties": {FILE_FIELD: {"type": "string", "format": "binary"}},
                }
            }
        },
    }
}


class _UploadError(Exception):
    """A problem with the request body, answered with ``status`` and a one-line message."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class _FilePart:
    """Multipart callbacks that keep the bytes of the ``file`` field and skip the rest."""

    def __init__(self) -> None:
        self.data: bytearray | None = None
        self.complete = False
        self.finished = False
        self.fields: list[str] = []
        self._collecting = False
        self._header_name = bytearray()
        self._header_value = bytearray()
        self._disposition = b""

    def callbacks(self) -> dict[str, Callable[..., None]]:
        return {
            "on_part_begin": self._part_begin,
            "on_header_field": self._header_field,
            "on_header_value": self._header_value_data,
            "on_header_end": self._header_end,
            "on_headers_finished": self._headers_finished,
            "on_part_data": self._part_data,
            "on_part_end": self._part_end,
            "on_end": self._end,
        }

    def _part_begin(self) -> None:
        self._disposition = b""
        self._collecting = False

    def _header_field(self, data: bytes, start: int, end: int) -> None:
        self._header_name += data[start:end]

    def _header_value_data(self, data: bytes, start: int, end: int) -> None:
        self._header_value += data[start:end]

    def _header_end(self) -> None:
        if bytes(self._header_name).strip().lower() == b"content-disposition":
            self._disposition = bytes(self._header_value)
        self._header_name.clear()
        self._header_value.clear()

    def _headers_finished(self) -> None:
        _, options = parse_options_header(self._disposition)
        name = options.get(b"name", b"").decode("utf-8", "replace")
        self.fields.append(name)
        if name != FILE_FIELD:
            return
        if self.data is not None:
            msg = f"the form has more than one {FILE_FIELD!r} field; send one image per request"
            raise _UploadError(422, msg)
        self.data = bytearray()
        self._collecting = True

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        if self._collecting and self.data is not None:
            self.data += data[start:end]

    def _part_end(self) -> None:
        if self._collecting:
            self.complete = True
        self._collecting = False

    def _end(self) -> None:
        self.finished = True


async def _read_file_field(request: Request, limit: int) -> bytes:
    """Stream the multipart body, keeping the ``file`` field in memory, at most ``limit`` bytes."""
    media_type, params = parse_options_header(request.headers.get("content-type"))
    if media_type != b"multipart/form-data":
        shown = media_type.decode("latin-1") or "none"
        msg = (
            f"the request body is {shown!r}, not multipart/form-data; send the image in the "
            f"form field {FILE_FIELD!r}, e.g. curl -F {FILE_FIELD}=@image.png"
        )
        raise _UploadError(415, msg)
    boundary = params.get(b"boundary")
    if not boundary:
        msg = "the multipart Content-Type has no boundary; let the HTTP client build the form"
        raise _UploadError(400, msg)
    too_large = (
        f"the upload is larger than the {_mib(limit)} limit; send a smaller image or raise "
        f"the server's limit (anomaly serve --max-upload-mb)"
    )
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        # Refuse before reading a byte: the declared length already exceeds the limit.
        raise _UploadError(413, too_large)
    part = _FilePart()
    try:
        parser = MultipartParser(boundary, part.callbacks())  # type: ignore[arg-type]
        received = 0
        async for chunk in request.stream():
            received += len(chunk)
            if received > limit:
                raise _UploadError(413, too_large)
            parser.write(chunk)
        parser.finalize()
    except FormParserError as err:
        msg = f"the multipart body is malformed ({err}); let the HTTP client build the form"
        raise _UploadError(400, msg) from err
    except ClientDisconnect as err:
        # Nobody is left to read the answer; end the request quietly, not as a server error.
        msg = "the client disconnected during the upload"
        raise _UploadError(400, msg) from err
    if part.data is None:
        found = ", ".join(repr(name) for name in part.fields) or "none"
        msg = (
            f"the form has no field {FILE_FIELD!r} (fields sent: {found}); send the image "
            f"as {FILE_FIELD}=@image.png"
        )
        raise _UploadError(422, msg)
    if not (part.complete and part.finished):
        msg = "the multipart body ended early; send the whole file"
        raise _UploadError(400, msg)
    return bytes(part.data)


def _mib(size: int) -> str:
    return f"{size / (1024 * 1024):.3g} MiB"


def _render(
    prediction: PredictionLike, image: npt.NDArray[np.uint8], output: Output, model: str
) -> PredictResponse:
    height, width = image.shape[:2]
    response = PredictResponse(
        pred_score=float(prediction.pred_score),
        pred_label=bool(prediction.pred_label),
        label=verdict(prediction),  # type: ignore[arg-type]
        image_size=ImageSize(height=height, width=width),
        model=model,
    )
    if output is Output.HEATMAP:
        picture = heatmap_overlay(image, np.asarray(prediction.anomaly_map))
        response.heatmap_png = base64.b64encode(encode_png(picture)).decode("ascii")
    elif output is Output.MASK:
        picture = mask_image(np.asarray(prediction.pred_mask))
        response.mask_png = base64.b64encode(encode_png(picture)).decode("ascii")
    return response


def _validation_message(err: RequestValidationError) -> str:
    """Turn FastAPI's list of validation errors into one line naming the first offender."""
    errors = list(err.errors())
    if not errors:
        return "the request is invalid"
    first = errors[0]
    where = ".".join(str(part) for part in first.get("loc", ()) if part not in {"query", "body"})
    text = f"{where}: {first.get('msg', 'invalid value')}" if where else first.get("msg", "")
    if "input" in first:
        shown = repr(first["input"])
        text += f" (got {shown if len(shown) <= 60 else shown[:57] + '...'})"
    return text


def create_app(
    inferencer: InferencerLike,
    *,
    max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    concurrency: int = 1,
) -> FastAPI:
    """Build the FastAPI app that serves ``inferencer``.

    Args:
        inferencer: An ``anomaly_deploy.inference`` inferencer, or any object with
            ``.predict((H, W, 3) uint8 RGB) -> Prediction`` and a ``.metadata`` mapping.
        max_upload_bytes: Largest request body of ``POST /predict``; larger ones get 413.
        max_pixels: Largest decoded image (width x height); larger ones get 413.
        concurrency: How many predictions may run at once. Runtimes already use every core
            for one image and not every inferencer is thread-safe, hence 1.

    Returns:
        The app; run it with uvicorn (``anomaly serve`` does).

    Raises:
        ValueError: When a limit is not a positive integer.
    """
    for name, value in (
        ("max_upload_bytes", max_upload_bytes),
        ("max_pixels", max_pixels),
        ("concurrency", concurrency),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            msg = f"{name} must be a positive integer, got {value!r}"
            raise ValueError(msg)
    info = model_info(inferencer.metadata)
    input_errors = input_error_types()
    limiter = anyio.CapacityLimiter(concurrency)

    app = FastAPI(
        title=f"anomaly: {info['model']}",
        summary="Score images for anomalies and localize them with an exported model.",
        version="1",
    )

    @app.exception_handler(RequestValidationError)
    async def _one_line_validation_error(
        request: Request, err: RequestValidationError
    ) -> JSONResponse:
        return JSONResponse({"detail": _validation_message(err)}, status_code=422)

    @app.get("/health", response_model=HealthResponse, summary="Model name, format, precision.")
    async def health() -> HealthResponse:
        return HealthResponse(status="ok", **info)

    @app.post(
        "/predict",
        response_model=PredictResponse,
        response_model_exclude_none=True,
        summary="Score one image (multipart field 'file').",
        openapi_extra=_UPLOAD_SCHEMA,
        responses={
            400: {"description": "Malformed or empty upload."},
            413: {"description": "The upload or the image is too large."},
            415: {"description": "Not multipart/form-data, or not an image."},
            422: {"description": "Missing field, corrupt image or bad query parameter."},
        },
    )
    async def predict(
        request: Request,
        output: Annotated[Output, Query(description="Picture to return with the scores.")] = (
            Output.HEATMAP
        ),
    ) -> PredictResponse:
        try:
            data = await _read_file_field(request, max_upload_bytes)
            image = await run_in_threadpool(_decode, data, max_pixels)
        except _UploadError as err:
            raise HTTPException(err.status, err.message) from err
        try:
            prediction = await anyio.to_thread.run_sync(inferencer.predict, image, limiter=limiter)
        except input_errors as err:
            raise HTTPException(422, str(err)) from err
        return await run_in_threadpool(_render, prediction, image, output, info["model"])

    return app


def _decode(data: bytes, max_pixels: int) -> npt.NDArray[np.uint8]:
    try:
        return decode_image(data, max_pixels=max_pixels)
    except ImageTooLargeError as err:
        raise _UploadError(413, str(err)) from err
    except NotAnImageError as err:
        raise _UploadError(400 if not data else 415, str(err)) from err
    except ImageDecodeError as err:
        raise _UploadError(422, str(err)) from err
