"""ASGDiffusion node: a KSampler-style text-to-image sampler that generates at an integer multiple of the model's
native size with CutDiffusion's two stages and ASGDiffusion's masked, asynchronous structure guidance.

How it sits in ComfyUI: the node runs ComfyUI's own sampling path (`comfy.sample.sample_custom`, the guider, CFG,
the chosen sampler and scheduler) with a KSAMPLER whose function runs the chosen k-diffusion sampler twice:
over the structure-stage sigmas on the (B*K, C, h, w) dilated patches with `StructureDenoiser`, then over the
rest on the full latent with `DetailDenoiser` (kernels/asg.py). Every model evaluation goes through ComfyUI's
guider, so CFG, model patches and wrappers apply per patch/window batch.

Cross-attention mask (SD1.x/SD2.x/SDXL): for the structure stage only, attn2 replace patches on every output
(up-sampling) block transformer compute the attention output exactly as the host would (`optimized_attention`,
or the patch that was there before, chained) and, on the side, record the attention probabilities of the
conditional rows (kernels.asg.heat_from_attention). The patches live in a copy of the run's model_options, so
nothing outside this run sees them. Flux/SD3 have no cross-attention layers (joint attention): mask="none"
(the paper's Eq. 3) works there, and mask="auto" (the default) picks it; mask="cross_attention" raises a clear
error.
"""
from __future__ import annotations

from typing import Any

import torch
from comfy_api.latest import io

import comfy.model_management
import comfy.sample
import comfy.samplers

from ..kernels import patches as P
from ..kernels.asg import (MASKS, MAX_SCALE, ASGParams, DetailDenoiser, StructureDenoiser, heat_from_attention,
                           patch_size, resize_map, resolve_mask, split_steps)
from . import adapters, memory
from . import inputs as inp

DEFAULTS = ASGParams()
NODE = "ASGDiffusion"
CATEGORY = "TFG/highres"
SUPPORTED = ("sd1", "sd2", "sdxl", "sd3", "flux")
CROSS_ATTENTION_FAMILIES = ("sd1", "sd2", "sdxl", "sd_unet")
_REFUSED_COND_KEYS = {"area": "area conditioning", "mask": "masked conditioning", "control": "a ControlNet",
                      "gligen": "GLIGEN"}

_DESCRIPTION = (
    "ASGDiffusion (Li et al., arXiv 2412.06163) on its CutDiffusion base (Lin et al., arXiv 2404.15141): "
    "text-to-image at an integer multiple of the model's native size without repeated objects. Structure stage "
    "(first structure_fraction of the steps): the target latent is read as K = scale_width x scale_height "
    "dilated native-size patches, all denoised in ONE batched model call per evaluation, "
    "with CutDiffusion's pixel interaction, and every patch's noise is pulled toward the key patch's (patch 0) "
    "noise where the patch's own cross-attention map (UNet up blocks) is high, using the key prediction of the "
    "previous evaluation (asynchronous, as the paper). Detail stage: overlapping native-size windows averaged "
    "per step (MultiDiffusion/CutDiffusion). No official code exists; choices are documented in the README. "
    "Models: SD1.x, SD2.x, SDXL (cross-attention mask); Flux and SD3 with the unmasked guidance (mask auto, the "
    "default, picks it; cross_attention is an error there). Cost: about the "
    "model evaluations of K native-size images per structure step plus one per window per detail step "
    "(2048x2048 SDXL: 4 patches, then 9 windows); memory of max(K, window_batch) native-size rows per call."
)


# ----------------------------------------------------------------------------------------------
# Family checks
# ----------------------------------------------------------------------------------------------
def resolve_family(model, params: ASGParams) -> adapters.ModelFamily:
    family = adapters.resolve_family(NODE, model, SUPPORTED, "this model family is not supported.",
                                     "use an SD1.x, SD2.x, SDXL, SD3 or Flux model.",
                                     "the SD1.x/SDXL cross-attention mask is used")
    params = with_resolved_mask(params, family)
    if params.mask == "cross_attention" and params.guidance_scale != 0.0 and \
            family.key not in CROSS_ATTENTION_FAMILIES:
        raise adapters.node_error(
            NODE, family, "mask=cross_attention needs the text cross-attention layers of a UNet's up-sampling "
                          "blocks; this model has joint attention (no separate cross-attention maps).",
            "set mask to auto or none (the paper's unmasked Eq. 3), or use an SD1.x/SD2.x/SDXL model.")
    return family


def with_resolved_mask(params: ASGParams, family: adapters.ModelFamily) -> ASGParams:
    """mask=auto -> cross_attention on the UNet families, none on SD3/Flux (joint attention)."""
    return params.replace(mask=resolve_mask(params.mask, family.key in CROSS_ATTENTION_FAMILIES))


def cross_attention_layers(model) -> list[tuple[int, int]]:
    """(output block id, transformer index) of every cross-attention transformer in the UNet's output blocks."""
    from comfy.ldm.modules.attention import SpatialTransformer
    net = model.get_model_object("diffusion_model")
    layers = []
    for block_id, block in enumerate(getattr(net, "output_blocks", [])):
        for module in block:
            if isinstance(module, SpatialTransformer):
                for index, tb in enumerate(module.transformer_blocks):
                    if getattr(tb, "attn2", None) is not None:
                        layers.append((block_id, index))
    return layers


def refuse_conditioning(conditioning, family) -> None:
    for entry in conditioning or []:
        extras = entry[1] if len(entry) > 1 and isinstance(entry[1], dict) else {}
        for key, what in _REFUSED_COND_KEYS.items():
            if extras.get(key) is not None:
                raise adapters.node_error(
                    NODE, family, f"the conditioning carries {what}, which is laid out for the whole target image; "
                                  "patches and windows are native-size crops, so it would be applied to the wrong "
                                  "pixels.", f"remove {what} from the conditioning for this node.")


# ----------------------------------------------------------------------------------------------
# Cross-attention heat maps (one recorder per run)
# ----------------------------------------------------------------------------------------------
class HeatRecorder:
    """Collects the conditional rows' cross-attention heat of the output blocks during one model evaluation."""

    def __init__(self, rows: int, size: tuple[int, int]):
        self.rows, self.size = rows, size
        self.sum: torch.Tensor | None = None
        self.layers = 0
        self.recorded_evaluations = 0
        self.skipped = 0

    def record(self, q: torch.Tensor, k: torch.Tensor, extra_options: dict) -> None:
        kinds = extra_options.get("cond_or_uncond") or [0]
        per = q.shape[0] // len(kinds)
        shape = extra_options.get("activations_shape")
        if per != self.rows or shape is None or shape[-1] * shape[-2] != q.shape[1]:
            self.skipped += 1
            return
        grid = (int(shape[-2]), int(shape[-1]))
        for i, kind in enumerate(kinds):
            if kind != 0:
                continue
            rows = slice(i * per, (i + 1) * per)
            heat = heat_from_attention(q[rows], k[rows], int(extra_options["n_heads"]))
            m = resize_map(heat, grid, self.size)
            self.sum = m if self.sum is None else self.sum + m
            self.layers += 1

    def take(self) -> torch.Tensor | None:
        out = None if self.sum is None else self.sum / self.layers
        if out is not None:
            self.recorded_evaluations += 1
        self.sum, self.layers = None, 0
        return out


def _attn2_patch(previous, recorder: HeatRecorder):
    def patch(q, k, v, extra_options):
        if previous is not None:
            out = previous(q, k, v, extra_options)
        else:
            from comfy.ldm.modules import attention
            out = attention.optimized_attention(q, k, v, extra_options["n_heads"],
                                                attn_precision=extra_options.get("attn_precision"),
                                                transformer_options=extra_options)
        recorder.record(q, k, extra_options)
        return out
    return patch


def with_heat_patches(model_options: dict, layers: list[tuple[int, int]], recorder: HeatRecorder) -> dict:
    """A copy of model_options with the recording attn2 replace patches (chained to any patch already there)."""
    options = dict(model_options)
    to = dict(options.get("transformer_options", {}))
    replace = dict(to.get("patches_replace", {}))
    attn2 = dict(replace.get("attn2", {}))
    for block_id, index in layers:
        key = ("output", block_id, index)
        previous = attn2.get(key, attn2.get(("output", block_id)))
        attn2[key] = _attn2_patch(previous, recorder)
    replace["attn2"] = attn2
    to["patches_replace"] = replace
    options["transformer_options"] = to
    return options


# ----------------------------------------------------------------------------------------------
# The sampler
# ----------------------------------------------------------------------------------------------
class RunStats:
    """What one run did (returned to callers and logged)."""

    def __init__(self):
        self.structure_steps = 0
        self.detail_steps = 0
        self.structure_evaluations = 0
        self.guided_evaluations = 0
        self.masked_evaluations = 0
        self.detail_model_calls = 0
        self.windows = 0
        self.patches = 0

    def summary(self) -> str:
        return (f"{self.patches} patches, structure steps {self.structure_steps} ({self.structure_evaluations} "
                f"evaluations, {self.guided_evaluations} guided, {self.masked_evaluations} with a cross-attention "
                f"mask); detail steps {self.detail_steps} ({self.windows} windows, {self.detail_model_calls} model "
                "calls)")


def asg_ksampler(params: ASGParams, sampler_name: str, family: adapters.ModelFamily,
                 layers: list[tuple[int, int]], stats: RunStats):
    """A KSAMPLER that runs `sampler_name` over ASGDiffusion's two stages."""
    inner = comfy.samplers.sampler_object(sampler_name)
    inner_function, inner_options = inner.sampler_function, dict(inner.extra_options)
    scale_h, scale_w = params.scales()
    k = scale_h * scale_w

    def sample(model, x, sigmas, extra_args=None, callback=None, disable=None, **_unused):
        extra_args = dict(extra_args or {})
        if extra_args.get("denoise_mask") is not None:
            raise adapters.node_error(NODE, family, "a noise mask (inpainting) is set; ASGDiffusion generates the "
                                                    "whole image.", "remove the noise mask.")
        b, _c, height, width = x.shape
        try:
            h, w = patch_size(height, width, scale_h, scale_w)
        except ValueError as e:
            raise adapters.node_error(NODE, family, str(e), "resize the latent or change scale_width/scale_height.")
        steps = len(sigmas) - 1
        n1 = split_steps(steps, params.structure_fraction)
        seed = int(extra_args.get("seed", 0) or 0)
        # The host's callback (progress bar + latent previews, from sample_asg or a KSampler-style caller) gets the
        # global step index; without one, a bar of our own. Interrupts are checked at every step either way.
        progress = adapters.StepProgress(steps) if callback is None else None

        def stage_callback(offset):
            def cb(d):
                adapters.check_interrupt()
                if progress is not None:
                    progress.step()
                else:
                    callback({**d, "i": d["i"] + offset})
            return cb

        stats.patches = k
        if n1 > 0:
            recorder = None
            stage_args = extra_args
            if k > 1 and params.mask == "cross_attention" and params.guidance_scale != 0.0:
                recorder = HeatRecorder(b * k, (h, w))
                stage_args = {**extra_args, "model_options": with_heat_patches(
                    extra_args.get("model_options", {}), layers, recorder)}

            def missing_mask():
                adapters.warn_once(f"asg.nomask.{id(recorder)}",
                                   f"{adapters.PACK_NAME} {NODE} [model family: {family.name}]: no cross-attention "
                                   "map was recorded in a structure-stage evaluation (the host split the patch "
                                   "batch, or a patch replaced the output-block attention), so that step's "
                                   "guidance is unmasked.")

            structure = StructureDenoiser(model, params, k, seed, heat_maps=recorder.take if recorder else None,
                                          on_call=adapters.check_interrupt, on_missing_mask=missing_mask)
            adapters.logger.info("%s %s [%s]: structure stage, %d steps on %d patches of %dx%d latent pixels",
                                 adapters.PACK_NAME, NODE, family.name, n1, k, w, h)
            rows = P.dilated_split(x, scale_h, scale_w)
            rows = inner_function(structure, rows, sigmas[:n1 + 1], extra_args=stage_args,
                                  callback=stage_callback(0), disable=disable, **inner_options)
            x = P.dilated_merge(rows, scale_h, scale_w)
            stats.structure_steps = n1
            stats.structure_evaluations = structure.calls
            stats.guided_evaluations = structure.guided_calls
            stats.masked_evaluations = recorder.recorded_evaluations if recorder else 0
        if n1 < steps:
            detail = DetailDenoiser(model, params, (h, w), seed + 1, on_chunk=adapters.check_interrupt)
            windows, _, _ = detail.layout(height, width)
            adapters.logger.info("%s %s [%s]: detail stage, %d steps, %d windows of %dx%d in batches of %d",
                                 adapters.PACK_NAME, NODE, family.name, steps - n1, len(windows), w, h,
                                 params.window_batch)
            x = inner_function(detail, x, sigmas[n1:], extra_args=extra_args, callback=stage_callback(n1),
                               disable=disable, **inner_options)
            stats.detail_steps = steps - n1
            stats.windows = len(windows)
            stats.detail_model_calls = detail.model_calls
        return x

    return comfy.samplers.KSAMPLER(sample, extra_options={}, inpaint_options=inner.inpaint_options)


MIN_PATCH = 8
"""Smallest native patch side in latent pixels (64 px): below it the model has nothing to work on."""
MEMORY_FIX = ("use a smaller target (latent_image) or scale factors, a smaller window_batch, fewer images per batch, "
              "or free memory on the device (other models, other programs).")


def estimate_memory(model, params: ASGParams, shape) -> memory.Estimate:
    """What a run needs on the model's device: the target-size latents the sampler keeps (noise, x, denoised and
    the sampler's buffers) held, and the larger of ComfyUI's estimates of one model call of the structure stage
    (B*K patch rows of one conditioning, ComfyUI can split cond and uncond; plus the cross-attention probabilities
    of the mask, at most 2^24 fp32 values at a time) and of the detail stage (B*window_batch window rows)."""
    b, c, height, width = (int(s) for s in shape)
    scale_h, scale_w = params.scales()
    h, w = height // scale_h, width // scale_w
    k = scale_h * scale_w
    device = model.load_device
    est = memory.Estimate()
    est.hold(device, f"target latents {width * 8}x{height * 8} x{b} (fp32)",
             8 * memory.tensor_bytes((b, c, height, width)))
    structure = memory.model_activation_bytes(model, (b * k, c, h, w))
    if params.mask == "cross_attention" and params.guidance_scale != 0.0 and k > 1:
        structure += memory.tensor_bytes((2 ** 24,))
    est.phase(device, f"model call on {b * k} patches of {w * 8}x{h * 8}", structure)
    if params.structure_fraction < 1.0:
        windows = len(DetailDenoiser(None, params, (h, w), 0).layout(height, width)[0])
        rows = b * min(params.window_batch, windows)
        est.phase(device, f"model call on {rows} windows of {w * 8}x{h * 8}",
                  memory.model_activation_bytes(model, (rows, c, h, w)))
    return est


def sample_asg(model, positive, negative, seed: int, steps: int, cfg: float, sampler_name: str, scheduler: str,
               params: ASGParams, latent: dict) -> tuple[dict[str, Any], RunStats]:
    """Sample the target-size `latent` (a LATENT dict, normally empty) with ASGDiffusion, drawing the noise as
    KSampler does. Returns (LATENT, stats). Every check runs before the first model call."""
    family = adapters.detect_family(model)
    problems = params.validate()
    if problems:
        raise adapters.node_error(NODE, family, "; ".join(problems), "correct the inputs.")
    family = resolve_family(model, params)
    params = with_resolved_mask(params, family)
    refuse_conditioning(positive, family)
    refuse_conditioning(negative, family)
    if latent.get("noise_mask") is not None:
        raise adapters.node_error(NODE, family, "the latent has a noise mask (inpainting); ASGDiffusion generates "
                                                "the whole image.", "connect an empty latent of the target size.")
    latent_image = comfy.sample.fix_empty_latent_channels(model, latent["samples"])
    if latent_image.dim() != 4:
        raise adapters.node_error(NODE, family, f"the latent is {latent_image.dim()}-D; ASGDiffusion works on "
                                                "image latents.", "connect an image latent.")
    try:
        h, w = patch_size(latent_image.shape[2], latent_image.shape[3], *params.scales())
    except ValueError as e:
        raise adapters.node_error(NODE, family, str(e), "resize the latent or change scale_width/scale_height.")
    if min(h, w) < MIN_PATCH:
        raise adapters.node_error(
            NODE, family, f"latent_image {latent_image.shape[3] * 8}x{latent_image.shape[2] * 8} px split "
                          f"{params.scale_width}x{params.scale_height} (scale_width x scale_height) gives native "
                          f"patches of {w * 8}x{h * 8} px; ASGDiffusion needs at least {MIN_PATCH * 8} px per patch "
                          "side.", "use a larger latent (the model's native size times the scale factors, e.g. "
                                   "2048x2048 for SDXL at 2x2) or smaller scale factors.")
    memory.require(NODE, family, estimate_memory(model, params, latent_image.shape), MEMORY_FIX)
    layers = cross_attention_layers(model) if family.key in CROSS_ATTENTION_FAMILIES else []
    if params.mask == "cross_attention" and params.guidance_scale != 0.0 and params.scales() != (1, 1) \
            and not layers:
        raise adapters.node_error(NODE, family, "the UNet has no cross-attention layers in its output blocks.",
                                  "set mask to none.")
    noise = comfy.sample.prepare_noise(latent_image, seed, latent.get("batch_index"))
    sigmas = comfy.samplers.KSampler(model, steps=steps, device=model.load_device, sampler=sampler_name,
                                     scheduler=scheduler, denoise=1.0, model_options=model.model_options).sigmas
    stats = RunStats()
    sampler = asg_ksampler(params, sampler_name, family, layers, stats)
    import latent_preview  # ComfyUI's: progress bar with latent previews (structure stage: patch 0, a dilated
    # low-resolution view of the whole image; detail stage: the full latent)
    callback = latent_preview.prepare_callback(model, len(sigmas) - 1)
    samples = comfy.sample.sample_custom(model, noise, cfg, sampler, sigmas, positive, negative, latent_image,
                                         noise_mask=None, callback=callback, disable_pbar=True, seed=seed)
    adapters.logger.info("%s %s [%s]: %s", adapters.PACK_NAME, NODE, family.name, stats.summary())
    out = latent.copy()
    out.pop("downscale_ratio_spacial", None)
    out["samples"] = samples
    return out, stats


# ----------------------------------------------------------------------------------------------
# Node
# ----------------------------------------------------------------------------------------------
def _samplers() -> list:
    return list(comfy.samplers.KSampler.SAMPLERS)


def _schedulers() -> list:
    return list(comfy.samplers.KSampler.SCHEDULERS)


def validate_scales(scale_width, scale_height) -> bool | str:
    """Whole-number scale factors in range (linked (None) values pass; the node checks them when it runs)."""
    problems = INPUTS.problems({"scale_width": scale_width, "scale_height": scale_height})
    return INPUTS.message(problems) if problems else True


INPUTS = inp.NodeInputs(NODE, [
    inp.Socket(io.Model.Input("model", tooltip="The model (SD1.x, SD2.x, SDXL, SD3, Flux; SD3/Flux without the "
                                               "cross-attention mask).")),
    inp.Socket(io.Conditioning.Input("positive", tooltip="Positive prompt (no area, mask or ControlNet entries)."),
               finite=True),
    inp.Socket(io.Conditioning.Input("negative", tooltip="Negative prompt (no area, mask or ControlNet entries)."),
               finite=True),
    inp.Seed("seed", "Noise seed: the target-size noise is drawn exactly as KSampler draws it (same seed, same size "
             "-> same noise)"),
    inp.Int("steps", "Total steps of both stages", paper="50 (25 + 25)", min=1, max=10000),
    inp.Float("cfg", "CFG scale for both stages", neutral="1 (no unconditional pass)",
              paper="CutDiffusion's script: 7.5 for both (SDXL)", min=0.0, max=100.0, step=0.1, round=0.01),
    inp.Choice("sampler_name", "Sampler for each stage (it restarts at the stage switch, so multistep samplers lose "
               "their history there)", _samplers, paper="CutDiffusion: Euler (SDXL default)"),
    inp.Choice("scheduler", "Noise schedule over all steps (split between the stages at structure_fraction); "
               "normal is ComfyUI's default", _schedulers, paper="no value given"),
    inp.Socket(io.Latent.Input("latent_image",
                               tooltip="The target-size latent, normally an Empty Latent Image (e.g. 2048x2048 for "
                                       "SDXL). Its size divided by the scale factors is the native patch size (at "
                                       "least 64 px per side)."), finite=True),
    inp.Int("scale_width", "Integer scale factor across: target width / the model's native width (SDXL 2048 from "
            "1024: 2). Only whole numbers: the dilated patches interleave whole native-size patches",
            neutral="1 (with scale_height 1: plain sampling)", paper="2-4 (quality collapses at 16x the pixels)",
            min=1, max=MAX_SCALE),
    inp.Int("scale_height", "Integer scale factor down: target height / the model's native height. Non-square grids "
            "(e.g. 3x1) are allowed", neutral="1", paper="2-4", min=1, max=MAX_SCALE),
    inp.Float("structure_fraction", "Share of the steps in the structure stage (patches); the rest is the detail "
              "stage (windows). 0 = windows only (MultiDiffusion-like); 1 = patches only",
              paper="0.5 (paper and CutDiffusion)", min=0.0, max=1.0, step=0.01),
    inp.Float("guidance_scale", "w of the structure guidance: how far each patch's noise moves toward the key "
              "patch's noise (times the mask). Not published (no code); the paper's ablation shows high values "
              "blur; 0.5 is our default", neutral="0 (= CutDiffusion)", min=0.0, max=1.0, step=0.01),
    inp.Choice("mask", "cross_attention: the paper's mask, each patch's own attention map from the UNet up blocks "
               "(attention mass on all text tokens but the first), min-max normalised (SD1.x/SDXL only). none: "
               "unmasked guidance (paper Eq. 3; all families). auto: cross_attention on SD1.x/SD2.x/SDXL, none on "
               "SD3/Flux (which have joint attention, no cross-attention maps)", MASKS,
               neutral="none with guidance_scale 0 (guidance_scale 0 is the neutral setting)",
               paper="cross_attention (Eq. 4)"),
    inp.Bool("asynchronous", "True: guidance uses the key patch's prediction from the previous evaluation, so "
             "patches never wait for it (what makes multi-GPU parallelism possible); the first evaluation is "
             "unguided. False: the same evaluation's prediction (synchronous)", paper="true (ASG)"),
    inp.Bool("pixel_interaction", "CutDiffusion's pixel interaction: at every latent pixel the patches are randomly "
             "permuted before the model and put back after (structure stage)", neutral="off",
             paper="CutDiffusion README: on"),
    inp.Float("window_overlap", "Detail stage: overlap of neighbouring native-size windows; stride = window x "
              "(1 - overlap)", paper="CutDiffusion: 0.5 (stride 64 of 128)", min=0.0, max=0.95, step=0.05),
    inp.Bool("jitter", "Detail stage: CutDiffusion's random window jitter (up to a quarter of the overlap) each "
             "evaluation", neutral="off", paper="CutDiffusion: on"),
    inp.Choice("blend", "Detail stage: uniform = CutDiffusion's plain average of overlapping windows; feather (our "
               "option) = linear ramps toward inner window sides, which hides seams", P.BLENDS,
               paper="uniform (CutDiffusion)"),
    inp.Int("window_batch", "Detail stage: windows per model call (memory bound)",
            paper="CutDiffusion's view_batch_size (16 in its script, 1 in its README)", min=1, max=64),
], defaults=DEFAULTS)


class ASGDiffusion(io.ComfyNode):
    INPUTS = INPUTS
    validate_inputs = INPUTS.validator()

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="TFG_ASGDiffusion",
            display_name="ASGDiffusion High-Res Sampler (TFG)",
            category=CATEGORY,
            description=_DESCRIPTION,
            inputs=cls.INPUTS.schema(),
            outputs=[io.Latent.Output(tooltip="The target-size latent (decode with the model's VAE; tiled decode "
                                              "for very large images).")],
        )

    @classmethod
    def execute(cls, **values) -> io.NodeOutput:
        v = cls.INPUTS.checked(values)
        params = cls.INPUTS.params(v)
        latent, _stats = sample_asg(v.model, v.positive, v.negative, v.seed, v.steps, v.cfg, v.sampler_name,
                                    v.scheduler, params, v.latent_image)
        return io.NodeOutput(latent)


NODES = [ASGDiffusion]
