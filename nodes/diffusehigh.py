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
Flux all work. The stage loop and the guidance maths live in kernels/structure_guide.py; this module gives them
ComfyUI's VAE, latent format and sampler (`comfy.sample.sample`) as functions.

Inputs are declared once (nodes/inputs.py). Before anything is allocated: non-finite images/latents/conditioning,
stage sizes outside 32-16384 px per side, and a run that cannot fit the free memory (nodes/memory.py) are
refused with the node, the input and the fix.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from comfy_api.latest import io

from ..kernels import diffusehigh as K
from ..kernels import structure_guide as SG
from . import adapters, memory
from . import inputs as inp

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
# Inputs (one declaration each)
# ----------------------------------------------------------------------------------------------
def _samplers() -> list:
    import comfy.samplers
    return list(comfy.samplers.KSampler.SAMPLERS)


def _schedulers() -> list:
    import comfy.samplers
    return list(comfy.samplers.KSampler.SCHEDULERS)


def _tile_problem(value) -> str | None:
    return None if value == 0 or value >= 64 else f"must be 0 (no tiling) or at least 64 pixels, got {value}"


SOURCE_SOCKETS = [
    inp.Socket(io.Model.Input("model", tooltip="The diffusion model (SD1.x, SD2.x, SDXL, SD3 or Flux).")),
    inp.Socket(io.Conditioning.Input("positive", tooltip="Positive conditioning (the prompt of the image)."),
               finite=True),
    inp.Socket(io.Conditioning.Input("negative", tooltip="Negative conditioning."), finite=True),
    inp.Socket(io.Vae.Input("vae", tooltip="The model's VAE (encodes the upsampled image; decodes x0 in image mode).")),
    inp.Socket(io.Image.Input("image", optional=True,
                              tooltip="The low-resolution image to upscale (give this or `latent`). It should be "
                                      "clean: the guidance locks its structure in, defects included. A batch is "
                                      "upscaled image by image with the same settings."), finite=True),
    inp.Socket(io.Latent.Input("latent", optional=True,
                               tooltip="Alternatively a low-resolution LATENT (decoded with the VAE first; ignored, "
                                       "with a warning, when an image is connected)."), finite=True),
]

SAMPLER_INPUTS = [
    inp.Seed("seed", "Noise seed (stage i uses seed + i) and seed of the random sharpening sigma"),
    inp.Float("cfg", "CFG scale of the high-resolution steps. Use 1 for Flux-dev (guidance-distilled; set its "
              "guidance in the conditioning)", neutral="1 (no unconditional pass)",
              paper="10 for the SDXL stages (base image: 5)", min=0.0, max=100.0, step=0.1, round=0.01),
    inp.Choice("sampler_name", "Sampler of the high-resolution steps", _samplers,
               paper="euler (the reference's Euler step)"),
    inp.Choice("scheduler", "Schedule the steps are cut from. ddim_uniform over 50 steps = the reference's leading "
               "spacing (SD1.x/SDXL: t = 981, 961, ..., 1). Flux/SD3: simple also works", _schedulers,
               paper="leading spacing (= ddim_uniform)"),
    inp.Int("schedule_steps", "Length of the full schedule; a stage runs its last `steps` (KSamplerAdvanced "
            "start_at_step = schedule_steps - steps)", paper="50", min=1, max=1000),
    inp.Int("steps", "High-resolution steps per stage (the re-noise level): the last `steps` of the schedule. More = "
            "more change; at most schedule_steps", paper="15 of 50 = t 281 (sigma ~0.78) for SD1.x/SDXL",
            min=1, max=1000),
]

GUIDANCE_INPUTS = [
    inp.Int("guidance_steps", "Steps (from the first of the stage) whose predicted x0 gets the reference's low band "
            "(more than `steps` = every step)", neutral="0 (plain img2img, bit-identical)", paper="5 of 15",
            min=0, max=1000),
    inp.Choice("guidance_mode", "image: DWT of the decoded x0 in pixel space, re-encoded (a VAE decode + encode at "
               "the target size per guided step). latent: DWT of the latent x0 against the encoded reference "
               "(improvement: no VAE round trip, about the cost of plain img2img)", K.GUIDANCE_MODES,
               paper="image"),
    inp.Float("guidance_factor", "Weight of the reference low band: 1 = replace, in between = partial blend "
              "(improvement)", neutral="0 (off)", paper="1 (replace)", min=0.0, max=1.0, step=0.05),
    inp.Float("fadeout", "Fade the weight out over the guided steps: step i of K gets guidance_factor * "
              "(1 - fadeout * i / K)", neutral="0 (constant)", paper="0", min=0.0, max=1.0, step=0.05),
    inp.Choice("wavelet", "Wavelet of the DWT (symmetric extension)", K.WAVELETS, paper="db4"),
    inp.Int("dwt_levels", "DWT levels; only the coarsest approximation band is replaced, so more levels constrain "
            "less", paper="1", min=1, max=4),
]

VAE_TILE = inp.Int("vae_tile_size", "Encode/decode in tiles of this many pixels (overlap 1/4) when a side of the "
                   "image exceeds it (bounded VAE memory at large sizes); 0 = never (ComfyUI still falls back to "
                   "tiles when it runs out of memory)", paper="tiled (diffusers VAE tiling, 1024 px)",
                   min=0, max=8192, step=64, check=_tile_problem)

PIXEL_INPUTS = [
    inp.Float("sharpen_alpha", "Unsharp mask applied after upsampling: (1+a)*g - a*blur(g)", neutral="0",
              paper="1.0", min=0.0, max=10.0, step=0.05),
    inp.Float("sharpen_sigma", "Gaussian sigma of the unsharp mask (3x3 kernel). 0 = random in [0.1, 2.0] per stage "
              "like the reference, but seeded by `seed` (reproducible); > 0 = fixed",
              paper="random in [0.1, 2.0] per stage (unseeded)", min=0.0, max=10.0, step=0.05),
    VAE_TILE,
    inp.Choice("size_conditioning", "SDXL only: official = original/target size 1024x1024 at every stage (the "
               "reference); conditioning = as the conditioning says (ComfyUI default: the latent size). Ignored by "
               "other families", K.SIZE_CONDITIONING, paper="official"),
]

SIZE_INPUTS = [
    inp.Int("width", "Target width in pixels (rounded to 8). 0 = from scale_by (or from height, keeping the "
            "aspect)", min=0, max=K.MAX_STAGE_SIDE, step=8),
    inp.Int("height", "Target height in pixels (rounded to 8). 0 = from scale_by (or from width, keeping the "
            "aspect)", min=0, max=K.MAX_STAGE_SIDE, step=8),
    inp.Float("scale_by", "Used when width and height are 0: target = input size x scale_by", neutral="1",
              paper="x2 per stage (1024 -> 2048)", min=0.25, max=16.0, step=0.05),
]

STAGES = inp.Text("stages", "Comma-separated stage sizes, each relative to the previous: 'WxH' (that size), 'xF' "
                  "(previous size times F) or 'N' (long side N, aspect kept); sizes are rounded to 8. auto = from "
                  "the model family: SDXL '2048, 3072, 4096' (official), SD1.x/SD2.x 'x2' (512 -> 1024), SD3/Flux "
                  "'x2' (one stage; 4096² DiT attention is left to an explicit list)",
                  paper="SDXL '2048, 3072, 4096' (README 2K: '1536, 2048')", check=K.stage_spec_problem,
                  allowed="auto, or stage sizes such as '2048, 3072, 4096', 'x2' or '1536x1024'")

STEP_RULE = inp.Rule(("schedule_steps", "steps"), lambda schedule_steps, steps: None if steps <= schedule_steps else (
    f"steps ({steps}) must not exceed schedule_steps ({schedule_steps}): a stage runs the last `steps` of the "
    "schedule"))


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
# The guidance: the kernel's StructureGuide behind ComfyUI's post-CFG hook
# ----------------------------------------------------------------------------------------------
def codec_for(vae, latent_format, tile: int, check=None) -> SG.Codec:
    """The kernel's VAE/latent-space functions for ComfyUI's VAE (tiled above `tile` px) and latent format."""
    def encode(pixels):
        latent = vae_encode(vae, pixels.movedim(1, -1), tile)
        if check is not None:
            check(latent)
        return latent

    return SG.Codec(encode=encode, decode=lambda latent: vae_decode(vae, latent, tile).movedim(-1, 1).to(_device()),
                    to_model=latent_format.process_in, from_model=latent_format.process_out)


@dataclass(frozen=True, eq=False)
class PostCfgGuide:
    """sampler_post_cfg_function: the step index from the call's sigma against the run's own schedule, then the
    kernel's guide. Immutable; nothing persists between runs."""

    guide: SG.StructureGuide
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
        try:
            return self.guide(denoised, step)
        except SG.ReferenceMismatch as e:
            raise adapters.node_error(
                self.node, self.family, f"the reference does not fit the sampled {e.space} ({e}): the reference and "
                "the sampled latent differ in size or batch.",
                "give a reference image of the size being sampled (latent size x 8), one image or one per batch "
                "item.") from e


def install_guidance(model, guide: SG.StructureGuide, family: adapters.ModelFamily, node: str):
    """A clone of `model` with the guide appended to its post-CFG functions (chains with any others)."""
    m = model.clone()
    m.set_model_sampler_post_cfg_function(PostCfgGuide(guide, family, node))
    return m


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


def _to_pixels(image: torch.Tensor) -> torch.Tensor:
    """IMAGE (B, H, W, C) -> (B, 3, H, W) float32 on the compute device."""
    return image[..., :3].movedim(-1, 1).to(device=_device(), dtype=torch.float32)


def _latent_check(latent_format, family: adapters.ModelFamily, node: str):
    def check(latent: torch.Tensor) -> None:
        if latent.dim() != 4 or latent.shape[1] != latent_format.latent_channels:
            raise adapters.node_error(node, family, f"the VAE encodes to a latent of shape {tuple(latent.shape)}, but "
                                      f"the model samples {latent_format.latent_channels}-channel image latents.",
                                      "connect the VAE that belongs to this model.")
    return check


def prepare_stage(vae, image: torch.Tensor, size: tuple[int, int], params: K.DiffuseHighParams, seed: int,
                  stage: int):
    """Upsample (B, H, W, C) `image` to size (W, H), sharpen, encode. Returns (pixels (B, 3, H, W) float32 on
    the compute device, raw latent (B, C, h, w), sharpening sigma)."""
    codec = SG.Codec(encode=lambda px: vae_encode(vae, px.movedim(1, -1), params.vae_tile_size), decode=None)
    st = SG.prepare_stage(_to_pixels(image), size, params, seed, stage, codec)
    return st.pixels, st.latent, st.sharpen_sigma


def _stage_denoiser(model, positive, negative, params: K.DiffuseHighParams, seed: int, family, node: str,
                    progress, first_stage: int, offset: int):
    """The kernel's `denoise(stage, guide)`: ComfyUI's KSamplerAdvanced path over the stage's last steps (noise
    seed + stage index, add noise, start_at_step = schedule_steps - steps)."""
    import comfy.sample
    import comfy.utils

    def denoise(stage: SG.Stage, guide: SG.StructureGuide | None) -> torch.Tensor:
        sampled_model = model if guide is None else install_guidance(model, guide, family, node)
        stage_seed = int(seed) + int(stage.index)
        noise = comfy.sample.prepare_noise(stage.latent, stage_seed)
        callback = progress.callback(offset + (stage.index - first_stage) * params.steps)
        logger.info("%s %s [%s]: stage %d -> %dx%d, steps %d of %d (%s/%s), cfg %g, guidance %s x%d, sharpen "
                    "sigma %.3f", adapters.PACK_NAME, node, family.name, stage.index, stage.size[0], stage.size[1],
                    params.steps, params.schedule_steps, params.sampler_name, params.scheduler, params.cfg,
                    params.guidance_mode, params.guidance_steps if guide is not None else 0, stage.sharpen_sigma)
        return comfy.sample.sample(
            sampled_model, noise, params.schedule_steps, params.cfg, params.sampler_name, params.scheduler,
            size_conditioned(positive, family, params), size_conditioned(negative, family, params), stage.latent,
            denoise=1.0, start_step=params.start_step, last_step=params.schedule_steps, force_full_denoise=True,
            callback=callback, disable_pbar=not comfy.utils.PROGRESS_BAR_ENABLED, seed=stage_seed)

    return denoise


def run_stages(model, positive, negative, vae, image, sizes, params, seed, node, family=None, progress=None,
               first_stage: int = 0, offset: int = 0):
    """DiffuseHigh stages from IMAGE `image` (B, H, W, C): returns (IMAGE of the last stage, LATENT dict)."""
    if family is None:
        family = check_run(model, params, node)
    if progress is None:
        progress = _Progress(len(sizes) * params.steps, model)
    latent_format = model.get_model_object("latent_format")
    codec = codec_for(vae, latent_format, params.vae_tile_size, _latent_check(latent_format, family, node))
    denoise = _stage_denoiser(model, positive, negative, params, seed, family, node, progress, first_stage,
                              offset)
    with torch.no_grad():
        pixels, latent = SG.run_stages(_to_pixels(image), list(sizes), params, seed, codec, denoise,
                                       check=adapters.check_interrupt, first_stage=first_stage)
    import comfy.model_management
    return pixels.movedim(1, -1).to(comfy.model_management.intermediate_device()), {"samples": latent}


def run_stage(model, positive, negative, vae, image: torch.Tensor, size: tuple[int, int],
              params: K.DiffuseHighParams, seed: int, stage: int, family: adapters.ModelFamily, node: str,
              progress=None, offset: int = 0):
    """One DiffuseHigh stage (index `stage`: seed + stage): returns (image (B, H, W, 3) in [0, 1], raw latent)."""
    out, latent = run_stages(model, positive, negative, vae, image, [size], params, seed, node, family,
                             progress if progress is not None else _NoProgress(), first_stage=stage, offset=offset)
    return out, latent["samples"]


class _NoProgress:
    def callback(self, offset):
        return None


# ----------------------------------------------------------------------------------------------
# Checks before the run: source, sizes, memory
# ----------------------------------------------------------------------------------------------
def source_size(vae, image, latent, node: str, family: adapters.ModelFamily) -> tuple[int, int, int]:
    """(W, H, batch) of the source without decoding it (the image wins when both are connected)."""
    if image is not None:
        if latent is not None:
            logger.warning("%s %s [model family: %s]: both an image and a latent are connected; the image is "
                           "upscaled and the latent ignored.", adapters.PACK_NAME, node, family.name)
        if image.dim() != 4 or image.shape[0] < 1 or image.shape[-1] < 3:
            raise adapters.node_error(node, family, f"the image has shape {tuple(image.shape)}, not (batch, height, "
                                      "width, 3+).", "connect an RGB image.")
        return int(image.shape[2]), int(image.shape[1]), int(image.shape[0])
    if latent is None:
        raise adapters.node_error(node, family, "neither an image nor a latent is connected.",
                                  "connect the low-resolution IMAGE (or LATENT) to upscale.")
    samples = latent["samples"]
    if samples.dim() != 4:
        raise adapters.node_error(node, family, f"the latent is {samples.dim()}-D; DiffuseHigh upscales images.",
                                  "connect an image latent.")
    r = _ratio(vae)
    return int(samples.shape[3]) * r, int(samples.shape[2]) * r, int(samples.shape[0])


def source_image(vae, image, latent, node: str, family: adapters.ModelFamily) -> torch.Tensor:
    source_size(vae, image, latent, node, family)
    if image is not None:
        return image
    with torch.no_grad():
        return vae_decode(vae, latent["samples"], 0)


def check_sizes(sizes, node: str, family: adapters.ModelFamily, inputs: str, fix: str) -> None:
    for size in sizes:
        problem = K.size_problem(size)
        if problem:
            raise adapters.node_error(node, family, f"{problem} ({inputs}).", fix)


def estimate_memory(model, vae, batch: int, sizes, params: K.DiffuseHighParams) -> memory.Estimate:
    """What the largest stage needs: the stage image and its reference (held), the latents of the sampler, and the
    largest of ComfyUI's estimates of the UNet (one conditioning's rows: ComfyUI can split cond and uncond), the
    VAE decode/encode at the stage size (tiles when tiling applies; untiled, ComfyUI's own tiled fallback bounds
    it) and, in image mode, the pixel-space DWT of each guided step."""
    w, h = max(sizes, key=lambda s: s[0] * s[1])
    r = _ratio(vae)
    channels = model.get_model_object("latent_format").latent_channels
    lat = (batch, channels, max(h // r, 1), max(w // r, 1))
    canvas = memory.tensor_bytes((batch, 3, h, w))
    compute, unet = _device(), model.load_device
    vae_device = getattr(vae, "device", compute)
    est = memory.Estimate()
    est.hold(compute, f"stage image {w}x{h} x{batch} and its reference (fp32)", 2 * canvas)
    est.hold(unet, "sampler latents", 6 * memory.tensor_bytes(lat))
    est.phase(unet, f"UNet at {w}x{h} x{batch}", memory.model_activation_bytes(model, lat))
    tile = params.vae_tile_size
    if tile > 0 and max(w, h) > tile:
        t = max(tile // r, 8)
        dec = memory.vae_decode_bytes(vae, (1, channels, t, t))
        enc = memory.vae_encode_bytes(vae, (1, tile, tile, 3))
        how = f"tiles of {tile} px"
    else:
        dec = min(memory.vae_decode_bytes(vae, lat), memory.vae_decode_bytes(vae, (1, channels, 64, 64)))
        enc = min(memory.vae_encode_bytes(vae, (batch, h, w, 3)), memory.vae_encode_bytes(vae, (1, 512, 512, 3)))
        how = f"{w}x{h}"
    est.phase(vae_device, f"VAE decode ({how})", dec)
    est.phase(vae_device, f"VAE encode ({how})", enc)
    if params.guidance_mode == "image" and params.guidance_steps > 0 and params.guidance_factor > 0:
        est.phase(compute, "pixel-space DWT of a guided step", 4 * canvas)
    return est


MEMORY_FIX = ("use smaller stages or fewer images per batch, keep vae_tile_size on (e.g. 1024), use guidance_mode "
              "latent, or free memory on the device (other models, other programs).")


def check_run(model, params: K.DiffuseHighParams, node: str, samples: bool = True) -> adapters.ModelFamily:
    """Family and warnings before the run (ValueError naming node, family and fix); `samples` = the node samples
    with params.cfg itself (not the guidance-only patch). Params built outside the declarations are checked too."""
    family = adapters.detect_family(model)
    if samples:
        problems = params.validate()
        if problems:
            raise adapters.node_error(node, family, "; ".join(problems), "correct the inputs.")
    family = adapters.require_family(node, model, SUPPORTED)
    if samples and params.guidance_steps > params.steps:
        adapters.logger.warning("%s %s [model family: %s]: guidance_steps (%d) exceeds steps (%d): every step is "
                                "guided, so the result keeps the reference's low band exactly (official: 5 of 15).",
                                adapters.PACK_NAME, node, family.name, params.guidance_steps, params.steps)
    if samples and family.key == "flux" and params.cfg != 1.0:
        adapters.warn_once(f"diffusehigh.fluxcfg.{params.cfg}",
                           f"{adapters.PACK_NAME} {node} [model family: Flux]: cfg is {params.cfg}; Flux-dev is "
                           "guidance-distilled and is normally sampled at cfg 1 (its guidance is in the "
                           "conditioning). cfg > 1 doubles the passes and over-guides.")
    return family


def upscale(model, positive, negative, vae, image, latent, sizes_for, params: K.DiffuseHighParams, node: str,
            family: adapters.ModelFamily, inputs: str, size_fix: str):
    """The nodes' common run: sizes from the source size (no decode yet), size and memory checks, then stages."""
    w, h, batch = source_size(vae, image, latent, node, family)
    sizes = sizes_for((w, h))
    check_sizes(sizes, node, family, inputs, size_fix)
    memory.require(node, family, estimate_memory(model, vae, batch, sizes, params), MEMORY_FIX)
    src = source_image(vae, image, latent, node, family)
    return run_stages(model, positive, negative, vae, src, sizes, params, params.seed, node, family)


# ----------------------------------------------------------------------------------------------
# Nodes
# ----------------------------------------------------------------------------------------------
class DiffuseHigh(io.ComfyNode):
    """One DiffuseHigh stage."""

    INPUTS = inp.NodeInputs(NODE, [*SOURCE_SOCKETS, *SIZE_INPUTS, *SAMPLER_INPUTS, *GUIDANCE_INPUTS, *PIXEL_INPUTS],
                            rules=[STEP_RULE], defaults=DEFAULTS)
    validate_inputs = INPUTS.validator()

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="TFG_DiffuseHigh",
            display_name="DiffuseHigh (TFG)",
            category=CATEGORY,
            description=_DESCRIPTION + " This node runs one stage; chain it or use DiffuseHigh Progressive.",
            inputs=cls.INPUTS.schema(),
            outputs=_image_outputs(),
        )

    @classmethod
    def execute(cls, **values) -> io.NodeOutput:
        v = cls.INPUTS.checked(values)
        params = cls.INPUTS.params(v)
        family = check_run(v.model, params, NODE)
        out, lat = upscale(v.model, v.positive, v.negative, v.vae, v.image, v.latent,
                           lambda source: [K.target_size(v.width, v.height, source, v.scale_by, 8)], params, NODE,
                           family, f"width {v.width}, height {v.height}, scale_by {v.scale_by:g}",
                           f"set width/height (or scale_by) so that both sides are {K.MIN_STAGE_SIDE}-"
                           f"{K.MAX_STAGE_SIDE} px.")
        return io.NodeOutput(out, lat)


class DiffuseHighProgressive(io.ComfyNode):
    """Several DiffuseHigh stages, each upscaling the previous stage's output."""

    INPUTS = inp.NodeInputs(PROGRESSIVE_NODE, [*SOURCE_SOCKETS, STAGES, *SAMPLER_INPUTS, *GUIDANCE_INPUTS,
                                               *PIXEL_INPUTS], rules=[STEP_RULE], defaults=DEFAULTS)
    validate_inputs = INPUTS.validator()

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="TFG_DiffuseHighProgressive",
            display_name="DiffuseHigh Progressive (TFG)",
            category=CATEGORY,
            description=_DESCRIPTION + " This node runs several stages (stages auto: official SDXL 2048 -> 3072 -> "
                                       "4096; x2 for SD1.x/SD2.x, SD3 and Flux), each from the previous stage's "
                                       "decoded image; one progress bar over all steps.",
            inputs=cls.INPUTS.schema(),
            outputs=_image_outputs(),
        )

    @classmethod
    def execute(cls, **values) -> io.NodeOutput:
        v = cls.INPUTS.checked(values)
        params = cls.INPUTS.params(v)
        family = check_run(v.model, params, PROGRESSIVE_NODE)
        spec = K.resolve_stages(v.stages, family.key)

        def sizes_for(source):
            try:
                return K.plan_stages(spec, source, 8)
            except ValueError as e:
                raise adapters.node_error(PROGRESSIVE_NODE, family, f"stages: {e}.",
                                          "write e.g. 'auto', '2048, 3072, 4096' or 'x2'.") from e

        out, lat = upscale(v.model, v.positive, v.negative, v.vae, v.image, v.latent, sizes_for, params,
                           PROGRESSIVE_NODE, family, f"stages {spec!r}",
                           f"choose stages whose sizes are {K.MIN_STAGE_SIDE}-{K.MAX_STAGE_SIDE} px per side "
                           "for this input.")
        return io.NodeOutput(out, lat)


class DiffuseHighGuidance(io.ComfyNode):
    """The structure guidance alone, as a MODEL patch for KSampler-style img2img graphs."""

    INPUTS = inp.NodeInputs(GUIDANCE_NODE, [
        inp.Socket(io.Model.Input("model", tooltip="The model to patch.")),
        inp.Socket(io.Vae.Input("vae", tooltip="The model's VAE.")),
        inp.Socket(io.Image.Input("reference", tooltip="The upscaled (and optionally sharpened) reference image, at "
                                                       "the size being sampled; its low band is imposed."),
                   finite=True),
        *GUIDANCE_INPUTS,
        VAE_TILE,
    ], defaults=DEFAULTS)
    validate_inputs = INPUTS.validator()

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
            inputs=cls.INPUTS.schema(),
            outputs=[io.Model.Output(tooltip="The model with DiffuseHigh's structure guidance installed.")],
        )

    @classmethod
    def execute(cls, **values) -> io.NodeOutput:
        v = cls.INPUTS.checked(values)
        params = cls.INPUTS.params(v)
        model, vae, reference = v.model, v.vae, v.reference
        family = check_run(model, params, GUIDANCE_NODE, samples=False)
        if params.guidance_steps == 0 or params.guidance_factor == 0.0:
            adapters.logger.warning("%s %s [model family: %s]: guidance_steps is 0 or guidance_factor is 0, so the "
                                    "node does nothing.", adapters.PACK_NAME, GUIDANCE_NODE, family.name)
            return io.NodeOutput(model)
        w, h, batch = source_size(vae, reference, None, GUIDANCE_NODE, family)
        check_sizes([(w, h)], GUIDANCE_NODE, family, "reference",
                    f"connect a reference of {K.MIN_STAGE_SIDE}-{K.MAX_STAGE_SIDE} px per side.")
        memory.require(GUIDANCE_NODE, family, estimate_memory(model, vae, batch, [(w, h)], params), MEMORY_FIX)
        latent_format = model.get_model_object("latent_format")
        codec = codec_for(vae, latent_format, params.vae_tile_size,
                          _latent_check(latent_format, family, GUIDANCE_NODE))
        pixels = _to_pixels(reference)
        model_latent = None
        if params.guidance_mode == "latent":
            with torch.no_grad():
                model_latent = latent_format.process_in(codec.encode(pixels).float())
        guide = SG.StructureGuide(params, SG.reference_low_band(params, pixels, model_latent), codec)
        return io.NodeOutput(install_guidance(model, guide, family, GUIDANCE_NODE))


NODES = [DiffuseHigh, DiffuseHighProgressive, DiffuseHighGuidance]
