"""DiffuseHigh (Kim et al., "DiffuseHigh: Training-free Progressive High-Resolution Image Synthesis through
Structure Guidance", arXiv 2406.18459, AAAI 2025): the maths, pure torch.

A high-resolution stage, as the official SDXL pipeline (`pipeline_diffusehigh_sdxl.py`) runs it:

1. upsample the previous image bicubically in pixel space to the stage size and sharpen it with an unsharp
   mask, `(1 + a) * g - a * GaussianBlur(g, k=3, sigma)`, sigma drawn from U(0.1, 2.0) per stage;
2. reference low band `LL* = DWT(g)[LL]` (db4, one level, symmetric extension);
3. encode g, noise it to the official level (the last 15 of 50 "leading" Euler timesteps of SDXL's
   scaled-linear schedule: t = 281, 261, ..., 1; sigma(281) ~ 0.78) and run those 15 Euler steps at CFG 10;
4. during the first 5 steps, replace the low band of the predicted clean image: decode x0, `iDWT(LL*, HF(x0))`,
   encode again.

This module holds the parameters (`DiffuseHighParams`, the single source of defaults), the pixel operations
(upsample, seeded unsharp mask), the low-band replacement with partial blending and fade-out, the stage
planner and the schedule helpers. Device and dtype follow the inputs; FFT-free, DWTs in float32
(kernels/wavelets.py). No ComfyUI import.
"""
from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass

import torch

from . import wavelets

GUIDANCE_MODES = ("image", "latent")
SIZE_CONDITIONING = ("official", "conditioning")
WAVELETS = wavelets.WAVELETS

OFFICIAL_TIMESTEP = 281
"""First high-resolution timestep of the official SDXL stage (last 15 of 50 leading-spaced steps, offset 1)."""
OFFICIAL_SHARPEN_SIGMA_RANGE = (0.1, 2.0)
"""torchvision GaussianBlur(sigma=(0.1, 2.0)) of the reference: sigma uniform in this range per call."""
OFFICIAL_SIZE = 1024
"""SDXL micro-conditioning (original and target size) the reference keeps at every stage."""
MIN_STAGE_SIDE = 32
"""Smallest stage side in pixels (4 latent pixels): below it the VAE and the wavelet bands have nothing to work
on (a stage of a few pixels is refused with the inputs to change)."""
MAX_STAGE_SIDE = 16384
"""Largest stage side in pixels (the width/height inputs' maximum)."""
AUTO = "auto"
AUTO_STAGES = {
    "sd1": "x2",                  # SD1.x: 512 -> 1024 (the port's and the paper's x2 per stage)
    "sd2": "x2",
    "sd_unet": "x2",
    "sdxl": "2048, 3072, 4096",   # the official SDXL schedule
    "sd3": "x2",                  # DiT families: one x2 stage (1024 -> 2048); attention cost grows with the
    "flux": "x2",                 # square of the tokens, so 4096² is left to an explicit list
}
"""`stages = auto`: the stage list per model family key (anything else: x2)."""


@dataclass(frozen=True)
class DiffuseHighParams:
    """Single source of defaults for the DiffuseHigh kernels and nodes (official SDXL values)."""

    cfg: float = 10.0
    """CFG scale of the high-resolution stages (official `diffusehigh_guidance_scale` 10; base generation 5)."""
    sampler_name: str = "euler"
    """ComfyUI sampler; the reference's `edm_scheduler_step` is plain Euler (no churn)."""
    scheduler: str = "ddim_uniform"
    """ComfyUI scheduler; `ddim_uniform` over 50 steps is exactly diffusers' leading spacing with offset 1
    (t = 981, 961, ..., 1) for the SD1.x/SDXL discrete schedules."""
    schedule_steps: int = 50
    """Length of the schedule the stage steps are cut from (official 50)."""
    steps: int = 15
    """High-resolution steps per stage: the last `steps` of `schedule_steps` (official `noising_steps` 15)."""
    guidance_steps: int = 5
    """Steps (from the first) whose predicted x0 gets the reference low band (official `dwt_steps` 5)."""
    guidance_mode: str = "image"
    """`image`: DWT of the decoded x0 in pixel space, re-encoded (official; a VAE decode+encode per guided
    step). `latent`: DWT of the latent x0 against the reference latent (improvement: no VAE round trip)."""
    guidance_factor: float = 1.0
    """Weight of the reference low band: 1 = replace (official), 0 = off, in between = blend."""
    fadeout: float = 0.0
    """Linear fade of the weight over the guided steps: step i of K gets factor * (1 - fadeout * i / K)."""
    wavelet: str = "db4"
    """db4 (official) or haar."""
    dwt_levels: int = 1
    """DWT levels; the coarsest approximation band is replaced (official 1)."""
    sharpen_alpha: float = 1.0
    """Unsharp-mask amount a: (1+a)*g - a*blur(g). 0 = no sharpening. Official 1.0."""
    sharpen_kernel: int = 3
    """Gaussian kernel size of the unsharp mask (official 3)."""
    sharpen_sigma: float = 0.0
    """0: sigma drawn from U(0.1, 2.0) per stage with a generator seeded by the node's seed (the official
    distribution, made reproducible); > 0: this fixed sigma."""
    vae_tile_size: int = 1024
    """Tile the VAE (pixels; overlap a quarter) when a side of the image exceeds this; 0 = never (ComfyUI still
    falls back to tiles on out-of-memory). The reference enables diffusers' VAE tiling (1024 px tiles)."""
    size_conditioning: str = "official"
    """SDXL only. `official`: original and target size 1024x1024 at every stage (the reference);
    `conditioning`: whatever the conditioning says (ComfyUI's default is the latent's size)."""
    scale_by: float = 2.0
    """One-stage node: output size = input size * scale_by when width/height are 0."""
    stages: str = AUTO
    """Progressive node: comma-separated stage sizes (see `plan_stages`), or `auto`: from the model family
    (`AUTO_STAGES`: official SDXL 2048, 3072, 4096; x2 for SD1.x/SD2.x, SD3 and Flux)."""
    width: int = 0
    """One-stage node: target width in pixels; 0 = from scale_by (or from height, keeping the aspect)."""
    height: int = 0
    """One-stage node: target height in pixels; 0 = from scale_by (or from width, keeping the aspect)."""
    seed: int = 0
    """Noise seed (stage i uses seed + i) and seed of the sharpening sigma."""

    def replace(self, **changes) -> "DiffuseHighParams":
        return dataclasses.replace(self, **changes)

    @property
    def start_step(self) -> int:
        return self.schedule_steps - self.steps

    def guidance_weight(self, step: int) -> float:
        """Blend weight of the reference low band at stage step `step` (0-based); 0 outside the guided steps."""
        k = self.guidance_steps
        if step < 0 or step >= k or self.guidance_factor == 0.0:
            return 0.0
        return float(self.guidance_factor * (1.0 - self.fadeout * step / k))

    def validate(self) -> list[str]:
        problems = []
        if self.guidance_mode not in GUIDANCE_MODES:
            problems.append(f"guidance_mode must be one of {GUIDANCE_MODES}")
        if self.size_conditioning not in SIZE_CONDITIONING:
            problems.append(f"size_conditioning must be one of {SIZE_CONDITIONING}")
        if self.wavelet not in WAVELETS:
            problems.append(f"wavelet must be one of {WAVELETS}")
        if not 1 <= self.dwt_levels <= 4:
            problems.append("dwt_levels must be 1-4")
        if self.schedule_steps < 1 or not 1 <= self.steps <= self.schedule_steps:
            problems.append(f"steps ({self.steps}) must be between 1 and schedule_steps ({self.schedule_steps})")
        if self.guidance_steps < 0:
            problems.append("guidance_steps must be >= 0 (more than `steps` guides every step)")
        if not (math.isfinite(self.guidance_factor) and 0.0 <= self.guidance_factor <= 1.0):
            problems.append("guidance_factor must be in [0, 1]")
        if not (math.isfinite(self.fadeout) and 0.0 <= self.fadeout <= 1.0):
            problems.append("fadeout must be in [0, 1]")
        if not (math.isfinite(self.sharpen_alpha) and 0.0 <= self.sharpen_alpha <= 10.0):
            problems.append("sharpen_alpha must be in [0, 10]")
        if self.sharpen_kernel < 1 or self.sharpen_kernel % 2 == 0:
            problems.append("sharpen_kernel must be a positive odd number")
        if not (math.isfinite(self.sharpen_sigma) and self.sharpen_sigma >= 0.0):
            problems.append("sharpen_sigma must be >= 0 (0 = random in [0.1, 2.0], seeded)")
        if self.vae_tile_size < 0 or (0 < self.vae_tile_size < 64):
            problems.append("vae_tile_size must be 0 (off) or >= 64")
        if not (math.isfinite(self.scale_by) and 0.25 <= self.scale_by <= 16.0):
            problems.append("scale_by must be in [0.25, 16]")
        if not math.isfinite(self.cfg):
            problems.append("cfg must be finite")
        return problems


# ----------------------------------------------------------------------------------------------
# Schedule
# ----------------------------------------------------------------------------------------------
def sd_scaled_linear_sigma(timestep: float, beta_start: float = 0.00085, beta_end: float = 0.012,
                           train_steps: int = 1000) -> float:
    """sigma = sqrt((1 - abar) / abar) at an integer DDPM timestep of the SD1.x/SDXL scaled-linear schedule."""
    betas = torch.linspace(beta_start ** 0.5, beta_end ** 0.5, train_steps, dtype=torch.float64) ** 2
    abar = torch.cumprod(1.0 - betas, dim=0)
    a = float(abar[int(round(timestep))])
    return math.sqrt((1.0 - a) / a)


def leading_timesteps(schedule_steps: int = 50, steps: int = 15, train_steps: int = 1000,
                      offset: int = 1) -> list[int]:
    """The last `steps` of diffusers' leading-spaced timesteps (EulerDiscrete, SDXL config: offset 1):
    50 steps, last 15 -> [281, 261, ..., 1]."""
    ratio = train_steps // schedule_steps
    all_t = [i * ratio + offset for i in range(schedule_steps)][::-1]
    return all_t[-steps:]


# ----------------------------------------------------------------------------------------------
# Pixel operations (images as (B, C, H, W) floats)
# ----------------------------------------------------------------------------------------------
def upsample(image: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bicubic resize to (H, W), align_corners=False, no antialiasing (the reference's F.interpolate)."""
    import kornia
    if tuple(image.shape[-2:]) == tuple(size):
        return image
    return kornia.geometry.transform.resize(image, tuple(size), interpolation="bicubic", align_corners=False,
                                            antialias=False)


def draw_sharpen_sigma(seed: int, stage: int = 0, low: float = OFFICIAL_SHARPEN_SIGMA_RANGE[0],
                       high: float = OFFICIAL_SHARPEN_SIGMA_RANGE[1]) -> float:
    """A blur sigma from U(low, high), drawn from a generator seeded by (seed, stage): reproducible, and
    independent of the global torch RNG (the reference draws from the global RNG per call)."""
    g = torch.Generator().manual_seed((int(seed) * 1_000_003 + int(stage)) % (2 ** 63 - 1))
    return float(low + (high - low) * torch.rand((), generator=g, dtype=torch.float64))


def sharpen(image: torch.Tensor, alpha: float, kernel_size: int = 3, sigma: float = 1.0) -> torch.Tensor:
    """Unsharp mask (1 + alpha) * g - alpha * GaussianBlur(g) with kornia (reflect border, as torchvision).
    No clamping (the reference feeds the unclamped result to the DWT and the VAE)."""
    import kornia
    if alpha == 0.0:
        return image
    work = image.float()
    blurred = kornia.filters.gaussian_blur2d(work, (kernel_size, kernel_size), (float(sigma), float(sigma)),
                                             border_type="reflect")
    return ((1.0 + alpha) * work - alpha * blurred).to(image.dtype)


# ----------------------------------------------------------------------------------------------
# Low-band replacement
# ----------------------------------------------------------------------------------------------
def reference_low_band(reference: torch.Tensor, wavelet: str = "db4", levels: int = 1) -> torch.Tensor:
    """The structure guidance LL* of a reference (B, C, H, W), in float32."""
    return wavelets.low_band(reference.float(), wavelet, levels)


def replace_low_band(x: torch.Tensor, reference_low: torch.Tensor, weight: float = 1.0, wavelet: str = "db4",
                     levels: int = 1) -> torch.Tensor:
    """x with the coarsest approximation band moved toward `reference_low` by `weight` (1 = replaced, the
    reference; in between = linear blend), its detail bands kept. weight 0 returns `x` itself.

    x: (B, C, H, W); reference_low: the low band of a reference of the same size, batch 1 or B."""
    if weight == 0.0:
        return x
    low, highs = wavelets.dwt2(x.float(), wavelet, levels)
    ref = reference_low.to(device=low.device, dtype=low.dtype)
    if ref.shape[-3:] != low.shape[-3:]:
        raise ValueError(f"reference low band {tuple(ref.shape)} does not match the prediction's {tuple(low.shape)}")
    if ref.shape[0] != low.shape[0]:
        if ref.shape[0] == 1 or low.shape[0] % ref.shape[0] == 0:
            ref = ref.repeat(low.shape[0] // ref.shape[0], 1, 1, 1)
        else:
            raise ValueError(f"reference batch {ref.shape[0]} does not divide the prediction batch {low.shape[0]}")
    new_low = ref if weight == 1.0 else torch.lerp(low, ref, float(weight))
    return wavelets.idwt2(new_low, highs, wavelet, size=tuple(x.shape[-2:])).to(x.dtype)


# ----------------------------------------------------------------------------------------------
# Stage planning
# ----------------------------------------------------------------------------------------------
def round_to(value: float, multiple: int) -> int:
    return max(multiple, int(round(value / multiple)) * multiple)


def target_size(width: int, height: int, source: tuple[int, int], scale_by: float,
                multiple: int = 8) -> tuple[int, int]:
    """(W, H) of a one-stage target: explicit width/height (0 = from scale_by; one of them 0 keeps the aspect),
    rounded to `multiple`. `source` is the input (W, H)."""
    sw, sh = source
    if width > 0 and height > 0:
        w, h = width, height
    elif width > 0:
        w, h = width, sh * width / sw
    elif height > 0:
        w, h = sw * height / sh, height
    else:
        w, h = sw * scale_by, sh * scale_by
    return round_to(w, multiple), round_to(h, multiple)


def resolve_stages(spec: str, family_key: str) -> str:
    """The stage list a `stages` value means for a model family (`auto` -> AUTO_STAGES; lists unchanged)."""
    if spec.strip().lower() == AUTO:
        return AUTO_STAGES.get(family_key, "x2")
    return spec


def stage_spec_problem(spec: str) -> str | None:
    """What is wrong with a `stages` value before the source size is known (None when it is fine): syntax, and
    absolute sizes outside [MIN_STAGE_SIDE, MAX_STAGE_SIDE]."""
    if not isinstance(spec, str):
        return f"must be text, got {spec!r}"
    if spec.strip().lower() == AUTO:
        return None
    try:
        sizes = plan_stages(spec, (1024, 1024))
    except ValueError as e:
        return f"{e} (write e.g. 'auto', '2048, 3072, 4096', 'x2' or '1536x1024')"
    for entry in (e.strip() for e in spec.split(",") if e.strip()):
        m = _STAGE_RE.match(entry)
        if m is not None and not m.group("f"):
            values = [int(m.group(g)) for g in ("w", "h", "n") if m.group(g)]
            if any(v < MIN_STAGE_SIDE or v > MAX_STAGE_SIDE for v in values):
                return (f"stage {entry!r} is outside {MIN_STAGE_SIDE}-{MAX_STAGE_SIDE} px per side")
    del sizes
    return None


def size_problem(size: tuple[int, int]) -> str | None:
    """A planned stage size (W, H) outside [MIN_STAGE_SIDE, MAX_STAGE_SIDE] px per side, or None."""
    w, h = size
    if min(w, h) < MIN_STAGE_SIDE:
        return f"a stage of {w}x{h} px is below the {MIN_STAGE_SIDE} px per side DiffuseHigh needs"
    if max(w, h) > MAX_STAGE_SIDE:
        return f"a stage of {w}x{h} px is above the {MAX_STAGE_SIDE} px per side allowed"
    return None


_STAGE_RE = re.compile(r"^\s*(?:(?P<w>\d+)\s*[x×]\s*(?P<h>\d+)|[x×]\s*(?P<f>\d+(?:\.\d+)?)|(?P<n>\d+))\s*$")


def plan_stages(spec: str, source: tuple[int, int], multiple: int = 8) -> list[tuple[int, int]]:
    """Stage sizes (W, H) from a comma-separated spec, each entry relative to the previous stage:

    * `WxH`: that size;  * `xF`: previous size times F;  * `N`: long side N, the input's aspect kept.

    Sizes are rounded to `multiple`. Example: "2048, 3072, 4096" from 1024x1024 -> 2048², 3072², 4096²;
    from 1216x832 -> 2048x1400, 3072x2104, 4096x2800."""
    entries = [e for e in spec.split(",") if e.strip()]
    if not entries:
        raise ValueError("stages is empty; give e.g. '2048, 3072, 4096' or 'x2, x1.5'")
    sw, sh = source
    prev = (float(sw), float(sh))
    out = []
    for entry in entries:
        m = _STAGE_RE.match(entry)
        if m is None:
            raise ValueError(f"stage {entry.strip()!r} is not WxH, xF or N")
        if m.group("w"):
            w, h = float(m.group("w")), float(m.group("h"))
        elif m.group("f"):
            f = float(m.group("f"))
            if f <= 0:
                raise ValueError(f"stage factor in {entry.strip()!r} must be > 0")
            w, h = prev[0] * f, prev[1] * f
        else:
            n = float(m.group("n"))
            if sw >= sh:
                w, h = n, n * sh / sw
            else:
                w, h = n * sw / sh, n
        size = (round_to(w, multiple), round_to(h, multiple))
        out.append(size)
        prev = (float(size[0]), float(size[1]))
    return out
