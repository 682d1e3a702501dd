"""Adaptive Guidance (Castillo et al., "Adaptive Guidance: Training-free Acceleration of Conditional
Diffusion Models", arXiv 2312.12487, AAAI 2025).

Rule: gamma_t = cos(pred_cond, pred_uncond). While gamma_t < threshold, CFG runs as usual; once a
sample's gamma reaches the threshold it "latches" and the rest of its trajectory uses the conditional
prediction alone, so the unconditional pass can be skipped.

Pure torch, no host imports. Predictions are denoised (x0) tensors, as every diffusion host that
uses k-diffusion conventions hands them over; the `eps` space is `x - D`, which is sigma*eps for eps
models and sigma*v for flow models (sigma cancels in the cosine).
"""
from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass

import torch

SPACES = ("x0", "eps")
DECISIONS = ("per_sample", "batch")
CROSSING_RULES = ("cond", "cfg")


@dataclass(frozen=True)
class AdaptiveGuidanceParams:
    """Single source of defaults for the AG kernel and both AG nodes."""

    threshold: float = 0.995
    """gamma-bar: latch once cos(cond, uncond) >= this; 1.0 never latches. Paper (eps space): 0.991-0.996."""
    space: str = "x0"
    """`x0`: cosine of the denoised predictions (calibrates smoothly); `eps`: of x - D (the paper's)."""
    start_percent: float = 0.0
    """No latch before this fraction of the schedule; 1.0 never latches (plain CFG)."""
    decision: str = "per_sample"
    """`per_sample`: each image latches on its own cosine; `batch`: one cosine over the whole batch."""
    crossing_step: str = "cond"
    """On the step where gamma crosses: `cond` (paper: use the cond prediction already) or `cfg`
    (the existing ComfyUI port: still apply CFG, skip from the next step)."""

    interval_start: float = 0.0
    """Guidance interval (Kynkäänniemi et al., arXiv 2404.07724): CFG only from this fraction of the schedule on."""
    interval_end: float = 1.0
    """... and up to this fraction; conditional-only outside. (0, 1) = the whole schedule (neutral)."""

    def validate(self) -> list[str]:
        """Problems with these values, one message each (empty when valid)."""
        problems = []
        if not 0.0 <= self.interval_start <= self.interval_end <= 1.0:
            problems.append(f"the guidance interval must satisfy 0 <= interval_start <= interval_end <= 1, got "
                            f"{self.interval_start}–{self.interval_end}")
        if not 0.0 <= self.threshold <= 1.0:
            problems.append(f"threshold must be in [0, 1], got {self.threshold}")
        if not 0.0 <= self.start_percent <= 1.0:
            problems.append(f"start_percent must be in [0, 1], got {self.start_percent}")
        if self.space not in SPACES:
            problems.append(f"space must be one of {SPACES}, got {self.space!r}")
        if self.decision not in DECISIONS:
            problems.append(f"decision must be one of {DECISIONS}, got {self.decision!r}")
        if self.crossing_step not in CROSSING_RULES:
            problems.append(f"crossing_step must be one of {CROSSING_RULES}, got {self.crossing_step!r}")
        return problems

    def replace(self, **changes) -> "AdaptiveGuidanceParams":
        return dataclasses.replace(self, **changes)


def in_space(x: torch.Tensor, denoised: torch.Tensor, space: str) -> torch.Tensor:
    """The prediction in which the cosine is measured, in fp32."""
    if space == "x0":
        return denoised.float()
    if space == "eps":
        return x.float() - denoised.float()
    raise ValueError(f"unknown space {space!r}; expected one of {SPACES}")


def per_sample_cosine(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Cosine similarity of each sample's flattened tensors, shape (B,), fp32."""
    a = a.float().flatten(1)
    b = b.float().flatten(1)
    dot = (a * b).sum(dim=1)
    norms = a.norm(dim=1) * b.norm(dim=1)
    return dot / norms.clamp_min(eps)


def batch_cosine(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """One cosine over the whole flattened batch, broadcast to shape (B,)."""
    gamma = per_sample_cosine(a.reshape(1, -1), b.reshape(1, -1), eps)
    return gamma.expand(a.shape[0])


def cfg_combine(cond: torch.Tensor, uncond: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance in the host's convention: uncond + (cond - uncond) * scale."""
    return uncond + (cond - uncond) * scale


@dataclass
class EvaluationRecord:
    step: int
    """Index in the run's schedule; -1 while `sigma` is still a device scalar (see AdaptiveGuidanceTracker)."""
    sigma: float
    gamma: list[float] | None
    """Cosine of each image whose uncond was computed (in row order), or None when no uncond was computed."""
    uncond_rows: int
    """Images whose unconditional prediction the model computed in this evaluation."""
    batch: int
    estimated: bool = False
    """The uncond was estimated (LinearAG) instead of computed."""
    reason: str = ""
    """Why no uncond was computed: "latched", "estimated", "cond_only" (LinearAG's schedule) or "interval"."""

    @property
    def uncond_computed(self) -> bool:
        return self.uncond_rows > 0


def at_most(value: torch.Tensor, bound: float) -> torch.Tensor:
    """`value <= bound` computed on the tensor's device, with the answer the host gives for float(value) <= bound
    (float64): the bound is moved to the largest float32 at or below it instead of rounded to the nearest."""
    if value.dtype == torch.float64:
        return value <= bound
    return value.float() <= float32_at_most(bound)


@functools.lru_cache(maxsize=64)
def float32_at_most(bound: float) -> float:
    """The largest float32 at or below `bound`."""
    below = torch.tensor(bound, dtype=torch.float32)
    if float(below) > bound:
        below = torch.nextafter(below, torch.tensor(float("-inf")))
    return float(below)


def nearest_steps(sigmas, schedule: torch.Tensor | None) -> list[int]:
    """Index of the entry of `schedule` (CPU sigmas) nearest to each of `sigmas` (floats), in float32 as the
    schedule; multistage samplers' intermediate sigmas map to the nearest step. -1 without a schedule."""
    if schedule is None or len(schedule) == 0:
        return [-1] * len(sigmas)
    values = torch.as_tensor(sigmas, dtype=torch.float32).reshape(-1, 1)
    return (schedule.float().reshape(1, -1) - values).abs().argmin(dim=1).tolist()


@dataclass
class _Pending:
    """What one observe() left on the device for the host: read back together, at the next decision."""
    record: EvaluationRecord
    gamma: torch.Tensor
    newly_latched: torch.Tensor | None
    """None when no image could latch in that evaluation (the flags are known on the host)."""


class AdaptiveGuidanceTracker:
    """Per-run latch state. One instance per sampling run; never shared between runs.

    The hot path never waits for the GPU on its own: observe() leaves the cosines and the latch flags on the
    device, and they are read back in one transfer when the host next needs them (`settle`: the decision of the
    next evaluation, or the report). `sigma` may be handed over as a device scalar (the sampler's timestep) when
    no decision needs its value; records then resolve it, and their step in `schedule`, when they settle."""

    def __init__(self, params: AdaptiveGuidanceParams, schedule: torch.Tensor | None = None):
        self.params = params
        self.schedule = None if schedule is None else schedule.detach().float().flatten().cpu()
        """The run's sigmas (for the steps of records whose sigma was a device scalar)."""
        self.latched: torch.Tensor | None = None
        """Per-image latch flags on the device of the predictions."""
        self._latched_host: list[bool] | None = None
        """The same flags on the host, as of the last `settle`."""
        self._records: list[EvaluationRecord] = []
        self._latch_step: dict[int, int] = {}
        self._pending: list[_Pending] = []
        self._lazy_sigmas: list[tuple[EvaluationRecord, torch.Tensor]] = []

    @property
    def records(self) -> list[EvaluationRecord]:
        self.settle()
        return self._records

    @property
    def latch_step(self) -> dict[int, int]:
        """Image index -> the step at which it latched."""
        self.settle()
        return self._latch_step

    def settle(self, flags_only: bool = False) -> None:
        """Read back, in one transfer, everything observe() and skip() left on the device. `flags_only`: only
        when latch flags are pending (a decision; the sigmas of skipped evaluations wait for the report)."""
        flags_pending = any(item.newly_latched is not None for item in self._pending)
        if not flags_pending and (flags_only or not (self._pending or self._lazy_sigmas)):
            return
        pending, self._pending = self._pending, []
        lazy, self._lazy_sigmas = self._lazy_sigmas, []
        parts = [sigma.float().reshape(1) for _, sigma in lazy]
        for item in pending:
            parts.append(item.gamma.float().flatten())
            if item.newly_latched is not None:
                parts.append(item.newly_latched.float().flatten())
        if flags_pending:
            parts.append(self.latched.float().flatten())
        device = parts[0].device
        values = torch.cat([p.to(device) for p in parts]).cpu().tolist()
        for record, sigma, step in zip((record for record, _ in lazy), values, nearest_steps(values[:len(lazy)],
                                                                                            self.schedule)):
            record.sigma, record.step = sigma, step
        at = len(lazy)
        for item in pending:
            n = item.gamma.numel()
            m = 0 if item.newly_latched is None else item.newly_latched.numel()
            item.record.gamma = values[at:at + n]
            for i, flag in enumerate(values[at + n:at + n + m]):
                if flag:
                    self._latch_step[i] = item.record.step
            at += n + m
        if flags_pending:
            self._latched_host = [flag > 0.5 for flag in values[at:]]

    def _record(self, step: int | None, sigma, gamma, uncond_rows: int, batch: int, estimated: bool = False,
                reason: str = "") -> EvaluationRecord:
        lazy = isinstance(sigma, torch.Tensor)
        record = EvaluationRecord(-1 if step is None or lazy else step, float("nan") if lazy else float(sigma),
                                  gamma, uncond_rows, batch, estimated, reason)
        if lazy:
            self._lazy_sigmas.append((record, sigma.detach().reshape(()).clone()))
        self._records.append(record)
        return record

    def _latched_flags(self, batch: int) -> list[bool] | None:
        """The latch flags on the host (settled), when they belong to a batch of this size."""
        if self.latched is None or self.latched.shape[0] != batch:
            return None
        self.settle(flags_only=True)
        return self._latched_host

    def all_latched(self, batch: int) -> bool:
        flags = self._latched_flags(batch)
        return flags is not None and all(flags)

    def open_rows(self, batch: int) -> torch.Tensor | None:
        """Indices (CPU, int64) of the images that have not latched when some have and some have not; None when
        no image has latched (the whole batch needs its uncond) or every image has."""
        flags = self._latched_flags(batch)
        if flags is None or all(flags) or not any(flags):
            return None
        return torch.tensor([i for i, flag in enumerate(flags) if not flag], dtype=torch.int64)

    def skip(self, step: int | None, sigma, batch: int, estimated: bool = False, reason: str = "") -> None:
        """Record an evaluation whose uncond pass was not computed (skipped, or estimated by LinearAG). `sigma`: a
        float, or the evaluation's timestep as a device scalar (read back later, with `step` then found)."""
        reason = reason or ("estimated" if estimated else "latched")
        self._record(step, sigma, None, 0, batch, estimated, reason)

    def hand_on(self, cond: torch.Tensor, uncond: torch.Tensor) -> torch.Tensor:
        """The uncond to hand on when the uncond pass was not run: cond for latched samples."""
        flags = self._latched_flags(cond.shape[0])
        if flags is None or not any(flags):
            return uncond
        return torch.where(self.latched.to(cond.device).view(-1, *([1] * (cond.dim() - 1))), cond, uncond)

    def _crossed(self, gamma: torch.Tensor, measured, batch: int, step: int | None,
                 latch_allowed) -> torch.Tensor | None:
        """Device flags of the images whose gamma reached the threshold in this evaluation (None: none can).
        `latch_allowed`: a bool, or a device bool scalar (decided on the device, never read back here)."""
        if latch_allowed is False or self.params.threshold >= 1.0:  # 1.0 is neutral: fp32 cosines of near-equal
            return None                                               # predictions round to 1.0 late in a run
        crossed = torch.zeros_like(self.latched)
        reached = gamma >= self.params.threshold
        if isinstance(latch_allowed, torch.Tensor):
            reached = reached & latch_allowed.to(reached.device)
        crossed[measured] = reached
        return crossed

    def observe(self, x: torch.Tensor, cond: torch.Tensor, uncond: torch.Tensor, step: int | None, sigma,
                latch_allowed, rows: torch.Tensor | None = None) -> torch.Tensor:
        """Measure gamma for one evaluation where the uncond pass ran, update the latch, and return the
        uncond prediction to hand on: the real one, or the cond one for latched samples, so that any
        CFG formula downstream reduces to the cond prediction for them. Inputs are not modified; nothing is
        read back to the host here (see `settle`).

        `rows`: the images whose uncond was computed (the others have latched and carry cond as uncond);
        None = every image. `sigma`: a float or the timestep as a device scalar (see `skip`). `latch_allowed`: a
        bool, or a device bool scalar (see `_crossed`)."""
        batch = cond.shape[0]
        if self.latched is None or self.latched.shape[0] != batch:
            self.latched = torch.zeros(batch, dtype=torch.bool, device=cond.device)
            self._latched_host = [False] * batch
        measured = slice(None) if rows is None else rows.to(cond.device, non_blocking=True)
        a = in_space(x[measured], cond[measured], self.params.space)
        b = in_space(x[measured], uncond[measured], self.params.space)
        gamma = per_sample_cosine(a, b) if self.params.decision == "per_sample" else batch_cosine(a, b)
        n_rows = batch if rows is None else int(rows.numel())
        record = self._record(step, sigma, None, n_rows, batch)

        previously = self.latched
        known_open = not self._pending and self._latched_host is not None and not any(self._latched_host)
        crossed = self._crossed(gamma, measured, batch, step, latch_allowed)
        if crossed is not None:
            self.latched = previously | crossed
        self._pending.append(_Pending(record, gamma.detach(), None if crossed is None else self.latched & ~previously))
        use_cond = previously if crossed is None or self.params.crossing_step != "cond" else self.latched
        if use_cond is previously and known_open:  # nothing has latched: the real uncond, as it is
            return uncond
        return torch.where(use_cond.view(-1, *([1] * (cond.dim() - 1))), cond, uncond)

    def model_passes(self) -> tuple[int, int]:
        """(passes run, passes plain CFG would have run), counted per sample."""
        run = sum(r.batch + r.uncond_rows for r in self._records)
        full = sum(r.batch * 2 for r in self._records)
        return run, full

    def gamma_by_step(self) -> dict[int, list[float]]:
        """The first measured gamma per step (multistage samplers evaluate a step more than once)."""
        out: dict[int, list[float]] = {}
        for r in self.records:
            if r.gamma is not None and r.step not in out:
                out[r.step] = r.gamma
        return out

    def summary(self) -> str:
        run, full = self.model_passes()
        saved = 0.0 if full == 0 else 100.0 * (full - run) / full
        gammas = " ".join(f"{s}:{min(g):.4f}" for s, g in sorted(self.gamma_by_step().items()))
        latch = ", ".join(f"sample {i} at step {s}" for i, s in sorted(self.latch_step.items())) or "never"
        estimated = sorted({r.step for r in self.records if r.estimated})
        estimated_text = f"uncond estimated at steps {estimated}; " if estimated else ""
        outside = sorted({r.step for r in self.records if r.reason == "interval"})
        if outside:
            estimated_text += f"cond only outside the guidance interval at steps {outside}; "
        return (f"space={self.params.space} threshold={self.params.threshold} decision={self.params.decision}; "
                f"min gamma per step: {gammas or '-'}; latched: {latch}; {estimated_text}"
                f"model passes {run} of {full} ({saved:.1f}% saved)")


def lanes_summary(lanes: list[tuple[str, AdaptiveGuidanceTracker]]) -> str:
    """The report of a run whose evaluations were split into lanes (one tracker per context window): one
    tracker's summary per lane, then the passes of all lanes together. A single unnamed lane reports as is."""
    if len(lanes) == 1 and not lanes[0][0]:
        return lanes[0][1].summary()
    run = sum(tracker.model_passes()[0] for _, tracker in lanes)
    full = sum(tracker.model_passes()[1] for _, tracker in lanes)
    saved = 0.0 if full == 0 else 100.0 * (full - run) / full
    parts = [f"[{label}] {tracker.summary()}" for label, tracker in lanes]
    return f"{len(lanes)} context windows: " + " | ".join(parts) + \
        f" | all windows: model passes {run} of {full} ({saved:.1f}% saved)"
