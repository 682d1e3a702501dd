"""The evaluation model: a small class-conditional diffusion model of scikit-learn's 8x8 digits, built from
ComfyUI's own UNetModel / BaseModel / ModelPatcher and sampled through ComfyUI's own samplers.

* Data: `sklearn.datasets.load_digits`, 8x8, one channel, scaled x/8 - 1 (so [-1, 1]).
* Network: `UNetModel`, model_channels 32, channel_mult (1, 2), one res block, 4 heads, a linear spatial
  transformer (context_dim 32) at the 4x4 level and in the middle block.
* Conditioning: a learned 11 x 32 table (rows 0-9: the digit classes, row 10: the null / "empty" class),
  fed as a [B, 1, 32] cross-attention context. Trained with 15% of the labels dropped to the null row, so real
  conditional and unconditional predictions exist.
* Schedule: ComfyUI's ModelSamplingDiscrete + EPS with the SD1.5 betas (the BaseModel's own object is used
  for training and sampling).

Needs ComfyUI importable (the benchmark scripts and tests set that up with tests/host.py).
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

import comfy.latent_formats
import comfy.model_base
import comfy.model_management
import comfy.model_patcher
import comfy.supported_models_base
import comfy.utils

logger = logging.getLogger("tfg.benchmarks")

HERE = Path(__file__).resolve().parent
WEIGHTS = HERE / "weights" / "digits_eval.safetensors"

NUM_CLASSES = 10
NULL_CLASS = NUM_CLASSES  # row 10 of the embedding table
CONTEXT_DIM = 32
IMAGE_SIZE = 8

UNET_CONFIG = {
    "image_size": IMAGE_SIZE,
    "in_channels": 1,
    "out_channels": 1,
    "model_channels": 32,
    "num_res_blocks": [1, 1],
    "channel_mult": [1, 2],
    "transformer_depth": [0, 1],
    "transformer_depth_output": [0, 0, 1, 1],
    "transformer_depth_middle": 1,
    "num_heads": 4,
    "num_head_channels": -1,
    "use_spatial_transformer": True,
    "use_linear_in_transformer": True,
    "context_dim": CONTEXT_DIM,
    "legacy": False,
    "adm_in_channels": None,
    "use_temporal_attention": False,
    "use_temporal_resblock": False,
}


class DigitsLatentFormat(comfy.latent_formats.LatentFormat):
    """Pixels are the latents: one channel, no scaling."""
    latent_channels = 1
    scale_factor = 1.0


class DigitsConfig(comfy.supported_models_base.BASE):
    """Model config for the digits UNet (an EPS model with the SD1.5 discrete schedule)."""
    unet_config = dict(UNET_CONFIG)
    unet_extra_config = {}  # BASE would inject num_heads=-1 / num_head_channels=64 otherwise
    latent_format = DigitsLatentFormat
    memory_usage_factor = 1.0
    supported_inference_dtypes = [torch.float32]


def build_base_model(device=None) -> comfy.model_base.BaseModel:
    """An fp32 BaseModel with uninitialised weights (call `init_weights` or load a state dict)."""
    config = DigitsConfig(UNET_CONFIG)
    config.set_inference_dtype(torch.float32, None)
    return config.get_model({}, device=device)


def init_weights(module: torch.nn.Module, generator: torch.Generator) -> None:
    """ComfyUI's ops skip weight init (layers start as uninitialised memory): initialise every layer here,
    with the final output conv zeroed."""
    for m in module.modules():
        if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)):
            fan_in = m.weight[0].numel()
            bound = (1.0 / fan_in) ** 0.5
            with torch.no_grad():
                m.weight.copy_((torch.rand(m.weight.shape, generator=generator) * 2 - 1) * bound * 3 ** 0.5)
                if m.bias is not None:
                    m.bias.copy_((torch.rand(m.bias.shape, generator=generator) * 2 - 1) * bound)
        elif isinstance(m, (torch.nn.GroupNorm, torch.nn.LayerNorm)):
            with torch.no_grad():
                if m.weight is not None:
                    m.weight.fill_(1.0)
                if m.bias is not None:
                    m.bias.zero_()
    out = module.out[-1]
    with torch.no_grad():
        out.weight.zero_()
        out.bias.zero_()


def load_digits() -> tuple[torch.Tensor, torch.Tensor]:
    """(images [N, 1, 8, 8] in [-1, 1], labels [N]) of scikit-learn's digits."""
    from sklearn.datasets import load_digits as _load
    data = _load()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 8.0 - 1.0
    y = torch.tensor(data.target, dtype=torch.long)
    return x, y


def to_pixels(x: torch.Tensor) -> torch.Tensor:
    """Model space [-1, 1] -> displayable [0, 1] (clamped, as an image viewer would)."""
    return ((x.float() + 1.0) / 2.0).clamp(0.0, 1.0)


@dataclass
class EvalModel:
    """The loaded evaluation model: a ModelPatcher plus the class-embedding table."""
    model: comfy.model_patcher.ModelPatcher
    embeddings: torch.Tensor
    """[11, 32]: rows 0-9 the classes, row 10 the null class."""
    metadata: dict

    def context(self, index: int) -> torch.Tensor:
        return self.embeddings[index].view(1, 1, CONTEXT_DIM).clone()

    def cond(self, digit: int) -> list:
        """CONDITIONING for one class."""
        if not 0 <= digit < NUM_CLASSES:
            raise ValueError(f"digit must be in 0..{NUM_CLASSES - 1}, got {digit}")
        return [[self.context(digit), {}]]

    def uncond(self) -> list:
        """CONDITIONING of the null class (the empty prompt)."""
        return [[self.context(NULL_CLASS), {}]]

    def cond_batch(self, digits: list[int] | torch.Tensor) -> list:
        """CONDITIONING whose context carries one class per batch row ([B, 1, 32]); use it only where every
        pass runs the whole batch (a sub-batch would cut the context to its first rows)."""
        idx = torch.as_tensor(digits, dtype=torch.long)
        return [[self.embeddings[idx].view(-1, 1, CONTEXT_DIM).clone(), {}]]

    def empty_latent(self, batch: int) -> dict:
        return {"samples": torch.zeros(batch, 1, IMAGE_SIZE, IMAGE_SIZE)}


def save_weights(base: comfy.model_base.BaseModel, embeddings: torch.Tensor, path: Path, metadata: dict,
                 dtype=torch.float16) -> Path:
    from safetensors.torch import save_file
    sd = {f"diffusion_model.{k}": v.detach().to(dtype).contiguous()
          for k, v in base.diffusion_model.state_dict().items()}
    sd["class_embedding"] = embeddings.detach().to(dtype).contiguous()
    meta = {"unet_config": json.dumps(UNET_CONFIG), **{k: str(v) for k, v in metadata.items()}}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file(sd, str(tmp), metadata=meta)
    tmp.replace(path)
    return path


def load_eval_model(path: Path | str | None = None) -> EvalModel:
    """Load the committed weights (or `path`) into a ModelPatcher (fp32, on ComfyUI's device)."""
    from safetensors import safe_open
    path = Path(path) if path is not None else WEIGHTS
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found; run `python benchmarks/train.py` to create it")
    with safe_open(str(path), framework="pt") as f:
        metadata = dict(f.metadata() or {})
        sd = {k: f.get_tensor(k).float() for k in f.keys()}
    stored = json.loads(metadata.get("unet_config", "{}"))
    if stored and stored != UNET_CONFIG:
        raise ValueError(f"{path} was trained with a different UNet config: {stored}")
    embeddings = sd.pop("class_embedding")
    base = build_base_model()
    unet_sd = {k[len("diffusion_model."):]: v for k, v in sd.items()}
    missing, unexpected = base.diffusion_model.load_state_dict(unet_sd, strict=False)
    if missing or unexpected:
        raise ValueError(f"{path}: missing keys {missing[:5]}, unexpected keys {unexpected[:5]}")
    base.eval()
    patcher = comfy.model_patcher.ModelPatcher(base, load_device=comfy.model_management.get_torch_device(),
                                               offload_device=comfy.model_management.unet_offload_device())
    return EvalModel(patcher, embeddings, metadata)
