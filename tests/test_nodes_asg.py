"""ASGDiffusion node, in-process on the real ComfyUI with tiny random-weight models of each family (native
latent 8x8 = 64 px, so base 64 and targets 128-192 px).

Behaviour: scale 1 equals ComfyUI's KSampler bit for bit, non-square shapes, one batched model call per
structure step, the guidance's and the mask's effect against a seeded baseline, loud errors before the run, and
interrupts."""
from __future__ import annotations

import threading
import time

import pytest
import torch

import host
from sampling_helpers import STEPS, ksample, with_counter

BASE = 64


@pytest.fixture(scope="module")
def asg(comfy_root):
    return host.pack_module("nodes.asg")


def params(asg, setup, **overrides):
    values = dict(width=2 * BASE, height=2 * BASE, base_width=BASE, base_height=BASE, window_batch=16)
    if setup.family in ("sd3", "flux"):
        values["mask"] = "none"
    values.update(overrides)
    return asg.ASGParams(**values)


def run(asg, setup, model=None, seed=7, steps=STEPS, cfg=5.0, sampler="euler", batch=1, **overrides):
    p = params(asg, setup, **overrides)
    with torch.inference_mode():
        latent, stats = asg.sample_asg(model or setup.model, setup.positive, setup.negative, seed, steps, cfg,
                                       sampler, "normal", p, batch)
    return latent["samples"].clone(), stats


# ------------------------------------------------------------------------------------------------
def test_scale_one_equals_ksampler_bit_for_bit(setup, asg):
    """One patch and one window: both stages run, and the result is ComfyUI's own KSampler result."""
    out, stats = run(asg, setup, width=BASE, height=BASE)
    assert stats.structure_steps == STEPS // 2 and stats.detail_steps == STEPS - STEPS // 2 and stats.patches == 1
    assert torch.equal(out, ksample(setup, setup.model, cfg=5.0, seed=7))


def test_scale_one_equals_ksampler_with_a_batch(sd15, asg):
    out, _ = run(asg, sd15, width=BASE, height=BASE, batch=2)
    assert torch.equal(out, ksample(sd15, sd15.model, cfg=5.0, seed=7, batch=2))


@pytest.mark.parametrize("size", [(2 * BASE, BASE), (3 * BASE, 2 * BASE), (BASE, 3 * BASE)])
def test_non_square_targets(setup, asg, size):
    width, height = size
    out, stats = run(asg, setup, width=width, height=height)
    assert out.shape == (1, setup.latent_channels, height // 8, width // 8)
    assert bool(torch.isfinite(out).all())
    assert stats.patches == (width // BASE) * (height // BASE)


def test_structure_stage_batches_all_patches_in_one_model_call(sd15, asg):
    model, counts = with_counter(sd15.model)
    _, stats = run(asg, sd15, model=model, width=2 * BASE, height=2 * BASE, window_batch=16)
    # 2 structure steps x 1 call of 4 patches (cond + uncond in the same call); 2 detail steps x 1 call of the
    # 3x3 windows (window 8, stride 4 on a 16x16 latent).
    assert stats.windows == 9
    assert counts["calls"] == STEPS, counts
    assert counts["cond"] == counts["uncond"] == 2 * 4 + 2 * 9
    model, counts = with_counter(sd15.model)
    run(asg, sd15, model=model, width=2 * BASE, height=2 * BASE, window_batch=4)
    assert counts["calls"] == 2 + 2 * 3, "windows in batches of 4: 3 calls per detail step"


def test_guidance_changes_the_result_against_a_seeded_baseline(setup, asg):
    baseline, _ = run(asg, setup, guidance_scale=0.0)
    again, _ = run(asg, setup, guidance_scale=0.0)
    assert torch.equal(baseline, again), "same seed, same result"
    guided, stats = run(asg, setup, guidance_scale=0.8)
    assert not torch.equal(guided, baseline)
    assert stats.structure_evaluations == 2 and stats.guided_evaluations == 1, "async: first evaluation unguided"
    sync, stats = run(asg, setup, guidance_scale=0.8, asynchronous=False)
    assert stats.guided_evaluations == 2 and not torch.equal(sync, guided)


def test_cross_attention_mask_is_recorded_and_used(sd15, asg):
    masked, stats = run(asg, sd15, guidance_scale=0.8, mask="cross_attention")
    assert stats.masked_evaluations == stats.structure_evaluations == 2
    unmasked, stats = run(asg, sd15, guidance_scale=0.8, mask="none")
    assert stats.masked_evaluations == 0
    assert not torch.equal(masked, unmasked)


def test_sdxl_mask_over_every_output_cross_attention(comfy_root, asg, tmp_path_factory):
    from sampling_helpers import get_setup
    s = get_setup("sdxl", tmp_path_factory)
    layers = asg.cross_attention_layers(s.model)
    assert layers and all(block >= 0 for block, _ in layers)
    _, stats = run(asg, s, guidance_scale=0.5, mask="cross_attention")
    assert stats.masked_evaluations == 2


def test_pixel_interaction_changes_the_result(sd15, asg):
    a, _ = run(asg, sd15, pixel_interaction=True, guidance_scale=0.0)
    b, _ = run(asg, sd15, pixel_interaction=False, guidance_scale=0.0)
    assert not torch.equal(a, b)


def test_invalid_scale_rejected_before_the_run(sd15, asg):
    msg = asg.ASGDiffusion.validate_inputs(width=1536, height=2048, base_width=1024, base_height=1024)
    assert isinstance(msg, str) and "integer scale factors" in msg and "1.5" in msg
    assert "multiple of 8" in asg.ASGDiffusion.validate_inputs(width=2050, height=2048, base_width=1024,
                                                                base_height=1024)
    assert asg.ASGDiffusion.validate_inputs(width=3072, height=1024, base_width=1024, base_height=1024) is True
    assert asg.ASGDiffusion.validate_inputs(width=None, height=2048, base_width=1024, base_height=1024) is True
    model, counts = with_counter(sd15.model)
    with pytest.raises(ValueError, match="TFG ASGDiffusion .*integer scale factors"):
        run(asg, sd15, model=model, width=3 * BASE // 2, height=2 * BASE)
    assert counts["calls"] == 0


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_cross_attention_mask_on_joint_attention_models_is_a_clear_error(comfy_root, asg, tmp_path_factory,
                                                                         family):
    from sampling_helpers import get_setup
    s = get_setup(family, tmp_path_factory)
    name = {"sd3": "SD3", "flux": "Flux"}[family]
    with pytest.raises(ValueError, match=rf"\[model family: {name}\].*mask to none"):
        run(asg, s, mask="cross_attention", guidance_scale=0.5)


def test_regional_conditioning_is_refused(sd15, asg):
    positive = [[sd15.positive[0][0], {**sd15.positive[0][1], "area": (8, 8, 0, 0)}]]
    with pytest.raises(ValueError, match="area conditioning"):
        with torch.inference_mode():
            asg.sample_asg(sd15.model, positive, sd15.negative, 1, STEPS, 5.0, "euler", "normal",
                           params(asg, sd15))


def test_interrupt_stops_the_run(sd15, asg):
    import comfy.model_management as mm
    model, counts = with_counter(sd15.model)
    mm.interrupt_current_processing(True)
    try:
        with pytest.raises(mm.InterruptProcessingException):
            run(asg, sd15, model=model)
    finally:
        mm.interrupt_current_processing(False)
    assert counts["calls"] == 0


def test_other_samplers_run_both_stages(sd15, asg):
    for sampler in ("dpmpp_2m", "euler_ancestral", "heun"):
        out, stats = run(asg, sd15, sampler=sampler)
        assert bool(torch.isfinite(out).all()) and stats.detail_steps == STEPS // 2


def _peak_rss_during(fn) -> tuple[int, int]:
    """(baseline RSS, peak RSS) in bytes while fn runs, sampled every 2 ms."""
    import psutil
    proc = psutil.Process()
    base = proc.memory_info().rss
    peak = [base]
    done = threading.Event()

    def poll():
        while not done.is_set():
            peak[0] = max(peak[0], proc.memory_info().rss)
            time.sleep(0.002)

    t = threading.Thread(target=poll, daemon=True)
    t.start()
    try:
        fn()
    finally:
        done.set()
        t.join()
    return base, peak[0]


def test_memory_stays_bounded_at_four_times_the_base_area(comfy_root, asg, tmp_path_factory, capsys):
    """4x the base area (2x2 patches) on tiny SDXL: the largest model call holds max(K, window_batch) native
    rows per CFG half, never the whole target; the RSS peak is reported next to a direct target-size KSampler
    run."""
    from sampling_helpers import get_setup
    s = get_setup("sdxl", tmp_path_factory)
    rows = []
    import comfy.patcher_extension

    def apply_model(executor, x, t, *args, **kwargs):
        rows.append(tuple(x.shape))
        return executor(x, t, *args, **kwargs)

    m = s.model.clone()
    m.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, "test.rows", apply_model)
    base, peak = _peak_rss_during(lambda: run(asg, s, model=m, window_batch=4))
    assert max(r[0] for r in rows) <= 2 * 4
    assert all(r[2:] == (8, 8) for r in rows), "every call is native size"

    import nodes
    latent = {"samples": torch.zeros(1, s.latent_channels, 16, 16)}

    def direct():
        with torch.inference_mode():
            nodes.common_ksampler(s.model, 7, STEPS, 5.0, "euler", "normal", s.positive, s.negative, latent)

    dbase, dpeak = _peak_rss_during(direct)
    with capsys.disabled():
        print(f"\n[ASG memory, tiny SDXL, 4x base area] ASG peak RSS +{(peak - base) / 2**20:.1f} MiB "
              f"(largest call {max(rows)}); direct 16x16 KSampler +{(dpeak - dbase) / 2**20:.1f} MiB")
