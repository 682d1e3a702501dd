"""StyleSSP nodes: the frequency manipulation of an inverted latent and the sampling start point (inverted latent
x frequency manipulation + the reference's hidden noised-content term), handed to the user's own sampler with the
sigmas to continue from, so style adapters and ControlNets are attached as usual. The inversion itself is
Inversion (TFG) (nodes/inversion.py) with a negative conditioning at cfg 1.5."""
from __future__ import annotations

import torch
from comfy_api.latest import io

import comfy.model_sampling

from ..kernels.inversion import inversion_schedule
from ..kernels.stylessp import MODES, SCHEDULES, StyleSSPParams, manipulate, reference_resume_timesteps, start_point
from . import adapters
from . import inputs as inp
from .inversion import StartNoise, model_input_scale

DEFAULTS = StyleSSPParams()
CATEGORY = "TFG/editing"
NODE = "StyleSSP Start Point"
FREQ_NODE = "StyleSSP Frequency"
SUPPORTED = ("sd1", "sd2", "sdxl", "sd3", "flux")

_PAPER = ("StyleSSP (Xu et al., arXiv 2501.11319, CVPR 2025): training-free style transfer improves the sampling "
          "start point")
_FM = ("Frequency manipulation, mode faithful (the official code): a 3-D FFT over channels and space of the "
       "inverted latent, spectral gain alpha*M + (1-M) with the reference's Gaussian band mask M (d_s 0.3, d_t 0.9; "
       "gain 0.70 at the zero frequency, about 0.9 at mid spatial frequencies), plus Gaussian noise scaled to the "
       "latent's range times noise_strength (0.3). Mode improved (ours): per-channel 2-D low-frequency reduction "
       "(gain 1 - strength at the zero frequency, Gaussian radius) plus std-matched noise.")
_FAMILIES = "Works on SD1.x, SD2.x, SDXL, SD3 and Flux latents (the official code is SDXL only)."


def _seed_noise(seed: int, shape, count: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(int(seed) % (2 ** 63))
    return [torch.randn(tuple(shape), generator=g) for _ in range(count)]


SEED = inp.Seed("seed", "Seed of the added frequency-manipulation noise (Start Point: and of the content term's "
                "noise)", paper="official seed 1234 (its noise streams differ from diffusers')")

FREQUENCY_INPUTS = [
    inp.Choice("mode", "faithful: the official freq_exp (3-D FFT over channels and space, band mask, range-matched "
               "noise). improved: per-channel 2-D low-frequency reduction with radius/strength and std-matched "
               "noise (ours)", MODES, paper="faithful (the official code)"),
    inp.Float("alpha", "faithful: spectral gain alpha*M + (1-M) (DC gain = alpha)", neutral="1",
              paper="official 0.7 (DC gain 0.70)", min=0.0, max=2.0, step=0.01),
    inp.Float("d_s", "faithful: low-pass stop frequency of the band mask (normalised, 1 = Nyquist); 0 disables the "
              "mask (gain 1)", neutral="0", paper="official 0.3", min=0.0, max=4.0, step=0.01),
    inp.Float("d_t", "faithful: high-pass stop frequency of the band mask (normalised)", paper="official 0.9",
              min=0.0, max=4.0, step=0.01),
    inp.Float("radius", "improved: Gaussian radius of the reduced low-frequency band (normalised frequency, "
              "1 = Nyquist); default 0.3 like d_s", neutral="0", min=0.0, max=4.0, step=0.01),
    inp.Float("strength", "improved: attenuation at the zero frequency (gain 1 - strength); default 0.3 = the "
              "faithful DC gain 0.70", neutral="0", min=-1.0, max=1.0, step=0.01),
    inp.Float("noise_strength", "Added Gaussian noise relative to the latent (faithful: scaled to the range of the "
              "latent; the reference ties it to alpha as 1 - alpha, so change both together to stay faithful; "
              "improved: std-matched per channel)", neutral="0", paper="official 1 - alpha = 0.3",
              min=0.0, max=4.0, step=0.01),
]


def _model_space(model, latent: dict, what: str, node: str, family) -> torch.Tensor:
    samples = latent["samples"]
    if samples.dim() != 4:
        raise adapters.node_error(node, family, f"the {what} latent is {samples.dim()}-D; StyleSSP handles image "
                                  "latents (B, C, H, W).", "use an image model.")
    base = getattr(model, "model", model)
    channels = model.get_model_object("latent_format").latent_channels
    if samples.shape[1] != channels:
        raise adapters.node_error(node, family, f"the {what} latent has {samples.shape[1]} channels, the model "
                                  f"uses {channels}.", "use latents made with this model's VAE.")
    return base.process_latent_in(samples.detach().to("cpu", torch.float32))


class StyleSSPFrequency(io.ComfyNode):
    """LATENT -> LATENT: StyleSSP's frequency manipulation alone."""

    INPUTS = inp.NodeInputs(FREQ_NODE, [
        inp.Socket(io.Model.Input("model", tooltip="The model whose latents these are (for the latent format).")),
        inp.Socket(io.Latent.Input("latent", tooltip="The latent to manipulate, normally Inversion (TFG)'s inverted "
                                                     "output."), finite=True),
        SEED,
        *FREQUENCY_INPUTS,
    ], defaults=DEFAULTS)
    validate_inputs = INPUTS.validator()

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="TFG_StyleSSPFrequency",
            display_name="StyleSSP Frequency (TFG)",
            category=CATEGORY,
            description=(f"{_PAPER}. {_FM} Applied to the latent in the model's space (the model input gives its "
                         f"latent format). {_FAMILIES} Cost: two FFTs of the latent, no model pass. For the full "
                         "start point (with the sigmas to sample from), use StyleSSP Start Point (TFG)."),
            inputs=cls.INPUTS.schema(),
            outputs=[io.Latent.Output("manipulated", tooltip="The manipulated latent.")],
        )

    @classmethod
    def execute(cls, **values) -> io.NodeOutput:
        v = cls.INPUTS.checked(values)
        params = cls.INPUTS.params(v)
        family = adapters.require_family(FREQ_NODE, v.model, SUPPORTED)
        x = _model_space(v.model, v.latent, "input", FREQ_NODE, family)
        noise, = _seed_noise(params.seed, x.shape, 1)
        out = manipulate(x, noise, params)
        base = getattr(v.model, "model", v.model)
        result = {k: val for k, val in v.latent.items() if k != "samples"}
        result["samples"] = base.process_latent_out(out).to(v.latent["samples"].dtype)
        return io.NodeOutput(result)


class StyleSSPStartPoint(io.ComfyNode):
    """Inverted latent -> StyleSSP start point: LATENT + SIGMAS (+ NOISE) for the user's sampler."""

    INPUTS = inp.NodeInputs(NODE, [
        inp.Socket(io.Model.Input("model", tooltip="The model that inverted the latent and will sample.")),
        inp.Socket(io.Latent.Input("inverted", tooltip="Inversion (TFG)'s inverted output (the content image "
                                                       "inverted along sigmas)."), finite=True),
        inp.Socket(io.Latent.Input("content", tooltip="The clean content latent (VAE Encode of the content image), "
                                                      "for the hidden extra term. Batch 1 or the inverted latent's "
                                                      "batch (batch 1 is used for every image)."), finite=True),
        inp.Socket(io.Sigmas.Input("sigmas", tooltip="The schedule the inversion used (descending; official: "
                                                     "ddim_uniform, 50 steps): gives the inverted latent's sigma and "
                                                     "the step count of the sampling schedule."), finite=True),
        SEED,
        *FREQUENCY_INPUTS,
        inp.Float("content_weight", "Weight of the reference's hidden extra term: + weight x (content latent noised "
                  "to the start sigma)", neutral="0", paper="official 0.2 (not in the paper's text)",
                  min=0.0, max=4.0, step=0.01),
        inp.Choice("schedule", "The sigmas sampling resumes along. reference: the official pipeline's - diffusers' "
                   "UniPC 'leading' timesteps for as many steps as the inversion (1000 // (steps + 1) apart, "
                   "offset 1), minus the first skip_steps: for 50 steps t = 932, 913, ..., 20, then 0 (the "
                   "inversion ended at t = 981; flow models: the same fractions of their schedule). inversion: the "
                   "inversion's own sigmas from skip_steps on (matched schedules; with skip_steps 0 the neutral "
                   "hand-off)", SCHEDULES, paper="official: reference"),
        inp.Int("skip_steps", "Start sampling this many steps into the sampling schedule (must be below the "
                "inversion's step count)", neutral="0 with schedule inversion (start where the inversion ended)",
                paper="official 1 (strength 0.9999 of 50 steps)", min=0, max=1000),
    ], defaults=DEFAULTS)
    validate_inputs = INPUTS.validator()

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="TFG_StyleSSPStartPoint",
            display_name="StyleSSP Start Point (TFG)",
            category=CATEGORY,
            description=(
                f"{_PAPER}. Builds the start point from the content image's inverted latent (Inversion (TFG) with "
                "the style image's content as the negative, cfg 1.5, ReNoise 1): "
                f"{_FM} Sampling then resumes where the reference does (schedule reference: the official "
                "pipeline samples on diffusers' UniPC 'leading' timesteps and skips the first one (strength "
                "0.9999): for 50 steps it resumes at t = 932, not at the inversion's end t = 981; schedule "
                "inversion: along the inversion's own sigmas from skip_steps); the manipulated latent is reused "
                "there at the same network-input scale, as the reference does, plus the reference's hidden extra "
                "term content_weight (0.2) x the content latent noised to that sigma. Outputs: the start LATENT for "
                "a sampler with add_noise disabled (SamplerCustomAdvanced + DisableNoise with the output sigmas; "
                "with schedule inversion also KSamplerAdvanced with add_noise disable, start_at_step = skip_steps, "
                "same steps and scheduler), the SIGMAS to sample along, and a NOISE that starts "
                "SamplerCustomAdvanced exactly there with any latent of the same size (needed for flow models "
                "when sampling starts at sigma 1). Attach "
                f"your style adapter (IPAdapter style transfer) and ControlNets to that sampler. {_FAMILIES} "
                "Cost: FFTs only, no model pass."),
            inputs=cls.INPUTS.schema(),
            outputs=[
                io.Latent.Output("start_latent",
                                 tooltip="The start latent for a sampler with add_noise disabled (starts at the first "
                                         "of the output sigmas)."),
                io.Sigmas.Output("start_sigmas",
                                 tooltip="The sigmas to sample along (the schedule from skip_steps on)."),
                io.Noise.Output("start_noise",
                                tooltip="For SamplerCustomAdvanced: starts exactly at the start point with the output "
                                        "sigmas, whatever latent of the same size is connected."),
            ],
        )

    @classmethod
    def execute(cls, **values) -> io.NodeOutput:
        v = cls.INPUTS.checked(values)
        params = cls.INPUTS.params(v)
        start = build_start_point(v.model, v.inverted, v.content, v.sigmas, params)
        return io.NodeOutput(start.latent, start.sigmas, start.noise)


class StartPoint:
    """What build_start_point returns: the model-space state, its sigma, and the three node outputs."""

    def __init__(self, state: torch.Tensor, sigma: float, latent: dict, sigmas: torch.Tensor, noise: StartNoise):
        self.state, self.sigma, self.latent, self.sigmas, self.noise = state, sigma, latent, sigmas, noise


def build_start_point(model, inverted: dict, content: dict, sigmas: torch.Tensor, params: StyleSSPParams = DEFAULTS,
                      node: str = NODE) -> StartPoint:
    """The StyleSSP start point (Python API of the node); its noise streams come from params.seed."""
    problems = params.validate()
    if problems:
        raise adapters.node_error(node, None, "; ".join(problems), "correct the inputs.")
    family = adapters.require_family(node, model, SUPPORTED)
    try:
        schedule = inversion_schedule(sigmas).flip(0)  # descending
    except ValueError as e:
        raise adapters.node_error(node, family, f"unusable sigmas: {e}.",
                                  "connect the sigmas the inversion used.") from None
    steps = len(schedule) - 1
    if params.skip_steps >= steps:
        raise adapters.node_error(node, family, f"skip_steps is {params.skip_steps} but the schedule has only "
                                  f"{steps} steps.", f"use skip_steps below {steps} (official: 1 of 50).")
    ms = model.get_model_object("model_sampling")
    sampling = sampling_sigmas(ms, schedule, params.schedule, params.skip_steps, node, family)
    x = _model_space(model, inverted, "inverted", node, family)
    x0 = _model_space(model, content, "content", node, family)
    if x0.shape[0] == 1 and x.shape[0] > 1:
        x0 = x0.expand(x.shape[0], -1, -1, -1)
    if x0.shape != x.shape:
        what = "batch size" if x0.shape[1:] == x.shape[1:] else "size"
        raise adapters.node_error(node, family, f"the content latent is {tuple(x0.shape)} but the inverted latent "
                                  f"is {tuple(x.shape)} (different {what}).",
                                  "connect the latent that was inverted as content (or a batch-1 content latent of "
                                  "the same size, used for every image).")
    fm_noise, content_noise = _seed_noise(params.seed, x.shape, 2)
    manipulated = manipulate(x, fm_noise, params)
    sigma_end, sigma_start = float(schedule[0]), float(sampling[0])
    if sigma_start > sigma_end * (1.0 + 1e-6):
        adapters.warn_once(
            f"stylessp.above_end.{node}",
            f"{adapters.PACK_NAME} {node} [model family: {family.name}]: sampling resumes at sigma {sigma_start:.4g}, "
            f"above the inverted latent's sigma {sigma_end:.4g} (schedule {params.schedule!r} for {steps} steps): the "
            "latent is treated as noisier than it is. Invert along the full schedule (BasicScheduler denoise 1, "
            "ddim_uniform), or use schedule 'inversion'.")
    scale = model_input_scale(ms)(sigma_end, sigma_start)
    s = torch.tensor([sigma_start])
    noise_gain = float(ms.noise_scaling(s, torch.ones(1), torch.zeros(1), False)[0])
    latent_gain = float(ms.noise_scaling(s, torch.zeros(1), torch.ones(1), False)[0])
    state = start_point(manipulated, x0, content_noise, scale, noise_gain, latent_gain, params.content_weight)
    base = getattr(model, "model", model)
    if latent_gain != 0.0:
        latent_samples = base.process_latent_out(state / latent_gain)
    else:
        adapters.warn_once(
            f"stylessp.latent_at_one.{family.key}",
            f"{adapters.PACK_NAME} {node} [model family: {family.name}]: sampling starts at sigma {sigma_start:g}, "
            "where a flow model's sampler multiplies the latent by 1 - sigma = 0, so the LATENT output cannot start "
            "there with add_noise disabled (it holds the raw start state). Use the NOISE output with "
            "SamplerCustomAdvanced, or skip_steps >= 1.")
        latent_samples = base.process_latent_out(state)
    latent = {k: v for k, v in inverted.items() if k not in ("samples", "noise_mask")}
    latent["samples"] = latent_samples
    adapters.logger.info("%s %s [%s]: mode=%s, schedule %s, start sigma %.4g (%d sampling steps; inverted %d steps "
                         "to %.4g), content term %g", adapters.PACK_NAME, node, family.name, params.mode,
                         params.schedule, sigma_start, len(sampling) - 1, steps, sigma_end, params.content_weight)
    return StartPoint(state, sigma_start, latent, sampling.to(torch.float32),
                      StartNoise(state, sigma_start, model, int(params.seed)))


def timestep_sigma(model_sampling, t: float, train_timesteps: int = 1000) -> float:
    """The model's sigma at DDPM timestep t of train_timesteps: the discrete schedule's own value (exact at
    integer t, as diffusers' schedulers use it) for DDPM-timestep models; for other model samplings (flow models)
    the sigma at the same fraction t / train_timesteps of the schedule."""
    if isinstance(model_sampling, comfy.model_sampling.ModelSamplingDiscrete):
        n = len(model_sampling.sigmas)
        position = torch.tensor(float(t) * n / train_timesteps, dtype=torch.float64)
        return float(comfy.model_sampling.ModelSamplingDiscrete.sigma(model_sampling, position))
    return float(model_sampling.percent_to_sigma(1.0 - float(t) / train_timesteps))


def sampling_sigmas(model_sampling, schedule: torch.Tensor, which: str, skip_steps: int, node: str = NODE,
                    family=None) -> torch.Tensor:
    """The descending sigmas sampling resumes along (float64): the inversion's own `schedule` (descending) from
    skip_steps on, or the reference's UniPC timesteps for as many steps (kernels.stylessp.reference_resume_timesteps)
    then 0."""
    steps = len(schedule) - 1
    if which == "inversion":
        return schedule[skip_steps:].to(torch.float64)
    try:
        timesteps = reference_resume_timesteps(steps, skip_steps)
    except ValueError as e:
        raise adapters.node_error(node, family, f"schedule 'reference': {e}.",
                                  "use 1-999 inversion steps, or schedule 'inversion'.") from None
    values = [timestep_sigma(model_sampling, t) for t in timesteps] + [0.0]
    return torch.tensor(values, dtype=torch.float64)


NODES = [StyleSSPFrequency, StyleSSPStartPoint]
