"""``anomaly serve`` and ``anomaly gradio``: put an exported model behind HTTP or a web page.

Core's CLI loads these commands through the ``anomaly_register_commands`` hook. Everything
heavy (the inferencer, FastAPI, uvicorn, Gradio) is imported when a command runs, not when
``anomaly --help`` lists it. Errors become core's one-line errors: a missing or broken export
becomes a ``ConfigError``, an unreadable input a ``DataError``.
"""

from __future__ import annotations

import socket
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import click

if TYPE_CHECKING:
    from anomaly_deploy.serve._common import InferencerLike

__all__ = ["gradio_app", "serve"]

_CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}

_HOST_HELP = (
    "Interface to listen on. The default accepts connections from this machine only; "
    "0.0.0.0 exposes the service to every machine that can reach this one, without "
    "authentication."
)
_DEVICE_HELP = "Device the runtime uses: CPU, GPU or AUTO (OpenVINO), CPU or CUDA (ONNX, torch)."
_UPLOAD_HELP = "Largest upload accepted, in MiB; larger ones are refused (HTTP 413)."


def _load_inferencer(artefact: str, device: str) -> InferencerLike:
    """Load an export folder, turning the inference package's errors into core's."""
    from anomaly import ConfigError, DataError

    if not Path(artefact).exists():
        msg = (
            f"export folder {artefact!r} does not exist; create one with "
            f"'anomaly export --ckpt MODEL.ckpt --format onnx' and pass its path"
        )
        raise ConfigError(msg)
    try:
        from anomaly_deploy.errors import DeployError, InputError
        from anomaly_deploy.inference import load_inferencer
    except ImportError as err:
        msg = f"anomaly-deploy's inference module cannot be imported ({err}); reinstall it"
        raise ConfigError(msg) from err
    try:
        inferencer: InferencerLike = load_inferencer(artefact, device)
    except InputError as err:
        raise DataError(str(err)) from err
    except DeployError as err:
        raise ConfigError(str(err)) from err
    return inferencer


def _require(module: str, extra: str) -> None:
    """Fail with the install command when an optional dependency is missing."""
    import importlib.util

    if importlib.util.find_spec(module) is None:
        from anomaly import ConfigError

        msg = (
            f"this command needs {module!r}, which is not installed; "
            f"run: pip install 'anomaly-deploy[{extra}]'"
        )
        raise ConfigError(msg)


def _bind(host: str, port: int) -> socket.socket:
    """Open the listening socket here, so a busy port is a one-line error, not a log line."""
    from anomaly import ConfigError

    sock: socket.socket | None = None
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError as err:
        if sock is not None:
            sock.close()
        reason = getattr(err, "strerror", None) or str(err)
        msg = f"cannot listen on {host}:{port} ({reason}); pick another --port or --host"
        raise ConfigError(msg) from err
    return sock


def _url(host: str, port: int) -> str:
    shown = f"[{host}]" if ":" in host else host
    return f"http://{shown}:{port}"


def _root_flag(ctx: click.Context, name: str) -> int:
    obj = ctx.find_root().obj
    return int(obj.get(name, 0)) if isinstance(obj, dict) else 0


def _warn_if_exposed(host: str) -> None:
    from anomaly._cli._console import err_console

    if host not in {"127.0.0.1", "localhost", "::1"}:
        err_console.print(
            f"[yellow]Listening on {host!r}: anyone who can reach this machine can use it; "
            f"there is no authentication.[/yellow]",
            highlight=False,
        )


@click.command(context_settings=_CONTEXT)
@click.argument("artefact", metavar="EXPORT_FOLDER", type=click.Path())
@click.option("--host", default="127.0.0.1", show_default=True, help=_HOST_HELP)
@click.option(
    "--port", default=8000, show_default=True, type=click.IntRange(1, 65535), help="TCP port."
)
@click.option("--device", default="CPU", show_default=True, help=_DEVICE_HELP)
@click.option(
    "--max-upload-mb",
    default=20.0,
    show_default=True,
    type=click.FloatRange(min=0, min_open=True),
    help=_UPLOAD_HELP,
)
@click.pass_context
def serve(
    ctx: click.Context, artefact: str, host: str, port: int, device: str, max_upload_mb: float
) -> None:
    """Serve an exported model over HTTP (FastAPI).

    EXPORT_FOLDER is what 'anomaly export' wrote (metadata.json and the model file). POST an
    image as the multipart field 'file' to /predict to get its score, label and heat map as
    JSON; GET /health names the model; /docs documents the API. Stop with Ctrl+C.

    \b
    Examples:
      anomaly serve results/export/onnx
      curl -F file=@part.png http://127.0.0.1:8000/predict
      curl -F file=@part.png 'http://127.0.0.1:8000/predict?output=mask'
    """
    _require("fastapi", "serve")
    _require("uvicorn", "serve")
    import uvicorn

    from anomaly._cli._console import err_console
    from anomaly_deploy.serve._common import model_info
    from anomaly_deploy.serve.http import create_app

    inferencer = _load_inferencer(artefact, device)
    app = create_app(inferencer, max_upload_bytes=int(max_upload_mb * 1024 * 1024))
    sock = _bind(host, port)
    info = model_info(inferencer.metadata)
    url = _url(host, port)
    quiet, verbose = _root_flag(ctx, "quiet"), _root_flag(ctx, "verbose")
    _warn_if_exposed(host)
    if not quiet:
        err_console.print(
            f"Serving [bold]{info['model']}[/bold] ({info['format']}, {info['precision']}) "
            f"on [bold]{url}[/bold]: POST {url}/predict, GET {url}/health, docs at {url}/docs. "
            f"Press Ctrl+C to stop.",
            highlight=False,
        )
    log_level = "warning" if quiet else ("debug" if verbose >= 2 else "info")
    server = uvicorn.Server(uvicorn.Config(app, log_level=log_level, server_header=False))
    try:
        server.run(sockets=[sock])
    except KeyboardInterrupt:
        # uvicorn shuts down gracefully on Ctrl+C, then re-raises it: the normal way to stop.
        if not quiet:
            err_console.print("Stopped.")
    finally:
        sock.close()


@click.command(context_settings=_CONTEXT)
@click.argument("artefact", metavar="EXPORT_FOLDER", type=click.Path())
@click.option("--host", default="127.0.0.1", show_default=True, help=_HOST_HELP)
@click.option(
    "--port", default=7860, show_default=True, type=click.IntRange(1, 65535), help="TCP port."
)
@click.option("--device", default="CPU", show_default=True, help=_DEVICE_HELP)
@click.option(
    "--max-upload-mb",
    default=20.0,
    show_default=True,
    type=click.FloatRange(min=0, min_open=True),
    help=_UPLOAD_HELP,
)
def gradio_app(host: str, port: int, device: str, max_upload_mb: float, artefact: str) -> None:
    """Open a web page to try an exported model (Gradio).

    Upload an image to see the verdict, its score and the heat map. The page runs on this
    machine only: it is never shared through Gradio's public links and Gradio's usage
    analytics are off. Stop with Ctrl+C.

    \b
    Examples:
      anomaly gradio results/export/onnx
      anomaly gradio results/export/openvino --port 7861
    """
    _require("gradio", "gradio")
    # Gradio leaves asyncio loops for the garbage collector; not worth a warning per loop.
    warnings.filterwarnings("ignore", message="unclosed event loop", category=ResourceWarning)
    from anomaly import ConfigError
    from anomaly._cli._console import err_console
    from anomaly_deploy.serve.gradio_ui import build_demo, launch_demo

    inferencer = _load_inferencer(artefact, device)
    # Probe the port first: Gradio reports a busy port as a long multi-line error.
    _bind(host, port).close()
    demo = build_demo(inferencer)
    _warn_if_exposed(host)
    err_console.print(
        f"Opening the page on [bold]{_url(host, port)}[/bold]; press Ctrl+C to stop.",
        highlight=False,
    )
    try:
        launch_demo(
            demo, host=host, port=port, block=True, max_file_size=int(max_upload_mb * 1024**2)
        )
    except OSError as err:
        reason = " ".join(str(err).split())
        msg = f"cannot start the page on {host}:{port} ({reason}); pick another --port or --host"
        raise ConfigError(msg) from err
    err_console.print("Stopped.")
