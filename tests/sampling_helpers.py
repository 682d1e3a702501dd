"""Shared in-process sampling helpers for node tests: tiny models per family, ComfyUI's KSampler and
SamplerCustomAdvanced paths, and a model-pass counter."""
from __future__ import annotations

import torch

FAMILIES = ["sd15", "sdxl", "sd3", "flux"]  # the `setup` fixture in conftest.py covers these
STEPS = 4


class Setup:
    def __init__(self, family, model, positive, negative, latent_channels):
        self.family, self.model, self.positive, self.negative = family, model, positive, negative
        self.latent_channels = latent_channels

    def latent(self, batch=1, size=8):
        return torch.zeros(batch, self.latent_channels, size, size)


_setups: dict[str, Setup] = {}


def get_setup(family: str, tmp_path_factory) -> Setup:
    if family in _setups:
        return _setups[family]
    import tiny_models
    import comfy.sd
    import nodes
    if family == "sd15":
        path = tiny_models.write_tiny_sd15_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny_sd15.safetensors")
        model, clip, _vae = comfy.sd.load_checkpoint_guess_config(str(path), output_vae=True, output_clip=True)[:3]
    elif family == "sdxl":
        model, clip, _vae = tiny_models.build_tiny_sdxl()
    elif family == "flux":
        model, clip, _vae = tiny_models.build_tiny_flux()
    elif family == "sd3":
        path = tiny_models.write_tiny_sd3_file(tmp_path_factory.mktemp("sd3") / "tiny_sd3.safetensors")
        model, clip, _vae = tiny_models.load_tiny_sd3(path)
    else:
        raise ValueError(family)
    with torch.inference_mode():
        positive = nodes.CLIPTextEncode().encode(clip, "a red fox in the snow")[0]
        negative = nodes.CLIPTextEncode().encode(clip, "blurry")[0]
    channels = model.get_model_object("latent_format").latent_channels
    _setups[family] = Setup(family, model, positive, negative, channels)
    return _setups[family]


def with_counter(model):
    """Clone that counts network rows per pass kind: {"cond": n, "uncond": n, "calls": n}."""
    import comfy.patcher_extension
    counts = {"cond": 0, "uncond": 0, "calls": 0}

    def apply_model(executor, x, t, *args, **kwargs):
        transformer_options = kwargs.get("transformer_options", args[3] if len(args) > 3 else {})
        kinds = transformer_options.get("cond_or_uncond", [0])
        per_chunk = x.shape[0] // len(kinds)
        for k in kinds:
            counts["uncond" if k == 1 else "cond"] += per_chunk
        counts["calls"] += 1
        return executor(x, t, *args, **kwargs)

    m = model.clone()
    m.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, "test.counter", apply_model)
    return m, counts


def ksample(s: Setup, model, cfg=5.0, seed=7, batch=1, sampler="euler", scheduler="normal", steps=STEPS):
    import nodes
    with torch.inference_mode():
        out = nodes.common_ksampler(model, seed, steps, cfg, sampler, scheduler, s.positive, s.negative,
                                    {"samples": s.latent(batch)}, denoise=1.0)[0]["samples"]
    return out.clone()


def advanced_sample(s: Setup, guider, seed=7, steps=STEPS, sampler="euler"):
    import comfy.samplers
    from comfy_extras import nodes_custom_sampler as ncs
    sigmas = comfy.samplers.calculate_sigmas(s.model.get_model_object("model_sampling"), "normal", steps)
    noise = ncs.Noise_RandomNoise(seed)
    with torch.inference_mode():
        out = ncs.SamplerCustomAdvanced().sample(noise, guider, comfy.samplers.sampler_object(sampler), sigmas,
                                                 {"samples": s.latent()})[0]["samples"]
    return out.clone()
