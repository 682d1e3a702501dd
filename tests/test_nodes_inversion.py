"""Inversion nodes, in-process on the real ComfyUI with tiny random-weight models of each family.

Behaviour: inverting and sampling back (Euler = DDIM, same conditioning, no guidance) reconstructs the latent,
better with more steps and with ReNoise; cfg 1 with a negative is plain conditional inversion; the CFG batch pairs
each conditioning with the same latent; the SAMPLER in SamplerCustomAdvanced equals the one-node inversion;
outputs, call counts, errors and interrupts."""
from __future__ import annotations

import logging
import math

import pytest
import torch

import host
from sampling_helpers import Setup, with_counter


@pytest.fixture(scope="module")
def inv(comfy_root):
    return host.pack_module("nodes.inversion")


def content(s: Setup, batch=1, seed=0):
    return torch.randn(batch, s.latent_channels, 8, 8, generator=torch.Generator().manual_seed(seed))


def sigmas_for(s: Setup, steps, scheduler="normal"):
    import comfy.samplers
    return comfy.samplers.calculate_sigmas(s.model.get_model_object("model_sampling"), scheduler, steps)


def run_node(inv, s: Setup, latent, steps=4, cfg=1.0, renoise=0, average="last", negative=None, model=None,
             regularize=False):
    with torch.inference_mode():
        out = inv.InvertNode.execute(model=model or s.model, positive=s.positive, latent={"samples": latent},
                                     sigmas=sigmas_for(s, steps), cfg=cfg, renoise_steps=renoise,
                                     renoise_average=average, noise_regularization=regularize, negative=negative)
    return out.args


def sample_back(inv, s: Setup, noise, sigmas, latent):
    import comfy.samplers
    from comfy_extras import nodes_custom_sampler as ncs
    guider = inv.make_inversion_guider(s.model, s.positive, None, 1.0)
    with torch.inference_mode():
        out = ncs.SamplerCustomAdvanced().sample(noise, guider, comfy.samplers.sampler_object("euler"), sigmas,
                                                 {"samples": latent})[0]["samples"]
    return out.clone()


# Per family: the part of a "normal" schedule inverted (its lower 1/fraction), few and more steps, ReNoise
# iterations, and the close-reconstruction bound. The random eps UNets are far from smooth at high sigma (measured
# |d eps/d x| * sigma ~ 2.4 for the tiny SD1.5, ~ 10 for the tiny SDXL: too large for ReNoise's fixed point to
# contract), so SD1.5 is checked over the lower half and SDXL over the lower quarter, where errors shrink
# monotonically (SDXL stays far from close there); the flow models over the whole range up to sigma 1.
RECONSTRUCTION = {"sd15": (2, 3, 8, 3, 0.1), "sdxl": (4, 3, 6, 2, None), "sd3": (1, 3, 8, 3, 0.02),
                  "flux": (1, 3, 8, 3, 0.02)}


def reconstruction_error(inv, s: Setup, steps, fraction=1, renoise=0):
    import comfy.samplers
    lat = content(s)
    ms = s.model.get_model_object("model_sampling")
    sigmas = comfy.samplers.calculate_sigmas(ms, "normal", fraction * steps)[(fraction - 1) * steps:]
    with torch.inference_mode():
        result = inv.invert_latent(s.model, s.positive, None, {"samples": lat}, sigmas,
                                   inv.DEFAULTS.replace(renoise_steps=renoise), progress=False)
    back = sample_back(inv, s, result.noise(), result.sampling_sigmas(), lat)
    return float((back - lat).abs().mean() / lat.abs().mean())


# ------------------------------------------------------------------------------------------------
def test_inversion_then_sampling_back_reconstructs(setup, inv):
    """Relative L1 error of the reconstruction (printed with -s); it must shrink with more steps, and ReNoise
    (a fixed point that inverts each Euler step) must shrink it further, to a close reconstruction on SD1.5 (lower
    half of the schedule) and the flow models (whole schedule, from sigma 1)."""
    fraction, few, more, renoise, bound = RECONSTRUCTION[setup.family]
    e_few = reconstruction_error(inv, setup, few, fraction)
    e_more = reconstruction_error(inv, setup, more, fraction)
    e_renoise = reconstruction_error(inv, setup, more, fraction, renoise)
    print(f"\n[{setup.family}] reconstruction rel. L1 error (lower 1/{fraction} of the schedule): {few} steps "
          f"{e_few:.4g}, {more} steps {e_more:.4g}, {more} steps + renoise {renoise} {e_renoise:.4g}")
    assert e_more < e_few
    assert e_renoise < e_more
    if bound is not None:
        assert e_renoise < bound


def test_outputs(setup, inv):
    lat = content(setup, batch=2)
    inverted, trajectory, sigmas, noise = run_node(inv, setup, lat, steps=3)
    x = inverted["samples"]
    assert x.shape == lat.shape and torch.isfinite(x).all()
    t = trajectory["samples"]
    assert t.shape == (4 * 2,) + tuple(lat.shape[1:])
    assert torch.allclose(t[:2], lat, atol=1e-4), "row block 0 is the clean latent"
    assert torch.equal(t[-2:], x), "the last row block is the inverted latent"
    assert sigmas[0] > sigmas[-1] and float(sigmas[-1]) == 0.0
    assert torch.equal(sigmas, sigmas_for(setup, 3).float().cpu())
    if setup.family in ("sd3", "flux"):
        assert float(sigmas[0]) == pytest.approx(1.0)


def test_cfg_one_equals_plain_conditional_inversion(setup, inv):
    lat = content(setup)
    plain = run_node(inv, setup, lat)[0]["samples"]
    with_negative = run_node(inv, setup, lat, cfg=1.0, negative=setup.negative)[0]["samples"]
    assert torch.equal(plain, with_negative)
    # also when ComfyUI is made to compute the negative: uncond + 1 * (cond - uncond) == cond up to rounding
    forced = setup.model.clone()
    forced.model_options["disable_cfg1_optimization"] = True
    model, counts = with_counter(forced)
    computed = run_node(inv, setup, lat, cfg=1.0, negative=setup.negative, model=model)[0]["samples"]
    assert counts["uncond"] == 4
    assert torch.allclose(computed, plain, rtol=1e-4, atol=1e-4 * float(plain.abs().max()))


def test_negative_guidance_pairs_each_conditioning_with_the_same_latent(sd15, inv):
    """cfg 2.5 over (positive, negative) equals the kernel driven by separately computed positive-only and
    negative-only predictions combined as neg + 2.5 (pos - neg): no latent/conditioning mix-up."""
    kernel = host.pack_module("kernels.inversion")
    import comfy.samplers
    s, lat, steps, w = sd15, content(sd15), 3, 2.5
    model, counts = with_counter(s.model)
    guided = run_node(inv, s, lat, steps=steps, cfg=w, renoise=1, negative=s.negative, model=model)[0]["samples"]
    assert counts["cond"] == counts["uncond"] == steps * 2

    class Combined(comfy.samplers.CFGGuider):
        def predict_noise(self, x, timestep, model_options={}, seed=None):
            pos = comfy.samplers.calc_cond_batch(self.inner_model, [self.conds["positive"]], x, timestep,
                                                 model_options)[0]
            neg = comfy.samplers.calc_cond_batch(self.inner_model, [self.conds["negative"]], x, timestep,
                                                 model_options)[0]
            return neg + w * (pos - neg)

    guider = Combined(s.model)
    guider.set_conds(s.positive, s.negative)
    sampler = inv.InversionSampler(kernel.InversionParams(renoise_steps=1))
    with torch.inference_mode():
        out = guider.sample(torch.zeros_like(lat), lat, sampler, sigmas_for(s, steps), seed=0)
    assert torch.allclose(out, guided, rtol=1e-4, atol=1e-4 * float(guided.abs().max()))
    assert not torch.allclose(guided, run_node(inv, s, lat, steps=steps, renoise=1)[0]["samples"], atol=1e-3)


def test_sampler_node_in_sampler_custom_advanced_equals_the_one_node(setup, inv):
    import comfy.samplers
    from comfy_extras import nodes_custom_sampler as ncs
    lat = content(setup)
    one_node = run_node(inv, setup, lat, steps=3, cfg=2.0, renoise=1, negative=setup.negative)[0]["samples"]
    sampler = inv.InversionSamplerNode.execute(renoise_steps=1, renoise_average="last",
                                               noise_regularization=False).args[0]
    guider = comfy.samplers.CFGGuider(setup.model)
    guider.set_conds(setup.positive, setup.negative)
    guider.set_cfg(2.0)
    flipped = sigmas_for(setup, 3).flip(0)  # FlipSigmas-style input works too
    with torch.inference_mode():
        out = ncs.SamplerCustomAdvanced().sample(ncs.Noise_EmptyNoise(), guider, sampler, flipped,
                                                 {"samples": lat})[0]["samples"]
    assert torch.equal(out, one_node)
    assert sampler.last_result is not None and len(sampler.last_result.trajectory) == 4


def test_model_passes_per_step(sd15, inv):
    model, counts = with_counter(sd15.model)
    run_node(inv, sd15, content(sd15), steps=3, renoise=2, model=model)
    assert counts == {"cond": 9, "uncond": 0, "calls": 9}
    model, counts = with_counter(sd15.model)
    run_node(inv, sd15, content(sd15), steps=3, renoise=6, average="reference", model=model)
    # reference plan: steps below DDPM t=250 capped at 5 renoise iterations; 3 normal steps end at sigmas whose
    # timesteps are 0, 500, 999: one early step
    assert counts["cond"] == 6 + 2 * 7


def test_noise_regularization(setup, inv):
    """The official regulariser runs on eps models (one more guider call on each regularised step: with reference
    averaging the early steps) and changes the result; on flow models it is skipped with a warning."""
    from sampling_helpers import with_counter
    lat = content(setup)
    if setup.family in ("sd3", "flux"):  # skipped with a warning (it is the nodes' default)
        adapters = host.pack_module("nodes.adapters")
        adapters._warned.discard("inversion.flow_regularizer.Inversion")  # said once per node: say it again here
        records = []
        handler = logging.Handler()
        handler.emit = records.append
        adapters.logger.addHandler(handler)
        try:
            skipped = run_node(inv, setup, lat, renoise=1, average="reference", regularize=True)[0]["samples"]
        finally:
            adapters.logger.removeHandler(handler)
        assert any("noise_regularization skipped" in r.getMessage() for r in records)
        assert torch.equal(skipped, run_node(inv, setup, lat, renoise=1, average="reference")[0]["samples"])
        return
    model, counts = with_counter(setup.model)
    reg = run_node(inv, setup, lat, renoise=1, average="reference", regularize=True, model=model)[0]["samples"]
    assert counts["cond"] == 4 * 2 + 1  # 4 steps x (1 + renoise); one early step (target below DDPM t=250)
    plain = run_node(inv, setup, lat, renoise=1, average="reference")[0]["samples"]
    assert torch.isfinite(reg).all() and not torch.allclose(reg, plain, atol=1e-4)
    again = run_node(inv, setup, lat, renoise=1, average="reference", regularize=True)[0]["samples"]
    assert torch.equal(reg, again), "seeded: the same result every run"


def test_eps_latent_with_add_noise_disabled_starts_at_the_state(sd15, inv):
    """On eps models the inverted LATENT itself, with DisableNoise, starts where the NOISE output does."""
    from comfy_extras import nodes_custom_sampler as ncs
    lat = content(sd15)
    inverted, _, sigmas, noise = run_node(inv, sd15, lat, steps=4)
    via_noise = sample_back(inv, sd15, noise, sigmas, lat)
    via_latent = sample_back(inv, sd15, ncs.Noise_EmptyNoise(), sigmas, inverted["samples"])
    assert torch.allclose(via_noise, via_latent, atol=1e-4 * float(via_noise.abs().max()))


def test_errors(sd15, inv):
    with pytest.raises(ValueError, match="negative"):  # the Python API refuses; the node warns (defaults test)
        inv.invert_latent(sd15.model, sd15.positive, None, {"samples": content(sd15)}, sigmas_for(sd15, 2),
                          inv.DEFAULTS.replace(cfg=2.0), progress=False)
    with torch.inference_mode(), pytest.raises(ValueError, match="sigmas"):
        inv.InvertNode.execute(model=sd15.model, positive=sd15.positive, latent={"samples": content(sd15)},
                               sigmas=torch.tensor([1.0, 1.0, 0.0]), cfg=1.0, renoise_steps=0,
                               renoise_average="last", noise_regularization=False)
    assert inv.InvertNode.validate_inputs(cfg=1.5, renoise_steps=1, renoise_average="reference") is True
    assert "average" in inv.InvertNode.validate_inputs(cfg=1.5, renoise_steps=1, renoise_average="x")
    noise = run_node(inv, sd15, content(sd15))[3]
    with pytest.raises(ValueError, match="size"):
        noise.generate_noise({"samples": torch.zeros(1, 4, 16, 16)})


def test_interrupt_stops_the_inversion(sd15, inv):
    import comfy.model_management as mm
    mm.interrupt_current_processing(True)
    try:
        with pytest.raises(mm.InterruptProcessingException):
            run_node(inv, sd15, content(sd15))
    finally:
        mm.interrupt_current_processing(False)


# ------------------------------------------------------------------------------------------------
# Input declarations (issue 13), defaults (issue 18), broken inputs and fresh runs (issue 17)
# ------------------------------------------------------------------------------------------------
class captured_warnings:
    """The pack logger's records inside the block (the pack logger may not propagate to pytest's caplog)."""

    def __enter__(self):
        self.adapters = host.pack_module("nodes.adapters")
        self.records = []
        self.handler = logging.Handler(logging.WARNING)
        self.handler.emit = self.records.append
        self.adapters.logger.addHandler(self.handler)
        return self

    def __exit__(self, *exc):
        self.adapters.logger.removeHandler(self.handler)

    def text(self) -> str:
        return "\n".join(r.getMessage() for r in self.records)


def bad_values(w):
    """Values each declared widget must refuse, from its declaration."""
    if w.kind in ("int", "float"):
        if w.min is not None:
            yield w.min - 1
        if w.max is not None:
            yield w.max + 1
        yield "seven"
        if w.kind == "float":
            yield math.nan
        else:
            yield 1.5
    elif w.kind == "combo":
        yield "no such option"
    elif w.kind == "bool":
        yield "yes"


def check_declared_validation(node_class, display_name):
    """Generated from the node's declaration: every widget linked (None) passes, so does every default; each bad
    value of each widget is refused naming the node and that input (linked ones stay None)."""
    spec = node_class.INPUTS
    names = [w.name for w in spec.widgets]
    assert names, "no widget declared"
    assert node_class.validate_inputs(**{n: None for n in names}) is True
    assert node_class.validate_inputs(**{w.name: spec.default(w) for w in spec.widgets}) is True
    for w in spec.widgets:
        assert node_class.validate_inputs(**{n: (None if n == w.name else spec.default(spec.widget(n)))
                                             for n in names}) is True, f"{w.name} linked"
        for bad in bad_values(w):
            message = node_class.validate_inputs(**{w.name: bad})
            assert isinstance(message, str) and f"'{w.name}'" in message and display_name in message, \
                (w.name, bad, message)
    schema_ids = [i.id for i in node_class.define_schema().inputs]
    assert schema_ids == [i.name for i in spec.items]


def test_declared_inputs_validate_and_linked_inputs_pass(comfy_root, inv):
    """Linked cfg / renoise_steps (None at validation) used to crash validation; now they pass."""
    check_declared_validation(inv.InvertNode, "Inversion")
    check_declared_validation(inv.InversionSamplerNode, "Inversion Sampler")
    assert inv.InvertNode.validate_inputs(cfg=None, renoise_steps=None, renoise_average="reference",
                                          noise_regularization=None) is True
    assert inv.InversionSamplerNode.validate_inputs(renoise_steps=None) is True


def test_linked_values_are_checked_when_the_node_executes(sd15, inv):
    inputs = host.pack_module("nodes.inputs")
    with pytest.raises(inputs.InputError, match="'cfg'"):
        run_node(inv, sd15, content(sd15), cfg=500.0, negative=sd15.negative)
    with pytest.raises(inputs.InputError, match="'renoise_steps'"):
        inv.InversionSamplerNode.execute(renoise_steps=-1)
    with pytest.raises(inputs.InputError, match="'renoise_average'"):
        inv.InversionSamplerNode.execute(renoise_average="median")


def test_defaults_are_the_official_stylessp_inversion(comfy_root, inv):
    stylessp = host.pack_module("kernels.stylessp")
    d = inv.NODE_DEFAULTS
    assert d == stylessp.StyleSSPParams().inversion
    assert (d.cfg, d.renoise_steps, d.average, d.noise_regularization) == (1.5, 1, "reference", True)
    assert (d.lambda_kl, d.lambda_ac, d.regularization_steps, d.ac_rolls) == (0.065, 20.0, 4, 5)
    for node in (inv.InvertNode, inv.InversionSamplerNode):
        widgets = {i.id: i for i in node.define_schema().inputs}
        assert widgets["renoise_steps"].default == 1 and widgets["renoise_average"].default == "reference"
        assert widgets["noise_regularization"].default is True
    assert {i.id: i for i in inv.InvertNode.define_schema().inputs}["cfg"].default == 1.5
    # the Python API keeps plain DDIM inversion (TALE inverts with it)
    assert inv.DEFAULTS == host.pack_module("kernels.inversion").InversionParams()


def test_every_input_at_its_default_runs(setup, inv):
    """Smallest graphs: Inversion fed by model, prompt, latent and a scheduler's sigmas (no negative: cfg 1.5 is
    not used, with a warning; the flow models skip the regulariser, with a warning); the Inversion Sampler with
    its defaults in SamplerCustomAdvanced with a BasicGuider and DisableNoise. Both give the same latent."""
    import comfy.samplers
    from comfy_extras import nodes_custom_sampler as ncs
    lat = content(setup)
    sigmas = sigmas_for(setup, 3)
    adapters = host.pack_module("nodes.adapters")
    for key in ("inversion.cfg_without_negative.Inversion", "inversion.flow_regularizer.Inversion"):
        adapters._warned.discard(key)  # each is said once per node (process); the first run here says it
    with captured_warnings() as log, torch.inference_mode():
        inverted, trajectory, back, noise = inv.InvertNode.execute(model=setup.model, positive=setup.positive,
                                                                   latent={"samples": lat}, sigmas=sigmas).args
    assert log.text().count("no negative conditioning is connected") == 1
    assert log.text().count("noise_regularization skipped") == (setup.family in ("sd3", "flux"))
    # the next run at the defaults: the same latent, and no warning again
    with captured_warnings() as log, torch.inference_mode():
        again = inv.InvertNode.execute(model=setup.model, positive=setup.positive, latent={"samples": lat},
                                       sigmas=sigmas).args[0]["samples"]
    assert log.text() == "" and torch.equal(again, inverted["samples"])
    x = inverted["samples"]
    assert x.shape == lat.shape and torch.isfinite(x).all()
    explicit = run_node(inv, setup, lat, steps=3, cfg=1.0, renoise=1, average="reference",
                        regularize=setup.family not in ("sd3", "flux"))[0]["samples"]
    assert torch.equal(x, explicit)
    sampler = inv.InversionSamplerNode.execute().args[0]
    assert sampler.params == inv.NODE_DEFAULTS
    guider = comfy.samplers.CFGGuider(setup.model)
    guider.inner_set_conds({"positive": setup.positive})
    guider.set_cfg(1.0)
    with torch.inference_mode():
        out = ncs.SamplerCustomAdvanced().sample(ncs.Noise_EmptyNoise(), guider, sampler, sigmas,
                                                 {"samples": lat})[0]["samples"]
    assert torch.allclose(out, x, rtol=1e-5, atol=1e-5 * float(x.abs().max()))


def test_defaults_with_the_negative_guide_away_from_it(sd15, inv):
    model, counts = with_counter(sd15.model)
    lat = content(sd15)
    with captured_warnings() as log, torch.inference_mode():
        guided = inv.InvertNode.execute(model=model, positive=sd15.positive, latent={"samples": lat},
                                        sigmas=sigmas_for(sd15, 3), negative=sd15.negative).args[0]["samples"]
    assert "negative" not in log.text()
    assert counts["uncond"] > 0 and counts["uncond"] == counts["cond"]
    plain = run_node(inv, sd15, lat, steps=3, renoise=1, average="reference", regularize=True)[0]["samples"]
    assert not torch.allclose(guided, plain, atol=1e-4)


def _poisoned(value):
    x = value.clone()
    x.view(-1)[3] = float("nan")
    return x


def test_non_finite_inputs_are_refused_naming_the_input(sd15, inv):
    inputs = host.pack_module("nodes.inputs")
    lat = content(sd15)
    sigmas = sigmas_for(sd15, 3)
    bad_cond = [[_poisoned(sd15.positive[0][0]), dict(sd15.positive[0][1])]]
    base = dict(model=sd15.model, positive=sd15.positive, latent={"samples": lat}, sigmas=sigmas,
                negative=sd15.negative)
    model, counts = with_counter(sd15.model)
    for name, value in (("latent", {"samples": _poisoned(lat)}), ("positive", bad_cond), ("negative", bad_cond),
                        ("sigmas", torch.cat([sigmas[:1] * math.inf, sigmas[1:]]))):
        with pytest.raises(inputs.InputError, match=f"'{name}' holds NaN"), torch.inference_mode():
            inv.InvertNode.execute(**dict(base, model=model, **{name: value}))
    assert counts["calls"] == 0, "refused before any model pass"
    # the SAMPLER checks the latent SamplerCustomAdvanced gives it, once, before its loop
    import comfy.samplers
    from comfy_extras import nodes_custom_sampler as ncs
    guider = comfy.samplers.CFGGuider(model)
    guider.inner_set_conds({"positive": sd15.positive})
    sampler = inv.InversionSamplerNode.execute().args[0]
    with pytest.raises(ValueError, match="Inversion Sampler.*NaN"), torch.inference_mode():
        ncs.SamplerCustomAdvanced().sample(ncs.Noise_EmptyNoise(), guider, sampler, sigmas,
                                           {"samples": _poisoned(lat)})
    assert counts["calls"] == 0


def test_mismatched_shapes_are_named(sd15, inv):
    with pytest.raises(ValueError, match="16 channels.*uses 4"):
        run_node(inv, sd15, torch.randn(1, 16, 8, 8))
    noise = run_node(inv, sd15, content(sd15, batch=2))[3]
    for shape in ((1, 4, 8, 8), (2, 4, 16, 16)):   # another batch, another size
        with pytest.raises(ValueError, match="inverted state is"):
            noise.generate_noise({"samples": torch.zeros(shape)})


def _interrupting(model, after: int):
    """A clone that presses Cancel during its `after`-th model pass (the next step's check raises)."""
    import comfy.model_management as mm
    import comfy.patcher_extension
    calls = [0]

    def apply_model(executor, *args, **kwargs):
        calls[0] += 1
        if calls[0] == after:
            mm.interrupt_current_processing(True)
        return executor(*args, **kwargs)

    m = model.clone()
    m.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, "test.interrupt", apply_model)
    return m


def test_after_an_error_or_interrupt_the_next_run_equals_a_fresh_one(sd15, inv):
    """Defaults (ReNoise, seeded regulariser) through the node, and one SAMPLER object reused across runs as
    ComfyUI's cache reuses it: a refused input, then an interrupt mid-run, then the same run again."""
    import comfy.model_management as mm
    import comfy.samplers
    from comfy_extras import nodes_custom_sampler as ncs
    lat = content(sd15)
    sigmas = sigmas_for(sd15, 3)
    args = dict(positive=sd15.positive, latent={"samples": lat}, sigmas=sigmas, negative=sd15.negative)

    def node_run(model, **changes):
        with torch.inference_mode():
            return inv.InvertNode.execute(model=model, **dict(args, **changes)).args[0]["samples"]

    sampler = inv.InversionSamplerNode.execute().args[0]

    def sampler_run(model, latent=lat):
        guider = comfy.samplers.CFGGuider(model)
        guider.set_conds(sd15.positive, sd15.negative)
        guider.set_cfg(1.5)
        with torch.inference_mode():
            return ncs.SamplerCustomAdvanced().sample(ncs.Noise_EmptyNoise(), guider, sampler, sigmas,
                                                      {"samples": latent})[0]["samples"].clone()

    fresh_node, fresh_sampler = node_run(sd15.model), sampler_run(sd15.model)
    first_result = sampler.last_result
    with pytest.raises(ValueError):
        node_run(sd15.model, latent={"samples": _poisoned(lat)})
    with pytest.raises(ValueError):
        sampler_run(sd15.model, _poisoned(lat))
    assert sampler.last_result is None, "a failed run leaves no stale result"
    try:
        with pytest.raises(mm.InterruptProcessingException):
            node_run(_interrupting(sd15.model, 4))
        mm.interrupt_current_processing(False)
        with pytest.raises(mm.InterruptProcessingException):
            sampler_run(_interrupting(sd15.model, 4))
    finally:
        mm.interrupt_current_processing(False)
    assert sampler.last_result is None
    assert torch.equal(node_run(sd15.model), fresh_node)
    assert torch.equal(sampler_run(sd15.model), fresh_sampler)
    assert sampler.last_result is not first_result and torch.equal(sampler.last_result.latent,
                                                                   first_result.latent)


def test_tiny_images_invert_at_the_defaults(sd15, inv):
    """A latent under the regulariser's 4x4 patch (an image under 32 px) inverts at the defaults: the patch-KL term
    is 0 there (documented in kernels.inversion.patch_kl), the rest runs as usual."""
    for size in (1, 3):
        lat = torch.randn(1, 4, size, size, generator=torch.Generator().manual_seed(size))
        with torch.inference_mode():
            out = inv.InvertNode.execute(model=sd15.model, positive=sd15.positive, latent={"samples": lat},
                                         sigmas=sigmas_for(sd15, 2), negative=sd15.negative).args[0]["samples"]
        assert out.shape == lat.shape and torch.isfinite(out).all()
