"""Tiny random-weight models of the newer DiT families, built in process from ComfyUI's own config classes
(`comfy.supported_models`): Wan 2.1 T2V / I2V, Wan 2.2 T2V, HunyuanVideo, LTX-Video, Qwen-Image, Chroma and SD3.5.

Each builder returns a `TinyDiT`: the ModelPatcher, a latent maker of the family's real layout (5-D
(B, C, T, H, W) latents for the video families) and hand-made positive/negative CONDITIONING of the shape the
family's text encoder gives (context width shrunk). ComfyUI must already be importable (the `comfy_root`
fixture). Parameter sets differ between ComfyUI versions: only the fields the host's dataclasses know are passed.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable

import torch

SEED = 20241204
CONTEXT_TOKENS = 8


@dataclass
class TinyDiT:
    family: str
    """The pack's name for the family (what adapters.detect_family reports)."""
    model: object
    latent: Callable[..., torch.Tensor]
    positive: list
    negative: list


def _seeded(module: torch.nn.Module, seed: int, std: float = 0.05) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(module.named_parameters()):
            if p.ndim >= 2:
                p.copy_(torch.randn(p.shape, generator=g) * std)
            elif "norm" in name or name.endswith(".scale") or name.endswith("weight"):
                p.fill_(1.0)
            else:
                p.zero_()


def _build(config_cls, unet_config: dict, seed: int):
    import comfy.model_management
    import comfy.model_patcher
    cfg = config_cls(dict(unet_config))
    cfg.set_inference_dtype(torch.float32, None)
    base = cfg.get_model({})
    _seeded(base.diffusion_model, seed)
    base.eval()
    device = comfy.model_management.get_torch_device()
    return comfy.model_patcher.ModelPatcher(base, load_device=device,
                                            offload_device=comfy.model_management.unet_offload_device())


def _only_known(params_cls, values: dict) -> dict:
    known = {f.name: f for f in dataclasses.fields(params_cls)}
    out = {k: v for k, v in values.items() if k in known}
    for name, f in known.items():  # fields a newer host added: give neutral values
        if name not in out:
            out[name] = False if f.type in (bool, "bool") else 0
    return out


def _cond(seed: int, dim: int, tokens: int = CONTEXT_TOKENS, **extra) -> list:
    g = torch.Generator().manual_seed(seed)
    return [[torch.randn((1, tokens, dim), generator=g), dict(extra)]]


def _latent_maker(channels: int, video: bool, frames: int = 3, size: int = 8):
    def latent(batch: int = 1, size: int = size, frames: int = frames) -> torch.Tensor:
        shape = (batch, channels, frames, size, size) if video else (batch, channels, size, size)
        return torch.zeros(shape)
    return latent


# ---- Wan -----------------------------------------------------------------------------------------
WAN_TEXT_DIM = 32


def _wan_config(**extra) -> dict:
    return {"image_model": "wan2.1", "model_type": "t2v", "patch_size": (1, 2, 2), "text_len": CONTEXT_TOKENS,
            "in_dim": 16, "dim": 64, "ffn_dim": 128, "freq_dim": 32, "text_dim": WAN_TEXT_DIM, "out_dim": 16,
            "num_heads": 2, "num_layers": 2, "window_size": (-1, -1), "qk_norm": True, "cross_attn_norm": True,
            "eps": 1e-6, **extra}


def build_wan21_t2v() -> TinyDiT:
    import comfy.supported_models as sm
    model = _build(sm.WAN21_T2V, _wan_config(), SEED + 1)
    return TinyDiT("Wan 2.1", model, _latent_maker(16, True), _cond(1, WAN_TEXT_DIM), _cond(2, WAN_TEXT_DIM))


def build_wan22_t2v() -> TinyDiT:
    import comfy.supported_models as sm
    model = _build(sm.WAN22_T2V, _wan_config(in_dim=48, out_dim=48), SEED + 2)
    return TinyDiT("Wan 2.2", model, _latent_maker(48, True), _cond(3, WAN_TEXT_DIM), _cond(4, WAN_TEXT_DIM))


def build_wan21_i2v() -> TinyDiT:
    """I2V: 16 noise channels + 20 concat channels (mask 4 + image latent 16) that ComfyUI builds from
    `concat_latent_image` / `concat_mask` in the conditioning."""
    import comfy.supported_models as sm
    model = _build(sm.WAN21_I2V, _wan_config(model_type="i2v", in_dim=36), SEED + 3)
    image = torch.randn((1, 16, 3, 8, 8), generator=torch.Generator().manual_seed(5))
    mask = torch.zeros((1, 1, 3, 8, 8))
    mask[:, :, 0] = 1.0
    extra = {"concat_latent_image": image, "concat_mask": mask}
    return TinyDiT("Wan 2.1", model, _latent_maker(16, True), _cond(5, WAN_TEXT_DIM, **extra),
                   _cond(6, WAN_TEXT_DIM, **extra))


# ---- HunyuanVideo (the variant without guidance embedding: real CFG) -------------------------------
HUNYUAN_CONTEXT_DIM = 32
HUNYUAN_VEC_DIM = 16


def build_hunyuan_video() -> TinyDiT:
    import comfy.supported_models as sm
    from comfy.ldm.hunyuan_video.model import HunyuanVideoParams
    params = _only_known(HunyuanVideoParams, {
        "in_channels": 16, "out_channels": 16, "vec_in_dim": HUNYUAN_VEC_DIM, "context_in_dim": HUNYUAN_CONTEXT_DIM,
        "hidden_size": 64, "mlp_ratio": 2.0, "num_heads": 2, "depth": 1, "depth_single_blocks": 1,
        "axes_dim": [8, 12, 12], "theta": 256, "patch_size": [1, 2, 2], "qkv_bias": True, "guidance_embed": False})
    model = _build(sm.HunyuanVideo, {"image_model": "hunyuan_video", **params}, SEED + 4)

    def cond(seed):
        g = torch.Generator().manual_seed(seed + 100)
        return _cond(seed, HUNYUAN_CONTEXT_DIM, pooled_output=torch.randn((1, HUNYUAN_VEC_DIM), generator=g))
    return TinyDiT("HunyuanVideo", model, _latent_maker(16, True), cond(7), cond(8))


# ---- LTX-Video -------------------------------------------------------------------------------------
LTXV_CAPTION_DIM = 32


def build_ltxv() -> TinyDiT:
    import comfy.supported_models as sm
    config = {"image_model": "ltxv", "in_channels": 128, "cross_attention_dim": 64, "attention_head_dim": 32,
              "num_attention_heads": 2, "caption_channels": LTXV_CAPTION_DIM, "num_layers": 2}
    model = _build(sm.LTXV, config, SEED + 5)

    def cond(seed):
        return _cond(seed, LTXV_CAPTION_DIM, frame_rate=25, attention_mask=torch.ones((1, CONTEXT_TOKENS), dtype=torch.int64))
    return TinyDiT("LTX-Video", model, _latent_maker(128, True, size=4), cond(9), cond(10))


# ---- Qwen-Image ------------------------------------------------------------------------------------
QWEN_CONTEXT_DIM = 32


def build_qwen_image() -> TinyDiT:
    import comfy.supported_models as sm
    config = {"image_model": "qwen_image", "patch_size": 2, "in_channels": 64, "out_channels": 16, "num_layers": 2,
              "attention_head_dim": 32, "num_attention_heads": 2, "joint_attention_dim": QWEN_CONTEXT_DIM,
              "axes_dims_rope": (8, 12, 12)}
    model = _build(sm.QwenImage, config, SEED + 6)
    return TinyDiT("Qwen-Image", model, _latent_maker(16, True, frames=1), _cond(11, QWEN_CONTEXT_DIM),
                   _cond(12, QWEN_CONTEXT_DIM))


# ---- Chroma ----------------------------------------------------------------------------------------
CHROMA_CONTEXT_DIM = 32


def build_chroma() -> TinyDiT:
    import comfy.supported_models as sm
    from comfy.ldm.chroma.model import ChromaParams
    params = _only_known(ChromaParams, {
        "in_channels": 64, "out_channels": 64, "context_in_dim": CHROMA_CONTEXT_DIM, "hidden_size": 64,
        "mlp_ratio": 2.0, "num_heads": 2, "depth": 1, "depth_single_blocks": 1, "axes_dim": [8, 12, 12],
        "theta": 10000, "patch_size": 2, "qkv_bias": True, "in_dim": 64, "out_dim": 64, "hidden_dim": 64,
        "n_layers": 1})
    model = _build(sm.Chroma, {"image_model": "chroma", **params}, SEED + 7)
    return TinyDiT("Chroma", model, _latent_maker(16, False), _cond(13, CHROMA_CONTEXT_DIM, pooled_output=None),
                   _cond(14, CHROMA_CONTEXT_DIM, pooled_output=None))


# ---- SD3.5 (MMDiT-X: RMS qk-norm and dual-attention blocks, as SD3.5 Medium) ------------------------
SD35_CONTEXT_DIM = 32
SD35_POOLED_DIM = 16


def build_sd35() -> TinyDiT:
    import comfy.supported_models as sm
    config = {"in_channels": 16, "pos_embed_scaling_factor": None, "patch_size": 2, "out_channels": 16,
              "depth": 2, "num_patches": 64 * 64, "pos_embed_max_size": 64, "adm_in_channels": SD35_POOLED_DIM,
              "context_embedder_config": {"target": "torch.nn.Linear",
                                          "params": {"in_features": SD35_CONTEXT_DIM, "out_features": 128}},
              "qk_norm": "rms", "x_block_self_attn_layers": [0]}
    model = _build(sm.SD3, config, SEED + 8)

    def cond(seed):
        g = torch.Generator().manual_seed(seed + 100)
        return _cond(seed, SD35_CONTEXT_DIM, pooled_output=torch.randn((1, SD35_POOLED_DIM), generator=g))
    return TinyDiT("SD3.5", model, _latent_maker(16, False), cond(15), cond(16))


BUILDERS = {
    "wan21_t2v": build_wan21_t2v,
    "wan21_i2v": build_wan21_i2v,
    "wan22_t2v": build_wan22_t2v,
    "hunyuan_video": build_hunyuan_video,
    "ltxv": build_ltxv,
    "qwen_image": build_qwen_image,
    "chroma": build_chroma,
    "sd35": build_sd35,
}
_built: dict[str, TinyDiT] = {}


def get(name: str) -> TinyDiT:
    if name not in _built:
        _built[name] = BUILDERS[name]()
    return _built[name]


def noise(latent: torch.Tensor) -> torch.Tensor:
    return torch.randn(latent.shape, generator=torch.Generator().manual_seed(11))


def ksample(d: TinyDiT, model, steps: int, cfg: float, batch: int = 2) -> torch.Tensor:
    """ComfyUI's KSampler path (comfy.sample.sample, euler/normal, fixed noise) on a tiny DiT."""
    import comfy.sample
    latent = d.latent(batch)
    with torch.inference_mode():
        return comfy.sample.sample(model, noise(latent), steps, cfg, "euler", "normal", d.positive, d.negative,
                                   latent, disable_pbar=True, seed=0).clone()
