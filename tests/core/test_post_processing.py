from __future__ import annotations

import pytest
import torch
from sklearn.metrics import precision_recall_curve

from anomaly import Batch, ConfigError
from anomaly.post_processing import PostProcessor, f1_optimal_threshold, normalize


def test_f1_optimal_threshold_matches_hand_computation():
    scores = torch.tensor([0.1, 0.4, 0.35, 0.8, 0.7, 0.2])
    labels = torch.tensor([0, 0, 1, 1, 1, 0])
    threshold, f1 = f1_optimal_threshold(scores, labels)
    # At >= 0.35 the prediction is {0.35, 0.4, 0.7, 0.8}: tp 3, fp 1, fn 0 -> F1 = 6/7.
    assert threshold == pytest.approx(0.35)
    assert f1 == pytest.approx(6 / 7)


def test_f1_optimal_threshold_agrees_with_scikit_learn():
    generator = torch.Generator().manual_seed(0)
    labels = (torch.rand(500, generator=generator) < 0.3).long()
    scores = torch.randn(500, generator=generator) + labels * 1.5
    scores = torch.round(scores * 10) / 10  # ties
    _, f1 = f1_optimal_threshold(scores, labels)
    precision, recall, _ = precision_recall_curve(labels.numpy(), scores.numpy())
    f1_sklearn = (2 * precision * recall / (precision + recall + 1e-12)).max()
    assert f1 == pytest.approx(float(f1_sklearn), abs=1e-9)


def test_normalize_puts_threshold_at_half_and_clips():
    values = torch.tensor([0.0, 2.0, 4.0, 100.0])
    out = normalize(values, torch.tensor(2.0), torch.tensor(0.0), torch.tensor(4.0))
    assert out.tolist() == [0.0, 0.5, 1.0, 1.0]


def _batch(scores, labels, maps, masks=None):
    return Batch(
        image=torch.zeros(len(scores), 3, 4, 4),
        gt_label=torch.tensor(labels),
        gt_mask=masks,
        pred_score=torch.tensor(scores, dtype=torch.float32),
        anomaly_map=maps,
    )


def test_post_processor_learns_f1_threshold_and_normalizes():
    maps = torch.zeros(4, 4, 4)
    maps[2:, :2, :2] = 5.0
    masks = maps > 0
    processor = PostProcessor()
    processor.update(_batch([0.1, 0.2, 0.9, 0.8], [0, 0, 1, 1], maps, masks))
    processor.compute()
    assert float(processor.image_threshold) == pytest.approx(0.8)
    assert float(processor.pixel_threshold) == pytest.approx(5.0)
    out = processor(_batch([0.1, 0.85], [0, 1], maps[1:3], masks[1:3]))
    assert out.pred_label.tolist() == [0, 1]
    assert out.pred_mask[1].sum() == 4
    assert not out.pred_mask[0].any()
    assert float(out.pred_score.min()) >= 0
    assert float(out.pred_score.max()) <= 1
    assert out.raw_score is not None
    assert out.raw_score[1] == pytest.approx(0.85)


def test_post_processor_uses_normal_quantile_without_anomalies():
    processor = PostProcessor(normal_quantile=0.5)
    scores = [1.0, 2.0, 3.0, 4.0, 5.0]
    processor.update(_batch(scores, [0] * 5, torch.arange(5 * 16.0).reshape(5, 4, 4)))
    processor.compute()
    assert float(processor.image_threshold) == pytest.approx(3.0)
    assert bool(processor.fitted)


def test_post_processor_state_travels_in_state_dict():
    processor = PostProcessor()
    processor.update(_batch([0.1, 0.9], [0, 1], torch.rand(2, 4, 4)))
    processor.compute()
    fresh = PostProcessor()
    fresh.load_state_dict(processor.state_dict())
    assert float(fresh.image_threshold) == float(processor.image_threshold)
    assert bool(fresh.fitted)


@pytest.mark.parametrize("kwargs", [{"normal_quantile": 1.5}, {"max_pixels": 0}])
def test_post_processor_rejects_bad_options(kwargs):
    with pytest.raises(ConfigError):
        PostProcessor(**kwargs)
