"""DiffuseHigh kernels and the wavelet kernels: the maths, pure torch, no ComfyUI.

DWT agreement with PyWavelets (the reference's pytorch_wavelets computes PyWavelets' coefficients), round trips,
low-band replacement (exact replace, blend, identity at weight 0, details kept), seeded sharpening, the official
schedule (t = 281 .. 1, sigma(281)) and the stage planner (non-square targets)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import host

W = host.pack_module("kernels.wavelets")
K = host.pack_module("kernels.diffusehigh")
pywt = pytest.importorskip("pywt")


BORDER = {"db4": 3, "haar": 0}
"""Coefficients per side and level that a symmetric-extension round trip does not reproduce exactly."""


def _x(shape=(2, 3, 37, 50), seed=0, dtype=torch.float32):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype)


# ------------------------------------------------------------------------------------------------
# Wavelets
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("wavelet", ["db4", "haar"])
@pytest.mark.parametrize("levels", [1, 2])
@pytest.mark.parametrize("shape", [(2, 3, 37, 50), (1, 4, 32, 32), (1, 16, 9, 14)])
def test_dwt_matches_pywavelets(wavelet, levels, shape):
    x = _x(shape, dtype=torch.float64)
    low, highs = W.dwt2(x, wavelet, levels)
    ref = pywt.wavedec2(x.numpy(), wavelet, mode="symmetric", level=levels, axes=(-2, -1))
    np.testing.assert_allclose(low.numpy(), ref[0], rtol=0, atol=1e-10)
    assert len(highs) == levels
    for mine, theirs in zip(highs, ref[1:]):
        for a, b in zip(mine, theirs):
            np.testing.assert_allclose(a.numpy(), b, rtol=0, atol=1e-10)


def test_db4_low_band_size_is_the_reference_size():
    """pytorch_wavelets db4 J=1 symmetric: LL is (H + 7) // 2 (2048 -> 1027)."""
    low = W.low_band(torch.zeros(1, 3, 64, 90), "db4", 1)
    assert low.shape == (1, 3, (64 + 7) // 2, (90 + 7) // 2)


@pytest.mark.parametrize("wavelet", ["db4", "haar"])
@pytest.mark.parametrize("levels", [1, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_round_trip(wavelet, levels, dtype):
    x = _x((2, 3, 41, 30), seed=1, dtype=dtype)
    low, highs = W.dwt2(x, wavelet, levels)
    assert low.dtype == dtype
    y = W.idwt2(low, highs, wavelet, size=tuple(x.shape[-2:]))
    assert y.shape == x.shape and y.dtype == dtype
    tol = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 0.1}[dtype]
    assert float((y.double() - x.double()).abs().max()) < tol


def test_idwt_matches_pywavelets():
    x = _x((1, 2, 24, 20), seed=2, dtype=torch.float64)
    low, highs = W.dwt2(x, "db4", 1)
    low2 = low * 0.5 + 1.0   # a modified approximation, as the guidance produces
    mine = W.idwt2(low2, highs, "db4", size=(24, 20))
    theirs = pywt.idwt2((low2.numpy(), tuple(h.numpy() for h in highs[0])), "db4", mode="symmetric",
                        axes=(-2, -1))[..., :24, :20]
    np.testing.assert_allclose(mine.numpy(), theirs, rtol=0, atol=1e-10)


def test_dwt_does_not_modify_input():
    x = _x()
    before = x.clone()
    W.dwt2(x, "db4", 2)
    assert torch.equal(x, before)


def test_missing_or_old_ptwt_is_a_clear_error_naming_the_fix(monkeypatch):
    """ptwt 1.x needs Python >= 3.11 (the pack allows 3.10, where pip installs 0.1.9): a missing or older ptwt
    fails on first use with the fix, not with an AttributeError deep inside a transform."""
    import importlib.metadata
    import sys
    W._ptwt.cache_clear()
    try:
        monkeypatch.setattr(importlib.metadata, "version", lambda name: "0.1.4")
        with pytest.raises(ImportError, match=r"ptwt >= 0\.1\.9, but ptwt 0\.1\.4 is installed.*Fix: pip install"):
            W.dwt2(_x(), "haar")
        monkeypatch.setattr(importlib.metadata, "version", lambda name: "1.0.1")
        W.dwt2(_x(), "haar")
        W._ptwt.cache_clear()
        monkeypatch.setitem(sys.modules, "ptwt", None)  # import ptwt -> ImportError
        with pytest.raises(ImportError, match=r"need the `ptwt` package.*not installed.*ptwt>=0\.1\.9.*Python 3\.10"):
            W.low_band(_x())
    finally:
        W._ptwt.cache_clear()
    assert W._version_tuple("0.1.10") > W.MIN_PTWT > W._version_tuple("0.1.8.post1")


# ------------------------------------------------------------------------------------------------
# Low-band replacement
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("wavelet,levels", [("db4", 1), ("haar", 2)])
def test_replace_low_band_sets_the_low_band_and_keeps_details(wavelet, levels):
    x = _x((2, 3, 40, 56), seed=3)
    ref = _x((1, 3, 40, 56), seed=4)
    ref_low = K.reference_low_band(ref, wavelet, levels)
    y = K.replace_low_band(x, ref_low, 1.0, wavelet, levels)
    assert y.shape == x.shape and y.dtype == x.dtype
    low_y, highs_y = W.dwt2(y, wavelet, levels)
    low_x, highs_x = W.dwt2(x, wavelet, levels)
    m = BORDER[wavelet] * levels
    inner = (..., slice(m, low_y.shape[-2] - m), slice(m, low_y.shape[-1] - m))
    torch.testing.assert_close(low_y[inner], ref_low.expand_as(low_y)[inner], atol=2e-5, rtol=0)
    if wavelet == "haar":  # orthogonal without boundary extension: the detail bands come back exactly too
        for a, b in zip(highs_y[0], highs_x[0]):
            torch.testing.assert_close(a, b, atol=2e-5, rtol=0)
    assert not torch.allclose(low_y, low_x, atol=1e-2)


def test_db4_border_coefficients_are_redundant():
    """With symmetric extension the db4 coefficients are redundant: DWT(iDWT(c)) projects c, so only the
    coefficients at least 3 (= L/2 - 1) from the border come back exactly. The reference has the same property
    (pytorch_wavelets computes the same transform); guidance tests compare those coefficients."""
    x = _x((1, 3, 40, 56), seed=3, dtype=torch.float64)
    ref_low = K.reference_low_band(_x((1, 3, 40, 56), seed=4, dtype=torch.float64)).double()
    low_y = W.low_band(K.replace_low_band(x, ref_low, 1.0))
    assert float((low_y - ref_low).abs().max()) > 1e-2
    assert float((low_y - ref_low)[..., 3:-3, 3:-3].abs().max()) < 1e-5


def test_partial_blend_and_identity_at_zero():
    x = _x((1, 4, 32, 32), seed=5)
    ref_low = K.reference_low_band(_x((1, 4, 32, 32), seed=6))
    assert K.replace_low_band(x, ref_low, 0.0) is x
    y = K.replace_low_band(x, ref_low, 0.25)
    low_x = W.low_band(x)
    inner = (..., slice(3, -3), slice(3, -3))
    torch.testing.assert_close(W.low_band(y)[inner], (low_x + 0.25 * (ref_low - low_x))[inner], atol=2e-5, rtol=0)


def test_replace_low_band_rejects_mismatched_sizes():
    with pytest.raises(ValueError, match="does not match"):
        K.replace_low_band(_x((1, 3, 32, 32)), K.reference_low_band(_x((1, 3, 40, 32))), 1.0)


def test_guidance_weight_schedule():
    p = K.DiffuseHighParams()
    assert [p.guidance_weight(i) for i in range(7)] == [1.0] * 5 + [0.0, 0.0]
    faded = p.replace(guidance_factor=0.8, fadeout=1.0)
    assert [round(faded.guidance_weight(i), 6) for i in range(5)] == [0.8, 0.64, 0.48, 0.32, 0.16]
    assert p.replace(guidance_steps=0).guidance_weight(0) == 0.0
    assert p.replace(guidance_factor=0.0).guidance_weight(0) == 0.0


# ------------------------------------------------------------------------------------------------
# Defaults, schedule, pixels, stages
# ------------------------------------------------------------------------------------------------
def test_official_defaults_and_validation():
    p = K.DiffuseHighParams()
    assert (p.cfg, p.schedule_steps, p.steps, p.guidance_steps, p.wavelet, p.dwt_levels, p.sharpen_alpha,
            p.sharpen_kernel, p.guidance_mode, p.sampler_name) == (10.0, 50, 15, 5, "db4", 1, 1.0, 3, "image",
                                                                    "euler")
    assert p.start_step == 35 and p.validate() == []
    bad = p.replace(guidance_mode="x", steps=60, guidance_factor=2.0, sharpen_kernel=4, vae_tile_size=10,
                    guidance_steps=-1)
    problems = " ".join(bad.validate())
    for word in ("guidance_mode", "steps (60)", "guidance_factor", "sharpen_kernel", "vae_tile_size",
                 "guidance_steps"):
        assert word in problems


def test_official_timesteps_and_sigma():
    ts = K.leading_timesteps(50, 15)
    assert ts[0] == K.OFFICIAL_TIMESTEP == 281 and ts[-1] == 1 and len(ts) == 15
    assert all(a - b == 20 for a, b in zip(ts, ts[1:]))
    s = K.sd_scaled_linear_sigma(281)
    assert s == pytest.approx(0.78, abs=0.01)
    # sqrt(alpha_bar(281)) ~ 0.79 (research notes)
    assert 1 / math.sqrt(1 + s * s) == pytest.approx(0.79, abs=0.01)


def test_sharpen_is_the_unsharp_mask_and_seeded():
    img = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    assert K.sharpen(img, 0.0) is img
    out = K.sharpen(img, 1.0, 3, 1.0)
    import kornia
    blur = kornia.filters.gaussian_blur2d(img, (3, 3), (1.0, 1.0), border_type="reflect")
    torch.testing.assert_close(out, 2 * img - blur)
    a, b = K.draw_sharpen_sigma(7, 0), K.draw_sharpen_sigma(7, 0)
    assert a == b and 0.1 <= a <= 2.0
    assert K.draw_sharpen_sigma(7, 1) != a and K.draw_sharpen_sigma(8, 0) != a
    torch.manual_seed(0)
    before = torch.rand(1)
    torch.manual_seed(0)
    K.draw_sharpen_sigma(3, 0)
    assert torch.equal(torch.rand(1), before), "the global RNG must not be consumed"


def test_upsample_is_bicubic_like_the_reference():
    img = torch.rand(1, 3, 8, 12, generator=torch.Generator().manual_seed(1))
    out = K.upsample(img, (16, 20))
    ref = torch.nn.functional.interpolate(img, (16, 20), mode="bicubic", align_corners=False)
    torch.testing.assert_close(out, ref)
    assert K.upsample(img, (8, 12)) is img


def test_plan_stages_square_and_non_square():
    assert K.plan_stages("2048, 3072, 4096", (1024, 1024)) == [(2048, 2048), (3072, 3072), (4096, 4096)]
    assert K.plan_stages("2048, 3072", (1216, 832)) == [(2048, 1400), (3072, 2104)]
    assert K.plan_stages("2048", (832, 1216)) == [(1400, 2048)]
    assert K.plan_stages("x2, x1.5", (512, 768)) == [(1024, 1536), (1536, 2304)]
    assert K.plan_stages("1536x1024", (100, 100)) == [(1536, 1024)]
    for bad in ("", "abc", "2048, y3", "x0"):
        with pytest.raises(ValueError):
            K.plan_stages(bad, (1024, 1024))


def test_target_size():
    assert K.target_size(0, 0, (1024, 768), 2.0) == (2048, 1536)
    assert K.target_size(1000, 0, (1024, 768), 2.0) == (1000, 752)
    assert K.target_size(0, 504, (1024, 768), 2.0) == (672, 504)
    assert K.target_size(640, 480, (10, 10), 2.0) == (640, 480)


def test_stage_spec_problems_and_sizes():
    for good in ("auto", " AUTO ", "2048, 3072, 4096", "x2", "1536x1024, x1.5", "32"):
        assert K.stage_spec_problem(good) is None, good
    for bad, word in (("big", "not WxH"), ("", "empty"), ("16", "outside 32-16384"), ("20000", "outside"),
                      ("8x64", "outside"), ("x0", "> 0")):
        assert word in (K.stage_spec_problem(bad) or ""), bad
    assert K.size_problem((32, 32)) is None and "below" in K.size_problem((8, 64))
    assert "above" in K.size_problem((16392, 64))


# ------------------------------------------------------------------------------------------------
# The structure guide and the stage loop (kernels/structure_guide.py), with a fake VAE and denoiser
# ------------------------------------------------------------------------------------------------
SG = host.pack_module("kernels.structure_guide")


class FakeVAE:
    """Pixels (B, 3, H, W) <-> 'latents' (B, 4, H/2, W/2): average pooling / nearest upsampling, counted."""

    def __init__(self):
        self.encodes, self.decodes = [], []

    def encode(self, pixels):
        self.encodes.append(pixels.clone())
        pooled = torch.nn.functional.avg_pool2d(pixels, 2)
        return torch.cat([pooled, pooled.mean(dim=1, keepdim=True)], dim=1)

    def decode(self, latent):
        self.decodes.append(latent.clone())
        return torch.nn.functional.interpolate(latent[:, :3], scale_factor=2, mode="nearest")

    def codec(self):
        return SG.Codec(encode=self.encode, decode=self.decode, to_model=lambda z: z * 2.0,
                        from_model=lambda z: z / 2.0)


def test_guide_latent_mode_sets_the_low_band_on_guided_steps_only():
    p = K.DiffuseHighParams(guidance_mode="latent", guidance_steps=2, guidance_factor=1.0)
    ref = _x((1, 4, 24, 24), seed=1)
    guide = SG.StructureGuide(p, K.reference_low_band(ref))
    x0 = _x((1, 4, 24, 24), seed=2)
    for step in range(4):
        out = guide(x0, step)
        if step < 2:
            inner = (..., slice(3, -3), slice(3, -3))
            torch.testing.assert_close(W.low_band(out)[inner], K.reference_low_band(ref)[inner], atol=1e-5, rtol=0)
        else:
            assert out is x0
    assert guide(x0, -1) is x0


def test_guide_image_mode_decodes_replaces_and_encodes_once_per_guided_step():
    vae = FakeVAE()
    p = K.DiffuseHighParams(guidance_mode="image", guidance_steps=1, guidance_factor=0.5)
    pixels = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    guide = SG.StructureGuide(p, SG.reference_low_band(p, pixels, None), vae.codec())
    x0 = _x((1, 4, 16, 16), seed=4).to(torch.float16)
    out = guide(x0, 0)
    assert len(vae.decodes) == 1 and len(vae.encodes) == 1
    torch.testing.assert_close(vae.decodes[0], x0.float() / 2.0)          # from_model before the decode
    decoded = torch.nn.functional.interpolate(x0.float()[:, :3] / 2.0, scale_factor=2, mode="nearest")
    expected_low = torch.lerp(W.low_band(decoded), K.reference_low_band(pixels), 0.5)
    inner = (..., slice(3, -3), slice(3, -3))
    torch.testing.assert_close(W.low_band(vae.encodes[0])[inner], expected_low[inner], atol=1e-5, rtol=0)
    assert out.dtype == torch.float16 and out.shape == x0.shape            # back in the prediction's dtype
    assert guide(x0, 1) is x0 and len(vae.decodes) == 1


def test_guide_mismatch_names_the_space():
    p = K.DiffuseHighParams(guidance_mode="latent")
    guide = SG.StructureGuide(p, K.reference_low_band(_x((1, 4, 16, 16))))
    with pytest.raises(SG.ReferenceMismatch) as e:
        guide(_x((1, 4, 24, 24)), 0)
    assert e.value.space == "latent"
    two = SG.StructureGuide(p, K.reference_low_band(_x((2, 4, 16, 16))))
    with pytest.raises(SG.ReferenceMismatch, match="batch 2 does not divide the prediction batch 3"):
        two(_x((3, 4, 16, 16)), 0)
    assert two(_x((4, 4, 16, 16)), 0).shape == (4, 4, 16, 16), "a reference batch that divides is repeated"


def test_run_stages_chains_stages_with_the_denoiser_passed_in():
    """Each stage: upsample + sharpen the previous decoded image, encode, denoise(stage, guide), decode; sizes in
    order, sharpen sigma seeded per stage, no guide when the guidance is off, check() between the pieces."""
    vae = FakeVAE()
    p = K.DiffuseHighParams(guidance_mode="latent", guidance_steps=1)
    calls, checks = [], []

    def denoise(stage, guide):
        calls.append((stage.index, stage.size, tuple(stage.latent.shape), guide))
        assert stage.sharpen_sigma == K.draw_sharpen_sigma(5, stage.index)
        return stage.latent * 0.5

    image = torch.rand(2, 3, 16, 24, generator=torch.Generator().manual_seed(0))
    out, latent = SG.run_stages(image, [(48, 32), (96, 64)], p, 5, vae.codec(), denoise,
                                check=lambda: checks.append(1))
    assert [(c[0], c[1], c[2]) for c in calls] == [(0, (48, 32), (2, 4, 16, 24)), (1, (96, 64), (2, 4, 32, 48))]
    assert all(isinstance(c[3], SG.StructureGuide) for c in calls)
    assert out.shape == (2, 3, 64, 96) and latent.shape == (2, 4, 32, 48) and len(checks) == 6
    # stage 1 starts from the decoded stage-0 latent, upsampled and sharpened
    first = K.sharpen(K.upsample(image, (32, 48)), 1.0, 3, K.draw_sharpen_sigma(5, 0))
    torch.testing.assert_close(vae.encodes[0], first)
    stage0_image = vae.decode(vae.encode(first) * 0.5)
    second = K.sharpen(K.upsample(stage0_image, (64, 96)), 1.0, 3, K.draw_sharpen_sigma(5, 1))
    torch.testing.assert_close(vae.encodes[1], second)
    calls.clear()
    SG.run_stages(image, [(48, 32)], p.replace(guidance_steps=0), 5, vae.codec(), denoise, first_stage=3)
    assert calls[0][0] == 3 and calls[0][3] is None


def test_run_stages_stops_when_check_raises():
    vae = FakeVAE()
    seen = []

    def check():
        if seen:
            raise KeyboardInterrupt

    def denoise(stage, guide):
        seen.append(stage.index)
        return stage.latent

    with pytest.raises(KeyboardInterrupt):
        SG.run_stages(torch.rand(1, 3, 8, 8), [(16, 16), (32, 32)], K.DiffuseHighParams(), 0, vae.codec(), denoise,
                      check=check)
    assert seen == [0]


def test_auto_stages_per_family():
    assert K.DiffuseHighParams().stages == "auto"
    assert K.resolve_stages("auto", "sdxl") == "2048, 3072, 4096"
    assert K.resolve_stages("auto", "sd1") == "x2" and K.plan_stages(K.resolve_stages("auto", "sd1"),
                                                                     (512, 512)) == [(1024, 1024)]
    assert K.resolve_stages("auto", "flux") == "x2" and K.resolve_stages("Auto", "sd3") == "x2"
    assert K.resolve_stages("x1.5", "sdxl") == "x1.5"
