"""Hook implementations of anomaly-models-memory."""

from __future__ import annotations

from anomaly import ModelSpec, hookimpl


@hookimpl
def anomaly_register_models() -> list[ModelSpec]:
    """Register PatchCore and PaDiM."""
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
    ]
