"""TALE kernel: geometry, initiation, adaptive normalisation, energies and solver steps; pure torch, no ComfyUI."""
from __future__ import annotations

import pytest
import torch

import host

K = host.pack_module("kernels.tale")


def test_defaults_are_the_reference_and_validate():
    p = K.TALEParams()
    assert (p.steps, p.t_prime, p.tau, p.text_weight, p.style_weight, p.inner_steps, p.cfg) == (20, 12, 5, 15.0, 0.15,
                                                                                               3, 10.0)
    assert p.solver == "dpmpp_2m" and p.style_layer == 2 and p.style_gradient == "kept"
    assert p.validate() == []
    assert K.adain_weights(p.tau, p.adain_max) == pytest.approx([0.1, 0.2, 0.3, 0.4, 0.5])
    assert list(p.window()) == [13, 14, 15, 16, 17]


@pytest.mark.parametrize("changes, word", [
    (dict(t_prime=20), "t_prime"), (dict(t_prime=16, tau=4), "t_prime + tau"), (dict(tau=-1), "tau"),
    (dict(inner_steps=-1), "inner_steps"), (dict(adain_max=1.5), "adain_max"), (dict(energy="x"), "energy"),
    (dict(style_gradient="x"), "style_gradient"), (dict(text_weight=-1.0), "text_weight"),
    (dict(placement=K.PlacementParams(mode="x")), "placement"),
    (dict(placement=K.PlacementParams(box_x=1.5)), "box_x"),
    (dict(placement=K.PlacementParams(box_scale=0.0)), "box_scale"),
])
def test_invalid_params_are_named(changes, word):
    problems = " ".join(K.TALEParams(**changes).validate())
    assert word in problems, problems


def test_schedule_fractions_give_the_reference_steps():
    p = K.TALEParams()
    assert K.schedule_steps(20, p.t_prime_percent, p.tau_percent) == (12, 5)
    assert K.schedule_steps(4, 0.6, 0.25) == (2, 1)
    assert K.schedule_steps(10, 0.6, 0.01) == (6, 1)   # a positive tau is at least one step
    assert K.schedule_steps(10, 0.6, 0.0) == (6, 0)


def test_optimising_needs_energy_steps_and_weights():
    # the default energy is none (needs no optional input); the reference's clip optimises
    assert K.TALEParams().energy == "none" and not K.TALEParams().optimising
    assert K.TALEParams(energy="clip").optimising
    for changes in (dict(energy="none"), dict(inner_steps=0), dict(tau=0), dict(text_weight=0.0, style_weight=0.0),
                    dict(energy="latent", latent_weight=0.0)):
        assert not K.TALEParams(**dict(dict(energy="clip"), **changes)).optimising, changes
    assert K.TALEParams(energy="latent", text_weight=0.0, style_weight=0.0).optimising


# ------------------------------------------------------------------------------------------------ geometry
def test_mask_bbox_half_open_and_empty():
    m = torch.zeros(10, 7)
    assert K.mask_bbox(m) is None
    m[3:6, 0:7] = 1.0
    box = K.mask_bbox(m)
    assert (box.top, box.bottom, box.left, box.right) == (3, 6, 0, 7)
    m[9, 6] = 1.0
    assert K.mask_bbox(m).bottom == 10


def test_fit_keeps_aspect():
    assert K.fit_size(20, 10, 40, 40) == (40, 20)
    assert K.fit_size(10, 30, 12, 100) == (12, 36)
    assert K.fit_size(5, 5, 3, 9) == (3, 3)


@pytest.mark.parametrize("bg_h, bg_w", [(64, 96), (96, 40), (33, 65)])
def test_placement_flush_with_every_border_of_non_square_backgrounds(bg_h, bg_w):
    h, w = 16, 8
    corners = {"top-left": (h / 2, w / 2), "bottom-right": (bg_h - h / 2, bg_w - w / 2),
               "top-right": (h / 2, bg_w - w / 2), "bottom-left": (bg_h - h / 2, w / 2)}
    for name, (cy, cx) in corners.items():
        box = K.place_object(cy, cx, h, w, bg_h, bg_w)
        assert (box.height, box.width) == (h, w), name
        assert 0 <= box.top and box.bottom <= bg_h and 0 <= box.left and box.right <= bg_w, name
        if "bottom" in name:
            assert box.bottom == bg_h, name
        if "right" in name:
            assert box.right == bg_w, name
        if "top" in name:
            assert box.top == 0, name
        if "left" in name:
            assert box.left == 0, name


def test_placement_rounding_past_a_border_is_shifted_back_but_outside_is_an_error():
    box = K.place_object(64 - 4.4, 10, 9, 4, 64, 64)  # rounds to one pixel past the bottom
    assert box.bottom == 64
    with pytest.raises(K.PlacementError, match="beyond the right border"):
        K.place_object(10, 60, 8, 16, 64, 64)
    with pytest.raises(K.PlacementError, match="beyond the top border"):
        K.place_object(0, 32, 8, 8, 64, 64)
    with pytest.raises(K.PlacementError, match="larger than the background"):
        K.place_object(32, 32, 65, 8, 64, 64)


def test_latent_mask_follows_the_canvas_at_borders():
    canvas = torch.zeros(40, 72)
    canvas[24:40, 56:72] = 1.0  # flush with the bottom-right corner, 8-aligned
    lat = K.latent_mask(canvas, 8)
    assert lat.shape == (5, 9)
    box = K.mask_bbox(lat.float())
    assert (box.top, box.bottom, box.left, box.right) == (3, 5, 7, 9)
    assert int(lat.sum()) == 4


def test_crop_to_multiple_like_vae_encode():
    t = torch.arange(1 * 21 * 19).reshape(1, 21, 19, 1).float()
    out = K.crop_to_multiple(t, 8, 1, 2)
    assert out.shape == (1, 16, 16, 1)
    # ComfyUI's VAE.vae_encode_crop_pixels: offset (size % 8) // 2
    assert torch.equal(out, t[:, 2:18, 1:17])


# ------------------------------------------------------------------------------------------------ latents
def _latents(seed=0, shape=(2, 4, 6, 10)):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g), 3.0 + 2.0 * torch.randn(*shape, generator=g)


def _mask(h=6, w=10):
    m = torch.zeros(h, w, dtype=torch.bool)
    m[1:5, 6:10] = True  # touches the right border
    m[2, 6] = False
    return m


def test_paste_and_keep_object_are_exact_selections():
    comp, bg = _latents()
    m = _mask()
    pasted = K.paste(bg, comp, m)
    assert torch.equal(pasted[..., m], comp[..., m]) and torch.equal(pasted[..., ~m], bg[..., ~m])
    kept = K.keep_object(comp, bg, m)
    assert torch.equal(kept, pasted)


def test_adain_leaves_outside_bit_identical_and_matches_statistics():
    comp, bg = _latents()
    m = _mask()
    assert torch.equal(K.adain_blend(comp, bg, m, 0.0), comp)
    out = K.adain_blend(comp, bg, m, 1.0)
    assert torch.equal(out[..., ~m], comp[..., ~m])
    inside = out[..., m]  # (B, C, n)
    bg_flat = bg.flatten(2)
    torch.testing.assert_close(inside.mean(-1), bg_flat.mean(-1), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close((inside.var(-1) + 1e-5).sqrt(), (bg_flat.var(-1) + 1e-5).sqrt(), atol=1e-3,
                               rtol=1e-3)
    half = K.adain_blend(comp, bg, m, 0.3)
    torch.testing.assert_close(half[..., m], 0.3 * inside + 0.7 * comp[..., m])
    assert torch.equal(half[..., ~m], comp[..., ~m])


def test_adain_matches_the_reference_formula_on_one_image():
    comp, bg = _latents(shape=(1, 4, 6, 10))
    m = _mask()
    obj = comp[0][:, m]                                   # (C, n) like the reference's content_feat[seg]
    mean, std = obj.mean(1, keepdim=True), (obj.var(1, keepdim=True) + 1e-5).sqrt()
    bmean = bg[0].flatten(1).mean(1, keepdim=True)
    bstd = (bg[0].flatten(1).var(1, keepdim=True) + 1e-5).sqrt()
    expected = 0.4 * ((obj - mean) / std * bstd + bmean) + 0.6 * obj
    torch.testing.assert_close(K.adain_blend(comp, bg, m, 0.4)[0][:, m], expected)


def test_masked_gradient_step():
    x, g = _latents()
    m = _mask()
    out = K.masked_gradient_step(x, g, m)
    assert torch.equal(out[..., ~m], x[..., ~m]) and torch.equal(out[..., m], x[..., m] - g[..., m])


# ------------------------------------------------------------------------------------------------ solvers
def _perfect_denoiser(x0):
    return lambda x, sigma: x0


@pytest.mark.parametrize("solver", ["dpmpp_2m", "euler"])
def test_solvers_are_exact_on_a_point_mass(solver):
    """For data = one point x0 the denoiser is constant and the probability-flow ODE's solution is
    x(sigma) = x0 + sigma / sigma_0 * (x - x0): both solvers must follow it exactly."""
    x0 = torch.randn(1, 4, 3, 3, generator=torch.Generator().manual_seed(1))
    noise = torch.randn(1, 4, 3, 3, generator=torch.Generator().manual_seed(2))
    sigmas = torch.tensor([14.6, 7.0, 3.1, 1.2, 0.4, 0.0])
    x = x0 + sigmas[0] * noise
    old = None
    for i in range(len(sigmas) - 1):
        den = x0
        if solver == "euler":
            x = K.euler_step(x, den, sigmas[i], sigmas[i + 1])
        else:
            x = K.dpmpp_2m_step(x, den, old, sigmas[i - 1] if i else None, sigmas[i], sigmas[i + 1])
        old = den
        torch.testing.assert_close(x, x0 + sigmas[i + 1] * noise, atol=1e-4, rtol=1e-4)


def test_dpmpp_2m_second_order_uses_history():
    g = torch.Generator().manual_seed(3)
    x, d1, d0 = (torch.randn(1, 2, 2, 2, generator=g) for _ in range(3))
    s_prev, s, s_next = torch.tensor(5.0), torch.tensor(2.0), torch.tensor(1.0)
    first = K.dpmpp_2m_step(x, d1, None, None, s, s_next)
    second = K.dpmpp_2m_step(x, d1, d0, s_prev, s, s_next)
    assert not torch.equal(first, second)
    # explicit DPM-Solver++(2M): lambda = -log sigma
    h = torch.log(s) - torch.log(s_next)
    r = (torch.log(s_prev) - torch.log(s)) / h
    d = (1 + 1 / (2 * r)) * d1 - 1 / (2 * r) * d0
    torch.testing.assert_close(second, s_next / s * x - torch.expm1(-h) * d)


# ------------------------------------------------------------------------------------------------ energies
def test_gram_distance_zero_at_the_reference_and_positive_elsewhere():
    f = torch.randn(2, 7, 5, generator=torch.Generator().manual_seed(5))
    assert float(K.gram_distance(f, K.gram(f[:1]).expand(2, 5, 5)[0])) > 0
    torch.testing.assert_close(K.gram_distance(f[:1], K.gram(f[:1])[0]), torch.tensor(0.0))
    torch.testing.assert_close(K.gram(f), f.transpose(1, 2) @ f)


def test_text_distance():
    a = torch.tensor([[1.0, 0.0]])
    assert float(K.text_distance(a, a)) == pytest.approx(0.0)
    assert float(K.text_distance(a, torch.tensor([[0.0, 2.0]]))) == pytest.approx(1.0)


class _ToyEncoder:
    """A linear 'vision encoder' with patch tokens: enough to check where gradients flow."""

    def __init__(self, size=8, dim=6, proj=4):
        g = torch.Generator().manual_seed(6)
        self.w = torch.randn(3 * 4 * 4, dim, generator=g)
        self.p = torch.randn(dim, proj, generator=g)
        self.size = size

    def __call__(self, px):
        patches = torch.nn.functional.unfold(px, 4, stride=4).transpose(1, 2)  # (B, N, 48)
        tokens = torch.tanh(patches @ self.w)
        return tokens, tokens.mean(1) @ self.p


def _clip_case(style_gradient, text_weight=1.0, style_weight=0.5):
    enc = _ToyEncoder()
    image = torch.rand(1, 3, 16, 24, generator=torch.Generator().manual_seed(7)).requires_grad_(True)
    box = K.Box(4, 8, 8, 8)
    ref = K.gram(enc(torch.rand(1, 3, 8, 8, generator=torch.Generator().manual_seed(8)))[0])[0]
    text = torch.randn(1, 4, generator=torch.Generator().manual_seed(9))
    params = K.TALEParams(text_weight=text_weight, style_weight=style_weight, style_gradient=style_gradient)
    terms = K.clip_energy(image, box, enc, text, ref, params, [0.5] * 3, [0.25] * 3, size=8)
    return image, terms


def test_clip_energy_style_term_kept_or_detached():
    image, kept = _clip_case("kept")
    g_kept, = torch.autograd.grad(kept.total, image)
    image2, detached = _clip_case("detached")
    g_det, = torch.autograd.grad(detached.total, image2)
    torch.testing.assert_close(kept.total.detach(), detached.total.detach())
    assert kept.style > 0 and kept.text > 0
    image3, text_only = _clip_case("kept", style_weight=0.0)
    g_text, = torch.autograd.grad(text_only.total, image3)
    torch.testing.assert_close(g_det, g_text)           # the released code: only the text term moves the image
    assert not torch.allclose(g_kept, g_text)          # the fix: the style term contributes
    # the style gradient lives in the object box only
    diff = (g_kept - g_text).abs()
    assert float(diff[..., 4:12, 8:16].sum()) > 0 and float(diff.sum() - diff[..., 4:12, 8:16].sum()) == 0.0


def test_latent_energy_decreases_along_masked_gradient_steps():
    g = torch.Generator().manual_seed(10)
    x = torch.randn(1, 4, 8, 12, generator=g)
    bg = 2.0 + 0.5 * torch.randn(1, 4, 8, 12, generator=g)
    m = torch.zeros(8, 12, dtype=torch.bool)
    m[2:7, 7:12] = True
    box = K.mask_bbox(m.float())
    ref = K.latent_gram(K.latent_patch_features(bg))
    params = K.TALEParams(latent_weight=0.002)
    energies = []
    for _ in range(4):
        xg = x.clone().requires_grad_(True)
        terms = K.latent_energy(xg, box, m, ref, params)
        grad, = torch.autograd.grad(terms.total, xg)
        assert torch.isfinite(grad).all()
        energies.append(float(terms.total.detach()))
        x = K.masked_gradient_step(x, grad, m)
    assert all(b < a for a, b in zip(energies, energies[1:])), energies
