"""A Gradio page to try an exported model: upload an image, see the heat map and the verdict.

Gradio's usage analytics are switched off (``GRADIO_ANALYTICS_ENABLED=False``) before Gradio
is imported, the page uses locally served fonts, and the app is never shared through Gradio's
tunnel: nothing leaves the machine. Start it with ``anomaly gradio EXPORT_FOLDER``.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from anomaly_deploy.serve._common import (
    ImageDecodeError,
    InferencerLike,
    decode_image,
    heatmap_overlay,
    input_error_types,
    mask_image,
    model_info,
    verdict,
)

if TYPE_CHECKING:
    import gradio

__all__ = ["DEFAULT_PORT", "build_demo", "format_verdict", "launch_demo"]

logger = logging.getLogger(__name__)

DEFAULT_PORT = 7860
"""Gradio's usual port."""


def _no_telemetry() -> None:
    # Gradio reads this when it is imported and at launch; set it first, whatever the caller's
    # environment says, since a factory-floor demo must not contact anything.
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"


def format_verdict(label: str, score: float) -> str:
    """Return the verdict line the page shows, e.g. ``"anomalous (score 0.873)"``."""
    return f"{label} (score {score:.3f})"


def build_demo(inferencer: InferencerLike) -> gradio.Blocks:
    """Build the page: an image input, a button, the verdict, the heat map and the mask.

    Args:
        inferencer: An ``anomaly_deploy.inference`` inferencer, or any object with
            ``.predict((H, W, 3) uint8 RGB) -> Prediction`` and a ``.metadata`` mapping.

    Returns:
        The Gradio app, not launched; ``launch_demo`` starts it on localhost.
    """
    _no_telemetry()
    import gradio as gr

    info = model_info(inferencer.metadata)
    # Errors that are the user's doing: shown on the page, never a traceback.
    user_errors: tuple[type[Exception], ...] = (ImageDecodeError, *input_error_types())

    def detect(
        path: str | None,
    ) -> tuple[npt.NDArray[np.uint8], npt.NDArray[np.uint8], str]:
        if not path:
            message = "Upload an image first."
            raise gr.Error(message)
        try:
            # Gradio passes the uploaded file untouched (image_mode=None); decode it as the HTTP
            # API and training do (16-bit scaled, alpha onto black), not as Gradio would.
            image = decode_image(Path(path).read_bytes())
            prediction = inferencer.predict(image)
        except user_errors as err:
            raise gr.Error(str(err)) from err
        overlay = heatmap_overlay(image, np.asarray(prediction.anomaly_map))
        mask = mask_image(np.asarray(prediction.pred_mask))
        return overlay, mask, format_verdict(verdict(prediction), float(prediction.pred_score))

    demo: gradio.Blocks
    # Outputs are lossless PNGs; no "share" button, which targets Hugging Face Spaces.
    picture: dict[str, Any] = {
        "interactive": False,
        "format": "png",
        "height": 320,
        "buttons": ["download", "fullscreen"],
    }
    with gr.Blocks(title=f"anomaly: {info['model']}", analytics_enabled=False) as demo:
        gr.Markdown(
            f"## Anomaly detection: `{info['model']}`\n"
            f"Upload an image to score it. The heat map shows where the model sees anomalies "
            f"(red: most anomalous); the score is in [0, 1] and 0.5 is the threshold. "
            f"Export: {info['format']}, {info['precision']}."
        )
        with gr.Row():
            with gr.Column():
                image = gr.Image(
                    type="filepath",
                    image_mode=None,
                    sources=["upload", "clipboard"],
                    label="Image",
                    height=320,
                    elem_id="input-image",
                )
                button = gr.Button("Detect anomalies", variant="primary", elem_id="detect")
            with gr.Column():
                text = gr.Textbox(label="Verdict", interactive=False, elem_id="verdict")
                heatmap = gr.Image(label="Heat map", elem_id="heatmap", **picture)
                mask = gr.Image(label="Predicted mask", elem_id="mask", **picture)
        outputs = [heatmap, mask, text]
        button.click(detect, inputs=image, outputs=outputs, api_name="predict")
        image.upload(detect, inputs=image, outputs=outputs, api_visibility="private")
    return demo


def launch_demo(
    demo: gradio.Blocks,
    *,
    host: str = "127.0.0.1",
    port: int = DEFAULT_PORT,
    block: bool = True,
    max_file_size: int | None = None,
) -> str:
    """Start the page on ``host:port`` without sharing it, analytics, SSR or an MCP server.

    Args:
        demo: What ``build_demo`` returned.
        host: Interface to bind; ``0.0.0.0`` exposes the page to the network.
        port: TCP port.
        block: Serve until Ctrl+C, then close; False returns once the page is up (close it
            with ``demo.close()``).
        max_file_size: Largest upload in bytes; None for Gradio's default (no limit).

    Returns:
        The local URL of the page.
    """
    _no_telemetry()
    _, local_url, _ = demo.launch(
        server_name=host,
        server_port=port,
        share=False,
        inbrowser=False,
        prevent_thread_lock=True,
        quiet=True,  # its banner suggests share=True, which this page never uses
        show_error=True,
        max_file_size=max_file_size,
        ssr_mode=False,
        mcp_server=False,
        pwa=False,
        enable_monitoring=False,
    )
    if block:
        try:
            while demo.is_running:
                time.sleep(0.2)
        except KeyboardInterrupt:
            logger.info("interrupted; closing the page")
        finally:
            demo.close()
    return str(local_url)
