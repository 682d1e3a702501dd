"""ASGDiffusion kernels (patch layouts, pixel interaction, structure guidance, the two stage denoisers): pure
torch, no ComfyUI."""
from __future__ import annotations

import random

import pytest
import torch

import host

A = host.pack_module("kernels.asg")
P = host.pack_module("kernels.patches")


def _x(b=2, c=4, h=12, w=20, seed=0):
    return torch.randn(b, c, h, w, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------------------------
# Params and scale factors
# ------------------------------------------------------------------------------------------------
def test_defaults_validate():
    assert A.ASGParams().validate() == []
    assert A.ASGParams().scales() == (2, 2)


@pytest.mark.parametrize("scale", [0, 9, 1.5, True])
def test_non_integer_or_out_of_range_scale_rejected(scale):
    problems = " ".join(A.ASGParams(scale_width=scale).validate())
    assert "scale_width must be a whole number" in problems


@pytest.mark.parametrize("latent", [(255, 256), (256, 250)])
def test_latent_not_divisible_into_whole_patches_rejected(latent):
    height, width = latent
    with pytest.raises(ValueError, match="integer scale factors.*px"):
        A.patch_size(height, width, 2, 4)


def test_non_square_patch_sizes():
    assert A.patch_size(128, 384, 1, 3) == (128, 128)
    assert A.patch_size(256, 128, 2, 1) == (128, 128)
    assert A.patch_size(96, 64, 3, 2) == (32, 32)


def test_bad_values_are_named():
    bad = A.ASGParams(guidance_scale=2.0, mask="x", window_overlap=1.0, blend="y", window_batch=0,
                      structure_fraction=1.5)
    text = " ".join(bad.validate())
    for word in ("guidance_scale", "mask", "window_overlap", "blend", "window_batch", "structure_fraction"):
        assert word in text


def test_split_steps_follows_cutdiffusion():
    assert A.split_steps(50, 0.5) == 25
    assert A.split_steps(4, 0.5) == 2
    assert A.split_steps(5, 0.5) == 3  # steps i < 2.5 are structure steps
    assert A.split_steps(4, 0.0) == 0 and A.split_steps(4, 1.0) == 4


# ------------------------------------------------------------------------------------------------
# Patch layouts
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("scales", [(1, 1), (2, 2), (2, 3), (3, 1)])
def test_dilated_round_trip_is_exact(scales):
    sh, sw = scales
    x = _x(h=4 * sh, w=5 * sw)
    p = P.dilated_split(x, sh, sw)
    assert p.shape == (2 * sh * sw, 4, 4, 5)
    assert torch.equal(P.dilated_merge(p, sh, sw), x)


def test_dilated_patch_is_cutdiffusion_interleave():
    x = _x(b=1, h=6, w=9)
    p = P.dilated_split(x, 2, 3)
    for a in range(2):
        for b in range(3):
            assert torch.equal(p[a * 3 + b], x[0, :, a::2, b::3])


def test_window_layout_covers_non_square_latents():
    windows = P.window_layout(24, 40, 16, 16, 8, 8)
    assert len(windows) == 2 * 4
    cover = torch.zeros(24, 40)
    for t, b, l, r in windows:
        assert b - t == 16 and r - l == 16 and b <= 24 and r <= 40
        cover[t:b, l:r] += 1
    assert bool((cover > 0).all())
    assert P.window_layout(16, 16, 16, 16, 8, 8) == [(0, 16, 0, 16)]


@pytest.mark.parametrize("blend", list(P.BLENDS))
def test_window_split_merge_round_trip_with_overlap(blend):
    x = _x(h=24, w=40)
    windows = P.window_layout(24, 40, 16, 16, 8, 8)
    tiles = P.split_windows(x, windows)
    assert tiles.shape == (len(windows) * 2, 4, 16, 16)
    out = P.merge_windows(tiles, windows, x.shape, blend)
    torch.testing.assert_close(out, x, rtol=1e-6, atol=1e-6)


def test_jittered_windows_round_trip_and_stay_in_the_padding():
    x = _x(h=24, w=40)
    windows = P.window_layout(24, 40, 16, 16, 8, 8)
    jh = jw = (16 - 8) // 4
    placed = P.jitter_windows(windows, 24, 40, jh, jw, random.Random(3))
    xp = P.pad_for_jitter(x, jh, jw)
    for t, b, l, r in placed:
        assert 0 <= t and b <= xp.shape[2] and 0 <= l and r <= xp.shape[3]
    merged = P.merge_windows(P.split_windows(xp, placed), placed, xp.shape, "feather",
                             P.window_edges(windows, 24, 40))
    torch.testing.assert_close(P.crop_padding(merged, jh, jw), x, rtol=1e-6, atol=1e-6)


def test_single_window_merge_is_bit_identical():
    x = _x(h=16, w=16)
    w = [(0, 16, 0, 16)]
    assert torch.equal(P.merge_windows(P.split_windows(x, w), w, x.shape), x)


# ------------------------------------------------------------------------------------------------
# Pixel interaction and mask
# ------------------------------------------------------------------------------------------------
def test_pixel_interaction_is_a_per_pixel_permutation():
    x = _x(b=2, c=3, h=5, w=6)
    x = torch.cat([x, x + 10, x + 20])[[0, 2, 4, 1, 3, 5]]  # 2 images x 3 patches
    perm = A.interaction_permutation(2, 3, (3, 5, 6), torch.Generator().manual_seed(0))
    y = A.permute_rows(x, perm)
    assert not torch.equal(y, x)
    assert torch.equal(A.unpermute_rows(y, perm), x)
    # every (c, y, x) holds the same multiset of patch values per image
    xs = x.reshape(2, 3, 3, 5, 6).sort(dim=1).values
    ys = y.reshape(2, 3, 3, 5, 6).sort(dim=1).values
    assert torch.equal(xs, ys)


def test_unpermute_heat_follows_the_channels():
    perm = torch.tensor([[[[[0]], [[1]]], [[[1]], [[0]]]]])  # channel 0 identity, channel 1 swapped
    heat = torch.tensor([[[1.0]], [[3.0]]])
    out = A.unpermute_heat(heat, perm)
    assert torch.allclose(out, torch.tensor([[[2.0]], [[2.0]]]))


def test_heat_from_attention_matches_a_direct_softmax():
    g = torch.Generator().manual_seed(1)
    q, k = torch.randn(2, 12, 16, generator=g), torch.randn(2, 7, 16, generator=g)
    heat = A.heat_from_attention(q, k, heads=4, max_elements=50)  # forces one head per chunk
    qh, kh = q.view(2, 12, 4, 4).transpose(1, 2), k.view(2, 7, 4, 4).transpose(1, 2)
    p = (qh @ kh.transpose(-1, -2) / 2.0).softmax(-1)
    torch.testing.assert_close(heat, (1 - p[..., 0]).mean(1))


def test_normalise_mask_range_and_flat_maps():
    heat = torch.stack([torch.linspace(2, 5, 12).view(3, 4), torch.full((3, 4), 0.7)])
    m = A.normalise_mask(heat)
    assert m.shape == (2, 1, 3, 4)
    assert float(m[0].min()) == 0.0 and float(m[0].max()) == 1.0
    assert torch.equal(m[1], torch.ones(1, 3, 4))


# ------------------------------------------------------------------------------------------------
# Structure guidance
# ------------------------------------------------------------------------------------------------
def test_guidance_formula_and_key_patch_unchanged():
    g = torch.Generator().manual_seed(2)
    x, d = torch.randn(6, 4, 3, 3, generator=g), torch.randn(6, 4, 3, 3, generator=g)
    ref = torch.randn(2, 4, 3, 3, generator=g)
    mask = torch.rand(6, 1, 3, 3, generator=g)
    sigma = torch.tensor([2.0])
    out = A.structure_guidance(d, x, sigma, ref, 0.5, 3, mask)
    eps = (x - d) / 2.0
    for row in range(6):
        if row % 3 == 0:
            assert torch.equal(out[row], d[row])
        else:
            e = eps[row] + 0.5 * mask[row] * (ref[row // 3] - eps[row])
            torch.testing.assert_close(out[row], x[row] - 2.0 * e)
    full = A.structure_guidance(d, x, sigma, ref, 1.0, 3, None)
    torch.testing.assert_close((x[1] - full[1]) / 2.0, ref[0])  # w=1 unmasked: noise replaced by the reference


class FakeModel:
    """denoised = 0.5 * x + per-row offset; records inputs."""

    def __init__(self):
        self.inputs = []

    def __call__(self, x, sigma, **extra):
        self.inputs.append(x.clone())
        return 0.5 * x + torch.arange(x.shape[0], dtype=x.dtype).view(-1, 1, 1, 1) * 0.01


def test_structure_denoiser_is_one_call_and_one_step_stale():
    params = A.ASGParams(mask="none", guidance_scale=0.7, pixel_interaction=False)
    model = FakeModel()
    stage = A.StructureDenoiser(model, params, k=4, seed=0)
    x1, x2 = _x(b=4, h=3, w=3, seed=1), _x(b=4, h=3, w=3, seed=2)
    s1, s2 = torch.full((4,), 3.0), torch.full((4,), 2.0)
    out1 = stage(x1, s1)
    assert len(model.inputs) == 1 and model.inputs[0].shape[0] == 4
    assert torch.equal(out1, model(x1, s1)), "first evaluation: no stale key prediction yet, unguided"
    out2 = stage(x2, s2)
    d2 = model(x2, s2)
    eps0_prev = (x1[:1] - model(x1, s1)[:1]) / 3.0  # key patch, previous evaluation
    expected = A.structure_guidance(d2, x2, torch.tensor([2.0]), eps0_prev, 0.7, 4, None)
    torch.testing.assert_close(out2, expected)
    sync = A.StructureDenoiser(FakeModel(), params.replace(asynchronous=False), k=4, seed=0)
    out_sync = sync(x1, s1)
    eps0_now = (x1[:1] - model(x1, s1)[:1]) / 3.0
    torch.testing.assert_close(out_sync, A.structure_guidance(model(x1, s1), x1, torch.tensor([3.0]), eps0_now,
                                                              0.7, 4, None))


def test_structure_denoiser_pixel_interaction_undoes_itself():
    params = A.ASGParams(mask="none", guidance_scale=0.0, pixel_interaction=True)
    model = lambda x, s: 2.0 * x  # noqa: E731  (pointwise: permuting in and out changes nothing)
    stage = A.StructureDenoiser(model, params, k=4, seed=0)
    x = _x(b=8, h=3, w=3)
    assert torch.equal(stage(x, torch.ones(8)), 2.0 * x)
    rec = FakeModel()
    A.StructureDenoiser(rec, params, k=4, seed=0)(x, torch.ones(8))
    assert not torch.equal(rec.inputs[0], x), "the model must see permuted patches"


def test_structure_denoiser_uses_the_mask_and_reports_a_missing_one():
    params = A.ASGParams(mask="cross_attention", guidance_scale=1.0, pixel_interaction=False,
                         asynchronous=False)
    heat = torch.zeros(4, 3, 3)
    heat[:, 0, 0] = 1.0  # only the top-left pixel is "attended"
    stage = A.StructureDenoiser(FakeModel(), params, k=4, seed=0, heat_maps=lambda: heat)
    x = _x(b=4, h=3, w=3)
    out = stage(x, torch.full((4,), 1.0))
    d = FakeModel()(x, torch.full((4,), 1.0))
    assert not torch.equal(out[1:, :, 0, 0], d[1:, :, 0, 0])
    assert torch.equal(out[1:, :, 1:, :], d[1:, :, 1:, :]), "mask 0 leaves the pixel unguided"
    missing = []
    stage = A.StructureDenoiser(FakeModel(), params, k=4, seed=0, heat_maps=lambda: None,
                                on_missing_mask=lambda: missing.append(1))
    stage(x, torch.full((4,), 1.0))
    assert missing == [1]


def test_structure_denoiser_single_patch_is_the_model():
    model = FakeModel()
    stage = A.StructureDenoiser(model, A.ASGParams(), k=1, seed=0, heat_maps=lambda: None)
    x = _x(b=1, h=4, w=4)
    assert torch.equal(stage(x, torch.ones(1)), model(x, torch.ones(1)))


# ------------------------------------------------------------------------------------------------
# Detail stage
# ------------------------------------------------------------------------------------------------
def test_detail_denoiser_batches_windows_and_is_exact_for_pointwise_models():
    params = A.ASGParams(window_batch=3, jitter=True)
    calls = []

    def model(x, sigma, **extra):
        calls.append((x.shape, sigma.shape))
        return x * 0.25

    stage = A.DetailDenoiser(model, params, window=(8, 8), seed=0)
    x = _x(b=2, h=16, w=24)
    out = stage(x, torch.full((2,), 1.0))
    torch.testing.assert_close(out, x * 0.25, rtol=1e-6, atol=1e-6)
    n_windows = 3 * 5
    assert [c[0][0] for c in calls] == [6] * (n_windows // 3)
    assert all(c[0][0] == c[1][0] for c in calls), "one sigma per row"


def test_detail_denoiser_single_window_is_the_model():
    model = FakeModel()
    stage = A.DetailDenoiser(model, A.ASGParams(), window=(4, 4), seed=0)
    x = _x(b=1, h=4, w=4)
    assert torch.equal(stage(x, torch.ones(1)), model(x, torch.ones(1)))


def test_auto_mask_resolves_per_model():
    assert A.ASGParams().mask == "auto" and "auto" in A.MASKS
    assert A.resolve_mask("auto", True) == "cross_attention" and A.resolve_mask("auto", False) == "none"
    assert A.resolve_mask("none", True) == "none" and A.resolve_mask("cross_attention", False) == "cross_attention"
