"""Test-only loaders for the tiny Wan 2.1 T2V and Qwen-Image models (registered by tests/testing_pack/__init__.py),
so the shipped Wan and Qwen-Image workflows run headless: the headless tests swap the workflows' UNETLoader,
CLIPLoader and VAELoader for one of these (tests/headless_server.py, `swap_loaders`).

Each returns (MODEL, CLIP, VAE) like CheckpointLoaderSimple:
- MODEL: the tiny random-weight diffusion model of tests/tiny_dit_models.py (ComfyUI's own WAN21_T2V / QwenImage
  classes, real architecture, shrunk widths);
- CLIP: a stand-in text encoder (`DiTTextEncoder`, the TinyTextEncoder of tests/tiny_models.py with the tiny
  model's context width and the real tokenizer's key), deterministic in the text, with no pooled output (neither
  model takes one);
- VAE: ComfyUI's own Wan 2.1 VAE class (`comfy.ldm.wan.vae.WanVAE`, through `comfy.sd.VAE`) at width 8 instead
  of 96, random weights: it decodes the 5-D latents [B, 16, T, H, W] to 1 + 4 (T - 1) frames at 8x the size, as
  the real one. Qwen-Image ships a VAE of the same class (ComfyUI loads qwen_image_vae.safetensors through it).
"""
from __future__ import annotations

import contextlib
import logging
import sys
from pathlib import Path

_TESTS_DIR = Path(__file__).resolve().parent.parent
if str(_TESTS_DIR) not in sys.path:
    sys.path.append(str(_TESTS_DIR))

import tiny_dit_models  # noqa: E402  (tests/tiny_dit_models.py)
import tiny_models  # noqa: E402

from .loader_base import TinyLoader  # noqa: E402

logger = logging.getLogger(__name__)

WAN_VAE_DIM = 8                  # real Wan 2.1 VAE: 96
WAN_VAE_CONFIG = {"z_dim": 16, "dim_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_scales": [],
                  "temperal_downsample": [False, True, True], "dropout": 0.0}
VAE_SEED = tiny_dit_models.SEED + 50

# family -> (tiny_dit_models builder, context width, tokenizer key of the real text encoder)
FAMILIES = {
    "wan21": (tiny_dit_models.build_wan21_t2v, tiny_dit_models.WAN_TEXT_DIM, "umt5xxl"),
    "qwen_image": (tiny_dit_models.build_qwen_image, tiny_dit_models.QWEN_CONTEXT_DIM, "qwen25_7b"),
}


class DiTTextEncoder(tiny_models.TinyTextEncoder):
    """Stand-in CLIP for a tiny DiT: conds (1, CONTEXT_TOKENS, width) seeded by the family and the text; no pooled
    output. CLIPTextEncode and the other core text-encode nodes take it unchanged."""

    def __init__(self, family: str, context_dim: int, token_key: str, tokens: int = tiny_dit_models.CONTEXT_TOKENS):
        # not super().__init__: TinyTextEncoder only knows the UNet/MMDiT families' sizes
        self.family = family
        self.num_tokens = tokens
        self.context_dim = context_dim
        self.pooled_dim = 1                 # embed() draws one; encode_from_tokens drops it
        self.token_keys = (token_key,)
        self.layer_idx = None
        self.tokenizer_options = {}
        self.apply_hooks_to_conds = None
        self.use_clip_schedule = False
        self.patcher = None

    def encode_from_tokens(self, tokens, return_pooled=False, return_dict=False):
        cond, _ = self.embed(tokens)
        if return_dict:
            return self.add_hooks_to_dict({"cond": cond, "pooled_output": None})
        return (cond, None) if return_pooled else cond


def _wan_vae_state_dict(dim: int, seed: int) -> dict:
    """Seeded weights for ComfyUI's WanVAE at width `dim`: matrices N(0, fan_in^-1/2), RMS-norm gains 1, biases 0;
    the decoder's last conv shrunk so decoded frames sit around mid-grey instead of clipping."""
    import torch
    import comfy.ldm.wan.vae
    shapes = comfy.ldm.wan.vae.WanVAE(dim=dim, **WAN_VAE_CONFIG).state_dict()
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for key, value in shapes.items():
        t = torch.empty(value.shape, dtype=torch.float32)
        if key.endswith("gamma"):
            t.fill_(1.0)
        elif key.endswith("bias") or value.ndim < 2:
            t.zero_()
        else:
            t.normal_(0.0, value[0].numel() ** -0.5, generator=g)
        sd[key] = t
    sd["decoder.head.2.weight"].mul_(0.5)          # head: RMS_norm, SiLU, CausalConv3d(dim, 3)
    return sd


@contextlib.contextmanager
def _wan_vae_width(dim: int):
    """Older hosts (ComfyUI 0.3.64) build the Wan 2.1 VAE at the full width (96) whatever the file holds; newer
    ones (0.3.75) read it from the file (decoder.head.0.gamma). On the older ones the width is passed through to
    ComfyUI's class for this one build."""
    import comfy.ldm.wan.vae
    original = comfy.ldm.wan.vae.WanVAE

    def at_width(**config):
        return original(**{**config, "dim": dim})

    comfy.ldm.wan.vae.WanVAE = at_width
    try:
        yield
    finally:
        comfy.ldm.wan.vae.WanVAE = original


def build_tiny_wan_vae(dim: int = WAN_VAE_DIM, seed: int = VAE_SEED):
    """A `comfy.sd.VAE` of ComfyUI's Wan 2.1 VAE class with random weights at width `dim`."""
    import comfy.sd
    sd = _wan_vae_state_dict(dim, seed)
    try:
        return comfy.sd.VAE(sd=dict(sd))
    except RuntimeError as error:           # size mismatch: a host that hard-codes the width
        if "size mismatch" not in str(error):
            raise
    with _wan_vae_width(dim):
        return comfy.sd.VAE(sd=dict(sd))


def build(family: str) -> tuple:
    """(ModelPatcher, DiTTextEncoder, VAE) for "wan21" or "qwen_image"."""
    builder, context_dim, token_key = FAMILIES[family]
    return builder().model, DiTTextEncoder(family, context_dim, token_key), build_tiny_wan_vae()


class _TinyDiTLoader(TinyLoader):
    BUILD = staticmethod(build)


class TinyWan21Loader(_TinyDiTLoader):
    FAMILY = "wan21"
    DESCRIPTION = ("Tiny random-weight Wan 2.1 T2V (comfy.supported_models.WAN21_T2V) with a stand-in text encoder "
                   "and ComfyUI's Wan 2.1 VAE class at width 8.")


class TinyQwenImageLoader(_TinyDiTLoader):
    FAMILY = "qwen_image"
    DESCRIPTION = ("Tiny random-weight Qwen-Image (comfy.supported_models.QwenImage) with a stand-in text encoder "
                   "and ComfyUI's Wan 2.1 VAE class (Qwen-Image's) at width 8.")


NODE_CLASS_MAPPINGS = {
    "TFGTest_TinyWan21Loader": TinyWan21Loader,
    "TFGTest_TinyQwenImageLoader": TinyQwenImageLoader,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "TFGTest_TinyWan21Loader": "Tiny Wan 2.1 T2V Loader (TFG tests)",
    "TFGTest_TinyQwenImageLoader": "Tiny Qwen-Image Loader (TFG tests)",
}
