"""The one adapter layer between the pack's kernels and ComfyUI: model-family detection, schedule
lookups, batch splitting, per-run state, single-slot chaining and the pack's error/warning style.

Everything that touches ComfyUI internals lives here so a host change is mended in one place.
"""
from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass
from typing import Any, Callable

import torch

import comfy.patcher_extension
import comfy.samplers
import comfy.supported_models as supported_models

from ..kernels.adaptive_guidance import nearest_steps

PACK_NAME = "TFG"
logger = logging.getLogger("tfg")


# ----------------------------------------------------------------------------------------------
# Model families
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ModelFamily:
    key: str
    """One of: sd1, sd2, sdxl, sd3, flux, wan, hunyuan_video, ltxv, qwen_image, chroma, unsupported."""
    name: str
    """Human name, e.g. "SDXL", or the host's config class name when unsupported."""
    config_name: str

    @property
    def supported(self) -> bool:
        return self.key != "unsupported"

    @property
    def is_unet(self) -> bool:
        return self.key in ("sd1", "sd2", "sdxl", "sd_unet")

    @property
    def is_flow(self) -> bool:
        return self.key in ("sd3", "flux", "wan", "hunyuan_video", "ltxv", "qwen_image", "chroma")

    @property
    def is_video(self) -> bool:
        """Latents are 5-D (batch, channels, frames, height, width)."""
        return self.key in ("wan", "hunyuan_video", "ltxv")


def _host_class(name: str):
    """A config class of comfy.supported_models, or None on a host that lacks it."""
    return getattr(supported_models, name, None)


# Order matters: subclasses before their bases. Wan 2.2's 14B models use Wan 2.1's classes (same network);
# WAN22_T2V is the 5B TI2V model (48-channel latents).
_FAMILY_TABLE = tuple((cls, key, name) for cls, key, name in (
    (supported_models.SD15, "sd1", "SD1.x"),
    (supported_models.SD20, "sd2", "SD2.x"),
    (supported_models.SDXLRefiner, "sdxl", "SDXL"),
    (supported_models.SDXL, "sdxl", "SDXL"),
    (supported_models.SD3, "sd3", "SD3"),
    (_host_class("Chroma"), "chroma", "Chroma"),
    (supported_models.Flux, "flux", "Flux"),
    (_host_class("WAN22_T2V"), "wan", "Wan 2.2"),
    (_host_class("WAN21_I2V"), "wan", "Wan 2.1 I2V"),
    (_host_class("WAN21_T2V"), "wan", "Wan 2.1"),
    (_host_class("HunyuanVideo"), "hunyuan_video", "HunyuanVideo"),
    (_host_class("LTXV"), "ltxv", "LTX-Video"),
    (_host_class("QwenImage"), "qwen_image", "Qwen-Image"),
) if cls is not None)

SUPPORTED_FAMILY_NAMES = ("SD1.x", "SD2.x", "SDXL", "SD3", "SD3.5", "Flux", "Wan 2.1", "Wan 2.2", "HunyuanVideo",
                          "LTX-Video", "Qwen-Image", "Chroma")


def _variant_name(key: str, name: str, config) -> str:
    """SD3.5 shares SD3's config class; its MMDiT-X has RMS qk-norm (Large and Medium)."""
    if key == "sd3" and getattr(config, "unet_config", {}).get("qk_norm"):
        return "SD3.5"
    return name


def detect_family(model) -> ModelFamily:
    """Family of a ModelPatcher (or BaseModel); anything unknown is reported by its config name."""
    base = getattr(model, "model", model)
    config = getattr(base, "model_config", None)
    config_name = type(config).__name__ if config is not None else type(base).__name__
    for cls, key, name in _FAMILY_TABLE:
        if config is not None and isinstance(config, cls):
            return ModelFamily(key, _variant_name(key, name, config), config_name)
    return ModelFamily("unsupported", config_name, config_name)


def as_sd_unet(model, family: ModelFamily) -> ModelFamily | None:
    """For a model of no known family whose network is ComfyUI's SD UNet (openaimodel.UNetModel), the family
    to use for architecture-dependent placement ("sd_unet"); None otherwise."""
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel
    net = getattr(getattr(model, "model", model), "diffusion_model", None)
    if family.supported or not isinstance(net, UNetModel):
        return None
    return ModelFamily("sd_unet", f"{family.name} (SD UNet)", family.config_name)


def node_error(node: str, family: ModelFamily | None, problem: str, fix: str) -> ValueError:
    """The pack's loud error: names the node, the detected model family and the fix."""
    fam = f" [model family: {family.name}]" if family is not None else ""
    return ValueError(f"{PACK_NAME} {node}{fam}: {problem} Fix: {fix}")


def require_family(node: str, model, allowed: tuple[str, ...]) -> ModelFamily:
    """Raise unless the model's family key is in `allowed`."""
    family = detect_family(model)
    if family.key not in allowed:
        names = ", ".join(dict.fromkeys(n for _, k, n in _FAMILY_TABLE if k in allowed))
        raise node_error(node, family, f"this model family is not supported (supported: {names}).",
                         "use a model of a supported family, or remove this node.")
    return family



def resolve_family(node: str, model, supported: tuple[str, ...], unsupported: str, fix: str,
                   fallback_use: str) -> ModelFamily:
    """The model's family when its key is in `supported`. A model of no known family whose network is ComfyUI's
    SD UNet runs as family "sd_unet" with a loud warning (once per config) saying `fallback_use` (what the node
    then does, e.g. "the SD1.x/SDXL placement is used"); anything else raises node_error(unsupported, fix)."""
    family = detect_family(model)
    if family.key in supported:
        return family
    unet_like = as_sd_unet(model, family)
    if unet_like is None:
        raise node_error(node, family, unsupported, fix)
    warn_once(f"{node}.sd_unet.{family.config_name}",
              f"{PACK_NAME} {node} [model family: {family.name}]: not a known family, but its network is ComfyUI's "
              f"SD UNet, so {fallback_use} (untested).")
    return unet_like


_warned: set[str] = set()


def warn_once(key: str, message: str) -> None:
    """Log a loud warning once per process for each key."""
    if key in _warned:
        return
    _warned.add(key)
    logger.warning("%s", message)


# ----------------------------------------------------------------------------------------------
# Schedule
# ----------------------------------------------------------------------------------------------
def step_index(sigma: torch.Tensor | float, sample_sigmas: torch.Tensor | None) -> int:
    """Index of the schedule entry nearest to sigma (-1 when the schedule is unknown).

    Multistage samplers evaluate at intermediate sigmas; they map to the nearest step. Under
    KSamplerAdvanced/SplitSigmas the index is relative to the slice that sampler was given."""
    if sample_sigmas is None or len(sample_sigmas) == 0:
        return -1
    s = float(sigma.flatten()[0]) if isinstance(sigma, torch.Tensor) else float(sigma)
    return nearest_steps([s], sample_sigmas.float().cpu())[0]


def sample_sigmas_of(model_options: dict) -> torch.Tensor | None:
    return model_options.get("transformer_options", {}).get("sample_sigmas")


def percent_to_sigma(model, percent: float) -> float:
    """Sigma at a fraction of the schedule for this model (0 -> max noise, 1 -> 0)."""
    return float(model.get_model_object("model_sampling").percent_to_sigma(percent))


def sigma_to_percent(model, sigma: float, tolerance: float = 1e-4) -> float:
    """Inverse of percent_to_sigma by bisection (percent_to_sigma is monotone decreasing)."""
    lo, hi = 0.0, 1.0
    for _ in range(40):
        mid = (lo + hi) / 2
        if percent_to_sigma(model, mid) > sigma:
            lo = mid
        else:
            hi = mid
        if hi - lo < tolerance:
            break
    return (lo + hi) / 2


# ----------------------------------------------------------------------------------------------
# Batches inside the network
# ----------------------------------------------------------------------------------------------
def split_by_cond_or_uncond(tensor: torch.Tensor, cond_or_uncond: list[int]) -> list[tuple[int, torch.Tensor]]:
    """Split a batched network tensor into its chunks, tagged 0 (cond) or 1 (uncond), in batch order.

    ComfyUI batches passes as equal chunks in `transformer_options["cond_or_uncond"]` order."""
    n = len(cond_or_uncond)
    if n == 0 or tensor.shape[0] % n != 0:
        raise ValueError(f"batch of {tensor.shape[0]} does not split into {n} chunks")
    return list(zip(cond_or_uncond, tensor.chunk(n, dim=0)))


# ----------------------------------------------------------------------------------------------
# Per-run state
# ----------------------------------------------------------------------------------------------
STATE_NAMESPACE = "tfg_run_state"


def new_patch_key(technique: str) -> str:
    """A unique key for one node execution's hooks (so two stacked patches never share state)."""
    return f"tfg.{technique}.{uuid.uuid4().hex[:12]}"


@dataclass(frozen=True)
class RunInfo:
    """What a sampling run is: its schedule and its sampler (by name)."""

    sigmas: torch.Tensor
    sampler_name: str
    falling: bool = False
    """Every model call of the run is at a sigma no higher than the calls before it (`calls_at_falling_sigmas`)."""

    @property
    def steps(self) -> int:
        return max(len(self.sigmas) - 1, 0)


def sampler_name(sampler) -> str:
    """"euler" for KSAMPLER(sample_euler); the class name for other samplers."""
    function = getattr(sampler, "sampler_function", None)
    name = getattr(function, "__name__", None) or type(sampler).__name__
    return name[len("sample_"):] if name.startswith("sample_") else name


# ComfyUI's own sampler functions whose model calls never go back up in sigma on a non-increasing schedule, at
# their default options (tests/test_host_syncs.py runs each core sampler and checks). Not dpm_adaptive (a rejected
# step is retried at a higher sigma), not heunpp2 (step i calls at sigma i+2, step i+1 starts again at sigma i+1).
_NOT_FALLING = frozenset({"dpm_adaptive", "dpm_adaptive_function", "sample_heunpp2"})
_CORE_SAMPLER_MODULES = ("comfy.k_diffusion.", "comfy.samplers", "comfy.extra_samplers.")
_RISING_OPTIONS = {"s_churn": 0.0, "eta": 1.0, "r": 1.0}
"""Options above these values make a core sampler call back up in sigma (churn; dpmpp_2s_ancestral's eta > 1;
dpmpp_sde's r > 1)."""


def calls_at_falling_sigmas(sampler, sigmas: torch.Tensor) -> bool:
    """True for one of ComfyUI's own samplers, at options that keep it so, on a non-increasing schedule: then once
    a call is below a sigma, every later call of the run is too. Other samplers (custom packs) are not assumed to
    be."""
    function = getattr(sampler, "sampler_function", None)
    name, module = getattr(function, "__name__", ""), getattr(function, "__module__", "") or ""
    if not name or name in _NOT_FALLING or not module.startswith(_CORE_SAMPLER_MODULES):
        return False
    options = getattr(sampler, "extra_options", None) or {}
    try:
        if any(float(options.get(key, limit) or 0.0) > limit for key, limit in _RISING_OPTIONS.items()):
            return False
    except (TypeError, ValueError):
        return False
    return len(sigmas) < 2 or bool((sigmas[1:] <= sigmas[:-1]).all())


def install_run_state(model, key: str, make_state: Callable[[Any, RunInfo], Any],
                      finish: Callable[[Any, Any], None] | None = None) -> None:
    """Give every sampling run of `model` (a ModelPatcher clone) a fresh state object.

    An OUTER_SAMPLE wrapper creates `make_state(guider, RunInfo)` in the run's own copy of model_options and
    calls `finish(state, guider)` when the run ends (also on error or interrupt). Hooks read it with
    `run_state(model_options, key)`. Queued or nested runs each get their own object."""

    def outer_sample(executor, noise, latent_image, sampler, sigmas, *args, **kwargs):
        guider = executor.class_obj
        store = guider.model_options.setdefault("transformer_options", {}).setdefault(STATE_NAMESPACE, {})
        schedule = sigmas.detach().float().cpu()
        state = make_state(guider, RunInfo(schedule, sampler_name(sampler), calls_at_falling_sigmas(sampler, schedule)))
        previous = store.get(key)
        store[key] = state
        try:
            return executor(noise, latent_image, sampler, sigmas, *args, **kwargs)
        finally:
            if previous is None:
                store.pop(key, None)
            else:
                store[key] = previous
            if finish is not None:
                finish(state, guider)

    model.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.OUTER_SAMPLE, key, outer_sample)


def run_state(model_options: dict, key: str):
    """The state installed by install_run_state for the current run, or None outside a run."""
    return model_options.get("transformer_options", {}).get(STATE_NAMESPACE, {}).get(key)


# ----------------------------------------------------------------------------------------------
# Chainable hooks
# ----------------------------------------------------------------------------------------------
def add_calc_cond_batch_wrapper(model, key: str, wrapper: Callable) -> None:
    """Chainable hook around every calc_cond_batch: wrapper(executor, model, conds, x, timestep, model_options).

    Preferred over the single `sampler_calc_cond_batch_function` slot: wrappers compose, and they
    also see guiders that call calc_cond_batch directly."""
    model.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.CALC_COND_BATCH, key, wrapper)


def take_single_slot(model, slot: str, make_function: Callable[[Callable | None], Callable]) -> None:
    """Take a single-slot model_options hook (e.g. sampler_calc_cond_batch_function), chaining to its
    previous occupant: `make_function(previous)` builds the new function, which must call `previous`
    (when not None) where it would otherwise do the default work."""
    previous = model.model_options.get(slot)
    model.model_options[slot] = make_function(previous)


def default_calc_cond_batch(previous: Callable | None) -> Callable:
    """The function a chained sampler_calc_cond_batch_function should delegate to."""
    if previous is not None:
        return previous
    return lambda args: comfy.samplers.calc_cond_batch(args["model"], args["conds"], args["input"], args["sigma"],
                                                        args["model_options"])


def require_cfg_run(guider, node: str, family: ModelFamily, consequence: str, fix: str) -> None:
    """At the start of a run: raise unless ComfyUI computes a real uncond pass."""
    if not guider_uses_uncond(guider):
        raise node_error(node, family, f"cfg is 1, so ComfyUI computes no unconditional pass and {consequence} "
                         "(Flux-dev and other guidance-distilled models are normally run this way).", fix)


def refuse_context_windows(guider, node: str, family: ModelFamily, problem: str, fix: str) -> None:
    """At the start of a run: raise when context windows (ComfyUI's Context Windows nodes) split the latent."""
    if guider.model_options.get("context_handler") is not None:
        raise node_error(node, family, f"context windows are active (a Context Windows node): {problem}", fix)


def guider_uses_uncond(guider) -> bool:
    """False when ComfyUI will skip the uncond pass (cfg == 1 with the cfg1 optimisation on)."""
    import math
    cfg = getattr(guider, "cfg", None)
    if cfg is None:
        return True
    return not (math.isclose(float(cfg), 1.0) and not guider.model_options.get("disable_cfg1_optimization", False))


# ----------------------------------------------------------------------------------------------
# Loops of our own (inversion, optimisation, stages): progress bar and interrupts
# ----------------------------------------------------------------------------------------------
class StepProgress:
    """ComfyUI's progress bar for a loop of the pack's own, with the host's interrupt check at every step.

    `with StepProgress(total) as p: ... p.step()`; `check_interrupt()` raises the host's interrupt exception
    when the user pressed Cancel (the queue then reports the prompt as interrupted, not failed)."""

    def __init__(self, total: int):
        import comfy.utils
        self.total = max(int(total), 1)
        self.done = 0
        self.bar = comfy.utils.ProgressBar(self.total)

    def __enter__(self) -> "StepProgress":
        check_interrupt()
        return self

    def __exit__(self, *exc) -> None:
        return None

    def step(self, n: int = 1) -> None:
        check_interrupt()
        self.done = min(self.done + n, self.total)
        self.bar.update_absolute(self.done, self.total)


def check_interrupt() -> None:
    import comfy.model_management
    comfy.model_management.throw_exception_if_processing_interrupted()
