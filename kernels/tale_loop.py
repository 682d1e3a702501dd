"""TALE's composition loop (Pham et al., arXiv 2408.03637), pure torch, no ComfyUI: the denoisers, the energy and
the progress tick are passed in as functions.

`compose` runs the whole composition along a sampling schedule `sigmas` (descending, ending at 0):
1. inversion of the clean background and foreground latents up the schedule (`invert_to`: the pack's shared DDIM
   inversion, kernels/inversion.py, guided by `den_inv`), up to step T' (`trajectories="inverted"`) or to the first
   step (`"replay"`: the reference's way, then both are denoised again alongside);
2. selective initiation at T' (`paste`): nothing of the composite is computed before T' (unless `history=
   "reference"` reproduces the released code's discarded pre-T' composite);
3. for the tau window steps: background outside the object, AdaIN toward the background, `inner_steps` energy
   gradient steps inside the object (`optimise_step`);
4. ordinary sampling (DPM-Solver++ 2M or Euler, the host's arithmetic) to the end.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from . import tale as K
from .inversion import InversionParams, invert as invert_kernel

CompositeDenoiser = Callable[[torch.Tensor, int], torch.Tensor]
"""(x, step index i) -> the CFG data prediction of x at sigmas[i] (the prompt of the composite)."""
InversionDenoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""(x batch, sigma (1,)) -> the data prediction of every row of x under the inversion's conditioning."""
Energy = Callable[[torch.Tensor], "K.EnergyTerms"]
"""The composite's predicted clean latent -> EnergyTerms (its `total` is differentiated)."""
InputScale = Callable[[float, float], float]


@dataclass
class TALEReport:
    """What one composition did (for the log and for tests)."""

    passes: dict = field(default_factory=lambda: {"cfg": 0, "inversion": 0, "grad": 0})
    """Composite denoiser calls (gradient passes included), inversion/trajectory rows, gradient passes."""
    energies: dict = field(default_factory=dict)
    """Step -> list of energy totals before each inner update."""
    terms: dict = field(default_factory=dict)
    background: dict = field(default_factory=dict)
    """Step -> background latent used at that step (T'..T'+tau)."""
    foreground: dict = field(default_factory=dict)
    composites: dict = field(default_factory=dict)
    """Step -> composite after re-blend + AdaIN, before the optimisation (trace=True)."""
    optimised: dict = field(default_factory=dict)
    """Step -> composite after the optimisation, before the solver step (trace=True)."""

    def summary(self) -> str:
        e = " ".join(f"{i}:" + ">".join(f"{v:.4g}" for v in vals) for i, vals in sorted(self.energies.items()))
        return (f"model passes: {self.passes['cfg']} CFG (of which {self.passes['grad']} with gradients), "
                f"{self.passes['inversion']} inversion/trajectory rows; energy before each inner step: {e or 'none'}")


class NonFiniteGradient(ValueError):
    """The energy's gradient holds NaN/Inf at `step`."""

    def __init__(self, step: int):
        super().__init__(f"the energy gradient at step {step} is not finite")
        self.step = step


def invert_to(den_inv: InversionDenoiser, latent: torch.Tensor, sigmas: torch.Tensor, stop: int,
              input_scale: Optional[InputScale] = None, tick: Optional[Callable[[], None]] = None
              ) -> dict[int, torch.Tensor]:
    """Inversion of a clean latent along the sampling schedule, from sigmas[-1] (= 0) up to sigmas[stop]:
    {index: latent at sigmas[index]} for every index stop..len(sigmas)-1.

    The single place that decides which inversion is used: the pack's shared DDIM inversion (no ReNoise), guided
    by `den_inv` (the reference inverts with a null prompt at an inert CFG)."""
    n = len(sigmas) - 1

    def denoise(x: torch.Tensor, sigma: float) -> torch.Tensor:
        return den_inv(x, torch.full((1,), sigma, device=x.device, dtype=torch.float32))

    def on_step(i, x, d):
        if tick is not None:
            tick()

    result = invert_kernel(denoise, latent, sigmas[stop:], InversionParams(), input_scale, on_step)
    return {n - k: state for k, state in enumerate(result.trajectory)}


def _schedule(p: "K.TALEParams") -> tuple:
    """(replay, reblend, stale, window, last_bg, inner, stop): how `compose` walks the schedule for these params."""
    T = p.t_prime
    replay = p.trajectories == "replay"
    reblend = p.history == "reblend" and T > 0
    stale = p.history == "reference" and T > 0
    window = list(p.window())
    last_bg = window[-1] if window else T
    inner = p.inner_steps if p.optimising else 0
    stop = 0 if (replay or stale) else T - int(reblend)
    return replay, reblend, stale, window, last_bg, inner, stop


def total_ticks(params: "K.TALEParams", n: int) -> int:
    """Progress ticks of `compose` over a schedule of n steps (inversion, replay, discarded composite, composite
    steps, inner steps)."""
    T = params.t_prime
    replay, reblend, stale, window, last_bg, inner, stop = _schedule(params)
    return (n - stop) + (last_bg if replay else 0) + (T if stale else 0) + (n - T) + len(window) * inner


def optimise_step(x: torch.Tensor, i: int, den_cfg: CompositeDenoiser, energy: Energy, mask: torch.Tensor,
                  report: TALEReport) -> torch.Tensor:
    """One energy-guided update of the composite at step i: x - dE/dx inside the object (step size 1). The
    gradient is taken outside inference mode on a detached copy; the result is detached."""
    with torch.inference_mode(False), torch.enable_grad():
        x_g = x.detach().clone().requires_grad_(True)
        den = den_cfg(x_g, i)
        report.passes["grad"] += 1
        terms = energy(den)
        if terms.total.requires_grad:
            grad, = torch.autograd.grad(terms.total, x_g)
        else:
            grad = torch.zeros_like(x_g)
        if not bool(torch.isfinite(grad).all()):
            raise NonFiniteGradient(i)
        report.energies.setdefault(i, []).append(float(terms.total.detach()))
        report.terms.setdefault(i, []).append((terms.text, terms.style))
        return K.masked_gradient_step(x_g.detach(), grad.detach(), mask.to(x.device))


def compose(params: "K.TALEParams", background: torch.Tensor, foreground: torch.Tensor, mask: torch.Tensor,
            sigmas: torch.Tensor, den_cfg: CompositeDenoiser, den_inv: InversionDenoiser,
            input_scale: Optional[InputScale] = None, energy: Optional[Energy] = None,
            report: Optional[TALEReport] = None, trace: bool = False, tick: Optional[Callable[[], None]] = None,
            callback: Optional[Callable[[int, torch.Tensor, torch.Tensor, int], None]] = None) -> torch.Tensor:
    """The composite latent at the end of the schedule.

    background, foreground: clean latents (1, C, h, w) (the object placed on a background-sized canvas);
    mask: (h, w) boolean latent mask of the placed object; sigmas: the sampling schedule (n + 1 values, last 0).
    `energy` is needed only when params.optimising. `tick()` is called once per unit of work (`total_ticks`; the
    place to check for interrupts), `callback(i, denoised, x, n)` after each composite prediction."""
    p = params
    report = TALEReport() if report is None else report
    device = background.device
    mask = mask.to(device)
    n = len(sigmas) - 1
    T = p.t_prime
    if p.optimising and energy is None:
        raise ValueError("params take energy gradient steps, but no energy was given")

    def tick_():
        if tick is not None:
            tick()

    def den_c(x, i):
        report.passes["cfg"] += 1
        return den_cfg(x, i)

    def den_i(x, sigma):
        report.passes["inversion"] += x.shape[0]
        return den_inv(x, sigma)

    def step(x, den, old, i):
        if p.solver == "euler":
            return K.euler_step(x, den, sigmas[i], sigmas[i + 1])
        return K.dpmpp_2m_step(x, den, old, sigmas[i - 1] if i > 0 else None, sigmas[i], sigmas[i + 1])

    replay, reblend, stale, window, last_bg, inner, stop = _schedule(p)
    # ---- inversion (+ replay) of background and foreground
    pair = torch.cat([background, foreground.to(device)])
    states = invert_to(den_i, pair, sigmas, stop, input_scale, tick_)
    bg_at = {i: s[:1] for i, s in states.items()}
    fg_at = {i: s[1:] for i, s in states.items()}
    if replay:
        x, old = states[0], None
        for i in range(0, last_bg):
            den = den_i(x, sigmas[i].reshape(1).float())
            x = step(x, den, old, i)
            old = den
            bg_at[i + 1], fg_at[i + 1] = x[:1], x[1:]
            tick_()
    old = None
    if stale:  # the released code: a composite pasted at step 0, denoised until T', then discarded
        xc = K.paste(bg_at[0], fg_at[0], mask)
        for i in range(T):
            dc = den_c(xc, i)
            xc = step(xc, dc, old, i)
            old = dc
            tick_()
    # ---- selective initiation at T' (otherwise nothing of the composite is computed before)
    x = K.paste(bg_at[T], fg_at[T], mask)
    if reblend:
        d_bg = den_c(bg_at[T - 1], T - 1)
        d_fg = den_c(fg_at[T - 1], T - 1)
        old = K.paste(d_bg, d_fg, mask)
    report.background.update({i: bg_at[i] for i in [T] + window})
    report.foreground[T] = fg_at[T]
    alphas = K.adain_weights(p.tau, p.adain_max)
    for i in range(T, n):
        if i in window:
            x = K.keep_object(x, bg_at[i], mask)
            x = K.adain_blend(x, bg_at[i], mask, alphas[i - T - 1])
            if trace:
                report.composites[i] = x.clone()
            for _ in range(inner):
                x = optimise_step(x, i, den_c, energy, mask, report)
                tick_()
            if trace:
                report.optimised[i] = x.clone()
        den = den_c(x, i)
        if callback is not None:
            callback(i, den, x, n)
        x = step(x, den, old, i)
        old = den
        tick_()
    return x
