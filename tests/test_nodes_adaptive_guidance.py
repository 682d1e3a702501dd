"""Adaptive Guidance nodes, in-process on the real ComfyUI with tiny random-weight models of each family.

Behaviour only: model-call counts, identity at neutral settings, equality with ComfyUI's own paths."""
from __future__ import annotations

import logging

import pytest
import torch

import host
from sampling_helpers import STEPS, advanced_sample, ksample, with_counter


def patch(ag, model, **overrides):
    values = dict(threshold=0.995, space="x0", start_percent=0.0, decision="per_sample", crossing_step="cond")
    values.update(overrides)
    return ag.AdaptiveGuidance.execute(model=model, **values).args[0]


# ------------------------------------------------------------------------------------------------
def test_family_detection(setup, adapters):
    expected = {"sd15": "sd1", "sdxl": "sdxl", "sd3": "sd3", "flux": "flux"}[setup.family]
    assert adapters.detect_family(setup.model).key == expected


def test_unsupported_family_is_reported_by_name(comfy_root, adapters):
    import types
    import comfy.supported_models
    config = object.__new__(comfy.supported_models.AuraFlow)
    fake = types.SimpleNamespace(model=types.SimpleNamespace(model_config=config))
    family = adapters.detect_family(fake)
    assert not family.supported and family.name == "AuraFlow"
    with pytest.raises(ValueError, match=r"TFG Some Node \[model family: AuraFlow\].*not supported.*Fix:"):
        adapters.require_family("Some Node", fake, ("sd1", "sdxl"))


def test_neutral_is_bit_identical_to_cfg_on_ksampler(setup, ag):
    baseline = ksample(setup, setup.model)
    neutral = ksample(setup, patch(ag, setup.model, start_percent=1.0, threshold=0.0))
    assert torch.equal(baseline, neutral)


@pytest.mark.parametrize("neutral", [dict(threshold=1.0), dict(start_percent=1.0)])
def test_neutral_settings_are_bit_identical_to_cfg_with_a_batch(sd15, ag, neutral):
    baseline = ksample(sd15, sd15.model, batch=2)
    assert torch.equal(baseline, ksample(sd15, patch(ag, sd15.model, **neutral), batch=2))


def test_neutral_guider_is_bit_identical_to_cfg_guider(setup, ag):
    import comfy.samplers
    plain = comfy.samplers.CFGGuider(setup.model)
    plain.set_conds(setup.positive, setup.negative)
    plain.set_cfg(5.0)
    guider = ag.AdaptiveGuiderNode.execute(model=setup.model, positive=setup.positive, negative=setup.negative,
                                           cfg=5.0, threshold=0.0, space="x0", start_percent=1.0,
                                           decision="per_sample", crossing_step="cond").args[0]
    assert torch.equal(advanced_sample(setup, plain), advanced_sample(setup, guider))


def test_nodes_run_with_every_input_at_its_default(sd15, ag):
    counted, counts = with_counter(ag.AdaptiveGuidance.execute(model=sd15.model).args[0])
    assert torch.isfinite(ksample(sd15, counted)).all() and counts["cond"] == STEPS and counts["uncond"] >= 1
    guider = ag.AdaptiveGuiderNode.execute(model=sd15.model, positive=sd15.positive, negative=sd15.negative).args[0]
    assert guider.cfg == 8.0 and torch.isfinite(advanced_sample(sd15, guider)).all()
    assert "threshold=0.995" in guider.tfg_adaptive_guidance_report


def test_latched_run_skips_uncond_passes(setup, ag):
    counted, counts = with_counter(patch(ag, setup.model, threshold=0.0))
    out = ksample(setup, counted, batch=2)
    assert torch.isfinite(out).all()
    # latched on the first evaluation: uncond ran once, never again
    assert counts == {"cond": 2 * STEPS, "uncond": 2, "calls": STEPS}
    base_counted, base_counts = with_counter(setup.model)
    ksample(setup, base_counted, batch=2)
    assert base_counts["uncond"] == 2 * STEPS


def test_paper_rule_from_step_zero_equals_pure_conditional_sampling(setup, ag):
    """Latched at step 0 with the paper's crossing rule, every step uses the cond prediction: the same
    trajectory as cfg = 1 (up to batching numerics of the first step)."""
    latched = ksample(setup, patch(ag, setup.model, threshold=0.0, crossing_step="cond"))
    cond_only = ksample(setup, setup.model, cfg=1.0)
    torch.testing.assert_close(latched, cond_only, atol=1e-4, rtol=1e-4)
    port_rule = ksample(setup, patch(ag, setup.model, threshold=0.0, crossing_step="cfg"))
    assert not torch.allclose(port_rule, cond_only, atol=1e-4)


def test_guider_skips_on_custom_advanced(setup, ag):
    guider = ag.AdaptiveGuiderNode.execute(model=with_counter(setup.model)[0], positive=setup.positive,
                                           negative=setup.negative, cfg=5.0, threshold=0.0, space="x0",
                                           start_percent=0.0, decision="batch", crossing_step="cfg").args[0]
    # the counter sits under the patch; read the guider's report instead
    out = advanced_sample(setup, guider)
    assert torch.isfinite(out).all()
    assert f"model passes {STEPS + 1} of {2 * STEPS}" in guider.tfg_adaptive_guidance_report


def test_start_percent_gates_the_latch(sd15, ag, adapters):
    import comfy.samplers
    steps = 8
    counted, counts = with_counter(patch(ag, sd15.model, threshold=0.0, start_percent=0.5))
    ksample(sd15, counted, steps=steps)
    sigma_start = adapters.percent_to_sigma(sd15.model, 0.5)
    sigmas = comfy.samplers.calculate_sigmas(sd15.model.get_model_object("model_sampling"), "normal", steps)[:-1]
    first_allowed = int((sigmas <= sigma_start).nonzero()[0])
    assert counts["uncond"] == first_allowed + 1
    assert counts["cond"] == steps


def test_cfg_one_passes_through_with_one_warning(sd15, ag, caplog):
    """Shared workflows toggle cfg: at cfg 1 the patch and the guider sample cond-only (as ComfyUI does without
    them) and say so once per run."""
    plain = ksample(sd15, sd15.model, cfg=1.0)
    with caplog.at_level(logging.WARNING, logger="tfg"):
        out = ksample(sd15, patch(ag, sd15.model), cfg=1.0)
    warnings = [r.getMessage() for r in caplog.records if "cfg is 1" in r.getMessage()]
    assert torch.equal(out, plain) and len(warnings) == 1
    assert "TFG Adaptive Guidance [model family: SD1.x]" in warnings[0]
    caplog.clear()
    guider = ag.AdaptiveGuiderNode.execute(model=sd15.model, positive=sd15.positive, negative=sd15.negative,
                                           cfg=1.0).args[0]
    import comfy.samplers
    basic = comfy.samplers.CFGGuider(sd15.model)
    basic.set_conds(sd15.positive, sd15.negative)
    basic.set_cfg(1.0)
    with caplog.at_level(logging.WARNING, logger="tfg"):
        assert torch.equal(advanced_sample(sd15, guider), advanced_sample(sd15, basic))
    assert len([r for r in caplog.records if "cfg is 1" in r.getMessage()]) == 1


def test_perp_neg_guider_is_refused_with_the_fix(sd15, ag):
    from comfy_extras import nodes_perpneg
    guider = nodes_perpneg.Guider_PerpNeg(patch(ag, sd15.model))
    guider.set_conds(sd15.positive, sd15.negative, sd15.negative)
    guider.set_cfg(5.0, 1.0)
    with pytest.raises(ValueError, match=r"TFG Adaptive Guidance \[model family: SD1.x\]: ComfyUI's PerpNegGuider"
                                         r".*divide by zero.*Fix: give PerpNegGuider the model without"):
        advanced_sample(sd15, guider)
    # the same guider on the unpatched model still runs (nothing left behind)
    plain = nodes_perpneg.Guider_PerpNeg(sd15.model)
    plain.set_conds(sd15.positive, sd15.negative, sd15.negative)
    plain.set_cfg(5.0, 1.0)
    assert torch.isfinite(advanced_sample(sd15, plain)).all()


def test_guidance_interval_counts_and_report(sd15, ag, adapters):
    import comfy.samplers
    steps = 8
    counted, counts = with_counter(patch(ag, sd15.model, threshold=1.0, interval_start=0.25, interval_end=0.75))
    out = ksample(sd15, counted, steps=steps)
    sigmas = comfy.samplers.calculate_sigmas(sd15.model.get_model_object("model_sampling"), "normal", steps)[:-1]
    high = adapters.percent_to_sigma(sd15.model, 0.25)
    low = adapters.percent_to_sigma(sd15.model, 0.75)
    inside = [i for i, s in enumerate(sigmas.tolist()) if low < s <= high]
    assert 0 < len(inside) < steps
    assert counts == {"cond": steps, "uncond": len(inside), "calls": steps}
    assert not torch.equal(out, ksample(sd15, sd15.model, steps=steps))
    guider = ag.AdaptiveGuiderNode.execute(model=sd15.model, positive=sd15.positive, negative=sd15.negative,
                                           cfg=5.0, threshold=1.0, interval_start=0.25, interval_end=0.75).args[0]
    advanced_sample(sd15, guider, steps=steps)
    outside = [i for i in range(steps) if i not in inside]
    assert f"cond only outside the guidance interval at steps {outside}" in guider.tfg_adaptive_guidance_report
    assert f"model passes {steps + len(inside)} of {2 * steps}" in guider.tfg_adaptive_guidance_report
    assert "interval_start (0.8) must not exceed interval_end (0.2)" in ag.AdaptiveGuidance.validate_inputs(
        interval_start=0.8, interval_end=0.2)


def test_interval_and_latch_combine(sd15, ag):
    """Inside the interval the latch still stops the uncond pass: latched at the first step inside."""
    counted, counts = with_counter(patch(ag, sd15.model, threshold=0.0, interval_start=0.5))
    ksample(sd15, counted, steps=8)
    assert counts["cond"] == 8 and counts["uncond"] == 1


def test_post_cfg_functions_see_the_cond_prediction_as_uncond_when_skipped(sd15, ag):
    seen = []

    def post_cfg(args):
        seen.append((args["cond_denoised"].clone(), args["uncond_denoised"].clone()))
        return args["denoised"]

    m = sd15.model.clone()
    m.set_model_sampler_post_cfg_function(post_cfg)
    ksample(sd15, patch(ag, m, threshold=0.0, crossing_step="cfg"))
    assert len(seen) == STEPS
    assert not torch.equal(seen[0][0], seen[0][1])  # CFG on the crossing step
    for cond, uncond in seen[1:]:
        assert torch.equal(cond, uncond) and uncond.abs().sum() > 0


@pytest.mark.parametrize("sampler", ["euler_cfg_pp", "dpmpp_2m_cfg_pp"])
def test_cfg_pp_samplers_still_skip(sd15, ag, sampler):
    counted, counts = with_counter(patch(ag, sd15.model, threshold=0.0))
    out = ksample(sd15, counted, sampler=sampler)
    assert torch.isfinite(out).all()
    assert counts["uncond"] == 1 and counts["cond"] == STEPS


def test_state_resets_between_runs_and_runs_do_not_leak(sd15, ag):
    patched = patch(ag, sd15.model, threshold=0.9)
    first = ksample(sd15, patched, seed=1)
    other = ksample(sd15, patched, seed=2)
    again = ksample(sd15, patched, seed=1)
    assert torch.equal(first, again)
    assert not torch.equal(first, other)


def test_overlapping_runs_of_one_patch_do_not_share_state(sd15, ag):
    """A second run carrying the same AG hooks (same closure, same key) starts while the first is mid-way,
    from the first run's step callback; each must match its own solo result. ComfyUI cannot run one
    BaseModel twice at once, so the second run uses a second load of the checkpoint with the hooks copied."""
    import copy
    import comfy.sample
    import comfy.sd
    import tiny_models
    latching = patch(ag, sd15.model, threshold=0.9)
    second = comfy.sd.load_checkpoint_guess_config(str(tiny_models.tiny_sd15_checkpoint()))[0]
    second.wrappers = copy.deepcopy(latching.wrappers)  # deepcopy keeps functions (closures) shared

    def run(model, seed, callback=None):
        noise = comfy.sample.prepare_noise(sd15.latent(), seed)
        with torch.inference_mode():
            return comfy.sample.sample(model, noise, STEPS, 5.0, "euler", "normal", sd15.positive,
                                       sd15.negative, sd15.latent(), callback=callback, seed=seed).clone()

    solo_a, solo_b = run(latching, 1), run(second, 2)
    inner = {}

    def callback(step, x0, x, total):
        if step == 1 and "b" not in inner:
            inner["b"] = run(second, 2)

    outer_a = run(latching, 1, callback)
    assert torch.equal(outer_a, solo_a) and torch.equal(inner["b"], solo_b)
    assert not torch.equal(solo_a, run(sd15.model, 1))  # the hooks do act on these runs


def test_report_is_logged_per_run(sd15, ag, caplog):
    with caplog.at_level(logging.INFO, logger="tfg"):
        ksample(sd15, patch(ag, sd15.model, threshold=0.0))
    lines = [r.getMessage() for r in caplog.records if "Adaptive Guidance" in r.getMessage()]
    assert len(lines) == 1
    assert "[SD1.x]" in lines[0] and "min gamma per step: 0:" in lines[0]
    assert f"model passes {STEPS + 1} of {2 * STEPS}" in lines[0]


def test_eps_space_first_step_latch_warns(sd15, ag, caplog):
    with caplog.at_level(logging.WARNING, logger="tfg"):
        ksample(sd15, patch(ag, sd15.model, threshold=0.0, space="eps"))
    assert any("eps space" in r.getMessage() for r in caplog.records)


def test_stacked_patches_compose(sd15, ag):
    twice = patch(ag, patch(ag, sd15.model, threshold=0.0), threshold=0.0)
    counted, counts = with_counter(twice)
    assert torch.isfinite(ksample(sd15, counted)).all()
    assert counts["uncond"] == 1


def test_input_model_is_not_mutated(sd15, ag):
    before = dict(sd15.model.model_options.get("transformer_options", {}).get("wrappers", {}))
    patch(ag, sd15.model)
    after = dict(sd15.model.model_options.get("transformer_options", {}).get("wrappers", {}))
    assert before == after and not sd15.model.wrappers.get("calc_cond_batch")


# ------------------------------------------------------------------------------------------------
def test_validate_inputs(ag):
    # every widget is listed in validate_inputs (ComfyUI then skips its own checks): range, options, linked None
    by_id = {i.id: i for i in ag.AdaptiveGuidance.GET_SCHEMA().inputs}
    assert (by_id["threshold"].min, by_id["threshold"].max) == (0.0, 1.0)
    assert (by_id["start_percent"].min, by_id["start_percent"].max) == (0.0, 1.0)
    guider = ag.AdaptiveGuiderNode
    assert "input 'cfg' must be at least 0" in guider.validate_inputs(cfg=-2.0)
    assert "input 'cfg' must be at most 100" in guider.validate_inputs(cfg=101.0)
    assert guider.validate_inputs(cfg=7.5) is True and guider.validate_inputs(cfg=1.0) is True
    assert guider.validate_inputs(cfg=None, threshold=None, space=None) is True  # linked: checked at run time
    assert "input 'space' unknown choice 'noise'" in ag.AdaptiveGuidance.validate_inputs(space="noise")
    assert "input 'threshold' must be at most 1" in ag.AdaptiveGuidance.validate_inputs(threshold=1.5)
    assert "input 'decision'" in ag.AdaptiveGuidance.validate_inputs(decision="all")


def test_linked_values_are_checked_at_execute(sd15, ag):
    inputs = host.pack_module("nodes.inputs")
    with pytest.raises(inputs.InputError, match=r"TFG Adaptive Guidance: input 'threshold' must be at most 1"):
        patch(ag, sd15.model, threshold=1.5)
    with pytest.raises(inputs.InputError, match=r"TFG Adaptive Guider: input 'cfg' must be at most 100"):
        ag.AdaptiveGuiderNode.execute(model=sd15.model, positive=sd15.positive, negative=sd15.negative, cfg=150.0)
    nan_cond = [[sd15.positive[0][0] * float("nan"), sd15.positive[0][1]]]
    with pytest.raises(inputs.InputError, match=r"input 'positive' holds NaN"):
        ag.AdaptiveGuiderNode.execute(model=sd15.model, positive=nan_cond, negative=sd15.negative, cfg=5.0)


def test_invalid_params_raise_when_called_directly(sd15, ag):
    kernel = host.pack_module("kernels.adaptive_guidance")
    with pytest.raises(ValueError, match="threshold must be in"):
        ag.apply_adaptive_guidance(sd15.model, kernel.AdaptiveGuidanceParams(threshold=1.5))


def test_schema_defaults_come_from_the_params_object(ag):
    kernel = host.pack_module("kernels.adaptive_guidance")
    defaults = kernel.AdaptiveGuidanceParams()
    for node in (ag.AdaptiveGuidance, ag.AdaptiveGuiderNode):
        schema = node.GET_SCHEMA()
        assert schema.node_id.startswith("TFG_") and "arXiv 2312.12487" in schema.description
        by_id = {i.id: i for i in schema.inputs}
        for name in ("threshold", "space", "start_percent", "decision", "crossing_step"):
            assert by_id[name].default == getattr(defaults, name)
        assert all(i.tooltip for i in schema.inputs)


# ------------------------------------------------------------------------------------------------
def test_adapter_step_index_and_percent(sd15, adapters):
    import comfy.samplers
    ms = sd15.model.get_model_object("model_sampling")
    sigmas = comfy.samplers.calculate_sigmas(ms, "normal", 10)
    assert adapters.step_index(sigmas[3], sigmas) == 3
    assert adapters.step_index(torch.tensor([float(sigmas[5]) * 1.001]), sigmas) == 5
    assert adapters.step_index(1.0, None) == -1
    s = adapters.percent_to_sigma(sd15.model, 0.3)
    assert abs(adapters.sigma_to_percent(sd15.model, s) - 0.3) < 1e-3
    assert adapters.percent_to_sigma(sd15.model, 1.0) == 0.0


def test_adapter_split_by_cond_or_uncond(adapters):
    t = torch.arange(6).view(6, 1)
    parts = adapters.split_by_cond_or_uncond(t, [1, 0])
    assert [k for k, _ in parts] == [1, 0]
    assert parts[0][1].flatten().tolist() == [0, 1, 2] and parts[1][1].flatten().tolist() == [3, 4, 5]
    with pytest.raises(ValueError):
        adapters.split_by_cond_or_uncond(torch.zeros(5, 1), [1, 0])


def test_adapter_single_slot_chains_to_previous(sd15, adapters):
    calls = []
    m = sd15.model.clone()
    m.set_model_sampler_calc_cond_batch_function(lambda args: calls.append("first") or
                                                 adapters.default_calc_cond_batch(None)(args))

    def make(previous):
        def fn(args):
            calls.append("second")
            return adapters.default_calc_cond_batch(previous)(args)
        return fn

    adapters.take_single_slot(m, "sampler_calc_cond_batch_function", make)
    out = ksample(sd15, m)
    assert torch.isfinite(out).all()
    assert calls[:2] == ["second", "first"] and len(calls) == 2 * STEPS
    torch.testing.assert_close(out, ksample(sd15, sd15.model))


# ------------------------------------------------------------------------------------------------
# per_sample: the uncond pass runs only for the images that have not latched (issue 15.1)
# ------------------------------------------------------------------------------------------------
def rows_positive(s):
    """A positive prompt per image: image 0 gets the negative prompt itself (cond == uncond, so its cosine is 1 and
    it latches at step 0), image 1 the real prompt (in eps space its cosine stays below 0.9992 on the tiny model,
    so it never reaches the threshold used below)."""
    neg, pos = s.negative[0], s.positive[0]
    extra = {k: torch.cat([neg[1][k], pos[1][k]]) for k in pos[1] if isinstance(pos[1][k], torch.Tensor)}
    return [[torch.cat([neg[0], pos[0]]), extra]]


def sample_rows(s, model, positive, cfg=5.0, steps=STEPS):
    import nodes
    with torch.inference_mode():
        return nodes.common_ksampler(model, 7, steps, cfg, "euler", "normal", positive, s.negative,
                                     {"samples": s.latent(2)}, denoise=1.0)[0]["samples"].clone()


def test_per_sample_computes_the_uncond_only_for_open_images(sd15, ag):
    positive = rows_positive(sd15)
    latching = patch(ag, sd15.model, threshold=0.9999, space="eps")
    counted, counts = with_counter(latching)
    out = sample_rows(sd15, counted, positive)
    # step 0: one call, 2 cond + 2 uncond rows; image 0 latches. Then per step: 2 cond rows (one call) and 1
    # uncond row (a second call) for image 1 alone.
    assert counts == {"cond": 2 * STEPS, "uncond": 2 + (STEPS - 1), "calls": 1 + 2 * (STEPS - 1)}
    # image 1 (never latched) follows plain CFG; image 0 has cond == uncond, where CFG equals cond. (Its uncond row
    # runs in a batch of 1 instead of 4: CPU kernels round differently by batch size, ~4e-5 after 4 steps; the
    # per-pass equality is checked at 1e-5 in test_cond_rows.py.)
    plain = sample_rows(sd15, sd15.model, positive)
    torch.testing.assert_close(out, plain, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(out[1], sample_rows(sd15, sd15.model, positive, cfg=1.0)[1], atol=1e-2)
    # the batch-wide rule keeps computing the uncond of both images (no image latches on the batch cosine)
    batch_counted, batch_counts = with_counter(patch(ag, sd15.model, threshold=0.9999, space="eps",
                                                     decision="batch"))
    sample_rows(sd15, batch_counted, positive)
    assert batch_counts["uncond"] == 2 * STEPS


def test_guider_computes_the_uncond_only_for_open_images(sd15, ag):
    import comfy.samplers
    counted, counts = with_counter(sd15.model)
    guider = ag.AdaptiveGuiderNode.execute(model=counted, positive=rows_positive(sd15), negative=sd15.negative,
                                           cfg=5.0, threshold=0.9999, space="eps").args[0]
    sigmas = comfy.samplers.calculate_sigmas(sd15.model.get_model_object("model_sampling"), "normal", STEPS)
    from comfy_extras import nodes_custom_sampler as ncs
    with torch.inference_mode():
        ncs.SamplerCustomAdvanced().sample(ncs.Noise_RandomNoise(7), guider, comfy.samplers.sampler_object("euler"),
                                           sigmas, {"samples": sd15.latent(2)})
    assert counts == {"cond": 2 * STEPS, "uncond": 2 + (STEPS - 1), "calls": 1 + 2 * (STEPS - 1)}
    assert "latched: sample 0 at step 0;" in guider.tfg_adaptive_guidance_report
    assert f"model passes {2 * STEPS + 2 + STEPS - 1} of {4 * STEPS}" in guider.tfg_adaptive_guidance_report
