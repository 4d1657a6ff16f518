"""``AnomalyModule``: the LightningModule every model subclasses."""

from __future__ import annotations

import enum
from collections.abc import Mapping
from typing import Any, ClassVar

import lightning.pytorch as pl
import torch

from anomaly._batch import Batch
from anomaly.post_processing import PostProcessor

__all__ = ["AnomalyModule", "LearningType"]


class LearningType(enum.StrEnum):
    """What a model learns from."""

    ONE_CLASS = "one_class"  # normal images only
    ZERO_SHOT = "zero_shot"
    FEW_SHOT = "few_shot"


class AnomalyModule(pl.LightningModule):
    """Base class of every model: raw scores in, normalized predictions out.

    Subclasses keep their plain ``nn.Module`` in ``self.model``, call
    ``self.save_hyperparameters()`` in ``__init__`` and implement:

    - ``forward(image)``: ``image`` (B, 3, H, W) float in [0, 1] to raw
      ``(pred_score (B,), anomaly_map (B, H, W))``; normalization of the input happens inside.
    - ``training_step(batch, batch_idx)``: a loss, or None for models fitted in one pass.
    - ``fit_end()``: optional; runs once after the training epochs and before validation
      (memory-bank models build their bank here).

    Validation teaches ``self.post_processor`` its thresholds and statistics; test and
    predict steps return the batch with normalized ``pred_score``, ``anomaly_map``,
    ``pred_label`` and ``pred_mask``.
    """

    learning_type: ClassVar[LearningType] = LearningType.ONE_CLASS
    trainer_arguments: ClassVar[dict[str, Any]] = {}

    def __init__(self) -> None:
        super().__init__()
        self.post_processor = PostProcessor()
        self._fit_pending = False
        # (height, width) the model was fitted at; prediction on files resizes to it.
        self.input_size: tuple[int, int] | None = None

    # --- to implement -------------------------------------------------------------------

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return raw ``(pred_score (B,), anomaly_map (B, H, W))`` for images in [0, 1]."""
        raise NotImplementedError

    def fit_end(self) -> None:
        """Finish fitting after the training epochs; memory-bank models build their bank."""

    # --- shared steps -------------------------------------------------------------------

    def score_batch(self, batch: Batch) -> Batch:
        """Return ``batch`` with raw ``pred_score`` and ``anomaly_map`` filled in."""
        pred_score, anomaly_map = self(batch.image)
        return batch.replace(pred_score=pred_score, anomaly_map=anomaly_map)

    def predict_batch(self, batch: Batch) -> Batch:
        """Return ``batch`` with normalized predictions, labels and masks."""
        processed: Batch = self.post_processor(self.score_batch(batch))
        return processed

    def on_train_epoch_start(self) -> None:
        """Mark that ``fit_end`` must run before the next evaluation."""
        self._fit_pending = True

    def _finish_fit(self) -> None:
        if self._fit_pending:
            self._fit_pending = False
            self.fit_end()

    def on_validation_start(self) -> None:
        """Run ``fit_end`` once the training epoch is over."""
        self._finish_fit()

    def on_train_end(self) -> None:
        """Run ``fit_end`` when training ran without validation."""
        self._finish_fit()

    def on_validation_epoch_start(self) -> None:
        """Start collecting validation predictions afresh."""
        self.post_processor.reset()

    def validation_step(self, batch: Batch, batch_idx: int) -> Batch:  # type: ignore[override]  # typed batch
        """Score a validation batch and feed the post-processor."""
        scored = self.score_batch(batch)
        self.post_processor.update(scored)
        return scored

    def on_validation_epoch_end(self) -> None:
        """Learn thresholds and normalization from the validation predictions."""
        if self.trainer is not None and self.trainer.sanity_checking:
            self.post_processor.reset()
            return
        self.post_processor.compute()

    def test_step(self, batch: Batch, batch_idx: int) -> Batch:  # type: ignore[override]  # typed batch
        """Return the batch with normalized predictions."""
        return self.predict_batch(batch)

    def predict_step(self, batch: Batch, batch_idx: int, dataloader_idx: int = 0) -> Batch:
        """Return the batch with normalized predictions."""
        return self.predict_batch(batch)

    def configure_optimizers(self) -> Any:
        """Return no optimizer: models fitted in one pass need none; trained models override."""
        return None

    def transfer_batch_to_device(
        self, batch: Any, device: torch.device, dataloader_idx: int
    ) -> Any:
        """Move a ``Batch`` (or anything Lightning knows) to ``device``."""
        if isinstance(batch, Batch):
            return batch.to(device)
        return super().transfer_batch_to_device(batch, device, dataloader_idx)

    # --- checkpoints --------------------------------------------------------------------

    def load_state_dict(
        self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False
    ) -> Any:
        """Load a state dict, first resizing buffers whose size depends on the data.

        Memory banks, Gaussian statistics and similar buffers are only known after fitting, so
        a freshly built model holds placeholders of another shape.
        """
        for key, value in state_dict.items():
            owner_name, _, leaf = key.rpartition(".")
            owner = self.get_submodule(owner_name) if owner_name else self
            if leaf in owner._buffers:
                current = owner._buffers[leaf]
                if current is None or current.shape != value.shape:
                    owner._buffers[leaf] = torch.empty_like(value)
        return super().load_state_dict(state_dict, strict=strict, assign=assign)
