"""Run a ComfyUI workflow headless, from the command line (a developer tool: not shipped to the registry).

    python -m tools.headless WORKFLOW.json [--server URL | --comfyui PATH [--cpu]] [options]
    python tools/headless WORKFLOW.json ...        (the same, run as a folder)

Needs `requests` and `websocket-client` (tools/requirements.txt). Modules: `workflow` (files, UI → API
conversion, overrides), `client` (HTTP/WebSocket API, progress, downloads), `server` (the one ComfyUI launcher,
shared with the tests and the quick start), `cli` (the command line).

WORKFLOW is a file in either format, detected automatically:

* UI format: what the ComfyUI frontend saves ("nodes", "links", "widgets_values").
  It is converted to the API format with the server's ``GET /object_info``
  (see :func:`ui_to_api`), the same way the frontend's "Export (API)" does it.
* API format: ``{node_id: {"class_type": ..., "inputs": {...}}}`` (also accepted
  wrapped as ``{"prompt": {...}}``).
* A PNG written by ComfyUI: the embedded "prompt" (API) is run, and the embedded
  "workflow" (UI) is passed on as PNG metadata.

Server: ``--server URL`` talks to a running ComfyUI. Without it the script starts
ComfyUI itself from a checkout (``--comfyui PATH``; default: ``$COMFYUI_PATH``, else
the ComfyUI root the pack is installed under (``ComfyUI/custom_nodes/<pack>/``),
else the host cache of tools/host.py, ``~/comfy/ComfyUI-0.3.75``) on a free loopback port, waits until it answers, runs
the workflow and stops it again.

Overrides are applied to the API graph after conversion: ``--seed``, ``--ckpt`` and
``--set NODE.INPUT=VALUE`` (NODE: node id, class_type when unique, or title).

Outputs: every image/file listed in the prompt's history outputs (``output`` and
``temp`` types, so PreviewImage counts) is downloaded into ``--out`` (default
``./headless_outputs``); saved paths are written to stdout, one per line.
Progress and diagnostics go to stderr.

The package is standalone (Python >= 3.9, stdlib + ``requests`` + ``websocket-client``).
It does not import ComfyUI or the node pack, and ComfyUI does not import it.

Exit codes:
    0   success
    1   execution failed on the server (execution_error, interrupted, error status)
    2   usage / input error: unreadable workflow, conversion error, bad override
    3   the server rejected the prompt (HTTP 400: invalid graph; error and
        node_errors are printed)
    4   connection error: server unreachable, unexpected HTTP error, or the
        self-started ComfyUI failed to start
    5   timeout (--timeout while waiting for the prompt, --startup-timeout for
        a self-started server)
    130 interrupted by the user (Ctrl-C)

Library use (tests, scripts): :func:`ui_to_api`, :func:`detect_format`,
:func:`load_workflow`, :func:`parse_set_override`, :func:`apply_overrides`,
:func:`format_prompt_error`, :class:`ComfyClient`, :class:`LocalComfyUI`,
:func:`run_workflow`, :func:`download_outputs`, :func:`main` (see ``__all__``). Library
functions report through the ``comfy_headless`` logger; only the CLI writes to stdout/stderr.
"""
from __future__ import annotations

from .client import ComfyClient, download_outputs, run_workflow
from .errors import (EXIT_CONNECTION, EXIT_EXECUTION, EXIT_INTERRUPTED, EXIT_OK, EXIT_REJECTED, EXIT_TIMEOUT,
                     EXIT_USAGE, ConversionError, ExecutionFailed, HeadlessError, OverrideError, PromptRejected,
                     RunTimeout, ServerConnectionError)
from .server import LocalComfyUI, default_comfyui_path, free_port, looks_like_comfyui
from .workflow import (apply_overrides, detect_format, format_prompt_error, load_workflow, parse_set_override,
                       png_ui_workflow, process_dynamic_prompt, read_png_workflow, ui_to_api)
from .cli import build_parser, main

__all__ = [
    "ui_to_api", "detect_format", "load_workflow", "read_png_workflow", "png_ui_workflow",
    "process_dynamic_prompt", "parse_set_override", "apply_overrides", "format_prompt_error",
    "ComfyClient", "LocalComfyUI", "run_workflow", "download_outputs", "default_comfyui_path", "free_port",
    "looks_like_comfyui", "build_parser", "main", "HeadlessError", "ConversionError", "OverrideError",
    "PromptRejected", "ServerConnectionError", "ExecutionFailed", "RunTimeout",
    "EXIT_OK", "EXIT_EXECUTION", "EXIT_USAGE", "EXIT_REJECTED", "EXIT_CONNECTION", "EXIT_TIMEOUT",
    "EXIT_INTERRUPTED",
]
