"""Self-check of the tiny random-weight models: detected as their family, and a 2-step cfg-4 sample
gives a finite latent of the right shape."""
from __future__ import annotations

import pytest

FAMILIES = {"sd15": "SD15", "sdxl": "SDXL", "sd3": "SD3", "flux": "Flux"}


@pytest.fixture(scope="module")
def tm(comfy_root):
    import tiny_models
    return tiny_models


@pytest.mark.parametrize("family", list(FAMILIES))
def test_tiny_model_family_and_sample(tm, family):
    import torch
    import comfy.sample
    import comfy.supported_models
    import nodes

    model, clip, vae = tm.build(family)
    config = model.model.model_config
    assert type(config) is getattr(comfy.supported_models, FAMILIES[family])

    pos = nodes.CLIPTextEncode().encode(clip, "a photo of a cat")[0]
    neg = nodes.CLIPTextEncode().encode(clip, "blurry")[0]
    assert not torch.equal(pos[0][0], neg[0][0])

    channels = tm.VAE_SPECS[family][0]
    assert config.latent_format.latent_channels == channels
    latent = torch.zeros(1, channels, 8, 8)
    noise = comfy.sample.prepare_noise(latent, 0)
    with torch.inference_mode():
        out = comfy.sample.sample(model, noise, 2, 4.0, "euler", "normal", pos, neg, latent, seed=0,
                                  disable_pbar=True)
        image = vae.decode(out)
    assert out.shape == latent.shape
    assert torch.isfinite(out).all()
    assert image.shape == (1, 64, 64, 3)
    assert torch.isfinite(image).all()


def test_tiny_text_encoder_deterministic(tm):
    import torch
    for family in FAMILIES:
        a = tm.conditioning(family, "a cat")
        b = tm.conditioning(family, "a cat")
        c = tm.conditioning(family, "a dog", batch=2)
        assert torch.equal(a[0][0], b[0][0]) and torch.equal(a[0][1]["pooled_output"], b[0][1]["pooled_output"])
        assert c[0][0].shape[0] == 2 and c[0][1]["pooled_output"].shape[0] == 2
        assert not torch.equal(a[0][0], c[0][0][:1])
        n, ctx, pooled, _ = tm.TEXT_ENCODER_SPECS[family]
        assert a[0][0].shape == (1, n, ctx) and a[0][1]["pooled_output"].shape == (1, pooled)


def test_tiny_weights_deterministic(tm):
    import torch
    a, _, _ = tm.build_tiny_flux()
    b, _, _ = tm.build_tiny_flux()
    sa, sb = a.model.diffusion_model.state_dict(), b.model.diffusion_model.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_cache_is_outside_the_pack_and_overridable(tmp_path, monkeypatch):
    """The ~360 MiB of tiny files never land inside the pack (custom_nodes/); TFG_TEST_CACHE moves them."""
    import tiny_models
    from host import PACK_ROOT
    assert PACK_ROOT.resolve() not in tiny_models.CACHE_DIR.resolve().parents
    monkeypatch.setenv(tiny_models.CACHE_ENV, str(tmp_path / "c"))
    assert tiny_models._cache_dir() == tmp_path / "c"
    monkeypatch.delenv(tiny_models.CACHE_ENV)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert tiny_models._cache_dir() == tmp_path / "x" / "tfg-nodes" / "tests"
