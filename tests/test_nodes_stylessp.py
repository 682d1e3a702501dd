"""StyleSSP nodes, in-process on the real ComfyUI with tiny random-weight models of each family.

Behaviour: the start point is the documented combination (identity at neutral settings, the content term exactly
linear), its LATENT (add_noise disabled) and NOISE outputs start a sampler at the same state, the sigmas continue
the inversion's schedule, the full pipeline (negative-guidance inversion -> start point -> sampling) runs and
differs from plain img2img, and errors are loud."""
from __future__ import annotations

import logging

import pytest
import torch

import host
from sampling_helpers import Setup

STEPS = 4


@pytest.fixture(scope="module")
def ssp(comfy_root):
    return host.pack_module("nodes.stylessp")


@pytest.fixture(scope="module")
def inv(comfy_root):
    return host.pack_module("nodes.inversion")


def content(s: Setup, batch=1, seed=0):
    return {"samples": torch.randn(batch, s.latent_channels, 8, 8, generator=torch.Generator().manual_seed(seed))}


def sigmas_for(s: Setup, steps=STEPS, scheduler="ddim_uniform"):
    import comfy.samplers
    return comfy.samplers.calculate_sigmas(s.model.get_model_object("model_sampling"), scheduler, steps)


_inversions: dict = {}


def inverted(inv, s: Setup, lat, scheduler="ddim_uniform"):
    """The official-style inversion (cfg 1.5 against the negative, ReNoise 1, reference averaging, regulariser on
    eps models) of `lat`; deterministic, so computed once per family/latent/scheduler for the whole module."""
    key = (s.family, scheduler, lat["samples"].shape, float(lat["samples"].sum()))
    if key not in _inversions:
        with torch.inference_mode():
            _inversions[key] = inv.InvertNode.execute(
                model=s.model, positive=s.positive, latent=lat, sigmas=sigmas_for(s, scheduler=scheduler), cfg=1.5,
                renoise_steps=1, renoise_average="reference", noise_regularization=s.family not in ("sd3", "flux"),
                negative=s.negative).args
    return _inversions[key]


BASE = dict(seed=1234, mode="faithful", alpha=0.7, d_s=0.3, d_t=0.9, radius=0.3, strength=0.3, noise_strength=0.3,
            content_weight=0.2, schedule="reference", skip_steps=1)


def reference_sigmas(s: Setup, steps=STEPS, skip=1):
    """The official resume schedule, restated: diffusers' UniPC 'leading' timesteps k * (1000 // (steps + 1)) + 1,
    k = steps .. 1, minus the first `skip`, then 0; DDPM-timestep models read their sigma table, flow models the
    same fraction of their schedule."""
    ms = s.model.get_model_object("model_sampling")
    ts = [k * (1000 // (steps + 1)) + 1 for k in range(steps, 0, -1)][skip:]
    if s.family in ("sd3", "flux"):
        return torch.tensor([ms.percent_to_sigma(1 - t / 1000) for t in ts] + [0.0])
    return torch.cat([ms.sigmas[ts].float(), torch.zeros(1)])


def start(ssp, s: Setup, inv_latent, lat, sigmas, **overrides):
    values = dict(BASE)
    values.update(overrides)
    with torch.inference_mode():
        return ssp.StyleSSPStartPoint.execute(model=s.model, inverted=inv_latent, content=lat, sigmas=sigmas,
                                              **values).args


def sample(s: Setup, noise, sigmas, latent, cfg=3.0):
    import comfy.samplers
    from comfy_extras import nodes_custom_sampler as ncs
    guider = comfy.samplers.CFGGuider(s.model)
    guider.set_conds(s.positive, s.negative)
    guider.set_cfg(cfg)
    with torch.inference_mode():
        return ncs.SamplerCustomAdvanced().sample(noise, guider, comfy.samplers.sampler_object("euler"), sigmas,
                                                  latent)[0]["samples"].clone()


def state_of(ssp, s, inv_latent, lat, sigmas, **overrides):
    values = dict(BASE)
    values.update(overrides)
    params = ssp.DEFAULTS.replace(**values)
    with torch.inference_mode():
        return ssp.build_start_point(s.model, inv_latent, lat, sigmas, params)


# ------------------------------------------------------------------------------------------------
def test_full_pipeline_runs_and_differs_from_img2img(setup, ssp, inv):
    """Negative-guidance inversion -> start point -> sampling along the returned sigmas (any family)."""
    lat = content(setup)
    inv_latent, _, sigmas, _ = inverted(inv, setup, lat)
    latent, out_sigmas, noise = start(ssp, setup, inv_latent, lat, sigmas)
    assert torch.allclose(out_sigmas, reference_sigmas(setup), rtol=1e-6)
    assert float(out_sigmas[0]) < float(sigmas[0]), "the reference resumes below the inversion's end"
    assert torch.equal(start(ssp, setup, inv_latent, lat, sigmas, schedule="inversion")[1], sigmas[1:].float())
    assert latent["samples"].shape == lat["samples"].shape and torch.isfinite(latent["samples"]).all()
    from comfy_extras import nodes_custom_sampler as ncs
    styled = sample(setup, ncs.Noise_EmptyNoise(), out_sigmas, latent)
    img2img = sample(setup, ncs.Noise_RandomNoise(1234), out_sigmas, lat)
    assert torch.isfinite(styled).all() and not torch.allclose(styled, img2img, atol=1e-3)


def test_latent_and_noise_outputs_start_at_the_same_state(setup, ssp, inv):
    from comfy_extras import nodes_custom_sampler as ncs
    lat = content(setup)
    inv_latent, _, sigmas, _ = inverted(inv, setup, lat)
    sp = state_of(ssp, setup, inv_latent, lat, sigmas)
    ms = setup.model.get_model_object("model_sampling")
    # the NOISE lands on the state: noise_scaling(sigma, n, latent_in) == state (any same-size latent)
    n = sp.noise.generate_noise(lat)
    latent_in = setup.model.model.process_latent_in(lat["samples"])
    md = sp.sigma >= float(ms.sigma_max) * (1 - 1e-5)
    landed = ms.noise_scaling(torch.tensor([sp.sigma]), n, latent_in, md)
    assert torch.allclose(landed, sp.state, atol=1e-4 * float(sp.state.abs().max()))
    via_latent = sample(setup, ncs.Noise_EmptyNoise(), sp.sigmas, sp.latent)
    via_noise = sample(setup, sp.noise, sp.sigmas, lat)
    assert torch.allclose(via_latent, via_noise, atol=1e-3 * float(via_noise.abs().max()) + 1e-5)


def test_neutral_settings_return_the_inverted_state(setup, ssp, inv):
    lat = content(setup)
    inv_latent, _, sigmas, _ = inverted(inv, setup, lat)
    sp = state_of(ssp, setup, inv_latent, lat, sigmas, alpha=1.0, noise_strength=0.0, content_weight=0.0,
                  schedule="inversion", skip_steps=0)
    x = setup.model.model.process_latent_in(inv_latent["samples"])
    assert torch.allclose(sp.state, x, atol=1e-5 * float(x.abs().max()))
    assert sp.sigma == pytest.approx(float(sigmas[0]))


def test_content_term_is_the_noised_content_latent(sd15, ssp, inv):
    """state(w) - state(0) == w * (content noised to the start sigma): eps models x0 + sigma * n."""
    s = sd15
    lat = content(s)
    inv_latent, _, sigmas, _ = inverted(inv, s, lat)
    a = state_of(ssp, s, inv_latent, lat, sigmas, content_weight=0.2)
    b = state_of(ssp, s, inv_latent, lat, sigmas, content_weight=0.0)
    x0 = s.model.model.process_latent_in(lat["samples"])
    term = (a.state - b.state) / 0.2
    resid = term - x0  # must be sigma_start * standard Gaussian noise
    assert a.sigma == pytest.approx(float(reference_sigmas(s)[0]))
    assert float(resid.std() / a.sigma) == pytest.approx(1.0, abs=0.2)


def test_official_resume_point_on_sdxl(comfy_root, tmp_path_factory, ssp):
    """The official setting (ddim_uniform 50 = DDIM 'leading' inversion to t = 981; UniPC 'leading' sampling of
    50 steps at strength 0.9999) resumes at t = 932 (sigma 9.917 on SDXL's schedule), 49 steps down to t = 20 then
    0; schedule 'inversion' would resume at the inversion's next step t = 961. No model pass: any latent will do."""
    from sampling_helpers import get_setup
    s = get_setup("sdxl", tmp_path_factory)
    ms = s.model.get_model_object("model_sampling")
    sigmas = sigmas_for(s, 50)
    assert float(sigmas[0]) == pytest.approx(float(ms.sigmas[981])) and float(sigmas[1]) == pytest.approx(
        float(ms.sigmas[961]))
    lat = {"samples": torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))}
    sp = state_of(ssp, s, lat, lat, sigmas)
    assert sp.sigma == pytest.approx(9.917, abs=1e-3) and sp.sigma == pytest.approx(float(ms.sigmas[932]))
    assert len(sp.sigmas) == 50 and float(sp.sigmas[-1]) == 0.0
    assert float(sp.sigmas[1]) == pytest.approx(float(ms.sigmas[913])) and float(sp.sigmas[-2]) == pytest.approx(
        float(ms.sigmas[20]))
    assert state_of(ssp, s, lat, lat, sigmas, schedule="inversion").sigma == pytest.approx(float(ms.sigmas[961]))


def test_faithful_and_improved_modes_and_seeds(sd15, ssp, inv):
    s = sd15
    lat = content(s)
    inv_latent, _, sigmas, _ = inverted(inv, s, lat)
    faithful = start(ssp, s, inv_latent, lat, sigmas)[0]["samples"]
    assert torch.equal(faithful, start(ssp, s, inv_latent, lat, sigmas)[0]["samples"])
    seed5 = start(ssp, s, inv_latent, lat, sigmas, seed=5)
    assert not torch.equal(faithful, seed5[0]["samples"])
    # the Python API draws from params.seed, the node's one source of the seed: the same start point and noise
    api = state_of(ssp, s, inv_latent, lat, sigmas, seed=5)
    assert torch.equal(api.latent["samples"], seed5[0]["samples"]) and api.noise.seed == seed5[2].seed == 5
    improved = start(ssp, s, inv_latent, lat, sigmas, mode="improved")[0]["samples"]
    assert not torch.allclose(faithful, improved, atol=1e-3)


def test_frequency_node(setup, ssp):
    lat = content(setup)
    lat16 = {"samples": lat["samples"].half()}
    with torch.inference_mode():
        out = ssp.StyleSSPFrequency.execute(model=setup.model, latent=lat16, seed=0, mode="faithful", alpha=0.7,
                                            d_s=0.3, d_t=0.9, radius=0.3, strength=0.3, noise_strength=0.0).args[0]
        neutral = ssp.StyleSSPFrequency.execute(model=setup.model, latent=lat, seed=0, mode="improved",
                                                alpha=0.7, d_s=0.3, d_t=0.9, radius=0.3, strength=0.0,
                                                noise_strength=0.0).args[0]
    assert out["samples"].dtype == torch.float16 and out["samples"].shape == lat["samples"].shape
    assert not torch.allclose(out["samples"].float(), lat["samples"], atol=1e-2)
    assert torch.allclose(neutral["samples"], lat["samples"], atol=1e-4)


def test_flow_start_at_sigma_one_warns_and_noise_still_works(setup, ssp, inv, caplog):
    if setup.family not in ("sd3", "flux"):
        pytest.skip("flow models only")
    lat = content(setup)
    inv_latent, _, sigmas, _ = inverted(inv, setup, lat, scheduler="simple")
    with caplog.at_level(logging.WARNING):
        sp = state_of(ssp, setup, inv_latent, lat, sigmas, schedule="inversion", skip_steps=0)
    assert sp.sigma == pytest.approx(1.0)
    adapters = host.pack_module("nodes.adapters")
    assert any("NOISE output" in r.getMessage() for r in caplog.records) or \
        any(k.startswith("stylessp.latent_at_one") for k in adapters._warned)
    ms = setup.model.get_model_object("model_sampling")
    landed = ms.noise_scaling(torch.tensor([1.0]), sp.noise.generate_noise(lat),
                              setup.model.model.process_latent_in(lat["samples"]), True)
    assert torch.allclose(landed, sp.state, atol=1e-5 * float(sp.state.abs().max()))


def test_errors(sd15, ssp, inv):
    s = sd15
    lat = content(s)
    inv_latent, _, sigmas, _ = inverted(inv, s, lat)
    with pytest.raises(ValueError, match="skip_steps"):
        start(ssp, s, inv_latent, lat, sigmas, skip_steps=STEPS)
    with pytest.raises(ValueError, match="content latent"):
        start(ssp, s, inv_latent, {"samples": torch.zeros(1, 4, 16, 16)}, sigmas)
    with pytest.raises(ValueError, match="channels"):
        start(ssp, s, {"samples": torch.zeros(1, 16, 8, 8)}, lat, sigmas)
    checks = dict(mode="faithful", alpha=0.7, d_s=0.3, d_t=0.9, radius=0.3, strength=0.3, noise_strength=0.3,
                  content_weight=0.2, schedule="reference", skip_steps=1)
    assert ssp.StyleSSPStartPoint.validate_inputs(**checks) is True
    assert "mode" in ssp.StyleSSPStartPoint.validate_inputs(**dict(checks, mode="x"))
    assert "schedule" in ssp.StyleSSPStartPoint.validate_inputs(**dict(checks, schedule="x"))


# ------------------------------------------------------------------------------------------------
# Input declarations (issue 13), defaults (issue 18), broken inputs and fresh runs (issue 17)
# ------------------------------------------------------------------------------------------------
def test_declared_inputs_validate_and_linked_inputs_pass(comfy_root, ssp):
    """A linked alpha (None at validation) used to crash validation; now every linked widget passes."""
    from test_nodes_inversion import check_declared_validation
    check_declared_validation(ssp.StyleSSPFrequency, "StyleSSP Frequency")
    check_declared_validation(ssp.StyleSSPStartPoint, "StyleSSP Start Point")
    assert ssp.StyleSSPFrequency.validate_inputs(alpha=None, seed=None, mode="faithful") is True


def test_linked_values_are_checked_when_the_node_executes(sd15, ssp):
    inputs = host.pack_module("nodes.inputs")
    lat = content(sd15)
    with pytest.raises(inputs.InputError, match="'alpha'"), torch.inference_mode():
        ssp.StyleSSPFrequency.execute(model=sd15.model, latent=lat, alpha=2.5)
    with pytest.raises(inputs.InputError, match="'schedule'"):
        start(ssp, sd15, lat, lat, sigmas_for(sd15), schedule="leading")


def test_one_seed_default_for_both_nodes(setup, ssp):
    """Both nodes start from the official seed 1234, and at one seed they draw the same frequency-manipulation
    noise: the Frequency node's output is the Start Point's state at the neutral hand-off without the content term."""
    for node in (ssp.StyleSSPFrequency, ssp.StyleSSPStartPoint):
        assert {i.id: i for i in node.define_schema().inputs}["seed"].default == ssp.DEFAULTS.seed == 1234
    lat = content(setup)
    with torch.inference_mode():
        freq = ssp.StyleSSPFrequency.execute(model=setup.model, latent=lat).args[0]["samples"]
    sp = state_of(ssp, setup, lat, lat, sigmas_for(setup), content_weight=0.0, schedule="inversion", skip_steps=0)
    expected = setup.model.model.process_latent_out(sp.state)
    assert torch.allclose(freq, expected, atol=1e-5 * float(expected.abs().max()))
    assert not torch.allclose(freq, lat["samples"], atol=1e-3)


def test_every_input_at_its_default_runs(setup, ssp, inv):
    """The smallest graph: Inversion (its defaults) -> Start Point (its defaults) -> SamplerCustomAdvanced with
    the start NOISE and sigmas; the Frequency node on the inverted latent with its defaults."""
    import comfy.samplers
    lat = content(setup)
    sigmas = comfy.samplers.calculate_sigmas(setup.model.get_model_object("model_sampling"), "normal", STEPS)
    with torch.inference_mode():
        inverted_latent = inv.InvertNode.execute(model=setup.model, positive=setup.positive, latent=lat,
                                                 sigmas=sigmas).args[0]
        latent, out_sigmas, noise = ssp.StyleSSPStartPoint.execute(model=setup.model, inverted=inverted_latent,
                                                                   content=lat, sigmas=sigmas).args
        manipulated = ssp.StyleSSPFrequency.execute(model=setup.model, latent=inverted_latent).args[0]
    assert latent["samples"].shape == lat["samples"].shape and torch.isfinite(latent["samples"]).all()
    assert len(out_sigmas) == STEPS and torch.isfinite(manipulated["samples"]).all()
    out = sample(setup, noise, out_sigmas, lat)
    assert out.shape == lat["samples"].shape and torch.isfinite(out).all()


def _poisoned(lat: dict, value=float("nan")) -> dict:
    x = lat["samples"].clone()
    x.view(-1)[5] = value
    return {"samples": x}


def test_non_finite_inputs_are_refused_naming_the_input(sd15, ssp):
    inputs = host.pack_module("nodes.inputs")
    lat = content(sd15)
    sigmas = sigmas_for(sd15)
    with pytest.raises(inputs.InputError, match="StyleSSP Frequency.*'latent' holds NaN"), torch.inference_mode():
        ssp.StyleSSPFrequency.execute(model=sd15.model, latent=_poisoned(lat, float("inf")))
    for name, value in (("inverted", _poisoned(lat)), ("content", _poisoned(lat, -float("inf"))),
                        ("sigmas", torch.cat([sigmas[:2], torch.tensor([float("nan")]), sigmas[3:]]))):
        args = dict(inverted=lat, content=lat, sigmas=sigmas)
        args[name] = value
        with pytest.raises(inputs.InputError, match=f"StyleSSP Start Point.*'{name}' holds NaN"):
            start(ssp, sd15, args["inverted"], args["content"], args["sigmas"])


def test_content_batch_must_be_one_or_the_inverted_batch(sd15, ssp):
    """Documented behaviour: a batch-1 content latent serves every inverted image; another batch size is an
    error naming both inputs and the fix."""
    sigmas = sigmas_for(sd15)
    inverted_latent = content(sd15, batch=2, seed=3)
    one = content(sd15)
    sp = state_of(ssp, sd15, inverted_latent, one, sigmas)
    no_content = state_of(ssp, sd15, inverted_latent, one, sigmas, content_weight=0.0)
    x0 = sd15.model.model.process_latent_in(one["samples"])
    term = (sp.state - no_content.state) / 0.2 - x0       # = start sigma x content noise, per image
    assert sp.state.shape[0] == 2 and not torch.allclose(term[0], term[1])
    with pytest.raises(ValueError, match="content latent is .*inverted latent is .*batch size"):
        start(ssp, sd15, content(sd15, batch=3), content(sd15, batch=2), sigmas)
    with pytest.raises(ValueError, match="different size"):
        start(ssp, sd15, inverted_latent, {"samples": torch.zeros(1, 4, 16, 16)}, sigmas)


def test_after_an_error_the_next_run_equals_a_fresh_one(sd15, ssp):
    lat = content(sd15)
    sigmas = sigmas_for(sd15)
    fresh = start(ssp, sd15, lat, lat, sigmas)
    with torch.inference_mode():
        fresh_freq = ssp.StyleSSPFrequency.execute(model=sd15.model, latent=lat).args[0]["samples"]
    with pytest.raises(ValueError):
        start(ssp, sd15, _poisoned(lat), lat, sigmas)
    with pytest.raises(ValueError):
        start(ssp, sd15, lat, lat, sigmas, skip_steps=STEPS)
    again = start(ssp, sd15, lat, lat, sigmas)
    assert torch.equal(again[0]["samples"], fresh[0]["samples"]) and torch.equal(again[1], fresh[1])
    assert torch.equal(again[2].generate_noise(lat), fresh[2].generate_noise(lat))
    with torch.inference_mode():
        assert torch.equal(ssp.StyleSSPFrequency.execute(model=sd15.model, latent=lat).args[0]["samples"],
                           fresh_freq)
