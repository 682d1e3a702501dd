"""DiffuseHigh nodes (arXiv 2406.18459): progressive high-resolution upscaling with DWT structure guidance.

* `TFG_DiffuseHigh`: one stage (IMAGE or LATENT in, upscaled IMAGE + LATENT out).
* `TFG_DiffuseHighProgressive`: several stages (official SDXL: 2048 -> 3072 -> 4096), each from the previous.
* `TFG_DiffuseHighGuidance`: the structure guidance alone as a MODEL patch, for KSampler(Advanced)-style
  img2img graphs (upsample + encode + sample yourself).

A stage = pixel-space bicubic upsample + unsharp mask, VAE encode, then ComfyUI's own KSampler path
(`comfy.sample.sample`) over the last `steps` of a `schedule_steps` schedule, exactly what KSamplerAdvanced does
with `start_at_step = schedule_steps - steps` (so with guidance off a stage is bit-identical to that img2img).
The guidance is a `sampler_post_cfg_function` (chainable, appended to the model's list): on the first
`guidance_steps` steps it replaces the low wavelet band of the CFG'd denoised prediction, which ComfyUI
computes as x0 for every model type (eps, v, and flow models: x0 = x - sigma * v), so SD1.x, SDXL, SD3 and
Flux all work.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from comfy_api.latest import io

from ..kernels import diffusehigh as K
from . import adapters

logger = logging.getLogger("tfg.diffusehigh")

DEFAULTS = K.DiffuseHighParams()
CATEGORY = "TFG/highres"
NODE = "DiffuseHigh"
PROGRESSIVE_NODE = "DiffuseHigh Progressive"
GUIDANCE_NODE = "DiffuseHigh Guidance"
SUPPORTED = ("sd1", "sd2", "sdxl", "sd3", "flux")

_DESCRIPTION = (
    "DiffuseHigh (Kim et al., arXiv 2406.18459, AAAI 2025): training-free high-resolution synthesis. The image is "
    "upsampled in pixel space (bicubic) and sharpened, encoded, re-noised to a moderate level (official SDXL: "
    "t=281 of 1000, the last 15 of 50 Euler steps) and denoised at CFG 10; during the first 5 steps the "
    "low-frequency wavelet band (db4 DWT) of the predicted clean image is replaced by the upsampled image's, "
    "which keeps the global structure while the model adds detail. Defaults are the official SDXL pipeline "
    "('image' guidance: a VAE decode+encode per guided step); 'latent' guidance (no VAE round trip), partial "
    "blending with fade-out, Haar/multi-level DWT, tiled VAE and any aspect ratio are improvements. Works on "
    "SD1.x, SD2.x, SDXL, SD3 and Flux (x0 from ComfyUI's denoised output, correct for flow models). Cost per "
    "stage: `steps` model evaluations (x2 with CFG) at the target size, plus in image mode 2 VAE passes at the "
    "target size per guided step."
)


# ----------------------------------------------------------------------------------------------
# Inputs
# ----------------------------------------------------------------------------------------------
def _sampler_inputs() -> list:
    import comfy.samplers
    return [
        io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True,
                     tooltip="Noise seed (stage i uses seed + i) and seed of the random sharpening sigma."),
        io.Float.Input("cfg", default=DEFAULTS.cfg, min=0.0, max=100.0, step=0.1, round=0.01,
                       tooltip="CFG scale of the high-resolution steps. Official SDXL: 10 (base image: 5). Use 1 "
                               "for Flux-dev (guidance-distilled; set its guidance in the conditioning)."),
        io.Combo.Input("sampler_name", options=list(comfy.samplers.KSampler.SAMPLERS), default=DEFAULTS.sampler_name,
                       tooltip="Sampler of the high-resolution steps. Official: euler (the reference's Euler step)."),
        io.Combo.Input("scheduler", options=list(comfy.samplers.KSampler.SCHEDULERS), default=DEFAULTS.scheduler,
                       tooltip="Schedule the steps are cut from. ddim_uniform over 50 steps = the reference's "
                               "leading spacing (SD1.x/SDXL: t = 981, 961, ..., 1). Flux/SD3: simple also works."),
        io.Int.Input("schedule_steps", default=DEFAULTS.schedule_steps, min=1, max=1000,
                     tooltip="Length of the full schedule; a stage runs its last `steps` (KSamplerAdvanced "
                             "start_at_step = schedule_steps - steps). Official: 50."),
        io.Int.Input("steps", default=DEFAULTS.steps, min=1, max=1000,
                     tooltip="High-resolution steps per stage (the re-noise level): the last `steps` of the "
                             "schedule. Official: 15 of 50 = t 281 (sigma ~0.78) for SD1.x/SDXL. More = more change."),
    ]


def _guidance_inputs() -> list:
    return [
        io.Int.Input("guidance_steps", default=DEFAULTS.guidance_steps, min=0, max=1000,
                     tooltip="Steps (from the first of the stage) whose predicted x0 gets the reference's low "
                             "band (more than `steps` = every step). Neutral: 0 (plain img2img, bit-identical). "
                             "Official: 5 of 15."),
        io.Combo.Input("guidance_mode", options=list(K.GUIDANCE_MODES), default=DEFAULTS.guidance_mode,
                       tooltip="image: DWT of the decoded x0 in pixel space, re-encoded (official; a VAE decode + "
                               "encode at the target size per guided step). latent: DWT of the latent x0 against "
                               "the encoded reference (improvement: no VAE round trip, about the cost of plain "
                               "img2img)."),
        io.Float.Input("guidance_factor", default=DEFAULTS.guidance_factor, min=0.0, max=1.0, step=0.05,
                       tooltip="Weight of the reference low band: 1 = replace (official), 0 = off (neutral), in "
                               "between = partial blend (improvement)."),
        io.Float.Input("fadeout", default=DEFAULTS.fadeout, min=0.0, max=1.0, step=0.05,
                       tooltip="Fade the weight out over the guided steps: step i of K gets guidance_factor * "
                               "(1 - fadeout * i / K). Official/neutral: 0 (constant)."),
        io.Combo.Input("wavelet", options=list(K.WAVELETS), default=DEFAULTS.wavelet,
                       tooltip="Wavelet of the DWT (symmetric extension). Official: db4."),
        io.Int.Input("dwt_levels", default=DEFAULTS.dwt_levels, min=1, max=4,
                     tooltip="DWT levels; only the coarsest approximation band is replaced, so more levels "
                             "constrain less. Official: 1."),
    ]


def _pixel_inputs() -> list:
    return [
        io.Float.Input("sharpen_alpha", default=DEFAULTS.sharpen_alpha, min=0.0, max=10.0, step=0.05,
                       tooltip="Unsharp mask applied after upsampling: (1+a)*g - a*blur(g). Neutral: 0. "
                               "Official: 1.0."),
        io.Float.Input("sharpen_sigma", default=DEFAULTS.sharpen_sigma, min=0.0, max=10.0, step=0.05,
                       tooltip="Gaussian sigma of the unsharp mask (3x3 kernel). 0 = random in [0.1, 2.0] per "
                               "stage like the reference, but seeded by `seed` (reproducible); > 0 = fixed."),
        io.Int.Input("vae_tile_size", default=DEFAULTS.vae_tile_size, min=0, max=8192, step=64,
                     tooltip="Encode/decode in tiles of this many pixels (overlap 1/4) when a side of the image "
                             "exceeds it (bounded VAE memory at large sizes); 0 = never. The reference tiles "
                             "(diffusers VAE tiling, 1024 px)."),
        io.Combo.Input("size_conditioning", options=list(K.SIZE_CONDITIONING), default=DEFAULTS.size_conditioning,
                       tooltip="SDXL only: official = original/target size 1024x1024 at every stage (the "
                               "reference); conditioning = as the conditioning says (ComfyUI default: the latent "
                               "size). Ignored by other families."),
    ]


def _source_inputs() -> list:
    return [
        io.Model.Input("model", tooltip="The diffusion model (SD1.x, SD2.x, SDXL, SD3 or Flux)."),
        io.Conditioning.Input("positive", tooltip="Positive conditioning (the prompt of the image)."),
        io.Conditioning.Input("negative", tooltip="Negative conditioning."),
        io.Vae.Input("vae", tooltip="The model's VAE (encodes the upsampled image; decodes x0 in image mode)."),
        io.Image.Input("image", optional=True,
                       tooltip="The low-resolution image to upscale (give this or `latent`). It should be clean: "
                               "the guidance locks its structure in, defects included."),
        io.Latent.Input("latent", optional=True,
                        tooltip="Alternatively a low-resolution LATENT (decoded with the VAE first; ignored when "
                                "an image is connected)."),
    ]


def _image_outputs() -> list:
    return [io.Image.Output(display_name="image", tooltip="The upscaled image (last stage)."),
            io.Latent.Output(display_name="latent", tooltip="The last stage's latent.")]


# ----------------------------------------------------------------------------------------------
# VAE helpers (tiled above the tile size)
# ----------------------------------------------------------------------------------------------
def _ratio(vae) -> int:
    r = getattr(vae, "downscale_ratio", 8)
    return int(r) if isinstance(r, (int, float)) else 8


def vae_decode(vae, latent: torch.Tensor, tile: int) -> torch.Tensor:
    """(B, C, h, w) raw VAE latent -> (B, H, W, 3) image in [0, 1]."""
    r = _ratio(vae)
    if tile > 0 and max(latent.shape[-2:]) * r > tile:
        t = max(tile // r, 8)
        return vae.decode_tiled(latent, tile_x=t, tile_y=t, overlap=max(t // 4, 1))[..., :3]
    return vae.decode(latent)[..., :3]


def vae_encode(vae, image: torch.Tensor, tile: int) -> torch.Tensor:
    """(B, H, W, 3) image -> raw VAE latent (B, C, h, w)."""
    if tile > 0 and max(image.shape[1:3]) > tile:
        return vae.encode_tiled(image, tile_x=tile, tile_y=tile, overlap=max(tile // 4, 8))
    return vae.encode(image)


# ----------------------------------------------------------------------------------------------
# The guidance
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class StructureGuide:
    """What one stage's guidance needs: the reference low band (pixel or latent space) and how to get to it.
    Immutable; the step index comes from each call's sigma against the run's own schedule."""

    params: K.DiffuseHighParams
    reference_low: torch.Tensor
    """Low band of the reference: (B, 3, h, w) of the image in [0, 1] (image mode) or of the process_in'd
    latent (latent mode)."""
    vae: object
    latent_format: object
    family: adapters.ModelFamily
    node: str

    def __call__(self, args: dict) -> torch.Tensor:
        denoised = args["denoised"]
        sigmas = adapters.sample_sigmas_of(args["model_options"])
        step = adapters.step_index(args["sigma"], sigmas)
        if step < 0:
            adapters.warn_once(f"diffusehigh.nosigmas.{self.node}",
                               f"{adapters.PACK_NAME} {self.node} [model family: {self.family.name}]: the sampler did "
                               "not publish its schedule, so the guided steps cannot be found and NO structure "
                               "guidance is applied. Use a KSampler/SamplerCustom node of ComfyUI >= 0.3.64.")
            return denoised
        weight = self.params.guidance_weight(step)
        if weight == 0.0:
            return denoised
        return self.guide(denoised, weight)

    def guide(self, denoised: torch.Tensor, weight: float) -> torch.Tensor:
        p = self.params
        if p.guidance_mode == "latent":
            return self._replace(denoised, weight, "latent")
        latent = self.latent_format.process_out(denoised.float())
        with torch.no_grad():
            image = vae_decode(self.vae, latent, p.vae_tile_size)
            pixels = image.movedim(-1, 1).to(device=denoised.device, dtype=torch.float32)
            pixels = self._replace(pixels, weight, "image")
            encoded = vae_encode(self.vae, pixels.movedim(1, -1), p.vae_tile_size)
        return self.latent_format.process_in(encoded.float()).to(device=denoised.device, dtype=denoised.dtype)

    def _replace(self, x: torch.Tensor, weight: float, space: str) -> torch.Tensor:
        p = self.params
        try:
            return K.replace_low_band(x, self.reference_low, weight, p.wavelet, p.dwt_levels)
        except ValueError as e:
            raise adapters.node_error(
                self.node, self.family, f"the reference does not fit the sampled {space} ({e}): the reference and "
                "the sampled latent differ in size or batch.",
                "give a reference image of the size being sampled (latent size x 8), one image or one per batch "
                "item.") from e


def install_guidance(model, guide: StructureGuide):
    """A clone of `model` with the guide appended to its post-CFG functions (chains with any others)."""
    m = model.clone()
    m.set_model_sampler_post_cfg_function(guide)
    return m


def reference_for(mode: str, pixels: torch.Tensor, latent_raw: torch.Tensor, latent_format,
                  params: K.DiffuseHighParams) -> torch.Tensor:
    """The reference low band for a guidance mode, from the sharpened image (B, 3, H, W) or its raw latent."""
    if mode == "latent":
        return K.reference_low_band(latent_format.process_in(latent_raw.float()), params.wavelet, params.dwt_levels)
    return K.reference_low_band(pixels, params.wavelet, params.dwt_levels)


# ----------------------------------------------------------------------------------------------
# Stages
# ----------------------------------------------------------------------------------------------
class _Progress:
    """One progress bar over all stages' steps, with the sampler's latent previews; interrupts honoured."""

    def __init__(self, total: int, model):
        self.progress = adapters.StepProgress(total)
        self.previewer = None
        try:
            import latent_preview
            self.previewer = latent_preview.get_previewer(model.load_device, model.model.latent_format)
        except Exception:  # noqa: BLE001  previews are optional (headless, unknown latent formats)
            self.previewer = None

    def callback(self, offset: int):
        def cb(step, x0, x, total_steps):
            adapters.check_interrupt()
            preview = None
            if self.previewer is not None:
                try:
                    preview = self.previewer.decode_latent_to_preview_image("JPEG", x0)
                except Exception:  # noqa: BLE001
                    preview = None
            p = self.progress
            p.done = min(offset + step + 1, p.total)
            p.bar.update_absolute(p.done, p.total, preview)
        return cb


def size_conditioned(conditioning, family: adapters.ModelFamily, params: K.DiffuseHighParams):
    if family.key != "sdxl" or params.size_conditioning != "official":
        return conditioning
    import node_helpers
    s = K.OFFICIAL_SIZE
    return node_helpers.conditioning_set_values(conditioning, {"width": s, "height": s, "target_width": s,
                                                               "target_height": s, "crop_w": 0, "crop_h": 0})


def _device():
    import comfy.model_management
    return comfy.model_management.get_torch_device()


def prepare_stage(vae, image: torch.Tensor, size: tuple[int, int], params: K.DiffuseHighParams, seed: int,
                  stage: int):
    """Upsample (B, H, W, C) `image` to size (W, H), sharpen, encode. Returns (pixels (B, 3, H, W) float32 on
    the compute device, raw latent (B, C, h, w), sharpening sigma)."""
    w, h = size
    pixels = image[..., :3].movedim(-1, 1).to(device=_device(), dtype=torch.float32)
    pixels = K.upsample(pixels, (h, w))
    sigma = params.sharpen_sigma if params.sharpen_sigma > 0 else K.draw_sharpen_sigma(seed, stage)
    pixels = K.sharpen(pixels, params.sharpen_alpha, params.sharpen_kernel, sigma)
    with torch.no_grad():
        latent = vae_encode(vae, pixels.movedim(1, -1), params.vae_tile_size)
    return pixels, latent, sigma


def run_stage(model, positive, negative, vae, image: torch.Tensor, size: tuple[int, int],
              params: K.DiffuseHighParams, seed: int, stage: int, family: adapters.ModelFamily, node: str,
              progress: _Progress | None = None, offset: int = 0):
    """One DiffuseHigh stage: returns (image (B, H, W, 3) in [0, 1], raw latent)."""
    import comfy.sample
    import comfy.utils
    pixels, latent, sigma = prepare_stage(vae, image, size, params, seed, stage)
    adapters.check_interrupt()
    latent_format = model.get_model_object("latent_format")
    if latent.dim() != 4 or latent.shape[1] != latent_format.latent_channels:
        raise adapters.node_error(node, family, f"the VAE encodes to a latent of shape {tuple(latent.shape)}, but the "
                                  f"model samples {latent_format.latent_channels}-channel image latents.",
                                  "connect the VAE that belongs to this model.")
    sampled_model = model
    if params.guidance_steps > 0 and params.guidance_factor > 0:
        guide = StructureGuide(params, reference_for(params.guidance_mode, pixels, latent, latent_format, params),
                               vae, latent_format, family, node)
        sampled_model = install_guidance(model, guide)
    del pixels
    stage_seed = int(seed) + int(stage)
    noise = comfy.sample.prepare_noise(latent, stage_seed)
    callback = progress.callback(offset) if progress is not None else None
    logger.info("%s %s [%s]: stage %d -> %dx%d, steps %d of %d (%s/%s), cfg %g, guidance %s x%d, sharpen "
                "sigma %.3f", adapters.PACK_NAME, node, family.name, stage, size[0], size[1], params.steps,
                params.schedule_steps, params.sampler_name, params.scheduler, params.cfg, params.guidance_mode,
                params.guidance_steps, sigma)
    samples = comfy.sample.sample(
        sampled_model, noise, params.schedule_steps, params.cfg, params.sampler_name, params.scheduler,
        size_conditioned(positive, family, params), size_conditioned(negative, family, params), latent,
        denoise=1.0, start_step=params.start_step, last_step=params.schedule_steps, force_full_denoise=True,
        callback=callback, disable_pbar=not comfy.utils.PROGRESS_BAR_ENABLED, seed=stage_seed)
    adapters.check_interrupt()
    with torch.no_grad():
        out = vae_decode(vae, samples, params.vae_tile_size)
    return out, samples


def source_image(vae, image, latent, node: str, family: adapters.ModelFamily) -> torch.Tensor:
    if image is not None:
        return image
    if latent is None:
        raise adapters.node_error(node, family, "neither an image nor a latent is connected.",
                                  "connect the low-resolution IMAGE (or LATENT) to upscale.")
    samples = latent["samples"]
    if samples.dim() != 4:
        raise adapters.node_error(node, family, f"the latent is {samples.dim()}-D; DiffuseHigh upscales images.",
                                  "connect an image latent.")
    with torch.no_grad():
        return vae_decode(vae, samples, 0)


def check_run(model, params: K.DiffuseHighParams, node: str, samples: bool = True) -> adapters.ModelFamily:
    """Validate before the run (ValueError naming node, family and fix); `samples` = the node samples with
    params.cfg itself (not the guidance-only patch)."""
    problems = params.validate()
    family = adapters.detect_family(model)
    if problems:
        raise adapters.node_error(node, family, "; ".join(problems), "correct the inputs.")
    family = adapters.require_family(node, model, SUPPORTED)
    if params.guidance_steps > params.steps:
        adapters.logger.warning("%s %s [model family: %s]: guidance_steps (%d) exceeds steps (%d): every step is "
                                "guided, so the result keeps the reference's low band exactly (official: 5 of 15).",
                                adapters.PACK_NAME, node, family.name, params.guidance_steps, params.steps)
    if samples and family.key == "flux" and params.cfg != 1.0:
        adapters.warn_once(f"diffusehigh.fluxcfg.{params.cfg}",
                           f"{adapters.PACK_NAME} {node} [model family: Flux]: cfg is {params.cfg}; Flux-dev is "
                           "guidance-distilled and is normally sampled at cfg 1 (its guidance is in the "
                           "conditioning). cfg > 1 doubles the passes and over-guides.")
    return family


def run_stages(model, positive, negative, vae, image, sizes, params, seed, node, family=None):
    if family is None:
        family = check_run(model, params, node)
    progress = _Progress(len(sizes) * params.steps, model)
    latent = None
    for i, size in enumerate(sizes):
        image, latent = run_stage(model, positive, negative, vae, image, size, params, seed, i, family, node,
                                  progress, offset=i * params.steps)
    return image, {"samples": latent}


def _params(**values) -> K.DiffuseHighParams:
    return DEFAULTS.replace(**values)


def _validate(**values):
    problems = _params(**values).validate()
    return True if not problems else "; ".join(problems)


# ----------------------------------------------------------------------------------------------
# Nodes
# ----------------------------------------------------------------------------------------------
class DiffuseHigh(io.ComfyNode):
    """One DiffuseHigh stage."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="TFG_DiffuseHigh",
            display_name="DiffuseHigh (TFG)",
            category=CATEGORY,
            description=_DESCRIPTION + " This node runs one stage; chain it or use DiffuseHigh Progressive.",
            inputs=_source_inputs() + [
                io.Int.Input("width", default=0, min=0, max=16384, step=8,
                             tooltip="Target width in pixels (rounded to 8). 0 = from scale_by (or from height, "
                                     "keeping the aspect)."),
                io.Int.Input("height", default=0, min=0, max=16384, step=8,
                             tooltip="Target height in pixels (rounded to 8). 0 = from scale_by (or from width, "
                                     "keeping the aspect)."),
                io.Float.Input("scale_by", default=DEFAULTS.scale_by, min=0.25, max=16.0, step=0.05,
                               tooltip="Used when width and height are 0: target = input size x scale_by. Paper: "
                                       "x2 per stage (1024 -> 2048)."),
            ] + _sampler_inputs() + _guidance_inputs() + _pixel_inputs(),
            outputs=_image_outputs(),
        )

    @classmethod
    def validate_inputs(cls, cfg, schedule_steps, steps, guidance_steps, guidance_factor, fadeout, dwt_levels,
                        sharpen_alpha, sharpen_sigma, vae_tile_size, scale_by):
        return _validate(cfg=cfg, schedule_steps=schedule_steps, steps=steps, guidance_steps=guidance_steps,
                         guidance_factor=guidance_factor, fadeout=fadeout, dwt_levels=dwt_levels,
                         sharpen_alpha=sharpen_alpha, sharpen_sigma=sharpen_sigma, vae_tile_size=vae_tile_size,
                         scale_by=scale_by)

    @classmethod
    def execute(cls, model, positive, negative, vae, width, height, scale_by, seed, cfg, sampler_name, scheduler,
                schedule_steps, steps, guidance_steps, guidance_mode, guidance_factor, fadeout, wavelet, dwt_levels,
                sharpen_alpha, sharpen_sigma, vae_tile_size, size_conditioning, image=None,
                latent=None) -> io.NodeOutput:
        params = _params(cfg=cfg, sampler_name=sampler_name, scheduler=scheduler, schedule_steps=schedule_steps,
                         steps=steps, guidance_steps=guidance_steps, guidance_mode=guidance_mode,
                         guidance_factor=guidance_factor, fadeout=fadeout, wavelet=wavelet, dwt_levels=dwt_levels,
                         sharpen_alpha=sharpen_alpha, sharpen_sigma=sharpen_sigma, vae_tile_size=vae_tile_size,
                         size_conditioning=size_conditioning, scale_by=scale_by)
        family = check_run(model, params, NODE)
        src = source_image(vae, image, latent, NODE, family)
        size = K.target_size(width, height, (src.shape[2], src.shape[1]), scale_by, 8)
        out, lat = run_stages(model, positive, negative, vae, src, [size], params, seed, NODE, family)
        return io.NodeOutput(out, lat)


class DiffuseHighProgressive(io.ComfyNode):
    """Several DiffuseHigh stages, each upscaling the previous stage's output."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="TFG_DiffuseHighProgressive",
            display_name="DiffuseHigh Progressive (TFG)",
            category=CATEGORY,
            description=_DESCRIPTION + " This node runs several stages (official SDXL: 2048 -> 3072 -> 4096), each "
                                       "from the previous stage's decoded image; one progress bar over all steps.",
            inputs=_source_inputs() + [
                io.String.Input("stages", default=DEFAULTS.stages, multiline=False,
                                tooltip="Comma-separated stage sizes, each relative to the previous: 'WxH' (that "
                                        "size), 'xF' (previous size times F) or 'N' (long side N, aspect kept). "
                                        "Official SDXL: '2048, 3072, 4096' (README 2K: '1536, 2048'). SD1.5: "
                                        "'x2'. Sizes are rounded to 8."),
            ] + _sampler_inputs() + _guidance_inputs() + _pixel_inputs(),
            outputs=_image_outputs(),
        )

    @classmethod
    def validate_inputs(cls, stages, cfg, schedule_steps, steps, guidance_steps, guidance_factor, fadeout,
                        dwt_levels, sharpen_alpha, sharpen_sigma, vae_tile_size):
        try:
            K.plan_stages(stages, (1024, 1024))
        except ValueError as e:
            return f"stages: {e}"
        return _validate(cfg=cfg, schedule_steps=schedule_steps, steps=steps, guidance_steps=guidance_steps,
                         guidance_factor=guidance_factor, fadeout=fadeout, dwt_levels=dwt_levels,
                         sharpen_alpha=sharpen_alpha, sharpen_sigma=sharpen_sigma, vae_tile_size=vae_tile_size)

    @classmethod
    def execute(cls, model, positive, negative, vae, stages, seed, cfg, sampler_name, scheduler, schedule_steps,
                steps, guidance_steps, guidance_mode, guidance_factor, fadeout, wavelet, dwt_levels, sharpen_alpha,
                sharpen_sigma, vae_tile_size, size_conditioning, image=None, latent=None) -> io.NodeOutput:
        params = _params(cfg=cfg, sampler_name=sampler_name, scheduler=scheduler, schedule_steps=schedule_steps,
                         steps=steps, guidance_steps=guidance_steps, guidance_mode=guidance_mode,
                         guidance_factor=guidance_factor, fadeout=fadeout, wavelet=wavelet, dwt_levels=dwt_levels,
                         sharpen_alpha=sharpen_alpha, sharpen_sigma=sharpen_sigma, vae_tile_size=vae_tile_size,
                         size_conditioning=size_conditioning, stages=stages)
        family = check_run(model, params, PROGRESSIVE_NODE)
        src = source_image(vae, image, latent, PROGRESSIVE_NODE, family)
        try:
            sizes = K.plan_stages(stages, (src.shape[2], src.shape[1]), 8)
        except ValueError as e:
            raise adapters.node_error(PROGRESSIVE_NODE, family, f"stages: {e}.", "write e.g. '2048, 3072, 4096'.")
        out, lat = run_stages(model, positive, negative, vae, src, sizes, params, seed, PROGRESSIVE_NODE, family)
        return io.NodeOutput(out, lat)


class DiffuseHighGuidance(io.ComfyNode):
    """The structure guidance alone, as a MODEL patch for KSampler-style img2img graphs."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="TFG_DiffuseHighGuidance",
            display_name="DiffuseHigh Guidance (TFG)",
            category=CATEGORY,
            description=_DESCRIPTION.split(" Defaults are")[0] + (
                " This MODEL patch installs only the structure guidance, for your own img2img graph: upscale the "
                "image to the target size (e.g. Upscale Image, bicubic), VAE Encode it, and sample with "
                "KSamplerAdvanced (official: euler, ddim_uniform, 50 steps, start_at_step 35, cfg 10). Connect the "
                "same upscaled image here as the reference. Chainable with other post-CFG patches. Works on SD1.x, "
                "SD2.x, SDXL, SD3 and Flux. Cost: none in latent mode beyond two DWTs per guided step; image mode "
                "adds a VAE decode + encode per guided step."),
            inputs=[
                io.Model.Input("model", tooltip="The model to patch."),
                io.Vae.Input("vae", tooltip="The model's VAE."),
                io.Image.Input("reference", tooltip="The upscaled (and optionally sharpened) reference image, at the "
                                                    "size being sampled; its low band is imposed."),
            ] + _guidance_inputs() + [
                io.Int.Input("vae_tile_size", default=DEFAULTS.vae_tile_size, min=0, max=8192, step=64,
                             tooltip="Tiled VAE (pixels) above this side length; 0 = never."),
            ],
            outputs=[io.Model.Output(tooltip="The model with DiffuseHigh's structure guidance installed.")],
        )

    @classmethod
    def validate_inputs(cls, guidance_steps, guidance_factor, fadeout, dwt_levels, vae_tile_size):
        return _validate(guidance_steps=guidance_steps, guidance_factor=guidance_factor, fadeout=fadeout,
                         dwt_levels=dwt_levels, vae_tile_size=vae_tile_size, steps=max(DEFAULTS.steps, guidance_steps),
                         schedule_steps=max(DEFAULTS.schedule_steps, guidance_steps))

    @classmethod
    def execute(cls, model, vae, reference, guidance_steps, guidance_mode, guidance_factor, fadeout, wavelet,
                dwt_levels, vae_tile_size) -> io.NodeOutput:
        params = DEFAULTS.replace(guidance_steps=guidance_steps, guidance_mode=guidance_mode,
                                  guidance_factor=guidance_factor, fadeout=fadeout, wavelet=wavelet,
                                  dwt_levels=dwt_levels, vae_tile_size=vae_tile_size,
                                  steps=max(DEFAULTS.steps, guidance_steps),
                                  schedule_steps=max(DEFAULTS.schedule_steps, guidance_steps))
        family = check_run(model, params, GUIDANCE_NODE, samples=False)
        if guidance_steps == 0 or guidance_factor == 0.0:
            adapters.logger.warning("%s %s [model family: %s]: guidance_steps is 0 or guidance_factor is 0, so the "
                                    "node does nothing.", adapters.PACK_NAME, GUIDANCE_NODE, family.name)
            return io.NodeOutput(model)
        latent_format = model.get_model_object("latent_format")
        pixels = reference[..., :3].movedim(-1, 1).to(device=_device(), dtype=torch.float32)
        latent = None
        if guidance_mode == "latent":
            with torch.no_grad():
                latent = vae_encode(vae, reference[..., :3], vae_tile_size)
        low = reference_for(guidance_mode, pixels, latent, latent_format, params)
        guide = StructureGuide(params, low, vae, latent_format, family, GUIDANCE_NODE)
        return io.NodeOutput(install_guidance(model, guide))


NODES = [DiffuseHigh, DiffuseHighProgressive, DiffuseHighGuidance]
