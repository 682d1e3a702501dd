"""TALE composition node (Pham et al., arXiv 2408.03637): a background IMAGE, a foreground IMAGE with its
object MASK and a placement (MASK or box) in, the composite LATENT out.

This module is the node: its input declarations, and the run inside one sampling run of ComfyUI's CFGGuider (so
model patches, conds and memory management apply). The pieces: placement (nodes/tale_placement.py), energies,
gradients through ComfyUI's models and the memory estimate (nodes/tale_energy.py), the composition loop with the
denoisers passed in (kernels/tale_loop.py), the maths (kernels/tale.py).
"""
from __future__ import annotations

import dataclasses
import logging

import torch
from comfy_api.latest import io

import comfy.model_sampling
import comfy.samplers

from ..kernels import tale as K
from ..kernels import tale_loop as L
from ..kernels.tale import TALEParams
from ..kernels.tale_loop import TALEReport
from . import adapters
from . import inputs as inp
from .inversion import model_input_scale
from .tale_energy import ClipEnergy, LatentEnergy, check_memory, text_embeds, with_grad_weights
from .tale_placement import NODE, Placement, make_placement  # noqa: F401  (re-exported for callers and tests)

logger = logging.getLogger("tfg.tale")

DEFAULTS = TALEParams()
CATEGORY = "TFG/editing"
SUPPORTED = ("sd1", "sd2", "sdxl")

_DESCRIPTION = (
    "TALE (Pham et al., arXiv 2408.03637, ACM MM 2024): training-free cross-domain composition, e.g. a photo "
    "object into a painting. Background and foreground are inverted; at step T' the object's latent is pasted "
    "into the background's (selective initiation); for tau steps the object region is normalised toward the "
    "background's latent statistics (AdaIN, weight rising to adain_max) and, with an energy, optimised by gradient "
    "steps on it (clip: CLIP image-text similarity + Gram style distance to the background, the reference; latent: "
    "a latent-space style energy); the rest is ordinary sampling. The default energy is none (initiation + "
    "normalisation, no gradients: it needs no optional input and little memory). Works on SD1.x, SD2.x and SDXL "
    "(eps/v UNets); other families raise an error. Cost: the inversion (steps - T' passes per image), (steps - T') "
    "CFG steps, and with an energy per normalisation step inner_steps extra CFG passes with a backward pass through "
    "the UNet (+ VAE decoder + CLIP vision with energy=clip; a run whose estimated memory exceeds the device's is "
    "refused before it starts). One background, foreground and mask per run; a mask of another resolution but the "
    "same aspect is resized like ComfyUI's mask inputs. Outputs the composite latent (decode with the VAE), the "
    "naive pixel paste for comparison and the placed object mask.")


def _schedule_rule(steps, t_prime_percent, tau_percent):
    t_prime, tau = K.schedule_steps(steps, t_prime_percent, tau_percent)
    problems = TALEParams(steps=steps, t_prime=t_prime, tau=tau).validate()
    if problems:
        return "; ".join(problems) + (f" (t_prime_percent {t_prime_percent} and tau_percent {tau_percent} give "
                                      f"T'={t_prime}, tau={tau} at {steps} steps)")
    return None


def _scheduler_names():
    return list(comfy.samplers.SCHEDULER_NAMES)


# ----------------------------------------------------------------------------------------------
# Node
# ----------------------------------------------------------------------------------------------
class TALEComposite(io.ComfyNode):
    INPUTS = inp.NodeInputs(NODE, [
        inp.Socket(io.Model.Input("model", tooltip="The diffusion model (SD1.x, SD2.x or SDXL). The reference uses "
                                                   "SD 2.1-base.")),
        inp.Socket(io.Conditioning.Input("positive", tooltip="The prompt describing the composite, e.g. 'an oil "
                                                             "painting of a sheep, Van Gogh style' (it steers the "
                                                             "composite and, with energy=clip, is the text target "
                                                             "unless energy_text is given)."), finite=True),
        inp.Socket(io.Conditioning.Input("negative", tooltip="Negative / unconditional prompt (e.g. empty). Also used "
                                                             "for the inversion and the background/foreground "
                                                             "trajectories (the reference uses a null 'exceptional' "
                                                             "prompt there)."), finite=True),
        inp.Socket(io.Vae.Input("vae", tooltip="The model's VAE (encodes both images; decodes the composite for "
                                               "energy=clip).")),
        inp.Socket(io.Image.Input("background", tooltip="The background (target domain, e.g. a painting), one image. "
                                                        "The composite has its size (cropped to a multiple of 8 like "
                                                        "VAE Encode)."), finite=True),
        inp.Socket(io.Image.Input("foreground", tooltip="The image that contains the object (e.g. a photo), one "
                                                        "image."), finite=True),
        inp.Socket(io.Mask.Input("object_mask", tooltip="The object in the foreground image (white = object); the "
                                                        "foreground's size (a mask of the same aspect at another "
                                                        "resolution is resized). An empty mask is an error; a full "
                                                        "one makes the whole foreground the object."), finite=True),
        inp.Choice("placement", "mask: the object is scaled to fit the bounding box of placement_mask (a mask of the "
                                "background's size, like the reference's location.png) and centred in it, aspect "
                                "kept. box: centred at (box_x, box_y), scaled by box_scale", K.PLACEMENTS,
                   param="placement.mode", paper="mask (location.png)"),
        inp.Float("box_x", "placement=box: horizontal centre of the object as a fraction of the background width "
                           "(0 = left edge, 1 = right edge)", param="placement.box_x", min=0.0, max=1.0, step=0.01),
        inp.Float("box_y", "placement=box: vertical centre as a fraction of the background height",
                  param="placement.box_y", min=0.0, max=1.0, step=0.01),
        inp.Float("box_scale", "placement=box: size of the object relative to its size in the foreground image "
                               "(1 = same pixels). The object must fit inside the background",
                  param="placement.box_scale", min=0.01, max=16.0, step=0.01),
        inp.Int("steps", "Steps of the whole schedule", paper="20", min=1, max=200),
        inp.Float("t_prime_percent", "T' as a fraction of the schedule: the object is pasted at step round(T' x "
                                     "steps) (later = more of the background's layout kept, less reshaping of the "
                                     "object)", paper="0.6 (step 12 of 20, about t=400)",
                  param=None, default=DEFAULTS.t_prime_percent, min=0.0, max=1.0, step=0.01),
        inp.Float("tau_percent", "tau as a fraction of the schedule: the number of normalisation (+ optimisation) "
                                 "steps after T' is round(tau x steps), at least 1 when > 0. T' + tau must end "
                                 "before the last step",
                  neutral="0 (paste at T', then plain sampling)", paper="0.25 (5 of 20 steps)",
                  param=None, default=DEFAULTS.tau_percent, min=0.0, max=1.0, step=0.01),
        inp.Float("cfg", "CFG scale of the composite (and of the energy's prediction)", neutral="1 (no guidance)",
                  paper="10 (main branch); the original branch 5 cross-domain, 2.5 same-domain",
                  min=0.0, max=100.0, step=0.1, round=0.01),
        inp.Choice("solver", "dpmpp_2m: DPM-Solver++ 2M (the reference); euler: DDIM-like first order", K.SOLVERS,
                   paper="dpmpp_2m"),
        inp.Choice("scheduler", "Noise schedule (ComfyUI scheduler)", _scheduler_names),
        inp.Choice("energy", "none (default): no gradients, initiation + normalisation only; needs no optional "
                             "input and about the memory of plain sampling (SDXL 1024² on an H200: 4.3 s, 6.3 GiB "
                             "peak), so it runs as it is on every supported family. latent: a latent-space style "
                             "energy (Gram of 3x3 latent patches of the object vs the background; ours, uses "
                             "latent_weight; 13.7 s, 22.3 GiB). clip: the reference energy (VAE decode + CLIP vision: "
                             "text similarity + Gram style; needs clip_vision, and on SD1.x energy_text or "
                             "text_weight 0; 13.4 s, 37.8 GiB). A run whose estimated memory exceeds the device's is "
                             "refused before it starts", K.ENERGIES, neutral="none", paper="clip"),
        inp.Float("text_weight", "energy=clip: weight of 1 - cos(CLIP image, text)", neutral="0",
                  paper="15 (ViT-B/32)", min=0.0, max=1000.0, step=0.01),
        inp.Float("style_weight", "energy=clip: weight of the Gram style distance of CLIP tokens (other encoders "
                                  "than ViT-B/32 have other scales)", neutral="0",
                  paper="0.15 (ViT-B/32 layer-2 tokens)", min=0.0, max=1000.0, step=0.001),
        inp.Float("latent_weight", "energy=latent only: weight of the latent style energy, per latent pixel (ours; "
                                   "try 0.005-0.05)", neutral="0", min=0.0, max=100.0, step=0.001),
        inp.Int("inner_steps", "Gradient steps per normalisation step (with an energy)", neutral="0", paper="3",
                min=0, max=50),
        inp.Float("adain_max", "AdaIN weight at the last normalisation step; it rises linearly from adain_max/tau",
                  neutral="0", paper="0.5 (0.1 -> 0.5)", min=0.0, max=1.0, step=0.01),
        inp.Choice("style_gradient", "kept: the style term has a gradient (our fix). detached: as the released code, "
                                     "whose style term is detached by a bug, so only the text term moves the latent",
                   K.STYLE_GRADIENTS, paper="detached (released code)"),
        inp.Choice("history", "Multistep history at the paste step. reset: none (a first-order step, like a sampler "
                              "started at T'). reblend: the background's and the object's predictions at T'-1 "
                              "blended by the mask (2 extra passes). reference: as the released code, the prediction "
                              "of a composite pasted at step 0 and denoised up to T' (T' extra CFG passes)",
                   K.HISTORIES, paper="reference (released code)"),
        inp.Choice("trajectories", "inverted: background/foreground latents at T'..T'+tau are the inversion's own "
                                   "states (the inversion stops at T'). replay: the reference's way (invert to the "
                                   "first step, then denoise background and foreground alongside; about 2 x T' more "
                                   "passes)", K.TRAJECTORIES, paper="replay (released code)"),
        inp.Socket(io.Mask.Input("placement_mask", optional=True,
                                 tooltip="placement=mask: where the object goes (the background's size, or its aspect "
                                         "at another resolution: resized; its bounding box sets centre and size; a "
                                         "full mask fills the background)."), finite=True),
        inp.Socket(io.ClipVision.Input("clip_vision", optional=True,
                                       tooltip="energy=clip: the CLIP vision model (reference: OpenAI ViT-B/32). For "
                                               "the text term its image embedding must share a space with the text "
                                               "target: CLIP-G vision with SDXL's prompt, CLIP-H vision with SD2.x's. "
                                               "SD1.x prompts have no projected text embedding: give energy_text, or "
                                               "set text_weight 0.")),
        inp.Socket(io.Conditioning.Input("energy_text", optional=True,
                                         tooltip="energy=clip: conditioning whose pooled output is the text target; "
                                                 "default: positive's. Encode the prompt with the text encoder "
                                                 "matching clip_vision (Load CLIP with clip_g for CLIP-G vision). "
                                                 "Needed for SD1.x, whose pooled output is ComfyUI's unprojected "
                                                 "CLIP-L output (not a CLIP-space embedding)."), finite=True),
    ], rules=[inp.Rule(("steps", "t_prime_percent", "tau_percent"), _schedule_rule)], defaults=DEFAULTS)
    validate_inputs = INPUTS.validator()

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="TFG_TALEComposite",
            display_name="TALE Composite (TFG)",
            category=CATEGORY,
            description=_DESCRIPTION,
            inputs=cls.INPUTS.schema(),
            outputs=[io.Latent.Output(display_name="composite", tooltip="The composite latent (decode with the VAE)."),
                     io.Image.Output(display_name="paste_preview",
                                     tooltip="The object pasted in pixel space without harmonisation (for A/B)."),
                     io.Mask.Output(display_name="placed_mask", tooltip="The placed object's mask on the background.")],
        )

    @classmethod
    def execute(cls, **values) -> io.NodeOutput:
        v = cls.INPUTS.checked(values)
        params = params_of(cls.INPUTS.params(v), v.t_prime_percent, v.tau_percent)
        latent, preview, mask, _ = run_tale(v.model, v.vae, v.positive, v.negative, v.background, v.foreground,
                                            v.object_mask, params, placement_mask=v.placement_mask,
                                            clip_vision=v.clip_vision, energy_text=v.energy_text)
        return io.NodeOutput(latent, preview, mask)


def params_of(params: TALEParams, t_prime_percent: float, tau_percent: float) -> TALEParams:
    """The node's fractions of the schedule as the kernel's T' and tau steps."""
    t_prime, tau = K.schedule_steps(params.steps, t_prime_percent, tau_percent)
    return params.replace(t_prime=t_prime, tau=tau)


# ----------------------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------------------
class TALESampler(comfy.samplers.Sampler):
    """The whole composition as one ComfyUI Sampler (run by a CFGGuider with positive/negative at cfg): the
    kernel's loop with ComfyUI's model as its denoisers."""

    def __init__(self, params: TALEParams, bg: torch.Tensor, fg: torch.Tensor, mask: torch.Tensor, energy,
                 report: TALEReport, trace: bool = False, family=None):
        self.params, self.bg, self.fg, self.mask, self.energy = params, bg, fg, mask, energy
        self.report, self.trace, self.family = report, trace, family

    def sample(self, model_wrap, sigmas, extra_args, callback, noise, latent_image=None, denoise_mask=None,
               disable_pbar=False):
        model_options, seed = extra_args["model_options"], extra_args.get("seed")
        device = noise.device
        s_in = noise.new_ones([1])
        negative = model_wrap.conds.get("negative")

        def den_cfg(x, i):
            return model_wrap(x, sigmas[i] * s_in, model_options=model_options, seed=seed)

        def den_inv(x, sigma):
            return comfy.samplers.calc_cond_batch(model_wrap.inner_model, [negative], x, sigma.reshape(1).expand(
                x.shape[0]), model_options)[0]

        input_scale = model_input_scale(model_wrap.inner_model.model_sampling)
        with adapters.StepProgress(L.total_ticks(self.params, len(sigmas) - 1)) as progress:
            try:
                return L.compose(self.params, self.bg.to(device), self.fg.to(device), self.mask.to(device), sigmas,
                                 den_cfg, den_inv, input_scale, self.energy, self.report, self.trace, progress.step,
                                 callback)
            except L.NonFiniteGradient as e:
                raise adapters.node_error(NODE, self.family, f"{e}.", "lower the energy's weights (text/style/"
                                                                      "latent_weight), or use energy none.") from None


def _encode(vae, model, image: torch.Tensor) -> torch.Tensor:
    latent = vae.encode(image)
    return model.get_model_object("latent_format").process_in(latent.float())


def _warnings(params: TALEParams) -> None:
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


def run_tale(model, vae, positive, negative, background, foreground, object_mask, params: TALEParams,
             placement=None, placement_mask=None, box_x=None, box_y=None, box_scale=None, clip_vision=None,
             energy_text=None, trace=False):
    """The node's work. Returns (LATENT dict, preview IMAGE, placed MASK, TALEReport). Placement arguments left
    None are params.placement's."""
    given = dict(mode=placement, box_x=box_x, box_y=box_y, box_scale=box_scale)
    where = dataclasses.replace(params.placement, **{k: v for k, v in given.items() if v is not None})
    params = params.replace(placement=where)
    problems = params.validate()
    family = adapters.detect_family(model)
    if problems:
        raise adapters.node_error(NODE, family, "; ".join(problems) + ".", "correct the inputs.")
    family = adapters.resolve_family(NODE, model, SUPPORTED, "this model family is not supported (TALE needs an eps/v "
                                     "UNet: SD1.x, SD2.x, SDXL).", "use an SD1.x, SD2.x or SDXL model.",
                                     "it runs as an SD UNet")
    ms = model.get_model_object("model_sampling")
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
        text = text_embeds(energy_text if energy_text is not None else positive, family, energy_text is None)
    _warnings(params)
    factor = int(vae.spacial_compression_encode())
    place = make_placement(background, foreground, object_mask, where.mode, placement_mask, where.box_x, where.box_y,
                           where.box_scale, factor, family)
    check_memory(model, vae, clip_vision, params, tuple(place.latent_mask.shape), family)
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


NODES = [TALEComposite]
