"""ASGDiffusion node, in-process on the real ComfyUI with tiny random-weight models of each family (native
latent 8x8 = 64 px; targets 16x16 latents and non-square ones).

Behaviour: scale 1 equals ComfyUI's KSampler bit for bit, non-square shapes, one batched model call per
structure step, the guidance's and the mask's effect against a seeded baseline, loud errors before the run, and
interrupts."""
from __future__ import annotations

import json
import threading
import time

import pytest
import torch

import host
from sampling_helpers import STEPS, ksample, with_counter

N = 8
"""The tiny models' native latent side."""


@pytest.fixture(scope="module")
def asg(comfy_root):
    return host.pack_module("nodes.asg")


def params(asg, setup, **overrides):
    values = dict(scale_width=2, scale_height=2, window_batch=16)
    if setup.family in ("sd3", "flux"):
        values["mask"] = "none"
    values.update(overrides)
    return asg.ASGParams(**values)


def run(asg, setup, model=None, seed=7, steps=STEPS, cfg=5.0, sampler="euler", batch=1, latent=None, **overrides):
    p = params(asg, setup, **overrides)
    if latent is None:
        sh, sw = p.scales()
        latent = torch.zeros(batch, setup.latent_channels, N * sh, N * sw)
    with torch.inference_mode():
        out, stats = asg.sample_asg(model or setup.model, setup.positive, setup.negative, seed, steps, cfg,
                                    sampler, "normal", p, {"samples": latent})
    return out["samples"].clone(), stats


# ------------------------------------------------------------------------------------------------
def test_scale_one_equals_ksampler_bit_for_bit(setup, asg):
    """One patch and one window: both stages run, and the result is ComfyUI's own KSampler result."""
    out, stats = run(asg, setup, scale_width=1, scale_height=1)
    assert stats.structure_steps == STEPS // 2 and stats.detail_steps == STEPS - STEPS // 2 and stats.patches == 1
    assert torch.equal(out, ksample(setup, setup.model, cfg=5.0, seed=7))


def test_scale_one_equals_ksampler_with_a_batch(sd15, asg):
    out, _ = run(asg, sd15, scale_width=1, scale_height=1, batch=2)
    assert torch.equal(out, ksample(sd15, sd15.model, cfg=5.0, seed=7, batch=2))


NON_SQUARE = {"sd15": (3, 2), "sdxl": (1, 3), "sd3": (2, 1), "flux": (3, 1)}
"""(scale_width, scale_height) per family: every family gets a non-square grid, and the grids differ (wide, tall,
both scales > 1), so the families together cover what a full product of families x grids would."""


def test_non_square_targets(setup, asg):
    sw, sh = NON_SQUARE[setup.family]
    out, stats = run(asg, setup, scale_width=sw, scale_height=sh)
    assert out.shape == (1, setup.latent_channels, N * sh, N * sw)
    assert bool(torch.isfinite(out).all())
    assert stats.patches == sw * sh


def test_structure_stage_batches_all_patches_in_one_model_call(sd15, asg):
    model, counts = with_counter(sd15.model)
    _, stats = run(asg, sd15, model=model, window_batch=16)
    # 2 structure steps x 1 call of 4 patches (cond + uncond in the same call); 2 detail steps x 1 call of the
    # 3x3 windows (window 8, stride 4 on a 16x16 latent).
    assert stats.windows == 9
    assert counts["calls"] == STEPS, counts
    assert counts["cond"] == counts["uncond"] == 2 * 4 + 2 * 9
    model, counts = with_counter(sd15.model)
    run(asg, sd15, model=model, window_batch=4)
    assert counts["calls"] == 2 + 2 * 3, "windows in batches of 4: 3 calls per detail step"


def test_guidance_changes_the_result_against_a_seeded_baseline(setup, asg):
    """Every family (noise prediction for SD1.x/SDXL, velocity for SD3/Flux): the guidance moves the result. The
    seed determinism and the synchronous variant do not depend on the family and run on SD1.5 only."""
    baseline, _ = run(asg, setup, guidance_scale=0.0)
    guided, stats = run(asg, setup, guidance_scale=0.8)
    assert not torch.equal(guided, baseline)
    assert stats.structure_evaluations == 2 and stats.guided_evaluations == 1, "async: first evaluation unguided"
    if setup.family != "sd15":
        return
    again, _ = run(asg, setup, guidance_scale=0.0)
    assert torch.equal(baseline, again), "same seed, same result"
    sync, stats = run(asg, setup, guidance_scale=0.8, asynchronous=False)
    assert stats.guided_evaluations == 2 and not torch.equal(sync, guided)


def test_cross_attention_mask_is_recorded_and_used(sd15, asg):
    model = sd15.model.clone()
    masked, stats = run(asg, sd15, model=model, guidance_scale=0.8, mask="cross_attention")
    assert stats.masked_evaluations == stats.structure_evaluations == 2
    # the recording patches lived in the run's own model_options: nothing is left on the model for the next run
    assert not model.model_options.get("transformer_options", {}).get("patches_replace", {}).get("attn2")
    unmasked, stats = run(asg, sd15, guidance_scale=0.8, mask="none")
    assert stats.masked_evaluations == 0
    assert not torch.equal(masked, unmasked)


def test_heat_is_recorded_from_the_conditional_rows_only(asg):
    """The recorder reads the cond chunk wherever ComfyUI put it in the batch (here uncond first), ignores uncond
    rows, averages over layers, and skips calls of another batch (e.g. the detail stage's windows)."""
    kernels = host.pack_module("kernels.asg")
    heat_from_attention, resize_map = kernels.heat_from_attention, kernels.resize_map
    g = torch.Generator().manual_seed(0)
    rows, n, heads, d, t = 4, 16, 2, 8, 5
    q, k = torch.randn(2 * rows, n, heads * d, generator=g), torch.randn(2 * rows, t, heads * d, generator=g)
    options = {"cond_or_uncond": [1, 0], "activations_shape": (2 * rows, heads * d, 4, 4), "n_heads": heads}
    recorder = asg.HeatRecorder(rows, (8, 8))
    recorder.record(q, k, options)
    recorder.record(q[:, :4], k, {**options, "activations_shape": (2 * rows, heads * d, 2, 2)})
    recorder.record(q[:rows], k[:rows], options)   # 4 rows for 2 chunks: another batch, skipped
    heat = recorder.take()
    expected = (resize_map(heat_from_attention(q[rows:], k[rows:], heads), (4, 4), (8, 8))
                + resize_map(heat_from_attention(q[rows:, :4], k[rows:], heads), (2, 2), (8, 8))) / 2
    torch.testing.assert_close(heat, expected)
    assert recorder.skipped == 1 and recorder.take() is None, "take() resets for the next evaluation"


def test_sdxl_mask_over_every_output_cross_attention(comfy_root, asg, tmp_path_factory):
    from sampling_helpers import get_setup
    s = get_setup("sdxl", tmp_path_factory)
    layers = asg.cross_attention_layers(s.model)
    assert layers and all(block >= 0 for block, _ in layers)
    _, stats = run(asg, s, guidance_scale=0.5, mask="cross_attention")
    assert stats.masked_evaluations == 2


def test_every_input_declared_once_and_checked(asg):
    """Generated from the declarations: schema order = declaration order = validate_inputs' signature; each numeric
    input above max / below min / of the wrong type and each choice with an unknown value is refused naming it
    (validation and execute); every input linked (None) passes validation."""
    import inspect
    node = asg.ASGDiffusion
    assert [i.id for i in node.define_schema().inputs] == [i.name for i in node.INPUTS.items]
    names = [w.name for w in node.INPUTS.widgets]
    assert list(inspect.signature(node.validate_inputs).parameters) == names
    assert node.validate_inputs(**{n: None for n in names}) is True
    inputs = host.pack_module("nodes.inputs")
    for w in node.INPUTS.widgets:
        assert w.meaning and (w.field is None or hasattr(asg.DEFAULTS, w.field)), w.name
        bad = []
        if w.kind in ("int", "float"):
            bad += [w.max + 1, w.min - 1, "ten"] + ([1.5] if w.kind == "int" else [])
        elif w.kind == "combo":
            bad.append("no-such-option")
        elif w.kind == "bool":
            bad.append("yes")
        for value in bad:
            msg = node.validate_inputs(**{w.name: value})
            assert isinstance(msg, str) and f"'{w.name}'" in msg, (w.name, value, msg)
            with pytest.raises(inputs.InputError, match=w.name):
                node.INPUTS.checked({w.name: value})


def _execute(asg, s, model=None, latent=None, **overrides):
    kw = dict(model=model or s.model, positive=s.positive, negative=s.negative, seed=7, steps=STEPS, cfg=5.0,
              sampler_name="euler", scheduler="normal",
              latent_image={"samples": torch.zeros(1, s.latent_channels, 2 * N, 2 * N) if latent is None else latent},
              window_batch=16)
    kw.update(overrides)
    with torch.inference_mode():
        return asg.ASGDiffusion.execute(**kw).args[0]["samples"]


def test_non_finite_tiny_and_oversize_inputs_refused_before_any_model_call(sd15, asg, monkeypatch):
    """NaN/Inf in latent_image or the conditioning, native patches under 64 px (a latent of a few pixels), and a
    run that needs more memory than is free: each a named error before the first model call."""
    import comfy.model_management
    inputs = host.pack_module("nodes.inputs")
    model, counts = with_counter(sd15.model)
    bad = torch.zeros(1, 4, 16, 16)
    bad[0, 0, 3, 3] = float("nan")
    with pytest.raises(inputs.InputError, match=r"TFG ASGDiffusion: input 'latent_image' holds NaN"):
        _execute(asg, sd15, model, latent=bad)
    positive = [[sd15.positive[0][0].clone().fill_(float("inf")), sd15.positive[0][1]]]
    with pytest.raises(inputs.InputError, match=r"input 'positive' holds NaN or infinite"):
        _execute(asg, sd15, model, positive=positive)
    with pytest.raises(ValueError, match=r"\[model family: SD1.x\]: latent_image 32x32 px split 2x2 .* native patches "
                                         r"of 16x16 px; ASGDiffusion needs at least 64 px.*Fix: use a larger latent"):
        _execute(asg, sd15, model, latent=torch.zeros(1, 4, 4, 4))
    monkeypatch.setattr(comfy.model_management, "get_free_memory", lambda *a, **k: 2 ** 20)
    with pytest.raises(ValueError, match=r"TFG ASGDiffusion \[model family: SD1.x\]: this run needs about .* on cpu "
                                         r"\(target latents 128x128 x1.*largest step: model call on .*\), but only "
                                         r"1.0 MiB is free.*Fix: use a smaller target"):
        _execute(asg, sd15, model)
    assert counts["calls"] == 0


def test_memory_estimate_follows_patches_and_windows(sd15, asg):
    p = asg.ASGParams(scale_width=2, scale_height=2, window_batch=2, mask="cross_attention")
    est = asg.estimate_memory(sd15.model, p, (1, 4, 16, 16))
    phases = dict(est.phases["cpu"])
    one = sd15.model.model.memory_required((1, 4, 8, 8))
    assert phases["model call on 4 patches of 64x64"] == int(4 * one) + 2 ** 26, "4 patch rows + the mask's scores"
    assert phases["model call on 2 windows of 64x64"] == int(sd15.model.model.memory_required((2, 4, 8, 8)))
    patches_only = dict(asg.estimate_memory(sd15.model, p.replace(structure_fraction=1.0, mask="none"),
                                            (1, 4, 16, 16)).phases["cpu"])
    assert patches_only == {"model call on 4 patches of 64x64": int(4 * one)}, "no windows, no mask scores"


def test_next_run_after_an_error_or_an_interrupt_equals_a_fresh_run(sd15, asg, monkeypatch):
    import comfy.model_management
    import comfy.utils
    fresh = _execute(asg, sd15)
    with monkeypatch.context() as m:
        m.setattr(comfy.model_management, "get_free_memory", lambda *a, **k: 2 ** 20)
        with pytest.raises(ValueError, match="only 1.0 MiB is free"):
            _execute(asg, sd15)
    previous = comfy.utils.PROGRESS_BAR_HOOK
    comfy.utils.set_progress_bar_global_hook(
        lambda *a, **k: comfy.model_management.interrupt_current_processing(True))
    try:
        with pytest.raises(comfy.model_management.InterruptProcessingException):
            _execute(asg, sd15)
    finally:
        comfy.utils.set_progress_bar_global_hook(previous)
        comfy.model_management.interrupt_current_processing(False)
    assert torch.equal(_execute(asg, sd15), fresh)


@pytest.mark.parametrize("family", ["sdxl", "sd3", "flux"])
def test_runs_at_its_defaults(family, asg, comfy_root, tmp_path_factory):
    """Every input at its default (mask auto: the cross-attention mask on SDXL, unmasked on SD3/Flux) on an empty
    latent of twice the tiny model's native size: the defaults validate and the node runs. (SD1.x takes the same
    UNet path as SDXL; its tiny model costs ~0.5 s per call, so its 100 default calls are left out.)"""
    from sampling_helpers import get_setup
    setup = get_setup(family, tmp_path_factory)
    node = asg.ASGDiffusion
    assert node.validate_inputs(**{w.name: node.INPUTS.default(w) for w in node.INPUTS.widgets}) is True
    model, counts = with_counter(setup.model)
    with torch.inference_mode():
        out = node.execute(model=model, positive=setup.positive, negative=setup.negative,
                           latent_image={"samples": torch.zeros(1, setup.latent_channels, 2 * N, 2 * N)}).args[0]
    assert out["samples"].shape == (1, setup.latent_channels, 2 * N, 2 * N)
    assert bool(torch.isfinite(out["samples"]).all())
    # 25 structure steps (one call of 4 patches) + 25 detail steps (9 windows in batches of 4: 3 calls)
    assert counts["calls"] == 25 + 25 * 3, counts
    expected = "cross_attention" if setup.family == "sdxl" else "none"
    assert asg.with_resolved_mask(asg.DEFAULTS, asg.adapters.detect_family(setup.model)).mask == expected


def test_auto_mask_is_the_cross_attention_mask_on_sd15(sd15, asg):
    family = asg.adapters.detect_family(sd15.model)
    assert asg.DEFAULTS.mask == "auto" and asg.with_resolved_mask(asg.DEFAULTS, family).mask == "cross_attention"
    _, stats = run(asg, sd15, mask="auto", guidance_scale=0.8)
    assert stats.masked_evaluations == stats.structure_evaluations == 2


def test_pixel_interaction_changes_the_result(sd15, asg):
    a, _ = run(asg, sd15, pixel_interaction=True, guidance_scale=0.0)
    b, _ = run(asg, sd15, pixel_interaction=False, guidance_scale=0.0)
    assert not torch.equal(a, b)


def test_invalid_scale_rejected_before_the_run(sd15, asg):
    for bad, why in ((0, "at least 1"), (9, "at most 8"), (1.5, "whole number")):
        msg = asg.ASGDiffusion.validate_inputs(scale_width=bad, scale_height=2)
        assert isinstance(msg, str) and "'scale_width'" in msg and why in msg, msg
    assert asg.ASGDiffusion.validate_inputs(scale_width=3, scale_height=1) is True
    assert asg.ASGDiffusion.validate_inputs(scale_width=None, scale_height=2) is True
    # a latent that does not split into whole patches: refused before the first model call
    model, counts = with_counter(sd15.model)
    with pytest.raises(ValueError, match=r"TFG ASGDiffusion \[model family: SD1.x\].*integer scale factors.*"
                                         r"width 120 px / 2 = 60 px"):
        run(asg, sd15, model=model, latent=torch.zeros(1, 4, 16, 15))
    with pytest.raises(ValueError, match="scale_height must be a whole number"):
        run(asg, sd15, model=model, scale_height=0)
    assert counts["calls"] == 0


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_cross_attention_mask_on_joint_attention_models_is_a_clear_error(comfy_root, asg, tmp_path_factory,
                                                                         family):
    from sampling_helpers import get_setup
    s = get_setup(family, tmp_path_factory)
    name = {"sd3": "SD3", "flux": "Flux"}[family]
    with pytest.raises(ValueError, match=rf"\[model family: {name}\].*mask to auto or none"):
        run(asg, s, mask="cross_attention", guidance_scale=0.5)


def test_regional_conditioning_is_refused(sd15, asg):
    positive = [[sd15.positive[0][0], {**sd15.positive[0][1], "area": (8, 8, 0, 0)}]]
    with pytest.raises(ValueError, match="area conditioning"):
        with torch.inference_mode():
            asg.sample_asg(sd15.model, positive, sd15.negative, 1, STEPS, 5.0, "euler", "normal",
                           params(asg, sd15), {"samples": torch.zeros(1, 4, 16, 16)})


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


def test_one_progress_bar_over_both_stages_with_previews(sd15, asg, monkeypatch):
    """ComfyUI's KSampler progress (latent_preview.prepare_callback) counts the global step across both stages and
    carries the preview image when a preview method is set."""
    import comfy.utils
    import latent_preview
    from comfy.cli_args import LatentPreviewMethod, args
    updates = []
    previous = comfy.utils.PROGRESS_BAR_HOOK
    monkeypatch.setattr(args, "preview_method", LatentPreviewMethod.Latent2RGB)
    monkeypatch.setattr(latent_preview, "default_preview_method", LatentPreviewMethod.Latent2RGB, raising=False)
    comfy.utils.set_progress_bar_global_hook(
        lambda value, total, preview, node_id=None: updates.append((value, total, preview is not None)))
    try:
        run(asg, sd15)
    finally:
        comfy.utils.set_progress_bar_global_hook(previous)
    assert [(v, t) for v, t, _ in updates] == [(i, STEPS) for i in range(1, STEPS + 1)]
    assert all(has_preview for _, _, has_preview in updates)


def test_other_samplers_run_both_stages(sd15, asg):
    """A multistep, an ancestral and a two-evaluation sampler on the smallest grid with both stages (2x1)."""
    for sampler in ("dpmpp_2m", "euler_ancestral", "heun"):
        out, stats = run(asg, sd15, sampler=sampler, scale_width=2, scale_height=1)
        assert bool(torch.isfinite(out).all()) and stats.detail_steps == STEPS // 2
        # heun: two evaluations per structure step (the stage ends at a non-zero sigma)
        assert stats.structure_evaluations == (2 if sampler == "heun" else 1) * (STEPS // 2)


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
    """4x the base area (2x2 patches of a 16x16 native latent) on tiny SDXL: every model call holds at most
    max(K, window_batch) native-size rows per CFG half, never the whole target; the RSS peak is reported next to
    a direct target-size KSampler run (the tiny model's weights are a few MiB, so activations dominate)."""
    from sampling_helpers import get_setup
    import comfy.patcher_extension
    import nodes
    s = get_setup("sdxl", tmp_path_factory)
    native = 16
    rows = []

    def apply_model(executor, x, t, *args, **kwargs):
        rows.append(tuple(x.shape))
        return executor(x, t, *args, **kwargs)

    m = s.model.clone()
    m.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, "test.rows", apply_model)
    target = torch.zeros(1, s.latent_channels, 2 * native, 2 * native)
    base, peak = _peak_rss_during(lambda: run(asg, s, model=m, window_batch=4, latent=target))
    assert max(r[0] for r in rows) <= 2 * 4, rows
    assert all(r[2:] == (native, native) for r in rows), "every call is native size"

    def direct():
        with torch.inference_mode():
            nodes.common_ksampler(s.model, 7, STEPS, 5.0, "euler", "normal", s.positive, s.negative,
                                  {"samples": target.clone()})

    dbase, dpeak = _peak_rss_during(direct)
    with capsys.disabled():
        print(f"\n[ASG memory, tiny SDXL, native 16x16 latent, target 32x32 (4x area)] ASG peak RSS "
              f"+{(peak - base) / 2**20:.1f} MiB (largest call {max(rows)}); direct 32x32 KSampler "
              f"+{(dpeak - dbase) / 2**20:.1f} MiB")


# ------------------------------------------------------------------------------------------------
# Over HTTP, on the real server
# ------------------------------------------------------------------------------------------------
def _asg_only(size: int, steps: int = 2) -> tuple[dict, str]:
    """The shipped ASG workflow with only the ASG branch kept (with a valid other branch ComfyUI would queue that
    one, HTTP 200, and still list the ASG node's error)."""
    from headless_server import load_api_workflow
    prompt = load_api_workflow("asg_sdxl.json", size=size, steps=steps)
    asg_id = next(k for k, n in prompt.items() if n["class_type"] == "TFG_ASGDiffusion")
    keep = {asg_id}
    for node_id, node in prompt.items():
        if node["class_type"] in ("VAEDecode",) and node["inputs"]["samples"][0] == asg_id:
            keep.add(node_id)
    for node_id, node in list(prompt.items()):
        if node["class_type"] in ("KSampler", "VAEDecode", "SaveImage") and node_id not in keep and not (
                node["class_type"] == "SaveImage" and node["inputs"]["images"][0] in keep):
            del prompt[node_id]
    return prompt, asg_id


@pytest.mark.parametrize("bad", [0, 9])
def test_invalid_scale_is_an_http_400_before_the_run(comfy_server, bad):
    prompt, asg_id = _asg_only(64)
    prompt[asg_id]["inputs"]["scale_width"] = bad
    status, data = comfy_server.post_prompt(prompt)
    assert status == 400, data
    assert set(data["node_errors"]) == {asg_id}, data["node_errors"]
    assert "input 'scale_width' must be at" in repr(data["node_errors"][asg_id]["errors"])


def test_linked_numeric_inputs_run_over_http_like_typed_ones(comfy_server, asg):
    """Every numeric widget fed by a PrimitiveInt / PrimitiveFloat node: accepted by validation, runs, and gives the
    image of the same values typed in; an unknown choice is an HTTP 400 naming the input; the server stays up."""
    typed, asg_id = _asg_only(128)
    linked = json.loads(json.dumps(typed))
    primitive = {"int": "PrimitiveInt", "float": "PrimitiveFloat"}
    for n, w in enumerate(w for w in asg.ASGDiffusion.INPUTS.widgets if w.kind in primitive):
        linked[f"p{n}"] = {"class_type": primitive[w.kind], "inputs": {"value": linked[asg_id]["inputs"][w.name]}}
        linked[asg_id]["inputs"][w.name] = [f"p{n}", 0]
    a = comfy_server.images_by_node(comfy_server.run_prompt(linked, timeout=600))
    b = comfy_server.images_by_node(comfy_server.run_prompt(typed, timeout=600))
    assert a and set(a) == set(b) and all((x == y).all() for k in a for x, y in zip(a[k], b[k]))
    for name in ("sampler_name", "scheduler", "mask", "blend"):
        bad = json.loads(json.dumps(typed))
        bad[asg_id]["inputs"][name] = "no-such-option"
        status, data = comfy_server.post_prompt(bad)
        assert status == 400 and f"'{name}'" in repr(data["node_errors"][asg_id]["errors"]), (name, data)


def test_latent_not_divisible_by_the_scale_fails_naming_node_and_family(comfy_server):
    from headless_server import load_api_workflow
    prompt = load_api_workflow("asg_sdxl.json", size=72, steps=2)  # 9x9 latent, 2x2 patches
    entry = comfy_server.run_prompt(prompt, check=False)
    assert entry["status"]["status_str"] == "error"
    message = [m for m in entry["status"]["messages"] if m[0] == "execution_error"][0][1]["exception_message"]
    assert "TFG ASGDiffusion [model family: SDXL]" in message and "integer scale factors" in message, message


def test_mask_patches_chain_an_existing_attn2_replace(sd15, asg):
    """Another node's attn2 replace on an output block keeps running (our recorder chains to it), and the mask is
    still recorded."""
    from comfy.ldm.modules import attention
    block, index = asg.cross_attention_layers(sd15.model)[0]
    seen = []

    def other(q, k, v, extra_options):
        seen.append(q.shape[0])
        return attention.optimized_attention(q, k, v, extra_options["n_heads"],
                                             attn_precision=extra_options.get("attn_precision"),
                                             transformer_options=extra_options)

    m = sd15.model.clone()
    m.set_model_attn2_replace(other, "output", block, index)
    _, stats = run(asg, sd15, model=m, guidance_scale=0.8, mask="cross_attention")
    assert stats.masked_evaluations == 2
    assert seen.count(2 * 4) == 2, "structure stage: 4 patches x (cond, uncond) through the other patch"
    assert len(seen) == 4, "detail stage calls it too (2 steps x 1 window batch)"
