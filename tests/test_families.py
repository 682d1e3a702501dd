"""The newer model families (Wan 2.1/2.2, HunyuanVideo, LTX-Video, Qwen-Image, Chroma, SD3.5): detection through
ComfyUI's own config classes, and Adaptive Guidance / LinearAG on tiny random-weight models of each real
architecture (5-D latents for video) — exact model-row counts, bit-identity with ComfyUI's CFG at neutral settings,
KSampler and SamplerCustomAdvanced paths."""
from __future__ import annotations

import torch

import tiny_dit_models
from sampling_helpers import with_counter

STEPS = 3
CFG = 4.0
DIT_FAMILIES = {
    # builder: (family key, family name)
    "wan21_t2v": ("wan", "Wan 2.1"),
    "wan21_i2v": ("wan", "Wan 2.1 I2V"),
    "wan22_t2v": ("wan", "Wan 2.2"),
    "hunyuan_video": ("hunyuan_video", "HunyuanVideo"),
    "ltxv": ("ltxv", "LTX-Video"),
    "qwen_image": ("qwen_image", "Qwen-Image"),
    "chroma": ("chroma", "Chroma"),
    "sd35": ("sd3", "SD3.5"),
}
AG_NEUTRAL = dict(threshold=0.0, space="x0", start_percent=1.0, decision="per_sample", crossing_step="cond")
AG_LATCH_AT_ONCE = dict(threshold=0.0, space="x0", start_percent=0.0, decision="per_sample", crossing_step="cond")


def ksample(d, model, batch=2, cfg=CFG):
    return tiny_dit_models.ksample(d, model, STEPS, cfg, batch)


def advanced_sample(d, guider, batch=2):
    import comfy.samplers
    sigmas = comfy.samplers.calculate_sigmas(guider.model_patcher.get_model_object("model_sampling"), "normal", STEPS)
    latent = d.latent(batch)
    with torch.inference_mode():
        return guider.sample(tiny_dit_models.noise(latent), latent, comfy.samplers.sampler_object("euler"), sigmas,
                             disable_pbar=True, seed=0).clone()


def test_detected_through_comfyui_config_classes(dit, adapters):
    name, d = dit
    family = adapters.detect_family(d.model)
    assert (family.key, family.name) == DIT_FAMILIES[name]
    assert family.supported and family.is_flow
    assert family.is_video == (family.key in ("wan", "hunyuan_video", "ltxv"))
    assert d.latent(2).ndim == (5 if family.is_video or family.key == "qwen_image" else 4)


def test_adaptive_guidance_neutral_is_bit_identical_to_cfg(dit, ag):
    _, d = dit
    patched = ag.AdaptiveGuidance.execute(model=d.model, **AG_NEUTRAL).args[0]
    assert torch.equal(ksample(d, d.model), ksample(d, patched))


def test_adaptive_guidance_latch_counts_rows_exactly(dit, ag):
    """Latched at the first evaluation: both images drop their uncond rows from step 1 on."""
    _, d = dit
    counted, counts = with_counter(ag.AdaptiveGuidance.execute(model=d.model, **AG_LATCH_AT_ONCE).args[0])
    out = ksample(d, counted, batch=2)
    assert torch.isfinite(out).all() and out.shape == d.latent(2).shape
    assert (counts["cond"], counts["uncond"]) == (2 * STEPS, 2)
    base_counted, base = with_counter(d.model)
    ksample(d, base_counted, batch=2)
    assert (base["cond"], base["uncond"]) == (2 * STEPS, 2 * STEPS)


def test_adaptive_guider_on_sampler_custom_advanced(dit, ag):
    import comfy.samplers
    _, d = dit
    plain = comfy.samplers.CFGGuider(d.model)
    plain.set_conds(d.positive, d.negative)
    plain.set_cfg(CFG)
    neutral = ag.AdaptiveGuiderNode.execute(model=d.model, positive=d.positive, negative=d.negative, cfg=CFG,
                                            **AG_NEUTRAL).args[0]
    assert torch.equal(advanced_sample(d, plain), advanced_sample(d, neutral))
    latched = ag.AdaptiveGuiderNode.execute(model=d.model, positive=d.positive, negative=d.negative, cfg=CFG,
                                            **AG_LATCH_AT_ONCE).args[0]
    assert torch.isfinite(advanced_sample(d, latched)).all()
    # two images: 2 × (STEPS cond + 1 uncond) of 2 × 2 × STEPS
    assert f"model passes {2 * (STEPS + 1)} of {4 * STEPS}" in latched.tfg_adaptive_guidance_report


def test_linear_ag_online_estimator_counts(dit, la):
    """hold_delta over the first two thirds: step 1 is estimated (cond only), step 2 cond only (paper's 'after')."""
    _, d = dit
    model = la.LinearAG.execute(model=d.model, estimator="hold_delta", estimate_until=0.67, after="cond_only",
                                threshold=0.995, space="x0", start_percent=0.0, decision="per_sample",
                                crossing_step="cond", coefficients=None).args[0]
    counted, counts = with_counter(model)
    out = ksample(d, counted, batch=2)
    assert torch.isfinite(out).all()
    assert counts["cond"] == 2 * STEPS
    assert counts["uncond"] < 2 * STEPS
