"""Test-only ComfyUI node pack: loaders for the tiny random-weight SDXL, Flux and SD3 models (and, in
dit_loaders.py, Wan 2.1 T2V and Qwen-Image).

It also holds a tiny CLIP-vision loader (tale_testing.py) and nodes that put NaN/Inf into a tensor
(hostile.py). It lives under tests/ so it never reaches a user's install; the headless test server symlinks it
into its own custom_nodes folder. Each loader returns (MODEL, CLIP, VAE) like CheckpointLoaderSimple
and takes an optional, unused `ckpt_name`, so a workflow's CheckpointLoaderSimple can be swapped for
it without touching the rest of the graph. Models are built once per server process."""
from __future__ import annotations

import sys
from pathlib import Path

_TESTS_DIR = Path(__file__).resolve().parent.parent      # resolve(): the pack is loaded through a symlink
if str(_TESTS_DIR) not in sys.path:
    sys.path.append(str(_TESTS_DIR))

import tiny_models  # noqa: E402  (tests/tiny_models.py)

from .loader_base import TinyLoader  # noqa: E402


class _TinyLoader(TinyLoader):
    BUILD = staticmethod(tiny_models.build)


class TinySDXLLoader(_TinyLoader):
    FAMILY = "sdxl"
    DESCRIPTION = "Tiny random-weight SDXL (comfy.supported_models.SDXL) with a stand-in text encoder and TAESD."


class TinyFluxLoader(_TinyLoader):
    FAMILY = "flux"
    DESCRIPTION = "Tiny random-weight Flux-dev (comfy.supported_models.Flux) with a stand-in text encoder and TAESD."


class TinySD3Loader(_TinyLoader):
    FAMILY = "sd3"
    DESCRIPTION = "Tiny random-weight SD3 MMDiT file with a stand-in text encoder and 16-channel TAESD."


NODE_CLASS_MAPPINGS = {
    "TFGTest_TinySDXLLoader": TinySDXLLoader,
    "TFGTest_TinyFluxLoader": TinyFluxLoader,
    "TFGTest_TinySD3Loader": TinySD3Loader,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "TFGTest_TinySDXLLoader": "Tiny SDXL Loader (TFG tests)",
    "TFGTest_TinyFluxLoader": "Tiny Flux Loader (TFG tests)",
    "TFGTest_TinySD3Loader": "Tiny SD3 Loader (TFG tests)",
}

# the tiny CLIP-vision loader (TALE), the non-finite tensor nodes (hostile-input tests) and the tiny DiT loaders
from .dit_loaders import NODE_CLASS_MAPPINGS as _DIT_NODES, NODE_DISPLAY_NAME_MAPPINGS as _DIT_NAMES  # noqa: E402
from .hostile import NODE_CLASS_MAPPINGS as _HOSTILE_NODES, NODE_DISPLAY_NAME_MAPPINGS as _HOSTILE_NAMES  # noqa: E402
from .tale_testing import NODE_CLASS_MAPPINGS as _TALE_NODES, NODE_DISPLAY_NAME_MAPPINGS as _TALE_NAMES  # noqa: E402

NODE_CLASS_MAPPINGS.update(_TALE_NODES)
NODE_CLASS_MAPPINGS.update(_HOSTILE_NODES)
NODE_DISPLAY_NAME_MAPPINGS.update(_TALE_NAMES)
NODE_DISPLAY_NAME_MAPPINGS.update(_HOSTILE_NAMES)
NODE_CLASS_MAPPINGS.update(_DIT_NODES)
NODE_DISPLAY_NAME_MAPPINGS.update(_DIT_NAMES)
