"""Adaptive Guidance's hot path and the host: on a GPU, every value read back to the host waits for the queued
model work, and the GPU idles while Python prepares the next step. The patch reads nothing per step unless a
decision needs it: the latch flags once per step while an image has not latched (one transfer, at the next
decision), nothing once all have; the sigma only for a latch start, a guidance interval or LinearAG's schedule.

Counted on the CPU by where the read comes from: ops that read a value back (item, float(), bool(), nonzero...)
dispatched from the pack's own code, and the pack's .cpu() calls. Runs of 4 and 8 steps are compared, so what a
run does once (at its start and its report) cancels out."""
from __future__ import annotations

import inspect
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from sampling_helpers import ksample

READ_OPS = frozenset({"_local_scalar_dense", "item", "is_nonzero", "nonzero", "nonzero_static", "equal",
                      "allclose", "masked_select"})
TORCH_DIR = str(Path(torch.__file__).resolve().parent)


class PackReads(TorchDispatchMode):
    """Counts read-backs issued by files under `pack_dirs`: dispatched read ops, and Tensor.cpu() calls."""

    def __init__(self, pack_dirs: tuple[str, ...]):
        super().__init__()
        self.pack_dirs = pack_dirs
        self.sites: list[str] = []

    def _site(self) -> str | None:
        frame = sys._getframe(2)
        while frame is not None:
            name = frame.f_code.co_filename
            if not name.startswith(TORCH_DIR) and name != __file__:
                path = Path(name)
                return f"{path.parent.name}/{path.name}:{frame.f_lineno}" if name.startswith(self.pack_dirs) else None
            frame = frame.f_back
        return None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket.__name__ in READ_OPS:
            site = self._site()
            if site:
                self.sites.append(site)
        return func(*args, **(kwargs or {}))

    def __enter__(self):
        self._cpu = torch.Tensor.cpu
        mode = self

        def counted_cpu(tensor, *args, **kwargs):
            site = mode._site()
            if site:
                mode.sites.append(site + " .cpu()")
            return mode._cpu(tensor, *args, **kwargs)

        torch.Tensor.cpu = counted_cpu
        return super().__enter__()

    def __exit__(self, *exc):
        torch.Tensor.cpu = self._cpu
        return super().__exit__(*exc)


def _pack_dirs(ag) -> tuple[str, ...]:
    root = Path(ag.__file__).resolve().parents[1]
    return str(root / "nodes"), str(root / "kernels")


def _reads(sd15, ag, steps: int, batch: int = 2, **params) -> list[str]:
    model = ag.AdaptiveGuidance.execute(model=sd15.model, **params).args[0]
    with PackReads(_pack_dirs(ag)) as reads:
        ksample(sd15, model, batch=batch, steps=steps)
    return reads.sites


@pytest.mark.parametrize("params, per_step", [
    (dict(threshold=0.9999999), 1),   # could latch, does not: the latch flags, once a step at the next decision
    (dict(threshold=1.0), 0),         # neutral: no image can latch, so no flags to read (cosines: for the report)
    (dict(threshold=0.0), 0),         # latched at step 0: nothing is read once every image has latched
])
def test_adaptive_guidance_reads_back_only_what_a_decision_needs(sd15, ag, params, per_step):
    short, long = _reads(sd15, ag, 4, **params), _reads(sd15, ag, 8, **params)
    per_step_sites = Counter(long) - Counter(short)
    assert sum(per_step_sites.values()) == 4 * per_step, (short, long)
    assert all(site.endswith(".cpu()") for site in per_step_sites), per_step_sites  # one transfer, no item()


def test_a_latch_start_is_compared_on_the_device(sd15, ag):
    """start_percent > 0: the sigma gate is a device comparison; the flags are read once a step until every image
    has latched (8 steps: at step 4; 12 steps: at step 6), then nothing."""
    runs = {steps: Counter(_reads(sd15, ag, steps, threshold=0.0, start_percent=0.5)) for steps in (4, 8, 12)}
    for fewer, more in ((4, 8), (8, 12)):
        per_step_sites = runs[more] - runs[fewer]
        assert sum(per_step_sites.values()) == 2, runs  # two more steps before the latch, one transfer each
        assert all(site.startswith("kernels/") and site.endswith(".cpu()") for site in per_step_sites), runs


@pytest.mark.parametrize("steps", [4, 8])
def test_linear_ag_reads_the_sigma_until_its_schedule_turns_conditional_only(sd15, la, steps):
    """The paper's schedule (estimate_until 0.5, then cond_only): the step index is needed for the estimated
    steps; from the first conditional-only step on, a run whose sigmas only fall needs nothing."""
    model = la.LinearAG.execute(model=sd15.model).args[0]
    with PackReads(_pack_dirs(la)) as reads:
        ksample(sd15, model, batch=2, steps=steps)
    sigma_reads = [site for site in reads.sites if site.startswith("nodes/adaptive_guidance.py")
                   and not site.endswith(".cpu()")]
    assert len(sigma_reads) == steps // 2 + 1, reads.sites


# ------------------------------------------------------------------------------------------------
# NegToMe: the window decision reads each call's sigma until the run has left the window for good
def _negtome_reads(sd15, nt, steps: int, sampler: str = "euler"):
    """(the per-call sigma reads, the run's state: its calls and calls in the window)."""
    model = nt.NegToMe.execute(model=sd15.model).args[0]
    with PackReads(_pack_dirs(nt)) as reads:
        ksample(sd15, model, batch=2, steps=steps, sampler=sampler)
    state = list(nt.LAST_RUN.values())[-1]
    lines, first = inspect.getsourcelines(nt.NegToMeRunState.call_sigma)
    in_call_sigma = {f"nodes/negtome.py:{n}" for n in range(first, first + len(lines))}
    return [site for site in reads.sites if site in in_call_sigma], state


@pytest.mark.parametrize("steps", [4, 12])
def test_negtome_stops_reading_the_sigma_once_the_run_has_left_its_window(sd15, nt, steps):
    reads, state = _negtome_reads(sd15, nt, steps)
    assert 0 < state.evaluated_in_window < state.evaluations
    assert len(reads) == state.evaluated_in_window + 1, reads  # the calls in the window and the first one after


def test_negtome_reads_every_sigma_for_a_sampler_that_may_go_back_up(sd15, nt):
    """dpm_adaptive retries a rejected step at a higher sigma: every call reads its sigma."""
    reads, state = _negtome_reads(sd15, nt, 4, sampler="dpm_adaptive")
    assert state.evaluated_in_window < state.evaluations and len(reads) == state.evaluations


# ------------------------------------------------------------------------------------------------
# Which samplers call the model at falling sigmas (what lets NegToMe and LinearAG stop reading)
def _call_sigmas(sd15, sampler, steps: int = 6) -> tuple[list[float], torch.Tensor]:
    import comfy.patcher_extension
    import comfy.sample
    import comfy.samplers
    called = []

    def apply_model(executor, x, t, *args, **kwargs):
        called.append(float(t.flatten()[0]))
        return executor(x, t, *args, **kwargs)

    model = sd15.model.clone()
    model.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, "test.sigmas", apply_model)
    sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "karras", steps).cpu()
    latent = sd15.latent()
    noise = torch.randn(latent.shape, generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        comfy.sample.sample_custom(model, noise, 5.0, sampler, sigmas, sd15.positive, sd15.negative, latent,
                                   seed=3)
    return called, sigmas


def _rises(called: list[float]) -> bool:
    return any(b > a * (1 + 1e-5) + 1e-7 for a, b in zip(called, called[1:]))


def test_samplers_called_falling_do_fall_and_the_others_are_not(sd15, adapters):
    import comfy.samplers
    falling = []
    for name in comfy.samplers.KSampler.SAMPLERS:
        sampler = comfy.samplers.sampler_object(name)
        called, sigmas = _call_sigmas(sd15, sampler)
        if adapters.calls_at_falling_sigmas(sampler, sigmas):
            falling.append(name)
            assert not _rises(called), (name, called)
    assert {"euler", "euler_ancestral", "dpmpp_2m", "heun", "uni_pc", "ddim", "lcm"} <= set(falling), falling
    assert "heunpp2" not in falling and "dpm_adaptive" not in falling
    # core samplers whose options make them call back up in sigma
    for name, options in (("dpmpp_sde", {"r": 2.0}), ("dpmpp_2s_ancestral", {"eta": 1.5}),
                          ("euler", {"s_churn": 2.0})):
        sampler = comfy.samplers.ksampler(name, options)
        called, sigmas = _call_sigmas(sd15, sampler)
        assert not adapters.calls_at_falling_sigmas(sampler, sigmas), (name, options)
    assert _rises(_call_sigmas(sd15, comfy.samplers.ksampler("dpmpp_sde", {"r": 2.0}))[0])
