"""DiffuseHigh's structure guidance and its stage loop, with the host passed in as functions (pure torch, no
ComfyUI import).

* `StructureGuide(params, reference_low, codec)`: the x0 transform of one stage. On guided step i (0-based,
  i < guidance_steps) the low wavelet band of the predicted clean latent is moved toward the reference's by
  `params.guidance_weight(i)`: in latent space (`latent` mode) or, as the reference does, in pixel space
  (`image` mode: decode x0, replace the band, encode again). Immutable; the caller says which step it is.
* `prepare_stage`: bicubic upsample + (seeded) unsharp mask + encode of the previous image.
* `run_stages(image, sizes, params, seed, codec, denoise)`: the progressive loop; `denoise(stage, guide)` is the
  host's sampler over the stage's last `steps` (it applies `guide` to each step's x0) and returns the stage's
  latent, which is decoded to start the next stage.

`Codec` holds the VAE and latent-space functions (images are (B, 3, H, W) floats in [0, 1], latents (B, C, h, w)):
`encode`/`decode` between pixels and the VAE's raw latent, `to_model`/`from_model` between the raw latent and the
space the sampler predicts x0 in (ComfyUI: latent_format.process_in / process_out).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from . import diffusehigh as K


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


@dataclass(frozen=True)
class Codec:
    encode: Callable[[torch.Tensor], torch.Tensor]
    """pixels (B, 3, H, W) float32 in [0, 1] -> raw VAE latent (B, C, h, w)."""
    decode: Callable[[torch.Tensor], torch.Tensor]
    """raw VAE latent -> pixels (B, 3, H, W)."""
    to_model: Callable[[torch.Tensor], torch.Tensor] = _identity
    """raw latent -> the sampler's x0 space."""
    from_model: Callable[[torch.Tensor], torch.Tensor] = _identity
    """the sampler's x0 space -> raw latent."""


class ReferenceMismatch(ValueError):
    """The reference's low band does not fit the prediction (size or batch); `space` is "latent" or "image"."""

    def __init__(self, message: str, space: str):
        super().__init__(message)
        self.space = space


@dataclass(frozen=True, eq=False)
class StructureGuide:
    """What one stage's guidance needs: the reference low band (pixel or latent space) and the codec."""

    params: K.DiffuseHighParams
    reference_low: torch.Tensor
    """Low band of the reference: of the image (B, 3, H, W) in [0, 1] (image mode) or of the model-space latent
    (latent mode)."""
    codec: Codec | None = None
    """Needed in image mode only."""

    def weight(self, step: int) -> float:
        return self.params.guidance_weight(step)

    def __call__(self, denoised: torch.Tensor, step: int) -> torch.Tensor:
        """x0 of stage step `step` with the guidance applied (`denoised` itself when the step is not guided)."""
        weight = self.weight(step)
        if weight == 0.0:
            return denoised
        if self.params.guidance_mode == "latent":
            return self._replace(denoised, weight, "latent")
        if self.codec is None:
            raise ValueError("image-mode structure guidance needs a codec (VAE decode/encode)")
        with torch.no_grad():
            pixels = self.codec.decode(self.codec.from_model(denoised.float()))
            pixels = pixels.to(device=denoised.device, dtype=torch.float32)
            pixels = self._replace(pixels, weight, "image")
            encoded = self.codec.to_model(self.codec.encode(pixels).float())
        return encoded.to(device=denoised.device, dtype=denoised.dtype)

    def _replace(self, x: torch.Tensor, weight: float, space: str) -> torch.Tensor:
        p = self.params
        try:
            return K.replace_low_band(x, self.reference_low, weight, p.wavelet, p.dwt_levels)
        except ValueError as e:
            raise ReferenceMismatch(str(e), space) from e


def reference_low_band(params: K.DiffuseHighParams, pixels: torch.Tensor, model_latent: torch.Tensor | None
                       ) -> torch.Tensor:
    """The reference low band of a guidance mode: of the sharpened image (B, 3, H, W) (image mode) or of its
    model-space latent (latent mode)."""
    if params.guidance_mode == "latent":
        if model_latent is None:
            raise ValueError("latent-mode structure guidance needs the reference latent")
        return K.reference_low_band(model_latent.float(), params.wavelet, params.dwt_levels)
    return K.reference_low_band(pixels, params.wavelet, params.dwt_levels)


@dataclass(frozen=True, eq=False)
class Stage:
    """One prepared stage."""

    index: int
    size: tuple[int, int]
    """(W, H) in pixels."""
    pixels: torch.Tensor
    """The upsampled, sharpened image (B, 3, H, W) float32 (the reference of the guidance)."""
    latent: torch.Tensor
    """Its raw VAE latent (what the stage re-noises and denoises)."""
    sharpen_sigma: float


def sharpen_sigma(params: K.DiffuseHighParams, seed: int, stage: int) -> float:
    return params.sharpen_sigma if params.sharpen_sigma > 0 else K.draw_sharpen_sigma(seed, stage)


def prepare_stage(image: torch.Tensor, size: tuple[int, int], params: K.DiffuseHighParams, seed: int, stage: int,
                  codec: Codec) -> Stage:
    """Upsample (B, 3, H, W) `image` to size (W, H) bicubically, unsharp-mask it (sigma seeded by (seed, stage)
    unless fixed), encode it."""
    w, h = size
    pixels = K.upsample(image.float(), (h, w))
    sigma = sharpen_sigma(params, seed, stage)
    pixels = K.sharpen(pixels, params.sharpen_alpha, params.sharpen_kernel, sigma)
    with torch.no_grad():
        latent = codec.encode(pixels)
    return Stage(stage, (int(w), int(h)), pixels, latent, sigma)


def guide_for(stage: Stage, params: K.DiffuseHighParams, codec: Codec) -> StructureGuide | None:
    """The stage's guide, or None when the guidance is off (guidance_steps 0 or guidance_factor 0)."""
    if params.guidance_steps <= 0 or params.guidance_factor <= 0.0:
        return None
    model_latent = codec.to_model(stage.latent.float()) if params.guidance_mode == "latent" else None
    return StructureGuide(params, reference_low_band(params, stage.pixels, model_latent), codec)


def run_stages(image: torch.Tensor, sizes: list[tuple[int, int]], params: K.DiffuseHighParams, seed: int,
               codec: Codec, denoise: Callable[[Stage, StructureGuide | None], torch.Tensor],
               check: Callable[[], None] | None = None, first_stage: int = 0,
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """DiffuseHigh's progressive loop: for each size, prepare the stage from the current image, denoise it with
    its guide (`denoise(stage, guide)` returns the stage's raw latent), decode. `check()` runs between the pieces
    (interrupts). Returns (decoded image (B, 3, H, W) of the last stage, its raw latent)."""
    if not sizes:
        raise ValueError("no stage sizes")
    check = check or (lambda: None)
    latent = None
    for i, size in enumerate(sizes):
        check()
        stage = prepare_stage(image, size, params, seed, first_stage + i, codec)
        guide = guide_for(stage, params, codec)
        check()
        latent = denoise(stage, guide)
        del stage, guide
        check()
        with torch.no_grad():
            image = codec.decode(latent)
    return image, latent
