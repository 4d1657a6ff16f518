"""PatchCore: nearest-neighbour search in a coreset of nominal patch embeddings.

Roth, Pemula, Zepeda, Schölkopf, Brox, Gehler (2022), "Towards Total Recall in Industrial
Anomaly Detection", CVPR, https://arxiv.org/abs/2106.08265.

One pass over the good training images collects locally aggregated patch embeddings of a
pretrained backbone; greedy k-center selection keeps a coreset of them as the memory bank. A
test patch scores its distance to the nearest bank entry; the image score is the largest patch
score, re-weighted by the density of the bank around its nearest entry (Eq. 7).

Deliberate differences from the paper:

- Backbone: ``efficientnet_lite0`` with offline weights instead of WideResNet-50, so that the
  model runs fast on a CPU and needs no download. Its stride-8 and stride-16 levels play the
  role of layer2 and layer3.
- No channel reduction by default (``embedding_dim=None``): the paper pools WideResNet's 1536
  channels to 1024 for memory and speed; lite0's levels are already narrow (40 + 112).
- Coreset: by default (``coreset_mode="approximate"``) greedy selection runs within partitions
  of ``coreset_block_size`` consecutive patches, each keeping ``coreset_ratio`` of its patches
  and reduced as soon as it fills: fitting time grows linearly with the training set and
  memory holds the coreset plus one partition. The paper's selection over all patches at once
  (``coreset_mode="exact"``) costs time ``ratio * N^2``; it runs here with a cheap lower bound
  that skips most distance updates, several times faster than brute force with the same
  result. ``benchmarks/patchcore_scaling.py`` measures both on MTD.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import Any, ClassVar

import torch

from anomaly import AnomalyModule, Batch, ConfigError, LearningType
from anomaly_models_memory._common import check_levels, gather_rows, world_size
from anomaly_models_memory.patchcore._coreset import (
    CoresetBuilder,
    CoresetMode,
    ProgressCallback,
    check_choice,
)
from anomaly_models_memory.patchcore.torch_model import BankDtype, PatchcoreNet

__all__ = ["Patchcore"]

logger = logging.getLogger(__name__)


class Patchcore(AnomalyModule):
    """PatchCore anomaly detection and localization (memory bank, one pass, no training).

    Args:
        backbone: timm model name with offline weights (see ``anomaly.backbones``).
        strides: Feature levels by stride, e.g. ``[8, 16]``; ``[16]`` alone is faster and
            scored higher on MTD.
        out_indices: timm feature indices, used instead of ``strides`` when given.
        pretrained_weights: Local weight file for the backbone; default: its weight provider.
        pretrained: Load pretrained backbone weights (False: random, only for experiments).
        coreset_ratio: Fraction of training patches kept in the memory bank, in (0, 1].
        num_neighbors: ``b`` of the image-score re-weighting (Eq. 7), at least 2; 0 scores
            images by their largest patch distance alone.
        patch_size: Side of the neighbourhood averaged into each patch embedding (odd).
        patch_padding: ``"zeros"`` averages border patches over the whole window with zero
            padding (the paper's reference code; higher image AUROC on MTD) or
            ``"exclude"`` over the cells inside the map (better localization on MTD).
        embedding_dim: Channels kept by average pooling along channels; None keeps all.
        projection_dim: Dimensions of the random projection used to select the coreset.
        coreset_block_size: Patches per partition of the approximate coreset selection.
        sigma: Gaussian smoothing of the anomaly map in pixels; 0 turns it off.
        seed: Seed of the coreset selection.
        coreset_mode: ``"approximate"`` (greedy selection within partitions: linear time,
            bounded memory) or ``"exact"`` (over all patches, as the paper; time grows with
            the square of the training set).
        memory_bank_size: Most patches kept in the memory bank; overrides ``coreset_ratio``
            when smaller. None: no cap.
        bank_dtype: ``"float32"`` or ``"float16"`` (half the memory; distances in float32).
        search_backend: ``"torch"`` or ``"faiss"`` (``faiss-cpu``; export always uses torch).
        backbone_runtime: How the backbone runs: ``"eager"``, ``"channels_last"``,
            ``"compile"`` or ``"openvino"`` (see ``anomaly.backbones.FeatureExtractor``).
        coreset_threads: CPU threads of the coreset selection; None: torch's setting. One
            thread is fastest where other processes share the cores: the selection is a long
            series of small memory-bound steps that stall when a thread is descheduled.

    Attributes:
        progress: ``progress(phase, done, total)`` callable that follows the coreset
            selection (phase ``"coreset"``); when None, the one of an ``anomaly.Engine``
            running the fit is used if there is one.
        coreset_seconds: Time the last fit spent selecting the coreset (in approximate mode
            mostly while embeddings were collected).
    """

    learning_type: ClassVar[LearningType] = LearningType.ONE_CLASS
    # One pass over the training set; no sanity validation, which would score with an
    # empty memory bank.
    trainer_arguments: ClassVar[dict[str, Any]] = {"max_epochs": 1, "num_sanity_val_steps": 0}

    def __init__(
        self,
        backbone: str = "efficientnet_lite0",
        strides: Sequence[int] | None = (8, 16),
        out_indices: Sequence[int] | None = None,
        pretrained_weights: str | os.PathLike[str] | None = None,
        pretrained: bool = True,
        coreset_ratio: float = 0.1,
        num_neighbors: int = 9,
        patch_size: int = 3,
        patch_padding: str = "zeros",
        embedding_dim: int | None = None,
        projection_dim: int = 128,
        coreset_block_size: int = 16384,
        sigma: float = 4.0,
        seed: int = 0,
        coreset_mode: str = "approximate",
        memory_bank_size: int | None = None,
        bank_dtype: str = "float32",
        search_backend: str = "torch",
        backbone_runtime: str = "eager",
        coreset_threads: int | None = 1,
    ) -> None:
        super().__init__()
        if not isinstance(coreset_ratio, int | float) or not 0.0 < coreset_ratio <= 1.0:
            msg = f"coreset_ratio must lie in (0, 1], got {coreset_ratio!r}; e.g. 0.1"
            raise ConfigError(msg)
        if not isinstance(num_neighbors, int) or num_neighbors < 0 or num_neighbors == 1:
            msg = (
                f"num_neighbors must be 0 (no re-weighting) or at least 2, got "
                f"{num_neighbors!r}; the paper uses 9"
            )
            raise ConfigError(msg)
        if not isinstance(patch_size, int) or patch_size < 1 or patch_size % 2 == 0:
            msg = f"patch_size must be a positive odd int, got {patch_size!r}; e.g. 3"
            raise ConfigError(msg)
        for name, value in (
            ("projection_dim", projection_dim),
            ("coreset_block_size", coreset_block_size),
        ):
            if not isinstance(value, int) or value < 1:
                msg = f"{name} must be a positive int, got {value!r}"
                raise ConfigError(msg)
        for name, optional in (
            ("memory_bank_size", memory_bank_size),
            ("coreset_threads", coreset_threads),
        ):
            if optional is not None and (
                not isinstance(optional, int) or isinstance(optional, bool) or optional < 1
            ):
                msg = f"{name} must be a positive int or None, got {optional!r}"
                raise ConfigError(msg)
        if not isinstance(sigma, int | float) or sigma < 0:
            msg = f"sigma must be >= 0 pixels, got {sigma!r}; e.g. 4"
            raise ConfigError(msg)
        strides = check_levels("strides", strides)
        out_indices = check_levels("out_indices", out_indices, minimum=0)
        self.save_hyperparameters()
        self.coreset_ratio = float(coreset_ratio)
        self.projection_dim = projection_dim
        self.coreset_block_size = coreset_block_size
        self.coreset_mode = check_choice("coreset_mode", coreset_mode, CoresetMode)
        self.memory_bank_size = memory_bank_size
        self.coreset_threads = coreset_threads
        self.seed = seed
        self.progress: ProgressCallback | None = None
        self.coreset_seconds = 0.0
        self.model = PatchcoreNet(
            backbone,
            strides,
            out_indices=out_indices,
            pretrained=pretrained,
            pretrained_weights=pretrained_weights,
            patch_size=patch_size,
            patch_padding=patch_padding,
            embedding_dim=embedding_dim,
            num_neighbors=num_neighbors,
            sigma=sigma,
            bank_dtype=check_choice("bank_dtype", bank_dtype, BankDtype),
            search_backend=search_backend,
            runtime=backbone_runtime,
        )
        self._builder: CoresetBuilder | None = None

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return raw ``(pred_score (B,), anomaly_map (B, H, W))`` for images in [0, 1]."""
        return self.model(image)  # type: ignore[no-any-return]  # nn.Module.__call__ is untyped

    def on_train_epoch_start(self) -> None:
        """Start collecting embeddings afresh (and mark that ``fit_end`` must run)."""
        super().on_train_epoch_start()
        self._builder = None

    def training_step(self, batch: Batch, batch_idx: int) -> None:
        """Collect the patch embeddings of a batch of good images; there is no loss."""
        self.collect(batch.image)

    def _new_builder(self) -> CoresetBuilder:
        return CoresetBuilder(
            self.model.embedding_dim,
            ratio=self.coreset_ratio,
            mode=self.coreset_mode,
            max_size=self.memory_bank_size,
            min_size=self.model.num_neighbors,
            projection_dim=self.projection_dim,
            block_size=self.coreset_block_size,
            seed=self.seed,
            device=self.device,
            threads=self.coreset_threads,
            progress=self._progress(),
        )

    def _progress(self) -> ProgressCallback | None:
        """Return ``self.progress``, else the progress callback of the running Engine."""
        if self.progress is not None:
            return self.progress
        try:
            trainer = self.trainer
        except RuntimeError:  # not attached to a Trainer: fitted by hand
            return None
        # anomaly.Engine forwards batch progress through a callback holding its
        # ``progress(phase, done, total)`` callable.
        for callback in trainer.callbacks:  # type: ignore[attr-defined]  # Lightning: untyped
            candidate = getattr(callback, "progress", None)
            if callable(candidate):
                return candidate  # type: ignore[no-any-return]  # checked callable
        return None

    def collect(self, image: torch.Tensor) -> None:
        """Add the patch embeddings of ``image`` ((B, 3, H, W) float in [0, 1]) to the pool."""
        with torch.no_grad():
            embedding = self.model.embed(image)
        flat = embedding.permute(0, 2, 3, 1).reshape(-1, embedding.shape[1])
        if self._builder is None:
            self._builder = self._new_builder()
        self._builder.add(flat)

    def fit_end(self) -> None:
        """Build the memory bank from the collected embeddings by coreset selection."""
        builder, self._builder = self._builder, None
        if builder is None or builder.rows_seen == 0:
            msg = "PatchCore saw no training images; give the datamodule a non-empty train split"
            raise ConfigError(msg)
        # Data-parallel fitting: every process builds the same bank from all processes' rows.
        gather = None
        if world_size() > 1:
            device = self.device

            def gather(rows: torch.Tensor) -> torch.Tensor:
                return gather_rows(rows.to(device)).cpu()

        bank = builder.finish(gather)
        self.coreset_seconds = builder.seconds
        self.model.set_memory_bank(bank.to(self.device))
        logger.info(
            "PatchCore memory bank: %d of %d patch embeddings (%d dimensions, %s, %s)",
            bank.shape[0],
            builder.rows_seen,
            bank.shape[1],
            self.coreset_mode.value,
            self.model.bank_dtype.value,
        )
