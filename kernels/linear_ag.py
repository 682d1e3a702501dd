"""LinearAG (Castillo et al., arXiv 2312.12487, the paper's second method): early in sampling the
unconditional prediction is close to an affine function of past score estimates, so on some steps it
is estimated instead of computed.

The paper gives no code and few details; our reconstruction (documented in the README):
* Space: score estimates eps = (x - D) / sigma (noise for eps models, velocity for flow models).
* Regressors at step t: eps_c(t) and, for k = 1..min(K, t), eps_c(t-k) and eps_u(t-k) (the values handed
  on at those steps), plus a constant: target eps_u(t). One coefficient set per step, least squares over
  all pixels of the recorded trajectories (streamed as normal equations, so no trajectory is stored).
* Schedule (the paper's): step 0 is always computed; in the first `estimate_until` fraction of the steps
  every other step (odd steps) is estimated; after that the run is conditional-only (`after="cond_only"`),
  or follows Adaptive Guidance's latch rule (`after="adaptive"`). Adaptive Guidance's latch also applies
  throughout.
* Online variants that need no fitting, also in score space: hold the last computed guidance delta
  (eps_u = eps_c - delta_last) or extrapolate it linearly from the last two computed deltas. (Holding the
  denoised-space delta instead is far worse: the benchmark measures both.)

Pure torch, no host imports.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch

from .adaptive_guidance import AdaptiveGuidanceParams

ESTIMATORS = ("fitted", "hold_delta", "extrapolate_delta", "previous_uncond", "off")
AFTER_RULES = ("cond_only", "adaptive")


@dataclass(frozen=True)
class LinearAGParams:
    """Single source of defaults for the LinearAG kernel and nodes."""

    estimator: str = "extrapolate_delta"
    """fitted: the per-step regression (the paper's; needs coefficients recorded and fitted first);
    hold_delta / extrapolate_delta: online, no fitting; previous_uncond: reuse the last uncond (a baseline);
    off: plain Adaptive Guidance. The default is the online estimator the pack's benchmark favours (BENCHMARKS.md:
    the lowest one-step error of the estimators that need no fit, 0.157 vs hold_delta's 0.202, and the highest
    SSIM to CFG of the paper-schedule rows at the same 37.5% saving), so the node runs with nothing connected."""
    estimate_until: float = 0.5
    """Fraction of the steps in which odd steps are estimated (the paper: the first half)."""
    after: str = "cond_only"
    """After the estimated part: `cond_only` (the paper) or `adaptive` (Adaptive Guidance's latch rule)."""
    history: int = 2
    """K, past steps used by the fitted regression."""
    ridge: float = 1e-6
    """Relative Tikhonov term of the least-squares fit (keeps it solvable when regressors coincide)."""
    guidance: AdaptiveGuidanceParams = AdaptiveGuidanceParams()
    """The latch rule that takes over after the estimated part (and whenever a sample latches)."""

    def validate(self) -> list[str]:
        problems = list(self.guidance.validate())
        if self.estimator not in ESTIMATORS:
            problems.append(f"estimator must be one of {ESTIMATORS}, got {self.estimator!r}")
        if self.after not in AFTER_RULES:
            problems.append(f"after must be one of {AFTER_RULES}, got {self.after!r}")
        if not 0.0 <= self.estimate_until <= 1.0:
            problems.append(f"estimate_until must be in [0, 1], got {self.estimate_until}")
        if not 1 <= self.history <= 8:
            problems.append(f"history must be in [1, 8], got {self.history}")
        if self.ridge < 0:
            problems.append(f"ridge must be >= 0, got {self.ridge}")
        return problems

    def replace(self, **changes) -> "LinearAGParams":
        return dataclasses.replace(self, **changes)


def is_estimated_step(step: int, total_steps: int, estimate_until: float) -> bool:
    """Odd steps inside the first `estimate_until` fraction of the run (step 0 is always computed)."""
    return step > 0 and step % 2 == 1 and step < estimate_until * total_steps


def to_score(x: torch.Tensor, denoised: torch.Tensor, sigma: float) -> torch.Tensor:
    return (x.float() - denoised.float()) / sigma


def from_score(x: torch.Tensor, score: torch.Tensor, sigma: float) -> torch.Tensor:
    return x.float() - score * sigma


def final_mode(params: "LinearAGParams", step: int, total_steps: int) -> str | None:
    """The mode of this step when every later step has it too (the schedule is over), else None."""
    if params.estimator == "off" or step >= params.estimate_until * total_steps:
        return step_mode(params, step, total_steps)
    return None


def step_mode(params: "LinearAGParams", step: int, total_steps: int) -> str:
    """"estimate", "cond_only" or "compute" for this step under the LinearAG schedule."""
    if params.estimator == "off":
        return "compute"
    if is_estimated_step(step, total_steps, params.estimate_until):
        return "estimate"
    if params.after == "cond_only" and step >= params.estimate_until * total_steps:
        return "cond_only"
    return "compute"


def feature_count(history: int) -> int:
    return 2 + 2 * history  # eps_c(t), k x (eps_c, eps_u), constant


def features(eps_cond: torch.Tensor, past: list[tuple[torch.Tensor, torch.Tensor]], k: int) -> torch.Tensor:
    """Design matrix rows, one per latent element: (N, 2 + 2k) in fp32. `past` is newest first, (eps_c, eps_u)."""
    if len(past) < k:
        raise ValueError(f"need {k} past steps, have {len(past)}")
    cols = [eps_cond.flatten()]
    for c, u in past[:k]:
        cols += [c.flatten(), u.flatten()]
    cols.append(torch.ones_like(cols[0]))
    return torch.stack(cols, dim=1).float()


@dataclass
class NormalEquations:
    """Streaming least-squares statistics for one step: G = A^T A, b = A^T y (fp64)."""

    gram: torch.Tensor
    rhs: torch.Tensor
    rows: int = 0

    @classmethod
    def empty(cls, n_features: int) -> "NormalEquations":
        return cls(torch.zeros(n_features, n_features, dtype=torch.float64),
                   torch.zeros(n_features, dtype=torch.float64))

    def add(self, design: torch.Tensor, target: torch.Tensor) -> None:
        a = design.double().cpu()
        y = target.flatten().double().cpu()
        self.gram += a.T @ a
        self.rhs += a.T @ y
        self.rows += a.shape[0]

    def solve(self, ridge: float) -> torch.Tensor:
        scale = float(self.gram.diagonal().mean()) or 1.0
        eye = torch.eye(self.gram.shape[0], dtype=torch.float64)
        return torch.linalg.solve(self.gram + ridge * scale * eye, self.rhs)


@dataclass
class TrajectoryStats:
    """Per-step normal equations gathered from full-CFG runs with one schedule."""

    history: int
    steps: int
    equations: dict[int, NormalEquations] = field(default_factory=dict)
    trajectories: int = 0

    def add_step(self, step: int, eps_cond, eps_uncond, past) -> None:
        """Add one step of full-CFG predictions; `past` holds the previous steps, newest first."""
        k = min(self.history, step, len(past))
        if step < 1 or step >= self.steps or k < 1:
            return
        eq = self.equations.setdefault(step, NormalEquations.empty(feature_count(k)))
        for i in range(eps_cond.shape[0]):  # per sample: each sample's own history
            eq.add(features(eps_cond[i], [(c[i], u[i]) for c, u in past], k), eps_uncond[i])

    def fit(self, ridge: float) -> tuple[torch.Tensor, torch.Tensor]:
        """(coefficients [steps, 2 + 2K] fp32, zero-padded where a step has k < K; fitted-mask [steps])."""
        coefficients = torch.zeros(self.steps, feature_count(self.history))
        fitted = torch.zeros(self.steps, dtype=torch.bool)
        for step, eq in self.equations.items():
            solution = eq.solve(ridge).float()
            coefficients[step, :len(solution)] = solution
            fitted[step] = True
        return coefficients, fitted


def history_at(step: int, history: int) -> int:
    """k used at a step: min(K, step)."""
    return min(history, step)


class UncondEstimator:
    """Per-run history of what was handed on, and the estimates. One instance per sampling run."""

    def __init__(self, params: LinearAGParams, coefficients: torch.Tensor | None = None,
                 fitted: torch.Tensor | None = None):
        self.params = params
        self.coefficients = coefficients
        self.fitted = fitted
        self.past: list[tuple[torch.Tensor, torch.Tensor]] = []  # newest first, score space
        self.deltas: list[torch.Tensor] = []  # newest first, computed steps only, score space
        self.last_uncond: torch.Tensor | None = None

    def mode(self, step: int, total_steps: int) -> str:
        return step_mode(self.params, step, total_steps)

    def final_mode(self, step: int, total_steps: int) -> str | None:
        return final_mode(self.params, step, total_steps)

    def can_estimate(self, step: int, batch: int) -> bool:
        p = self.params
        if p.estimator == "off" or not self.deltas or self.deltas[0].shape[0] != batch:
            return False
        if p.estimator == "fitted":
            return (self.coefficients is not None and step < self.coefficients.shape[0]
                    and bool(self.fitted[step]) and len(self.past) >= history_at(step, p.history))
        if p.estimator == "extrapolate_delta":
            return len(self.deltas) >= 1
        return True

    def record(self, x, cond, uncond, sigma: float, computed: bool) -> None:
        """Remember a step's predictions (the uncond as handed on)."""
        self.past.insert(0, (to_score(x, cond, sigma), to_score(x, uncond, sigma)))
        del self.past[self.params.history:]
        if computed:
            self.deltas.insert(0, self.past[0][0] - self.past[0][1])
            del self.deltas[2:]
        self.last_uncond = uncond

    def estimate(self, x, cond, step: int, sigma: float) -> torch.Tensor:
        p = self.params
        if p.estimator == "fitted":
            eps_c = to_score(x, cond, sigma)
            k = history_at(step, p.history)
            coef = self.coefficients[step, :feature_count(k)].to(eps_c.device)
            out = torch.empty_like(eps_c)
            for i in range(eps_c.shape[0]):
                design = features(eps_c[i], [(c[i], u[i]) for c, u in self.past], k)
                out[i] = (design @ coef).view_as(eps_c[i])
            return from_score(x, out, sigma).to(cond.dtype)
        if p.estimator in ("hold_delta", "extrapolate_delta"):
            delta = self.deltas[0]
            if p.estimator == "extrapolate_delta" and len(self.deltas) >= 2:
                delta = 2 * self.deltas[0] - self.deltas[1]
            return from_score(x, to_score(x, cond, sigma) - delta, sigma).to(cond.dtype)
        if p.estimator == "previous_uncond":
            return self.last_uncond.to(cond.dtype)
        raise ValueError(f"estimator {p.estimator!r} does not estimate")
