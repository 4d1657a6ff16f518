"""Hook implementations of anomaly-data (entry point ``data``)."""

from __future__ import annotations

from anomaly import DataModuleSpec, hookimpl


@hookimpl
def anomaly_register_datamodules() -> list[DataModuleSpec]:
    """Register the folder, MVTec AD and demo datamodules."""
    return [
        DataModuleSpec(
            name="folder",
            target="anomaly_data.datamodules:Folder",
            summary="Your own folders of normal and anomalous images, masks optional.",
        ),
        DataModuleSpec(
            name="mvtec_ad",
            target="anomaly_data.datamodules:MvtecAd",
            summary="One category of MVTec AD or any dataset in its layout; downloads on request.",
        ),
        DataModuleSpec(
            name="demo",
            target="anomaly_data.datamodules:Demo",
            summary="Built-in textures with synthetic scratches, stains and patches; no download.",
        ),
    ]
