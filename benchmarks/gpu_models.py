"""The model families `benchmarks/gpu.py` times: full-size architectures built from ComfyUI's own config classes
(`comfy.supported_models`) with random weights, their scaled-down twins for `--tiny`, and hand-made
conditioning and empty latents of each family's real layout (no text encoder, no VAE, no checkpoint).

Full-size hyperparameters are those ComfyUI's model detection (`comfy/model_detection.py`) derives from the
released checkpoints:
* SDXL base: UNet 2.57 B (`comfy.supported_models.SDXL`), CLIP-L + bigG context 77 x 2048, pooled 1280.
* Flux-dev: 11.9 B (`.Flux`), T5-XXL context 256 x 4096 (Flux-dev's max length), CLIP-L pooled 768, guidance 3.5.
* Wan 2.1 T2V 1.3 B (`.WAN21_T2V`): dim 1536, ffn 8960, 12 heads (dim // 128), 30 layers; 14 B: dim 5120,
  ffn 13824, 40 heads, 40 layers; both patch (1, 2, 2), freq_dim 256, in/out 16 channels, umt5-xxl context
  512 x 4096 (ComfyUI's Wan tokenizer pads to min_length 512). Latent (B, 16, 1 + (frames - 1) / 4, H / 8, W / 8):
  832x480x33 frames -> (B, 16, 9, 60, 104), 9 x 30 x 52 = 14 040 video tokens per clip.
* Qwen-Image 20 B (`.QwenImage`): 60 joint blocks, 24 heads x 128, in 64 (16 latent channels x 2x2 patch),
  joint_attention_dim 3584 (Qwen2.5-VL 7B hidden size), rope axes (16, 56, 56); the context is 128 tokens of
  Qwen2.5-VL features (a prompt of that length after ComfyUI drops the template). Latent (B, 16, 1, H/8, W/8) as
  the pack's tests use it: 1024x1024 -> 4096 image tokens.
"""
from __future__ import annotations

from dataclasses import dataclass

# ---- full-size configs --------------------------------------------------------------------------
SDXL_UNET = {
    "use_checkpoint": False, "image_size": 32, "in_channels": 4, "out_channels": 4, "model_channels": 320,
    "num_res_blocks": [2, 2, 2], "channel_mult": [1, 2, 4], "transformer_depth": [0, 0, 2, 2, 10, 10],
    "transformer_depth_output": [0, 0, 0, 2, 2, 2, 10, 10, 10], "transformer_depth_middle": 10,
    "use_spatial_transformer": True, "use_linear_in_transformer": True, "context_dim": 2048,
    "num_head_channels": 64, "legacy": False, "num_classes": "sequential", "adm_in_channels": 2816,
    "use_temporal_attention": False, "use_temporal_resblock": False,
}
FLUX_DEV = {
    "image_model": "flux", "guidance_embed": True, "in_channels": 16, "out_channels": 16, "patch_size": 2,
    "vec_in_dim": 768, "context_in_dim": 4096, "hidden_size": 3072, "mlp_ratio": 4.0, "num_heads": 24,
    "depth": 19, "depth_single_blocks": 38, "axes_dim": [16, 56, 56], "theta": 10000, "qkv_bias": True,
}
_WAN = {"image_model": "wan2.1", "model_type": "t2v", "patch_size": (1, 2, 2), "in_dim": 16, "out_dim": 16,
        "freq_dim": 256, "text_dim": 4096, "window_size": (-1, -1), "qk_norm": True, "cross_attn_norm": True,
        "eps": 1e-6}
WAN21_1_3B = dict(_WAN, dim=1536, ffn_dim=8960, num_heads=12, num_layers=30)
WAN21_14B = dict(_WAN, dim=5120, ffn_dim=13824, num_heads=40, num_layers=40)
QWEN_IMAGE = {"image_model": "qwen_image", "patch_size": 2, "in_channels": 64, "out_channels": 16,
              "num_layers": 60, "attention_head_dim": 128, "num_attention_heads": 24, "joint_attention_dim": 3584,
              "axes_dims_rope": (16, 56, 56)}

# ---- scaled-down twins for --tiny (same classes, same code paths) ---------------------------------
SDXL_TINY = dict(SDXL_UNET, model_channels=32, num_res_blocks=[1, 1], channel_mult=[1, 2], transformer_depth=[0, 1],
                 transformer_depth_output=[0, 0, 1, 1], transformer_depth_middle=1, context_dim=64,
                 num_head_channels=16)
FLUX_TINY = dict(FLUX_DEV, hidden_size=64, num_heads=4, depth=1, depth_single_blocks=1, axes_dim=[4, 6, 6],
                 context_in_dim=64)
WAN_TINY = dict(_WAN, dim=64, ffn_dim=128, num_heads=2, num_layers=2, freq_dim=32, text_dim=32)
QWEN_TINY = dict(QWEN_IMAGE, num_layers=2, attention_head_dim=32, num_attention_heads=2, joint_attention_dim=32,
                 axes_dims_rope=(8, 12, 12))


@dataclass(frozen=True)
class Family:
    key: str
    """The --models name."""
    title: str
    config_class: str
    """Class name in comfy.supported_models."""
    full: dict
    tiny: dict
    context_key: str
    """The config field that holds the text context width."""
    text_tokens: int
    pooled: int | None
    """Width of the pooled text vector (None: the family has none)."""
    sampler: str
    scheduler: str
    cfg: float
    expected_params: float
    """Published size, for the sanity line in the output."""
    size: tuple[int, int, int]
    """Default (width, height, frames) of a run; frames 0 for image models."""
    tiny_size: tuple[int, int, int]
    layout: str = "image"
    """Latent layout: "image" (B, C, H/8, W/8), "video" (B, C, 1 + (frames - 1) / 4, H/8, W/8) or "frame"
    (B, C, 1, H/8, W/8: Qwen-Image)."""
    batch: int = 4
    """Default images (clips) per run."""
    steps: int = 20
    """Default steps of a full-size run (see gpu.py's budget)."""
    guidance: float | None = None
    """Flux-dev's distilled guidance input."""
    tiny_text_tokens: int = 8


FAMILIES = {f.key: f for f in (
    Family("sdxl", "SDXL", "SDXL", SDXL_UNET, SDXL_TINY, "context_dim", 77, 1280, "euler", "normal", 7.0, 2.567e9,
           (1024, 1024, 0), (64, 64, 0), tiny_text_tokens=77, steps=20),
    Family("flux", "Flux-dev", "Flux", FLUX_DEV, FLUX_TINY, "context_in_dim", 256, 768, "euler", "simple", 3.5,
           11.90e9, (1024, 1024, 0), (64, 64, 0), guidance=3.5, tiny_text_tokens=256, steps=10),
    Family("wan1.3b", "Wan 2.1 T2V 1.3B", "WAN21_T2V", WAN21_1_3B, WAN_TINY, "text_dim", 512, None, "euler",
           "simple", 6.0, 1.42e9, (832, 480, 33), (64, 48, 5), layout="video", batch=1, steps=8),
    Family("wan14b", "Wan 2.1 T2V 14B", "WAN21_T2V", WAN21_14B, WAN_TINY, "text_dim", 512, None, "euler",
           "simple", 6.0, 14.29e9, (832, 480, 33), (64, 48, 5), layout="video", batch=1, steps=4),
    Family("qwen", "Qwen-Image", "QwenImage", QWEN_IMAGE, QWEN_TINY, "joint_attention_dim", 128, None, "euler",
           "simple", 2.5, 20.43e9, (1024, 1024, 0), (64, 64, 0), layout="frame", batch=1, steps=8),
)}


def unet_config(family: str, tiny: bool = False) -> dict:
    f = FAMILIES[family]
    return dict(f.tiny if tiny else f.full)


def model_config(family: str, tiny: bool = False, dtype=None):
    """The comfy.supported_models config object for `family` (its unet_extra_config applied, then ours)."""
    import comfy.supported_models
    cls = getattr(comfy.supported_models, FAMILIES[family].config_class)
    cfg = cls(unet_config(family, tiny))
    if family == "sdxl":
        cfg.unet_config["num_head_channels"] = unet_config(family, tiny)["num_head_channels"]
    if dtype is not None:
        cfg.set_inference_dtype(dtype, None)
    return cfg


def build_base_model(family: str, tiny: bool, device, dtype, seed: int = 0):
    """A BaseModel of the family with random weights (std 1/sqrt(fan_in); norms 1, biases 0) on `device`.
    device="meta" builds the structure only (for counting parameters without memory)."""
    import torch
    base = model_config(family, tiny, dtype).get_model({}, device=device)
    if str(device) != "meta":
        gen = torch.Generator(device=device).manual_seed(seed)
        with torch.no_grad():
            for name, p in base.diffusion_model.named_parameters():
                if p.dim() >= 2:
                    fan_in = p[0].numel()
                    p.normal_(0.0, fan_in ** -0.5, generator=gen)
                elif name.endswith(("scale", "norm.weight")) or ".norm" in name and name.endswith("weight"):
                    p.fill_(1.0)
                else:
                    p.zero_()
    return base


def parameter_count(family: str, tiny: bool = False) -> int:
    base = build_base_model(family, tiny, "meta", None)
    return sum(p.numel() for p in base.diffusion_model.parameters())


def default_size(family: str, tiny: bool) -> tuple[int, int, int]:
    f = FAMILIES[family]
    return f.tiny_size if tiny else f.size


def parse_size(text: str, family: str, tiny: bool) -> tuple[int, int, int]:
    """"1024" (square), "832x480" or "832x480x33" (frames, video families only) -> (width, height, frames)."""
    parts = [int(p) for p in str(text).lower().split("x") if p.strip()]
    if not parts or len(parts) > 3 or min(parts) < 1:
        raise ValueError(f"size {text!r}: expected N, WxH or WxHxFRAMES")
    width, height = (parts[0], parts[0]) if len(parts) == 1 else (parts[0], parts[1])
    frames = 0
    if FAMILIES[family].layout == "video":
        frames = parts[2] if len(parts) > 2 else default_size(family, tiny)[2]
    return width, height, frames


def latent_shape(family: str, size: tuple[int, int, int], batch: int, channels: int) -> tuple[int, ...]:
    """The empty latent of `batch` images/clips: (B, C, H/8, W/8) for SDXL/Flux, (B, C, T, H/8, W/8) for Wan
    (T = 1 + (frames - 1) // 4, the Wan VAE's temporal compression) and Qwen-Image (T = 1)."""
    width, height, frames = size
    layout = FAMILIES[family].layout
    if layout == "image":
        return (batch, channels, height // 8, width // 8)
    t = 1 + (max(frames, 1) - 1) // 4 if layout == "video" else 1
    return (batch, channels, t, height // 8, width // 8)


def conditioning(family: str, tiny: bool, seed: int) -> list:
    """One CONDITIONING entry of the family's text-encoder shape (random values, CPU; ComfyUI moves it)."""
    import torch
    f = FAMILIES[family]
    width = unet_config(family, tiny)[f.context_key]
    tokens = f.tiny_text_tokens if tiny else f.text_tokens
    gen = torch.Generator().manual_seed(seed)
    extra = {}
    if f.pooled is not None:
        extra["pooled_output"] = torch.randn(1, f.pooled, generator=gen)
    if f.guidance is not None:
        extra["guidance"] = f.guidance
    return [[torch.randn(1, tokens, width, generator=gen), extra]]


def describe_size(size: tuple[int, int, int]) -> str:
    width, height, frames = size
    return f"{width}×{height}" + (f"×{frames} frames" if frames > 1 else "")
