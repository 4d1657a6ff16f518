"""Metrics: hand-computed cases, agreement with scikit-learn, edge cases and registration."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from scipy import ndimage
from sklearn.metrics import f1_score, precision_recall_curve, roc_auc_score

from anomaly import Batch, ConfigError, DataError, PluginManager, builtin
from anomaly.metrics import (
    AUPRO,
    AnomalyMetric,
    ImageAUROC,
    ImageF1,
    ImageF1Max,
    PixelAUROC,
    PixelF1Max,
    _functional,
)


def image_batch(
    scores: list[float] | np.ndarray,
    labels: list[int] | np.ndarray | None,
    *,
    raw: list[float] | np.ndarray | None = None,
    pred_label: list[int] | np.ndarray | None = None,
) -> Batch:
    count = len(scores)
    return Batch(
        image=torch.zeros(count, 3, 2, 2),
        gt_label=None if labels is None else torch.as_tensor(np.asarray(labels), dtype=torch.int64),
        pred_score=torch.as_tensor(np.asarray(scores), dtype=torch.float32),
        raw_score=None if raw is None else torch.as_tensor(np.asarray(raw), dtype=torch.float32),
        pred_label=None
        if pred_label is None
        else torch.as_tensor(np.asarray(pred_label), dtype=torch.int64),
    )


def pixel_batch(
    maps: np.ndarray,
    masks: np.ndarray | None,
    labels: list[int] | None = None,
    *,
    raw: np.ndarray | None = None,
) -> Batch:
    maps = np.asarray(maps, dtype=np.float32)
    count, height, width = maps.shape
    if labels is None and masks is not None:
        labels = [int(mask.any()) for mask in masks]
    return Batch(
        image=torch.zeros(count, 3, height, width),
        gt_label=None if labels is None else torch.tensor(labels),
        gt_mask=None if masks is None else torch.from_numpy(np.asarray(masks, dtype=bool)),
        anomaly_map=torch.from_numpy(np.clip(maps, 0, 1)),
        raw_map=None if raw is None else torch.from_numpy(np.asarray(raw, dtype=np.float32)),
    )


def sklearn_f1_max(labels: np.ndarray, scores: np.ndarray) -> float:
    precision, recall, _ = precision_recall_curve(labels, scores)
    with np.errstate(invalid="ignore", divide="ignore"):
        f1 = np.where(precision + recall > 0, 2 * precision * recall / (precision + recall), 0)
    return float(f1.max())


def random_pixels(seed: int, count: int = 6, size: int = 24) -> tuple[np.ndarray, np.ndarray]:
    """Maps with blob-shaped defects whose scores overlap the normal ones (not separable)."""
    rng = np.random.default_rng(seed)
    masks = np.zeros((count, size, size), dtype=bool)
    for index in range(1, count):
        for _ in range(int(rng.integers(1, 4))):
            top, left = rng.integers(0, size - 6, size=2)
            height, width = rng.integers(1, 7, size=2)
            masks[index, top : top + height, left : left + width] = True
    maps = rng.normal(size=masks.shape) + 1.5 * masks
    # Coarse rounding makes many exact ties, inside and across classes.
    maps = np.round(maps, 1).astype(np.float32)
    return maps, masks


# --- image level --------------------------------------------------------------------------


def test_image_auroc_hand_case():
    metric = ImageAUROC()
    # Positive 0.35 beats one of two negatives, 0.8 beats both: 3 of 4 pairs.
    metric.update(image_batch([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]))
    assert metric.compute() == pytest.approx(0.75)
    assert metric.reason is None


def test_image_auroc_ties_count_half():
    metric = ImageAUROC()
    metric.update(image_batch([0.5, 0.5, 0.2], [0, 1, 0]))
    # The positive ties one negative (1/2) and beats the other (1): 1.5 of 2 pairs.
    assert metric.compute() == pytest.approx(0.75)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_image_auroc_and_f1_max_match_sklearn_over_batches(seed: int):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, size=97)
    labels[:2] = [0, 1]
    scores = np.round(rng.normal(size=97) + labels, 1)
    auroc, f1_max = ImageAUROC(), ImageF1Max()
    for start in range(0, 97, 16):
        batch = image_batch(scores[start : start + 16], labels[start : start + 16])
        auroc.update(batch)
        f1_max.update(batch)
    scores32 = scores.astype(np.float32)
    assert auroc.compute() == pytest.approx(roc_auc_score(labels, scores32), abs=1e-12)
    assert f1_max.compute() == pytest.approx(sklearn_f1_max(labels, scores32), abs=1e-12)


def test_threshold_free_metrics_rank_by_raw_score():
    # pred_score is clipped to 1 for both anomalous images; only raw_score separates them.
    batch = image_batch([0.0, 1.0, 1.0], [0, 0, 1], raw=[0.1, 3.0, 7.0])
    auroc, f1_max = ImageAUROC(), ImageF1Max()
    auroc.update(batch)
    f1_max.update(batch)
    assert auroc.compute() == 1.0
    assert f1_max.compute() == 1.0
    clipped = ImageAUROC()
    clipped.update(image_batch([0.0, 1.0, 1.0], [0, 0, 1]))
    assert clipped.compute() == pytest.approx(0.75)


def test_image_f1_max_hand_case():
    metric = ImageF1Max()
    # Threshold 0.9 flags one of two positives: 2 TP / (2 TP + FP + FN) = 2 / 3; threshold 0.3
    # flags {0.9, 0.6, 0.3}: TP 2, FP 1, FN 0 -> 4 / 5; threshold 0.1 flags all: 4 / 6.
    metric.update(image_batch([0.9, 0.6, 0.3, 0.1], [1, 0, 1, 0]))
    assert metric.compute() == pytest.approx(0.8)


def test_image_f1_uses_predicted_labels_and_matches_sklearn():
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 2, size=50)
    predicted = np.where(rng.random(50) < 0.8, labels, 1 - labels)
    metric = ImageF1()
    # Scores are irrelevant to image_f1: give it ones that would rank perfectly.
    metric.update(image_batch(labels.astype(float), labels, pred_label=predicted))
    assert metric.compute() == pytest.approx(f1_score(labels, predicted))
    hand = ImageF1()
    # TP 1, FP 1, FN 1: 2 / (2 + 1 + 1).
    hand.update(image_batch([0, 0, 0, 0], [1, 1, 0, 0], pred_label=[1, 0, 1, 0]))
    assert hand.compute() == pytest.approx(0.5)


def test_image_f1_without_pred_label_is_a_data_error():
    with pytest.raises(DataError, match="pred_label"):
        ImageF1().update(image_batch([0.5], [1]))


def test_image_metrics_without_scores_are_a_data_error():
    batch = Batch(image=torch.zeros(1, 3, 2, 2), gt_label=torch.tensor([1]))
    with pytest.raises(DataError, match="pred_score"):
        ImageAUROC().update(batch)


def test_image_metric_rejects_nan_scores():
    with pytest.raises(DataError, match="1 of 2 image scores are NaN"):
        ImageAUROC().update(image_batch([0.5, float("nan")], [0, 1]))


@pytest.mark.parametrize(
    ("metric_type", "labels", "reason"),
    [
        (ImageAUROC, [0, 0], "no anomalous images"),
        (ImageAUROC, [1, 1], "no normal images"),
        (ImageF1Max, [0, 0], "no anomalous images"),
        (ImageF1, [0, 0], "no anomalous images"),
        (ImageAUROC, None, "no labels"),
    ],
)
def test_undefined_image_metric_is_nan_with_reason(metric_type, labels, reason):
    metric = metric_type()
    metric.update(image_batch([0.2, 0.7], labels, pred_label=[0, 1]))
    assert math.isnan(metric.compute())
    assert metric.reason == reason


def test_metric_without_data_is_nan_and_reason_clears_after_success():
    metric = ImageAUROC()
    assert math.isnan(metric.compute())
    assert metric.reason == "no images"
    metric.update(image_batch([0.2, 0.7], [0, 1]))
    assert metric.compute() == 1.0
    assert metric.reason is None


def test_reset_forgets_batches():
    metric = ImageAUROC()
    metric.update(image_batch([0.9, 0.1], [0, 1]))
    assert metric.compute() == 0.0
    metric.reset()
    metric.update(image_batch([0.1, 0.9], [0, 1]))
    assert metric.compute() == 1.0


def test_image_metric_rejects_mismatched_label_count():
    batch = Batch(
        image=torch.zeros(2, 3, 2, 2), gt_label=torch.tensor([0, 1]), pred_score=torch.ones(3)
    )
    with pytest.raises(DataError, match="3 predictions for 2 labels"):
        ImageAUROC().update(batch)


# --- pixel level --------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1])
def test_pixel_auroc_and_f1_max_match_sklearn(seed: int):
    maps, masks = random_pixels(seed)
    auroc, f1_max = PixelAUROC(), PixelF1Max()
    for start in range(0, len(maps), 4):
        # Post-processed maps are clipped to [0, 1]; the metrics must read raw_map.
        batch = pixel_batch(
            maps[start : start + 4], masks[start : start + 4], raw=maps[start : start + 4]
        )
        auroc.update(batch)
        f1_max.update(batch)
    expected_auroc = roc_auc_score(masks.ravel(), maps.ravel())
    assert abs(auroc.compute() - expected_auroc) < 1e-4
    assert auroc.compute() == pytest.approx(expected_auroc, abs=1e-12)
    assert f1_max.compute() == pytest.approx(sklearn_f1_max(masks.ravel(), maps.ravel()), abs=1e-12)


def test_pixel_metric_shape_mismatch_names_both_shapes():
    batch = Batch(
        image=torch.zeros(1, 3, 8, 8),
        gt_label=torch.tensor([1]),
        gt_mask=torch.zeros(1, 8, 8, dtype=torch.bool),
        anomaly_map=torch.zeros(1, 4, 4),
    )
    with pytest.raises(DataError, match=r"\(1, 8, 8\).*\(1, 4, 4\)"):
        PixelAUROC().update(batch)


def test_pixel_metric_accepts_a_channel_axis():
    maps, masks = random_pixels(4, count=3, size=8)
    batch = Batch(
        image=torch.zeros(3, 3, 8, 8),
        gt_label=torch.tensor([0, 1, 1]),
        gt_mask=torch.from_numpy(masks)[:, None],
        anomaly_map=torch.from_numpy(maps)[:, None],
    )
    metric = PixelAUROC()
    metric.update(batch)
    assert metric.compute() == pytest.approx(roc_auc_score(masks.ravel(), maps.ravel()))


def test_pixel_metric_rejects_nan_scores():
    maps = np.zeros((1, 2, 2), dtype=np.float32)
    maps[0, 0, 0] = np.nan
    with pytest.raises(DataError, match="pixel scores are NaN"):
        PixelAUROC().update(pixel_batch(maps, np.zeros((1, 2, 2), bool)))


def test_pixel_metrics_without_masks_are_nan():
    metric = PixelAUROC()
    metric.update(pixel_batch(np.ones((2, 4, 4)), None, [0, 1]))
    assert math.isnan(metric.compute())
    assert metric.reason == "no masks"


def test_mask_less_normal_batches_count_as_normal_pixels():
    with_masks = np.zeros((1, 2, 2), dtype=bool)
    with_masks[0, 0, 0] = True
    metric = PixelAUROC()
    metric.update(pixel_batch(np.array([[[0.9, 0.1], [0.1, 0.1]]]), with_masks))
    # A normal image without a mask: all its pixels are normal, one outscores the defect.
    metric.update(pixel_batch(np.array([[[0.95, 0.0], [0.0, 0.0]]]), None, [0]))
    # An anomalous image without a mask is skipped: its defects are unknown.
    metric.update(pixel_batch(np.array([[[0.0, 0.0], [0.0, 0.0]]]), None, [1]))
    # The defect (0.9) beats 6 of 7 normal pixels.
    assert metric.compute() == pytest.approx(6 / 7)


@pytest.mark.parametrize(
    ("metric_type", "masks", "reason"),
    [
        (PixelAUROC, np.zeros((1, 2, 2), bool), "no defective pixels"),
        (PixelAUROC, np.ones((1, 2, 2), bool), "no normal pixels"),
        (PixelF1Max, np.zeros((1, 2, 2), bool), "no defective pixels"),
        (AUPRO, np.ones((1, 2, 2), bool), "no normal pixels"),
        (AUPRO, np.zeros((1, 2, 2), bool), "no defective pixels"),
    ],
)
def test_undefined_pixel_metric_is_nan_with_reason(metric_type, masks, reason):
    metric = metric_type()
    metric.update(pixel_batch(np.full((1, 2, 2), 0.5), masks))
    assert math.isnan(metric.compute())
    assert metric.reason == reason


# --- AUPRO ---------------------------------------------------------------------------------


def two_region_case() -> tuple[np.ndarray, np.ndarray]:
    """A 2 x 4 image: region A is one pixel, region B two; five normal pixels.

    Scores: A 0.9; B 0.8 and 0.3; normal 0.7, 0.6, 0.2, 0.1, 0.05. Walking the threshold
    down, the curve (FPR, PRO) runs (0, 0) -> (0, 0.5) -> (0, 0.75) -> (0.2, 0.75) ->
    (0.4, 0.75) -> (0.4, 1) -> (0.6, 1) -> (0.8, 1) -> (1, 1).
    """
    masks = np.array([[[1, 0, 0, 1], [0, 0, 0, 1]]], dtype=bool)
    maps = np.array([[[0.9, 0.7, 0.6, 0.8], [0.2, 0.1, 0.05, 0.3]]])
    return maps, masks


@pytest.mark.parametrize(
    ("fpr_limit", "expected"),
    [
        (1.0, 0.4 * 0.75 + 0.6 * 1.0),
        (0.5, (0.4 * 0.75 + 0.1 * 1.0) / 0.5),
        (0.3, 0.75),
    ],
)
def test_aupro_hand_case(fpr_limit: float, expected: float):
    metric = AUPRO(fpr_limit=fpr_limit)
    metric.update(pixel_batch(*two_region_case()))
    assert metric.compute() == pytest.approx(expected)


def test_aupro_counts_normal_pixels_of_every_image():
    maps, masks = two_region_case()
    normal = np.zeros_like(maps)
    metric = AUPRO(fpr_limit=1.0)
    metric.update(
        pixel_batch(np.concatenate([maps, normal]), np.concatenate([masks, np.zeros_like(masks)]))
    )
    # 13 normal pixels now; the eight zeros come last, so the curve reaches PRO 1 at FPR 2/13.
    assert metric.compute() == pytest.approx((2 / 13 * 0.75 + 11 / 13) / 1.0)


def test_aupro_interpolates_a_tied_segment_at_the_limit():
    # The defect ties one of two normal pixels: one diagonal segment (0, 0) -> (0.5, 1).
    maps = np.array([[[0.5, 0.5, 0.1]]])
    masks = np.array([[[True, False, False]]])
    for fpr_limit, expected in [(0.25, 0.25), (1.0, 0.75)]:
        metric = AUPRO(fpr_limit=fpr_limit)
        metric.update(pixel_batch(maps, masks))
        assert metric.compute() == pytest.approx(expected)


def test_aupro_joins_diagonal_pixels_into_one_region():
    # With 4-connectivity these would be two regions and the PRO at 0.9 would be 0.5.
    masks = np.array([[[1, 0, 0], [0, 1, 0], [0, 0, 0]]], dtype=bool)
    maps = np.array([[[0.9, 0.1, 0.1], [0.1, 0.2, 0.1], [0.1, 0.1, 0.3]]])
    metric = AUPRO(fpr_limit=1.0)
    metric.update(pixel_batch(maps, masks))
    # One region: PRO 0.5 at FPR 0, then FPR 1/7 (0.3), then PRO 1 at FPR 1/7 (0.2).
    assert metric.compute() == pytest.approx(0.5 * (0.5 + 0.5) / 7 + 6 / 7)


def test_aupro_weighs_regions_equally_not_pixels():
    masks = np.zeros((1, 6, 6), dtype=bool)
    masks[0, :4, :4] = True  # 16 pixels, found
    masks[0, 5, 5] = True  # one pixel, missed
    maps = np.where(masks, 1.0, 0.5)
    maps[0, 5, 5] = 0.0
    metric = AUPRO(fpr_limit=1.0)
    metric.update(pixel_batch(maps, masks))
    # PRO 0.5 until every normal pixel is flagged, then 1 at FPR 1.
    assert metric.compute() == pytest.approx(0.5)


def reference_aupro(maps: np.ndarray, masks: np.ndarray, fpr_limit: float) -> float:
    """Straightforward AUPRO: one full pass over the images per threshold."""
    regions = []  # (image index, region mask)
    for index, mask in enumerate(masks):
        labelled, count = ndimage.label(mask, structure=np.ones((3, 3)))
        regions += [(index, labelled == label) for label in range(1, count + 1)]
    normal = maps[~masks]
    points = [(0.0, 0.0)]
    for threshold in np.unique(maps)[::-1]:
        fpr = float(np.mean(normal >= threshold))
        pro = np.mean([np.mean(maps[image][region] >= threshold) for image, region in regions])
        points.append((fpr, float(pro)))
    area = 0.0
    for (x0, y0), (x1, y1) in itertools.pairwise(points):
        if x0 >= fpr_limit:
            break
        if x1 > fpr_limit:
            y1 = y0 + (y1 - y0) * (fpr_limit - x0) / (x1 - x0)
            x1 = fpr_limit
        area += (x1 - x0) * (y0 + y1) / 2
    return area / fpr_limit


@pytest.mark.parametrize(("seed", "fpr_limit"), [(0, 0.3), (1, 0.3), (2, 0.05), (3, 1.0)])
def test_aupro_matches_a_direct_computation(seed: int, fpr_limit: float):
    maps, masks = random_pixels(seed, count=5, size=16)
    metric = AUPRO(fpr_limit=fpr_limit)
    for start in range(0, len(maps), 2):
        metric.update(
            pixel_batch(
                maps[start : start + 2], masks[start : start + 2], raw=maps[start : start + 2]
            )
        )
    assert metric.compute() == pytest.approx(reference_aupro(maps, masks, fpr_limit), abs=1e-9)


def test_aupro_of_a_perfect_model_is_one():
    maps, masks = random_pixels(5, count=4, size=16)
    metric = AUPRO()
    metric.update(pixel_batch(masks.astype(np.float32) + 0.01 * maps, masks))
    assert metric.compute() == pytest.approx(1.0)


def test_aupro_with_unit_weights_and_full_range_equals_auroc():
    maps, masks = random_pixels(6)
    aupro, auroc = AUPRO(fpr_limit=1.0), PixelAUROC()
    # Single-pixel regions make every defective pixel weigh the same, as in the ROC curve.
    single = np.zeros_like(masks)
    single[:, ::2, ::2] = masks[:, ::2, ::2]
    for metric in (aupro, auroc):
        metric.update(pixel_batch(maps, single))
    assert aupro.compute() == pytest.approx(auroc.compute(), abs=1e-12)


@pytest.mark.parametrize("fpr_limit", [0.0, -0.1, 1.5, "0.3", True, float("nan")])
def test_aupro_rejects_bad_fpr_limit(fpr_limit):
    with pytest.raises(ConfigError, match=r"aupro\.fpr_limit"):
        AUPRO(fpr_limit=fpr_limit)


def test_compute_is_repeatable_and_more_batches_can_follow():
    maps, masks = random_pixels(7)
    metric = AUPRO()
    metric.update(pixel_batch(maps[:3], masks[:3]))
    first = metric.compute()
    assert metric.compute() == first
    metric.update(pixel_batch(maps[3:], masks[3:]))
    whole = AUPRO()
    whole.update(pixel_batch(maps, masks))
    assert metric.compute() == pytest.approx(whole.compute(), abs=1e-12)


# --- registration --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "level"),
    [
        ("image_auroc", "image"),
        ("image_f1", "image"),
        ("image_f1_max", "image"),
        ("pixel_auroc", "pixel"),
        ("pixel_f1_max", "pixel"),
        ("aupro", "pixel"),
    ],
)
def test_registered_metrics_load_and_build_with_defaults(name: str, level: str):
    manager = PluginManager(discover=False)
    manager.register(builtin, "core", distribution="anomaly-core")
    spec = manager.metric(name)
    metric_type = spec.load()
    assert isinstance(metric_type, type)
    assert issubclass(metric_type, AnomalyMetric)
    metric = metric_type()
    assert (metric.name, metric.level, spec.level) == (name, level, level)
    assert math.isnan(metric.compute())


def test_chunked_kernels_give_the_same_values(monkeypatch: pytest.MonkeyPatch):
    maps, masks = random_pixels(8)
    metrics = [PixelAUROC(), PixelF1Max(), AUPRO(), AUPRO(fpr_limit=1.0)]
    whole = []
    for metric in metrics:
        metric.update(pixel_batch(maps, masks))
        whole.append(metric.compute())
    # Tiny chunks run every slice loop many times; the result must not depend on them.
    monkeypatch.setattr(_functional, "_CHUNK", 7)
    assert [metric.compute() for metric in metrics] == pytest.approx(whole, abs=1e-12)
