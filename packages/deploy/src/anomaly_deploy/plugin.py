"""Hook implementations of anomaly-deploy: exporters, inferencers and serving commands.

Targets are import strings, so nothing here imports torch, ONNX Runtime or OpenVINO until a
component is used.
"""

from __future__ import annotations

from anomaly import CommandSpec, ExporterSpec, InferencerSpec, hookimpl


@hookimpl
def anomaly_register_exporters() -> list[ExporterSpec]:
    """Register the torch, ONNX and OpenVINO exporters."""
    return [
        ExporterSpec(
            name="torch",
            target="anomaly_deploy.export:export_torch",
            summary="Self-contained torch.export program (.pt2) with pre- and post-processing.",
        ),
        ExporterSpec(
            name="onnx",
            target="anomaly_deploy.export:export_onnx",
            summary="ONNX graph with dynamic batch and image size, pre- and post-processing.",
        ),
        ExporterSpec(
            name="openvino",
            target="anomaly_deploy.export:export_openvino",
            summary="OpenVINO IR in FP32, FP16 or INT8 (NNCF post-training quantization).",
        ),
    ]


@hookimpl
def anomaly_register_inferencers() -> list[InferencerSpec]:
    """Register one inferencer per export format."""
    return [
        InferencerSpec(
            name="torch",
            target="anomaly_deploy.inference:TorchInferencer",
            summary="Runs a torch export with torch (CPU or CUDA).",
        ),
        InferencerSpec(
            name="onnx",
            target="anomaly_deploy.inference:OnnxInferencer",
            summary="Runs an ONNX export with ONNX Runtime; no torch needed.",
        ),
        InferencerSpec(
            name="openvino",
            target="anomaly_deploy.inference:OpenVINOInferencer",
            summary="Runs an OpenVINO export with OpenVINO Runtime; no torch needed.",
        ),
    ]


@hookimpl
def anomaly_register_commands() -> list[CommandSpec]:
    """Register ``anomaly serve`` and ``anomaly gradio``."""
    return [
        CommandSpec(
            name="serve",
            target="anomaly_deploy.cli:serve",
            summary="Serve an exported model over HTTP (FastAPI).",
        ),
        CommandSpec(
            name="gradio",
            target="anomaly_deploy.cli:gradio_app",
            summary="Open a Gradio page to try an exported model in the browser.",
        ),
    ]
