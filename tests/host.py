"""Locating the ComfyUI host and loading the pack under test.

The host is found by tools/host.py (one lookup for the tests, the benchmarks and CI): COMFYUI_PATH, else the
pack's grandparent (ComfyUI/custom_nodes/<pack>), else the host script's cache (`python tools/host.py` brings
ComfyUI 0.3.75 there). Pure-kernel tests need none of it."""
from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from pathlib import Path

PACK_ROOT = Path(__file__).resolve().parents[1]
PACK_MODULE = "tfg_pack_under_test"
TESTS_DIR = Path(__file__).resolve().parent


def _host_script():
    spec = importlib.util.spec_from_file_location("tfg_tools_host", PACK_ROOT / "tools" / "host.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def find_comfyui() -> Path | None:
    return _host_script().find_host()


HEADLESS_MODULE = "tfg_tools_headless"


def headless():
    """The headless runner package tools/headless (workflow conversion, client, the one server launcher)."""
    if HEADLESS_MODULE in sys.modules:
        return sys.modules[HEADLESS_MODULE]
    spec = importlib.util.spec_from_file_location(HEADLESS_MODULE, PACK_ROOT / "tools" / "headless" / "__init__.py",
                                                  submodule_search_locations=[str(PACK_ROOT / "tools" / "headless")])
    module = importlib.util.module_from_spec(spec)
    sys.modules[HEADLESS_MODULE] = module
    spec.loader.exec_module(module)
    return module


def load_pack():
    """Import the pack as a package (it uses relative imports), without needing ComfyUI."""
    if PACK_MODULE in sys.modules:
        return sys.modules[PACK_MODULE]
    spec = importlib.util.spec_from_file_location(PACK_MODULE, PACK_ROOT / "__init__.py",
                                                  submodule_search_locations=[str(PACK_ROOT)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[PACK_MODULE] = module
    spec.loader.exec_module(module)
    return module


def pack_module(name: str):
    """e.g. pack_module("kernels.adaptive_guidance")."""
    load_pack()
    return importlib.import_module(f"{PACK_MODULE}.{name}")


_host_ready: Path | None = None


def setup_inprocess_comfyui(root: Path) -> Path:
    """Make ComfyUI importable in this process, on the CPU, like `main.py --cpu` would."""
    global _host_ready
    if _host_ready is not None:
        return _host_ready
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    import comfy.options  # noqa: F401  (args parsing stays off: pytest owns sys.argv)
    from comfy.cli_args import args
    args.cpu = True
    import utils.extra_config  # noqa: F401  must precede "import nodes" (see research notes)
    import comfy.model_management  # noqa: F401
    import nodes  # noqa: F401  ComfyUI's own top-level module
    _host_ready = root
    return root


def node_classes() -> dict:
    """Class-type → node class for ComfyUI's core nodes, the custom-sampler nodes and this pack's nodes
    (in-process, without ComfyUI's slow init_extra_nodes)."""
    import nodes
    from comfy_extras import nodes_custom_sampler
    classes = dict(nodes.NODE_CLASS_MAPPINGS)
    classes.update(module_node_classes(nodes_custom_sampler))
    classes.update(module_node_classes(load_pack()))
    return classes


def module_node_classes(module) -> dict:
    """Class-type → class of one node module, V1 (NODE_CLASS_MAPPINGS: ComfyUI 0.3.64's custom-sampler nodes)
    or V3 (comfy_entrypoint: 0.3.75's, and this pack's)."""
    import asyncio
    if hasattr(module, "NODE_CLASS_MAPPINGS"):
        return dict(module.NODE_CLASS_MAPPINGS)
    extension = asyncio.run(module.comfy_entrypoint())
    return {node.GET_SCHEMA().node_id: node for node in asyncio.run(extension.get_node_list())}


def object_info(classes: dict) -> dict:
    """What GET /object_info returns for these classes (mirrors server.py's node_info for V1 and V3)."""
    from comfy_api.internal import _ComfyNodeInternal
    out = {}
    for name, cls in classes.items():
        if isinstance(cls, type) and issubclass(cls, _ComfyNodeInternal):
            out[name] = cls.GET_NODE_INFO_V1()
            continue
        types = cls.INPUT_TYPES()
        out[name] = {"input": types, "input_order": {k: list(v.keys()) for k, v in types.items()},
                     "output": list(cls.RETURN_TYPES), "output_name": list(getattr(cls, "RETURN_NAMES", None)
                                                                         or cls.RETURN_TYPES), "name": name}
    return out
