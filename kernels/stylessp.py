"""StyleSSP (Xu et al., "StyleSSP: Sampling StartPoint Enhancement for Training-free Diffusion-based Method for
Style Transfer", arXiv 2501.11319, CVPR 2025): the sampling start point.

1. The content latent is inverted with negative guidance (kernels/inversion.py; cfg 1.5 between the content
   conditioning and the style image's content, ReNoise 1 iteration).
2. **Frequency manipulation** of the inverted latent (this module):
   * ``faithful``: the reference `freq_exp(d_s=0.3, d_t=0.9, alpha=0.7, filter_type="gaussian_b")`: a 3-D FFT over
     (channels, height, width) of each image, spectral gain ``alpha * M + (1 - M)`` with the reference's Gaussian
     band mask M (kernels/frequency.reference_band_mask; gain 0.70 at the zero frequency and on every
     cross-channel frequency, about 0.90 at mid spatial frequencies), plus Gaussian noise scaled to the *range*
     (max - min) of the other variant ``ifft(X * (M + alpha (1 - M)))``, times ``1 - alpha`` (0.3). float64 FFT.
   * ``improved``: per-channel 2-D FFT, gain ``1 - strength * exp(-r^2 / (2 radius^2))`` (exactly 1 - strength at
     the zero frequency), plus noise matched to each channel's *std* of the filtered latent, times noise_strength.
3. **Start point**: the manipulated latent is taken as the state at the first sampling sigma the reference uses,
   keeping its network-input scale, plus the reference's hidden extra term ``0.2 * (content latent noised to that
   sigma)`` (`prepare_latents` of its ControlNet-inpaint pipeline). The reference inverts along DDIM "leading"
   timesteps (50 steps: 1, 21, ..., 981) but samples with diffusers' UniPCMultistepScheduler (v0.30), whose
   "leading" spacing divides by steps + 1 (1000 // 51 = 19: 951, 932, ..., 20), and strength 0.9999 drops the
   first of those: sampling resumes at t = 932 (SDXL sigma 9.92; the inversion ended at t = 981, sigma 13.12)
   and runs 49 steps down to t = 20, then to 0 (``reference_resume_timesteps``).

Pure torch, no ComfyUI. Noise tensors are passed in (the node seeds them). Every output has the input's dtype.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch

from .frequency import apply_shifted_gain, gaussian_lowfreq_gain, reference_band_mask
from .inversion import InversionParams

MODES = ("faithful", "improved")
SCHEDULES = ("reference", "inversion")
"""Where sampling resumes: ``reference`` (the official pipeline's UniPC "leading" timesteps, see the module doc)
or ``inversion`` (the inversion's own schedule, from skip_steps on: matched schedules)."""

OFFICIAL_INVERSION = InversionParams(cfg=1.5, renoise_steps=1, average="reference", noise_regularization=True)
"""The official code's inversion (``infer_style.py`` over ``src/config.py``): negative guidance
``inv_guidance_scale`` 1.5, ``num_renoise_steps`` 1 with ReNoise's reference averaging (at most 5 iterations below
DDPM t = 250), and the pix2pix-zero noise regulariser (lambda_kl 0.065, lambda_ac 20, 4 steps, 5 rolls: the
InversionParams defaults). It runs along 50 DDIM 'leading' timesteps (ComfyUI: ddim_uniform, 50 steps)."""


@dataclass(frozen=True)
class StyleSSPParams:
    """Single source of defaults for the StyleSSP kernel and nodes (faithful to the official code)."""

    mode: str = "faithful"
    """One of MODES: frequency manipulation of the reference (3-D band mask, range-matched noise) or ours
    (per-channel 2-D low-frequency reduction, std-matched noise)."""
    alpha: float = 0.7
    """faithful: spectral gain alpha * M + (1 - M). Neutral: 1 (no change). Official: 0.7."""
    d_s: float = 0.3
    """faithful: the band mask's low-pass stop frequency (normalised). Official: 0.3."""
    d_t: float = 0.9
    """faithful: the band mask's high-pass stop frequency (normalised). Official: 0.9."""
    d_l: float = 0.3
    """faithful: the channel-axis scale of the band mask (the reference's implicit default 0.3)."""
    radius: float = 0.3
    """improved: Gaussian radius of the reduced low-frequency band (normalised frequency, 1 = Nyquist)."""
    strength: float = 0.3
    """improved: attenuation at the zero frequency (gain 1 - strength; 0.3 matches the faithful DC gain 0.70).
    Neutral: 0."""
    noise_strength: float = 0.3
    """Scale of the added Gaussian noise relative to the latent (faithful: range-matched, the reference uses
    1 - alpha = 0.3; improved: std-matched). Neutral: 0."""
    content_weight: float = 0.2
    """Weight of the reference's hidden extra term: + content_weight * (content latent noised to the start sigma).
    Neutral: 0. Official: 0.2."""
    schedule: str = "reference"
    """One of SCHEDULES: the sampling schedule the start point hands on (reference: diffusers' UniPC 'leading'
    timesteps for as many steps as the inversion; inversion: the inversion's own sigmas)."""
    skip_steps: int = 1
    """Sampling starts this many steps into the sampling schedule (official: strength 0.9999 of 50 steps = 1 step
    skipped, the inverted latent reinterpreted there). Neutral: 0 with schedule 'inversion' (start where the
    inversion ended)."""
    seed: int = 1234
    """Seed of the frequency-manipulation noise and of the content term's noise (the official seed; its noise
    streams differ from diffusers')."""
    inversion: InversionParams = OFFICIAL_INVERSION
    """The official inversion's settings (the defaults of Inversion (TFG) and Inversion Sampler (TFG))."""
    steps: int = 50
    """Official inversion and sampling steps (DDIM 'leading' timesteps = ComfyUI's ddim_uniform scheduler)."""
    sampling_cfg: float = 5.0
    """Official CFG of the generation."""

    def validate(self) -> list[str]:
        problems = []
        if self.mode not in MODES:
            problems.append(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.schedule not in SCHEDULES:
            problems.append(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if not 0.0 <= self.alpha <= 2.0:
            problems.append(f"alpha must be in [0, 2], got {self.alpha}")
        for name in ("d_s", "d_t", "d_l", "radius"):
            v = getattr(self, name)
            if not (math.isfinite(v) and 0.0 <= v <= 4.0):
                problems.append(f"{name} must be in [0, 4], got {v}")
        if self.d_l == 0.0:
            problems.append("d_l must be > 0")
        if not -1.0 <= self.strength <= 1.0:
            problems.append(f"strength must be in [-1, 1], got {self.strength}")
        if not 0.0 <= self.noise_strength <= 4.0:
            problems.append(f"noise_strength must be in [0, 4], got {self.noise_strength}")
        if not 0.0 <= self.content_weight <= 4.0:
            problems.append(f"content_weight must be in [0, 4], got {self.content_weight}")
        if not 0 <= int(self.skip_steps) <= 1000:
            problems.append(f"skip_steps must be in [0, 1000], got {self.skip_steps}")
        if not 0 <= int(self.seed) <= 0xFFFFFFFFFFFFFFFF:
            problems.append(f"seed must be in [0, 2^64 - 1], got {self.seed}")
        return problems + self.inversion.validate()

    def replace(self, **changes) -> "StyleSSPParams":
        return dataclasses.replace(self, **changes)


# ----------------------------------------------------------------------------------------------
# Frequency manipulation
# ----------------------------------------------------------------------------------------------
def faithful_gain(channels: int, height: int, width: int, params: StyleSSPParams = StyleSSPParams()) -> torch.Tensor:
    """The reference's spectral gain alpha * M + (1 - M) over (channels, height, width), fftshifted, float64."""
    m = reference_band_mask(channels, height, width, params.d_s, params.d_t, params.d_l)
    return params.alpha * m + (1.0 - m)


def faithful_filter(x: torch.Tensor, params: StyleSSPParams = StyleSSPParams()) -> tuple[torch.Tensor, torch.Tensor]:
    """(x filtered with alpha * M + (1 - M), x filtered with M + alpha * (1 - M)) for x (B, C, H, W): the
    reference's latent_high_alpha_low (the one it samples from) and latent_low_alpha_high (whose range scales its
    noise). 3-D FFT over (C, H, W) of each image, in float64; outputs in x's dtype."""
    _, c, h, w = x.shape
    m = reference_band_mask(c, h, w, params.d_s, params.d_t, params.d_l)
    dims = (-3, -2, -1)
    used = apply_shifted_gain(x, params.alpha * m + (1.0 - m), dims, high_precision=True)
    other = apply_shifted_gain(x, m + params.alpha * (1.0 - m), dims, high_precision=True)
    return used, other


def improved_filter(x: torch.Tensor, params: StyleSSPParams = StyleSSPParams()) -> torch.Tensor:
    """Per-channel 2-D low-frequency reduction of x (B, C, H, W): gain 1 - strength * exp(-r^2 / (2 radius^2)).
    float32 FFT (float64 for float64 input); output in x's dtype."""
    gain = gaussian_lowfreq_gain(x.shape[-2], x.shape[-1], params.radius, params.strength)
    return apply_shifted_gain(x, gain, (-2, -1), high_precision=False)


def range_matched(noise: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """noise * (range(reference) / range(noise)) per image (the reference's scaling; range = max - min)."""
    wd = torch.float64 if reference.dtype == torch.float64 else torch.float32
    n, r = noise.to(wd), reference.to(wd)
    dims = tuple(range(1, n.dim()))
    n_range = n.amax(dims, keepdim=True) - n.amin(dims, keepdim=True)
    r_range = r.amax(dims, keepdim=True) - r.amin(dims, keepdim=True)
    return n * (r_range / n_range.clamp_min(1e-12))


def std_matched(noise: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """noise rescaled to unit std, then to the std of each channel of each image of reference."""
    wd = torch.float64 if reference.dtype == torch.float64 else torch.float32
    n, r = noise.to(wd), reference.to(wd)
    dims = tuple(range(2, n.dim()))
    return n / n.std(dims, keepdim=True).clamp_min(1e-12) * r.std(dims, keepdim=True)


def manipulate(x: torch.Tensor, noise: torch.Tensor, params: StyleSSPParams = StyleSSPParams()) -> torch.Tensor:
    """StyleSSP's frequency manipulation of an inverted latent x (B, C, H, W) with standard Gaussian `noise` of
    the same shape (faithful or improved, see the module doc). Output in x's dtype; x is not modified."""
    problems = params.validate()
    if problems:
        raise ValueError("; ".join(problems))
    if x.dim() != 4 or noise.shape != x.shape:
        raise ValueError(f"x must be (B, C, H, W) and noise of the same shape, got {tuple(x.shape)}, "
                         f"{tuple(noise.shape)}")
    noise = noise.to(x.device)
    if params.mode == "faithful":
        used, other = faithful_filter(x, params)
        wd = torch.float64
        out = used.to(wd) + params.noise_strength * range_matched(noise, other).to(wd)
    else:
        filtered = improved_filter(x, params)
        wd = torch.float64 if x.dtype == torch.float64 else torch.float32
        out = filtered.to(wd) + params.noise_strength * std_matched(noise, filtered).to(wd)
    return out.to(x.dtype)


# ----------------------------------------------------------------------------------------------
# Start point
# ----------------------------------------------------------------------------------------------
def reference_resume_timesteps(steps: int, skip_steps: int = 1, train_timesteps: int = 1000,
                               offset: int = 1) -> list[int]:
    """The DDPM timesteps the official generation samples at (0 follows the last one): diffusers'
    UniPCMultistepScheduler.set_timesteps with timestep_spacing "leading" and steps_offset 1 (the SDXL base
    scheduler config it is built from; diffusers 0.30): ratio = train_timesteps // (steps + 1), timesteps
    k * ratio + offset for k = steps .. 1; the pipeline's strength (0.9999 -> int(steps * strength) = steps - 1)
    then drops the first skip_steps. 50 steps, skip 1: 932, 913, ..., 20 (49 timesteps)."""
    steps, skip_steps = int(steps), int(skip_steps)
    ratio = train_timesteps // (steps + 1)
    if steps < 1 or ratio < 1:
        raise ValueError(f"the reference spacing needs 1 <= steps < {train_timesteps}, got {steps}")
    if not 0 <= skip_steps < steps:
        raise ValueError(f"skip_steps must be in [0, {steps - 1}] for {steps} steps, got {skip_steps}")
    return [k * ratio + offset for k in range(steps, 0, -1)][skip_steps:]


def start_point(manipulated: torch.Tensor, content: torch.Tensor, content_noise: torch.Tensor, state_scale: float,
                noise_gain: float, latent_gain: float, content_weight: float) -> torch.Tensor:
    """state_scale * manipulated + content_weight * (noise_gain * content_noise + latent_gain * content).

    `state_scale` carries the manipulated latent from the inversion's final sigma to the start sigma (the
    reference reuses the same network-input-scale latent there: c_in(end) / c_in(start); 1 for flow models);
    (noise_gain, latent_gain) is the model's noise scaling at the start sigma (eps: (sigma, 1); flow:
    (sigma, 1 - sigma)), so the second term is the content latent noised to the start sigma. All in model space."""
    wd = torch.float64 if manipulated.dtype == torch.float64 else torch.float32
    out = state_scale * manipulated.to(wd)
    if content_weight != 0.0:
        noised = noise_gain * content_noise.to(manipulated.device, wd) + latent_gain * content.to(manipulated.device,
                                                                                                    wd)
        out = out + content_weight * noised
    return out.to(manipulated.dtype)
