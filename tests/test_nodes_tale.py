"""TALE composition node, in-process on the real ComfyUI with the tiny random-weight models.

Behaviour: with tau = 0 and no energy the node is exactly "paste the inverted object at T', then sample" with
ComfyUI's own sampler (bit for bit); no composite is denoised before T'; the background outside the object is
the background's latent on every normalisation step; the energy decreases over the inner gradient steps (latent
energy and CLIP energy with a tiny CLIP vision model) with finite gradients; the style term's gradient is kept
or, as in the released code, detached; no weights modified and no gradient state leaked by a gradient run;
placement at borders of non-square images; loud errors.

Cost: the tiny SD1.5 UNet has full-width (320-channel) blocks, and each gradient pass copies its weights and runs a
backward pass, so runs are shared where one run can answer several questions and gradient runs are kept short."""
from __future__ import annotations

import pytest
import torch

import host

STEPS, T_PRIME = 4, 1
SMALL = dict(steps=STEPS, t_prime=T_PRIME, tau=2, inner_steps=2, cfg=4.0)


@pytest.fixture(scope="module")
def tn(comfy_root):
    return host.pack_module("nodes.tale")


@pytest.fixture(scope="module")
def K(comfy_root):
    return host.pack_module("kernels.tale")


@pytest.fixture(scope="module")
def sd(comfy_root, tmp_path_factory):
    """Tiny SD1.5 with its VAE and an empty negative prompt."""
    import comfy.sd
    import nodes
    import tiny_models
    path = tiny_models.write_tiny_sd15_checkpoint(tmp_path_factory.mktemp("tale") / "tiny_sd15.safetensors")
    model, clip, vae = comfy.sd.load_checkpoint_guess_config(str(path), output_vae=True, output_clip=True)[:3]
    with torch.inference_mode():
        positive = nodes.CLIPTextEncode().encode(clip, "an oil painting of a sheep, Van Gogh style")[0]
        negative = nodes.CLIPTextEncode().encode(clip, "")[0]
    return model, vae, positive, negative


def _images(bg_hw=(48, 80), fg_hw=(40, 32), seed=0):
    g = torch.Generator().manual_seed(seed)
    bg = torch.rand(1, *bg_hw, 3, generator=g)
    fg = torch.rand(1, *fg_hw, 3, generator=g)
    mask = torch.zeros(1, *fg_hw)
    mask[:, 4:36, 6:28] = 1.0
    return bg, fg, mask


def _run(tn, K, sd, trace=True, images=None, **changes):
    model, vae, positive, negative = sd
    values = dict(SMALL, energy="none")
    place = {k: changes.pop(k) for k in ("placement", "placement_mask", "box_x", "box_y", "box_scale",
                                         "clip_vision", "energy_text") if k in changes}
    place.setdefault("box_scale", 0.75)
    values.update(changes)
    bg, fg, mask = images or _images()
    with torch.inference_mode():
        return tn.run_tale(model, vae, positive, negative, bg, fg, mask, K.TALEParams(**values), trace=trace, **place)


# ------------------------------------------------------------------------------------------------
class _PasteThenSample:
    """The explicit construction: paste the inverted foreground into the inverted background at T' with
    torch.where, then ComfyUI's own k-diffusion sampler over the rest of the schedule."""

    def __init__(self, bg_t, fg_t, mask, t_prime, function):
        self.bg_t, self.fg_t, self.mask, self.t_prime, self.function = bg_t, fg_t, mask, t_prime, function

    def sample(self, model_wrap, sigmas, extra_args, callback, noise, latent_image=None, denoise_mask=None,
               disable_pbar=False):
        import comfy.samplers
        m = self.mask[None, None].expand_as(self.bg_t).to(noise.device)
        x = torch.where(m, self.fg_t.to(noise.device), self.bg_t.to(noise.device))
        model_k = comfy.samplers.KSamplerX0Inpaint(model_wrap, sigmas)
        return self.function(model_k, x, sigmas[self.t_prime:], extra_args={**extra_args, "denoise_mask": None},
                             disable=True)


@pytest.mark.parametrize("solver", ["dpmpp_2m", "euler"])
def test_tau_zero_without_energy_is_paste_at_t_prime_then_sampling_bit_for_bit(tn, K, sd, solver):
    import comfy.k_diffusion.sampling as kds
    import comfy.samplers
    latent, _, _, report = _run(tn, K, sd, tau=0, solver=solver, t_prime=2)
    model, _, positive, negative = sd
    bg_t, fg_t = report.background[2], report.foreground[2]
    place_mask = _placement_mask(tn, sd)
    function = kds.sample_dpmpp_2m if solver == "dpmpp_2m" else kds.sample_euler
    guider = comfy.samplers.CFGGuider(model)
    guider.set_conds(positive, negative)
    guider.set_cfg(SMALL["cfg"])
    sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "normal", STEPS).float()
    zeros = torch.zeros_like(bg_t)
    with torch.inference_mode():
        expected = guider.sample(zeros, zeros, _PasteThenSample(bg_t, fg_t, place_mask, 2, function), sigmas,
                                 disable_pbar=True, seed=0)
    assert torch.equal(latent["samples"], expected.cpu())
    # no wasted denoising before T': the composite gets exactly one CFG pass per step from T' on
    assert report.passes["cfg"] == STEPS - 2 and report.passes["grad"] == 0
    if solver == "dpmpp_2m":
        # the pasted latents are the inversion of the VAE-encoded images up to T' (the shared inversion, run
        # here on its own: DDIM inversion with the negative prompt at cfg 1)
        inversion = host.pack_module("nodes.inversion")
        bg, fg, mask = _images()
        place = tn.make_placement(bg, fg, mask, "box", None, 0.5, 0.5, 0.75, 8)
        _, vae, _, _ = sd
        with torch.inference_mode():
            pair = torch.cat([vae.encode(place.background), vae.encode(place.canvas)])
            inv = inversion.invert_latent(model, negative, None, {"samples": pair}, sigmas[2:], progress=False)
        top = inv.result.trajectory[-1]
        torch.testing.assert_close(bg_t.cpu(), top[:1].cpu(), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(fg_t.cpu(), top[1:].cpu(), rtol=1e-5, atol=1e-5)


def _placement_mask(tn, sd):
    bg, fg, mask = _images()
    place = tn.make_placement(bg, fg, mask, "box", None, 0.5, 0.5, 0.75, 8)
    return place.latent_mask


@pytest.fixture(scope="module")
def base_run(tn, K, sd):
    """No energy, T' = 1, tau = 2 (steps 2 and 3 normalised), history reset, inverted trajectories; traced."""
    return _run(tn, K, sd, energy="none")


def test_background_outside_the_object_is_the_background_on_every_normalisation_step(tn, K, sd, base_run):
    latent, _, _, report = base_run
    m = _placement_mask(tn, sd)
    assert sorted(report.composites) == [2, 3] and report.passes["grad"] == 0
    # the inversion's states at T'..T'+tau: distinct noise levels, finite
    assert set(report.background) == {1, 2, 3} and not torch.equal(report.background[1], report.background[2])
    assert all(torch.isfinite(t).all() for t in report.background.values())
    for i in (2, 3):
        assert torch.equal(report.composites[i][..., ~m], report.background[i][..., ~m]), i
        assert torch.equal(report.optimised[i], report.composites[i]), i
        # normalisation did change the object region
        assert not torch.equal(report.composites[i][..., m], report.background[i][..., m])
    assert torch.isfinite(latent["samples"]).all()


def test_latent_energy_at_a_corner_decreases_keeps_the_background_and_has_finite_gradients(tn, K, sd):
    # object 32x22 px at scale 0.75 -> 24x16 (h x w); centre (36, 72) puts it flush with the bottom-right corner of
    # the 48x80 background
    model = sd[0]
    unet = model.model.diffusion_model
    watched = {k: v.clone() for k, v in list(unet.state_dict().items())[::40]}
    wrappers_before = dict(model.weight_wrapper_patches)
    latent, _, mask, report = _run(tn, K, sd, energy="latent", latent_weight=0.001, t_prime=2, tau=1,
                                   inner_steps=3, box_x=72 / 80, box_y=36 / 48)
    assert bool(mask[0, -1, -1] >= 0.5) and bool(mask[0, 23, :].max() < 0.5)
    m = tn.make_placement(*_images(), "box", None, 72 / 80, 36 / 48, 0.75, 8).latent_mask
    assert bool(m[-1, -1]) and int(m.sum()) == 6
    assert report.passes["grad"] == 3 and sorted(report.energies) == [3]
    energies = report.energies[3]
    assert len(energies) == 3 and all(torch.isfinite(torch.tensor(energies)))
    assert all(b < a for a, b in zip(energies, energies[1:])), energies
    for stage in (report.composites[3], report.optimised[3]):
        assert torch.equal(stage[..., ~m], report.background[3][..., ~m])
    assert not torch.equal(report.composites[3][..., m], report.optimised[3][..., m])
    assert torch.isfinite(latent["samples"]).all()
    # the gradient run leaves no trace: weights, parameter grads, the caller's patcher, autograd mode
    state = unet.state_dict()
    assert all(torch.equal(state[k], v) for k, v in watched.items())
    assert all(p.grad is None for p in unet.parameters())
    assert model.weight_wrapper_patches == wrappers_before
    assert torch.is_grad_enabled() and not torch.is_inference_mode_enabled()


@pytest.fixture(scope="module")
def tiny_clip_vision(comfy_root):
    from testing_pack import tale_testing
    return tale_testing.tiny_clip_vision("sd15")


@pytest.fixture(scope="module")
def tiny_clip_vision_xl(comfy_root):
    from testing_pack import tale_testing
    return tale_testing.tiny_clip_vision("sdxl")


def test_clip_energy_decreases_and_the_style_gradient_is_kept_or_detached(tn, K, sd, tiny_clip_vision):
    common = dict(energy="clip", text_weight=0.0, style_weight=0.002, t_prime=2, tau=1, clip_vision=tiny_clip_vision)
    _, _, _, kept = _run(tn, K, sd, style_gradient="kept", inner_steps=2, **common)
    energies = kept.energies[3]
    assert all(b < a for a, b in zip(energies, energies[1:])), energies
    assert not torch.equal(kept.composites[3], kept.optimised[3])
    # the released code's bug: the style term is detached, so with text_weight 0 nothing moves
    _, _, _, detached = _run(tn, K, sd, style_gradient="detached", inner_steps=1, **common)
    assert torch.equal(detached.composites[3], detached.optimised[3])
    assert detached.energies[3][0] == pytest.approx(energies[0])


def test_clip_energy_text_term_with_a_projected_text_embedding(tn, K, sd, tiny_clip_vision_xl, tmp_path_factory):
    """SD1.5 model, text target from another (projected, CLIP-G sized) text encoder via energy_text, with the
    matching CLIP vision model: the text term is a cosine distance and decreases over the inner steps."""
    from sampling_helpers import get_setup
    xl = get_setup("sdxl", tmp_path_factory)
    latent, _, _, report = _run(tn, K, sd, energy="clip", text_weight=1.0, style_weight=0.0, inner_steps=2,
                                t_prime=2, tau=1, clip_vision=tiny_clip_vision_xl, energy_text=xl.positive)
    texts = [t for t, _ in report.terms[3]]
    assert all(0.0 <= t <= 2.0 for t in texts) and texts[1] < texts[0], texts
    assert torch.isfinite(latent["samples"]).all()


def test_sd15_prompt_is_not_a_clip_text_target(tn, K, sd, tiny_clip_vision):
    """ComfyUI's SD1.x pooled output is the unprojected CLIP-L output: as a text target it is refused, with the
    fixes named, before any model pass (with text_weight 0, the style term only, no text target is needed: see
    the kept/detached test, which runs on the SD1.5 prompt)."""
    with pytest.raises(ValueError, match=r"\[model family: SD1\.x\].*unprojected CLIP-L.*energy_text"):
        _run(tn, K, sd, energy="clip", clip_vision=tiny_clip_vision)


def test_history_reblend_and_replay_trajectories(tn, K, sd, base_run):
    base, _, _, r0 = base_run
    reblend, _, _, r1 = _run(tn, K, sd, trace=False, history="reblend")
    assert r1.passes["cfg"] == r0.passes["cfg"] + 2 and not torch.equal(base["samples"], reblend["samples"])
    stale, _, _, r3 = _run(tn, K, sd, trace=False, history="reference")
    # the released code's history: a composite denoised from step 0 to T' (1 CFG pass), inversion to step 0
    assert r3.passes["cfg"] == r0.passes["cfg"] + 1 and r3.passes["inversion"] == 2 * STEPS
    assert not torch.equal(stale["samples"], base["samples"])
    replay, _, _, r2 = _run(tn, K, sd, trace=False, trajectories="replay")
    # replay inverts to the first step (4 steps x 2 images) and denoises both again up to T'+tau (3 x 2)
    assert r2.passes["inversion"] == 2 * STEPS + 3 * 2 and r0.passes["inversion"] == 2 * (STEPS - 1)
    assert torch.isfinite(replay["samples"]).all() and not torch.equal(replay["samples"], base["samples"])


# ------------------------------------------------------------------------------------------------ placement
def test_placement_with_a_mask_flush_with_the_bottom_right_of_a_non_square_background(tn):
    bg, fg, mask = _images(bg_hw=(40, 72), fg_hw=(40, 32))
    pm = torch.zeros(1, 40, 72)
    pm[:, 24:40, 56:72] = 1.0
    place = tn.make_placement(bg, fg, mask, "mask", pm, 0.5, 0.5, 1.0, 8)
    # object 32x22 (h x w) fitted into 16x16, aspect kept: 16 x 11, centred in the box
    assert (place.box.height, place.box.width) == (16, 11)
    assert place.box.bottom == 40 and place.box.top == 24
    assert place.latent_mask.shape == (5, 9) and bool(place.latent_mask[4].any())
    assert torch.equal(place.preview()[0][place.pixel_mask < 0.5], bg[0][place.pixel_mask < 0.5])


def test_placement_box_at_the_right_border_and_cropping_to_multiples_of_eight(tn):
    bg, fg, mask = _images(bg_hw=(45, 70), fg_hw=(40, 32))
    # object 32x22 at scale 0.5 -> 16x11, centred so that it ends exactly at the right border (columns 59..69)
    place = tn.make_placement(bg, fg, mask, "box", None, (70 - 5.5) / 70, 0.5, 0.5, 8)
    assert place.background.shape[1:3] == (40, 64)      # cropped like VAE Encode: row offset 2, column offset 3
    assert torch.equal(place.background, bg[:, 2:42, 3:67])
    # in cropped coordinates the object spans columns 56..66; VAE Encode's crop keeps 56..63
    assert (place.box.left, place.box.right) == (56, 64)
    assert place.latent_mask.shape == (5, 8) and bool(place.latent_mask[:, 7].any())
    assert not bool(place.latent_mask[:, :7].any())


@pytest.mark.parametrize("case, match", [
    ("empty_object", "object_mask is empty"),
    ("object_mask_size", "object_mask is 20x20 but the foreground image is 32x40"),
    ("no_placement_mask", "no placement_mask is connected"),
    ("empty_placement", "placement_mask is empty"),
    ("placement_mask_size", "placement_mask is 40x40 but the background is 80x48"),
    ("outside", "beyond the right border"),
    ("too_large", "larger than the background"),
    ("too_small", "latent pixel"),
])
def test_placement_errors_are_clear(tn, case, match):
    bg, fg, mask = _images()
    args = dict(placement="box", placement_mask=None, box_x=0.5, box_y=0.5, box_scale=0.75)
    if case == "empty_object":
        mask = torch.zeros_like(mask)
    elif case == "object_mask_size":
        mask = torch.ones(1, 20, 20)
    elif case == "no_placement_mask":
        args["placement"] = "mask"
    elif case == "empty_placement":
        args.update(placement="mask", placement_mask=torch.zeros(1, 48, 80))
    elif case == "placement_mask_size":
        args.update(placement="mask", placement_mask=torch.ones(1, 40, 40))
    elif case == "outside":
        args.update(box_x=1.0)
    elif case == "too_large":
        args.update(box_scale=2.0)
    elif case == "too_small":
        args.update(box_scale=0.05)
    with pytest.raises(ValueError, match=match) as info:
        tn.make_placement(bg, fg, mask, factor=8, **args)
    assert "TFG TALE Composite" in str(info.value) and "Fix:" in str(info.value)


# ------------------------------------------------------------------------------------------------ node
def test_validate_inputs(tn):
    ok = dict(steps=20, t_prime_percent=0.6, tau_percent=0.25, cfg=10.0, inner_steps=3, text_weight=15.0,
              style_weight=0.15, latent_weight=0.02, adain_max=0.5, box_x=0.5, box_y=0.5, box_scale=1.0)
    assert tn.TALEComposite.validate_inputs(**ok) is True
    for changes, word in ((dict(t_prime_percent=1.0), "t_prime"), (dict(tau_percent=0.4), "t_prime + tau"),
                          (dict(steps=3), "at 3 steps"),
                          (dict(box_scale=0.0), "'box_scale'"), (dict(adain_max=2.0), "'adain_max'"),
                          # ComfyUI skips its own min/max checks for inputs validate_inputs names
                          (dict(cfg=-1.0), "'cfg' must be at least 0"), (dict(steps=500), "'steps' must be at most"),
                          (dict(inner_steps=-2), "inner_steps"), (dict(text_weight=float("nan")), "text_weight"),
                          (dict(steps=None, cfg=-1.0), "cfg"), (dict(energy="clip_l"), "'energy' unknown choice"),
                          (dict(placement="corner"), "'placement' unknown choice"),
                          (dict(scheduler="nope"), "'scheduler' unknown choice"), (dict(steps=2.5), "whole number")):
        result = tn.TALEComposite.validate_inputs(**{**ok, **changes})
        assert isinstance(result, str) and word in result and "TALE Composite" in result, (changes, result)
    # linked inputs arrive as None (unknown before the run): not an error, and what is known is still checked
    assert tn.TALEComposite.validate_inputs(**{k: None for k in ok}) is True
    assert tn.TALEComposite.validate_inputs(**{**ok, "steps": None, "tau_percent": 0.9}) is True


def test_declaration_covers_every_input_with_limits(tn):
    """One declaration per input, in the shipped order; every number has min and max, every choice its options,
    every widget a meaning and a default read from the Params object."""
    import json
    from pathlib import Path
    spec = tn.TALEComposite.INPUTS
    names = [i.name for i in spec.items]
    golden = json.loads((Path(__file__).parent / "golden" / "node_schema.json").read_text())["TFG_TALEComposite"]
    assert names[:len(golden)] == golden
    for w in spec.widgets:
        assert w.meaning and spec.default(w) is not None, w.name
        if w.kind in ("int", "float"):
            assert w.min is not None and w.max is not None and w.problem(spec.default(w)) is None, w.name
        if w.kind == "combo":
            assert spec.default(w) in w.option_list(), w.name
    # the node's defaults are the kernel's (fractions give the reference's T' and tau)
    defaults = {w.name: spec.default(w) for w in spec.widgets}
    params = tn.params_of(spec.params(defaults), defaults["t_prime_percent"], defaults["tau_percent"])
    assert params == tn.DEFAULTS


def test_energy_errors_before_the_run(tn, K, sd):
    with pytest.raises(ValueError, match="no clip_vision model is connected"):
        _run(tn, K, sd, energy="clip")
    # a ControlNet in the conditioning cannot take part in the gradient passes: a clear error, not an autograd one
    model, vae, positive, negative = sd
    controlled = [[c[0], {**c[1], "control": object()}] for c in positive]
    with pytest.raises(ValueError, match=r"ControlNet.*Fix: use energy none"):
        _run(tn, K, (model, vae, controlled, negative), energy="latent")


def _values(sd, **changes):
    model, vae, positive, negative = sd
    bg, fg, mask = _images()
    values = dict(model=model, positive=positive, negative=negative, vae=vae, background=bg, foreground=fg,
                  object_mask=mask, placement="box", box_x=0.5, box_y=0.5, box_scale=0.75, steps=STEPS,
                  t_prime_percent=0.25, tau_percent=0.25, cfg=4.0, solver="dpmpp_2m", scheduler="normal",
                  energy="none", text_weight=15.0, style_weight=0.15, latent_weight=0.02, inner_steps=3,
                  adain_max=0.5, style_gradient="kept", history="reset", trajectories="inverted")
    values.update(changes)
    return values


def _execute(tn, values):
    with torch.inference_mode():
        return tn.TALEComposite.execute(**values).args


def test_execute_outputs_interrupts_and_the_next_run_is_a_fresh_run(tn, K, sd, monkeypatch):
    import comfy.model_management
    values = _values(sd)
    out = _execute(tn, values)
    assert out[0]["samples"].shape == (1, 4, 6, 10) and out[1].shape == (1, 48, 80, 3) and out[2].shape == (1, 48, 80)
    comfy.model_management.interrupt_current_processing(True)
    try:
        with pytest.raises(comfy.model_management.InterruptProcessingException):
            _execute(tn, values)
    finally:
        comfy.model_management.interrupt_current_processing(False)
    # an interrupt in the middle of the composition (after 4 progress steps), then the same prompt again
    real = comfy.model_management.throw_exception_if_processing_interrupted
    calls = {"n": 0}

    def interrupt_later():
        calls["n"] += 1
        if calls["n"] == 5:
            raise comfy.model_management.InterruptProcessingException()
        return real()

    monkeypatch.setattr(comfy.model_management, "throw_exception_if_processing_interrupted", interrupt_later)
    with pytest.raises(comfy.model_management.InterruptProcessingException):
        _execute(tn, values)
    monkeypatch.undo()
    again = _execute(tn, values)
    assert torch.equal(again[0]["samples"], out[0]["samples"]) and torch.equal(again[1], out[1])


def test_linked_values_are_checked_when_the_node_executes(tn, sd):
    """Linked widgets pass validation (None) and their values are checked at execute, with the same messages."""
    for changes, word in ((dict(steps=500), "'steps' must be at most 200"), (dict(energy="clip_l"), "'energy'"),
                          (dict(t_prime_percent=0.9, tau_percent=0.5), "t_prime + tau")):
        with pytest.raises(ValueError, match="TFG TALE Composite") as info:
            _execute(tn, _values(sd, **changes))
        assert word in str(info.value), (changes, str(info.value))


@pytest.mark.parametrize("name", ["background", "foreground", "object_mask", "placement_mask", "positive",
                                  "negative", "energy_text"])
def test_non_finite_inputs_are_refused_naming_the_input(tn, sd, name):
    values = _values(sd)
    if name in ("positive", "negative", "energy_text"):
        source = values["positive" if name == "energy_text" else name]
        bad = [[c[0].clone(), dict(c[1])] for c in source]
        bad[0][0][0, 0, 0] = float("nan")
    else:
        if name == "placement_mask":
            values["placement"] = "mask"
            base = torch.ones(1, 48, 80)
        else:
            base = values[name]
        bad = base.clone()
        bad.view(-1)[3] = float("inf")
    values[name] = bad
    with pytest.raises(ValueError, match=rf"TFG TALE Composite.*'{name}' holds NaN or infinite values"):
        _execute(tn, values)


# ------------------------------------------------------------------------------------------------ shapes
def test_a_mask_of_the_same_aspect_at_another_resolution_is_resized_like_comfyui_masks(tn):
    import torch.nn.functional as F
    bg, fg, mask = _images()                                   # foreground 40x32 (h x w), object rows 4..35
    half = F.interpolate(mask[:, None], size=(20, 16), mode="bilinear")[:, 0]
    resized = tn.make_placement(bg, fg, half, "box", None, 0.5, 0.5, 0.75, 8)
    # the same as resizing it first the way ComfyUI's ImageCompositeMasked / VAEEncodeForInpaint do
    comfy_way = F.interpolate(half.reshape(-1, 1, 20, 16), size=(40, 32), mode="bilinear")[:, 0]
    expected = tn.make_placement(bg, fg, comfy_way, "box", None, 0.5, 0.5, 0.75, 8)
    assert torch.equal(resized.latent_mask, expected.latent_mask) and resized.box == expected.box
    full_res = tn.make_placement(bg, fg, mask, "box", None, 0.5, 0.5, 0.75, 8)
    assert abs(resized.box.height - full_res.box.height) <= 1 and abs(resized.box.width - full_res.box.width) <= 1
    # a placement mask at twice the background's resolution: the same box as the mask at its size
    pm = torch.zeros(1, 48, 80)
    pm[:, 8:40, 16:64] = 1.0
    big = F.interpolate(pm[:, None], size=(96, 160), mode="nearest")[:, 0]
    a = tn.make_placement(bg, fg, mask, "mask", pm, 0.5, 0.5, 1.0, 8)
    b = tn.make_placement(bg, fg, mask, "mask", big, 0.5, 0.5, 1.0, 8)
    assert a.box == b.box and torch.equal(a.latent_mask, b.latent_mask)


def test_full_masks_are_the_whole_image(tn, K, sd):
    bg, fg, _ = _images()
    full = torch.ones(1, *fg.shape[1:3])
    place = tn.make_placement(bg, fg, full, "mask", torch.ones(1, 48, 80), 0.5, 0.5, 1.0, 8)
    # the whole 40x32 foreground fitted into the whole 48x80 background: 48 x 38, centred
    assert (place.box.height, place.box.width, place.box.top) == (48, 38, 0)
    latent, _, _, report = _run(tn, K, sd, trace=False, images=(bg, fg, full), placement="mask",
                                placement_mask=torch.ones(1, 48, 80))
    assert torch.isfinite(latent["samples"]).all() and report.passes["cfg"] == STEPS - T_PRIME


@pytest.mark.parametrize("case, match", [
    ("background_batch", r"background is a batch of 2 images.*ImageFromBatch"),
    ("foreground_batch", r"foreground is a batch of 2 images"),
    ("mask_batch", r"object_mask is a batch of 2 masks"),
    ("placement_batch", r"placement_mask is a batch of 2 masks"),
    ("tiny_background", r"background is 8x8 px.*Fix: upscale the background"),
    ("tiny_foreground", r"covers 1 latent pixel.*make the object larger"),
])
def test_batches_and_tiny_images_are_clear_errors(tn, case, match):
    bg, fg, mask = _images()
    args = dict(placement="box", placement_mask=None, box_x=0.5, box_y=0.5, box_scale=0.75)
    if case == "background_batch":
        bg = bg.repeat(2, 1, 1, 1)
    elif case == "foreground_batch":
        fg = fg.repeat(2, 1, 1, 1)
    elif case == "mask_batch":
        mask = mask.repeat(2, 1, 1)
    elif case == "placement_batch":
        args.update(placement="mask", placement_mask=torch.ones(2, 48, 80))
    elif case == "tiny_background":
        bg = bg[:, :8, :8]
    elif case == "tiny_foreground":
        fg, mask = fg[:, :4, :4], torch.ones(1, 4, 4)
        args["box_scale"] = 1.0
    with pytest.raises(ValueError, match=match) as info:
        tn.make_placement(bg, fg, mask, factor=8, **args)
    assert "TFG TALE Composite" in str(info.value) and "Fix:" in str(info.value)


# ------------------------------------------------------------------------------------------------ memory
@pytest.fixture(scope="module")
def te(comfy_root):
    return host.pack_module("nodes.tale_energy")


def test_a_gradient_run_larger_than_the_free_memory_is_refused_before_it_starts(tn, K, sd, te, monkeypatch,
                                                                                base_run):
    import comfy.model_management
    model, vae = sd[0], sd[1]
    params = K.TALEParams(**dict(SMALL, energy="latent"))
    small = te.gradient_memory(model, vae, None, params, (6, 10))
    assert small.total > 0 and te.gradient_memory(model, vae, None, params, (12, 20)).total > small.total
    free = {"bytes": 2 * 1024 ** 2}
    monkeypatch.setattr(comfy.model_management, "get_free_memory", lambda dev=None, torch_free_too=False: (
        (free["bytes"], free["bytes"]) if torch_free_too else free["bytes"]))
    monkeypatch.setattr(te, "loaded_model_bytes", lambda device: 0)
    encodes = {"n": 0}
    real_encode = vae.encode
    monkeypatch.setattr(vae, "encode", lambda *a, **k: (encodes.__setitem__("n", encodes["n"] + 1), real_encode(
        *a, **k))[1])
    with pytest.raises(ValueError, match=r"energy=latent .* needs about [0-9.]+ GiB .*UNet activations.* but 0\.00 "
                                         r"GiB is free.*Fix: use energy none") as info:
        _run(tn, K, sd, energy="latent", latent_weight=0.001, inner_steps=1)
    assert "TFG TALE Composite [model family: SD1.x]" in str(info.value) and encodes["n"] == 0
    # no gradients: plain sampling's memory, which ComfyUI manages (here with attention sliced for the small
    # free memory); not refused
    latent, _, _, _ = _run(tn, K, sd, trace=False, energy="none")
    assert torch.isfinite(latent["samples"]).all()
    monkeypatch.undo()
    # after the refusal, the same run as a fresh one
    latent, _, _, _ = _run(tn, K, sd, trace=False, energy="none")
    assert torch.equal(latent["samples"], base_run[0]["samples"])
    # what ComfyUI holds in loaded models counts as available (it unloads them for the run), less ComfyUI's
    # inference reserve: with 2 MiB free, a gradient run fits exactly when held >= estimate + reserve - free.
    # Only the check sees 2 MiB free: with that little the host's attention would chunk in place (no autograd),
    # and ComfyUI frees the held models' memory before the run anyway.
    def little_free(dev=None, torch_free_too=False):
        return (free["bytes"], free["bytes"]) if torch_free_too else free["bytes"]

    real_check, estimates = tn.check_memory, []

    def check_with_little_free(*args):
        with monkeypatch.context() as m:
            m.setattr(comfy.model_management, "get_free_memory", little_free)
            estimates.append(real_check(*args))
        return estimates[-1]

    family = host.pack_module("nodes.adapters").detect_family(model)
    shape = (6, 10)  # the latent of _images()
    fits = (te.gradient_memory(model, vae, None, params, shape).total - free["bytes"]
            + int(comfy.model_management.minimum_inference_memory()))
    monkeypatch.setattr(te, "loaded_model_bytes", lambda device: fits - 1)
    with pytest.raises(ValueError, match="ComfyUI reserves"):
        check_with_little_free(model, vae, None, params, shape, family)
    monkeypatch.setattr(te, "loaded_model_bytes", lambda device: fits)
    assert check_with_little_free(model, vae, None, params, shape, family) is not None
    monkeypatch.setattr(tn, "check_memory", check_with_little_free)
    estimates.clear()
    latent, _, _, report = _run(tn, K, sd, energy="latent", latent_weight=0.001, t_prime=2, tau=1, inner_steps=1)
    assert len(estimates) == 1 and estimates[0] is not None
    assert report.passes["grad"] > 0 and torch.isfinite(latent["samples"]).all()
    monkeypatch.undo()


def _meta_module(numel: int, dtype: torch.dtype) -> torch.nn.Module:
    """A module holding `numel` parameters of `dtype` on the meta device (sizes only, no memory)."""
    module = torch.nn.Module()
    module.weight = torch.nn.Parameter(torch.empty(numel, dtype=dtype, device="meta"), requires_grad=False)
    return module


class _StubSDXL:
    """What gradient_memory reads of an SDXL ModelPatcher: 2.567B fp16 parameters, SDXL's memory_usage_factor,
    SDXL's latent format."""

    def __init__(self):
        import comfy.latent_formats
        import comfy.supported_models
        self.model = type("BaseModel", (), dict(manual_cast_dtype=None, get_dtype=lambda self: torch.float16,
                                                memory_usage_factor=comfy.supported_models.SDXL.memory_usage_factor))()
        self.latent_format = comfy.latent_formats.SDXL()

    def model_size(self) -> int:
        return 2_567_000_000 * 2

    def get_model_object(self, name):
        assert name == "latent_format"
        return self.latent_format


class _StubSDVAE:
    """The full-size SD/SDXL KL VAE (83.65M parameters, bf16) with ComfyUI's decode estimate for it on NVIDIA
    (comfy/sd.py: 2178 x h x w x 64 x dtype size x VAE_KL_MEM_RATIO, 1.0 off AMD)."""
    vae_dtype = torch.bfloat16

    def __init__(self):
        self.first_stage_model = _meta_module(83_653_863, self.vae_dtype)

    def memory_used_decode(self, shape, dtype):
        import comfy.model_management
        return 2178 * shape[2] * shape[3] * 64 * comfy.model_management.dtype_size(dtype)


class _StubViTL:
    """CLIP ViT-L/14 vision at 224 px (303.97M parameters, fp16): 24 layers, width 1024, patch 14."""
    image_size = 224

    def __init__(self):
        from types import SimpleNamespace
        net = _meta_module(303_966_208, torch.float16)
        net.vision_model = SimpleNamespace(
            embeddings=SimpleNamespace(patch_embedding=SimpleNamespace(kernel_size=(14, 14), out_channels=1024)),
            encoder=SimpleNamespace(layers=[None] * 24))
        self.model = net


@pytest.mark.parametrize("energy, measured_gib", [("latent", 22.3), ("clip", 37.8)])
def test_the_estimate_covers_the_measured_sdxl_peaks(te, K, energy, measured_gib):
    """Calibration against the peaks measured on an H200 (docs/tale.md, Cost: SDXL fp16, full-size SD VAE, ViT-L
    CLIP vision, 1024², cfg 10): the estimate for that run is at least the measured peak."""
    params = K.TALEParams(cfg=10.0, energy=energy)
    estimate = te.gradient_memory(_StubSDXL(), _StubSDVAE(), _StubViTL(), params, (128, 128))
    assert estimate.total >= measured_gib * te.GIB, estimate.text()
    # and not grossly above it (a 20% bound: a safety margin, not a second model of the run)
    assert estimate.total <= 1.2 * measured_gib * te.GIB, estimate.text()


def test_the_estimate_covers_what_autograd_keeps_in_a_gradient_pass(tn, K, sd, te, monkeypatch):
    """The tensors saved for backward in one gradient pass (weight copies + activations), measured with autograd's
    saved-tensor hooks on the tiny SD1.5, stay under the estimate's copies + activations."""
    L = host.pack_module("kernels.tale_loop")
    real = L.optimise_step
    peak = {"bytes": 0}

    def measured(*args, **kwargs):
        storages = {}

        def pack(t):
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = real(*args, **kwargs)
        peak["bytes"] = max(peak["bytes"], sum(storages.values()))
        return out

    monkeypatch.setattr(L, "optimise_step", measured)
    _run(tn, K, sd, trace=False, energy="latent", latent_weight=0.001, t_prime=2, tau=1, inner_steps=1)
    params = K.TALEParams(**dict(SMALL, energy="latent"))
    estimate = te.gradient_memory(sd[0], sd[1], None, params, (6, 10)).parts
    kept = estimate["UNet weight copies for backward"] + estimate["UNet activations"]
    assert 0 < peak["bytes"] <= kept, (peak["bytes"], estimate)


# ------------------------------------------------------------------------------------------------ defaults
def _default_values(tn, model, vae, positive, negative):
    spec = tn.TALEComposite.INPUTS
    bg, fg, mask = _images()
    values = {w.name: spec.default(w) for w in spec.widgets}
    values.update(model=model, vae=vae, positive=positive, negative=negative, background=bg, foreground=fg,
                  object_mask=mask)
    return values


def test_every_input_at_its_default_runs_on_sd15(tn, sd):
    """The smallest graph: model, prompts, VAE, two images and a mask; every widget at its default (energy none:
    the default that needs no optional input)."""
    values = _default_values(tn, *sd)
    assert values["energy"] == "none" and tn.TALEComposite.validate_inputs(
        **{w.name: values[w.name] for w in tn.TALEComposite.INPUTS.widgets}) is True
    latent, preview, mask = _execute(tn, values)
    assert latent["samples"].shape == (1, 4, 6, 10) and torch.isfinite(latent["samples"]).all()
    assert preview.shape == (1, 48, 80, 3) and mask.shape == (1, 48, 80)


def test_every_input_at_its_default_runs_on_sdxl(tn, comfy_root, tmp_path_factory):
    from sampling_helpers import get_setup
    import tiny_models
    s = get_setup("sdxl", tmp_path_factory)
    latent, _, _ = _execute(tn, _default_values(tn, s.model, tiny_models.build_tiny_vae("sdxl"), s.positive,
                                                s.negative))
    assert latent["samples"].shape == (1, 4, 6, 10) and torch.isfinite(latent["samples"]).all()


def test_sdxl_runs_and_flow_models_are_refused(tn, K, comfy_root, tmp_path_factory, tiny_clip_vision):
    from sampling_helpers import get_setup
    import tiny_models
    s = get_setup("sdxl", tmp_path_factory)
    vae = tiny_models.build_tiny_vae("sdxl")
    bg, fg, mask = _images()
    with torch.inference_mode():
        latent, _, _, report = tn.run_tale(s.model, vae, s.positive, s.negative, bg, fg, mask,
                                           K.TALEParams(**dict(SMALL, energy="latent", latent_weight=0.001,
                                                                   tau=1, inner_steps=1)),
                                           box_scale=0.75)
    assert latent["samples"].shape == (1, 4, 6, 10) and report.passes["grad"] == 1
    # SDXL's pooled text embedding (1280) is not in a 768-projection CLIP vision model's space: a clear error
    with pytest.raises(ValueError, match=r"\[model family: SDXL\].*different sizes.*energy_text"), \
            torch.inference_mode():
        tn.run_tale(s.model, vae, s.positive, s.negative, bg, fg, mask, K.TALEParams(**dict(SMALL, energy="clip")),
                    box_scale=0.75, clip_vision=tiny_clip_vision)
    flux = get_setup("flux", tmp_path_factory)
    with pytest.raises(ValueError, match=r"\[model family: Flux\].*not supported"), torch.inference_mode():
        tn.run_tale(flux.model, tiny_models.build_tiny_vae("flux"), flux.positive, flux.negative, bg, fg, mask,
                    K.TALEParams(**SMALL), box_scale=0.75)


def test_gradient_passes_run_on_sub_quadratic_attention(tn, K, sd, monkeypatch):
    """ComfyUI's sub-quadratic attention (CPUs, low-memory setups) exponentiates in place, which autograd refuses
    once keys are chunked; the gradient passes go to PyTorch attention instead, the other passes stay on it."""
    import comfy.ldm.modules.attention as attention
    chunked_attention = attention.efficient_dot_product_attention
    calls = {"sub_quad": 0}

    def chunked(*args, **kwargs):  # chunk the tiny model's 60 keys as a 1024² image's would be
        calls["sub_quad"] += 1
        return chunked_attention(*args, **dict(kwargs, kv_chunk_size=16))

    monkeypatch.setattr(attention, "efficient_dot_product_attention", chunked)
    monkeypatch.setattr(attention, "optimized_attention", attention.attention_sub_quad)
    monkeypatch.setattr(attention, "optimized_attention_masked", attention.attention_sub_quad)
    latent, _, _, report = _run(tn, K, sd, energy="latent", latent_weight=0.001, t_prime=2, tau=1, inner_steps=1)
    assert torch.isfinite(latent["samples"]).all() and report.passes["grad"] == 1
    assert calls["sub_quad"] > 0  # the passes without gradients kept the host's attention


def test_the_attention_override_chains_to_the_previous_one(tn, comfy_root):
    import comfy.ldm.modules.attention as attention
    te = host.pack_module("nodes.tale_energy")
    seen = []

    def previous(func, *args, **kwargs):
        seen.append(func)
        return func(*args, **kwargs)

    override = te.differentiable_attention(previous)
    q = torch.randn(1, 4, 8)
    plain = override(attention.attention_basic, q, q, q, 1)
    assert seen == [attention.attention_basic]
    tracked = q.clone().requires_grad_(True)
    out = override(attention.attention_basic, tracked, tracked, tracked, 1)
    out.sum().backward()
    assert seen == [attention.attention_basic] and tracked.grad is not None  # the gradient call bypassed it
    torch.testing.assert_close(out.detach(), plain, atol=1e-5, rtol=1e-5)
