"""Sampling harness of the CPU benchmark: runs a method through ComfyUI's own sampling paths (KSampler via
`nodes.common_ksampler`, or SamplerCustomAdvanced with a guider), counts every network row with an APPLY_MODEL
wrapper, records the cond/uncond cosine per step, and implements the benchmark-only "hold the last guidance
delta" AG variant."""
from __future__ import annotations

import importlib

import logging
import re
import time
from dataclasses import dataclass, field

import torch

import comfy.patcher_extension
import comfy.samplers
import comfy.utils
comfy_nodes = importlib.import_module("nodes")  # ComfyUI's own top-level nodes module

from ..kernels.adaptive_guidance import AdaptiveGuidanceParams, in_space, per_sample_cosine
from ..nodes import adapters
from ..nodes.adaptive_guidance import apply_adaptive_guidance

logger = logging.getLogger("tfg.benchmarks")

COUNTER_KEY = "tfg.benchmarks.counter"
RECORDER_KEY = "tfg.benchmarks.gamma_recorder"
DELTA_KEY = "tfg.benchmarks.hold_delta"


# ------------------------------------------------------------------------------------------------
# Counting and recording
# ------------------------------------------------------------------------------------------------
@dataclass
class PassCounter:
    """Network rows per pass kind, counted at APPLY_MODEL (what the hardware actually computed)."""
    cond: int = 0
    uncond: int = 0
    calls: int = 0

    @property
    def rows(self) -> int:
        return self.cond + self.uncond

    def wrapper(self, executor, x, t, *args, **kwargs):
        transformer_options = kwargs.get("transformer_options", args[3] if len(args) > 3 else {})
        kinds = transformer_options.get("cond_or_uncond", [0])
        per_chunk = x.shape[0] // max(len(kinds), 1)
        for k in kinds:
            if k == 1:
                self.uncond += per_chunk
            else:
                self.cond += per_chunk
        self.calls += 1
        return executor(x, t, *args, **kwargs)


def with_counter(model, counter: PassCounter):
    m = model.clone()
    m.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, COUNTER_KEY, counter.wrapper)
    return m


@dataclass
class GammaRecorder:
    """Per-step, per-sample cosine between the cond and uncond predictions, in both spaces (x0 and eps).
    Install on a plain CFG model: it reads, never changes, the predictions."""
    x0: dict[int, list[float]] = field(default_factory=dict)
    eps: dict[int, list[float]] = field(default_factory=dict)
    sigma: dict[int, float] = field(default_factory=dict)

    def wrapper(self, executor, base_model, conds, x, timestep, model_options):
        out = executor(base_model, conds, x, timestep, model_options)
        if len(conds) == 2 and conds[1] is not None and out[1] is not None:
            step = adapters.step_index(timestep, adapters.sample_sigmas_of(model_options))
            for space, store in (("x0", self.x0), ("eps", self.eps)):
                g = per_sample_cosine(in_space(x, out[0], space), in_space(x, out[1], space))
                store.setdefault(step, []).extend(g.tolist())
            self.sigma[step] = float(timestep.flatten()[0])
        return out


# ------------------------------------------------------------------------------------------------
# The "hold the last guidance delta" variant (benchmark-only)
# ------------------------------------------------------------------------------------------------
class HoldDelta:
    """Outer CALC_COND_BATCH wrapper around an AG-patched model: where AG hands on the cond prediction as
    the uncond one (a latched sample), substitute `cond - delta`, delta being that sample's last measured
    cond - uncond. So CFG keeps adding (cfg - 1) * delta after the latch instead of dropping guidance, at the
    same evaluation count.

    mode "x0": the delta of the denoised predictions is held as is.
    mode "eps": the noise-space delta is held, i.e. the x0 delta is rescaled by sigma_now / sigma_measured.
    """

    def __init__(self, mode: str = "x0"):
        if mode not in ("x0", "eps"):
            raise ValueError(mode)
        self.mode = mode
        self.reset()

    def reset(self):
        self.delta: torch.Tensor | None = None
        self.delta_sigma: torch.Tensor | None = None

    def wrapper(self, executor, base_model, conds, x, timestep, model_options):
        out = executor(base_model, conds, x, timestep, model_options)
        if len(out) != 2 or out[0] is None or out[1] is None:
            return out
        cond, uncond = out
        sigma = float(timestep.flatten()[0])
        batch = cond.shape[0]
        handed_on = torch.tensor([torch.equal(cond[i], uncond[i]) for i in range(batch)])
        if self.delta is None or self.delta.shape[0] != batch:
            self.delta = torch.zeros_like(cond)
            self.delta_sigma = torch.full((batch,), sigma)
        measured = ~handed_on
        if bool(measured.any()):
            self.delta[measured] = (cond - uncond)[measured]
            self.delta_sigma[measured] = sigma
        if not bool(handed_on.any()):
            return out
        scale = torch.ones(batch)
        if self.mode == "eps":
            scale = sigma / self.delta_sigma.clamp_min(1e-8)
        est = cond - self.delta * scale.to(cond).view(-1, *([1] * (cond.dim() - 1)))
        mask = handed_on.to(cond.device).view(-1, *([1] * (cond.dim() - 1)))
        return [cond, torch.where(mask, est, uncond)]


# ------------------------------------------------------------------------------------------------
# Methods
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Method:
    """One row of the table."""
    name: str
    cfg: float
    ag: AdaptiveGuidanceParams | None = None
    hold_delta: str | None = None
    """None, "x0" or "eps" (see HoldDelta); needs `ag`."""
    linear_ag: object = None
    """LinearAGParams (nodes/linear_ag.py) for a LinearAG row; `coefficients` from `fit_linear_ag` when fitted."""
    coefficients: object = None
    negtome: object = None
    """NegToMeParams (nodes/negtome.py) for a NegToMe row (diversity mode)."""
    unconditional: bool = False
    """Sample with the null class as the positive prompt (cfg 1): the model's unconditional distribution."""
    group: str = ""


_LATCH_RE = re.compile(r"sample (\d+) at step (-?\d+)")
REPORT_KEY = "tfg.benchmarks.reports"


class ReportCollector:
    """OUTER_SAMPLE wrapper installed before the AG patch (so it is the outer one): after each run it reads the
    report AG leaves on the guider (`tfg_adaptive_guidance_report`)."""

    def __init__(self):
        self.reports: list[str] = []

    def wrapper(self, executor, *args, **kwargs):
        guider = executor.class_obj
        try:
            return executor(*args, **kwargs)
        finally:
            report = getattr(guider, "tfg_adaptive_guidance_report", None)
            if report:
                self.reports.append(report)


def prepare(model, method: Method, reports: ReportCollector | None = None):
    """The model clone that implements `method` (AG patch, hold-delta wrapper), plus the per-run resetter."""
    m = model.clone()
    holder = None
    if reports is not None:
        m.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.OUTER_SAMPLE, REPORT_KEY, reports.wrapper)
    if method.hold_delta:
        if method.ag is None:
            raise ValueError(f"{method.name}: hold_delta needs AG params")
        holder = HoldDelta(method.hold_delta)
        # added before AG's own wrapper, so it is the outer one and sees what AG hands on
        m.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.CALC_COND_BATCH, DELTA_KEY, holder.wrapper)
    if method.ag is not None:
        m, _ = apply_adaptive_guidance(m, method.ag)
    if method.linear_ag is not None:
        from ..nodes.linear_ag import apply_linear_ag
        m = apply_linear_ag(m, method.linear_ag, method.coefficients, "LinearAG")
    if method.negtome is not None:
        from ..nodes.negtome import apply_negtome
        m, _ = apply_negtome(m, method.negtome)
    return m, holder


@dataclass
class RunResult:
    images: torch.Tensor
    """[N, 1, 8, 8] raw model-space samples, in call order."""
    labels: torch.Tensor
    counter: PassCounter
    seconds: float
    steps: int
    latch_steps: list[int]
    reports: list[str]
    cpu_seconds: float = 0.0
    """CPU time of this process (steadier than wall time on a shared machine)."""

    @property
    def evals_per_image(self) -> float:
        return self.counter.rows / self.images.shape[0]


def run_method(eval_model, method: Method, classes: list[int], per_class: int, batch: int, steps: int,
               seed: int, sampler: str = "euler", scheduler: str = "normal", path: str = "ksampler",
               recorder: GammaRecorder | None = None) -> RunResult:
    """Sample `per_class` images of each class, `batch` images per sampling call (one class per call), with
    seeds seed, seed+1, ... per call (identical noise for every method)."""
    comfy.utils.PROGRESS_BAR_ENABLED = False
    counter = PassCounter()
    capture = ReportCollector()
    model, holder = prepare(eval_model.model, method, capture)
    model = with_counter(model, counter)
    if recorder is not None:
        model.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.CALC_COND_BATCH, RECORDER_KEY,
                                   recorder.wrapper)
    images, labels, latch = [], [], []
    call = 0
    t0 = time.perf_counter()
    c0 = time.process_time()
    for digit in classes:
        done = 0
        while done < per_class:
            n = min(batch, per_class - done)
            if holder is not None:
                holder.reset()
            n_reports = len(capture.reports)
            out = _sample_once(eval_model, model, None if method.unconditional else digit, n, seed + call,
                               steps, method.cfg, sampler, scheduler, path)
            images.append(out)
            labels.extend([digit] * n)
            if method.ag is not None and len(capture.reports) > n_reports:
                found = dict((int(i), int(s)) for i, s in _LATCH_RE.findall(capture.reports[-1]))
                latch.extend(found.get(i, steps) for i in range(n))
            done += n
            call += 1
    seconds = time.perf_counter() - t0
    cpu_seconds = time.process_time() - c0
    return RunResult(torch.cat(images), torch.tensor(labels), counter, seconds, steps, latch, capture.reports,
                     cpu_seconds)


def _sample_once(eval_model, model, digit, n, seed, steps, cfg, sampler, scheduler, path) -> torch.Tensor:
    positive = eval_model.uncond() if digit is None else eval_model.cond(digit)
    negative = eval_model.uncond()
    latent = eval_model.empty_latent(n)
    with torch.inference_mode():
        if path == "ksampler":
            out = comfy_nodes.common_ksampler(model, seed, steps, cfg, sampler, scheduler, positive, negative, latent,
                                        denoise=1.0)[0]["samples"]
        elif path == "advanced":
            from comfy_extras import nodes_custom_sampler as ncs
            guider = comfy.samplers.CFGGuider(model)
            guider.set_conds(positive, negative)
            guider.set_cfg(cfg)
            sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), scheduler, steps)
            out = ncs.SamplerCustomAdvanced().sample(ncs.Noise_RandomNoise(seed), guider,
                                                     comfy.samplers.sampler_object(sampler), sigmas,
                                                     latent)[0]["samples"]
        else:
            raise ValueError(f"unknown sampling path {path!r}")
    return out.clone().float()


def fit_linear_ag(eval_model, classes: list[int], per_class: int, batch: int, steps: int, seed: int, cfg: float,
                  sampler: str = "euler", scheduler: str = "normal", history: int = 2, ridge: float = 1e-6):
    """Record full-CFG trajectories with the pack's LinearAG recorder (seeds `seed`, `seed`+1, ... per call:
    keep them apart from the evaluation seeds) and fit the per-step coefficients. Returns (coefficients,
    trajectories, seconds)."""
    from ..nodes.linear_ag import LinearAGRecording, fit_recording, install_recorder
    comfy.utils.PROGRESS_BAR_ENABLED = False
    recording = LinearAGRecording(history)
    model = install_recorder(eval_model.model, recording, "LinearAG Record")
    t0 = time.perf_counter()
    call = 0
    for digit in classes:
        done = 0
        while done < per_class:
            n = min(batch, per_class - done)
            _sample_once(eval_model, model, digit, n, seed + call, steps, cfg, sampler, scheduler, "ksampler")
            done += n
            call += 1
    coefficients = fit_recording(recording, ridge, "benchmark recording")
    return coefficients, recording.stats.trajectories, time.perf_counter() - t0


# ------------------------------------------------------------------------------------------------
# LinearAG: one-step estimation error of each estimator on held-out CFG trajectories
# ------------------------------------------------------------------------------------------------
class EstimatorErrors:
    """CALC_COND_BATCH wrapper on a plain CFG model. On every step that LinearAG's schedule estimates, each
    estimator predicts the uncond from the true history; the error is ||D̂_u − D_u|| / ||D_c − D_u|| per
    sample (1.0 = as far off as using the cond prediction alone), averaged over samples and steps."""

    def __init__(self, estimators: dict, params):
        from ..kernels.linear_ag import UncondEstimator
        self.factory = {name: (lambda p=p, c=c: UncondEstimator(p, *c)) for name, (p, c) in estimators.items()}
        self.params = params
        self.errors: dict[str, list[float]] = {name: [] for name in estimators}
        self.reset()

    def reset(self):
        self.live = {name: make() for name, make in self.factory.items()}
        self.last_step = -1

    def wrapper(self, executor, base_model, conds, x, timestep, model_options):
        from ..kernels.linear_ag import is_estimated_step
        out = executor(base_model, conds, x, timestep, model_options)
        if len(conds) != 2 or conds[1] is None:
            return out
        sigmas = adapters.sample_sigmas_of(model_options)
        step = adapters.step_index(timestep, sigmas)
        if step == self.last_step:
            return out
        self.last_step = step
        sigma = float(timestep.flatten()[0])
        cond, uncond = out[0].float(), out[1].float()
        if is_estimated_step(step, len(sigmas) - 1, self.params.estimate_until):
            scale = (cond - uncond).flatten(1).norm(dim=1).clamp_min(1e-12)
            for name, est in self.live.items():
                if est.can_estimate(step, x.shape[0]):
                    guess = est.estimate(x, cond, step, sigma).float()
                    self.errors[name].extend(((guess - uncond).flatten(1).norm(dim=1) / scale).tolist())
        for est in self.live.values():
            est.record(x, cond, uncond, sigma, computed=True)
        return out

    def mean(self, name: str) -> float:
        values = self.errors[name]
        return sum(values) / len(values) if values else float("nan")


def estimator_errors(eval_model, estimators: dict, params, classes: list[int], per_class: int, batch: int,
                     steps: int, seed: int, cfg: float, sampler: str = "euler", scheduler: str = "normal"):
    """Run plain CFG on held-out seeds and measure each estimator's one-step error (see EstimatorErrors)."""
    comfy.utils.PROGRESS_BAR_ENABLED = False
    probe = EstimatorErrors(estimators, params)
    model = eval_model.model.clone()
    model.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.CALC_COND_BATCH, "tfg.benchmarks.estimator_errors",
                               probe.wrapper)
    call = 0
    for digit in classes:
        done = 0
        while done < per_class:
            n = min(batch, per_class - done)
            probe.reset()
            _sample_once(eval_model, model, digit, n, seed + call, steps, cfg, sampler, scheduler, "ksampler")
            done += n
            call += 1
    return probe
