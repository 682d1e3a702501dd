"""NegToMe node, in-process on the real ComfyUI with tiny random-weight models of each family.

Behaviour: identity at alpha = 0, image 0 unchanged (official matching), the active window (layers that merged
per step), batching (separate cond/uncond calls, batch 1, odd latents) and loud errors."""
from __future__ import annotations

import logging

import pytest
import torch

import host
from sampling_helpers import STEPS, Setup


# Tiny models have 8x8 latents: the paper's block preset (grid >= 32) never fires there, so tests use "all"
# and a threshold that lets random features match.
BASE = dict(alpha=0.9, threshold=-1.0, matching="official", window="custom", start_percent=0.0,
            end_percent=1.0, blocks="all", custom_blocks="")


def patched(nt, model, **overrides):
    values = dict(BASE)
    values.update(overrides)
    return nt.NegToMe.execute(model=model, **values).args[0]


def with_key(nt, model, **overrides):
    values = dict(BASE)
    values.update(overrides)
    params = nt.NegToMeParams(**values)
    return nt.apply_negtome(model, params)


def one_cond_per_call(original):
    """A _calc_cond_batch that evaluates each conditioning in its own model call (cond and uncond not batched)."""
    def split(model_, conds, x_in, timestep, model_options):
        outs = []
        for i, c in enumerate(conds):
            only = [None] * len(conds)
            only[i] = c
            outs.append(original(model_, only, x_in, timestep, model_options)[i])
        return outs
    return split


def sample(s: Setup, model, batch=3, size=8, cfg=5.0, seed=3, steps=STEPS):
    import nodes
    with torch.inference_mode():
        latent = {"samples": torch.zeros(batch, s.latent_channels, size, size)}
        out = nodes.common_ksampler(model, seed, steps, cfg, "euler", "normal", s.positive, s.negative, latent,
                                    denoise=1.0)[0]["samples"]
    return out.clone()


# ------------------------------------------------------------------------------------------------
def test_alpha_zero_is_bit_identical(setup, nt):
    assert torch.equal(sample(setup, setup.model), sample(setup, patched(nt, setup.model, alpha=0.0)))


def test_changes_outputs_and_keeps_image_zero(setup, nt):
    base = sample(setup, setup.model)
    out = sample(setup, patched(nt, setup.model, alpha=1.5))
    assert torch.equal(out[0], base[0]), "image 0 is the reference and must not change (official matching)"
    assert not torch.equal(out[1:], base[1:])


def test_all_others_changes_image_zero_too(sd15, nt):
    base = sample(sd15, sd15.model)
    out = sample(sd15, patched(nt, sd15.model, alpha=1.5, matching="all_others"))
    assert not torch.equal(out[0], base[0])


def test_window_limits_the_steps(setup, nt):
    """Layers merge only on steps whose sigma lies inside the window; with the window ending at mid-schedule
    the late steps see no merge, and the result differs from an unpatched run."""
    model, key = with_key(nt, setup.model, start_percent=0.0, end_percent=0.45)
    assert not torch.equal(sample(setup, model), sample(setup, setup.model))
    state = nt.LAST_RUN[key]
    sigmas = torch.tensor(state.sigma_high), torch.tensor(state.sigma_low)
    merged_steps = sorted(state.layers_by_step)
    assert merged_steps, "no step merged"
    ms = model.get_model_object("model_sampling")
    import comfy.samplers
    schedule = comfy.samplers.calculate_sigmas(ms, "normal", STEPS)
    inside = [i for i in range(STEPS) if float(sigmas[1]) - 1e-6 <= float(schedule[i]) <= float(sigmas[0]) + 1e-6]
    assert merged_steps == inside and 0 < len(inside) < STEPS
    per_step = set(state.layers_by_step[i] for i in inside)
    assert min(per_step) > 0


def test_window_outside_all_steps_is_identity(setup, nt):
    """start = end = 1.0: sigma 0 is never evaluated, so nothing merges, and the run is bit-identical."""
    model, key = with_key(nt, setup.model, start_percent=1.0, end_percent=1.0)
    assert torch.equal(sample(setup, setup.model), sample(setup, model))
    assert not nt.LAST_RUN[key].layers_by_step


def test_late_window_leaves_early_steps_untouched(setup, nt):
    """A window over the late steps only: stopping the sampler before the window gives the unpatched latent
    bit-for-bit; running on through the window changes it."""
    import nodes
    model, key = with_key(nt, setup.model, start_percent=0.6, end_percent=1.0, alpha=1.5)
    sample(setup, model)
    first = min(nt.LAST_RUN[key].layers_by_step)
    assert first > 0

    def run(m, last_step):
        with torch.inference_mode():
            latent = {"samples": torch.zeros(3, setup.latent_channels, 8, 8)}
            return nodes.common_ksampler(m, 3, STEPS, 5.0, "euler", "normal", setup.positive, setup.negative, latent,
                                         last_step=last_step)[0]["samples"].clone()

    assert torch.equal(run(model, first), run(setup.model, first))
    assert not torch.equal(run(model, STEPS), run(setup.model, STEPS))


def test_paper_window_per_family(setup, nt):
    model, key = with_key(nt, setup.model, window="paper")
    sample(setup, model, steps=10)
    state = nt.LAST_RUN[key]
    if setup.family in ("sd3", "flux"):
        assert state.sigma_low == pytest.approx(0.9)
    else:
        ms = setup.model.get_model_object("model_sampling")
        assert float(ms.timestep(torch.tensor(state.sigma_low))) == pytest.approx(800.0, abs=0.5)
    assert state.layers_by_step and max(state.layers_by_step) < 10


def test_paper_blocks_on_small_latent_warn(sd15, nt, caplog):
    model, key = with_key(nt, sd15.model, blocks="paper")
    with caplog.at_level(logging.WARNING, logger="tfg"):
        assert torch.equal(sample(sd15, sd15.model), sample(sd15, model))
    assert "merged no tokens" in caplog.text


def test_custom_blocks(setup, nt):
    names = {"sd15": "output.0-11", "sdxl": "output.0-8", "flux": "single.0", "sd3": "joint.0"}[setup.family]
    model, key = with_key(nt, setup.model, blocks="custom", custom_blocks=names, end_percent=1.0)
    out = sample(setup, model)
    assert nt.LAST_RUN[key].layers_by_step
    assert not torch.equal(out, sample(setup, setup.model))


def test_custom_blocks_errors(setup, nt):
    bad = "double.0" if setup.family in ("sd15", "sdxl") else "output.3"
    with pytest.raises(ValueError, match=r"TFG NegToMe \[model family: .*\].*custom_blocks.*Fix:"):
        patched(nt, setup.model, blocks="custom", custom_blocks=bad)
    if setup.family in ("flux", "sd3"):
        with pytest.raises(ValueError, match="blocks"):
            patched(nt, setup.model, blocks="custom", custom_blocks=("double.99" if setup.family == "flux"
                                                                     else "joint.99"))


def test_invalid_parameters_are_loud(sd15, nt):
    inputs = host.pack_module("nodes.inputs")
    with pytest.raises(inputs.InputError, match=r"TFG NegToMe: start_percent \(0.8\) must not exceed end_percent"):
        patched(nt, sd15.model, start_percent=0.8, end_percent=0.2)
    with pytest.raises(inputs.InputError, match=r"TFG NegToMe: input 'alpha' must be at most 10"):
        patched(nt, sd15.model, alpha=11.0)
    with pytest.raises(ValueError, match=r"TFG NegToMe: .*start_percent.*Fix:"):  # the install function's own check
        nt.apply_negtome(sd15.model, nt.NegToMeParams(**dict(BASE, start_percent=0.8, end_percent=0.2)))


def test_unsupported_family_is_named(comfy_root, nt):
    import types
    import comfy.supported_models
    config = object.__new__(comfy.supported_models.AuraFlow)  # Wan is supported now (tests/test_families_negtome.py)
    fake = types.SimpleNamespace(model=types.SimpleNamespace(model_config=config))
    with pytest.raises(ValueError, match=r"TFG NegToMe \[model family: .*\].*patch points.*Fix:"):
        nt.apply_negtome(fake, nt.NegToMeParams())


def test_batch_of_one_warns_and_is_identity(setup, nt, caplog):
    model = patched(nt, setup.model)
    with caplog.at_level(logging.WARNING, logger="tfg"):
        out = sample(setup, model, batch=1)
    assert torch.equal(out, sample(setup, setup.model, batch=1))
    assert "needs a batch of 2 or more" in caplog.text  # once per patch (a new patch warns again)


def test_cfg_one_single_chunk(setup, nt):
    """cfg = 1: one cond chunk per call; still diversifies and keeps image 0."""
    base = sample(setup, setup.model, cfg=1.0)
    out = sample(setup, patched(nt, setup.model, alpha=1.5), cfg=1.0)
    assert torch.equal(out[0], base[0]) and not torch.equal(out[1:], base[1:])


def test_separate_cond_and_uncond_calls_match_batched(sd15, nt, monkeypatch):
    """ComfyUI may run cond and uncond in separate model calls (low memory): each chunk is processed alone,
    so the result matches the batched run."""
    import comfy.samplers
    model = patched(nt, sd15.model, alpha=1.5)
    batched = sample(sd15, model)
    monkeypatch.setattr(comfy.samplers, "_calc_cond_batch", one_cond_per_call(comfy.samplers._calc_cond_batch))
    separate = sample(sd15, model)
    # network batch sizes round differently (~1e-7), which can flip a near-tie argmax: close, not bit-equal
    torch.testing.assert_close(separate, batched, rtol=5e-3, atol=5e-3)


@pytest.mark.parametrize("size", [7, 9])
def test_odd_latent_sizes(setup, nt, size):
    base = sample(setup, setup.model, size=size)
    out = sample(setup, patched(nt, setup.model, alpha=1.5), size=size)
    assert out.shape == base.shape
    assert torch.equal(out[0], base[0]) and not torch.equal(out[1:], base[1:])


def test_stacks_with_itself(sd15, nt):
    once = patched(nt, sd15.model, alpha=0.5)
    twice = patched(nt, once, alpha=0.5)
    assert not torch.equal(sample(sd15, once), sample(sd15, twice))


def test_schema(comfy_root, nt):
    schema = nt.NegToMe.define_schema()
    assert schema.node_id == "TFG_NegToMe"
    for inp in schema.inputs:
        assert inp.tooltip, inp.id
    assert "arXiv 2412.01339" in schema.description


# ------------------------------------------------------------------------------------------------
# Reference-image mode
# ------------------------------------------------------------------------------------------------
class FakeVAE:
    """Deterministic stand-in for a VAE: an 8x downsampled, fixed random projection of the pixels."""

    def __init__(self, channels):
        self.channels = channels
        self.calls = 0

    def encode(self, pixels):
        self.calls += 1
        g = torch.Generator().manual_seed(11)
        proj = torch.randn(3, self.channels, generator=g)
        x = pixels[..., :3].movedim(-1, 1)
        x = torch.nn.functional.avg_pool2d(x, 8)
        return torch.einsum("bchw,co->bohw", x, proj)


def reference_image(size=64, seed=5):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(1, size, size, 3, generator=g)


def ref_patched(nt, s: Setup, mask=None, noise_reference=False, image=None, **overrides):
    values = dict(BASE)
    values.update(overrides)
    image = reference_image() if image is None else image
    return nt.NegToMeReference.execute(model=s.model, vae=FakeVAE(s.latent_channels), image=image,
                                       noise_reference=noise_reference, mask=mask, **values).args[0]


def test_reference_mode_changes_every_image_and_keeps_shape(setup, nt):
    base = sample(setup, setup.model, batch=2)
    out = sample(setup, ref_patched(nt, setup, alpha=1.5), batch=2)
    assert out.shape == base.shape
    assert not torch.equal(out[0], base[0]) and not torch.equal(out[1], base[1])


def test_reference_mode_works_with_batch_of_one(sd15, nt):
    assert not torch.equal(sample(sd15, sd15.model, batch=1), sample(sd15, ref_patched(nt, sd15), batch=1))


def test_reference_mode_alpha_zero_only_costs_a_row(sd15, nt):
    """alpha = 0 installs nothing active: bit-identical."""
    assert torch.equal(sample(sd15, sd15.model, batch=2), sample(sd15, ref_patched(nt, sd15, alpha=0.0), batch=2))


def test_reference_mode_empty_mask_changes_nothing(setup, nt, caplog):
    with caplog.at_level(logging.WARNING, logger="tfg"):
        model = ref_patched(nt, setup, mask=torch.zeros(1, 64, 64), alpha=1.5)
    assert torch.equal(sample(setup, setup.model, batch=2), sample(setup, model, batch=2))
    assert "mask is empty" in caplog.text


def test_reference_mode_mask_limits_matches(sd15, nt):
    full, key_full = nt.apply_negtome(sd15.model, nt.NegToMeParams(**BASE), reference=_reference(nt, sd15, None))
    sample(sd15, full, batch=2)
    mask = torch.zeros(64, 64)
    mask[:, :32] = 1.0
    half, key_half = nt.apply_negtome(sd15.model, nt.NegToMeParams(**BASE), reference=_reference(nt, sd15, mask))
    out_half = sample(sd15, half, batch=2)
    merged_full = sum(nt.LAST_RUN[key_full].tokens_by_step.values())
    merged_half = sum(nt.LAST_RUN[key_half].tokens_by_step.values())
    assert 0 < merged_half < merged_full
    assert not torch.equal(out_half, sample(sd15, sd15.model, batch=2))


def _reference(nt, s: Setup, mask, noised=False):
    family = host.pack_module("nodes.adapters").detect_family(s.model)
    latent = nt.encode_reference(s.model, FakeVAE(s.latent_channels), reference_image(), "test", family)
    return nt.ReferenceImage(latent, mask, noised, "test", family)


def test_reference_mode_noised_differs_from_clean(setup, nt):
    clean = sample(setup, ref_patched(nt, setup, alpha=1.5), batch=2)
    noised = sample(setup, ref_patched(nt, setup, alpha=1.5, noise_reference=True), batch=2)
    assert not torch.equal(clean, noised)


def test_reference_mode_inserted_only_inside_window(sd15, nt):
    """Outside the window no row is inserted: count network rows per call."""
    import comfy.patcher_extension
    rows = []
    model = ref_patched(nt, sd15, window="custom", start_percent=0.0, end_percent=0.45)

    def count(executor, x, *args, **kwargs):
        out = executor(x, *args, **kwargs)
        rows.append((x.shape[0], out.shape[0]))
        return out

    counted = model.clone()
    counted.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, "test.rows", count)
    sample(sd15, counted, batch=2)
    network_rows = [r[0] for r in rows]
    assert network_rows[0] == 6 and network_rows[-1] == 4  # 2 chunks x (2 + reference) early, 2 x 2 late


def test_reference_mode_separate_calls_match_batched(sd15, nt, monkeypatch):
    import comfy.samplers
    model = ref_patched(nt, sd15, alpha=1.5)
    batched = sample(sd15, model, batch=2)
    monkeypatch.setattr(comfy.samplers, "_calc_cond_batch", one_cond_per_call(comfy.samplers._calc_cond_batch))
    # Different network batch sizes round differently (~1e-7); with every token merged (threshold -1) that can flip
    # a near-tie argmax early on, which spreads as a small change everywhere: close, not bit-equal.
    separate = sample(sd15, model, batch=2)
    torch.testing.assert_close(separate, batched, rtol=5e-3, atol=5e-3)


def test_reference_mode_rejects_all_others(sd15, nt):
    with pytest.raises(ValueError, match=r"TFG NegToMe Reference \[model family: SD1.x\].*all_others.*Fix:"):
        nt.apply_negtome(sd15.model, nt.NegToMeParams(**dict(BASE, matching="all_others")),
                         nt.REFERENCE_NODE, reference=_reference(nt, sd15, None))


def test_reference_schema(comfy_root, nt):
    schema = nt.NegToMeReference.define_schema()
    assert schema.node_id == "TFG_NegToMeReference"
    assert all(i.tooltip for i in schema.inputs)
    matching = [i for i in schema.inputs if i.id == "matching"][0]
    assert "all_others" not in matching.options


def test_paper_window_on_edm_sampling_uses_the_ddpm_noise_level(sd15, nt):
    """Playground v2.5 / CosXL style models sample with continuous EDM sigmas: the official window (DDPM t >= 800)
    must still map to the scaled-linear schedule's sigma(800), not to exp(800 / 0.25)."""
    import comfy.model_sampling
    family = nt.adapters.detect_family(sd15.model)
    discrete_high, discrete_low = nt._sigma_window(sd15.model, family, nt.NegToMeParams())

    class EDM(comfy.model_sampling.ModelSamplingContinuousEDM, comfy.model_sampling.EPS):
        pass

    m = sd15.model.clone()
    sampling = EDM(sd15.model.model.model_config)
    sampling.set_parameters(0.002, 120.0, 0.5)
    m.add_object_patch("model_sampling", sampling)
    high, low = nt._sigma_window(m, nt.adapters.detect_family(m), nt.NegToMeParams())
    assert abs(low - 5.111) < 1e-3 and abs(discrete_low - low) < 0.05
    assert high > low


# ------------------------------------------------------------------------------------------------
# Hot path: no host read-back per layer; the count is read once when the run ends
# ------------------------------------------------------------------------------------------------
def test_layers_record_device_counts_and_never_read_back(sd15, nt, monkeypatch):
    recorded, calls = [], []
    original_record = nt.NegToMeRunState.record
    kernel = nt.merge_batch

    def record(self, step, merged):
        assert isinstance(merged, torch.Tensor) and merged.dim() == 0
        recorded.append(step)
        return original_record(self, step, merged)

    def forbidden(*a, **k):
        raise AssertionError("host read-back inside the per-layer kernel")

    def guarded(*args, **kwargs):
        calls.append(kwargs.get("out") is not None)
        with monkeypatch.context() as m:
            for name in ("item", "tolist", "__bool__", "__int__", "__float__"):
                m.setattr(torch.Tensor, name, forbidden)
            return kernel(*args, **kwargs)

    monkeypatch.setattr(nt.NegToMeRunState, "record", record)
    monkeypatch.setattr(nt, "merge_batch", guarded)
    model, key = with_key(nt, sd15.model, alpha=1.5)
    out = sample(sd15, model)
    monkeypatch.undo()
    state = nt.LAST_RUN[key]
    assert recorded and len(recorded) == len(calls) and not state.pending
    # threshold -1: every layer call merges, so every recorded call counts, read back once at the end
    assert sum(state.layers_by_step.values()) == len(recorded)
    assert sum(state.tokens_by_step.values()) > 0
    assert sorted(state.layers_by_step) == sorted(set(recorded))
    assert torch.equal(out, sample(sd15, patched(nt, sd15.model, alpha=1.5)))


def test_similarity_option_reaches_the_kernel_and_is_exact_on_fp32_models(setup, nt, monkeypatch):
    seen = []
    kernel = nt.merge_batch

    def spy(*args, **kwargs):
        seen.append(args[7])  # similarity
        return kernel(*args, **kwargs)

    base = sample(setup, with_key(nt, setup.model, alpha=1.5)[0])
    monkeypatch.setattr(nt, "merge_batch", spy)
    model, _ = nt.apply_negtome(setup.model, nt.NegToMeParams(**dict(BASE, alpha=1.5, similarity="model")))
    out = sample(setup, model)
    assert seen and set(seen) == {"model"}
    assert torch.equal(out, base)  # the tiny models run in fp32: the model dtype is fp32


def test_similarity_node_input_reaches_the_kernel(sd15, nt, monkeypatch):
    seen = []
    kernel = nt.merge_batch

    def spy(*args, **kwargs):
        seen.append(args[7])  # similarity
        return kernel(*args, **kwargs)

    monkeypatch.setattr(nt, "merge_batch", spy)
    sample(sd15, patched(nt, sd15.model, alpha=1.5, similarity="model"), steps=2)
    assert seen and set(seen) == {"model"}
    seen.clear()
    sample(sd15, patched(nt, sd15.model, alpha=1.5), steps=2)  # the input left out: the params default
    assert seen and set(seen) == {nt.NegToMeParams().similarity}


@pytest.mark.parametrize("node", ["NegToMe", "NegToMeReference"])
def test_validate_inputs_checks_the_params_before_the_run(nt, node):
    cls = getattr(nt, node)
    good = dict(BASE, similarity="fp32")
    assert cls.validate_inputs(**good) is True
    bad_blocks = cls.validate_inputs(**dict(good, blocks="custom", custom_blocks="output.x"))
    assert isinstance(bad_blocks, str) and "output.x" in bad_blocks
    assert isinstance(cls.validate_inputs(**dict(good, blocks="custom", custom_blocks="")), str)
    assert isinstance(cls.validate_inputs(**dict(good, similarity="fp8")), str)
    assert cls.validate_inputs(**dict(good, custom_blocks=None)) is True  # a linked input: checked at run time


# ------------------------------------------------------------------------------------------------
# Declarations (nodes/inputs.py): one per input, linked inputs, the reference image's shapes and values
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("node", ["NegToMe", "NegToMeReference"])
def test_declarations_give_schema_defaults_and_params(nt, node):
    cls = getattr(nt, node)
    golden = {"NegToMe": ["model", "alpha", "threshold", "matching", "window", "start_percent", "end_percent",
                          "blocks", "custom_blocks", "similarity"],
              "NegToMeReference": ["model", "vae", "image", "noise_reference", "mask", "alpha", "threshold",
                                   "matching", "window", "start_percent", "end_percent", "blocks", "custom_blocks",
                                   "similarity"]}[node]
    schema = cls.define_schema()
    assert [i.id for i in schema.inputs] == golden  # shipped names and order
    defaults = nt.NegToMeParams()
    for w in cls.INPUTS.widgets:
        if w.field is not None:
            assert cls.INPUTS.default(w) == getattr(defaults, w.field), w.name
        assert w.meaning and "Neutral:" in w.tooltip() or not w.neutral
    values = {w.name: cls.INPUTS.default(w) for w in cls.INPUTS.widgets}
    assert cls.INPUTS.params(cls.INPUTS.checked(dict(values, model=None, image=None))) == defaults
    similarity = cls.INPUTS.widget("similarity")
    assert similarity.option_list()[:2] == ["fp32", "model"]  # the shipped options keep their places


@pytest.mark.parametrize("node", ["NegToMe", "NegToMeReference"])
def test_every_widget_linked_passes_validation_and_bad_values_are_named(nt, node):
    cls = getattr(nt, node)
    names = [w.name for w in cls.INPUTS.widgets]
    assert cls.validate_inputs(**{n: None for n in names}) is True  # all linked (Primitive nodes)
    for w in cls.INPUTS.widgets:
        if w.kind in ("int", "float"):
            for bad in (w.max + 1, w.min - 1, "x"):
                msg = cls.validate_inputs(**{w.name: bad})
                assert isinstance(msg, str) and f"'{w.name}'" in msg, (w.name, bad)
        elif w.kind == "combo":
            msg = cls.validate_inputs(**{w.name: "no-such-option"})
            assert isinstance(msg, str) and f"'{w.name}'" in msg
    assert "output.x" in cls.validate_inputs(blocks="custom", custom_blocks="output.x")
    assert "custom_blocks" in cls.validate_inputs(blocks="custom", custom_blocks=" ")
    assert cls.validate_inputs(window="paper", start_percent=0.9, end_percent=0.1) is True  # custom only
    assert "start_percent" in cls.validate_inputs(window="custom", start_percent=0.9, end_percent=0.1)
    assert cls.validate_inputs(window="custom", start_percent=None, end_percent=0.1) is True  # linked: later


def test_linked_values_are_checked_when_the_node_runs(sd15, nt):
    inputs = host.pack_module("nodes.inputs")
    with pytest.raises(inputs.InputError, match="custom_blocks"):
        nt.NegToMe.execute(model=sd15.model, **dict(BASE, blocks="custom", custom_blocks="output.x"))
    with pytest.raises(inputs.InputError, match="'matching'"):
        nt.NegToMe.execute(model=sd15.model, **dict(BASE, matching="nope"))


def test_reference_rejects_non_finite_images_and_masks(sd15, nt):
    inputs = host.pack_module("nodes.inputs")
    image = reference_image()
    image[0, 3, 3, 1] = float("nan")
    with pytest.raises(inputs.InputError, match="input 'image' holds NaN"):
        ref_patched(nt, sd15, image=image)
    mask = torch.ones(1, 64, 64)
    mask[0, 0, 0] = float("inf")
    with pytest.raises(inputs.InputError, match="input 'mask' holds NaN"):
        ref_patched(nt, sd15, mask=mask)


def test_reference_batch_uses_the_first_image_and_warns(sd15, nt, caplog):
    first = reference_image(seed=5)
    batch = torch.cat([first, reference_image(seed=6)])
    alone = sample(sd15, ref_patched(nt, sd15, image=first, alpha=1.5), batch=2)
    with caplog.at_level(logging.WARNING, logger="tfg"):
        both = sample(sd15, ref_patched(nt, sd15, image=batch, alpha=1.5), batch=2)
    assert torch.equal(alone, both)
    assert "2 reference images given; only the first is used" in caplog.text


def test_reference_of_another_size_is_resized_and_warns(sd15, nt, caplog):
    with caplog.at_level(logging.WARNING, logger="tfg"):
        out = sample(sd15, ref_patched(nt, sd15, image=reference_image(size=128), alpha=1.5), batch=2)
    assert torch.isfinite(out).all()
    assert "the reference latent is resized" in caplog.text
    assert not torch.equal(out, sample(sd15, ref_patched(nt, sd15, alpha=1.5), batch=2))


def test_mask_of_another_size_and_batch_is_resized(sd15, nt):
    half = torch.zeros(2, 32, 16)
    half[0, :, :8] = 1.0  # the first mask: left half (second mask ignored)
    same = torch.zeros(64, 64)
    same[:, :32] = 1.0
    assert torch.equal(sample(sd15, ref_patched(nt, sd15, mask=half, alpha=1.5), batch=2),
                       sample(sd15, ref_patched(nt, sd15, mask=same, alpha=1.5), batch=2))


def test_reference_too_small_is_a_node_error(sd15, nt):
    with pytest.raises(ValueError, match=r"TFG NegToMe Reference \[model family: SD1.x\].*at least 16.*Fix:"):
        ref_patched(nt, sd15, image=reference_image(size=8))
