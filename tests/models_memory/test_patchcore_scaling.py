"""PatchCore at scale: exact and partitioned coresets, streaming, bounded memory, faiss, export."""

from __future__ import annotations

import importlib.util
import math
from collections.abc import Iterator
from typing import Any

import pytest
import torch

from anomaly_models_memory import Patchcore
from anomaly_models_memory.patchcore import _coreset, _search, torch_model
from anomaly_models_memory.patchcore._coreset import (
    CoresetBuilder,
    RowStore,
    greedy_coreset,
    greedy_select,
    sparse_random_projection,
)
from anomaly_models_memory.patchcore._search import FaissSearch, nearest_neighbors

needs_faiss = pytest.mark.skipif(
    importlib.util.find_spec("faiss") is None, reason="faiss (faiss-cpu) is not installed"
)


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    # Tensors here are tiny: with one thread no step waits on OpenMP's synchronization, which
    # dominates (ten times slower) when other processes share the cores.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def reference_greedy(points: torch.Tensor, count: int, start: int) -> list[int]:
    """Textbook greedy k-center in float64: each step picks the farthest row (lowest index)."""
    rows = points.double()
    nearest = torch.full((rows.shape[0],), math.inf, dtype=torch.float64)
    chosen = [start]
    while len(chosen) < count:
        nearest = torch.minimum(nearest, ((rows - rows[chosen[-1]]) ** 2).sum(dim=1))
        chosen.append(int(nearest.argmax()))
    return chosen


def reference_approximate(
    features: torch.Tensor, ratio: float, block: int, seed: int, projection_dim: int
) -> torch.Tensor:
    """The partitioned selection, written out: consecutive partitions keep their shares."""
    generator = torch.Generator().manual_seed(seed)
    projection = sparse_random_projection(features.shape[1], projection_dim, seed)
    total = features.shape[0]
    kept, target_kept = [], 0
    for begin in range(0, total, block):
        rows = features[begin : begin + block]
        end = begin + rows.shape[0]
        # Shares follow floor(ratio * rows so far); the last partition rounds the total up.
        target = math.ceil(ratio * end) if end == total else math.floor(ratio * end)
        share = min(target - target_kept, rows.shape[0])
        target_kept += share
        if share == rows.shape[0]:
            kept.append(torch.arange(begin, end))
        elif share > 0:
            start = int(torch.randint(0, rows.shape[0], (1,), generator=generator))
            kept.append(begin + torch.tensor(reference_greedy(rows @ projection, share, start)))
    return torch.cat(kept)


# --- exact selection ------------------------------------------------------------------------


def test_greedy_steps_pick_the_farthest_point() -> None:
    points = torch.tensor([[0.0], [1.0], [2.0], [10.0], [11.0], [20.0]])
    # From 0: 20 is farthest, then 10 (10 away from both), then 2 (2 from 0; 11 is 1 from 10).
    assert greedy_select(points, 4, start=0).tolist() == [0, 5, 3, 2]


@pytest.mark.parametrize("filtered", [False, True])
def test_exact_selection_equals_brute_force(
    monkeypatch: pytest.MonkeyPatch, filtered: bool
) -> None:
    if filtered:
        monkeypatch.setattr(_coreset, "_FILTER_AXES", 4)
        monkeypatch.setattr(_coreset, "_CHUNK_ROWS", 500)
    else:
        monkeypatch.setattr(_coreset, "_FILTER_MIN_ROWS", 10**9)
    generator = torch.Generator().manual_seed(5)
    # Anisotropic and off-center, like patch embeddings: the filter's axes matter.
    points = torch.randn(3000, 24, generator=generator) * torch.linspace(4, 0.2, 24) + 3
    for start in (0, 1234):
        expected = reference_greedy(points, 250, start)
        assert greedy_select(points, 250, start).tolist() == expected
    before = points.clone()
    greedy_select(points, 10)
    assert torch.equal(points, before)  # copy=True leaves the caller's rows alone


def test_exact_mode_is_greedy_over_all_projected_rows() -> None:
    features = torch.randn(600, 40, generator=torch.Generator().manual_seed(6))
    chosen = greedy_coreset(features, 60, mode="exact", projection_dim=16, seed=3)
    projected = features @ sparse_random_projection(40, 16, 3)
    generator = torch.Generator().manual_seed(3)
    start = int(torch.randint(0, 600, (1,), generator=generator))
    assert chosen.tolist() == reference_greedy(projected, 60, start)


def test_exact_progress_is_reported() -> None:
    calls: list[tuple[str, int, int | None]] = []
    features = torch.randn(500, 8, generator=torch.Generator().manual_seed(7))
    greedy_coreset(features, 200, mode="exact", progress=lambda *call: calls.append(call))
    assert calls[-1] == ("coreset", 200, 200)
    done = [done for _, done, _ in calls]
    assert done == sorted(done)
    assert 10 <= len(calls) <= 110  # about a hundred reports, not one per step


# --- approximate selection and streaming ----------------------------------------------------


def test_approximate_mode_reduces_consecutive_partitions() -> None:
    features = torch.randn(2650, 20, generator=torch.Generator().manual_seed(8))
    chosen = greedy_coreset(features, 265, block_size=600, projection_dim=12, seed=4)
    expected = reference_approximate(features, 265 / 2650, 600, seed=4, projection_dim=12)
    assert torch.equal(chosen, expected)
    assert chosen.numel() == 265
    # Every partition of 600 rows keeps its 10 % share, the last one (250 rows) the rest.
    assert torch.bincount(chosen // 600).tolist() == [60, 60, 60, 60, 25]


def test_streamed_bank_equals_the_reference(textures: dict[str, torch.Tensor]) -> None:
    options = {"strides": [8, 16], "coreset_block_size": 40, "projection_dim": 32, "seed": 2}
    streamed = Patchcore(**options)  # type: ignore[arg-type]
    for image in torch.split(textures["train"], 1):  # 64 patches per image, partitions of 40
        streamed.collect(image)
    streamed.fit_end()
    with torch.no_grad():  # image by image, as streamed: conv results depend on the batch
        embedding = torch.cat(
            [streamed.model.embed(image) for image in torch.split(textures["train"], 1)]
        )
    rows = embedding.permute(0, 2, 3, 1).reshape(-1, embedding.shape[1])
    indices = reference_approximate(rows, 0.1, block=40, seed=2, projection_dim=32)
    torch.testing.assert_close(streamed.model.memory_bank, rows[indices], rtol=0, atol=1e-6)
    # Exact mode streams into chunks and selects once, as over the whole matrix.
    exact = Patchcore(strides=[8, 16], coreset_mode="exact", seed=2)
    for image in torch.split(textures["train"], 1):
        exact.collect(image)
    exact.fit_end()
    chosen = greedy_coreset(rows, math.ceil(0.1 * rows.shape[0]), mode="exact", seed=2)
    torch.testing.assert_close(exact.model.memory_bank, rows[chosen], rtol=0, atol=1e-6)


def test_approximate_builder_holds_the_kept_rows_and_one_partition() -> None:
    builder = CoresetBuilder(16, ratio=0.05, block_size=100, projection_dim=None, seed=0)
    generator = torch.Generator().manual_seed(9)
    for _ in range(40):
        builder.add(torch.randn(250, 16, generator=generator))
        assert builder._partition is not None
        assert builder._partition.shape[0] == 100  # one partition, never more
        assert len(builder.store) <= 0.05 * builder.rows_seen  # reduced partitions only
    bank = builder.finish()
    assert bank.shape == (math.ceil(0.05 * 10_000), 16)


def test_row_store_appends_across_chunks_without_copies() -> None:
    store = RowStore(3, chunk_rows=4)
    rows = torch.arange(30.0).reshape(10, 3)
    store.append(rows[:3])
    first_chunk = store.chunks[0]
    store.append(rows[3:10])
    assert store.chunks[0] is first_chunk  # grown by new chunks, nothing re-allocated
    assert len(store) == 10
    assert len(store.chunks) == 3
    assert torch.equal(store.to_tensor(), rows)
    assert torch.equal(store.take(torch.tensor([9, 0, 5])), rows[[9, 0, 5]])


def test_memory_bank_size_caps_the_bank(textures: dict[str, torch.Tensor]) -> None:
    patches = textures["train"].shape[0] * 64
    for mode in ("exact", "approximate"):
        capped = fitted(textures, coreset_mode=mode, memory_bank_size=30)
        assert capped.model.memory_bank.shape[0] == 30
        loose = fitted(textures, coreset_mode=mode, memory_bank_size=10_000)
        assert loose.model.memory_bank.shape[0] == math.ceil(0.1 * patches)
    # Partitions keep 10 % each, then an exact selection over their union meets the cap.
    partitioned = fitted(textures, coreset_block_size=50, memory_bank_size=30)
    assert partitioned.model.memory_bank.shape[0] == 30


def fitted(textures: dict[str, torch.Tensor], **options: object) -> Patchcore:
    model = Patchcore(strides=[8, 16], **options)  # type: ignore[arg-type]
    model.collect(textures["train"])
    model.fit_end()
    return model.eval()


# --- search: bounded blocks, float16 bank, faiss, export ------------------------------------


def test_small_blocks_change_nothing(
    monkeypatch: pytest.MonkeyPatch, textures: dict[str, torch.Tensor]
) -> None:
    images = torch.cat([textures["normal"], textures["defective"]])
    model = fitted(textures, coreset_mode="exact")
    with torch.no_grad():
        expected = model(images)
    largest: list[int] = []
    addmm = torch.addmm

    def recording_addmm(*args: Any, **kwargs: Any) -> torch.Tensor:
        out: torch.Tensor = addmm(*args, **kwargs)
        largest.append(out.numel())
        return out

    monkeypatch.setattr(torch, "addmm", recording_addmm)
    monkeypatch.setattr(_search, "_BANK_BLOCK", 16)  # distance blocks of 16 x 16 entries
    monkeypatch.setattr(_search, "_QUERY_BLOCK", 16)
    monkeypatch.setattr(_coreset, "_CHUNK_ROWS", 100)  # stored and projected in 100-row chunks
    small = fitted(textures, coreset_mode="exact")
    assert torch.equal(small.model.memory_bank, model.model.memory_bank)
    with torch.no_grad():
        got = small(images)
    assert max(largest) <= 256  # never a (queries x bank) matrix
    torch.testing.assert_close(got[0], expected[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[1], expected[1], rtol=1e-5, atol=1e-5)


def test_float16_bank_halves_memory_and_barely_moves_scores(
    model: Patchcore, textures: dict[str, torch.Tensor]
) -> None:
    half = fitted(textures, bank_dtype="float16")
    bank = half.model.memory_bank
    assert bank.dtype == torch.float16
    assert bank.shape == model.model.memory_bank.shape
    images = torch.cat([textures["normal"], textures["defective"]])
    with torch.no_grad():
        expected_score, expected_map = model(images)
        score, anomaly_map = half(images)
    torch.testing.assert_close(score, expected_score, rtol=2e-3, atol=0)
    torch.testing.assert_close(anomaly_map, expected_map, rtol=2e-3, atol=1e-3)
    restored = Patchcore(strides=[8, 16], bank_dtype="float16")
    restored.load_state_dict(half.state_dict())
    assert restored.model.memory_bank.dtype == torch.float16


@pytest.fixture(scope="module")
def model(textures: dict[str, torch.Tensor]) -> Patchcore:
    return fitted(textures)


@needs_faiss
def test_faiss_search_matches_torch(model: Patchcore, textures: dict[str, torch.Tensor]) -> None:
    generator = torch.Generator().manual_seed(10)
    query, bank = (
        torch.randn(300, 24, generator=generator),
        torch.randn(500, 24, generator=generator),
    )
    for k in (1, 4):
        distance, index = FaissSearch(bank)(query, k)
        expected_distance, expected_index = nearest_neighbors(query, bank, k)
        torch.testing.assert_close(distance, expected_distance, rtol=1e-4, atol=1e-4)
        assert torch.equal(index, expected_index)
    with_faiss = Patchcore(strides=[8, 16], search_backend="faiss")
    with_faiss.load_state_dict(model.state_dict())
    with_faiss.eval()
    images = torch.cat([textures["normal"], textures["defective"]])
    with torch.no_grad():
        expected = model(images)
        got = with_faiss(images)
        # The index follows the bank: a new bank rebuilds it.
        with_faiss.model.set_memory_bank(model.model.memory_bank[:20])
        model_small = Patchcore(strides=[8, 16])
        model_small.model.set_memory_bank(model.model.memory_bank[:20])
        assert torch.allclose(with_faiss(images)[0], model_small.eval()(images)[0], rtol=1e-4)
    torch.testing.assert_close(got[0], expected[0], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got[1], expected[1], rtol=1e-4, atol=1e-4)


def test_export_path_never_uses_faiss_or_blocks(
    monkeypatch: pytest.MonkeyPatch, model: Patchcore
) -> None:
    net = model.model
    net.search_backend = torch_model.SearchBackend.FAISS

    def no_faiss(bank: torch.Tensor) -> FaissSearch:
        msg = "faiss used while exporting"
        raise AssertionError(msg)

    monkeypatch.setattr(torch_model, "FaissSearch", no_faiss)
    monkeypatch.setattr(_search, "exporting", lambda: True)
    monkeypatch.setattr(torch_model, "exporting", lambda: True)
    monkeypatch.setattr(_search, "_QUERY_BLOCK", 4)  # ignored: one block while exporting
    calls: list[tuple[int, ...]] = []
    addmm = torch.addmm

    def recording_addmm(*args: Any, **kwargs: Any) -> torch.Tensor:
        calls.append(tuple(args[1].shape))
        out: torch.Tensor = addmm(*args, **kwargs)
        return out

    monkeypatch.setattr(torch, "addmm", recording_addmm)
    try:
        query = torch.randn(50, net.embedding_dim)
        distance, index = net.search(query, 3)
    finally:
        net.search_backend = torch_model.SearchBackend.TORCH
    assert calls == [(50, net.embedding_dim)]  # a single addmm over every query and the bank
    monkeypatch.undo()
    expected_distance, expected_index = nearest_neighbors(query, net.memory_bank, 3)
    torch.testing.assert_close(distance, expected_distance)
    assert torch.equal(index, expected_index)


def test_torch_export_with_a_dynamic_batch(textures: dict[str, torch.Tensor]) -> None:
    # One level at stride 8 keeps the traced backbone short.
    small = Patchcore(strides=[8], coreset_ratio=0.2)
    small.collect(textures["train"][:4])
    small.fit_end()
    net = small.model.eval()
    batch = torch.export.Dim("batch", min=1)
    with torch.no_grad():
        exported = torch.export.export(
            net, (textures["defective"][:2],), dynamic_shapes={"image": {0: batch}}
        )
    images = torch.cat([textures["normal"], textures["defective"]])
    for count in (1, 5):
        with torch.no_grad():
            expected = net(images[:count])
            got = exported.module()(images[:count])
        torch.testing.assert_close(got[0], expected[0], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(got[1], expected[1], rtol=1e-4, atol=1e-4)
