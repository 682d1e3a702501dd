"""Inversion kernel: the maths, pure torch, no ComfyUI.

A Gaussian data distribution N(0, s^2) has the exact denoiser D(x, sigma) = x * s^2 / (s^2 + sigma^2) (eps/VE
space), whose probability-flow ODE from x0 at sigma 0 is x(sigma) = x0 * sqrt(s^2 + sigma^2) / s: inversions
are checked against it."""
from __future__ import annotations

import math

import pytest
import torch

import host

K = host.pack_module("kernels.inversion")

S = 0.7  # data std of the toy model


def gauss_denoiser(calls=None, s=S):
    def denoise(x, sigma):
        if calls is not None:
            calls.append((x.clone(), float(sigma)))
        return x * (s * s / (s * s + sigma * sigma))
    return denoise


def flow_gauss_denoiser(s=S):
    """Flow space x = (1 - sigma) x0 + sigma n with x0 ~ N(0, s^2):
    E[x0 | x] = x (1 - sigma) s^2 / ((1 - sigma)^2 s^2 + sigma^2)."""
    def denoise(x, sigma):
        return x * ((1 - sigma) * s * s / ((1 - sigma) ** 2 * s * s + sigma ** 2))
    return denoise


def x0(shape=(2, 4, 6, 6), dtype=torch.float32):
    return torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(dtype)


def euler_back(denoise, x, schedule_asc):
    """Euler (= DDIM) sampling from the top of an ascending schedule down to its bottom."""
    s = schedule_asc.flip(0).tolist()
    for i in range(len(s) - 1):
        d = denoise(x, s[i])
        x = x + (s[i + 1] - s[i]) * (x - d) / s[i]
    return x


def test_defaults_validate_and_problems_named():
    assert K.InversionParams().validate() == []
    problems = " ".join(K.InversionParams(cfg=-1, renoise_steps=-1, average="nope").validate())
    for word in ("cfg", "renoise_steps", "average"):
        assert word in problems


def test_schedule_order_and_checks():
    asc = K.inversion_schedule(torch.tensor([14.6, 3.0, 0.5, 0.0]))
    assert asc.tolist() == pytest.approx([0.0, 0.5, 3.0, 14.6]) and asc.dtype == torch.float64
    assert K.inversion_schedule(torch.tensor([0.0, 0.5, 3.0])).tolist() == [0.0, 0.5, 3.0]
    with pytest.raises(ValueError, match="monotone"):
        K.inversion_schedule(torch.tensor([3.0, 0.5, 0.5, 0.0]))
    with pytest.raises(ValueError, match="at least 2"):
        K.inversion_schedule(torch.tensor([1.0]))


def test_converges_to_the_exact_ode_solution():
    x = x0()
    errors = []
    for steps in (5, 20, 80):
        sig = torch.linspace(0.0, 10.0, steps + 1)
        out = K.invert(gauss_denoiser(), x, sig).latent
        exact = x * math.sqrt(S * S + 100.0) / S
        errors.append(float((out - exact).abs().max() / exact.abs().max()))
    # first order: four times the steps, about a quarter of the error
    assert errors[0] > 2.5 * errors[1] > 6.0 * errors[2], errors
    assert errors[2] < 0.1, errors


def test_first_evaluation_is_at_the_next_sigma_on_the_rescaled_state():
    calls = []
    x = x0()
    scale = K.vp_input_scale
    K.invert(gauss_denoiser(calls), x, torch.tensor([0.0, 1.0, 3.0]), input_scale=scale)
    assert [c[1] for c in calls] == [1.0, 3.0]
    assert torch.allclose(calls[0][0], x * math.sqrt(2.0))  # sqrt(1 + 1^2) / sqrt(1 + 0)
    assert scale(1.0, 3.0) == pytest.approx(math.sqrt(10.0) / math.sqrt(2.0))


def test_renoise_makes_the_step_the_exact_inverse_of_an_euler_step():
    x = x0()
    sig = torch.tensor([0.0, 0.3, 1.0, 2.5, 6.0])
    plain = K.invert(gauss_denoiser(), x, sig).latent
    fixed = K.invert(gauss_denoiser(), x, sig, K.InversionParams(renoise_steps=60)).latent
    # Euler back from the fixed point retraces every step (the last step evaluates D at sigma > 0 and lands at 0)
    err_fixed = float((euler_back(gauss_denoiser(), fixed, K.inversion_schedule(sig)) - x).abs().max())
    err_plain = float((euler_back(gauss_denoiser(), plain, K.inversion_schedule(sig)) - x).abs().max())
    assert err_fixed < 1e-4 < err_plain


def test_model_call_counts_and_reference_plan():
    calls = []
    sig = torch.tensor([0.0, 0.1, 0.2, 1.0, 5.0])
    res = K.invert(gauss_denoiser(calls), x0(), sig, K.InversionParams(renoise_steps=7))
    assert res.evaluations == len(calls) == 4 * 8
    calls.clear()
    p = K.InversionParams(renoise_steps=7, average="reference", early_sigma=0.5)
    res = K.invert(gauss_denoiser(calls), x0(), sig, p)
    # two early steps (target sigma 0.1, 0.2 < 0.5) capped at 5 renoise iterations, two late ones with 7
    assert res.evaluations == 2 * 6 + 2 * 8
    assert p.plan(0.2) == (5, (0, 5)) and p.plan(1.0) == (7, (8, 10))
    assert K.InversionParams(renoise_steps=3, average="mean").plan(1.0) == (3, (0, 4))


def test_mean_average_uses_the_mean_slope():
    seen = []

    def denoise(x, sigma):  # an arbitrary, input-independent model: slopes 1, 2, 3 on successive calls
        seen.append(1)
        return x - sigma * float(len(seen))

    x = torch.zeros(1, 1, 2, 2)
    out, _, calls = K.invert_step(denoise, x, 0.0, 2.0, renoise_steps=2, average_range=(0, 3))
    assert calls == 3 and torch.allclose(out, torch.full_like(x, 2.0 * 2.0))  # mean slope 2
    seen.clear()
    out, _, _ = K.invert_step(denoise, x, 0.0, 2.0, renoise_steps=2, average_range=(0, 0))
    assert torch.allclose(out, torch.full_like(x, 2.0 * 3.0))  # last slope 3


def test_flow_inversion_reaches_sigma_one_without_division():
    x = x0()
    sig = torch.linspace(1.0, 0.0, 65)  # a flow sampling schedule, descending to 0
    res = K.invert(flow_gauss_denoiser(), x, sig, K.InversionParams(renoise_steps=3))
    assert torch.isfinite(res.latent).all()
    assert float(res.sigmas[-1]) == 1.0 and len(res.trajectory) == 65 and len(res.denoised) == 64
    # at sigma 1 the flow state is pure noise: for N(0, s^2) data the exact ODE maps x0 to x0 / s
    assert float((res.latent - x / S).abs().mean() / (x / S).abs().mean()) < 0.05


def test_dtype_is_kept_and_input_not_modified():
    x = x0(dtype=torch.float16)
    before = x.clone()
    res = K.invert(gauss_denoiser(), x, torch.tensor([0.0, 0.5, 2.0]))
    assert res.latent.dtype == torch.float16 and all(t.dtype == torch.float16 for t in res.trajectory)
    assert torch.equal(x, before) and res.trajectory[0] is x


def test_on_step_and_no_trajectory():
    seen = []
    res = K.invert(gauss_denoiser(), x0(), torch.tensor([0.0, 0.5, 2.0]), keep_trajectory=False,
                   on_step=lambda i, x, d: seen.append(i))
    assert seen == [0, 1] and res.trajectory == [] and res.denoised == []


def test_start_noise_lands_on_the_state():
    state, latent = x0(), x0((2, 4, 6, 6)) * 0.3
    for noise_gain, latent_gain in ((14.6, 1.0), (1.0, 0.0), (0.7, 0.3)):
        n = K.start_noise(state, latent, noise_gain, latent_gain)
        assert torch.allclose(noise_gain * n + latent_gain * latent, state, atol=1e-5)
    with pytest.raises(ValueError, match="noise_gain"):
        K.start_noise(state, latent, 0.0, 1.0)


# ------------------------------------------------------------------------------------------------
# pix2pix-zero noise regulariser
# ------------------------------------------------------------------------------------------------
def literal_auto_corr(x, shifts):
    """The reference's auto_corr_loss for one image with given roll amounts (one per channel and level)."""
    loss, k = 0.0, 0
    for c in range(x.shape[1]):
        v = x[0, c][None, None]
        while True:
            r = shifts[k]
            k += 1
            loss = loss + (v * torch.roll(v, r, 2)).mean() ** 2 + (v * torch.roll(v, r, 3)).mean() ** 2
            if v.shape[2] <= 8:
                break
            v = torch.nn.functional.avg_pool2d(v, 2)
    return loss


def test_auto_corr_matches_the_reference_formula():
    x = x0((1, 4, 16, 16))
    g = torch.Generator().manual_seed(3)
    got = K.auto_corr(x, g)
    g = torch.Generator().manual_seed(3)
    shifts = []
    for c in range(4):
        for size in (16, 8):
            shifts.append(int(torch.randint(0, size // 2, (1,), generator=g)))
    assert float(got) == pytest.approx(float(literal_auto_corr(x, shifts)), rel=1e-6)


def test_patch_kl_is_zero_for_identical_statistics_and_positive_otherwise():
    e = x0((1, 4, 8, 8))
    assert float(K.patch_kl(e, e)) == pytest.approx(0.0, abs=1e-4)  # eps 1e-6 in the variances
    assert float(K.patch_kl(e * 3.0 + 1.0, e)) > 1.0


@pytest.mark.parametrize("shape", [(1, 4, 3, 8), (1, 4, 8, 2), (1, 4, 1, 1)])
def test_latents_smaller_than_a_patch_have_no_kl_term_and_still_regularise(shape):
    """Documented behaviour for tiny images (latent under 4x4): the patch-KL term is 0 (no whole patch), the
    auto-correlation term still acts, and the result is finite."""
    e = x0(shape)
    assert float(K.patch_kl(e * 3.0 + 1.0, e)) == 0.0
    g = torch.Generator().manual_seed(0)
    out = K.regularize_noise(e, e, steps=2, rolls=2, generator=g)
    assert out.shape == e.shape and torch.isfinite(out).all()
    only_kl = K.regularize_noise(e, e * 3.0, lambda_ac=0.0, steps=2)
    assert torch.equal(only_kl, e)


def test_regulariser_moves_toward_white_gaussian_noise_and_works_under_inference_mode():
    g = torch.Generator().manual_seed(0)
    white = torch.randn(1, 4, 16, 16, generator=g)
    smooth = torch.nn.functional.avg_pool2d(torch.randn(1, 4, 18, 18, generator=g), 3, stride=1)  # correlated
    with torch.inference_mode():  # as inside ComfyUI
        e = smooth * 3.0
        out = K.regularize_noise(e, white, generator=torch.Generator().manual_seed(1))
    assert out.dtype == e.dtype and out.shape == e.shape
    ac = lambda v: float(K.auto_corr(v, torch.Generator().manual_seed(5)))  # noqa: E731
    assert ac(out) < ac(e)
    assert float(K.patch_kl(out, white)) < float(K.patch_kl(e, white))


def test_regularised_inversion_counts_and_seed():
    calls = []
    sig = torch.tensor([0.0, 0.1, 0.2, 1.0, 5.0])
    p = K.InversionParams(renoise_steps=1, average="reference", early_sigma=0.5, noise_regularization=True)
    res = K.invert(gauss_denoiser(calls), x0((1, 4, 16, 16)), sig, p)
    # two early steps get one extra (forward-noised) evaluation each; late steps (average range 8-10) none
    assert res.evaluations == len(calls) == 4 * 2 + 2
    again = K.invert(gauss_denoiser(), x0((1, 4, 16, 16)), sig, p)
    other = K.invert(gauss_denoiser(), x0((1, 4, 16, 16)), sig, p.replace(regularization_seed=1))
    plain = K.invert(gauss_denoiser(), x0((1, 4, 16, 16)), sig, p.replace(noise_regularization=False))
    assert torch.equal(res.latent, again.latent)
    assert not torch.equal(res.latent, other.latent) and not torch.allclose(res.latent, plain.latent)
