"""Deterministic DDIM-style inversion with optional ReNoise fixed-point iterations, over any sigma schedule.

The maths, pure torch, no ComfyUI. Shared by StyleSSP (negative-guidance inversion, arXiv 2501.11319) and TALE
(arXiv 2408.03637); ReNoise is Garibi et al., arXiv 2403.14602.

Conventions (ComfyUI's k-diffusion space):

* The state ``x`` at noise level sigma is what ComfyUI's samplers hold: ``x = x0 + sigma * eps`` for eps/v models
  (variance exploding) and ``x = (1 - sigma) * x0 + sigma * noise`` for flow models (SD3, Flux).
* ``denoise(x, sigma) -> D`` is the model's denoised prediction (ComfyUI's guider call, CFG included).
  ``(x - D) / sigma`` is the model's slope dx/dsigma: the noise prediction eps for eps/v models, the velocity
  ``noise - x0`` for flow models. A DDIM step of either kind is exactly ``x_next = x + (sigma_next - sigma) * slope``
  (DDIM = Euler in this parametrisation), so one formula serves every family; nothing is ever divided by
  ``1 - sigma``, so a flow inversion may end at sigma = 1.
* As in DDIM inversion (diffusers' ``DDIMInverseScheduler``, the StyleSSP/ReNoise ``inv_step``), the slope that
  moves ``x`` from ``sigma`` to ``sigma_next`` is evaluated **at sigma_next** on the current latent (so the first
  step from a clean latent at sigma = 0 is well defined). The network must see the current latent at its own
  scale: ``input_scale(sigma, sigma_next)`` rescales the state before the call so that the network input equals
  the one at ``sigma`` (for eps/v models ``sqrt(1 + sigma_next^2) / sqrt(1 + sigma^2)``: the VP latent is what the
  reference's UNet sees; 1 for flow models).
* ReNoise (``renoise_steps`` > 0): the estimate of ``x_next`` is refined by fixed-point iterations
  ``x_next <- x + (sigma_next - sigma) * slope(x_next, sigma_next)``; the final step uses the mean slope of the
  iterations in ``average_range`` (the reference's averaging; an empty range uses the last iterate's slope).
  With enough iterations the step becomes the exact inverse of an Euler/DDIM sampling step.
* Optional (``noise_regularization``, eps models): the pix2pix-zero regulariser of the ReNoise/StyleSSP code on
  the slopes the reference regularises (seeded; gradients on the noise prediction only, no model gradients).

Arithmetic on latents runs in float32 (float64 stays float64); the returned latents have the input's dtype.
Inputs are never modified.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

Denoiser = Callable[[torch.Tensor, float], torch.Tensor]
"""(x, sigma) -> denoised prediction D with x's shape. The caller applies guidance, patches, interrupts."""
InputScale = Callable[[float, float], float]
"""(sigma_from, sigma_to) -> factor applied to the state before a call at sigma_to (see the module doc)."""

AVERAGES = ("last", "mean", "reference")
"""How ReNoise iterations are combined: ``last`` (plain fixed point: the last iterate), ``mean`` (mean slope of
every iteration), ``reference`` (the StyleSSP/ReNoise configuration: on early steps, whose target sigma is below
``early_sigma``, at most ``early_max_renoise_steps`` iterations and the mean of iterations 0-4; on later steps the
mean of iterations 8-9, which with fewer iterations means the last iterate)."""

REFERENCE_EARLY_TIMESTEP = 250
"""ReNoise's ``first_step_max_timestep``: DDPM timestep below which the 'first step' settings apply."""
REFERENCE_AVERAGE_EARLY = (0, 5)
REFERENCE_AVERAGE_LATE = (8, 10)
REFERENCE_EARLY_MAX_RENOISE = 5


@dataclass(frozen=True)
class InversionParams:
    """Single source of defaults for the inversion kernel and nodes (plain DDIM inversion by default)."""

    cfg: float = 1.0
    """Guidance scale of the inversion: eps(neg) + cfg * (eps(pos) - eps(neg)). 1 = plain conditional inversion
    (one pass per evaluation). StyleSSP's negative guidance uses 1.5 (paper range 1-3)."""
    renoise_steps: int = 0
    """ReNoise fixed-point iterations per step in addition to the first evaluation (0 = plain DDIM inversion;
    StyleSSP's official setting: 1)."""
    average: str = "last"
    """One of AVERAGES."""
    early_sigma: float = 0.0
    """average=reference: steps whose target sigma is below this use the 'first step' settings (the node sets
    it from the model: sigma of DDPM timestep 250, or 0.25 for flow models)."""
    noise_regularization: bool = False
    """The StyleSSP/ReNoise pix2pix-zero noise regulariser (eps models only): gradient steps on each regularised
    noise prediction toward Gaussian statistics (patch KL to the prediction on the forward-noised clean latent,
    and zero auto-correlation), on the iterations the reference regularises (index >= the start of the averaged
    range: every iteration with average last/mean, the early steps with reference) and on their average. One
    more guider call on each such step. Seeded by regularization_seed."""
    regularization_seed: int = 0
    """Seed of the forward noise and of the auto-correlation rolls of the regulariser."""
    lambda_kl: float = 0.065
    """Regulariser: patch-KL step size (official 0.065)."""
    lambda_ac: float = 20.0
    """Regulariser: auto-correlation step size (official 20)."""
    regularization_steps: int = 4
    """Regulariser: outer iterations (official 4)."""
    ac_rolls: int = 5
    """Regulariser: random rolls per auto-correlation step (official 5)."""

    def validate(self) -> list[str]:
        problems = []
        if not math.isfinite(self.cfg) or not 0.0 <= self.cfg <= 100.0:
            problems.append(f"cfg must be in [0, 100], got {self.cfg}")
        if not 0 <= int(self.renoise_steps) <= 100:
            problems.append(f"renoise_steps must be in [0, 100], got {self.renoise_steps}")
        if self.average not in AVERAGES:
            problems.append(f"average must be one of {AVERAGES}, got {self.average!r}")
        if not self.early_sigma >= 0.0:
            problems.append(f"early_sigma must be >= 0, got {self.early_sigma}")
        if not (self.lambda_kl >= 0.0 and self.lambda_ac >= 0.0):
            problems.append("lambda_kl and lambda_ac must be >= 0")
        if not (0 <= int(self.regularization_steps) <= 100 and 1 <= int(self.ac_rolls) <= 100):
            problems.append("regularization_steps must be in [0, 100] and ac_rolls in [1, 100]")
        return problems

    def replace(self, **changes) -> "InversionParams":
        return dataclasses.replace(self, **changes)

    def plan(self, sigma_next: float) -> tuple[int, tuple[int, int]]:
        """(renoise iterations, averaged iteration range [start, end)) for a step ending at sigma_next."""
        n = int(self.renoise_steps)
        if self.average == "last":
            return n, (0, 0)
        if self.average == "mean":
            return n, (0, n + 1)
        if sigma_next < self.early_sigma:
            return min(n, REFERENCE_EARLY_MAX_RENOISE), REFERENCE_AVERAGE_EARLY
        return n, REFERENCE_AVERAGE_LATE


@dataclass
class InversionResult:
    """What an inversion returns. All tensors are in the sampler's (model) space, in the input's dtype."""

    latent: torch.Tensor
    """The inverted state at sigmas[-1]."""
    sigmas: torch.Tensor
    """The ascending schedule walked (float64, CPU): trajectory[i] is the state at sigmas[i]."""
    trajectory: list[torch.Tensor] = field(default_factory=list)
    """States x_0 .. x_N (x_0 = the input); empty when keep_trajectory=False."""
    denoised: list[torch.Tensor] = field(default_factory=list)
    """The denoised prediction of the slope used for each step (N entries); empty when keep_trajectory=False."""
    evaluations: int = 0
    """Model (guider) calls made."""


def inversion_schedule(sigmas: torch.Tensor) -> torch.Tensor:
    """The schedule in inversion order (ascending, float64 on CPU), from a sampling schedule (descending, as
    ComfyUI's schedulers make it) or an already flipped one. Raises ValueError unless strictly monotone."""
    s = torch.as_tensor(sigmas).detach().to("cpu", torch.float64).flatten()
    if s.numel() < 2:
        raise ValueError(f"an inversion needs at least 2 sigmas, got {s.numel()}")
    if s[0] > s[-1]:
        s = s.flip(0)
    d = s[1:] - s[:-1]
    if not bool((d > 0).all()):
        raise ValueError("sigmas must be strictly monotone (one repeated or out-of-order value found)")
    if not bool(torch.isfinite(s).all()) or float(s[0]) < 0.0:
        raise ValueError("sigmas must be finite and non-negative")
    return s


def _work_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def slope(denoise: Denoiser, x_in: torch.Tensor, sigma: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(dx/dsigma, D) of the model at (x_in, sigma): (x_in - D) / sigma, in float32 (float64 for float64)."""
    if not sigma > 0.0:
        raise ValueError("the slope is evaluated at sigma > 0 only")
    d = denoise(x_in, sigma)
    wd = _work_dtype(x_in.dtype)
    return (x_in.to(wd) - d.to(wd)) / sigma, d


def invert_step(denoise: Denoiser, x: torch.Tensor, sigma: float, sigma_next: float, renoise_steps: int = 0,
                average_range: tuple[int, int] = (0, 0), input_scale: Optional[InputScale] = None,
                regularize: Optional[Callable[[torch.Tensor], torch.Tensor]] = None
                ) -> tuple[torch.Tensor, torch.Tensor, int]:
    """One inversion step from sigma to sigma_next > sigma. Returns (x_next, denoised used, model calls).

    Iteration 0 evaluates the slope on the current state (rescaled by input_scale) at sigma_next; iterations
    1..renoise_steps evaluate it on the current estimate of x_next. The step uses the mean slope over the
    iterations in average_range when that range holds any, else the last iteration's slope.
    `regularize(slope) -> slope`, when given, is applied (as in the reference) to the slope of every iteration
    whose index is >= average_range[0] before it moves the estimate, and to the mean (the mean itself is taken
    over the raw slopes)."""
    if not sigma_next > sigma:
        raise ValueError(f"an inversion step goes up in sigma, got {sigma} -> {sigma_next}")
    wd = _work_dtype(x.dtype)
    xw = x.to(wd)
    dt = sigma_next - sigma
    scale = 1.0 if input_scale is None else float(input_scale(sigma, sigma_next))
    x_in = x if scale == 1.0 else (xw * scale).to(x.dtype)
    mean = None
    mean_d = None
    taken = 0
    calls = 0
    x_next = x
    used_d = None
    a0, a1 = average_range
    for i in range(int(renoise_steps) + 1):
        g, d = slope(denoise, x_in, sigma_next)
        calls += 1
        if a0 <= i < a1:
            taken += 1
            mean = g if mean is None else mean + (g - mean) / taken
            dw = d.to(wd)
            mean_d = dw if mean_d is None else mean_d + (dw - mean_d) / taken
        if regularize is not None and i >= a0:
            g = regularize(g)
        x_next = xw + dt * g
        used_d = d
        x_in = x_next.to(x.dtype)
    if mean is not None:
        if regularize is not None:
            mean = regularize(mean)
        x_next = xw + dt * mean
        used_d = mean_d
    return x_next.to(x.dtype), used_d.to(x.dtype), calls


def invert(denoise: Denoiser, x0: torch.Tensor, sigmas: torch.Tensor, params: InversionParams = InversionParams(),
           input_scale: Optional[InputScale] = None,
           on_step: Optional[Callable[[int, torch.Tensor, torch.Tensor], None]] = None,
           keep_trajectory: bool = True) -> InversionResult:
    """Invert `x0` (the state at the lowest sigma of `sigmas`, normally the clean latent at 0) up the schedule.

    `sigmas` may be a sampling schedule (descending) or a flipped one; it is walked in ascending order.
    `params.cfg` is not applied here: `denoise` already returns the guided prediction.
    `on_step(i, x_next, denoised)` is called after each step i (0-based) with the new state."""
    problems = params.validate()
    if problems:
        raise ValueError("; ".join(problems))
    schedule = inversion_schedule(sigmas)
    x = x0
    result = InversionResult(latent=x0, sigmas=schedule)
    if keep_trajectory:
        result.trajectory.append(x0)
    generator = forward_noise = None
    if params.noise_regularization:
        generator = torch.Generator().manual_seed(int(params.regularization_seed))
        forward_noise = torch.randn(tuple(x0.shape), generator=generator).to(x0.device)
    for i in range(len(schedule) - 1):
        sigma, sigma_next = float(schedule[i]), float(schedule[i + 1])
        n, avg = params.plan(sigma_next)
        regularize = None
        if params.noise_regularization and avg[0] <= n:
            # the target: the guided noise prediction on the clean latent forward-noised to sigma_next (VE space)
            x_fwd = (x0.to(_work_dtype(x0.dtype)) + sigma_next * forward_noise).to(x0.dtype)
            target, _ = slope(denoise, x_fwd, sigma_next)
            result.evaluations += 1
            regularize = _regularizer(target, params, generator)
        x, d, calls = invert_step(denoise, x, sigma, sigma_next, n, avg, input_scale, regularize)
        result.evaluations += calls
        if keep_trajectory:
            result.trajectory.append(x)
            result.denoised.append(d)
        if on_step is not None:
            on_step(i, x, d)
    result.latent = x
    return result


# ----------------------------------------------------------------------------------------------
# pix2pix-zero noise regulariser (as used by ReNoise and StyleSSP), on eps predictions
# ----------------------------------------------------------------------------------------------
def patch_kl(e: torch.Tensor, target: torch.Tensor, patch: int = 4) -> torch.Tensor:
    """Sum over 4x4 (x 4-channel) patches of sum over channels of |KL-like divergence| between the per-channel
    statistics of e and target (the reference's patchify_latents_kl_divergence; unbiased variances, eps 1e-6).
    Channels are grouped in fours, as the reference's channel unfold; leftover rows/columns are dropped; with no
    whole patch (fewer than 4 rows, columns or channels) the term is 0 (the reference's unfold would fail)."""
    eps = 1e-6
    if min(e.shape[1:4]) < patch:  # no whole patch (a latent under 4x4 or with fewer than 4 channels): no term
        return (e * 0.0).sum()

    def patches(v):
        p = v.unfold(1, patch, patch).unfold(2, patch, patch).unfold(3, patch, patch)
        return p.contiguous().view(-1, patch, patch * patch)  # (patches, 4 channels, 16 pixels)

    a, b = patches(e), patches(target)
    mu0, mu1 = a.mean(-1), b.mean(-1)
    var0, var1 = a.var(-1), b.var(-1)
    kl = torch.log((var1 + eps) / (var0 + eps)) + (var0 + (mu0 - mu1) ** 2) / (var1 + eps) - 1
    return kl.abs().sum()


def auto_corr(e: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """The reference's auto_corr_loss, summed over images: per channel and per pyramid level (2x2 average
    pooling down to 8 pixels), mean(x * roll(x, r))^2 along height and along width, r random in [0, size/2)."""
    loss = e.new_zeros(())
    for b in range(e.shape[0]):
        for c in range(e.shape[1]):
            v = e[b, c][None, None]
            while True:
                r = int(torch.randint(0, max(v.shape[2] // 2, 1), (1,), generator=generator))
                loss = loss + (v * torch.roll(v, shifts=r, dims=2)).mean() ** 2
                loss = loss + (v * torch.roll(v, shifts=r, dims=3)).mean() ** 2
                if v.shape[2] <= 8:
                    break
                v = torch.nn.functional.avg_pool2d(v, kernel_size=2)
    return loss


def regularize_noise(e: torch.Tensor, target: torch.Tensor, lambda_kl: float = 0.065, lambda_ac: float = 20.0,
                     steps: int = 4, rolls: int = 5, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """pix2pix-zero's regulariser on a noise prediction e: `steps` times, a clipped (+-100) patch-KL gradient step
    toward target's statistics and `rolls` auto-correlation gradient steps (each grad / rolls). Gradients are
    taken with respect to e only (no model pass), outside ComfyUI's inference mode. Returns e's dtype; a result
    with NaNs is discarded (e returned), as the reference does."""
    with torch.inference_mode(False), torch.enable_grad():
        wd = _work_dtype(e.dtype)
        cur = e.detach().clone().to(wd)
        tgt = target.detach().clone().to(wd)
        for _ in range(int(steps)):
            if lambda_kl > 0:
                v = cur.detach().clone().requires_grad_(True)
                grad, = torch.autograd.grad(patch_kl(v, tgt), v)
                cur = cur - lambda_kl * grad.clamp(-100, 100)
            if lambda_ac > 0:
                for _ in range(int(rolls)):
                    v = cur.detach().clone().requires_grad_(True)
                    grad, = torch.autograd.grad(auto_corr(v, generator), v)
                    cur = cur - lambda_ac * grad / rolls
        cur = cur.detach()
    if not bool(torch.isfinite(cur).all()):
        return e
    return cur.to(e.dtype)


def _regularizer(target: torch.Tensor, params: InversionParams, generator: torch.Generator):
    def regularize(g: torch.Tensor) -> torch.Tensor:
        return regularize_noise(g, target, params.lambda_kl, params.lambda_ac, params.regularization_steps,
                                params.ac_rolls, generator)
    return regularize


def vp_input_scale(sigma_from: float, sigma_to: float, sigma_data: float = 1.0) -> float:
    """input_scale for eps/v models: sqrt(sigma_to^2 + sd^2) / sqrt(sigma_from^2 + sd^2), so the network sees the
    state at sigma_from with the input scaling it had there (the VP latent the DDIM reference feeds its UNet)."""
    return math.sqrt(sigma_to ** 2 + sigma_data ** 2) / math.sqrt(sigma_from ** 2 + sigma_data ** 2)


def start_noise(state: torch.Tensor, latent: torch.Tensor, noise_gain: float, latent_gain: float) -> torch.Tensor:
    """The noise n with noise_gain * n + latent_gain * latent == state (ComfyUI's noise_scaling is linear in its
    noise and latent: noise_gain = scaling(sigma, 1, 0), latent_gain = scaling(sigma, 0, 1)). Lets a sampler
    that adds noise start exactly at an inverted state."""
    if noise_gain == 0.0:
        raise ValueError("noise_gain is 0: the sampler's start sigma adds no noise, so no noise can reach the state")
    wd = _work_dtype(state.dtype)
    n = (state.to(wd) - latent_gain * latent.to(device=state.device, dtype=wd)) / noise_gain
    return n.to(state.dtype)
