"""Hook implementations of anomaly-models-memory."""

from __future__ import annotations

from anomaly import ModelSpec, hookimpl


@hookimpl
def anomaly_register_models() -> list[ModelSpec]:
    """Register PatchCore, PaDiM, DFKDE, DFM and CFA."""
    return [
        ModelSpec(
            name="patchcore",
            family="memory",
            target="anomaly_models_memory.patchcore:Patchcore",
            summary="Nearest neighbours in a coreset of pretrained patch features (Roth 2022).",
        ),
        ModelSpec(
            name="padim",
            family="memory",
            target="anomaly_models_memory.padim:Padim",
            summary="Per-position Gaussians of pretrained features, Mahalanobis map (Defard 2021).",
        ),
        ModelSpec(
            name="dfkde",
            family="memory",
            target="anomaly_models_memory.dfkde:Dfkde",
            summary="Kernel density of PCA-reduced pooled deep features.",
        ),
        ModelSpec(
            name="dfm",
            family="memory",
            target="anomaly_models_memory.dfm:Dfm",
            summary="PCA + Gaussian deep feature modelling, reconstruction maps (Ahuja 2019).",
        ),
        ModelSpec(
            name="cfa",
            family="memory",
            target="anomaly_models_memory.cfa:Cfa",
            summary="Coupled-hypersphere adaptation of patch features to a memory bank (Lee 2022).",
        ),
    ]
