"""Serve an exported model: an HTTP API (FastAPI) and a Gradio page.

Both take any inferencer (``anomaly_deploy.inference.load_inferencer``) and import neither torch
nor core, so a serving machine needs only the runtime of its export. The web frameworks are
imported only by the module that needs them: ``anomaly_deploy.serve.http`` (extra ``serve``)
and ``anomaly_deploy.serve.gradio_ui`` (extra ``gradio``).
"""

from __future__ import annotations

__all__: list[str] = []
