"""Tiny random-weight models of the real architectures, built with ComfyUI's own classes.

Every builder is deterministic (seeded initialisation) and fast on CPU. ComfyUI is imported lazily
inside the functions: callers must already have run `host.setup_inprocess_comfyui(root)` (the
`comfy_root` fixture does) or be running inside a ComfyUI process (the test-only node pack).

* SD1.5: a real checkpoint file (UNet detected as SD15 + real CLIP-L in fp16 + TAESD), cached in the user
  cache folder (below) and loaded through `comfy.sd.load_checkpoint_guess_config`.
* SDXL, Flux: built in process from `comfy.supported_models.SDXL` / `.Flux` with tiny configs (no
  tiny file of these can be detected: their detection hard-codes the full sizes).
* SD3: a tiny MMDiT file (depth 2, hidden 128) that ComfyUI's loader detects as SD3.
* `TinyTextEncoder`: a stand-in CLIP (deterministic embeddings seeded by the text) so ComfyUI's
  CLIPTextEncode works unchanged for the families whose real text encoders are too big.

Cache: the two files (tiny SD1.5 checkpoint ~344 MiB, tiny SD3 file ~14 MiB: about 360 MiB together) are
written once to $TFG_TEST_CACHE, else $XDG_CACHE_HOME/tfg-nodes/tests, else ~/.cache/tfg-nodes/tests: outside
the pack, so nothing large lands in ComfyUI/custom_nodes/. Delete the folder to reclaim the space.
"""
from __future__ import annotations

import copy
import hashlib
import logging
import os
import tempfile
from pathlib import Path

logger = logging.getLogger(__name__)

TESTS_DIR = Path(__file__).resolve().parent
CACHE_ENV = "TFG_TEST_CACHE"
CACHE_SIZE_NOTE = "360 MiB"


def _cache_dir() -> Path:
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "tfg-nodes" / "tests"


CACHE_DIR = _cache_dir()

# Bump when a builder changes, so stale cached files are not reused.
CACHE_VERSION = "v2"

SEED = 20240601

# ---- sizes of the tiny models (the TinyTextEncoder sizes follow them) ----------------------------
SDXL_CONTEXT_DIM = 64          # real: 2048
SDXL_POOLED_DIM = 1280         # fixed: SDXL.encode_adm builds the 2816-dim adm vector from it
SD3_HIDDEN = 128               # depth = hidden // 64 = 2
SD3_CONTEXT_DIM = 64           # real: 4096
SD3_POOLED_DIM = 32            # real: 2048
SD3_POS_EMBED_MAX = 32         # latent up to 64x64 (512 px)
FLUX_CONTEXT_DIM = 64          # real: 4096
FLUX_POOLED_DIM = 32           # real: 768

# family -> (context tokens, context dim, pooled dim, token-dict keys the real tokenizer uses)
TEXT_ENCODER_SPECS = {
    "sd15": (77, 768, 768, ("l",)),
    "sdxl": (77, SDXL_CONTEXT_DIM, SDXL_POOLED_DIM, ("g", "l")),
    "sd3": (16, SD3_CONTEXT_DIM, SD3_POOLED_DIM, ("g", "l", "t5xxl")),
    "flux": (16, FLUX_CONTEXT_DIM, FLUX_POOLED_DIM, ("l", "t5xxl")),
}

# family -> (latent channels, TAESD vae_scale, vae_shift) (scale/shift as ComfyUI's latent formats)
VAE_SPECS = {
    "sd15": (4, 0.18215, 0.0),
    "sdxl": (4, 0.13025, 0.0),
    "sd3": (16, 1.5305, 0.0609),
    "flux": (16, 0.3611, 0.1159),
}

SD15_UNET_CONFIG = {
    "use_checkpoint": False, "image_size": 32, "use_spatial_transformer": True, "legacy": False,
    "adm_in_channels": None, "in_channels": 4, "out_channels": 4, "model_channels": 320, "context_dim": 768,
    "use_linear_in_transformer": False, "use_temporal_resblock": False, "use_temporal_attention": False,
    "num_res_blocks": [1], "channel_mult": [1], "transformer_depth": [1], "transformer_depth_output": [1, 1],
    "transformer_depth_middle": 1,
}

SDXL_UNET_CONFIG = {
    "use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True,
    "legacy": False, "num_classes": "sequential", "adm_in_channels": 2816, "in_channels": 4,
    "model_channels": 32, "num_res_blocks": [1, 1], "transformer_depth": [0, 1], "channel_mult": [1, 2],
    "transformer_depth_middle": 1, "use_linear_in_transformer": True, "context_dim": SDXL_CONTEXT_DIM,
    "transformer_depth_output": [0, 0, 1, 1], "use_temporal_attention": False, "use_temporal_resblock": False,
}
SDXL_NUM_HEAD_CHANNELS = 16    # real: 64 (overrides SDXL.unet_extra_config so 32 channels give 2 heads)

FLUX_UNET_CONFIG = {
    "image_model": "flux", "guidance_embed": True, "in_channels": 16, "out_channels": 16, "patch_size": 2,
    "vec_in_dim": FLUX_POOLED_DIM, "context_in_dim": FLUX_CONTEXT_DIM, "hidden_size": 64, "mlp_ratio": 4.0,
    "num_heads": 4, "depth": 2, "depth_single_blocks": 2, "axes_dim": [4, 6, 6], "theta": 10000,
    "qkv_bias": True,
}

SD3_UNET_CONFIG = {
    "in_channels": 16, "patch_size": 2, "out_channels": 16, "depth": SD3_HIDDEN // 64, "input_size": None,
    "adm_in_channels": SD3_POOLED_DIM,
    "context_embedder_config": {"target": "torch.nn.Linear",
                                "params": {"in_features": SD3_CONTEXT_DIM, "out_features": SD3_HIDDEN}},
    "num_patches": SD3_POS_EMBED_MAX ** 2, "pos_embed_max_size": SD3_POS_EMBED_MAX,
    "pos_embed_scaling_factor": None, "x_block_self_attn_layers": [],
}


# ----------------------------------------------------------------------------------------------
# Seeded weights
# ----------------------------------------------------------------------------------------------

def _generator(seed: int):
    import torch
    g = torch.Generator(device="cpu")
    g.manual_seed(seed)
    return g


def _seeded_weights(state_dict, seed: int, matrix_std=None, skip=()):
    """Deterministic init for a state dict's shapes: bias 0, norm/scale 1, else N(0, std)
    (std = fan_in^-1/2 unless `matrix_std` is given)."""
    import torch
    g = _generator(seed)
    out = {}
    for k, v in state_dict.items():
        if any(s in k for s in skip):
            continue
        t = torch.empty(tuple(v.shape), dtype=torch.float32)
        last = k.rsplit(".", 1)[-1]
        if last == "bias" or "bias" in last:
            t.zero_()
        elif "norm" in k or last == "scale":
            t.fill_(1.0)
        else:
            std = matrix_std if matrix_std is not None else max(1, v[0].numel() if v.ndim else 1) ** -0.5
            t.normal_(0.0, std, generator=g)
        out[k] = t
    return out


def _taesd_state_dict(family: str, seed: int):
    import comfy.taesd.taesd
    channels, scale, shift = VAE_SPECS[family]
    sd = _seeded_weights(comfy.taesd.taesd.TAESD(latent_channels=channels).state_dict(), seed)
    sd["vae_scale"].fill_(scale)
    sd["vae_shift"].fill_(shift)
    # The decoder's last conv: centre the image on mid-grey with a small spread, so decoded images of
    # random latents are mostly unsaturated and pixel comparisons stay sensitive.
    last = max(int(k.split(".")[1]) for k in sd if k.startswith("taesd_decoder.") and k.count(".") == 2)
    sd[f"taesd_decoder.{last}.weight"].mul_(0.25)
    sd[f"taesd_decoder.{last}.bias"].fill_(0.5)
    return sd


def build_tiny_vae(family: str):
    """A random-weight TAESD with the family's latent channels, as a `comfy.sd.VAE`."""
    import comfy.sd
    return comfy.sd.VAE(sd=_taesd_state_dict(family, SEED + 3))


def _load_device():
    import comfy.model_management
    return comfy.model_management.get_torch_device(), comfy.model_management.unet_offload_device()


def _build_in_process(config_cls, unet_config: dict, seed: int, matrix_std=None, after_init=None):
    """Model of `config_cls` with a seeded state dict, wrapped in a ModelPatcher."""
    import torch
    import comfy.model_patcher
    cfg = config_cls(unet_config)
    if after_init is not None:
        after_init(cfg)
    cfg.set_inference_dtype(torch.float32, None)
    base = cfg.get_model({})
    sd = _seeded_weights(base.diffusion_model.state_dict(), seed, matrix_std=matrix_std)
    missing, unexpected = base.diffusion_model.load_state_dict(sd, strict=True)
    assert not missing and not unexpected, (missing, unexpected)
    base.eval()
    load_device, offload_device = _load_device()
    return comfy.model_patcher.ModelPatcher(base, load_device=load_device, offload_device=offload_device)


# ----------------------------------------------------------------------------------------------
# Stand-in text encoder
# ----------------------------------------------------------------------------------------------

def _text_seed(*parts: str) -> int:
    h = hashlib.sha256("\x1f".join(parts).encode("utf-8")).digest()
    return int.from_bytes(h[:8], "little") & 0x7FFF_FFFF_FFFF_FFFF


class TinyTextEncoder:
    """Stand-in for `comfy.sd.CLIP` that ComfyUI's text-encode nodes accept unchanged.

    `tokenize(text)` returns the family's token dict (e.g. {"g": ..., "l": ...} for SDXL) holding the
    text itself; `encode_from_tokens_scheduled(tokens)` returns `[[cond, {"pooled_output": pooled}]]`
    with tensors drawn from a generator seeded by the family and the texts (same text -> same
    tensors in every process; different text -> different tensors)."""

    def __init__(self, family: str, tokens: int | None = None):
        if family not in TEXT_ENCODER_SPECS:
            raise ValueError(f"unknown family {family!r}; known: {sorted(TEXT_ENCODER_SPECS)}")
        n, ctx, pooled, keys = TEXT_ENCODER_SPECS[family]
        self.family = family
        self.num_tokens = tokens if tokens is not None else n
        self.context_dim = ctx
        self.pooled_dim = pooled
        self.token_keys = keys
        self.layer_idx = None
        self.tokenizer_options = {}
        self.apply_hooks_to_conds = None
        self.use_clip_schedule = False
        self.patcher = None

    # -- comfy.sd.CLIP surface used by the core nodes --
    def clone(self):
        return copy.copy(self)

    def clip_layer(self, layer_idx):
        self.layer_idx = layer_idx

    def set_tokenizer_option(self, option_name, value):
        self.tokenizer_options[option_name] = value

    def add_patches(self, patches, strength_patch=1.0, strength_model=1.0):
        return []

    def add_hooks_to_dict(self, pooled_dict):
        if self.apply_hooks_to_conds:
            pooled_dict["hooks"] = self.apply_hooks_to_conds
        return pooled_dict

    def load_model(self):
        return self.patcher

    def get_key_patches(self):
        return {}

    def get_sd(self):
        return {}

    def tokenize(self, text, return_word_ids=False, **kwargs):
        return {k: [[(text, 1.0)]] for k in self.token_keys}

    def _texts(self, tokens) -> list[str]:
        parts = []
        for key in sorted(tokens):
            for chunk in tokens[key]:
                parts.append(key + "=" + "".join(str(t[0]) for t in chunk))
        return parts

    def embed(self, tokens):
        """(cond (1, T, context_dim), pooled (1, pooled_dim)) for a token dict."""
        import torch
        g = _generator(_text_seed(self.family, *self._texts(tokens)))
        cond = torch.randn((1, self.num_tokens, self.context_dim), generator=g)
        pooled = torch.randn((1, self.pooled_dim), generator=g)
        return cond, pooled

    def encode_from_tokens(self, tokens, return_pooled=False, return_dict=False):
        cond, pooled = self.embed(tokens)
        if return_dict:
            return self.add_hooks_to_dict({"cond": cond, "pooled_output": pooled})
        if return_pooled:
            return cond, pooled
        return cond

    def encode_from_tokens_scheduled(self, tokens, unprojected=False, add_dict=None, show_pbar=True):
        out = self.encode_from_tokens(tokens, return_pooled=True, return_dict=True)
        cond = out.pop("cond")
        out.update(add_dict or {})
        return [[cond, out]]

    def encode(self, text):
        return self.encode_from_tokens(self.tokenize(text))


def conditioning(family: str, text: str, batch: int = 1, **extra):
    """Hand-made CONDITIONING for `family` ("sd15", "sdxl", "sd3", "flux"), deterministic in `text`.
    `extra` keys go into the cond dict (e.g. guidance=3.5 for Flux, width/height for SDXL)."""
    enc = TinyTextEncoder(family)
    cond = enc.encode_from_tokens_scheduled(enc.tokenize(text), add_dict=extra)
    if batch != 1:
        t, d = cond[0]
        d = dict(d)
        d["pooled_output"] = d["pooled_output"].repeat(batch, 1)
        cond = [[t.repeat(batch, 1, 1), d]]
    return cond


# ----------------------------------------------------------------------------------------------
# Cached files
# ----------------------------------------------------------------------------------------------

def _atomic_save(sd: dict, path: Path, metadata=None) -> Path:
    import safetensors.torch
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=str(path.parent))
    os.close(fd)
    try:
        safetensors.torch.save_file(sd, tmp, metadata=metadata)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def _link_or_copy(src: Path, dst: Path) -> Path:
    import shutil
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    if dst.exists() or dst.is_symlink():
        if dst.resolve() == src.resolve() or (dst.stat().st_size == src.stat().st_size
                                               and os.path.samefile(dst, src)):
            return dst
        dst.unlink()
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)
    return dst


def _sd15_state_dict() -> dict:
    import torch
    import comfy.sd1_clip
    import comfy.supported_models
    cfg = comfy.supported_models.SD15(SD15_UNET_CONFIG)
    cfg.set_inference_dtype(torch.float32, None)
    unet = cfg.get_model({}).diffusion_model
    sd = {"model.diffusion_model." + k: v for k, v in _seeded_weights(unet.state_dict(), SEED).items()}
    del unet
    clip = comfy.sd1_clip.SDClipModel(device="cpu", dtype=torch.float32).state_dict()
    for k, v in _seeded_weights(clip, SEED + 1, matrix_std=0.02, skip=("position_ids",)).items():
        sd["cond_stage_model." + k] = v.half()      # fp16 halves the file; loads fine on CPU
    for k, v in _taesd_state_dict("sd15", SEED + 2).items():
        sd["first_stage_model." + k] = v
    return sd


def tiny_sd15_checkpoint() -> Path:
    """Path of the cached tiny SD1.5 checkpoint (written on first use, ~344 MiB, a few seconds)."""
    path = CACHE_DIR / f"tiny_sd15_{CACHE_VERSION}.safetensors"
    if not path.is_file():
        logger.info("writing tiny SD1.5 checkpoint to %s", path)
        _atomic_save(_sd15_state_dict(), path)
    return path


def write_tiny_sd15_checkpoint(path=None) -> Path:
    """Write the tiny SD1.5 checkpoint at `path` (a hard link to, or copy of, the cached file);
    with no path, return the cached file itself."""
    cached = tiny_sd15_checkpoint()
    if path is None:
        return cached
    return _link_or_copy(cached, Path(path))


def load_tiny_sd15():
    """(ModelPatcher, CLIP, VAE) of the tiny SD1.5 checkpoint, through ComfyUI's checkpoint loader."""
    import comfy.sd
    out = comfy.sd.load_checkpoint_guess_config(str(tiny_sd15_checkpoint()), output_vae=True, output_clip=True)
    return out[0], out[1], out[2]


def _sd3_state_dict() -> dict:
    import comfy.supported_models
    patcher = _build_in_process(comfy.supported_models.SD3, SD3_UNET_CONFIG, SEED + 10, matrix_std=0.05)
    unet = patcher.model.diffusion_model
    sd = {"model.diffusion_model." + k: v.detach().clone() for k, v in unet.state_dict().items()}
    for k, v in _taesd_state_dict("sd3", SEED + 11).items():
        sd["first_stage_model." + k] = v
    return sd


def tiny_sd3_file() -> Path:
    """Path of the cached tiny SD3 file (MMDiT depth 2 / hidden 128 + 16-channel TAESD, no text encoders)."""
    path = CACHE_DIR / f"tiny_sd3_{CACHE_VERSION}.safetensors"
    if not path.is_file():
        _atomic_save(_sd3_state_dict(), path)
    return path


def write_tiny_sd3_file(path=None) -> Path:
    """Write the tiny SD3 file at `path` (link to / copy of the cached one); no path: the cached file."""
    cached = tiny_sd3_file()
    if path is None:
        return cached
    return _link_or_copy(cached, Path(path))


def load_tiny_sd3(path=None):
    """(ModelPatcher, TinyTextEncoder("sd3"), VAE) from the tiny SD3 file through ComfyUI's loader (the
    file has no text encoder, so the loader's CLIP is None and the stand-in is returned instead)."""
    import comfy.sd
    path = Path(path) if path is not None else tiny_sd3_file()
    out = comfy.sd.load_checkpoint_guess_config(str(path), output_vae=True, output_clip=True)
    return out[0], TinyTextEncoder("sd3"), out[2]


# ----------------------------------------------------------------------------------------------
# In-process builds
# ----------------------------------------------------------------------------------------------

def build_tiny_sdxl():
    """(ModelPatcher, TinyTextEncoder("sdxl"), VAE): comfy.supported_models.SDXL with a tiny UNet
    (2 levels of 32/64 channels, adm_in_channels 2816, linear transformer projections)."""
    import comfy.supported_models

    def heads(cfg):
        cfg.unet_config["num_head_channels"] = SDXL_NUM_HEAD_CHANNELS

    mp = _build_in_process(comfy.supported_models.SDXL, SDXL_UNET_CONFIG, SEED + 20, after_init=heads)
    return mp, TinyTextEncoder("sdxl"), build_tiny_vae("sdxl")


def build_tiny_flux():
    """(ModelPatcher, TinyTextEncoder("flux"), VAE): comfy.supported_models.Flux (dev-style, guidance
    embed) with hidden 64, 2 double + 2 single blocks, 16 latent channels."""
    import comfy.supported_models
    mp = _build_in_process(comfy.supported_models.Flux, FLUX_UNET_CONFIG, SEED + 30, matrix_std=0.05)
    return mp, TinyTextEncoder("flux"), build_tiny_vae("flux")


def build(family: str):
    """(ModelPatcher, clip, VAE) for "sd15", "sdxl", "sd3" or "flux"."""
    return {"sd15": load_tiny_sd15, "sdxl": build_tiny_sdxl, "sd3": load_tiny_sd3,
            "flux": build_tiny_flux}[family]()
