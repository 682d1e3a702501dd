"""Adaptive Guidance and LinearAG with ComfyUI's context windows (comfy_extras/nodes_context_windows.py): the core
Context Windows node splits a long latent into windows and calls calc_cond_batch once per window; AG keeps one latch
per window, so each window latches on its own evidence. Tested on the tiny Wan 2.1 T2V model (5-D latents, windows
over the latent frames, dim 2) and on SD1.5 with frames as the batch (dim 0)."""
from __future__ import annotations

import logging

import pytest
import torch

import tiny_dit_models
from sampling_helpers import with_counter

STEPS = 3
CFG = 4.0
FRAMES = 4
WINDOWS = [(0, 1), (1, 2), (2, 3)]
"""standard_static windows of length 2, overlap 1, over 4 latent frames."""
NEUTRAL = dict(threshold=0.0, start_percent=1.0)
LATCH_AT_ONCE = dict(threshold=0.0, start_percent=0.0)
NEVER_BUT_EQUAL = dict(threshold=0.9999, space="eps")
"""Latches only where cond == uncond: the tiny model's eps cosines stay below 0.9999 otherwise."""


@pytest.fixture(scope="module")
def wan(comfy_root):
    return tiny_dit_models.get("wan21_t2v")


def windowed(model, schedule="standard_static", length=2, overlap=1, dim=2):
    """The model as ComfyUI's WAN Context Windows (Manual) node (dim 2; lengths in pixel frames, 4 per latent
    frame) or Context Windows (Manual) node (other dims) returns it; `length`, `overlap` in latent frames."""
    from comfy_extras.nodes_context_windows import ContextWindowsManualNode, WanContextWindowsManualNode
    if dim == 2:
        return WanContextWindowsManualNode.execute(model, 4 * (length - 1) + 1, 4 * (overlap - 1) + 1, schedule, 1,
                                                   False, "pyramid").result[0]
    return ContextWindowsManualNode.execute(model, length, overlap, schedule, 1, False, "pyramid", dim).result[0]


def sample(d, model, frames=FRAMES, batch=1, cfg=CFG):
    import comfy.sample
    latent = d.latent(batch, frames=frames)
    with torch.inference_mode():
        return comfy.sample.sample(model, tiny_dit_models.noise(latent), STEPS, cfg, "euler", "normal", d.positive,
                                   d.negative, latent, disable_pbar=True, seed=0).clone()


def guided(d, model, frames=FRAMES):
    """Sample through CFGGuider (SamplerCustomAdvanced's path) and return (output, AG's report)."""
    import comfy.samplers
    guider = comfy.samplers.CFGGuider(model)
    guider.set_conds(d.positive, d.negative)
    guider.set_cfg(CFG)
    sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "normal", STEPS)
    latent = d.latent(1, frames=frames)
    with torch.inference_mode():
        out = guider.sample(tiny_dit_models.noise(latent), latent, comfy.samplers.sampler_object("euler"), sigmas,
                            disable_pbar=True, seed=0).clone()
    return out, guider.tfg_adaptive_guidance_report if hasattr(guider, "tfg_adaptive_guidance_report") else None


def agree_in_window(model, window):
    """Clone on which the uncond pass sees the positive prompt inside `window` (its frame indices): there the
    cond and uncond predictions are equal (cosine 1), so that window, and no other, has evidence to latch."""
    import comfy.patcher_extension

    def apply_model(executor, x, t, c_concat=None, c_crossattn=None, control=None, transformer_options=None,
                    **kwargs):
        current = (transformer_options or {}).get("context_window")
        kinds = (transformer_options or {}).get("cond_or_uncond", [])
        if current is not None and tuple(current.index_list) == window and 0 in kinds and 1 in kinds:
            rows = c_crossattn.shape[0] // len(kinds)
            cond_rows = c_crossattn[kinds.index(0) * rows:(kinds.index(0) + 1) * rows]
            c_crossattn = cond_rows.repeat(len(kinds), *([1] * (c_crossattn.dim() - 1)))
        return executor(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)

    m = model.clone()
    m.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, "test.agree", apply_model)
    return m


def test_neutral_ag_with_context_windows_is_comfyui_cfg_bit_for_bit(wan, ag):
    base = windowed(wan.model)
    patched, _ = ag.apply_adaptive_guidance(base, ag.AdaptiveGuidanceParams(**NEUTRAL))
    counted, counts = with_counter(patched)
    torch.testing.assert_close(sample(wan, counted), sample(wan, base), rtol=0, atol=0)
    assert counts == {"cond": len(WINDOWS) * STEPS, "uncond": len(WINDOWS) * STEPS, "calls": len(WINDOWS) * STEPS}


def test_each_window_latches_on_its_own_evidence(wan, ag):
    """Only window 0-1 sees cond == uncond: it latches at step 0 and runs cond-only from step 1; the other
    windows keep CFG. Exact rows per pass kind."""
    base = windowed(agree_in_window(wan.model, WINDOWS[0]))
    patched, _ = ag.apply_adaptive_guidance(base, ag.AdaptiveGuidanceParams(**NEVER_BUT_EQUAL))
    counted, counts = with_counter(patched)
    out, report = guided(wan, counted)
    assert torch.isfinite(out).all()
    windows = len(WINDOWS)
    assert counts == {"cond": windows * STEPS, "uncond": windows + (windows - 1) * (STEPS - 1),
                      "calls": windows * STEPS}
    assert report.startswith(f"{windows} context windows: ")
    lanes = dict(part.split("] ", 1) for part in report.removeprefix(f"{windows} context windows: ").split(" | ")[:-1])
    assert set(lanes) == {"[window 0-1", "[window 1-2", "[window 2-3"}
    assert "latched: sample 0 at step 0;" in lanes["[window 0-1"]
    assert "latched: never;" in lanes["[window 1-2"] and "latched: never;" in lanes["[window 2-3"]
    assert f"model passes {STEPS + 1} of {2 * STEPS}" in lanes["[window 0-1"]
    assert report.endswith(f"all windows: model passes {windows * STEPS + windows + (windows - 1) * (STEPS - 1)} of "
                           f"{windows * 2 * STEPS} (11.1% saved)")


def test_the_latched_window_hands_its_cond_on(wan, ag):
    """A latched window contributes its cond prediction as the uncond, so where every window covering a frame has
    latched, the result is ComfyUI's cond-only (cfg 1) sampling with the same windows."""
    base = windowed(wan.model)
    patched, _ = ag.apply_adaptive_guidance(base, ag.AdaptiveGuidanceParams(**LATCH_AT_ONCE))
    counted, counts = with_counter(patched)
    out = sample(wan, counted)
    assert counts == {"cond": len(WINDOWS) * STEPS, "uncond": len(WINDOWS), "calls": len(WINDOWS) * STEPS}
    # step 0 is CFG everywhere, later steps cond-only: different from full CFG and from cfg 1 throughout
    assert not torch.equal(out, sample(wan, base)) and not torch.equal(out, sample(wan, base, cfg=1.0))


def test_window_counts_equal_one_window_long_runs(wan, la):
    """LinearAG's schedule runs per window: with 3 windows, 3x the passes of a run on one window's frames."""
    params = la.LinearAGParams().replace(estimator="hold_delta")
    short, short_counts = with_counter(la.apply_linear_ag(wan.model, params, None, "LinearAG"))
    sample(wan, short, frames=2)
    long, long_counts = with_counter(la.apply_linear_ag(windowed(wan.model), params, None, "LinearAG"))
    out = sample(wan, long)
    assert torch.isfinite(out).all()
    assert short_counts["uncond"] < short_counts["cond"]  # the schedule estimated some unconds
    assert long_counts == {k: len(WINDOWS) * v for k, v in short_counts.items()}


def test_moving_windows_warn_once(wan, ag, caplog):
    """looped_uniform moves its windows between steps (4 latent frames: [3, 0] appears at step 1): AG says a moved
    window starts unlatched. (standard_uniform only reorders the same windows at this size: no warning.)"""
    patched, _ = ag.apply_adaptive_guidance(windowed(wan.model, "looped_uniform"),
                                            ag.AdaptiveGuidanceParams(**LATCH_AT_ONCE))
    with caplog.at_level(logging.WARNING):
        assert torch.isfinite(sample(wan, patched)).all()
    moved = [r for r in caplog.records if "moved its windows" in r.getMessage()]
    assert len(moved) == 1 and "standard_static" in moved[0].getMessage()
    reordered, _ = ag.apply_adaptive_guidance(windowed(wan.model, "standard_uniform"),
                                              ag.AdaptiveGuidanceParams(**LATCH_AT_ONCE))
    caplog.clear()
    counted, counts = with_counter(reordered)
    with caplog.at_level(logging.WARNING):
        sample(wan, counted)
    assert not [r for r in caplog.records if "moved its windows" in r.getMessage()]
    assert counts["uncond"] == len(WINDOWS)  # the same three windows, each latched at step 0


def test_frames_as_batch_windows_latch_per_frame(sd15, ag):
    """SD1.5 with frames as the batch (dim 0, AnimateDiff-style): rows of a window are its frames; at neutral the
    result is ComfyUI's windowed CFG bit for bit, latched at once every window runs cond-only after step 0."""
    import nodes
    base = windowed(sd15.model, length=2, overlap=1, dim=0)

    def run(model):
        with torch.inference_mode():
            return nodes.common_ksampler(model, 7, STEPS, 5.0, "euler", "normal", sd15.positive, sd15.negative,
                                         {"samples": sd15.latent(FRAMES)}, denoise=1.0)[0]["samples"].clone()

    neutral, _ = ag.apply_adaptive_guidance(base, ag.AdaptiveGuidanceParams(**NEUTRAL))
    torch.testing.assert_close(run(neutral), run(base), rtol=0, atol=0)
    latched, _ = ag.apply_adaptive_guidance(base, ag.AdaptiveGuidanceParams(**LATCH_AT_ONCE))
    counted, counts = with_counter(latched)
    assert torch.isfinite(run(counted)).all()
    rows = 2 * len(WINDOWS)  # each window: 2 frames
    assert counts == {"cond": rows * STEPS, "uncond": rows, "calls": len(WINDOWS) * STEPS}


def test_linear_ag_recording_refuses_context_windows(wan, la):
    recording = la.LinearAGRecording(history=2)
    m = la.install_recorder(windowed(wan.model), recording, "LinearAG Record")
    with pytest.raises(ValueError, match=r"LinearAG Record \[model family: Wan 2.1\]: context windows are active"):
        sample(wan, m)
