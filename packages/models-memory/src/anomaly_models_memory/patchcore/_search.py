"""Exact nearest-neighbour search in a memory bank: torch in bounded blocks, or faiss.

The torch search splits queries and bank rows into blocks so that no distance matrix larger
than ``_DISTANCE_BLOCK`` entries exists; a float16 bank is converted to float32 one block at a
time. While a model is being exported (``torch.export``, ONNX, TorchScript tracing,
``torch.compile``) the search is one ``addmm`` and ``topk`` over the whole bank instead: no
Python loop whose length depends on the batch, and never faiss.
"""

from __future__ import annotations

import enum
import importlib.util
from typing import Any

import torch

from anomaly import ConfigError

__all__ = [
    "FaissSearch",
    "SearchBackend",
    "check_faiss",
    "exporting",
    "nearest_neighbors",
]

# Entries of one block of a distance matrix; bounds the memory of neighbour searches (64 MiB).
_DISTANCE_BLOCK = 1 << 24
_QUERY_BLOCK = 4096


class SearchBackend(enum.StrEnum):
    """Who computes nearest neighbours: both are exact and agree up to float rounding.

    - ``torch``: blocked matrix products, any device, exportable.
    - ``faiss``: ``faiss.IndexFlatL2`` on the CPU (package ``faiss-cpu``); eager only.
    """

    TORCH = "torch"
    FAISS = "faiss"


def exporting() -> bool:
    """Tell whether torch is tracing or exporting the model (jit, ONNX, dynamo, export)."""
    return bool(
        torch.jit.is_tracing()  # type: ignore[attr-defined,no-untyped-call]  # untyped in torch
        or torch.onnx.is_in_onnx_export()
        or torch.compiler.is_compiling()
        or torch.compiler.is_exporting()
    )


def check_faiss() -> None:
    """Raise ``ConfigError`` unless the ``faiss`` package can be imported."""
    if importlib.util.find_spec("faiss") is None:
        msg = (
            "search_backend 'faiss' needs the faiss package, which is not installed; run "
            "`pip install faiss-cpu` or use search_backend 'torch'"
        )
        raise ConfigError(msg)


def nearest_neighbors(
    query: torch.Tensor, bank: torch.Tensor, k: int = 1
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return the distances and indices of the ``k`` nearest bank rows of each query row.

    Args:
        query: (Q, D) float32.
        bank: (M, D) float32 or float16, ``M >= k``; distances are computed in float32.
        k: Neighbours per query.

    Returns:
        ``(distances, indices)``, both (Q, k), nearest first; Euclidean distances (float32).
    """
    if bank.shape[0] < k:
        msg = f"nearest_neighbors needs at least k={k} bank rows, got {bank.shape[0]}"
        raise ValueError(msg)
    query = query.float()
    if exporting():
        return _nearest_single_block(query, bank, k)
    query_block = min(max(1, int(query.shape[0])), _QUERY_BLOCK)
    bank_block = max(k, _DISTANCE_BLOCK // query_block)
    distances, indices = [], []
    for start in range(0, int(query.shape[0]), query_block):
        part = query[start : start + query_block]
        best_distance, best_index = _nearest_in_blocks(part, bank, k, bank_block)
        # ||q||^2 is constant per row, so it is added only once the neighbours are known.
        squared = best_distance + (part * part).sum(dim=1, keepdim=True)
        distances.append(squared.clamp_min(0.0).sqrt())
        indices.append(best_index)
    if len(distances) == 1:
        return distances[0], indices[0]
    return torch.cat(distances), torch.cat(indices)


def _nearest_single_block(
    query: torch.Tensor, bank: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The whole search as one graph: ``addmm`` over the bank, then ``topk``."""
    rows = bank.float()
    partial = torch.addmm((rows * rows).sum(dim=1), query, rows.T, alpha=-2.0)
    distance, index = torch.topk(partial, k, dim=1, largest=False)
    squared = distance + (query * query).sum(dim=1, keepdim=True)
    return squared.clamp_min(0.0).sqrt(), index


def _nearest_in_blocks(
    query: torch.Tensor, bank: torch.Tensor, k: int, block: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return the k smallest ``||m||^2 - 2 q.m`` over bank rows m, and their indices."""
    best_distance = torch.empty(0)
    best_index = torch.empty(0, dtype=torch.long)
    for begin in range(0, int(bank.shape[0]), block):
        rows = bank[begin : begin + block].float()
        partial = torch.addmm((rows * rows).sum(dim=1), query, rows.T, alpha=-2.0)
        if k == 1:  # min is much cheaper than topk
            distance, index = partial.min(dim=1, keepdim=True)
        else:
            distance, index = torch.topk(partial, min(k, rows.shape[0]), dim=1, largest=False)
        index = index + begin
        if begin == 0:
            best_distance, best_index = distance, index
        elif k == 1:
            closer = distance < best_distance
            best_distance = torch.where(closer, distance, best_distance)
            best_index = torch.where(closer, index, best_index)
        else:
            merged = torch.cat([best_distance, distance], dim=1)
            best_distance, order = torch.topk(merged, k, dim=1, largest=False)
            best_index = torch.gather(torch.cat([best_index, index], dim=1), 1, order)
    return best_distance, best_index


class FaissSearch:
    """Exact search with ``faiss.IndexFlatL2`` (squared distances, square-rooted here).

    The index holds a float32 copy of the bank; it is built once per bank and is never part
    of a state dict.

    Args:
        bank: (M, D) float32 or float16.
    """

    def __init__(self, bank: torch.Tensor) -> None:
        import faiss  # optional dependency: imported only when this backend is chosen

        rows = bank.detach().float().cpu().contiguous().numpy()
        self.index: Any = faiss.IndexFlatL2(int(rows.shape[1]))
        self.index.add(rows)
        self.size = int(rows.shape[0])

    def __call__(self, query: torch.Tensor, k: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(distances, indices)``, both (Q, k), like ``nearest_neighbors``."""
        if self.size < k:
            msg = f"nearest_neighbors needs at least k={k} bank rows, got {self.size}"
            raise ValueError(msg)
        rows = query.detach().float().cpu().contiguous().numpy()
        squared, index = self.index.search(rows, k)
        distance = torch.from_numpy(squared).clamp_min_(0.0).sqrt_()
        return distance.to(query.device), torch.from_numpy(index).to(query.device)
