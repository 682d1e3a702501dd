"""TALE composition node (Pham et al., arXiv 2408.03637): a background IMAGE, a foreground IMAGE with its
object MASK and a placement (MASK or box) in, the composite LATENT out.

The run, inside one sampling run of ComfyUI's CFGGuider (so model patches, conds and memory management apply):
invert background and foreground (`invert_to`, the one place that knows which inversion is used), paste at T'
(no composite exists before T'), for tau steps re-blend + AdaIN + energy gradient steps, then plain sampling.
Gradients under ComfyUI's inference mode: the UNet gets no-op weight wrappers (its weights are then copied at
forward time outside inference mode); the VAE decoder and CLIP vision run on per-run copies of their weights.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import torch
from comfy_api.latest import io

import comfy.model_management
import comfy.samplers

from ..kernels import tale as K
from ..kernels.inversion import InversionParams
from ..kernels.inversion import invert as invert_kernel
from ..kernels.tale import TALEParams
from . import adapters
from .inversion import model_input_scale

logger = logging.getLogger("tfg.tale")

DEFAULTS = TALEParams()
CATEGORY = "TFG/editing"
NODE = "TALE Composite"
SUPPORTED = ("sd1", "sd2", "sdxl")

_DESCRIPTION = (
    "TALE (Pham et al., arXiv 2408.03637, ACM MM 2024): training-free cross-domain composition, e.g. a photo "
    "object into a painting. Background and foreground are inverted; at step T' the object's latent is pasted "
    "into the background's (selective initiation); for tau steps the object region is normalised toward the "
    "background's latent statistics (AdaIN, weight rising to adain_max) and optimised by gradient steps on an "
    "energy (CLIP image-text similarity + Gram style distance to the background; or a latent-space style energy; "
    "or none: the cheap no-gradient variant); the rest is ordinary sampling. Works on SD1.x, SD2.x and SDXL "
    "(eps/v UNets); other families raise an error. Cost: the inversion (steps - T' passes per image), (steps - T') "
    "CFG steps, and per normalisation step inner_steps extra CFG passes with a backward pass through the UNet "
    "(+ VAE decoder + CLIP vision with energy=clip); energy=none needs no gradients and little memory. Outputs the "
    "composite latent (decode with the VAE), the naive pixel paste for comparison and the placed object mask.")


# ----------------------------------------------------------------------------------------------
# Inputs
# ----------------------------------------------------------------------------------------------
def _inputs() -> list:
    d = DEFAULTS
    return [
        io.Model.Input("model", tooltip="The diffusion model (SD1.x, SD2.x or SDXL). The reference uses SD 2.1-base."),
        io.Conditioning.Input("positive", tooltip="The prompt describing the composite, e.g. 'an oil painting of a "
                                                  "sheep, Van Gogh style' (it steers the composite and, with "
                                                  "energy=clip, is the text target unless energy_text is given)."),
        io.Conditioning.Input("negative", tooltip="Negative / unconditional prompt (e.g. empty). Also used for the "
                                                  "inversion and the background/foreground trajectories (the "
                                                  "reference uses a null 'exceptional' prompt there)."),
        io.Vae.Input("vae", tooltip="The model's VAE (encodes both images; decodes the composite for energy=clip)."),
        io.Image.Input("background", tooltip="The background (target domain, e.g. a painting). The composite has its "
                                             "size (cropped to a multiple of 8 like VAE Encode)."),
        io.Image.Input("foreground", tooltip="The image that contains the object (e.g. a photo)."),
        io.Mask.Input("object_mask", tooltip="The object in the foreground image (white = object); same size as the "
                                             "foreground. An empty mask is an error."),
        io.Combo.Input("placement", options=list(K.PLACEMENTS), default="box",
                       tooltip="mask: the object is scaled to fit the bounding box of placement_mask (a mask of the "
                               "background's size, like the reference's location.png) and centred in it, aspect "
                               "kept. box: centred at (box_x, box_y), scaled by box_scale."),
        io.Float.Input("box_x", default=0.5, min=0.0, max=1.0, step=0.01,
                       tooltip="placement=box: horizontal centre of the object as a fraction of the background width "
                               "(0 = left edge, 1 = right edge)."),
        io.Float.Input("box_y", default=0.5, min=0.0, max=1.0, step=0.01,
                       tooltip="placement=box: vertical centre as a fraction of the background height."),
        io.Float.Input("box_scale", default=1.0, min=0.01, max=16.0, step=0.01,
                       tooltip="placement=box: size of the object relative to its size in the foreground image "
                               "(1 = same pixels). The object must fit inside the background."),
        io.Int.Input("steps", default=d.steps, min=1, max=200,
                     tooltip="Steps of the whole schedule. Reference: 20."),
        io.Float.Input("t_prime_percent", default=d.t_prime_percent, min=0.0, max=1.0, step=0.01,
                       tooltip="T' as a fraction of the schedule: the object is pasted at step round(T' x steps) "
                               "(later = more of the background's layout kept, less reshaping of the object). "
                               "Reference: 0.6 (step 12 of 20, about t=400)."),
        io.Float.Input("tau_percent", default=d.tau_percent, min=0.0, max=1.0, step=0.01,
                       tooltip="tau as a fraction of the schedule: the number of normalisation + optimisation steps "
                               "after T' is round(tau x steps) (at least 1 when > 0). 0 = paste only (the node is then "
                               "'paste at T' and sample'). Reference: 0.25 (5 of 20 steps). T' + tau must end "
                               "before the last step."),
        io.Float.Input("cfg", default=d.cfg, min=0.0, max=100.0, step=0.1, round=0.01,
                       tooltip="CFG scale of the composite (and of the energy's prediction). Neutral 1 (no "
                               "guidance). Reference: 10 (main branch); the original branch used 5 cross-domain, 2.5 "
                               "same-domain."),
        io.Combo.Input("solver", options=list(K.SOLVERS), default=d.solver,
                       tooltip="dpmpp_2m: DPM-Solver++ 2M (the reference); euler: DDIM-like first order."),
        io.Combo.Input("scheduler", options=list(comfy.samplers.SCHEDULER_NAMES), default=d.scheduler,
                       tooltip="Noise schedule (ComfyUI scheduler)."),
        io.Combo.Input("energy", options=list(K.ENERGIES), default=d.energy,
                       tooltip="clip: the reference energy (VAE decode + CLIP vision: text similarity + Gram style of "
                               "the object vs the background; needs clip_vision; most memory). latent: a latent-space "
                               "style energy (Gram of 3x3 latent patches of the object vs the background; no decoder, "
                               "no CLIP; for large models; uses latent_weight, not text/style_weight). none: no "
                               "gradients (initiation + normalisation only; little memory)."),
        io.Float.Input("text_weight", default=d.text_weight, min=0.0, max=1000.0, step=0.01,
                       tooltip="Weight of 1 - cos(CLIP image, text). Neutral 0. Reference: 15 (ViT-B/32)."),
        io.Float.Input("style_weight", default=d.style_weight, min=0.0, max=1000.0, step=0.001,
                       tooltip="energy=clip: weight of the Gram style distance of CLIP tokens. Neutral 0. "
                               "Reference: 0.15 (ViT-B/32 layer-2 tokens; other encoders have other scales)."),
        io.Float.Input("latent_weight", default=d.latent_weight, min=0.0, max=100.0, step=0.001,
                       tooltip="energy=latent only: weight of the latent style energy, per latent pixel (ours; no "
                               "reference value). Neutral 0. Try 0.005-0.05."),
        io.Int.Input("inner_steps", default=d.inner_steps, min=0, max=50,
                     tooltip="Gradient steps per normalisation step. Neutral 0. Reference: 3."),
        io.Float.Input("adain_max", default=d.adain_max, min=0.0, max=1.0, step=0.01,
                       tooltip="AdaIN weight at the last normalisation step; it rises linearly from adain_max/tau "
                               "(reference 0.1 -> 0.5). Neutral 0."),
        io.Combo.Input("style_gradient", options=list(K.STYLE_GRADIENTS), default=d.style_gradient,
                       tooltip="kept: the style term has a gradient (our fix). detached: as the released code, whose "
                               "style term is detached by a bug, so only the text term moves the latent."),
        io.Combo.Input("history", options=list(K.HISTORIES), default=d.history,
                       tooltip="Multistep history at the paste step. reset: none (a first-order step, like a sampler "
                               "started at T'). reblend: the background's and the object's predictions at T'-1 "
                               "blended by the mask (2 extra passes). reference: as the released code, the prediction "
                               "of a composite pasted at step 0 and denoised up to T' (T' extra CFG passes)."),
        io.Combo.Input("trajectories", options=list(K.TRAJECTORIES), default=d.trajectories,
                       tooltip="inverted: background/foreground latents at T'..T'+tau are the inversion's own states "
                               "(the inversion stops at T'). replay: the reference's way (invert to the first step, "
                               "then denoise background and foreground alongside; about 2 x T' more passes)."),
        io.Mask.Input("placement_mask", optional=True,
                      tooltip="placement=mask: where the object goes (background size; its bounding box sets centre "
                              "and size)."),
        io.ClipVision.Input("clip_vision", optional=True,
                            tooltip="energy=clip: the CLIP vision model (reference: OpenAI ViT-B/32). For the text "
                                    "term its image embedding must share a space with the text target: CLIP-G vision "
                                    "with SDXL's prompt, CLIP-H vision with SD2.x's. SD1.x prompts have no projected "
                                    "text embedding: give energy_text, or set text_weight 0."),
        io.Conditioning.Input("energy_text", optional=True,
                              tooltip="energy=clip: conditioning whose pooled output is the text target; default: "
                                      "positive's. Encode the prompt with the text encoder matching clip_vision "
                                      "(Load CLIP with clip_g for CLIP-G vision). Needed for SD1.x, whose pooled "
                                      "output is ComfyUI's unprojected CLIP-L (not a CLIP-space embedding)."),
    ]


def _range_problems(values: dict) -> list[str]:
    """Each known (not None) numeric value against its widget's min/max (and finiteness)."""
    limits = {i.id: (i.min, i.max) for i in _inputs() if isinstance(i, (io.Int.Input, io.Float.Input))}
    problems = []
    for name, v in values.items():
        if v is None:
            continue
        lo, hi = limits[name]
        if not (math.isfinite(v) and lo <= v <= hi):
            problems.append(f"{name} must be in [{lo}, {hi}], got {v}")
    return problems


def _params(steps, t_prime_percent, tau_percent, cfg, solver, scheduler, energy, text_weight, style_weight,
            latent_weight, inner_steps, adain_max, style_gradient, history, trajectories) -> TALEParams:
    t_prime, tau = K.schedule_steps(steps, t_prime_percent, tau_percent)
    return TALEParams(steps=steps, t_prime=t_prime, tau=tau, cfg=cfg, solver=solver, scheduler=scheduler,
                      energy=energy, text_weight=text_weight, style_weight=style_weight, latent_weight=latent_weight,
                      inner_steps=inner_steps,
                      adain_max=adain_max, style_gradient=style_gradient, history=history, trajectories=trajectories)


# ----------------------------------------------------------------------------------------------
# Placement and encoding
# ----------------------------------------------------------------------------------------------
@dataclass
class Placement:
    background: torch.Tensor
    """(1, H, W, 3) background, cropped to a multiple of the VAE factor."""
    canvas: torch.Tensor
    """(1, H, W, 3) the scaled object image on a black background-sized canvas."""
    pixel_mask: torch.Tensor
    """(H, W) float mask of the placed object."""
    box: K.Box
    """Pixel box of the placed object."""
    latent_mask: torch.Tensor
    """(h, w) boolean latent mask."""

    def preview(self) -> torch.Tensor:
        m = self.pixel_mask[None, :, :, None]
        return self.background * (1 - m) + self.canvas * m


def _one_mask(mask: torch.Tensor, name: str, family) -> torch.Tensor:
    m = mask.float()
    if m.dim() == 3:
        if m.shape[0] > 1:
            adapters.warn_once(f"tale.maskbatch.{name}", f"{adapters.PACK_NAME} {NODE}: {m.shape[0]} masks given as "
                                                         f"{name}; only the first is used.")
        m = m[0]
    if m.dim() != 2:
        raise adapters.node_error(NODE, family, f"{name} has shape {tuple(mask.shape)}, not a mask.",
                                  f"connect a MASK to {name}.")
    return m.cpu()


def make_placement(background, foreground, object_mask, placement, placement_mask, box_x, box_y, box_scale,
                   factor: int, family=None) -> Placement:
    """Validate the images and masks and place the object (raises node errors naming the problem)."""
    import kornia
    if background.shape[0] > 1 or foreground.shape[0] > 1:
        adapters.warn_once("tale.imagebatch", f"{adapters.PACK_NAME} {NODE}: image batches given; only the first "
                                              "background and foreground are used.")
    bg = background[:1, :, :, :3].float().cpu()
    fg = foreground[:1, :, :, :3].float().cpu()
    H0, W0 = bg.shape[1:3]
    obj = _one_mask(object_mask, "object_mask", family)
    if tuple(obj.shape) != tuple(fg.shape[1:3]):
        raise adapters.node_error(NODE, family, f"object_mask is {obj.shape[1]}x{obj.shape[0]} but the foreground "
                                                f"image is {fg.shape[2]}x{fg.shape[1]}.",
                                  "use the mask made from the foreground image (same size).")
    obj_box = K.mask_bbox(obj)
    if obj_box is None:
        raise adapters.node_error(NODE, family, "object_mask is empty (no pixel >= 0.5), so there is no object.",
                                  "paint or segment the object in the foreground image.")
    if placement == "mask":
        if placement_mask is None:
            raise adapters.node_error(NODE, family, "placement is 'mask' but no placement_mask is connected.",
                                      "connect a mask of the background's size, or use placement 'box'.")
        pm = _one_mask(placement_mask, "placement_mask", family)
        if tuple(pm.shape) != (H0, W0):
            raise adapters.node_error(NODE, family, f"placement_mask is {pm.shape[1]}x{pm.shape[0]} but the "
                                                    f"background is {W0}x{H0}.",
                                      "draw the placement mask on the background image (same size).")
        target = K.mask_bbox(pm)
        if target is None:
            raise adapters.node_error(NODE, family, "placement_mask is empty (no pixel >= 0.5).",
                                      "mark where the object should go on the background.")
        h, w = K.fit_size(obj_box.height, obj_box.width, target.height, target.width)
        cy, cx = (target.top + target.bottom) / 2.0, (target.left + target.right) / 2.0
    elif placement == "box":
        if placement_mask is not None:
            adapters.warn_once("tale.placement_mask_ignored", f"{adapters.PACK_NAME} {NODE}: placement is 'box', so "
                                                              "the connected placement_mask is ignored (set placement "
                                                              "to 'mask' to use it).")
        h = max(1, int(round(obj_box.height * box_scale)))
        w = max(1, int(round(obj_box.width * box_scale)))
        cy, cx = box_y * H0, box_x * W0
    else:
        raise adapters.node_error(NODE, family, f"unknown placement {placement!r}.", "use 'mask' or 'box'.")
    try:
        box0 = K.place_object(cy, cx, h, w, H0, W0)
    except K.PlacementError as e:
        raise adapters.node_error(NODE, family, f"{e}.", "move the placement inside the background or make the "
                                                         "object smaller (box_scale / a smaller placement mask).")
    # object image and mask, scaled, on background-sized canvases
    rows, cols = obj_box.slices()
    crop = fg[:, rows, cols].movedim(-1, 1)
    crop_m = obj[rows, cols][None, None]
    scaled = kornia.geometry.transform.resize(crop, (h, w), interpolation="bilinear", antialias=True)
    scaled_m = kornia.geometry.transform.resize(crop_m, (h, w), interpolation="bilinear", antialias=True)
    canvas = torch.zeros(1, 3, H0, W0)
    canvas_m = torch.zeros(1, 1, H0, W0)
    r, c = box0.slices()
    canvas[:, :, r, c] = scaled.clamp(0, 1)
    canvas_m[:, :, r, c] = (scaled_m >= 0.5).float()
    # crop everything like VAE Encode crops to a multiple of the VAE factor
    bg_c = K.crop_to_multiple(bg, factor, 1, 2)
    canvas_c = K.crop_to_multiple(canvas.movedim(1, -1), factor, 1, 2)
    mask_c = K.crop_to_multiple(canvas_m[0, 0], factor, 0, 1)
    box = K.mask_bbox(mask_c)
    if box is not None and float(mask_c.sum()) < float(canvas_m.sum()):
        adapters.warn_once(f"tale.cropped.{H0}x{W0}", f"{adapters.PACK_NAME} {NODE}: the background is {W0}x{H0}, "
                                                      f"not a multiple of {factor}; like VAE Encode the border rows/"
                                                      "columns are cropped, and part of the placed object with them.")
    if box is None:
        raise adapters.node_error(NODE, family, "the placed object lies entirely in the border rows/columns VAE "
                                                f"encoding crops away (the background is {W0}x{H0}, not a multiple of "
                                                f"{factor}).", "move the object inward.")
    lat = K.latent_mask(mask_c, factor)
    if int(lat.sum()) < 2:
        raise adapters.node_error(NODE, family, f"the placed object covers {int(lat.sum())} latent pixel(s) "
                                                f"({factor}x{factor} image pixels each); normalisation needs at "
                                                "least 2.",
                                  "make the object larger (box_scale or a larger placement mask).")
    return Placement(bg_c, canvas_c, mask_c, box, lat)


def _encode(vae, model, image: torch.Tensor) -> torch.Tensor:
    latent = vae.encode(image)
    return model.get_model_object("latent_format").process_in(latent.float())


# ----------------------------------------------------------------------------------------------
# Gradients inside ComfyUI
# ----------------------------------------------------------------------------------------------
def with_grad_weights(model):
    """A clone whose comfy-ops weights and biases get a no-op wrapper: comfy.ops then copies them at forward
    time, and a copy made outside inference mode can be saved for backward (research notes §1.10)."""
    m = model.clone()
    for name, module in m.model.named_modules():
        if hasattr(module, "weight_function") and getattr(module, "weight", None) is not None:
            m.add_weight_wrapper(f"{name}.weight", _identity)
        if hasattr(module, "bias_function") and getattr(module, "bias", None) is not None:
            m.add_weight_wrapper(f"{name}.bias", _identity)
    return m


def _identity(t):
    return t


class _Bound(torch.nn.Module):
    def __init__(self, module: torch.nn.Module, function):
        super().__init__()
        self.m = module
        self.function = function

    def forward(self, *args, **kwargs):
        return self.function(self.m, *args, **kwargs)


class GradCopy:
    """Calls `function(module, ...)` with per-run, non-inference copies of the module's parameters and buffers
    (made once), so gradients flow through a module that ComfyUI loaded under inference mode. The module itself
    is not changed (torch.func.functional_call swaps the copies in for the call only)."""

    def __init__(self, module: torch.nn.Module, function):
        self.bound = _Bound(module, function)
        with torch.inference_mode(False), torch.no_grad():
            self.state = {f"m.{k}": v.detach().clone() for k, v in module.named_parameters()}
            self.state.update({f"m.{k}": v.detach().clone() for k, v in module.named_buffers()})

    def __call__(self, *args, **kwargs):
        return torch.func.functional_call(self.bound, self.state, args, kwargs)


def _vae_decode(first_stage_model, z):
    return first_stage_model.decode(z)


def _clip_vision_forward(net, pixels: torch.Tensor, layer: int):
    """ComfyUI's CLIP vision forward without its in-place residual adds (which autograd cannot go through):
    (patch tokens after transformer layer `layer` without the class token, projected image embedding)."""
    from comfy.ldm.modules.attention import optimized_attention_for_device
    vm = net.vision_model
    x = vm.pre_layrnorm(vm.embeddings(pixels))
    attention = optimized_attention_for_device(x.device, mask=False, small_input=True)
    tokens = None
    for i, block in enumerate(vm.encoder.layers):
        x = x + block.self_attn(block.layer_norm1(x), None, attention)
        x = x + block.mlp(block.layer_norm2(x))
        if i == layer:
            tokens = x[:, 1:]
    return tokens, net.visual_projection(vm.post_layernorm(x[:, 0, :]))


# ----------------------------------------------------------------------------------------------
# Energies in the host
# ----------------------------------------------------------------------------------------------
class ClipEnergy:
    """energy=clip: decode the predicted clean latent with the VAE, score it with CLIP vision."""

    def __init__(self, vae, clip_vision, model, text_embeds: torch.Tensor | None, placement: Placement,
                 params: TALEParams, family):
        comfy.model_management.load_models_gpu([vae.patcher, clip_vision.patcher])
        net = clip_vision.model
        if not hasattr(net, "vision_model") or not isinstance(getattr(net, "visual_projection", None),
                                                                torch.nn.Module):
            raise adapters.node_error(NODE, family, "energy=clip needs a CLIP vision model with a projection "
                                                    f"(got {type(net).__name__}).",
                                      "load a CLIP vision model (e.g. clip_vision_vit_l / CLIP-G), or use energy "
                                      "latent or none.")
        n_layers = len(net.vision_model.encoder.layers)
        if params.style_layer >= n_layers:
            raise adapters.node_error(NODE, family, f"style layer {params.style_layer} does not exist in this CLIP "
                                                    f"vision model ({n_layers} layers).", "use a CLIP vision model.")
        self.params = params
        self.box = placement.box
        self.mean, self.std = clip_vision.image_mean, clip_vision.image_std
        self.size = int(clip_vision.image_size)
        self.device = clip_vision.load_device
        self.vision = GradCopy(net, _clip_vision_forward)
        self.vae = vae
        self.decoder = GradCopy(vae.first_stage_model, _vae_decode)
        self.latent_format = model.get_model_object("latent_format")
        with torch.inference_mode(False), torch.no_grad():
            # the reference gram: the background resized (bilinear, antialiased) to the CLIP size
            bg = placement.background.movedim(-1, 1).to(self.device, torch.float32)
            tokens, embeds = self.encode(K.clip_pixels(bg, self.size, self.mean, self.std, mode="bilinear",
                                                       antialias=True))
            self.reference_gram = K.gram(tokens).detach()
        self.text = None
        if text_embeds is None:  # text_weight 0: the style term only
            return
        with torch.inference_mode(False):
            text = text_embeds.to(self.device, torch.float32).reshape(1, -1)
        if text.shape[-1] != embeds.shape[-1]:
            raise adapters.node_error(NODE, family, f"the text embedding (pooled output, {text.shape[-1]} values) and "
                                                    f"the CLIP vision embedding ({embeds.shape[-1]}) have different "
                                                    "sizes, so they are not in one CLIP space.",
                                      "connect energy_text encoded with the CLIP text model matching clip_vision "
                                      "(CLIP-G vision: SDXL's prompt or a CLIP-G text encoder; CLIP-H vision: SD2.x's "
                                      "prompt), set text_weight 0, or use energy latent.")
        self.text = text

    def encode(self, pixels: torch.Tensor):
        return self.vision(pixels.to(self.device), self.params.style_layer)

    def __call__(self, denoised: torch.Tensor) -> K.EnergyTerms:
        z = self.latent_format.process_out(denoised).to(self.vae.device, self.vae.vae_dtype)
        image = (self.decoder(z).float() + 1.0) / 2.0
        return K.clip_energy(image.to(self.device), self.box, self.encode, self.text, self.reference_gram,
                             self.params, self.mean, self.std, self.size)


class LatentEnergy:
    def __init__(self, background_latent: torch.Tensor, placement: Placement, params: TALEParams):
        self.params = params
        with torch.inference_mode(False):
            self.mask = placement.latent_mask.clone()  # a normal tensor: it indexes tensors tracked by autograd
            self.box = K.mask_bbox(self.mask.float())
            self.reference_gram = K.latent_gram(K.latent_patch_features(background_latent)).detach()

    def __call__(self, denoised: torch.Tensor) -> K.EnergyTerms:
        return K.latent_energy(denoised, self.box, self.mask.to(denoised.device), self.reference_gram.to(
            denoised.device), self.params)


# ----------------------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------------------
@dataclass
class TALEReport:
    """What one composition did (for the log and for tests)."""

    passes: dict = field(default_factory=lambda: {"cfg": 0, "inversion": 0, "grad": 0})
    """CFG guider calls (gradient passes included), inversion/trajectory network rows, gradient passes."""
    energies: dict = field(default_factory=dict)
    """Step -> list of energy totals before each inner update."""
    terms: dict = field(default_factory=dict)
    background: dict = field(default_factory=dict)
    """Step -> background latent used at that step (T'..T'+tau)."""
    foreground: dict = field(default_factory=dict)
    composites: dict = field(default_factory=dict)
    """Step -> composite after re-blend + AdaIN, before the optimisation (trace=True)."""
    optimised: dict = field(default_factory=dict)
    """Step -> composite after the optimisation, before the solver step (trace=True)."""

    def summary(self) -> str:
        e = " ".join(f"{i}:" + ">".join(f"{v:.4g}" for v in vals) for i, vals in sorted(self.energies.items()))
        return (f"model passes: {self.passes['cfg']} CFG (of which {self.passes['grad']} with gradients), "
                f"{self.passes['inversion']} inversion/trajectory rows; energy before each inner step: {e or 'none'}")


def invert_to(den_inv, latent: torch.Tensor, sigmas: torch.Tensor, stop: int, model_sampling, progress=None
              ) -> dict[int, torch.Tensor]:
    """Inversion of a clean latent along the sampling schedule, from sigmas[-1] (= 0) up to sigmas[stop]:
    {index: latent at sigmas[index]} for every index stop..len(sigmas)-1.

    The single place that decides which inversion is used: the pack's shared DDIM inversion
    (kernels/inversion.py, no ReNoise), guided by `den_inv` (the negative conditioning at cfg 1; the reference
    inverts with a null prompt at an inert CFG)."""
    n = len(sigmas) - 1

    def denoise(x: torch.Tensor, sigma: float) -> torch.Tensor:
        return den_inv(x, torch.full((1,), sigma, device=x.device, dtype=torch.float32))

    def on_step(i, x, d):
        if progress is not None:
            progress.step()

    result = invert_kernel(denoise, latent, sigmas[stop:], InversionParams(),
                           model_input_scale(model_sampling), on_step)
    return {n - k: state for k, state in enumerate(result.trajectory)}


class TALESampler(comfy.samplers.Sampler):
    """The whole composition as one ComfyUI Sampler (run by a CFGGuider with positive/negative at cfg)."""

    def __init__(self, params: TALEParams, bg: torch.Tensor, fg: torch.Tensor, mask: torch.Tensor, energy,
                 report: TALEReport, trace: bool = False, family=None):
        self.params, self.bg, self.fg, self.mask, self.energy = params, bg, fg, mask, energy
        self.report, self.trace, self.family = report, trace, family

    def sample(self, model_wrap, sigmas, extra_args, callback, noise, latent_image=None, denoise_mask=None,
               disable_pbar=False):
        p = self.params
        model_options, seed = extra_args["model_options"], extra_args.get("seed")
        device = noise.device
        bg0, fg0 = self.bg.to(device), self.fg.to(device)
        mask = self.mask.to(device)
        s_in = bg0.new_ones([1])
        ms = model_wrap.inner_model.model_sampling
        negative = model_wrap.conds.get("negative")
        report = self.report
        n = len(sigmas) - 1
        T = p.t_prime

        def den_cfg(x, i):
            report.passes["cfg"] += 1
            return model_wrap(x, sigmas[i] * s_in, model_options=model_options, seed=seed)

        def den_inv(x, sigma):
            report.passes["inversion"] += x.shape[0]
            return comfy.samplers.calc_cond_batch(model_wrap.inner_model, [negative], x, sigma.reshape(1).expand(
                x.shape[0]), model_options)[0]

        def step(x, den, old, i):
            if p.solver == "euler":
                return K.euler_step(x, den, sigmas[i], sigmas[i + 1])
            return K.dpmpp_2m_step(x, den, old, sigmas[i - 1] if i > 0 else None, sigmas[i], sigmas[i + 1])

        replay = p.trajectories == "replay"
        reblend = p.history == "reblend" and T > 0
        stale = p.history == "reference" and T > 0
        window = list(p.window())
        last_bg = window[-1] if window else T
        inner = p.inner_steps if p.optimising else 0
        stop = 0 if (replay or stale) else T - int(reblend)
        total = (n - stop) + (last_bg if replay else 0) + (T if stale else 0) + (n - T) + len(window) * inner
        with adapters.StepProgress(total) as progress:
            # ---- inversion (+ replay) of background and foreground
            pair = torch.cat([bg0, fg0])
            states = invert_to(den_inv, pair, sigmas, stop, ms, progress)
            bg_at = {i: s[:1] for i, s in states.items()}
            fg_at = {i: s[1:] for i, s in states.items()}
            if replay:
                x, old = states[0], None
                for i in range(0, last_bg):
                    den = den_inv(x, sigmas[i])
                    x = step(x, den, old, i)
                    old = den
                    bg_at[i + 1], fg_at[i + 1] = x[:1], x[1:]
                    progress.step()
            old = None
            if stale:  # the released code: a composite pasted at step 0, denoised until T', then discarded
                xc = K.paste(bg_at[0], fg_at[0], mask)
                for i in range(T):
                    dc = den_cfg(xc, i)
                    xc = step(xc, dc, old, i)
                    old = dc
                    progress.step()
            # ---- selective initiation at T' (otherwise nothing of the composite is computed before)
            x = K.paste(bg_at[T], fg_at[T], mask)
            if reblend:
                d_bg = den_cfg(bg_at[T - 1], T - 1)
                d_fg = den_cfg(fg_at[T - 1], T - 1)
                old = K.paste(d_bg, d_fg, mask)
            report.background.update({i: bg_at[i] for i in [T] + window})
            report.foreground[T] = fg_at[T]
            alphas = K.adain_weights(p.tau, p.adain_max)
            for i in range(T, n):
                if i in window:
                    x = K.keep_object(x, bg_at[i], mask)
                    x = K.adain_blend(x, bg_at[i], mask, alphas[i - T - 1])
                    if self.trace:
                        report.composites[i] = x.clone()
                    for _ in range(inner):
                        x = self._optimise(x, i, den_cfg)
                        progress.step()
                    if self.trace:
                        report.optimised[i] = x.clone()
                den = den_cfg(x, i)
                if callback is not None:
                    callback(i, den, x, n)
                x = step(x, den, old, i)
                old = den
                progress.step()
        return x

    def _optimise(self, x: torch.Tensor, i: int, den_cfg) -> torch.Tensor:
        with torch.inference_mode(False), torch.enable_grad():
            x_g = x.detach().clone().requires_grad_(True)
            den = den_cfg(x_g, i)
            self.report.passes["grad"] += 1
            terms = self.energy(den)
            if terms.total.requires_grad:
                grad, = torch.autograd.grad(terms.total, x_g)
            else:
                grad = torch.zeros_like(x_g)
            if not bool(torch.isfinite(grad).all()):
                raise adapters.node_error(NODE, self.family, f"the energy gradient at step {i} is not finite.",
                                          "lower the energy's weights (text/style/latent_weight), or use energy "
                                          "none.")
            self.report.energies.setdefault(i, []).append(float(terms.total.detach()))
            self.report.terms.setdefault(i, []).append((terms.text, terms.style))
            return K.masked_gradient_step(x_g.detach(), grad.detach(), self.mask.to(x.device))


CLIP_L_POOLED = 768
"""Size of a CLIP-L pooled output. Every CLIP-L text encoder of ComfyUI (SD1.x checkpoints through
`SD1CheckpointClipModel`, Load CLIP with clip_l, and the CLIP-L inside SD3/Flux) returns the *unprojected* pooled
output (`return_projected_pooled=False`: the final-layer-norm EOS token), which has CLIP-L vision's embedding size
but is not in its space. CLIP-G (SDXL) and OpenCLIP-H (SD2.x) pooled outputs are projected."""


def _text_embeds(conditioning, family, from_positive: bool):
    """The text target of energy=clip: the pooled output of `conditioning` (1, D), fp32."""
    if from_positive and family.key == "sd1":
        raise adapters.node_error(
            NODE, family, "energy=clip with text_weight > 0 needs a text embedding in CLIP vision's space, but an "
                          "SD1.x prompt's pooled output is ComfyUI's unprojected CLIP-L output (SD1.x checkpoints "
                          "carry no CLIP-L text projection, and ComfyUI's CLIP-L encoders return the unprojected "
                          "pooled output), so it would compare the image with a vector of another space.",
            "connect energy_text: the prompt encoded (CLIPTextEncode) by Load CLIP with a CLIP-G text encoder "
            "(clip_g, then CLIP-G vision) or an OpenCLIP-H one (SD2's, then CLIP-H vision); or set text_weight 0 "
            "(style term only); or use energy latent or none.")
    pooled = None
    if conditioning:
        pooled = conditioning[0][1].get("pooled_output")
    if pooled is None:
        raise adapters.node_error(NODE, family, "energy=clip with text_weight > 0 needs a text embedding, but the "
                                                "conditioning has no pooled output.",
                                  "connect energy_text from CLIPTextEncode, set text_weight 0, or use energy latent "
                                  "or none.")
    if not from_positive and pooled.shape[-1] == CLIP_L_POOLED:
        adapters.warn_once("tale.clip_l_pooled", f"{adapters.PACK_NAME} {NODE} [model family: {family.name}]: "
                                                 f"energy_text has a {CLIP_L_POOLED}-value pooled output. ComfyUI's "
                                                 "CLIP-L text encoders return it unprojected (not in CLIP-L vision's "
                                                 "space), so the text term is then not a CLIP similarity. Encode the "
                                                 "prompt with a CLIP-G (or OpenCLIP-H) text encoder and use the "
                                                 "matching CLIP vision model, or set text_weight 0.")
    with torch.inference_mode(False):
        return pooled[:1].float().clone()  # a normal tensor: it meets tensors tracked by autograd


def run_tale(model, vae, positive, negative, background, foreground, object_mask, params: TALEParams,
             placement="box", placement_mask=None, box_x=0.5, box_y=0.5, box_scale=1.0, clip_vision=None,
             energy_text=None, trace=False):
    """The node's work. Returns (LATENT dict, preview IMAGE, placed MASK, TALEReport)."""
    problems = params.validate()
    family = adapters.detect_family(model)
    if problems:
        raise adapters.node_error(NODE, family, "; ".join(problems) + ".", "correct the inputs.")
    family = adapters.resolve_family(NODE, model, SUPPORTED, "this model family is not supported (TALE needs an eps/v "
                                     "UNet: SD1.x, SD2.x, SDXL).", "use an SD1.x, SD2.x or SDXL model.",
                                     "it runs as an SD UNet")
    ms = model.get_model_object("model_sampling")
    import comfy.model_sampling
    if isinstance(ms, comfy.model_sampling.CONST):
        raise adapters.node_error(NODE, family, "flow-matching sampling is not supported by this composition sampler.",
                                  "use an eps or v-prediction model.")
    if params.energy == "clip" and params.optimising and clip_vision is None:
        raise adapters.node_error(NODE, family, "energy is 'clip' but no clip_vision model is connected.",
                                  "connect a Load CLIP Vision node, or choose energy latent or none.")
    if params.optimising and any("control" in c[1] for c in list(positive or []) + list(negative or [])):
        raise adapters.node_error(NODE, family, "a ControlNet/T2I-Adapter is applied to the conditioning; the energy's "
                                                "gradient passes go through the composite's prediction, and the "
                                                "control model's weights (loaded under ComfyUI's inference mode) "
                                                "cannot take part in a backward pass.",
                                  "use energy none (no gradients) with a ControlNet, or remove it.")
    text = None
    if params.energy == "clip" and params.optimising and params.text_weight > 0:
        text = _text_embeds(energy_text if energy_text is not None else positive, family, energy_text is None)
    if params.optimising and params.style_gradient == "detached" and (params.energy == "latent"
                                                                      or params.text_weight == 0):
        adapters.warn_once(f"tale.detached.{params.energy}", f"{adapters.PACK_NAME} {NODE}: style_gradient=detached "
                                                             "(the released code's bug) with "
                                                             + ("the latent energy" if params.energy == "latent"
                                                                else "text_weight 0")
                           + " leaves no gradient: the gradient passes run but never move the latent. Use "
                             "style_gradient kept.")
    if params.energy == "latent" and params.optimising:
        adapters.warn_once("tale.latent.text", f"{adapters.PACK_NAME} {NODE}: energy=latent is a style term only "
                                               "(latent_weight); text_weight and style_weight are for energy=clip (the "
                                               "prompt still steers through CFG).")
    if params.energy != "none" and not params.optimising:
        adapters.warn_once("tale.noopt", f"{adapters.PACK_NAME} {NODE}: energy={params.energy} takes no gradient "
                                         "step with these settings (inner_steps, tau or the energy's weights are 0); "
                                         "the run is the no-gradient variant.")
    factor = int(vae.spacial_compression_encode())
    place = make_placement(background, foreground, object_mask, placement, placement_mask, box_x, box_y, box_scale,
                           factor, family)
    bg_lat = _encode(vae, model, place.background)
    fg_lat = _encode(vae, model, place.canvas)
    if bg_lat.shape[-2:] != place.latent_mask.shape:
        raise adapters.node_error(NODE, family, f"the VAE encodes {tuple(place.background.shape[1:3])} px to a "
                                                f"{tuple(bg_lat.shape[-2:])} latent, not {factor}x smaller.",
                                  "connect the image VAE of this model.")
    run_model = with_grad_weights(model) if params.optimising else model
    energy = None
    if params.optimising:
        if params.energy == "clip":
            energy = ClipEnergy(vae, clip_vision, model, text, place, params, family)
        else:
            energy = LatentEnergy(bg_lat, place, params)
    sigmas = comfy.samplers.calculate_sigmas(ms, params.scheduler, params.steps).float()
    report = TALEReport()
    sampler = TALESampler(params, bg_lat, fg_lat, place.latent_mask, energy, report, trace, family)
    guider = comfy.samplers.CFGGuider(run_model)
    guider.set_conds(positive, negative)
    guider.set_cfg(params.cfg)
    zeros = torch.zeros_like(bg_lat)
    out = guider.sample(zeros, zeros, sampler, sigmas, disable_pbar=True, seed=0)
    logger.info("%s %s [%s]: %s", adapters.PACK_NAME, NODE, family.name, report.summary())
    return {"samples": out.cpu()}, place.preview(), place.pixel_mask[None], report


# ----------------------------------------------------------------------------------------------
# Node
# ----------------------------------------------------------------------------------------------
class TALEComposite(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="TFG_TALEComposite",
            display_name="TALE Composite (TFG)",
            category=CATEGORY,
            description=_DESCRIPTION,
            inputs=_inputs(),
            outputs=[io.Latent.Output(display_name="composite", tooltip="The composite latent (decode with the VAE)."),
                     io.Image.Output(display_name="paste_preview",
                                     tooltip="The object pasted in pixel space without harmonisation (for A/B)."),
                     io.Mask.Output(display_name="placed_mask", tooltip="The placed object's mask on the background.")],
        )

    @classmethod
    def validate_inputs(cls, steps, t_prime_percent, tau_percent, cfg, inner_steps, text_weight, style_weight,
                        latent_weight, adain_max, box_x, box_y, box_scale) -> bool | str:
        # ComfyUI skips its own min/max checks for the inputs named here, and passes None for linked inputs
        # (their values are not known before the run): check the ranges here, and only what is known.
        values = dict(steps=steps, t_prime_percent=t_prime_percent, tau_percent=tau_percent, cfg=cfg,
                      inner_steps=inner_steps, text_weight=text_weight, style_weight=style_weight,
                      latent_weight=latent_weight, adain_max=adain_max, box_x=box_x, box_y=box_y,
                      box_scale=box_scale)
        problems = _range_problems(values)
        if not problems and None not in (steps, t_prime_percent, tau_percent):
            t_prime, tau = K.schedule_steps(steps, t_prime_percent, tau_percent)
            problems += [f"{p} (t_prime_percent {t_prime_percent} and tau_percent {tau_percent} give T'={t_prime}, "
                         f"tau={tau} at {steps} steps)" for p in TALEParams(steps=steps, t_prime=t_prime,
                                                                              tau=tau).validate()]
        if problems:
            return f"{adapters.PACK_NAME} {NODE}: " + "; ".join(problems) + ". Fix: correct these inputs."
        return True

    @classmethod
    def execute(cls, model, positive, negative, vae, background, foreground, object_mask, placement, box_x, box_y,
                box_scale, steps, t_prime_percent, tau_percent, cfg, solver, scheduler, energy, text_weight,
                style_weight, latent_weight, inner_steps, adain_max, style_gradient, history, trajectories,
                placement_mask=None, clip_vision=None, energy_text=None) -> io.NodeOutput:
        params = _params(steps, t_prime_percent, tau_percent, cfg, solver, scheduler, energy, text_weight, style_weight,
                         latent_weight, inner_steps, adain_max, style_gradient, history, trajectories)
        latent, preview, mask, _ = run_tale(model, vae, positive, negative, background, foreground, object_mask,
                                            params, placement, placement_mask, box_x, box_y, box_scale, clip_vision,
                                            energy_text)
        return io.NodeOutput(latent, preview, mask)


NODES = [TALEComposite]
