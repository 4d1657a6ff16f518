from __future__ import annotations

import hashlib
import io
import tarfile
import zipfile
from pathlib import Path

import pytest

from anomaly import ConfigError, DataError
from anomaly.io import read_mask
from anomaly.testing import make_synthetic_mvtec
from anomaly_data import MvtecAd
from anomaly_data.datasets import download as download_module
from anomaly_data.datasets.download import (
    DownloadInfo,
    download_and_extract,
    download_file,
    extract_archive,
)

SHARED = Path(__file__).resolve().parents[2] / ".." / "shared" / "datasets"


def test_mvtec_ad_on_synthetic_data(synthetic_mvtec: Path) -> None:
    dm = MvtecAd(synthetic_mvtec, "widget", image_size=32)
    dm.setup()
    train, val, test = dm.summaries
    assert train.images == train.normal == 16
    assert train.source == "'train/good/' (all)"
    assert val.images + test.images == 12
    assert val.abnormal + test.abnormal == 6
    assert val.masks == val.abnormal
    assert test.masks == test.abnormal
    assert "'test/bright/', 'test/dark/'" in test.source
    for item in (dm.val_data[i] for i in range(len(dm.val_data))):
        assert item["gt_mask"].shape == (32, 32)
        assert bool(item["gt_mask"].any()) == (item["gt_label"] == 1)
        mask_path = next(
            s.mask_path for s in dm.val_data.samples if str(s.image_path) == item["image_path"]
        )
        if item["gt_label"]:
            assert mask_path.parent.parent.name == "ground_truth"
            assert mask_path.name == Path(item["image_path"]).stem + "_mask.png"


def test_mvtec_ad_val_split_modes(synthetic_mvtec: Path) -> None:
    same = MvtecAd(synthetic_mvtec, "widget", val_split="same_as_test")
    same.setup()
    assert same.val_data is same.test_data
    assert len(same.test_data) == 12
    from_train = MvtecAd(synthetic_mvtec, "widget", val_split="from_train", val_split_ratio=0.25)
    from_train.setup()
    assert len(from_train.train_data) == 12
    assert len(from_train.val_data) == 4
    assert from_train.summaries[1].abnormal == 0


def test_mvtec_ad_unknown_category_lists_existing(synthetic_mvtec: Path) -> None:
    with pytest.raises(DataError, match=r"category 'widgte' does not exist; did you mean 'widget'"):
        MvtecAd(synthetic_mvtec, "widgte").setup()
    with pytest.raises(DataError, match=r"holds widget;"):
        MvtecAd(synthetic_mvtec, "bottle").setup()


def test_mvtec_ad_missing_root_suggests_download(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"does not exist; .*download=true"):
        MvtecAd(tmp_path / "nowhere", "bottle").setup()


def test_mvtec_ad_without_ground_truth_has_no_masks(tmp_path: Path) -> None:
    category = make_synthetic_mvtec(tmp_path, category="plain", n_train=4)
    for mask in sorted((category / "ground_truth").rglob("*.png")):
        mask.unlink()
    for folder in sorted((category / "ground_truth").iterdir()):
        folder.rmdir()
    (category / "ground_truth").rmdir()
    dm = MvtecAd(tmp_path, "plain", val_split="same_as_test")
    dm.setup()
    assert dm.test_data[0]["gt_mask"] is None


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"category": "../bottle"}, "plain folder name"),
        ({"category": ""}, "plain folder name"),
        ({"download": "yes"}, "true or false"),
        ({"download_url": "file:///x.tar"}, "go together"),
        ({"download_url": "file:///x.tar", "download_sha256": "abc"}, "64 hex digits"),
        ({"category": "botle", "download": True}, "did you mean 'bottle'"),
        ({"val_split": "same"}, "did you mean 'same_as_test'"),
    ],
)
def test_mvtec_ad_bad_options(tmp_path: Path, kwargs: dict, match: str) -> None:
    kwargs.setdefault("category", "bottle")
    with pytest.raises(ConfigError, match=match):
        MvtecAd(tmp_path, **kwargs)


# --- downloading ------------------------------------------------------------------------


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _tar_of(source: Path, archive: Path) -> Path:
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(source, arcname=source.name)
    return archive


def test_download_extracts_a_verified_archive(tmp_path: Path) -> None:
    category = make_synthetic_mvtec(tmp_path / "src", category="gadget", n_train=4)
    archive = _tar_of(category, tmp_path / "gadget.tar.gz")
    root = tmp_path / "datasets"
    dm = MvtecAd(
        root,
        "gadget",
        download=True,
        download_url=archive.as_uri(),
        download_sha256=_sha256(archive),
        val_split="same_as_test",
    )
    dm.setup()
    assert len(dm.train_data) == 4
    assert (root / "gadget" / "ground_truth" / "bright").is_dir()
    # The archive is removed after extraction and no staging folder is left behind.
    assert sorted(p.name for p in root.iterdir()) == ["gadget"]


def test_download_is_never_attempted_unless_asked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def refuse(url: str) -> io.BytesIO:
        msg = f"tried to download {url}"
        raise AssertionError(msg)

    monkeypatch.setattr(download_module, "_urlopen", refuse)
    dm = MvtecAd(tmp_path, "bottle")
    dm.prepare_data()
    with pytest.raises(DataError, match="download=true"):
        dm.setup()
    assert list(tmp_path.iterdir()) == []


def test_download_rejects_a_wrong_checksum(tmp_path: Path) -> None:
    payload = tmp_path / "data.tar"
    with tarfile.open(payload, "w") as tar:
        info = tarfile.TarInfo("cat/readme.txt")
        info.size = 2
        tar.addfile(info, io.BytesIO(b"hi"))
    root = tmp_path / "root"
    info = DownloadInfo(name="test", url=payload.as_uri(), sha256="0" * 64)
    with pytest.raises(DataError, match=r"has SHA-256 '[0-9a-f]{64}', expected '0{64}'"):
        download_and_extract(info, root)
    assert list(root.iterdir()) == []


def test_download_uses_the_opener_and_reports_progress(tmp_path: Path) -> None:
    content = b"x" * 3_000_000
    calls: list[str] = []
    seen: list[int] = []

    def opener(url: str) -> io.BytesIO:
        calls.append(url)
        return io.BytesIO(content)

    target = tmp_path / "file.bin"
    digest = hashlib.sha256(content).hexdigest()
    download_file(
        "https://example.invalid/file.bin",
        target,
        sha256=digest,
        opener=opener,
        progress=lambda done, total: seen.append(done),
    )
    assert target.read_bytes() == content
    assert calls == ["https://example.invalid/file.bin"]
    assert seen[-1] == len(content)
    # A second call finds the verified file and does not download again.
    download_file("https://example.invalid/file.bin", target, sha256=digest, opener=opener)
    assert len(calls) == 1


def test_download_failure_is_a_data_error(tmp_path: Path) -> None:
    def opener(url: str) -> io.BytesIO:
        msg = "connection refused"
        raise OSError(msg)

    with pytest.raises(DataError, match=r"cannot download 'https://example\.invalid/a\.tar'"):
        download_file(
            "https://example.invalid/a.tar", tmp_path / "a.tar", sha256="0" * 64, opener=opener
        )
    assert list(tmp_path.iterdir()) == []


def _evil_tar(path: Path, name: str, *, kind: bytes = tarfile.REGTYPE, link: str = "") -> Path:
    with tarfile.open(path, "w") as tar:
        safe = tarfile.TarInfo("good/ok.txt")
        safe.size = 2
        tar.addfile(safe, io.BytesIO(b"ok"))
        info = tarfile.TarInfo(name)
        info.type = kind
        info.linkname = link
        data = b"evil" if kind == tarfile.REGTYPE else b""
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    return path


@pytest.mark.parametrize(
    ("name", "kind", "link", "match"),
    [
        ("../evil.txt", tarfile.REGTYPE, "", "escaping"),
        ("good/../../evil.txt", tarfile.REGTYPE, "", "escaping"),
        ("/tmp/evil.txt", tarfile.REGTYPE, "", "absolute"),
        ("good/link", tarfile.SYMTYPE, "/etc/passwd", "link"),
        ("good/hard", tarfile.LNKTYPE, "../../evil", "link"),
    ],
)
def test_extraction_refuses_unsafe_tar_members(
    tmp_path: Path, name: str, kind: bytes, link: str, match: str
) -> None:
    archive = _evil_tar(tmp_path / "evil.tar", name, kind=kind, link=link)
    target = tmp_path / "out" / "inner"
    with pytest.raises(DataError, match=match):
        extract_archive(archive, target)
    # Nothing was written: not the safe member, not the evil one, no staging folder.
    assert list(target.iterdir()) == []
    assert not (tmp_path / "out" / "evil.txt").exists()
    assert not (tmp_path / "evil.txt").exists()


def test_extraction_refuses_unsafe_zip_members(tmp_path: Path) -> None:
    archive = tmp_path / "evil.zip"
    with zipfile.ZipFile(archive, "w") as zipped:
        zipped.writestr("good/ok.txt", "ok")
        zipped.writestr("../evil.txt", "evil")
    with pytest.raises(DataError, match="escaping"):
        extract_archive(archive, tmp_path / "out")
    assert not (tmp_path / "evil.txt").exists()


def test_extraction_of_zip_and_existing_entries(tmp_path: Path) -> None:
    archive = tmp_path / "data.zip"
    with zipfile.ZipFile(archive, "w") as zipped:
        zipped.writestr("new/a.txt", "a")
        zipped.writestr("old/b.txt", "b")
    out = tmp_path / "out"
    (out / "old").mkdir(parents=True)
    added = extract_archive(archive, out)
    assert added == [out / "new"]
    assert (out / "new" / "a.txt").read_text() == "a"
    assert list((out / "old").iterdir()) == []


def test_corrupt_archive_is_a_data_error(tmp_path: Path) -> None:
    archive = tmp_path / "broken.tar.xz"
    archive.write_bytes(b"\xfd7zXZ\x00 truncated")
    with pytest.raises(DataError, match="cannot be extracted"):
        extract_archive(archive, tmp_path / "out")


@pytest.mark.slow
def test_mvtec_ad_loads_magnetic_tile() -> None:
    root = SHARED / "mtd"
    if not (root / "magnetic_tile").is_dir():
        pytest.skip(f"the MTD photographs are not at {root}")
    dm = MvtecAd(root, "magnetic_tile", image_size=64, eval_batch_size=64)
    dm.setup()
    train, val, test = dm.summaries
    assert train.images == 761
    assert val.images + test.images == 191 + 392
    assert val.abnormal + test.abnormal == 392
    assert val.masks + test.masks == 392
    batch = next(iter(dm.val_dataloader()))
    assert batch.image.shape == (64, 3, 64, 64)
    assert batch.gt_mask is not None
    # Four 'uneven' masks are empty in the source; every other mask marks some pixels.
    masks = [s.mask_path for s in (*dm.val_data.samples, *dm.test_data.samples) if s.mask_path]
    empty = sorted(p.stem for p in masks if not read_mask(p).any())
    assert empty == [
        "exp3_num_45042_mask",
        "exp4_num_124690_mask",
        "exp4_num_352527_mask",
        "exp4_num_45057_mask",
    ]
