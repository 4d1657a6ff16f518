"""Download a dataset archive, verify its checksum and extract it safely.

Nothing here runs unless a datamodule is built with ``download=True``. The archive is
streamed to ``<name>.part``, hashed on the way, and renamed only when its SHA-256 matches,
so a failed or tampered download never looks complete. Extraction goes to a temporary
folder next to the target and refuses archives whose members are absolute, climb out with
``..`` or are links or devices; the extracted entries are then moved into place.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import shutil
import tarfile
import tempfile
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO, cast

from anomaly import DataError

__all__ = [
    "MVTEC_AD_CATEGORIES",
    "MVTEC_AD_DOWNLOAD",
    "DownloadInfo",
    "Opener",
    "download_and_extract",
    "download_file",
    "extract_archive",
    "sha256_of",
]

logger = logging.getLogger(__name__)

Opener = Callable[[str], IO[bytes]]
"""Open a URL for reading; returns a binary file object that the caller closes."""

_CHUNK = 1 << 20


@dataclass(frozen=True, slots=True)
class DownloadInfo:
    """Where a dataset archive lives and what its bytes hash to.

    Attributes:
        name: The dataset, in words, for messages.
        url: Any URL ``urllib`` opens (``https://``, ``file://``).
        sha256: Lowercase hex SHA-256 of the archive.
        filename: Name of the archive on disk; the last part of the URL when empty.
    """

    name: str
    url: str
    sha256: str
    filename: str = ""

    @property
    def archive_name(self) -> str:
        """Return the file name the archive is saved under."""
        if self.filename:
            return self.filename
        name = PurePosixPath(urllib.parse.urlparse(self.url).path).name
        return name or "download"


MVTEC_AD_DOWNLOAD = DownloadInfo(
    name="MVTec AD",
    url=(
        "https://www.mydrive.ch/shares/38536/3830184030e49fe74747669442f0f282/download/"
        "420938113-1629952094/mvtec_anomaly_detection.tar.xz"
    ),
    sha256="cf4313b13603bec67abb49ca959488f7eedce2a9f7795ec54446c649ac98cd3d",
    filename="mvtec_anomaly_detection.tar.xz",
)
"""The whole MVTec AD archive (4.9 GB, 15 categories, CC BY-NC-SA 4.0)."""

MVTEC_AD_CATEGORIES = (
    "bottle",
    "cable",
    "capsule",
    "carpet",
    "grid",
    "hazelnut",
    "leather",
    "metal_nut",
    "pill",
    "screw",
    "tile",
    "toothbrush",
    "transistor",
    "wood",
    "zipper",
)


def _urlopen(url: str) -> IO[bytes]:
    return cast(
        "IO[bytes]", urllib.request.urlopen(url, timeout=60)
    )  # URL comes from the user's config or the table above


def sha256_of(path: Path) -> str:
    """Return the lowercase hex SHA-256 of a file."""
    digest = hashlib.sha256()
    with path.open("rb") as file:
        while chunk := file.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def download_file(
    url: str,
    destination: Path,
    *,
    sha256: str,
    opener: Opener | None = None,
    progress: Callable[[int, int | None], None] | None = None,
) -> Path:
    """Download ``url`` to ``destination`` and check its SHA-256.

    A file already at ``destination`` with the right checksum is kept without downloading.

    Args:
        url: What to download.
        destination: Where the file ends up.
        sha256: Expected lowercase hex SHA-256.
        opener: Opens the URL; ``urllib.request.urlopen`` with a 60 s timeout by default.
        progress: Called with (bytes so far, total bytes or None) after every chunk.

    Returns:
        ``destination``.

    Raises:
        DataError: When the download fails or its checksum differs.
    """
    expected = sha256.strip().lower()
    if destination.is_file() and sha256_of(destination) == expected:
        logger.info("Reusing %s (checksum matches)", destination)
        return destination
    destination.parent.mkdir(parents=True, exist_ok=True)
    partial = destination.with_name(destination.name + ".part")
    digest = hashlib.sha256()
    logger.info("Downloading %s to %s", url, destination)
    try:
        with (opener or _urlopen)(url) as response, partial.open("wb") as file:
            total = _content_length(response)
            done = 0
            while chunk := response.read(_CHUNK):
                file.write(chunk)
                digest.update(chunk)
                done += len(chunk)
                if progress is not None:
                    progress(done, total)
    except (urllib.error.URLError, OSError) as err:
        partial.unlink(missing_ok=True)
        msg = (
            f"cannot download {url!r} ({err}); check the connection, or download it by hand "
            f"to {str(destination)!r}"
        )
        raise DataError(msg) from err
    actual = digest.hexdigest()
    if actual != expected:
        partial.unlink(missing_ok=True)
        msg = (
            f"the file downloaded from {url!r} has SHA-256 {actual!r}, expected {expected!r}; "
            "it is corrupt or the URL now serves something else: retry, or download it by hand"
        )
        raise DataError(msg)
    partial.replace(destination)
    return destination


def _content_length(response: object) -> int | None:
    headers = getattr(response, "headers", None)
    value = headers.get("Content-Length") if headers is not None else None
    return int(value) if value is not None and str(value).isdigit() else None


def _check_member(archive: Path, name: str, *, is_safe_type: bool) -> None:
    path = PurePosixPath(name.replace("\\", "/"))
    if not is_safe_type:
        reason = "a link or special file"
    elif path.is_absolute() or (path.parts and path.parts[0].endswith(":")):
        reason = "an absolute path"
    elif ".." in path.parts:
        reason = "a path escaping the target folder"
    else:
        return
    msg = (
        f"archive {str(archive)!r} holds {reason} ({name!r}); refusing to extract it: "
        "download the archive again from its official source"
    )
    raise DataError(msg)


def extract_archive(archive: Path, destination: Path) -> list[Path]:
    """Extract a tar (plain, gz, bz2, xz) or zip archive into ``destination``, safely.

    Every member is checked before anything is written: absolute paths, ``..`` components,
    links and devices are refused. Entries are extracted into a temporary folder inside
    ``destination`` and then moved up; top-level entries that already exist are kept.

    Returns:
        The top-level paths that were added to ``destination``.

    Raises:
        DataError: When the archive cannot be read or holds an unsafe member.
    """
    destination.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".extract-", dir=destination))
    try:
        try:
            if zipfile.is_zipfile(archive):
                _extract_zip(archive, staging)
            else:
                _extract_tar(archive, staging)
        except (tarfile.TarError, zipfile.BadZipFile, EOFError, OSError) as err:
            msg = (
                f"archive {str(archive)!r} cannot be extracted ({err}); delete it and "
                "download it again"
            )
            raise DataError(msg) from err
        added: list[Path] = []
        for entry in sorted(staging.iterdir()):
            target = destination / entry.name
            if target.exists():
                logger.info("Keeping existing %s", target)
                continue
            entry.rename(target)
            added.append(target)
        return added
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _extract_tar(archive: Path, staging: Path) -> None:
    with tarfile.open(archive, mode="r:*") as tar:
        members = tar.getmembers()
        for member in members:
            _check_member(archive, member.name, is_safe_type=member.isfile() or member.isdir())
        if hasattr(tarfile, "data_filter"):
            # Defence in depth where available (Python >= 3.11.4): the stdlib filter also
            # drops unsafe permission bits.
            tar.extractall(staging, members=members, filter="data")
        else:  # pragma: no cover - old 3.11 patch releases
            tar.extractall(staging, members=members)  # members checked above


def _extract_zip(archive: Path, staging: Path) -> None:
    with zipfile.ZipFile(archive) as zipped:
        infos = zipped.infolist()
        for info in infos:
            # Unix symlinks in zips carry the S_IFLNK bits in the high word of external_attr.
            is_link = (info.external_attr >> 16) & 0o170000 == 0o120000
            _check_member(archive, info.filename, is_safe_type=not is_link)
        zipped.extractall(staging, members=infos)


def download_and_extract(
    info: DownloadInfo,
    root: Path,
    *,
    opener: Opener | None = None,
    keep_archive: bool = False,
    progress: Callable[[int, int | None], None] | None = None,
) -> list[Path]:
    """Download ``info`` into ``root``, verify it and extract it there.

    Args:
        info: URL and checksum of the archive.
        root: Folder the archive's top-level entries end up in.
        opener: Opens the URL; see ``download_file``.
        keep_archive: Keep the archive after extracting it (deleted by default).
        progress: See ``download_file``.

    Returns:
        The top-level paths added to ``root``.

    Raises:
        DataError: When the download, the checksum or the extraction fails.
    """
    root.mkdir(parents=True, exist_ok=True)
    archive = download_file(
        info.url, root / info.archive_name, sha256=info.sha256, opener=opener, progress=progress
    )
    logger.info("Extracting %s into %s", archive, root)
    added = extract_archive(archive, root)
    if not keep_archive:
        with contextlib.suppress(OSError):
            os.remove(archive)
    return added
