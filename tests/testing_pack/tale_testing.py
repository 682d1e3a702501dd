"""Test-only: a tiny random-weight CLIP vision model (ComfyUI's own ClipVisionModel class) for TALE's CLIP
energy on the tiny models, and a loader node for headless graphs (registered by tests/testing_pack/__init__.py).
"""
from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

_TESTS_DIR = Path(__file__).resolve().parent.parent
if str(_TESTS_DIR) not in sys.path:
    sys.path.append(str(_TESTS_DIR))

import tiny_models  # noqa: E402

from .loader_base import built_once  # noqa: E402

TINY_CLIP_VISION_CONFIG = {
    "attention_dropout": 0.0, "dropout": 0.0, "hidden_act": "quick_gelu", "hidden_size": 32, "image_size": 32,
    "initializer_factor": 1.0, "initializer_range": 0.02, "intermediate_size": 64, "layer_norm_eps": 1e-05,
    "model_type": "clip_vision_model", "num_attention_heads": 2, "num_channels": 3, "num_hidden_layers": 3,
    "patch_size": 8, "torch_dtype": "float32",
}
# projection size = the pooled text embedding of each tiny family's conditioning (CLIP-L 768 / tiny SDXL 1280)
PROJECTION_DIMS = {"sd15": 768, "sdxl": tiny_models.SDXL_POOLED_DIM}

def build_tiny_clip_vision(family: str = "sd15", seed: int = tiny_models.SEED + 11):
    """A seeded ComfyUI `ClipVisionModel` (3 layers, width 32, 32x32 input, 4x4 patches of 8 px)."""
    import comfy.clip_vision
    config = dict(TINY_CLIP_VISION_CONFIG, projection_dim=PROJECTION_DIMS[family])
    fd, path = tempfile.mkstemp(suffix=".json", prefix="tiny_clip_vision_")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(config, f)
        model = comfy.clip_vision.ClipVisionModel(path)
    finally:
        os.unlink(path)
    sd = tiny_models._seeded_weights(model.get_sd(), seed)
    missing, unexpected = model.load_sd(sd)
    assert not unexpected, unexpected
    return model


def tiny_clip_vision(family: str = "sd15"):
    return built_once("CLIP vision", family, build_tiny_clip_vision)


class TinyCLIPVisionLoader:
    RETURN_TYPES = ("CLIP_VISION",)
    FUNCTION = "load"
    CATEGORY = "TFG/testing"
    DESCRIPTION = "Tiny random-weight CLIP vision model (projection sized for the tiny SD1.5 or SDXL text encoder)."

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"family": (list(PROJECTION_DIMS), {"default": "sd15"})},
                "optional": {"clip_name": ("STRING", {"default": "", "tooltip": "Ignored (keeps a swapped-in "
                                                                                "CLIPVisionLoader's graph valid)."})}}

    def load(self, family="sd15", clip_name=""):
        return (tiny_clip_vision(family),)


NODE_CLASS_MAPPINGS = {"TFGTest_TinyCLIPVisionLoader": TinyCLIPVisionLoader}
NODE_DISPLAY_NAME_MAPPINGS = {"TFGTest_TinyCLIPVisionLoader": "Tiny CLIP Vision Loader (TFG tests)"}
