"""StyleSSP kernels (frequency manipulation, start point): the maths, pure torch, no ComfyUI."""
from __future__ import annotations

import math

import pytest
import torch

import host

F = host.pack_module("kernels.frequency")
K = host.pack_module("kernels.stylessp")

# The reference's gain profile on a (4, 128, 128) SDXL latent (research notes §A.4), along the width axis from
# the zero frequency (k = 0, 8, ..., 63 of 64), for the channel rows u_c = 0, +-0.5, -1.
REFERENCE_PROFILE = {
    2: [0.70, 0.72, 0.78, 0.84, 0.88, 0.90, 0.90, 0.86],
    3: [0.70, 0.71, 0.72, 0.73, 0.75, 0.75, 0.75, 0.74],
    0: [0.70, 0.70, 0.70, 0.70, 0.70, 0.70, 0.70, 0.70],
}


def latent(shape=(1, 4, 16, 16), seed=0, dtype=torch.float32):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def literal_band_mask(shape, d_s, d_t, d_l=0.3):
    """A loop-by-loop restatement of the reference's gaussian_band_pass_filter."""
    t_, h_, w_ = shape
    m = torch.zeros(shape, dtype=torch.float64)
    for t in range(t_):
        for h in range(h_):
            for w in range(w_):
                lp = ((d_s / d_l) * (2 * t / t_ - 1)) ** 2 + (2 * h / h_ - 1) ** 2 + (2 * w / w_ - 1) ** 2
                hp = ((d_t / d_l) * (2 * t / t_ - 1)) ** 2 + (2 * h / h_ - 1) ** 2 + (2 * w / w_ - 1) ** 2
                m[t, h, w] = math.exp(-1 / (2 * d_s ** 2) * lp) + (1 - math.exp(-1 / (2 * d_t ** 2) * hp))
    return m


def test_defaults_are_the_official_values():
    p = K.StyleSSPParams()
    assert p.validate() == []
    assert (p.mode, p.alpha, p.d_s, p.d_t, p.d_l, p.noise_strength, p.content_weight, p.schedule, p.skip_steps) == \
        ("faithful", 0.7, 0.3, 0.9, 0.3, 0.3, 0.2, "reference", 1)
    assert (p.seed, p.steps, p.sampling_cfg) == (1234, 50, 5.0)
    inv = p.inversion  # the official inversion: infer_style.py's settings over src/config.py's
    assert (inv.cfg, inv.renoise_steps, inv.average, inv.noise_regularization) == (1.5, 1, "reference", True)
    assert (inv.lambda_kl, inv.lambda_ac, inv.regularization_steps, inv.ac_rolls) == (0.065, 20.0, 4, 5)
    assert inv.validate() == []
    assert "renoise_steps" in " ".join(K.StyleSSPParams(inversion=inv.replace(renoise_steps=-1)).validate())
    assert "seed" in " ".join(K.StyleSSPParams(seed=-1).validate())
    bad = " ".join(K.StyleSSPParams(mode="x", alpha=-1, noise_strength=-1, skip_steps=-1).validate())
    for word in ("mode", "alpha", "noise_strength", "skip_steps"):
        assert word in bad


@pytest.mark.parametrize("shape", [(4, 6, 8), (16, 5, 7), (3, 4, 4)])
def test_band_mask_matches_the_reference_loops(shape):
    assert torch.allclose(F.reference_band_mask(*shape, d_s=0.3, d_t=0.9), literal_band_mask(shape, 0.3, 0.9),
                          atol=1e-12)
    assert torch.equal(F.reference_band_mask(*shape, d_s=0.0, d_t=0.9), torch.zeros(shape, dtype=torch.float64))


def test_faithful_gain_profile_matches_the_reference():
    g = K.faithful_gain(4, 128, 128)
    assert float(g[2, 64, 64]) == pytest.approx(0.70, abs=1e-9), "gain 0.70 at DC"
    for row, expected in REFERENCE_PROFILE.items():
        got = [float(g[row, 64, 64 + k]) for k in (0, 8, 16, 24, 32, 40, 48, 63)]
        assert got == pytest.approx(expected, abs=0.006), (row, got)
    assert float(g.min()) == pytest.approx(0.70, abs=1e-6) and float(g.max()) < 0.905


def test_faithful_filter_scales_the_dc_by_alpha_and_is_3d():
    # a constant volume is pure DC: gain 0.7
    x = torch.full((1, 4, 16, 16), 2.0)
    used, other = K.faithful_filter(x)
    assert torch.allclose(used, 0.7 * x, atol=1e-6) and torch.allclose(other, x, atol=1e-6)
    # the channel axis is inside the FFT: a mid spatial frequency identical in every channel (channel DC) keeps
    # ~0.9, the same wave with alternating channel signs (a cross-channel frequency) only ~0.7 - a per-channel
    # 2-D filter could not tell them apart
    k = 5
    wave = torch.cos(2 * math.pi * k * torch.arange(16) / 16).view(1, 1, 1, 16).expand(1, 4, 16, 16)
    g = K.faithful_gain(4, 16, 16)
    used, _ = K.faithful_filter(wave)
    assert torch.allclose(used, float(g[2, 8, 8 + k]) * wave, atol=1e-6) and 0.85 < float(g[2, 8, 8 + k]) < 0.91
    signs = torch.tensor([1.0, -1.0, 1.0, -1.0]).view(1, 4, 1, 1)
    used, _ = K.faithful_filter(wave * signs)
    assert torch.allclose(used, float(g[0, 8, 8 + k]) * wave * signs, atol=1e-6) and float(g[0, 8, 8 + k]) < 0.71


def test_faithful_manipulation_adds_range_matched_noise():
    x, n = latent(), latent(seed=1)
    used, other = K.faithful_filter(x)
    out = K.manipulate(x, n, K.StyleSSPParams())
    added = out - used
    assert float(added.max() - added.min()) == pytest.approx(0.3 * float(other.max() - other.min()), rel=1e-5)
    assert torch.allclose(added / 0.3, K.range_matched(n, other), atol=1e-5)
    # neutral settings give the input back
    neutral = K.manipulate(x, n, K.StyleSSPParams(alpha=1.0, noise_strength=0.0))
    assert torch.allclose(neutral, x, atol=1e-6)


def test_improved_filter_reaches_its_stated_attenuation():
    p = K.StyleSSPParams(mode="improved", radius=0.25, strength=0.4, noise_strength=0.0)
    # per-channel constants (2-D DC of each channel): exactly 1 - strength
    x = torch.arange(1.0, 5.0).view(1, 4, 1, 1).expand(2, 4, 16, 16).contiguous()
    assert torch.allclose(K.manipulate(x, torch.zeros_like(x), p), 0.6 * x, atol=1e-5)
    # a wave at r = radius: 1 - strength * exp(-1/2); the Nyquist checkerboard: ~ unchanged
    gain = F.gaussian_lowfreq_gain(16, 16, 0.25, 0.4)
    assert float(gain[8, 8]) == pytest.approx(0.6, abs=1e-12)
    assert float(gain[8, 8 + 2]) == pytest.approx(1 - 0.4 * math.exp(-0.5), abs=1e-12)  # u = 2*10/16 - 1 = 0.25
    checker = ((torch.arange(16).view(-1, 1) + torch.arange(16).view(1, -1)) % 2 * 2.0 - 1.0).expand(1, 4, 16, 16)
    assert torch.allclose(K.improved_filter(checker, p), checker, atol=1e-6)
    assert torch.equal(F.gaussian_lowfreq_gain(8, 8, 0.0, 0.4), torch.ones(8, 8, dtype=torch.float64))


def test_improved_noise_is_std_matched_per_channel():
    x, n = latent((2, 4, 16, 16)), latent((2, 4, 16, 16), seed=3)
    p = K.StyleSSPParams(mode="improved", noise_strength=0.5)
    filtered = K.improved_filter(x, p)
    added = K.manipulate(x, n, p) - filtered
    assert torch.allclose(added.std(dim=(2, 3)), 0.5 * filtered.std(dim=(2, 3)), rtol=1e-4)


@pytest.mark.parametrize("mode", K.MODES)
def test_fp16_in_fp16_out_computed_in_high_precision(mode):
    x, n = latent(dtype=torch.float16), latent(seed=1)
    p = K.StyleSSPParams(mode=mode)
    out = K.manipulate(x, n, p)
    assert out.dtype == torch.float16 and torch.isfinite(out).all()
    ref = K.manipulate(x.float(), n, p)
    assert torch.allclose(out.float(), ref, atol=2e-3, rtol=2e-3)
    for name in ("faithful_filter", "improved_filter"):
        got = getattr(K, name)(x, p)
        got = got[0] if isinstance(got, tuple) else got
        assert got.dtype == torch.float16


def test_start_point_arithmetic_and_no_mutation():
    m, c, n = latent(), latent(seed=1), latent(seed=2)
    before = m.clone()
    out = K.start_point(m, c, n, state_scale=0.9, noise_gain=3.0, latent_gain=1.0, content_weight=0.2)
    assert torch.allclose(out, 0.9 * m + 0.2 * (3.0 * n + c), atol=1e-6)
    assert torch.equal(m, before)
    assert torch.equal(K.start_point(m, c, n, 1.0, 3.0, 1.0, 0.0), m)


def test_reference_resume_timesteps_are_diffusers_unipc_leading():
    # diffusers 0.30 UniPCMultistepScheduler, timestep_spacing "leading", steps_offset 1, 50 steps: ratio
    # 1000 // 51 = 19, timesteps 951, 932, ..., 20; strength 0.9999 keeps int(50 * 0.9999) = 49 of them
    ts = K.reference_resume_timesteps(50, 1)
    assert len(ts) == 49 and ts[:3] == [932, 913, 894] and ts[-1] == 20
    assert K.reference_resume_timesteps(50, 0)[0] == 951
    assert K.reference_resume_timesteps(4, 1) == [601, 401, 201]
    with pytest.raises(ValueError, match="skip_steps"):
        K.reference_resume_timesteps(4, 4)
    assert "schedule" in " ".join(K.StyleSSPParams(schedule="x").validate())


def test_shape_errors():
    with pytest.raises(ValueError, match="same shape"):
        K.manipulate(latent(), latent((1, 4, 8, 8)))
