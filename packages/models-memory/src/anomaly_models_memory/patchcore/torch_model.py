"""PatchCore's maths as a plain ``nn.Module``: patch embeddings, nearest neighbours, Eq. 7."""

from __future__ import annotations

import enum
import logging
import os
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from anomaly import ConfigError
from anomaly.backbones import FeatureExtractor, imagenet_normalize
from anomaly_models_memory._common import GaussianBlur2d, NotFittedError, embedding_stack
from anomaly_models_memory.patchcore._coreset import (
    check_choice,
    greedy_coreset,
    sparse_random_projection,
)
from anomaly_models_memory.patchcore._search import (
    FaissSearch,
    SearchBackend,
    check_faiss,
    exporting,
    nearest_neighbors,
)

if TYPE_CHECKING:
    from anomaly import PluginManager

__all__ = [
    "BankDtype",
    "PatchPadding",
    "PatchcoreNet",
    "SearchBackend",
    "greedy_coreset",
    "nearest_neighbors",
    "reweight_scores",
    "sparse_random_projection",
]

logger = logging.getLogger(__name__)

Search = Callable[[torch.Tensor, int], tuple[torch.Tensor, torch.Tensor]]
"""``search(query (Q, D), k) -> (distances (Q, k), indices (Q, k))`` over the memory bank."""


class BankDtype(enum.StrEnum):
    """Storage type of the memory bank; distances are always computed in float32."""

    FLOAT32 = "float32"
    FLOAT16 = "float16"

    @property
    def torch_dtype(self) -> torch.dtype:
        """The matching ``torch.dtype``."""
        return torch.float16 if self is BankDtype.FLOAT16 else torch.float32


class PatchPadding(enum.StrEnum):
    """How a border patch averages its neighbourhood, part of which lies outside the map.

    - ``zeros``: over the whole window, the outside counted as zeros (PatchCore's reference
      code and Anomalib): border embeddings shrink, which sets them apart from inner ones.
    - ``exclude``: over the cells inside the map only.

    On MTD's magnetic tiles (100 training images, exact coreset, 256 px) ``zeros`` scored
    image AUROC 0.838 against 0.819, and ``exclude`` localized better: pixel AUROC 0.753
    against 0.734, AUPRO 0.636 against 0.534.
    """

    ZEROS = "zeros"
    EXCLUDE = "exclude"


def reweight_scores(
    patch_scores: torch.Tensor,
    nearest: torch.Tensor,
    embedding: torch.Tensor,
    bank: torch.Tensor,
    num_neighbors: int,
    search: Search | None = None,
) -> torch.Tensor:
    """Return image scores re-weighted as in PatchCore, Eq. 7.

    For the most anomalous patch ``m_test*`` of an image (score ``s* = d(m_test*, m*)``, with
    ``m*`` its nearest bank row), ``s = (1 - exp(s*) / sum_{m in N_b(m*)} exp(d(m_test*, m))) s*``,
    where ``N_b(m*)`` are the ``b = num_neighbors`` bank rows nearest to ``m*`` (``m*`` itself
    among them). The score grows when ``m*`` lies in a sparse region of the bank.

    Args:
        patch_scores: (B, P) distance of each patch to its nearest bank row.
        nearest: (B, P) int64 index of that bank row.
        embedding: (B, P, D) patch embeddings.
        bank: (M, D) memory bank (float32 or float16).
        num_neighbors: ``b``, at least 2 and at most M.
        search: Neighbour search over ``bank``; default ``nearest_neighbors``.

    Returns:
        (B,) image scores.
    """
    max_score, position = patch_scores.max(dim=1)
    batch = torch.arange(patch_scores.shape[0], device=patch_scores.device)
    anchor = nearest[batch, position]  # index of m* for each image
    worst_patch = embedding[batch, position]  # m_test*, (B, D)
    anchors = bank[anchor].float()
    if search is None:
        _, support = nearest_neighbors(anchors, bank, k=num_neighbors)  # N_b(m*), (B, b)
    else:
        _, support = search(anchors, num_neighbors)
    distances = torch.linalg.vector_norm(worst_patch.unsqueeze(1) - bank[support].float(), dim=2)
    # exp(s*) / sum exp(d): computed as exp(s* - logsumexp(d)) so large distances cannot overflow.
    ratio = torch.exp(max_score - torch.logsumexp(distances, dim=1))
    return (1.0 - ratio) * max_score


class PatchcoreNet(nn.Module):
    """Score images against a memory bank of nominal patch embeddings.

    Patch embeddings are backbone feature maps of the chosen strides, each averaged over a
    ``patch_size`` neighbourhood, resized to the largest map and concatenated (then, when
    ``embedding_dim`` is smaller, average-pooled along channels). ``memory_bank`` is empty
    until ``set_memory_bank`` (the Lightning module's ``fit_end``) or ``load_state_dict``.

    Args:
        backbone: timm model name.
        strides: Feature levels by stride.
        out_indices: timm feature indices, used instead of ``strides`` when given.
        pretrained: Load pretrained weights (see ``anomaly.backbones.FeatureExtractor``).
        pretrained_weights: Local weight file for the backbone.
        patch_size: Side of the local neighbourhood averaged into each patch (odd).
        patch_padding: How border patches average their neighbourhood (see ``PatchPadding``).
        embedding_dim: Channels kept by average pooling along channels; None keeps all.
        num_neighbors: ``b`` of the image-score re-weighting (Eq. 7); 0 turns it off.
        sigma: Gaussian smoothing of the anomaly map, in input pixels; 0 turns it off.
        bank_dtype: Storage of the memory bank, ``"float32"`` or ``"float16"`` (half the
            memory; distances are still computed in float32).
        search_backend: ``"torch"`` (blocked, exportable) or ``"faiss"`` (``IndexFlatL2``;
            export always uses torch).
        runtime: How the backbone runs (``anomaly.backbones.FeatureExtractor``): ``"eager"``,
            ``"channels_last"``, ``"compile"`` or ``"openvino"``.
        plugin_manager: Where to look up backbone weight providers.
    """

    memory_bank: torch.Tensor

    def __init__(
        self,
        backbone: str = "efficientnet_lite0",
        strides: Sequence[int] | None = (8, 16),
        *,
        out_indices: Sequence[int] | None = None,
        pretrained: bool = True,
        pretrained_weights: str | os.PathLike[str] | None = None,
        patch_size: int = 3,
        patch_padding: str = "zeros",
        embedding_dim: int | None = None,
        num_neighbors: int = 9,
        sigma: float = 4.0,
        bank_dtype: BankDtype | str = BankDtype.FLOAT32,
        search_backend: SearchBackend | str = SearchBackend.TORCH,
        runtime: str = "eager",
        plugin_manager: PluginManager | None = None,
    ) -> None:
        super().__init__()
        self.bank_dtype = check_choice("bank_dtype", bank_dtype, BankDtype)
        self.search_backend = check_choice("search_backend", search_backend, SearchBackend)
        if self.search_backend is SearchBackend.FAISS:
            check_faiss()
        self.feature_extractor = FeatureExtractor(
            backbone,
            strides,
            out_indices=out_indices,
            pretrained=pretrained,
            pretrained_weights=pretrained_weights,
            plugin_manager=plugin_manager,
            runtime=runtime,
        )
        channels = sum(self.feature_extractor.channels)
        if embedding_dim is not None and not 1 <= embedding_dim <= channels:
            msg = (
                f"embedding_dim {embedding_dim!r} must lie in [1, {channels}] (the channels of "
                f"the chosen levels of {backbone!r}), or be None to keep them all"
            )
            raise ConfigError(msg)
        self.patch_size = patch_size
        self.patch_padding = check_choice("patch_padding", patch_padding, PatchPadding)
        self.embedding_dim = embedding_dim if embedding_dim is not None else channels
        self.num_neighbors = num_neighbors
        self.blur = GaussianBlur2d(sigma)
        self.register_buffer(
            "memory_bank", torch.empty(0, self.embedding_dim, dtype=self.bank_dtype.torch_dtype)
        )
        # faiss index of the bank and the identity of the bank it was built from: a cache,
        # neither a submodule nor state.
        self._faiss: tuple[tuple[int, int, tuple[int, ...]], FaissSearch] | None = None

    def embed(self, image: torch.Tensor) -> torch.Tensor:
        """Return patch embeddings.

        Args:
            image: (B, 3, H, W) float in [0, 1].

        Returns:
            (B, D, h, w) float32, (h, w) the size of the finest chosen feature map.
        """
        features = self.feature_extractor(imagenet_normalize(image))
        embedding = embedding_stack(
            features,
            mode="bilinear",
            patch_size=self.patch_size,
            count_padding=self.patch_padding is PatchPadding.ZEROS,
        )
        if embedding.shape[1] != self.embedding_dim:
            batch, channels, height, width = embedding.shape
            flat = embedding.permute(0, 2, 3, 1).reshape(-1, 1, channels)
            flat = F.adaptive_avg_pool1d(flat, self.embedding_dim)
            embedding = flat.reshape(batch, height, width, -1).permute(0, 3, 1, 2)
        return embedding

    def set_memory_bank(self, bank: torch.Tensor) -> None:
        """Replace the memory bank: (M, D) float, stored as ``bank_dtype``."""
        if bank.ndim != 2 or bank.shape[1] != self.embedding_dim or bank.shape[0] < 1:
            msg = (
                f"memory bank of shape {tuple(bank.shape)} does not fit embeddings of "
                f"{self.embedding_dim} dimensions; give (M, {self.embedding_dim}), M >= 1"
            )
            raise ValueError(msg)
        dtype = self.bank_dtype.torch_dtype
        self.memory_bank = bank.detach().to(self.memory_bank.device, dtype).contiguous()
        self._faiss = None

    def search(self, query: torch.Tensor, k: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """Return the distances and indices of the ``k`` nearest bank rows of each query row.

        Args:
            query: (Q, D) float32.
            k: Neighbours per query, at most the bank size.

        Returns:
            ``(distances, indices)``, both (Q, k), nearest first.
        """
        bank = self.memory_bank
        if self.search_backend is SearchBackend.TORCH or exporting():
            return nearest_neighbors(query, bank, k)
        # A bank replaced in place (load_state_dict copies into it) bumps its version.
        identity = (bank.data_ptr(), bank._version, tuple(bank.shape))
        if self._faiss is None or self._faiss[0] != identity:
            self._faiss = (identity, FaissSearch(bank))
        return self._faiss[1](query, k)

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Score images.

        Args:
            image: (B, 3, H, W) float in [0, 1], any size the backbone accepts.

        Returns:
            ``(pred_score (B,), anomaly_map (B, H, W))`` raw distances, higher is more anomalous.

        Raises:
            NotFittedError: When the memory bank is empty.
        """
        # The size stays symbolic under torch.export (dynamic height and width).
        return self.score(self.embed(image), image.shape[-2:])

    def score(
        self, embedding: torch.Tensor, size: Sequence[int]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Score patch embeddings (the second half of ``forward``).

        Args:
            embedding: (B, D, h, w) from ``embed``.
            size: (H, W) of the anomaly maps returned (the input images' size).

        Returns:
            ``(pred_score (B,), anomaly_map (B, H, W))`` raw distances.

        Raises:
            NotFittedError: When the memory bank is empty.
        """
        bank = self.memory_bank
        if bank.shape[0] == 0:
            msg = "PatchCore's memory bank is empty; fit the model or load a fitted checkpoint"
            raise NotFittedError(msg)
        batch, channels, height, width = embedding.shape
        patches = embedding.permute(0, 2, 3, 1).reshape(batch, height * width, channels)
        distance, index = self.search(patches.reshape(-1, channels), 1)
        patch_scores = distance.reshape(batch, height * width)
        if self.num_neighbors >= 2 and bank.shape[0] >= self.num_neighbors:
            nearest = index.reshape(batch, height * width)
            score = reweight_scores(
                patch_scores, nearest, patches, bank, self.num_neighbors, self.search
            )
        else:
            score = patch_scores.max(dim=1).values
        anomaly_map = F.interpolate(
            patch_scores.reshape(batch, 1, height, width),
            size=tuple(size),
            mode="bilinear",
            align_corners=False,
        )
        return score, self.blur(anomaly_map.squeeze(1))
