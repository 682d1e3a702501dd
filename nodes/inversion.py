"""Inversion nodes: a deterministic DDIM-style inversion (optional ReNoise iterations) over any ComfyUI sigma
schedule, for eps/v models (SD1.x, SD2.x, SDXL) and flow models (SD3, Flux). Shared by StyleSSP and TALE.

Python API (for other techniques of the pack; import read-only):

* ``InversionSampler(params)``: a ComfyUI SAMPLER (``comfy.samplers.Sampler``) that inverts instead of sampling.
  Use it with any GUIDER (CFGGuider for the negative guidance) in SamplerCustomAdvanced or ``guider.sample``;
  the noise is ignored, the latent is the clean latent, the sigmas may be a sampling schedule (descending) or a
  flipped one. After a run, ``sampler.last_result`` holds the ``kernels.inversion.InversionResult``
  (model-space states of every step).
* ``invert_latent(model, positive, negative, latent, sigmas, params)`` -> ``Inversion``: the one-call version
  (builds the guider, runs with a progress bar and interrupts). ``Inversion`` gives the final state, the
  per-step states (model space, or as a LATENT batch), the sampling schedule back, and a NOISE that makes
  SamplerCustomAdvanced start exactly at the inverted state (for every family, flow models at sigma 1 included).
* ``StartNoise(state, sigma, model)``: that NOISE for any model-space state at any sigma.
* ``model_input_scale(model_sampling)``, ``reference_early_sigma(model_sampling)``: the family-dependent pieces.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional

import torch
from comfy_api.latest import io

import comfy.model_management
import comfy.model_sampling
import comfy.sample
import comfy.samplers

from ..kernels.inversion import (AVERAGES, REFERENCE_EARLY_TIMESTEP, InversionParams, InversionResult, invert,
                                 inversion_schedule, start_noise)
from ..kernels.stylessp import OFFICIAL_INVERSION
from . import adapters
from . import inputs as inp

DEFAULTS = InversionParams()
"""Defaults of the Python API (InversionSampler, invert_latent): plain DDIM inversion, as TALE uses it."""
NODE_DEFAULTS = OFFICIAL_INVERSION
"""Defaults of the two nodes: the official StyleSSP inversion they exist for."""
CATEGORY = "TFG/editing"
NODE = "Inversion"
SAMPLER_NODE = "Inversion Sampler"

_PAPERS = ("DDIM inversion (Song et al., arXiv 2010.02502; Mokady et al., arXiv 2211.09794) with optional ReNoise "
           "iterations (Garibi et al., arXiv 2403.14602), as used by StyleSSP (arXiv 2501.11319) and TALE "
           "(arXiv 2408.03637)")
_FAMILIES = ("Works on SD1.x, SD2.x, SDXL (eps and v prediction) and flow models (SD3, Flux; the inversion may "
             "end at sigma 1, nothing is divided by 1 - sigma).")


# ----------------------------------------------------------------------------------------------
# Family-dependent pieces
# ----------------------------------------------------------------------------------------------
def model_input_scale(model_sampling):
    """input_scale(sigma_from, sigma_to) for this model: the ratio of its input scalings c_in(from)/c_in(to)
    (eps/v: sqrt(1 + to^2)/sqrt(1 + from^2); flow: 1), so the network sees the current state as at sigma_from."""
    one = torch.ones(1)

    def scale(sigma_from: float, sigma_to: float) -> float:
        a = float(model_sampling.calculate_input(torch.tensor([float(sigma_from)]), one)[0])
        b = float(model_sampling.calculate_input(torch.tensor([float(sigma_to)]), one)[0])
        return a / b

    return scale


def reference_early_sigma(model_sampling) -> float:
    """The sigma of ReNoise's first_step_max_timestep (DDPM t = 250 of 1000) for this model: 3/4 of the way
    through its schedule (discrete models: sigma(250); flow models: the (shifted) sigma at t = 0.25)."""
    return float(model_sampling.percent_to_sigma(1.0 - REFERENCE_EARLY_TIMESTEP / 1000.0))


def _max_denoise(model_sampling, sigma: float) -> bool:
    """KSAMPLER.max_denoise: the sampler scales noise by sqrt(1 + sigma^2) when it starts at sigma_max."""
    max_sigma = float(model_sampling.sigma_max)
    return math.isclose(max_sigma, sigma, rel_tol=1e-05) or sigma > max_sigma


# ----------------------------------------------------------------------------------------------
# The SAMPLER
# ----------------------------------------------------------------------------------------------
class InversionSampler(comfy.samplers.Sampler):
    """A SAMPLER that inverts: walks the sigmas upward from the (clean) latent with DDIM steps, guidance from the
    guider it is run with. Deterministic; the noise given to it is ignored."""

    def __init__(self, params: InversionParams = DEFAULTS, node_name: str = SAMPLER_NODE, keep_trajectory=True):
        problems = params.validate()
        if problems:
            raise adapters.node_error(node_name, None, "; ".join(problems), "correct the inputs.")
        self.params = params
        self.node_name = node_name
        self.keep_trajectory = keep_trajectory
        self.last_result: Optional[InversionResult] = None
        """The InversionResult of the last run (model-space states); replaced by every run."""

    def sample(self, model_wrap, sigmas, extra_args, callback, noise, latent_image=None, denoise_mask=None,
               disable_pbar=False):
        self.last_result = None
        inner = model_wrap.inner_model
        family = adapters.detect_family(getattr(model_wrap, "model_patcher", inner))
        if latent_image is None:
            raise adapters.node_error(self.node_name, family, "no latent to invert was given.",
                                      "connect the VAE-encoded image as the latent.")
        if inp.non_finite(latent_image):  # once per run, before the loop
            raise adapters.node_error(self.node_name, family, "the latent to invert holds NaN or infinite values.",
                                      "check the node that makes it (e.g. a VAE in fp16 or a broken image).")
        if noise is not None and bool(torch.count_nonzero(noise)):
            adapters.warn_once(f"inversion.noise.{self.node_name}",
                               f"{adapters.PACK_NAME} {self.node_name} [model family: {family.name}]: inversion is "
                               "deterministic and ignores the noise input. Connect DisableNoise to the sampler node "
                               "to make that explicit.")
        if denoise_mask is not None:
            adapters.warn_once(f"inversion.mask.{self.node_name}",
                               f"{adapters.PACK_NAME} {self.node_name} [model family: {family.name}]: the latent's "
                               "noise mask is ignored: the whole latent is inverted.")
        try:
            schedule = inversion_schedule(sigmas)
        except ValueError as e:
            raise adapters.node_error(self.node_name, family, f"unusable sigmas: {e}.",
                                      "connect a scheduler's SIGMAS (e.g. BasicScheduler), flipped or not.") from None
        model_sampling = inner.model_sampling
        params = self.params
        if params.noise_regularization and isinstance(model_sampling, comfy.model_sampling.CONST):
            adapters.warn_once(f"inversion.flow_regularizer.{self.node_name}",
                               f"{adapters.PACK_NAME} {self.node_name} [model family: {family.name}]: "
                               "noise_regularization skipped: the regulariser pushes noise predictions toward "
                               "Gaussian statistics, but a flow model predicts velocities (said once; turn it off "
                               "to silence this).")
            params = params.replace(noise_regularization=False)
        if params.average == "reference":
            params = params.replace(early_sigma=reference_early_sigma(model_sampling))
        model_options = extra_args.get("model_options", {})
        seed = extra_args.get("seed")
        steps = len(schedule) - 1

        def denoise(x: torch.Tensor, sigma: float) -> torch.Tensor:
            adapters.check_interrupt()
            s = torch.full((x.shape[0],), sigma, device=x.device, dtype=torch.float32)
            return model_wrap(x, s, model_options=model_options, seed=seed)

        def on_step(i: int, x: torch.Tensor, d: torch.Tensor) -> None:
            if callback is not None:
                callback(i, d, x, steps)

        result = invert(denoise, latent_image, schedule, params, model_input_scale(model_sampling), on_step,
                        keep_trajectory=self.keep_trajectory)
        self.last_result = result
        adapters.logger.info("%s %s [%s]: inverted %d steps, sigma %.4g -> %.4g, %d guider calls (renoise %d, %s)",
                             adapters.PACK_NAME, self.node_name, family.name, steps, float(schedule[0]),
                             float(schedule[-1]), result.evaluations, params.renoise_steps, params.average)
        return result.latent


# ----------------------------------------------------------------------------------------------
# NOISE that starts a sampler at a given state
# ----------------------------------------------------------------------------------------------
class StartNoise:
    """A NOISE for SamplerCustomAdvanced (any KSAMPLER-based sampler) that makes sampling start exactly at a
    model-space `state` at `sigma`, whatever latent is connected: ComfyUI starts at
    noise_scaling(sigma, noise, latent) (eps: sigma*noise + latent; flow: sigma*noise + (1 - sigma)*latent), so the
    noise returned is the one that lands on the state. Works at sigma = 1 for flow models, where a LATENT with
    add_noise disabled cannot (its latent is multiplied by 1 - sigma = 0). Use it with sigmas starting at `sigma`."""

    def __init__(self, state: torch.Tensor, sigma: float, model, seed: int = 0):
        self.state = state.detach().to("cpu", torch.float32)
        self.sigma = float(sigma)
        self.seed = seed
        base = getattr(model, "model", model)
        self._process_in = base.process_latent_in
        self._model_sampling = model.get_model_object("model_sampling") if hasattr(model, "get_model_object") \
            else base.model_sampling
        self._family = adapters.detect_family(model)

    def generate_noise(self, input_latent: dict) -> torch.Tensor:
        latent = input_latent["samples"].detach().to("cpu", torch.float32)
        if tuple(latent.shape) != tuple(self.state.shape):
            raise adapters.node_error(
                "Inversion (start noise)", self._family,
                f"the sampler's latent is {tuple(latent.shape)} but the inverted state is {tuple(self.state.shape)}.",
                "connect a latent of the inverted image's size and batch (e.g. the latent that was inverted).")
        if torch.count_nonzero(latent) > 0:  # ComfyUI leaves an all-zero (empty) latent unshifted
            latent = self._process_in(latent)
        ms = self._model_sampling
        sigma = torch.tensor([self.sigma])
        max_denoise = _max_denoise(ms, self.sigma)
        noise_gain = float(ms.noise_scaling(sigma, torch.ones(1), torch.zeros(1), max_denoise)[0])
        latent_gain = float(ms.noise_scaling(sigma, torch.zeros(1), torch.ones(1), max_denoise)[0])
        return start_noise(self.state, latent, noise_gain, latent_gain)


# ----------------------------------------------------------------------------------------------
# One-call inversion
# ----------------------------------------------------------------------------------------------
@dataclass
class Inversion:
    """An inversion's outputs. `result` holds model-space states; the methods convert for ComfyUI sockets."""

    result: InversionResult
    model: Any
    """The ModelPatcher that was inverted with."""

    @property
    def sigma(self) -> float:
        """The sigma of the final state."""
        return float(self.result.sigmas[-1])

    def _out(self, x: torch.Tensor) -> torch.Tensor:
        base = getattr(self.model, "model", self.model)
        return base.process_latent_out(x.detach().to("cpu", torch.float32))

    def latent(self) -> dict:
        """The final state as a LATENT (process_latent_out of the model-space state; no division by 1 - sigma).
        For eps/v models this LATENT, sampled with add_noise disabled from `sampling_sigmas()`, starts exactly
        at the state; for flow models use `noise()` instead."""
        return {"samples": self._out(self.result.latent)}

    def trajectory_latent(self) -> dict:
        """Every state x_0 .. x_N as one LATENT batch, step-major ((N + 1) * B rows; rows i*B .. i*B + B - 1 are
        step i, at sigmas()[i] ascending)."""
        if not self.result.trajectory:
            raise ValueError("this inversion kept no trajectory")
        return {"samples": torch.cat([self._out(x) for x in self.result.trajectory], dim=0)}

    def sigmas(self) -> torch.Tensor:
        """The ascending schedule that was walked (float32)."""
        return self.result.sigmas.to(torch.float32)

    def sampling_sigmas(self) -> torch.Tensor:
        """The schedule to sample back along (descending, from the final state's sigma)."""
        return self.result.sigmas.flip(0).to(torch.float32)

    def noise(self, seed: int = 0) -> StartNoise:
        """A NOISE that starts SamplerCustomAdvanced exactly at the final state (with `sampling_sigmas()`)."""
        return StartNoise(self.result.latent, self.sigma, self.model, seed)


def make_inversion_guider(model, positive, negative, cfg: float, node_name: str = NODE):
    """A CFGGuider over (positive, negative) at scale cfg, or over the positive alone when negative is None (then
    cfg must be 1). ComfyUI batches each conditioning with its own copy of the latent: no pairing mix-up."""
    guider = comfy.samplers.CFGGuider(model)
    if negative is None:
        if not math.isclose(cfg, 1.0):
            raise adapters.node_error(node_name, adapters.detect_family(model),
                                      f"cfg is {cfg} but no negative conditioning is connected, so there is nothing "
                                      "to guide away from.", "connect a negative conditioning, or set cfg to 1.")
        guider.inner_set_conds({"positive": positive})
    else:
        guider.set_conds(positive, negative)
    guider.set_cfg(cfg)
    return guider


def invert_latent(model, positive, negative, latent, sigmas: torch.Tensor, params: InversionParams = DEFAULTS,
                  node_name: str = NODE, progress: bool = True, keep_trajectory: bool = True,
                  seed: int = 0) -> Inversion:
    """Invert a LATENT dict (or a latent tensor in LATENT space) with guidance params.cfg between positive and
    negative (negative None = plain conditional inversion). Progress bar and interrupts; deterministic."""
    problems = params.validate()
    if problems:
        raise adapters.node_error(node_name, None, "; ".join(problems), "correct the inputs.")
    family = adapters.detect_family(model)
    samples = latent["samples"] if isinstance(latent, dict) else latent
    if isinstance(latent, dict) and "noise_mask" in latent:
        adapters.warn_once(f"inversion.latentmask.{node_name}",
                           f"{adapters.PACK_NAME} {node_name} [model family: {family.name}]: the latent's noise mask "
                           "is ignored: the whole latent is inverted.")
    if samples.dim() != 4:
        raise adapters.node_error(node_name, family, f"the latent is {samples.dim()}-D; this inversion handles image "
                                  "latents (B, C, H, W).", "use an image model and its VAE-encoded image.")
    samples = comfy.sample.fix_empty_latent_channels(model, samples)
    channels = model.get_model_object("latent_format").latent_channels
    if samples.shape[1] != channels:
        raise adapters.node_error(node_name, family, f"the latent has {samples.shape[1]} channels, the model uses "
                                  f"{channels}.", "encode the image with this model's VAE.")
    try:
        steps = len(inversion_schedule(sigmas)) - 1
    except ValueError as e:
        raise adapters.node_error(node_name, family, f"unusable sigmas: {e}.",
                                  "connect a scheduler's SIGMAS (e.g. BasicScheduler), flipped or not.") from None
    guider = make_inversion_guider(model, positive, negative, params.cfg, node_name)
    sampler = InversionSampler(params, node_name, keep_trajectory)
    bar = adapters.StepProgress(steps) if progress else None
    callback = (lambda i, d, x, total: bar.step()) if bar is not None else None
    guider.sample(torch.zeros_like(samples), samples, sampler, torch.as_tensor(sigmas), callback=callback,
                  disable_pbar=True, seed=seed)
    result = sampler.last_result
    device = comfy.model_management.intermediate_device()
    result.latent = result.latent.to(device)
    result.trajectory = [x.to(device) for x in result.trajectory]
    result.denoised = [d.to(device) for d in result.denoised]
    return Inversion(result, model)


# ----------------------------------------------------------------------------------------------
# Nodes
# ----------------------------------------------------------------------------------------------
RENOISE_INPUTS = [
    inp.Int("renoise_steps", "ReNoise fixed-point iterations per step, after the first evaluation: each "
            "re-evaluates the model on the current estimate of the next latent (one more guider call each)",
            neutral="0 (plain DDIM inversion)", paper="StyleSSP official 1; ReNoise paper 1-9", min=0, max=100),
    inp.Choice("renoise_average", "How ReNoise iterations are combined. last: the last iterate (plain fixed point). "
               "mean: the mean of all iterations' predictions. reference: the StyleSSP/ReNoise setting (below DDPM "
               "t=250: at most 5 iterations, averaged; above: iterations 8-9 averaged, i.e. the last iterate with "
               "fewer). No effect at renoise_steps 0", AVERAGES, param="average",
               paper="StyleSSP official: reference"),
    inp.Bool("noise_regularization", "The pix2pix-zero noise regulariser of the StyleSSP/ReNoise code: gradient "
             "steps pulling each noise prediction toward Gaussian statistics (patch KL to the prediction on the "
             "forward-noised image, zero auto-correlation; lambdas 0.065 / 20, 4 steps, 5 rolls), on the iterations "
             "the reference regularises (renoise_average reference: the early steps). One more guider call on "
             "those steps; fixed seed. eps/v models (SD1.x, SD2.x, SDXL) only: a flow model (SD3, Flux) predicts "
             "velocities, so there it is skipped with a warning", neutral="off", paper="StyleSSP official: on"),
]


class InversionSamplerNode(io.ComfyNode):
    """SAMPLER for SamplerCustomAdvanced: inverts the connected latent instead of sampling."""

    INPUTS = inp.NodeInputs(SAMPLER_NODE, list(RENOISE_INPUTS), defaults=NODE_DEFAULTS)
    validate_inputs = INPUTS.validator()

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="TFG_InversionSampler",
            display_name="Inversion Sampler (TFG)",
            category=CATEGORY,
            description=(
                f"{_PAPERS}. A SAMPLER for SamplerCustomAdvanced that inverts instead of sampling: from the clean "
                "latent it walks the sigmas upward with deterministic DDIM steps (the model evaluated at the next "
                "sigma on the current latent, as DDIM inversion does), guided by the GUIDER you connect (CFGGuider: "
                "eps(negative) + cfg * (eps(positive) - eps(negative)), the negative guidance of StyleSSP at cfg "
                "1.5; BasicGuider: plain conditional inversion). Connect DisableNoise (the noise is ignored), the "
                "image's latent, and a scheduler's sigmas (descending or flipped). The output is the inverted "
                f"latent. Defaults: the official StyleSSP inversion (ReNoise 1, reference averaging, regulariser). "
                f"{_FAMILIES} Cost: (1 + renoise_steps) guider calls per step (+1 where the noise regulariser "
                "acts). For the per-step latents and a NOISE to sample back, use Inversion (TFG)."),
            inputs=cls.INPUTS.schema(),
            outputs=[io.Sampler.Output(tooltip="The inversion sampler: use in SamplerCustomAdvanced.")],
        )

    @classmethod
    def execute(cls, **values) -> io.NodeOutput:
        v = cls.INPUTS.checked(values)
        return io.NodeOutput(InversionSampler(cls.INPUTS.params(v), SAMPLER_NODE))


class InvertNode(io.ComfyNode):
    """One-node inversion with outputs to sample back from and the per-step latents."""

    INPUTS = inp.NodeInputs(NODE, [
        inp.Socket(io.Model.Input("model", tooltip="The model to invert with.")),
        inp.Socket(io.Conditioning.Input("positive", tooltip="The conditioning to invert with (StyleSSP: content "
                                                             "prompt + style tokens)."), finite=True),
        inp.Socket(io.Latent.Input("latent", tooltip="The clean latent of the image (VAE Encode)."), finite=True),
        inp.Socket(io.Sigmas.Input("sigmas", tooltip="The schedule (e.g. BasicScheduler; StyleSSP: ddim_uniform, 50 "
                                                     "steps). Descending or flipped: walked from low to high sigma. "
                                                     "Use the same sigmas to sample back."), finite=True),
        inp.Float("cfg", "Inversion guidance scale between positive and negative: eps(negative) + cfg * "
                  "(eps(positive) - eps(negative)); more reduces content leakage. Used only with a negative "
                  "connected: without one the inversion is plain conditional (a warning says so unless cfg is 1)",
                  neutral="1 (plain conditional inversion, one pass per evaluation)",
                  paper="StyleSSP official 1.5; paper range 1-3", min=0.0, max=100.0, step=0.05),
        *RENOISE_INPUTS,
        inp.Socket(io.Conditioning.Input("negative", optional=True,
                                         tooltip="Optional conditioning to guide away from at cfg (StyleSSP: the "
                                                 "style image's content and the content image's style). Without it "
                                                 "the inversion is plain conditional."), finite=True),
    ], defaults=NODE_DEFAULTS)
    validate_inputs = INPUTS.validator()

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="TFG_Inversion",
            display_name="Inversion (TFG)",
            category=CATEGORY,
            description=(
                f"{_PAPERS}. Inverts a VAE-encoded image deterministically along the sigmas (a scheduler's "
                "sampling schedule; walked upward), with guidance eps(negative) + cfg * (eps(positive) - "
                "eps(negative)) (StyleSSP's negative guidance) or, without a negative, plain conditional "
                "inversion; optional ReNoise iterations. Defaults: the official StyleSSP inversion (cfg 1.5 "
                "against the negative, ReNoise 1 with reference averaging, noise regulariser on eps/v models; "
                "with ddim_uniform 50-step sigmas). Outputs: the inverted latent; every step's latent as one "
                "batch (step-major, for reuse); the sigmas to sample back with (descending); and a NOISE that makes "
                "SamplerCustomAdvanced start exactly at the inverted latent with those sigmas (connect any latent of "
                "the same size, e.g. the original). The inverted LATENT can also be sampled directly with add_noise "
                f"disabled on SD1.x/SDXL (not on flow models: use the NOISE). {_FAMILIES} Cost: (1 + renoise_steps) "
                "guider calls per step (+1 where the noise regulariser acts), each 2 model passes when cfg != 1."),
            inputs=cls.INPUTS.schema(),
            outputs=[
                io.Latent.Output("inverted", tooltip="The inverted latent (the state at the highest sigma)."),
                io.Latent.Output("trajectory", tooltip="Every step's latent, from the clean one to the inverted "
                                                       "one, as a batch (step-major)."),
                io.Sigmas.Output("sampling_sigmas", tooltip="The schedule to sample back along (descending)."),
                io.Noise.Output("start_noise", tooltip="For SamplerCustomAdvanced: starts sampling exactly at the "
                                                       "inverted latent with the sampling_sigmas output, whatever "
                                                       "latent of this size is connected."),
            ],
        )

    @classmethod
    def execute(cls, **values) -> io.NodeOutput:
        v = cls.INPUTS.checked(values)
        params = cls.INPUTS.params(v)
        if v.negative is None and not math.isclose(params.cfg, 1.0):
            adapters.warn_once(f"inversion.cfg_without_negative.{NODE}",
                               f"{adapters.PACK_NAME} {NODE} [model family: {adapters.detect_family(v.model).name}]: "
                               f"cfg is {params.cfg:g} but no negative conditioning is connected, so the inversion "
                               "is plain conditional (cfg not used). Connect a negative (StyleSSP: the style image's "
                               "content) for the negative guidance, or set cfg to 1 to silence this (said once).")
            params = params.replace(cfg=1.0)
        inv = invert_latent(v.model, v.positive, v.negative, v.latent, v.sigmas, params, NODE)
        return io.NodeOutput(inv.latent(), inv.trajectory_latent(), inv.sampling_sigmas(), inv.noise())


NODES = [InversionSamplerNode, InvertNode]
