"""NegToMe on the newer DiT families (Wan 2.1 T2V/I2V, Wan 2.2, HunyuanVideo, LTX-Video, Qwen-Image, Chroma,
SD3.5), in process on tiny random-weight models of each real architecture (5-D latents for video).

Behaviour: the block patches run on every block and model call and see one clip's frames x h x w image tokens;
neutral settings (alpha 0, an empty window) are bit-identical to the unpatched model; an active setting changes a
batch of 2 clips against the seeded baseline (clip 0, the reference of the official matching, unchanged); the
reference-image mode (the reference held still over the frames); loud errors for what NegToMe cannot handle."""
from __future__ import annotations

import math
import types

import pytest
import torch

import host
import tiny_dit_models
from sampling_helpers import with_counter

STEPS = 2
CFG = 4.0
FAMILIES = {
    # builder: (family key, block counts of the tiny model)
    "wan21_t2v": ("wan", {"block": 2}),
    "wan21_i2v": ("wan", {"block": 2}),
    "wan22_t2v": ("wan", {"block": 2}),
    "hunyuan_video": ("hunyuan_video", {"double": 1, "single": 1}),
    "ltxv": ("ltxv", {"block": 2}),
    "qwen_image": ("qwen_image", {"block": 2}),
    "chroma": ("chroma", {"double": 1, "single": 1}),
    "sd35": ("sd3", {"joint": 2}),
}
# Random tiny features: "all" blocks, a threshold every token passes and a window over the whole schedule.
BASE = dict(alpha=1.5, threshold=-1.0, matching="official", window="custom", start_percent=0.0, end_percent=1.0,
            blocks="all", custom_blocks="")


@pytest.fixture(scope="module")
def install(comfy_root):
    return host.pack_module("nodes.negtome_install")


def patched(nt, model, **overrides):
    return nt.NegToMe.execute(model=model, **dict(BASE, **overrides)).args[0]


def ksample(d, model, batch=2, cfg=CFG):
    return tiny_dit_models.ksample(d, model, STEPS, cfg, batch)


def expected_tokens(d, install, adapters) -> int:
    """One clip's image tokens: the latent's frames x h x w over the family's patch size."""
    latent = d.latent(1)
    family = adapters.detect_family(d.model)
    size = install.patch_size_of(d.model.get_model_object("diffusion_model"), family)
    pt, ph, pw = size if isinstance(size, tuple) and len(size) == 3 else (1, size, size)
    frames = math.ceil(latent.shape[2] / pt) if latent.dim() == 5 else 1
    return frames * math.ceil(latent.shape[-2] / ph) * math.ceil(latent.shape[-1] / pw)


def spy_merge(nt, monkeypatch):
    """Record the (batch, tokens) of every layer merge (the kernel the block patches call)."""
    seen = []
    original = nt.merge_batch

    def spy(x, n_chunks, *args, **kwargs):
        seen.append((x.shape[0], x.shape[1], n_chunks))
        return original(x, n_chunks, *args, **kwargs)

    monkeypatch.setattr(nt, "merge_batch", spy)
    return seen


# ------------------------------------------------------------------------------------------------
def test_patches_every_block_on_the_clip_tokens(dit, nt, install, monkeypatch):
    """Every block of the family merges once per model call, on one clip's frames x h x w tokens, both CFG
    chunks of 2 clips together; the block counts are the model's."""
    name, d = dit
    adapters = host.pack_module("nodes.adapters")
    key, counts = FAMILIES[name]
    family = adapters.detect_family(d.model)
    assert family.key == key
    assert install.dit_block_counts(d.model, family, "test") == counts
    seen = spy_merge(nt, monkeypatch)
    counted, calls = with_counter(patched(nt, d.model))
    out = ksample(d, counted)
    assert torch.isfinite(out).all() and out.shape == d.latent(2).shape
    assert len(seen) == sum(counts.values()) * calls["calls"] and calls["calls"] == STEPS
    tokens = expected_tokens(d, install, adapters)
    assert set(seen) == {(4, tokens, 2)}, (seen[:3], tokens)


IMAGE_FIRST = ("wan", "hunyuan_video", "ltxv")
"""Families whose patched attention output starts with the image tokens (the others: CONTEXT_TOKENS text first)."""


def test_merges_the_image_span_of_the_block_attention(dit, nt, install, monkeypatch):
    """What each block merges is the image (video) token span of its first attention output: [txt, img] of
    Flux-like double/single blocks, SD3 joint and Qwen-Image blocks; [img, txt] of HunyuanVideo; the image
    self-attention (image tokens only) of Wan and LTX-Video."""
    import tiny_dit_models
    name, d = dit
    adapters = host.pack_module("nodes.adapters")
    key, _ = FAMILIES[name]
    n = expected_tokens(d, install, adapters)
    outputs = []

    def recording_override(func, *args, **kwargs):  # an earlier occupant of the override: NegToMe chains to it
        out = func(*args, **kwargs)
        outputs.append(out)
        return out

    merged = []
    original = nt.merge_batch

    def spy(x, *args, **kwargs):
        merged.append((x, outputs[-1]))
        return original(x, *args, **kwargs)

    monkeypatch.setattr(nt, "merge_batch", spy)
    m = d.model.clone()
    m.model_options.setdefault("transformer_options", {})["optimized_attention_override"] = recording_override
    ksample(d, patched(nt, m))
    assert merged
    text = tiny_dit_models.CONTEXT_TOKENS
    for tokens, attention in merged:
        start = 0 if key in IMAGE_FIRST else text
        assert torch.equal(tokens, attention[:, start:start + n])
        if key in ("wan", "ltxv"):
            assert attention.shape[1] == n  # self-attention over the clip's tokens only
        else:
            assert attention.shape[1] == n + text


def test_alpha_zero_and_empty_window_are_bit_identical(dit, nt, monkeypatch):
    _, d = dit
    base = ksample(d, d.model)
    seen = spy_merge(nt, monkeypatch)
    assert torch.equal(base, ksample(d, patched(nt, d.model, alpha=0.0)))
    assert torch.equal(base, ksample(d, patched(nt, d.model, start_percent=1.0, end_percent=1.0)))
    assert seen == []  # inactive calls never reach the kernel


def test_active_setting_changes_the_batch_and_keeps_clip_zero(dit, nt):
    _, d = dit
    base = ksample(d, d.model)
    out = ksample(d, patched(nt, d.model))
    assert torch.isfinite(out).all()
    assert torch.equal(out[0], base[0]), "clip 0 is the reference of the official matching"
    assert not torch.equal(out[1], base[1])
    others = ksample(d, patched(nt, d.model, matching="all_others"))
    assert torch.isfinite(others).all() and not torch.equal(others[0], base[0])


def test_custom_block_list_selects_one_block(dit, nt, monkeypatch):
    name, d = dit
    _, counts = FAMILIES[name]
    first_kind = next(iter(counts))
    seen = spy_merge(nt, monkeypatch)
    counted, calls = with_counter(patched(nt, d.model, blocks="custom", custom_blocks=f"{first_kind}.0"))
    ksample(d, counted)
    assert len(seen) == calls["calls"] == STEPS
    with pytest.raises(ValueError, match=rf"TFG NegToMe \[model family: .*{first_kind}\.7.*Fix:"):
        patched(nt, d.model, blocks="custom", custom_blocks=f"{first_kind}.7")


def test_chains_to_a_previous_block_replacement(dit, nt):
    """A block replacement already in the dit slot still runs (NegToMe wraps it)."""
    name, d = dit
    kind = next(iter(FAMILIES[name][1]))
    slot = "single_block" if kind == "single" else "double_block"
    ran = []

    def previous(args, extra):
        ran.append(1)
        return extra["original_block"](args)

    m = d.model.clone()
    m.set_model_patch_replace(previous, "dit", slot, 0)
    ksample(d, patched(nt, m))
    assert len(ran) == STEPS


# ------------------------------------------------------------------------------------------------
# Reference-image mode
# ------------------------------------------------------------------------------------------------
class LatentVAE:
    """Stand-in VAE that encodes any image to a fixed latent of the model's layout (5-D with one frame for video
    VAEs, as Wan's VAE encodes a single image)."""

    def __init__(self, latent):
        self.latent = latent

    def encode(self, pixels):
        return self.latent.clone()


def reference_latent(d, seed=9):
    one = d.latent(1)
    shape = (1, one.shape[1], 1, *one.shape[-2:]) if one.dim() == 5 else tuple(one.shape)
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def ref_patched(nt, d, mask=None, **overrides):
    image = torch.rand(1, 64, 64, 3, generator=torch.Generator().manual_seed(5))
    values = dict(BASE, **overrides)
    return nt.NegToMeReference.execute(model=d.model, vae=LatentVAE(reference_latent(d)), image=image,
                                       noise_reference=False, mask=mask, **values).args[0]


def test_reference_mode_changes_every_clip(dit, nt):
    _, d = dit
    base = ksample(d, d.model)
    assert torch.equal(base, ksample(d, ref_patched(nt, d, alpha=0.0)))
    out = ksample(d, ref_patched(nt, d))
    assert out.shape == base.shape and torch.isfinite(out).all()
    assert not torch.equal(out[0], base[0]) and not torch.equal(out[1], base[1])


def test_reference_row_is_held_still_over_the_frames(comfy_root, nt):
    """The reference latent (one frame) is broadcast over every sampled frame; a mask repeats per frame."""
    import tiny_dit_models
    d = tiny_dit_models.get("wan21_t2v")
    adapters = host.pack_module("nodes.adapters")
    family = adapters.detect_family(d.model)
    latent = nt.encode_reference(d.model, LatentVAE(torch.randn(1, 16, 2, 8, 8)), torch.rand(1, 64, 64, 3),
                                 "test", family)
    assert latent.shape == (1, 16, 1, 8, 8)
    mask = torch.zeros(8, 8)
    mask[:4] = 1.0
    ref = nt.ReferenceImage(latent, mask, False, "test", family)
    row = ref.row(torch.zeros(2, 16, 5, 8, 8), 1.0)
    assert row.shape == (1, 16, 5, 8, 8)
    assert all(torch.equal(row[:, :, f], latent[:, :, 0]) for f in range(5))
    tokens = ref.token_mask((5, 4, 4), torch.device("cpu"))
    assert tokens.shape == (80,) and torch.equal(tokens.view(5, 16), tokens[:16].repeat(5, 1))
    assert int(tokens[:16].sum()) == 8


def test_reference_mask_on_video_limits_the_matches(comfy_root, nt):
    import tiny_dit_models
    d = tiny_dit_models.get("wan21_t2v")
    full = ksample(d, ref_patched(nt, d))
    mask = torch.zeros(64, 64)
    mask[:, :8] = 1.0
    masked = ksample(d, ref_patched(nt, d, mask=mask))
    assert torch.isfinite(masked).all() and not torch.equal(full, masked)


# ------------------------------------------------------------------------------------------------
# Loud errors
# ------------------------------------------------------------------------------------------------
def test_family_still_unsupported_is_a_named_error(comfy_root, nt):
    import comfy.supported_models
    config = object.__new__(comfy.supported_models.AuraFlow)
    fake = types.SimpleNamespace(model=types.SimpleNamespace(model_config=config))
    with pytest.raises(ValueError, match=r"TFG NegToMe \[model family: .*patch points.*Wan.*Fix:"):
        nt.apply_negtome(fake, nt.NegToMeParams())


def test_network_without_the_block_list_is_a_named_error(comfy_root, nt, install):
    """A model detected as Wan whose network lacks the blocks NegToMe patches: an error, not a silent no-op."""
    import tiny_dit_models
    d = tiny_dit_models.get("wan21_t2v")
    adapters = host.pack_module("nodes.adapters")
    family = adapters.detect_family(d.model)
    net = types.SimpleNamespace(patch_size=(1, 2, 2))
    fake = types.SimpleNamespace(get_model_object=lambda name: net)
    with pytest.raises(ValueError, match=r"TFG NegToMe \[model family: Wan 2\.1\].*has no blocks.*Fix:"):
        install.dit_block_counts(fake, family, "NegToMe")


def test_block_that_hides_its_attention_is_a_named_error(comfy_root, nt):
    """A block replacement that drops transformer_options (as Wan 2.2 S2V's blocks do) leaves NegToMe no attention
    output to edit: an error during the run naming node, family and fix, not a silent no-op."""
    import tiny_dit_models
    d = tiny_dit_models.get("wan21_t2v")
    net = d.model.get_model_object("diffusion_model")

    def hides_options(args, extra):  # runs the block as S2V's block_wrap does: no transformer_options
        return {"img": net.blocks[0](args["img"], context=args["txt"], e=args["vec"], freqs=args["pe"])}

    m = d.model.clone()
    m.set_model_patch_replace(hides_options, "dit", "double_block", 0)
    with pytest.raises(ValueError, match=r"TFG NegToMe \[model family: Wan 2\.1\].*transformer_options.*Fix:"):
        ksample(d, patched(nt, m))
