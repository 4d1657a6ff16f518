"""Prediction sources: image files, folders, video files, cameras, arrays and iterables of them.

``open_source`` checks a source at once (a missing path, an empty folder or a video that
will not open fail before any prediction) and returns a one-shot stream of decoded images.
Video frames and camera frames are read with OpenCV, converted from BGR to RGB.
"""

from __future__ import annotations

import io
import os
import re
from collections.abc import Callable, Iterable, Iterator, Sized
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from anomaly_deploy.errors import InputError
from anomaly_deploy.inference._image import (
    VIDEO_EXTENSIONS,
    UInt8Image,
    array_to_rgb,
    is_image_file,
    read_image,
    to_rgb,
)

__all__ = ["Frame", "Source", "decode_bytes", "list_images", "load_one", "open_source"]

_CAMERA = re.compile(r"^camera:(\d+)$", re.IGNORECASE)


@dataclass(frozen=True, slots=True)
class Frame:
    """One decoded input: (H, W, 3) uint8 RGB and where it came from."""

    image: UInt8Image
    source: str


class Source:
    """An opened source: iterate it once for its frames; ``total`` is their count if known.

    Args:
        frames: The frames, produced lazily.
        total: How many frames there are; None for cameras and unsized iterables.
        description: What the source is, for messages (``"folder 'imgs' (12 images)"``).
    """

    def __init__(self, frames: Iterator[Frame], total: int | None, description: str) -> None:
        self._frames = frames
        self.total = total
        self.description = description

    def __iter__(self) -> Iterator[Frame]:
        return self._frames

    def __repr__(self) -> str:
        return f"Source({self.description}, total={self.total!r})"


def decode_bytes(data: bytes | bytearray | memoryview) -> UInt8Image:
    """Decode an encoded image (PNG, JPEG, ...) held in memory to (H, W, 3) uint8 RGB.

    Raises:
        InputError: When the bytes are not an image Pillow can read.
    """
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(bytes(data))) as opened:
            opened.load()
            return to_rgb(ImageOps.exif_transpose(opened))
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, ValueError) as err:
        msg = f"{len(data)} bytes cannot be decoded as an image ({err}); send a PNG or JPEG file"
        raise InputError(msg) from err


def load_one(item: object, source: str | None = None) -> Frame:
    """Decode one image given as a path, an array or encoded bytes.

    Args:
        item: An image file path, an (H, W[, C]) uint8 array or encoded image bytes.
        source: The name to give it; by default the path, ``"array"`` or ``"bytes"``.

    Raises:
        InputError: When the item cannot be read as an image.
    """
    if isinstance(item, np.ndarray):
        return Frame(array_to_rgb(item), source or "array")
    if isinstance(item, bytes | bytearray | memoryview):
        return Frame(decode_bytes(item), source or "bytes")
    if isinstance(item, str | os.PathLike):
        path = os.fspath(item)
        if isinstance(path, bytes):
            path = os.fsdecode(path)
        return Frame(read_image(path), source or path)
    msg = (
        f"cannot read an image from a {type(item).__name__!r}; pass a file path, "
        "an (H, W, 3) uint8 RGB array or encoded image bytes"
    )
    raise InputError(msg)


def list_images(folder: Path) -> list[Path]:
    """Return the image files under ``folder``, recursively and sorted; hidden ones are skipped."""
    return sorted(
        path
        for path in folder.rglob("*")
        if is_image_file(path)
        and not any(part.startswith(".") for part in path.relative_to(folder).parts)
    )


def open_source(source: object) -> Source:
    """Check ``source`` and return its frames.

    Args:
        source: An image file, a folder (searched recursively, sorted), a video file, a
            camera (``int`` index or ``"camera:N"``), an array, encoded image bytes, or an
            iterable of paths, arrays and bytes.

    Raises:
        InputError: When the source does not exist, holds no images, cannot be opened or
            is of an unknown kind. Unreadable images in a folder or an iterable raise when
            they are reached.
    """
    if isinstance(source, bool):
        msg = f"{source!r} is not a prediction source; pass a path, an array or camera:N"
        raise InputError(msg)
    if isinstance(source, int):
        return _camera(source)
    if isinstance(source, np.ndarray | bytes | bytearray | memoryview):
        return Source(iter([load_one(source)]), 1, "one image")
    if isinstance(source, str | os.PathLike):
        text = os.fspath(source)
        text = os.fsdecode(text) if isinstance(text, bytes) else text
        match = _CAMERA.match(text.strip())
        if match:
            return _camera(int(match.group(1)))
        return _path(Path(text))
    if isinstance(source, Iterable):
        return _iterable(source)
    msg = (
        f"cannot predict on a {type(source).__name__!r}; pass an image file, a folder, "
        "a video file, camera:N, an array or a list of them"
    )
    raise InputError(msg)


def _path(path: Path) -> Source:
    if not path.exists():
        msg = (
            f"prediction source {str(path)!r} does not exist; pass an image file, a folder, "
            "a video file or camera:N"
        )
        raise InputError(msg)
    if path.is_dir():
        files = list_images(path)
        if not files:
            msg = (
                f"folder {str(path)!r} holds no images; add .png/.jpg/... files or pick "
                "another folder"
            )
            raise InputError(msg)
        frames = (Frame(read_image(file), str(file)) for file in files)
        return Source(frames, len(files), f"folder {str(path)!r} ({len(files)} images)")
    if path.suffix.lower() in VIDEO_EXTENSIONS:
        return _video(path)
    return Source(_lazy(lambda: load_one(path)), 1, f"image {str(path)!r}")


def _lazy(make: Callable[[], Frame]) -> Iterator[Frame]:
    yield make()


def _iterable(items: Iterable[object]) -> Source:
    total = len(items) if isinstance(items, Sized) else None

    def frames() -> Iterator[Frame]:
        for index, item in enumerate(items):
            named = isinstance(item, np.ndarray | bytes | bytearray | memoryview)
            kind = "array" if isinstance(item, np.ndarray) else "bytes"
            yield load_one(item, f"{kind}:{index}" if named else None)

    return Source(frames(), total, f"{total if total is not None else 'a stream of'} items")


def _video(path: Path) -> Source:
    import cv2

    capture = cv2.VideoCapture(str(path))
    if not capture.isOpened():
        capture.release()
        msg = (
            f"video file {str(path)!r} cannot be opened (corrupt or an unknown codec); "
            "re-encode it, e.g. as H.264 .mp4"
        )
        raise InputError(msg)
    count = int(capture.get(cv2.CAP_PROP_FRAME_COUNT))

    def frames() -> Iterator[Frame]:
        index = 0
        try:
            for image in _read_frames(capture):
                yield Frame(image, f"frame:{index}")
                index += 1
        finally:
            capture.release()
        if index == 0:
            msg = f"video file {str(path)!r} has no readable frames; re-encode it"
            raise InputError(msg)

    return Source(frames(), count if count > 0 else None, f"video {str(path)!r}")


def _camera(index: int) -> Source:
    import cv2

    capture = cv2.VideoCapture(index)
    if not capture.isOpened():
        capture.release()
        msg = (
            f"camera {index} cannot be opened; check that it is connected and not in use, "
            "or pick another camera:N"
        )
        raise InputError(msg)

    def frames() -> Iterator[Frame]:
        try:
            for number, image in enumerate(_read_frames(capture)):
                yield Frame(image, f"frame:{number}")
        finally:
            capture.release()

    return Source(frames(), None, f"camera {index}")


def _read_frames(capture: object) -> Iterator[UInt8Image]:
    """Yield RGB frames until the capture ends (end of file, or a camera that stops)."""
    import cv2

    while True:
        ok, frame = capture.read()  # type: ignore[attr-defined]  # cv2.VideoCapture
        if not ok or frame is None:
            return
        if frame.ndim == 2:
            yield np.ascontiguousarray(cv2.cvtColor(frame, cv2.COLOR_GRAY2RGB))
        else:
            yield np.ascontiguousarray(cv2.cvtColor(frame, cv2.COLOR_BGR2RGB))
