"""Memory before allocation: estimate what a node's run needs on each device from its inputs and the model, and
refuse with a clear error (the estimate and what is free) instead of an out-of-memory crash mid-run.

Usage (one estimate per run, before the first model or VAE call):

    est = memory.Estimate()
    est.hold(device, "stage canvas 4096x4096 (fp32)", memory.tensor_bytes((1, 3, 4096, 4096)))   # alive all run
    est.phase(device, "UNet activations", memory.model_activation_bytes(model, (1, 4, 512, 512)))  # transient
    est.phase(vae.device, "VAE decode", memory.vae_decode_bytes(vae, (1, 4, 128, 128)))
    memory.require(NODE, family, est, fix="use smaller stages or turn VAE tiling on.")

What counts: per device, everything `hold` registers plus the largest single `phase` (phases run one after
the other). The figures are lower bounds of what the run cannot do without: ComfyUI's own estimates
(`BaseModel.memory_required`, `VAE.memory_used_encode/decode`, the ones it uses to make room when loading) for
the smallest batch ComfyUI can fall back to. Model weights are not counted: ComfyUI can offload them (lowvram).
Available = `comfy.model_management.get_free_memory(device)` + the weights of models loaded on that device, which
ComfyUI unloads or offloads to make room. So a refusal means the run cannot fit even after unloading everything;
a run that passes may still fall back to ComfyUI's slower paths (split cond/uncond batches, tiled VAE).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from . import adapters

GiB = 2 ** 30
MiB = 2 ** 20


def dtype_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def tensor_bytes(shape, dtype: torch.dtype = torch.float32) -> int:
    return int(math.prod(int(s) for s in shape)) * dtype_size(dtype)


def fmt_bytes(n: float) -> str:
    if n >= GiB:
        return f"{n / GiB:.2f} GiB"
    return f"{n / MiB:.1f} MiB"


def model_dtype(model) -> torch.dtype:
    try:
        return model.model_dtype()
    except Exception:  # noqa: BLE001  a bare BaseModel or an unusual patcher
        return torch.float32


def model_activation_bytes(model, shape) -> int:
    """ComfyUI's own estimate of the model's inference memory for an input of `shape` (B, C, h, w)
    (`BaseModel.memory_required`: area x dtype x the family's memory factor)."""
    base = getattr(model, "model", model)
    try:
        return int(base.memory_required(tuple(int(s) for s in shape)))
    except Exception:  # noqa: BLE001  no estimate from the host: the latent itself x 100 (an order of magnitude)
        return 100 * tensor_bytes(shape, model_dtype(model))


def _vae_dtype(vae) -> torch.dtype:
    dtype = getattr(vae, "vae_dtype", None)
    return dtype if isinstance(dtype, torch.dtype) else torch.float32


def vae_decode_bytes(vae, latent_shape) -> int:
    """ComfyUI's estimate of a VAE decode of a (B, C, h, w) latent."""
    fn = getattr(vae, "memory_used_decode", None)
    shape = tuple(int(s) for s in latent_shape)
    if callable(fn):
        try:
            return int(fn(shape, _vae_dtype(vae)))
        except Exception:  # noqa: BLE001
            pass
    ratio = int(getattr(vae, "downscale_ratio", 8)) if isinstance(getattr(vae, "downscale_ratio", 8), int) else 8
    return 2178 * shape[0] * shape[2] * shape[3] * ratio * ratio * dtype_size(_vae_dtype(vae))


def vae_encode_bytes(vae, image_shape) -> int:
    """ComfyUI's estimate of a VAE encode of a (B, H, W, C) image."""
    fn = getattr(vae, "memory_used_encode", None)
    b, h, w = (int(s) for s in tuple(image_shape)[:3])
    shape = (b, 3, h, w)   # ComfyUI passes the channels-first pixel shape
    if callable(fn):
        try:
            return int(fn(shape, _vae_dtype(vae)))
        except Exception:  # noqa: BLE001
            pass
    return 1767 * b * h * w * dtype_size(_vae_dtype(vae))


def _same_device(a, b) -> bool:
    a, b = torch.device(a), torch.device(b)
    if a.type != b.type:
        return False
    return a.index == b.index or a.type == "cpu" or None in (a.index, b.index)


def free_bytes(device) -> int:
    """What ComfyUI reports free on `device` (VRAM, or RAM for the CPU)."""
    import comfy.model_management
    return int(comfy.model_management.get_free_memory(torch.device(device)))


def releasable_bytes(device) -> int:
    """Weights of the models ComfyUI holds loaded on `device` (it unloads or offloads them to make room); 0 for the
    CPU (weights offloaded there stay in RAM)."""
    import comfy.model_management
    if torch.device(device).type == "cpu":
        return 0
    total = 0
    for loaded in list(getattr(comfy.model_management, "current_loaded_models", [])):
        try:
            if loaded.model is not None and _same_device(loaded.device, device):
                total += int(loaded.model_loaded_memory())
        except Exception:  # noqa: BLE001  a dying model
            continue
    return total


@dataclass
class Estimate:
    """Memory a run needs, per device: `hold` = alive through the run, `phase` = transient (the largest counts)."""

    held: dict = field(default_factory=dict)
    phases: dict = field(default_factory=dict)

    @staticmethod
    def _key(device) -> str:
        return str(torch.device(device))

    def hold(self, device, label: str, nbytes: int) -> "Estimate":
        self.held.setdefault(self._key(device), []).append((label, int(nbytes)))
        return self

    def phase(self, device, label: str, nbytes: int) -> "Estimate":
        self.phases.setdefault(self._key(device), []).append((label, int(nbytes)))
        return self

    def devices(self) -> list[str]:
        return sorted(set(self.held) | set(self.phases))

    def peak(self, device) -> int:
        key = self._key(device)
        held = sum(n for _, n in self.held.get(key, []))
        return held + max((n for _, n in self.phases.get(key, [])), default=0)

    def describe(self, device) -> str:
        key = self._key(device)
        parts = [f"{label} {fmt_bytes(n)}" for label, n in self.held.get(key, [])]
        phases = self.phases.get(key, [])
        if phases:
            label, n = max(phases, key=lambda p: p[1])
            parts.append(f"largest step: {label} {fmt_bytes(n)}")
        return "; ".join(parts)


def require(node: str, family: adapters.ModelFamily | None, estimate: Estimate, fix: str) -> None:
    """Raise the pack's node error when a device cannot hold the estimate (checked before anything is allocated)."""
    for device in estimate.devices():
        need = estimate.peak(device)
        free = free_bytes(device)
        releasable = releasable_bytes(device)
        if need > free + releasable:
            extra = f" + {fmt_bytes(releasable)} of loaded model weights ComfyUI could unload" if releasable else ""
            raise adapters.node_error(
                node, family, f"this run needs about {fmt_bytes(need)} on {device} ({estimate.describe(device)}), "
                              f"but only {fmt_bytes(free)} is free{extra}; it would run out of memory part-way.", fix)


def describe_all(estimate: Estimate) -> dict[str, Any]:
    """{device: (peak bytes, description)} (for logs and benchmarks)."""
    return {d: (estimate.peak(d), estimate.describe(d)) for d in estimate.devices()}
