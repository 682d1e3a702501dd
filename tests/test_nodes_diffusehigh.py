"""DiffuseHigh nodes, in-process on the real ComfyUI with tiny random-weight models of each family.

Behaviour: with guidance off a stage is ComfyUI's KSamplerAdvanced img2img bit for bit; the stage starts at the
official noise level (t = 281) with the official step count; during guided steps the low wavelet band of the
predicted x0 is the reference's (latent mode: the latent x0; image mode: the image handed to the VAE), and not
after; the MODEL-patch node in a KSampler graph equals the stage node; shapes for non-square targets; IMAGE and
LATENT sources; progress over all stages; interrupts; tiled VAE and the peak memory at 4x the base area; loud
errors."""
from __future__ import annotations

import logging
import threading
import time

import pytest
import torch

import host
import tiny_models
from sampling_helpers import Setup

LOG = logging.getLogger("tfg.tests.diffusehigh")

SCHEDULE, STEPS, GUIDED = 10, 4, 2   # a short stage: the last 4 of 10 ddim_uniform steps, 2 guided
BORDER = 3                           # db4: coefficients this close to the border are redundant (kernel tests)


@pytest.fixture(scope="module")
def nd(comfy_root):
    return host.pack_module("nodes.diffusehigh")


@pytest.fixture(scope="module")
def K(comfy_root):
    return host.pack_module("kernels.diffusehigh")


_vaes: dict = {}


def vae_of(s: Setup):
    if s.family not in _vaes:
        _vaes[s.family] = tiny_models.build_tiny_vae(s.family)
    return _vaes[s.family]


def image(h=48, w=64, batch=1, seed=0):
    return torch.rand(batch, h, w, 3, generator=torch.Generator().manual_seed(seed))


def params(nd, **overrides):
    values = dict(cfg=5.0, schedule_steps=SCHEDULE, steps=STEPS, guidance_steps=GUIDED, guidance_mode="latent",
                  vae_tile_size=0)
    values.update(overrides)
    return nd.DEFAULTS.replace(**values)


class Recorder:
    """Stands in for the node's progress object: records the sampler callback's x0 (= the post-CFG denoised)."""

    def __init__(self):
        self.x0 = []

    def callback(self, offset):
        def cb(step, x0, x, total_steps):
            self.x0.append(x0.detach().float().cpu().clone())
        return cb


def stage(nd, s: Setup, p, img=None, size=(128, 96), seed=3, progress=None, model=None):
    family = nd.check_run(s.model, p, nd.NODE)
    with torch.inference_mode():
        return nd.run_stage(model or s.model, s.positive, s.negative, vae_of(s), image() if img is None else img,
                            size, p, seed, 0, family, nd.NODE, progress)


def node_kwargs(nd, **overrides):
    d = nd.DEFAULTS
    values = dict(seed=3, cfg=5.0, sampler_name=d.sampler_name, scheduler=d.scheduler, schedule_steps=SCHEDULE,
                  steps=STEPS, guidance_steps=GUIDED, guidance_mode="latent", guidance_factor=1.0, fadeout=0.0,
                  wavelet="db4", dwt_levels=1, sharpen_alpha=1.0, sharpen_sigma=0.0, vae_tile_size=0,
                  size_conditioning="official")
    values.update(overrides)
    return values


def inner(t: torch.Tensor) -> torch.Tensor:
    return t[..., BORDER:t.shape[-2] - BORDER, BORDER:t.shape[-1] - BORDER]


# ------------------------------------------------------------------------------------------------
# Exactness against ComfyUI's own img2img
# ------------------------------------------------------------------------------------------------
def test_guidance_off_is_plain_img2img_bit_for_bit(setup, nd):
    """guidance_steps 0: the stage equals KSamplerAdvanced (add noise, same seed, start_at_step =
    schedule_steps - steps) on the stage's encoded image, latent and decoded image alike."""
    import nodes
    p = params(nd, guidance_steps=0)
    small = image(24, 32)   # no DWT here: the smallest stage (the VAE at full resolution dominates the cost)
    out_image, out_latent = stage(nd, setup, p, img=small, size=(64, 48), seed=11)
    family = nd.check_run(setup.model, p, nd.NODE)
    with torch.inference_mode():
        _, latent, _ = nd.prepare_stage(vae_of(setup), small, (64, 48), p, 11, 0)
        ref = nodes.KSamplerAdvanced().sample(
            setup.model, "enable", 11, SCHEDULE, p.cfg, p.sampler_name, p.scheduler,
            nd.size_conditioned(setup.positive, family, p), nd.size_conditioned(setup.negative, family, p),
            {"samples": latent}, SCHEDULE - STEPS, SCHEDULE, "disable")[0]["samples"]
        ref_image = vae_of(setup).decode(ref)
    assert torch.equal(out_latent, ref)
    assert torch.equal(out_image, ref_image[..., :3])


def test_guidance_changes_the_result(sd15, nd):
    """Image mode (official) against the same stage with guidance off. Latent mode's effect is proven step by
    step by the low-band tests below (the guided x0 is the reference's band, the sampler's x0)."""
    off, _ = stage(nd, sd15, params(nd, guidance_steps=0), img=image(24, 32), size=(64, 48))
    on, _ = stage(nd, sd15, params(nd, guidance_mode="image"), img=image(24, 32), size=(64, 48))
    assert on.shape == off.shape and torch.isfinite(on).all()
    assert not torch.equal(on, off)


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_official_noise_level_and_step_count(family, nd, K, comfy_root, tmp_path_factory):
    """Defaults: the first high-resolution step is at t = 281 (sigma(281) of the scaled-linear schedule), and
    the stage runs 15 steps (cond + uncond rows each). Only the schedule matters here, so the network itself is
    skipped (the wrapper returns zeros) to keep the 15 steps cheap."""
    import comfy.patcher_extension
    from sampling_helpers import get_setup
    s = get_setup(family, tmp_path_factory)
    sigmas, rows = [], []

    def apply_model(executor, x, t, *args, **kwargs):
        sigmas.append(float(t.flatten()[0]))
        rows.append(x.shape[0])
        return torch.zeros_like(x)

    m = s.model.clone()
    m.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, "test.dh.sigmas", apply_model)
    p = nd.DEFAULTS.replace(guidance_steps=0, vae_tile_size=0)
    stage(nd, s, p, img=image(16, 16), size=(32, 32), model=m)
    assert len(sigmas) == 15 and set(rows) == {2}
    assert sigmas[0] == pytest.approx(K.sd_scaled_linear_sigma(K.OFFICIAL_TIMESTEP), rel=1e-4)
    ms = s.model.get_model_object("model_sampling")
    assert [round(float(ms.timestep(torch.tensor(x)))) for x in sigmas] == K.leading_timesteps(50, 15)


def test_sdxl_official_size_conditioning(nd, comfy_root, tmp_path_factory):
    from sampling_helpers import get_setup
    s = get_setup("sdxl", tmp_path_factory)
    family = nd.check_run(s.model, nd.DEFAULTS, nd.NODE)
    cond = nd.size_conditioned(s.positive, family, nd.DEFAULTS)
    d = cond[0][1]
    assert (d["width"], d["height"], d["target_width"], d["target_height"]) == (1024, 1024, 1024, 1024)
    assert "width" not in s.positive[0][1], "the input conditioning must not be modified"
    assert nd.size_conditioned(s.positive, family, nd.DEFAULTS.replace(size_conditioning="conditioning")) \
        is s.positive


# ------------------------------------------------------------------------------------------------
# The guidance
# ------------------------------------------------------------------------------------------------
def test_latent_guidance_sets_the_low_band_on_guided_steps(setup, nd):
    """Latent mode: on each guided step the low band of the denoised prediction (ComfyUI's x0 for every model
    type, flow models included) is the reference latent's; after them it is not."""
    vae = vae_of(setup)
    # Flux-dev is run at cfg 1 (no uncond pass): the post-CFG hook still sees the denoised prediction
    p = params(nd, guidance_mode="latent", cfg=1.0 if setup.family == "flux" else 5.0)
    rec = Recorder()
    stage(nd, setup, p, progress=rec)
    assert len(rec.x0) == STEPS
    with torch.inference_mode():
        _, latent, _ = nd.prepare_stage(vae, image(), (128, 96), p, 3, 0)
    lf = setup.model.get_model_object("latent_format")
    ref_low = nd.K.reference_low_band(lf.process_in(latent.float()))
    for i, x0 in enumerate(rec.x0):
        low = nd.K.wavelets.low_band(x0)
        err = float((inner(low) - inner(ref_low)).abs().max())
        if i < GUIDED:
            assert err < 1e-4 * max(1.0, float(ref_low.abs().max())), (i, err)
        else:
            assert err > 1e-3, (i, err)


@pytest.mark.parametrize("family", ["sd15", "flux"])
def test_image_guidance_sets_the_low_band_in_pixel_space(family, nd, monkeypatch, comfy_root, tmp_path_factory):
    """Image mode: per guided step one decode of x0 and one encode of iDWT(LL*, HF(x0)); the encoded image's low
    band is the sharpened upsampled reference's, and that encoding is the step's x0."""
    from sampling_helpers import get_setup
    s = get_setup(family, tmp_path_factory)
    vae = vae_of(s)
    encoded, decoded = [], []
    real_encode, real_decode = vae.encode, vae.decode

    def encode(pixels):
        out = real_encode(pixels)
        encoded.append((pixels.detach().float().cpu().clone(), out.detach().float().cpu().clone()))
        return out

    def decode(latent, *a, **k):
        decoded.append(latent.shape)
        return real_decode(latent, *a, **k)

    monkeypatch.setattr(vae, "encode", encode)
    monkeypatch.setattr(vae, "decode", decode)
    rec = Recorder()
    stage(nd, s, params(nd, guidance_mode="image"), progress=rec)
    assert len(encoded) == 1 + GUIDED and len(decoded) == GUIDED + 1
    reference = encoded[0][0].movedim(-1, 1)
    ref_low = nd.K.reference_low_band(reference)
    lf = s.model.get_model_object("latent_format")
    for i in range(GUIDED):
        pixels, latent = encoded[1 + i]
        low = nd.K.wavelets.low_band(pixels.movedim(-1, 1))
        assert float((inner(low) - inner(ref_low)).abs().max()) < 1e-4
        torch.testing.assert_close(rec.x0[i], lf.process_in(latent), atol=1e-5, rtol=1e-5)


def test_chained_blend_and_fadeout_on_guided_steps(sd15, nd):
    """The guide is appended to the post-CFG list: a function installed before it still runs on every step and
    sees the unguided prediction D. With guidance_factor 0.5 and fadeout 1 the low band of the step's x0 is
    lerp(LL(D), LL*, 0.5 * (1 - i / K)) on guided step i (0.5, 0.25), and x0 is D itself after them."""
    seen = []

    def before(args):
        seen.append(args["denoised"].detach().float().cpu().clone())
        return args["denoised"]

    m = sd15.model.clone()
    m.set_model_sampler_post_cfg_function(before)
    p = params(nd, guidance_factor=0.5, fadeout=1.0)
    weights = [p.guidance_weight(i) for i in range(STEPS)]
    assert weights == [0.5, 0.25] + [0.0] * (STEPS - GUIDED)
    rec = Recorder()
    stage(nd, sd15, p, model=m, progress=rec)
    assert len(seen) == len(rec.x0) == STEPS
    with torch.inference_mode():
        _, latent, _ = nd.prepare_stage(vae_of(sd15), image(), (128, 96), p, 3, 0)
    ref_low = nd.K.reference_low_band(sd15.model.get_model_object("latent_format").process_in(latent.float()))
    for i, (d, x0) in enumerate(zip(seen, rec.x0)):
        if weights[i] == 0.0:
            assert torch.equal(x0, d), i
            continue
        expected = torch.lerp(nd.K.wavelets.low_band(d), ref_low, weights[i])
        got = nd.K.wavelets.low_band(x0)
        assert inner(got).numel() > 0
        assert float((inner(got) - inner(expected)).abs().max()) < 1e-4 * max(1.0, float(ref_low.abs().max())), i
        assert float((inner(got) - inner(ref_low)).abs().max()) > 1e-3, "a blend, not a replacement"


def test_guidance_patch_node_in_a_ksampler_graph_equals_the_stage(sd15, nd, K):
    """TFG_DiffuseHighGuidance + KSamplerAdvanced on the upscaled, encoded image = the stage node (no
    sharpening, so the reference is the plain upscale)."""
    import nodes
    vae = vae_of(sd15)
    p = params(nd, sharpen_alpha=0.0, guidance_mode="latent")
    _, out_latent = stage(nd, sd15, p, seed=5, img=image(24, 32), size=(64, 48))
    family = nd.check_run(sd15.model, p, nd.NODE)
    with torch.inference_mode():
        up = K.upsample(image(24, 32).movedim(-1, 1), (48, 64)).movedim(1, -1)
        patched = nd.DiffuseHighGuidance.execute(model=sd15.model, vae=vae, reference=up, guidance_steps=GUIDED,
                                                 guidance_mode="latent", guidance_factor=1.0, fadeout=0.0,
                                                 wavelet="db4", dwt_levels=1, vae_tile_size=0).args[0]
        latent = vae.encode(up)
        ref = nodes.KSamplerAdvanced().sample(
            patched, "enable", 5, SCHEDULE, p.cfg, p.sampler_name, p.scheduler,
            nd.size_conditioned(sd15.positive, family, p), nd.size_conditioned(sd15.negative, family, p),
            {"samples": latent}, SCHEDULE - STEPS, SCHEDULE, "disable")[0]["samples"]
    assert torch.equal(out_latent, ref)


# ------------------------------------------------------------------------------------------------
# Nodes: sources, shapes, stages, progress, interrupts, memory
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["sd15", "sd3"])
def test_one_stage_node_non_square_from_image_and_latent(family, nd, comfy_root, tmp_path_factory):
    from sampling_helpers import get_setup
    s = get_setup(family, tmp_path_factory)
    vae = vae_of(s)
    kw = node_kwargs(nd)
    with torch.inference_mode():
        out = nd.DiffuseHigh.execute(model=s.model, positive=s.positive, negative=s.negative, vae=vae, width=0,
                                     height=0, scale_by=2.0, image=image(24, 40), **kw).args
        assert out[0].shape == (1, 48, 80, 3) and out[1]["samples"].shape == (1, s.latent_channels, 6, 10)
        low = vae.encode(image(24, 40))
        out2 = nd.DiffuseHigh.execute(model=s.model, positive=s.positive, negative=s.negative, vae=vae, width=64,
                                      height=0, scale_by=2.0, latent={"samples": low}, **kw).args
    assert out2[0].shape == (1, 40, 64, 3) and torch.isfinite(out2[0]).all()


def test_progressive_stages_one_progress_bar(sd15, nd):
    import comfy.utils
    updates = []
    previous = comfy.utils.PROGRESS_BAR_HOOK
    comfy.utils.set_progress_bar_global_hook(lambda value, total, preview, node_id=None: updates.append((value, total)))
    try:
        with torch.inference_mode():
            out = nd.DiffuseHighProgressive.execute(model=sd15.model, positive=sd15.positive,
                                                    negative=sd15.negative, vae=vae_of(sd15), stages="x1.5, 96x128",
                                                    image=image(32, 48), **node_kwargs(nd)).args
    finally:
        comfy.utils.set_progress_bar_global_hook(previous)
    assert out[0].shape == (1, 128, 96, 3)
    totals = {t for _, t in updates}
    assert 2 * STEPS in totals
    assert (2 * STEPS, 2 * STEPS) in updates
    ours = [v for v, t in updates if t == 2 * STEPS]
    assert ours == sorted(ours) and ours[-1] == 2 * STEPS


def test_interrupt_stops_the_stages(sd15, nd):
    import comfy.model_management
    import comfy.utils
    previous = comfy.utils.PROGRESS_BAR_HOOK
    calls = []

    def hook(value, total, preview, node_id=None):
        calls.append(value)
        if len(calls) == 2:
            comfy.model_management.interrupt_current_processing(True)

    comfy.utils.set_progress_bar_global_hook(hook)
    try:
        with pytest.raises(comfy.model_management.InterruptProcessingException):
            with torch.inference_mode():
                nd.DiffuseHighProgressive.execute(model=sd15.model, positive=sd15.positive, negative=sd15.negative,
                                                  vae=vae_of(sd15), stages="x2, x2", image=image(32, 32),
                                                  **node_kwargs(nd))
    finally:
        comfy.utils.set_progress_bar_global_hook(previous)
        comfy.model_management.interrupt_current_processing(False)
    assert len(calls) < 2 * STEPS


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def test_memory_bounded_at_4x_area_with_tiled_vae(sd15, nd, monkeypatch):
    """One image-mode stage at 4x the base area (48x48 -> 96x96) with VAE tiles of 64 px: every VAE call at the
    stage size (first encode, per guided step a decode and an encode, last decode) is tiled, and the process's
    peak resident memory during the stage stays small (reported in the log)."""
    mode = "image"
    vae = vae_of(sd15)
    tiled = {"encode": 0, "decode": 0}
    real_enc, real_dec = vae.encode_tiled, vae.decode_tiled

    def enc(*a, **k):
        tiled["encode"] += 1
        return real_enc(*a, **k)

    def dec(*a, **k):
        tiled["decode"] += 1
        return real_dec(*a, **k)

    monkeypatch.setattr(vae, "encode_tiled", enc)
    monkeypatch.setattr(vae, "decode_tiled", dec)
    base = _rss()
    peak = [base]
    done = threading.Event()

    def sample_rss():
        while not done.is_set():
            peak[0] = max(peak[0], _rss())
            time.sleep(0.005)

    t = threading.Thread(target=sample_rss, daemon=True)
    t.start()
    try:
        out, _ = stage(nd, sd15, params(nd, guidance_mode=mode, vae_tile_size=64), img=image(48, 48),
                       size=(96, 96))
    finally:
        done.set()
        t.join()
    assert tiled == {"encode": 1 + GUIDED, "decode": 1 + GUIDED}
    assert out.shape == (1, 96, 96, 3)
    grown = (peak[0] - base) / 2 ** 20
    LOG.warning("DiffuseHigh %s mode, 48x48 -> 96x96 (4x area), tiny SD1.5: peak RSS growth during the stage "
                "%.1f MiB", mode, grown)
    assert grown < 512


def test_validation_and_errors(sd15, nd):
    assert nd.DiffuseHigh.validate_inputs(cfg=10.0, schedule_steps=50, steps=15, guidance_steps=5,
                                          guidance_factor=1.0, fadeout=0.0, dwt_levels=1, sharpen_alpha=1.0,
                                          sharpen_sigma=0.0, vae_tile_size=1024, scale_by=2.0) is True
    bad = nd.DiffuseHigh.validate_inputs(cfg=10.0, schedule_steps=50, steps=15, guidance_steps=-1,
                                         guidance_factor=1.0, fadeout=0.0, dwt_levels=1, sharpen_alpha=1.0,
                                         sharpen_sigma=0.0, vae_tile_size=1024, scale_by=2.0)
    assert isinstance(bad, str) and "guidance_steps" in bad
    bad_stages = nd.DiffuseHighProgressive.validate_inputs(stages="big", cfg=10.0, schedule_steps=50, steps=15,
                                                           guidance_steps=5, guidance_factor=1.0, fadeout=0.0,
                                                           dwt_levels=1, sharpen_alpha=1.0, sharpen_sigma=0.0,
                                                           vae_tile_size=0)
    assert isinstance(bad_stages, str) and "stages" in bad_stages
    with pytest.raises(ValueError, match=r"TFG DiffuseHigh \[model family: SD1.x\].*neither an image"):
        with torch.inference_mode():
            nd.DiffuseHigh.execute(model=sd15.model, positive=sd15.positive, negative=sd15.negative,
                                   vae=vae_of(sd15), width=0, height=0, scale_by=2.0, **node_kwargs(nd))


def _nodes(nd):
    return [nd.DiffuseHigh, nd.DiffuseHighProgressive, nd.DiffuseHighGuidance]


def test_every_widget_is_declared_once_in_schema_order(nd):
    """The schema, validate_inputs' signature and the Params fields all come from one declaration per input."""
    import inspect
    for node in _nodes(nd):
        schema = [i.id for i in node.define_schema().inputs]
        assert schema == [i.name for i in node.INPUTS.items]
        widgets = [w.name for w in node.INPUTS.widgets]
        assert list(inspect.signature(node.validate_inputs).parameters) == widgets
        for w in node.INPUTS.widgets:
            assert w.meaning and (w.field is None or hasattr(nd.DEFAULTS, w.field)), (node, w.name)


def test_every_numeric_and_choice_input_is_checked_and_linked_inputs_pass(nd):
    """Generated from the declarations: each numeric input above max / below min / of the wrong type, each choice
    input with an unknown value is refused naming that input; every input linked (None) passes; the values the
    issue found accepted (cfg 151, schedule_steps 1001, guidance_steps 1001, sharpen_sigma 16, vae_tile_size
    8193) are refused."""
    for node in _nodes(nd):
        names = [w.name for w in node.INPUTS.widgets]
        assert node.validate_inputs(**{n: None for n in names}) is True, node
        assert node.validate_inputs() is True
        for w in node.INPUTS.widgets:
            bad_values = []
            if w.kind in ("int", "float"):
                if w.max is not None:
                    bad_values.append(w.max + (1 if w.kind == "int" else 0.5))
                if w.min is not None:
                    bad_values.append(w.min - 1)
                bad_values.append("ten")
                if w.kind == "int":
                    bad_values.append(1.5)
            elif w.kind == "combo":
                bad_values.append("no-such-option")
            for value in bad_values:
                result = node.validate_inputs(**{w.name: value})
                assert isinstance(result, str) and f"'{w.name}'" in result, (node, w.name, value, result)
                with pytest.raises(nd.inp.InputError, match=w.name):
                    node.INPUTS.checked({w.name: value})
    found = {("cfg", 151.0), ("schedule_steps", 1001), ("guidance_steps", 1001), ("sharpen_sigma", 16.0),
             ("vae_tile_size", 8193)}
    for name, value in found:
        assert isinstance(nd.DiffuseHigh.validate_inputs(**{name: value}), str), name
        assert isinstance(nd.DiffuseHighProgressive.validate_inputs(**{name: value}), str), name
    assert isinstance(nd.DiffuseHighGuidance.validate_inputs(vae_tile_size=8193), str)
    assert isinstance(nd.DiffuseHighGuidance.validate_inputs(guidance_steps=1001), str)


def test_rules_tile_size_steps_and_stages(nd):
    for node in (nd.DiffuseHigh, nd.DiffuseHighGuidance):
        assert "vae_tile_size" in node.validate_inputs(vae_tile_size=32)
        assert node.validate_inputs(vae_tile_size=0) is True and node.validate_inputs(vae_tile_size=64) is True
    assert "must not exceed schedule_steps" in nd.DiffuseHigh.validate_inputs(schedule_steps=10, steps=11)
    assert nd.DiffuseHigh.validate_inputs(schedule_steps=None, steps=11) is True, "a linked input skips the rule"
    with pytest.raises(nd.inp.InputError, match="must not exceed schedule_steps"):
        nd.DiffuseHigh.INPUTS.checked({"schedule_steps": 10, "steps": 11})
    for stages in ("auto", "2048, 3072, 4096", "x2", "96x128, x1.5"):
        assert nd.DiffuseHighProgressive.validate_inputs(stages=stages) is True, stages
    for stages in ("twice", "16", "x2, 99999"):
        assert "'stages'" in nd.DiffuseHighProgressive.validate_inputs(stages=stages), stages


# ------------------------------------------------------------------------------------------------
# Hostile and broken inputs: non-finite tensors, tiny sizes, batches, memory, state after failures
# ------------------------------------------------------------------------------------------------
def _counted(s: Setup):
    """A clone of the model counting network calls, and the family's VAE counting encodes/decodes."""
    import comfy.patcher_extension
    calls = {"model": 0, "vae": 0}

    def apply_model(executor, *args, **kwargs):
        calls["model"] += 1
        return executor(*args, **kwargs)

    m = s.model.clone()
    m.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, "test.dh.count", apply_model)
    vae = vae_of(s)

    class CountingVAE:
        def __getattr__(self, name):
            attr = getattr(vae, name)
            if name in ("encode", "decode", "encode_tiled", "decode_tiled"):
                def counted(*a, **k):
                    calls["vae"] += 1
                    return attr(*a, **k)
                return counted
            return attr
    return m, CountingVAE(), calls


def _run(nd, s, model, vae, node=None, **overrides):
    node = node or nd.DiffuseHigh
    kw = dict(model=model, positive=s.positive, negative=s.negative, vae=vae, **node_kwargs(nd))
    if node is nd.DiffuseHigh:
        kw.update(width=0, height=0, scale_by=2.0)
    kw.update(overrides)
    with torch.inference_mode():
        return node.execute(**kw).args


def test_non_finite_inputs_are_refused_naming_node_and_input(sd15, nd):
    """NaN/Inf in an image, latent, reference or conditioning: an error naming the node and the input, before any
    VAE or model call (checked once per run in execute; the sampler's steps are untouched)."""
    model, vae, calls = _counted(sd15)
    bad_image = image(16, 16)
    bad_image[0, 3, 4, 1] = float("nan")
    with pytest.raises(nd.inp.InputError, match=r"TFG DiffuseHigh: input 'image' holds NaN or infinite"):
        _run(nd, sd15, model, vae, image=bad_image)
    bad_latent = torch.zeros(1, 4, 2, 2)
    bad_latent[0, 1, 0, 0] = float("inf")
    with pytest.raises(nd.inp.InputError, match=r"DiffuseHigh Progressive: input 'latent' holds NaN"):
        _run(nd, sd15, model, vae, node=nd.DiffuseHighProgressive, stages="x2", latent={"samples": bad_latent})
    positive = [[sd15.positive[0][0] * float("nan"), sd15.positive[0][1]]]
    with pytest.raises(nd.inp.InputError, match=r"input 'positive' holds NaN"):
        _run(nd, sd15, model, vae, image=image(16, 16), positive=positive)
    with pytest.raises(nd.inp.InputError, match=r"DiffuseHigh Guidance: input 'reference' holds NaN"):
        with torch.inference_mode():
            nd.DiffuseHighGuidance.execute(model=model, vae=vae, reference=bad_image)
    assert calls == {"model": 0, "vae": 0}


def test_tiny_sizes_are_refused_naming_the_inputs_and_the_fix(sd15, nd):
    """A stage below 32 px per side (e.g. a 4x4 image at scale_by 2) or above 16384 is refused before any VAE or
    model call, naming the inputs that set it; a source of a few pixels is fine when the stage is large enough."""
    model, vae, calls = _counted(sd15)
    with pytest.raises(ValueError, match=r"TFG DiffuseHigh \[model family: SD1.x\]: a stage of 8x8 px is below the "
                                         r"32 px.*\(width 0, height 0, scale_by 2\).*Fix: set width/height"):
        _run(nd, sd15, model, vae, image=image(4, 4))
    with pytest.raises(ValueError, match=r"DiffuseHigh Progressive.*below the 32 px.*stages 'x2'"):
        _run(nd, sd15, model, vae, node=nd.DiffuseHighProgressive, stages="x2", image=image(8, 12))
    with pytest.raises(ValueError, match=r"DiffuseHigh Guidance.*below the 32 px.*reference"):
        with torch.inference_mode():
            nd.DiffuseHighGuidance.execute(model=model, vae=vae, reference=image(8, 40))
    assert calls == {"model": 0, "vae": 0}
    out, latent = _run(nd, sd15, model, vae, image=image(3, 5), width=41, height=33)
    assert out.shape == (1, 32, 40, 3), "a 3x5 source upsampled to 41x33, rounded to multiples of 8: 40x32"
    assert latent["samples"].shape == (1, 4, 4, 5) and torch.isfinite(out).all()


def test_image_wins_over_latent_and_batches_follow_the_image(sd15, nd, caplog):
    """Both connected (here with different batch sizes): the image is upscaled, the latent ignored with a warning,
    and the result equals the image-only run; a batch of 2 images gives 2 outputs."""
    model, vae, _ = _counted(sd15)
    imgs = torch.cat([image(24, 32, seed=1), image(24, 32, seed=2)])
    with caplog.at_level(logging.WARNING):
        both = _run(nd, sd15, model, vae, image=imgs, latent={"samples": torch.zeros(3, 4, 5, 5)})
    assert "the latent ignored" in caplog.text
    alone = _run(nd, sd15, model, vae, image=imgs)
    assert both[0].shape == (2, 48, 64, 3) and torch.equal(both[0], alone[0])


def test_memory_refused_before_any_model_call(sd15, nd, monkeypatch):
    """With little free memory every node refuses with the estimate and the free amount, before any VAE or model
    call (the estimate of Progressive is its largest stage's)."""
    import comfy.model_management
    model, vae, calls = _counted(sd15)
    monkeypatch.setattr(comfy.model_management, "get_free_memory", lambda *a, **k: 2 ** 20)
    with pytest.raises(ValueError, match=r"TFG DiffuseHigh \[model family: SD1.x\]: this run needs about .* on cpu "
                                         r"\(stage image 64x48 x1.*largest step: .*\), but only 1.0 MiB is free"):
        _run(nd, sd15, model, vae, image=image(24, 32))
    with pytest.raises(ValueError, match=r"DiffuseHigh Progressive.*stage image 128x96 x1.*only 1.0 MiB is free.*"
                                         r"Fix: use smaller stages"):
        _run(nd, sd15, model, vae, node=nd.DiffuseHighProgressive, stages="x2, x2", image=image(24, 32))
    with pytest.raises(ValueError, match=r"DiffuseHigh Guidance.*only 1.0 MiB is free"):
        with torch.inference_mode():
            nd.DiffuseHighGuidance.execute(model=model, vae=vae, reference=image(64, 64), guidance_mode="image")
    assert calls == {"model": 0, "vae": 0}
    est = nd.estimate_memory(sd15.model, vae_of(sd15), 1, [(2048, 2048)], params(nd, vae_tile_size=256))
    untiled = nd.estimate_memory(sd15.model, vae_of(sd15), 1, [(2048, 2048)], params(nd, vae_tile_size=0))
    labels = dict(est.phases["cpu"])
    assert labels["VAE decode (tiles of 256 px)"] < dict(untiled.phases["cpu"])["VAE decode (2048x2048)"], \
        "untiled: bounded by ComfyUI's own 512 px fallback tiles"
    assert labels["UNet at 2048x2048 x1"] == int(sd15.model.model.memory_required((1, 4, 256, 256)))


def test_next_run_after_an_error_or_an_interrupt_equals_a_fresh_run(sd15, nd, monkeypatch):
    import comfy.model_management
    import comfy.utils
    kw = dict(image=image(24, 32), stages="x2")
    fresh = _run(nd, sd15, sd15.model, vae_of(sd15), node=nd.DiffuseHighProgressive, **kw)
    with monkeypatch.context() as m:
        m.setattr(comfy.model_management, "get_free_memory", lambda *a, **k: 2 ** 20)
        with pytest.raises(ValueError, match="only 1.0 MiB is free"):
            _run(nd, sd15, sd15.model, vae_of(sd15), node=nd.DiffuseHighProgressive, **kw)
    previous = comfy.utils.PROGRESS_BAR_HOOK

    def hook(value, total, preview, node_id=None):
        comfy.model_management.interrupt_current_processing(True)

    comfy.utils.set_progress_bar_global_hook(hook)
    try:
        with pytest.raises(comfy.model_management.InterruptProcessingException):
            _run(nd, sd15, sd15.model, vae_of(sd15), node=nd.DiffuseHighProgressive, **kw)
    finally:
        comfy.utils.set_progress_bar_global_hook(previous)
        comfy.model_management.interrupt_current_processing(False)
    again = _run(nd, sd15, sd15.model, vae_of(sd15), node=nd.DiffuseHighProgressive, **kw)
    assert torch.equal(again[0], fresh[0]) and torch.equal(again[1]["samples"], fresh[1]["samples"])


def test_reference_size_mismatch_is_a_loud_error(sd15, nd):
    """The MODEL patch with a reference of another size than the sampled latent raises, naming the fix."""
    import nodes
    vae = vae_of(sd15)
    with torch.inference_mode():
        patched = nd.DiffuseHighGuidance.execute(model=sd15.model, vae=vae, reference=image(64, 64),
                                                 guidance_steps=GUIDED, guidance_mode="latent", guidance_factor=1.0,
                                                 fadeout=0.0, wavelet="db4", dwt_levels=1, vae_tile_size=0).args[0]
        with pytest.raises(ValueError, match="reference image of the size being sampled"):
            nodes.KSamplerAdvanced().sample(patched, "enable", 1, SCHEDULE, 5.0, "euler", "ddim_uniform",
                                            sd15.positive, sd15.negative, {"samples": vae.encode(image(96, 96))},
                                            SCHEDULE - STEPS, SCHEDULE, "disable")


# ------------------------------------------------------------------------------------------------
# Defaults (issue 18): every node runs with every input at its default on each family
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["sd15", "sdxl", "sd3", "flux"])
def test_every_node_runs_at_its_defaults(family, nd, K, comfy_root, tmp_path_factory, monkeypatch):
    """Only the sockets are given (a 32x32 image; every widget at its declared default): DiffuseHigh (x2), the
    Progressive node with stages auto (SD1.x/SD3/Flux: x2 -> 64x64; SDXL: the official 2048, 3072, 4096, whose
    planned sizes are checked here and which then runs with one explicit small stage on the tiny model), and the
    Guidance patch in KSamplerAdvanced with the official settings (start_at_step 35 of 50, cfg 10)."""
    import nodes
    from sampling_helpers import get_setup
    s = get_setup(family, tmp_path_factory)
    vae = vae_of(s)
    for node in _nodes(nd):
        assert node.validate_inputs(**{w.name: node.INPUTS.default(w) for w in node.INPUTS.widgets}) is True
    assert nd.DEFAULTS.stages == "auto"
    sockets = dict(model=s.model, positive=s.positive, negative=s.negative, vae=vae)
    src = image(32, 32)
    with torch.inference_mode():
        out, latent = nd.DiffuseHigh.execute(image=src, **sockets).args
        assert out.shape == (1, 64, 64, 3) and torch.isfinite(out).all()
        assert latent["samples"].shape == (1, s.latent_channels, 8, 8)
        if family == "sdxl":
            planned = []
            with monkeypatch.context() as m:
                m.setattr(nd.memory, "require", lambda *a, **k: None)
                m.setattr(nd, "run_stages", lambda *a, **k: planned.append(a[5]) or (None, None))
                nd.DiffuseHighProgressive.execute(image=src, **sockets)
            assert planned == [[(2048, 2048), (3072, 3072), (4096, 4096)]]
            out, _ = nd.DiffuseHighProgressive.execute(image=src, stages="64", **sockets).args
        else:
            out, _ = nd.DiffuseHighProgressive.execute(image=src, **sockets).args
        assert out.shape == (1, 64, 64, 3) and torch.isfinite(out).all()
        reference = K.upsample(src.movedim(-1, 1), (64, 64)).movedim(1, -1)
        patched = nd.DiffuseHighGuidance.execute(model=s.model, vae=vae, reference=reference).args[0]
        sampled = nodes.KSamplerAdvanced().sample(
            patched, "enable", 0, 50, 10.0, "euler", "ddim_uniform", s.positive, s.negative,
            {"samples": vae.encode(reference)}, 35, 50, "disable")[0]["samples"]
    assert sampled.shape == (1, s.latent_channels, 8, 8) and torch.isfinite(sampled).all()


# ------------------------------------------------------------------------------------------------
# Headless: validation before the run
# ------------------------------------------------------------------------------------------------
def test_headless_invalid_stages_rejected_with_node_errors(comfy_server):
    """A bad `stages` string is refused by validate_inputs: HTTP 400 naming the node, nothing runs."""
    from headless_server import TINY_SD15_NAME
    g = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": TINY_SD15_NAME}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"text": "a red fox", "clip": ["1", 1]}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": "blurry", "clip": ["1", 1]}},
        "4": {"class_type": "LoadImage", "inputs": {"image": "example.png"}},
        "5": {"class_type": "TFG_DiffuseHighProgressive", "inputs": {
            "model": ["1", 0], "positive": ["2", 0], "negative": ["3", 0], "vae": ["1", 2], "image": ["4", 0],
            "stages": "twice as big", "seed": 1, "cfg": 5.0, "sampler_name": "euler", "scheduler": "ddim_uniform",
            "schedule_steps": 10, "steps": 2, "guidance_steps": 1, "guidance_mode": "latent",
            "guidance_factor": 1.0, "fadeout": 0.0, "wavelet": "db4", "dwt_levels": 1, "sharpen_alpha": 1.0,
            "sharpen_sigma": 0.0, "vae_tile_size": 0, "size_conditioning": "official"}},
        "6": {"class_type": "SaveImage", "inputs": {"images": ["5", 0], "filename_prefix": "tfgtest/dh"}},
    }
    status, data = comfy_server.post_prompt(g)
    assert status == 400, data
    assert set(data.get("node_errors", {})) == {"5"}, data
    assert "stages" in repr(data["node_errors"]["5"]["errors"])


_HTTP_VALUES = dict(seed=1, cfg=5.0, sampler_name="euler", scheduler="ddim_uniform", schedule_steps=10, steps=2,
                   guidance_steps=1, guidance_mode="latent", guidance_factor=1.0, fadeout=0.0, wavelet="db4",
                   dwt_levels=1, sharpen_alpha=1.0, sharpen_sigma=0.0, vae_tile_size=0,
                   size_conditioning="official")


def _http_graph(nd, linked: bool) -> dict:
    """DiffuseHigh, Progressive and Guidance (+ KSamplerAdvanced) on the tiny SD1.5 checkpoint; with `linked`
    every numeric widget of the three nodes comes from a PrimitiveInt / PrimitiveFloat / PrimitiveString node."""
    from headless_server import TINY_SD15_NAME
    g = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": TINY_SD15_NAME}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"text": "a red fox", "clip": ["1", 1]}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": "blurry", "clip": ["1", 1]}},
        "4": {"class_type": "LoadImage", "inputs": {"image": "example.png"}},
        "5": {"class_type": "ImageScale", "inputs": {"image": ["4", 0], "upscale_method": "bicubic", "width": 32,
                                                     "height": 32, "crop": "disabled"}},
    }
    src = {"model": ["1", 0], "positive": ["2", 0], "negative": ["3", 0], "vae": ["1", 2], "image": ["5", 0]}
    g["10"] = {"class_type": "TFG_DiffuseHigh", "inputs": {**src, "width": 0, "height": 0, "scale_by": 2.0,
                                                           **_HTTP_VALUES}}
    g["11"] = {"class_type": "TFG_DiffuseHighProgressive", "inputs": {**src, "stages": "48, 64", **_HTTP_VALUES}}
    g["12"] = {"class_type": "ImageScale", "inputs": {"image": ["4", 0], "upscale_method": "bicubic", "width": 64,
                                                      "height": 64, "crop": "disabled"}}
    g["13"] = {"class_type": "TFG_DiffuseHighGuidance", "inputs": {
        "model": ["1", 0], "vae": ["1", 2], "reference": ["12", 0],
        **{k: _HTTP_VALUES[k] for k in ("guidance_steps", "guidance_mode", "guidance_factor", "fadeout", "wavelet",
                                        "dwt_levels", "vae_tile_size")}}}
    g["14"] = {"class_type": "VAEEncode", "inputs": {"pixels": ["12", 0], "vae": ["1", 2]}}
    g["15"] = {"class_type": "KSamplerAdvanced", "inputs": {
        "model": ["13", 0], "add_noise": "enable", "noise_seed": 1, "steps": 10, "cfg": 5.0, "sampler_name": "euler",
        "scheduler": "ddim_uniform", "positive": ["2", 0], "negative": ["3", 0], "latent_image": ["14", 0],
        "start_at_step": 8, "end_at_step": 10, "return_with_leftover_noise": "disable"}}
    g["16"] = {"class_type": "VAEDecode", "inputs": {"samples": ["15", 0], "vae": ["1", 2]}}
    for i, source in enumerate(("10", "11", "16")):
        g[f"2{i}"] = {"class_type": "SaveImage", "inputs": {"images": [source, 0], "filename_prefix": "tfgtest/dhl"}}
    if linked:
        primitive = {"int": "PrimitiveInt", "float": "PrimitiveFloat", "string": "PrimitiveString"}
        n = 100
        for node_id, node in (("10", nd.DiffuseHigh), ("11", nd.DiffuseHighProgressive),
                              ("13", nd.DiffuseHighGuidance)):
            for w in node.INPUTS.widgets:
                if w.kind in primitive:
                    g[str(n)] = {"class_type": primitive[w.kind], "inputs": {"value": g[node_id]["inputs"][w.name]}}
                    g[node_id]["inputs"][w.name] = [str(n), 0]
                    n += 1
    return g


def test_headless_linked_numeric_inputs_run_and_invalid_values_are_400(comfy_server, nd):
    """Every numeric (and the stages) widget of the three nodes fed by Primitive nodes: accepted, runs, and equals the
    same graph with typed values. Out-of-range values (those the issue found accepted) are HTTP 400 naming node and
    input; the server stays up."""
    linked = comfy_server.run_prompt(_http_graph(nd, linked=True), timeout=600)
    typed = comfy_server.run_prompt(_http_graph(nd, linked=False), timeout=600)
    a, b = comfy_server.images_by_node(linked), comfy_server.images_by_node(typed)
    assert len(a) == 3 and [x.shape for v in a.values() for x in v] == [(64, 64, 3), (64, 64, 3), (64, 64, 3)]
    assert all((x == y).all() for k in a for x, y in zip(a[k], b[k]))
    for node_id, name, value in (("10", "cfg", 151.0), ("11", "schedule_steps", 1001), ("10", "guidance_steps", 1001),
                                 ("11", "sharpen_sigma", 16.0), ("13", "vae_tile_size", 8193),
                                 ("10", "guidance_mode", "pixels"), ("11", "stages", "huge"),
                                 ("10", "sampler_name", "nope")):
        g = _http_graph(nd, linked=False)
        g[node_id]["inputs"][name] = value
        for other in {"10": "20", "11": "21", "13": "22"}.items():   # only the bad node's branch has an output
            if other[0] != node_id:
                del g[other[1]]
        status, data = comfy_server.post_prompt(g)
        assert status == 400, (name, data)
        assert node_id in data["node_errors"], (name, data)
        assert name in repr(data["node_errors"][node_id]["errors"]), (name, data)
    assert comfy_server.run_prompt(_http_graph(nd, linked=False), timeout=600)["status"]["status_str"] == "success"


def test_wrong_vae_is_a_loud_error(sd15, nd, comfy_root, tmp_path_factory):
    from sampling_helpers import get_setup
    flux = get_setup("flux", tmp_path_factory)
    with pytest.raises(ValueError, match=r"\[model family: SD1.x\].*connect the VAE that belongs to this model"):
        with torch.inference_mode():
            nd.DiffuseHigh.execute(model=sd15.model, positive=sd15.positive, negative=sd15.negative,
                                   vae=vae_of(flux), width=0, height=0, scale_by=2.0, image=image(16, 16),
                                   **node_kwargs(nd))
