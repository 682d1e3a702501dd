"""Bootstrap shared by the benchmark scripts: find ComfyUI, import it in-process and load the pack's
modules (through tests/host.py, the same loader the tests use)."""
from __future__ import annotations

import importlib

import logging
import sys
from pathlib import Path

PACK_ROOT = Path(__file__).resolve().parents[1]
if str(PACK_ROOT / "tests") not in sys.path:
    sys.path.insert(0, str(PACK_ROOT / "tests"))

import host  # noqa: E402  (tests/host.py)

logger = logging.getLogger("tfg.benchmarks")


def setup(cpu: bool = True):
    """Import ComfyUI in this process and return `host` (use host.pack_module("benchmarks.x") afterwards).
    Exits with a clear message when no ComfyUI checkout is found."""
    root = host.find_comfyui()
    if root is None:
        raise SystemExit("NO COMFYUI HOST FOUND: set COMFYUI_PATH, install the pack in ComfyUI/custom_nodes, "
                         "or run `python tools/host.py` to bring ComfyUI 0.3.75")
    if cpu:
        host.setup_inprocess_comfyui(root)
    else:
        _setup_accelerated(root)
    return host


def _setup_accelerated(root: Path) -> None:
    """Like host.setup_inprocess_comfyui, but leaves ComfyUI free to use the GPU."""
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    import comfy.options  # noqa: F401
    import utils.extra_config  # noqa: F401  must precede "import nodes"
    import comfy.model_management  # noqa: F401
    importlib.import_module("nodes")  # ComfyUI's own top-level nodes module


def configure_logging(verbose: bool = False) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("tfg.benchmarks").setLevel(logging.INFO)


BENCHMARKS_MD = PACK_ROOT / "BENCHMARKS.md"


def write_results_section(markdown: str, start: str, end: str, path: Path = BENCHMARKS_MD) -> None:
    """Replace the text between the `start` and `end` markers of BENCHMARKS.md (adding them when missing)."""
    text = path.read_text() if path.is_file() else "# Benchmarks\n"
    if start not in text or end not in text:
        text = text.rstrip() + f"\n\n{start}\n{end}\n"
    head, rest = text.split(start, 1)
    _, tail = rest.split(end, 1)
    path.write_text(f"{head}{start}\n{markdown}\n{end}{tail}")
