"""Adaptive Guidance nodes: a MODEL patch (plain KSampler and any guider) and a GUIDER
(SamplerCustomAdvanced). Both install the same per-run mechanism on a model clone."""
from __future__ import annotations

from collections import defaultdict

from comfy_api.latest import io

import comfy.samplers
import torch

from ..kernels.adaptive_guidance import (CROSSING_RULES, DECISIONS, SPACES, AdaptiveGuidanceParams, at_most,
                                         AdaptiveGuidanceTracker, lanes_summary)
from . import adapters, caches, cond_rows
from . import inputs as inp

DEFAULTS = AdaptiveGuidanceParams()
CATEGORY = "TFG/guidance"
PATCH_NODE = "Adaptive Guidance"
GUIDER_NODE = "Adaptive Guider"

_DESCRIPTION = (
    "Adaptive Guidance (Castillo et al., arXiv 2312.12487, AAAI 2025): runs classifier-free guidance until the "
    "conditional and unconditional predictions agree (cosine >= threshold), then drops the unconditional pass for "
    "the rest of the run. Works on SD1.x, SD2.x, SDXL, SD3 and Flux (and any model) sampled with real CFG "
    "(cfg > 1); with cfg = 1 there is no unconditional pass to skip and the run samples conditional-only with one "
    "warning. Optional guidance interval (Kynkäänniemi et al., arXiv 2404.07724): CFG only inside a part of the "
    "schedule, conditional-only outside. With ComfyUI's context windows (long video) each window latches on its "
    "own. "
    "Cost: no extra model passes; saves up to one pass per step once latched (the paper reports ~25% of "
    "evaluations). Logs the cosine per step and the passes saved after every run, for calibration."
)


def ag_widgets(prefix: str = "") -> list:
    """The AG parameter inputs, declared once; LinearAG's nodes reuse them with prefix "guidance." (the nested
    Params field)."""
    return [
        inp.Float("threshold",
                  "gamma-bar: stop guiding an image once cos(cond, uncond) reaches this. Start with the default "
                  "(x0 space); lower (0.99, 0.98) saves more evaluations and departs more from CFG",
                  neutral="1.0 (never latches: plain CFG)",
                  paper="0.991–0.996, measured in eps space, where these values latch at the first step on the "
                        "pack's measurements (the node warns when that happens)",
                  param=prefix + "threshold", min=0.0, max=1.0, step=0.0001),
        inp.Choice("space", "Where the cosine is measured. x0: the denoised predictions (rises smoothly; what "
                            "ComfyUI users calibrate against). eps: x - D, the paper's noise space; near 1 at high "
                            "noise, so it can latch at the first step", SPACES,
                   paper="eps", param=prefix + "space"),
        inp.Float("start_percent", "No latch before this fraction of the schedule (0.2–0.4 protects the "
                                   "composition with eps space)",
                  neutral="1.0 (never latches: identical to plain CFG)", paper="0.0 (no guard)",
                  param=prefix + "start_percent", min=0.0, max=1.0, step=0.01),
        inp.Choice("decision", "per_sample: each image latches on its own cosine and its unconditional pass stops "
                               "then. batch: one cosine over the whole batch decides for all (the existing "
                               "ComfyUI port's rule)", DECISIONS, param=prefix + "decision"),
        inp.Choice("crossing_step", "On the step where the cosine crosses the threshold: cond = use the "
                                    "conditional prediction already (the paper's rule); cfg = still apply CFG there "
                                    "and skip from the next step (the existing ComfyUI port's rule)", CROSSING_RULES,
                   paper="cond", param=prefix + "crossing_step"),
    ]


def interval_widgets(prefix: str = "") -> list:
    """The guidance interval (Kynkäänniemi et al., arXiv 2404.07724), appended after each node's shipped inputs."""
    return [
        inp.Float("interval_start", "Guidance interval: CFG runs only from this fraction of the schedule on; before "
                                    "it the conditional prediction alone is used (no uncond pass)",
                  neutral="0.0", paper="a sigma range per model (ports cite sigma 5.42 down to 0.28 for SDXL)",
                  param=prefix + "interval_start", min=0.0, max=1.0, step=0.01, optional=True),
        inp.Float("interval_end", "Guidance interval: CFG runs only up to this fraction of the schedule; after it "
                                  "the conditional prediction alone is used (no uncond pass)",
                  neutral="1.0", param=prefix + "interval_end", min=0.0, max=1.0, step=0.01, optional=True),
    ]


INTERVAL_RULE = inp.Rule(("interval_start", "interval_end"), lambda interval_start, interval_end: None
                         if interval_start <= interval_end else
                         f"interval_start ({interval_start:g}) must not exceed interval_end ({interval_end:g})")


def guider_cfg_widget(meaning: str):
    """The cfg input of the pack's CFG guiders (AG, LinearAG)."""
    return inp.Float("cfg", meaning, param=None, default=8.0, min=0.0, max=100.0, step=0.1, round=0.01,
                     neutral="1 (no unconditional pass: the guider samples cond-only)", paper="7.5")


def model_socket(tooltip: str) -> inp.Socket:
    return inp.Socket(io.Model.Input("model", tooltip=tooltip))


def conditioning_sockets(negative_tooltip: str) -> list:
    return [inp.Socket(io.Conditioning.Input("positive", tooltip="Positive (conditional) prompt."), finite=True),
            inp.Socket(io.Conditioning.Input("negative", tooltip=negative_tooltip), finite=True)]


class _Lane:
    """The latch (and LinearAG's estimator) of one part of the latent that the model evaluates on its own: the
    whole latent, or one context window (ComfyUI's context-window nodes call calc_cond_batch once per window, so
    each window latches on its own evidence)."""

    def __init__(self, label: str, tracker: AdaptiveGuidanceTracker, estimator):
        self.label = label
        self.tracker = tracker
        self.estimator = estimator
        self.last_step = -1
        self.control_cache: dict = {}
        self.step_mode = "compute"
        """LinearAG's mode for the step evaluated last."""
        self.final_mode: str | None = None
        """LinearAG's schedule is over ("cond_only" or "compute" to the end) and the run's sigmas only fall."""


class _RunState:
    def __init__(self, params: AdaptiveGuidanceParams, sigma_start: float, run: adapters.RunInfo, new_estimator):
        self.params = params
        self.sigma_start = sigma_start
        self.run = run
        self.new_estimator = new_estimator
        self.lanes: dict = {}
        """window key (None: the whole latent) -> _Lane, created at the window's first evaluation."""
        self.interval = (0.0, float("inf"))
        """(low, high] sigma range in which CFG runs (the guidance interval)."""
        self.interval_set = params.interval_start > 0.0 or params.interval_end < 1.0
        """A guidance interval narrower than the whole schedule (which needs each evaluation's sigma)."""
        self.latch_gated = params.start_percent > 0.0
        """No latch before sigma_start (compared on the device when the sigma is not read)."""

    def lane(self, key, label: str) -> _Lane:
        lane = self.lanes.get(key)
        if lane is None:
            estimator = self.new_estimator() if self.new_estimator is not None else None
            lane = self.lanes[key] = _Lane(label, AdaptiveGuidanceTracker(self.params, self.run.sigmas), estimator)
        return lane

    def trackers(self) -> list[tuple[str, AdaptiveGuidanceTracker]]:
        return [(lane.label, lane.tracker) for lane in self.lanes.values()]

    def most_windows_per_step(self) -> int:
        """The most context windows evaluated at one step (0 without context windows)."""
        per_step: dict[int, int] = defaultdict(int)
        for key, lane in self.lanes.items():
            if key is not None:
                for step in {r.step for r in lane.tracker.records}:
                    per_step[step] += 1
        return max(per_step.values(), default=0)


def _index_text(indices: tuple[int, ...]) -> str:
    if indices == tuple(range(indices[0], indices[0] + len(indices))):
        return f"{indices[0]}-{indices[-1]}"
    return ",".join(str(i) for i in indices)


def context_window_of(model_options: dict, x) -> tuple:
    """(key, label) of the context window this calc_cond_batch call evaluates, or (None, "") for the whole
    latent. ComfyUI's IndexListContextHandler puts the window into transformer_options before each call."""
    handler = model_options.get("context_handler")
    window = model_options.get("transformer_options", {}).get("context_window")
    indices = getattr(window, "index_list", None)
    if handler is None or not indices:
        return None, ""
    dim = getattr(window, "dim", getattr(handler, "dim", 0))
    if x.dim() <= dim or x.shape[dim] != len(indices):  # left over from an earlier call: not this one's window
        return None, ""
    indices = tuple(int(i) for i in indices)
    return (dim, indices), f"window {_index_text(indices)}"


def refuse_multi_conditioning_guider(guider, node_name: str, family) -> None:
    """Guiders that combine more than a positive and a negative prediction (ComfyUI's PerpNegGuider: positive,
    negative and an empty prompt; DualCFGGuider) cannot hand the positive on for a skipped pass: Perp-Neg's
    projection would divide by zero. Refused at the start of the run with the fix."""
    conds = getattr(guider, "original_conds", None) or getattr(guider, "conds", None) or {}
    extra = sorted(set(conds) - {"positive", "negative"})
    if not extra:
        return
    name = type(guider).__name__
    if "empty_negative_prompt" in extra:
        problem = (f"ComfyUI's PerpNegGuider ({name}) combines three predictions (positive, negative and the empty "
                   f"prompt); {node_name} skips only the negative pass of plain CFG, and handing the positive on for "
                   "the others would make Perp-Neg's projection divide by zero.")
        fix = (f"give PerpNegGuider the model without {node_name}, or sample with {GUIDER_NODE} (TFG) / CFGGuider and "
               "your negative prompt instead of Perp-Neg.")
    else:
        problem = (f"this guider ({name}) samples with the conditionings {sorted(conds)}; {node_name} handles plain "
                   "CFG (positive and negative) only.")
        fix = f"use {GUIDER_NODE} (TFG), CFGGuider or KSampler, or give this guider the model without {node_name}."
    raise adapters.node_error(node_name, family, problem, fix)


def apply_adaptive_guidance(model, params: AdaptiveGuidanceParams, node_name: str = PATCH_NODE,
                            make_estimator=None):
    """Clone `model` and install the uncond-skipping mechanism on the clone. Returns (clone, key).

    Plain Adaptive Guidance by default. LinearAG passes `make_estimator(guider, run, family)`, which returns a
    per-run object with `mode(step, total_steps)` ("estimate" | "cond_only" | "compute"),
    `can_estimate(step, batch)`, `estimate(x, cond, step, sigma)` and `record(x, cond, uncond, sigma, computed)`.
    On "estimate" steps only the cond pass runs and the estimate is handed on as the uncond prediction; on
    "cond_only" steps only the cond pass runs and it is handed on as the uncond, as after a latch."""
    problems = params.validate()
    if problems:
        raise adapters.node_error(node_name, None, "; ".join(problems), "correct the inputs.")
    m = model.clone()
    key = adapters.new_patch_key("adaptive_guidance")
    family = adapters.detect_family(m)

    def make_state(guider, run: adapters.RunInfo) -> _RunState | None:
        refuse_multi_conditioning_guider(guider, node_name, family)
        if not adapters.guider_uses_uncond(guider):
            # shared workflows toggle cfg: a cfg-1 run samples cond-only, as ComfyUI would, with one warning
            adapters.logger.warning(
                "%s %s [model family: %s]: cfg is 1, so ComfyUI computes no unconditional pass and %s has nothing "
                "to skip; this run samples conditional-only as without the node. Set cfg above 1 to use it.",
                adapters.PACK_NAME, node_name, family.name, node_name)
            return None
        caches.prepare_run(guider, node_name, family)
        sampling = guider.model_patcher
        new_estimator = None
        if make_estimator is not None:
            def new_estimator():
                return make_estimator(guider, run, family)
            new_estimator()  # checks the run (fitted coefficients) at its start, before any model pass
        state = _RunState(params, adapters.percent_to_sigma(sampling, params.start_percent), run, new_estimator)
        state.interval = (adapters.percent_to_sigma(sampling, params.interval_end),
                          adapters.percent_to_sigma(sampling, params.interval_start))
        return state

    def finish(state: _RunState | None, guider) -> None:
        if state is None:
            return
        trackers = state.trackers()
        if not any(tracker.records for _, tracker in trackers):
            adapters.warn_once(
                f"{key}.nopair",
                f"{adapters.PACK_NAME} {node_name} [model family: {family.name}]: the run had no cond/uncond pair "
                f"to compare ({type(guider).__name__} does not use plain CFG), so {node_name} did nothing.")
            return
        first_step_latch = any(0 in tracker.latch_step.values() for _, tracker in trackers)
        if params.space == "eps" and first_step_latch and params.start_percent == 0.0:
            adapters.warn_once(
                f"{key}.eps0",
                f"{adapters.PACK_NAME} {node_name} [model family: {family.name}]: latched at the first step in eps "
                "space, so the run had almost no guidance. Use space=x0, or raise start_percent/threshold.")
        most_windows_per_step = state.most_windows_per_step()
        if len(state.lanes) > most_windows_per_step > 0:
            adapters.warn_once(
                f"{key}.moving_windows",
                f"{adapters.PACK_NAME} {node_name} [model family: {family.name}]: the context schedule moved its "
                f"windows between steps ({len(state.lanes)} different windows, at most {most_windows_per_step} per "
                f"step); {node_name} latches per window, so a moved window starts unlatched and saves less. Use "
                "context_schedule standard_static (fixed windows) to save the most.")
        report = lanes_summary(trackers)
        setattr(guider, "tfg_adaptive_guidance_report", report)
        adapters.logger.info("%s %s [%s]: %s", adapters.PACK_NAME, node_name, family.name, report)

    def calc_cond_batch(executor, base_model, conds, x, timestep, model_options):
        state = adapters.run_state(model_options, key)
        if state is None or len(conds) != 2 or conds[0] is None or conds[1] is None:
            return executor(base_model, conds, x, timestep, model_options)
        window, label = context_window_of(model_options, x)
        lane = state.lane(window, label)
        tracker, estimator = lane.tracker, lane.estimator
        batch = x.shape[0]
        # The sigma is read back (a wait for the GPU) only when a decision needs it: LinearAG's schedule or a
        # guidance interval; otherwise records keep the timestep and read it with the latch flags, and a latch
        # start is compared on the device.
        scheduled = estimator is not None and lane.final_mode is None
        if scheduled or state.interval_set:
            sigma = float(timestep.flatten()[0])
            step = adapters.step_index(sigma, state.run.sigmas)
        else:
            sigma, step = timestep.flatten()[0], None
        first_evaluation_of_step = step != lane.last_step  # multistage samplers evaluate a step repeatedly
        lane.last_step = step
        outside_interval = state.interval_set and not state.interval[0] < sigma <= state.interval[1]
        if lane.final_mode is not None:
            mode = lane.final_mode
        elif not scheduled or outside_interval:
            mode = "compute"
        elif first_evaluation_of_step:
            mode = lane.step_mode = estimator.mode(step, state.run.steps)
            if state.run.falling:
                lane.final_mode = estimator.final_mode(step, state.run.steps)
        else:  # a multistage sampler's later evaluation of the step: no second estimate; cond-only steps stay so
            mode = "cond_only" if lane.step_mode == "cond_only" else "compute"
        if outside_interval or tracker.all_latched(batch) or mode == "cond_only":
            caches.before_step(model_options, timestep, conds, batch, 0)
            cond_only = executor(base_model, [conds[0], None], x, timestep, model_options)
            tracker.skip(step, sigma, batch, reason="interval" if outside_interval else "")
            # hand the cond prediction on as the uncond one: every CFG formula (and CFG++) reduces to cond
            return [cond_only[0], cond_only[0]]
        if mode == "estimate" and estimator.can_estimate(step, batch):
            caches.before_step(model_options, timestep, conds, batch, 0)
            cond = executor(base_model, [conds[0], None], x, timestep, model_options)[0]
            uncond = estimator.estimate(x, cond, step, sigma)
            estimator.record(x, cond, uncond, sigma, computed=False)
            tracker.skip(step, sigma, batch, estimated=True)
            return [cond, tracker.hand_on(cond, uncond)]
        rows = tracker.open_rows(batch)
        latch_in_range = True if not state.latch_gated else \
            at_most(sigma, state.sigma_start) if isinstance(sigma, torch.Tensor) else sigma <= state.sigma_start
        uncond_rows = batch if rows is None else int(rows.numel())
        split = caches.before_step(model_options, timestep, conds, batch, uncond_rows)  # True: EasyCache in range
        if rows is None and not split:
            out = executor(base_model, conds, x, timestep, model_options)
            cond, uncond = out[0], out[1]
        elif rows is None:  # EasyCache decides on the cond pass; the uncond pass follows that decision
            cond = executor(base_model, [conds[0], None], x, timestep, model_options)[0]
            uncond = executor(base_model, [None, conds[1]], x, timestep, model_options)[1]
        else:  # some images have latched: the uncond pass runs for the others only
            cond = executor(base_model, [conds[0], None], x, timestep, model_options)[0]
            computed = cond_rows.uncond_for_rows(executor, base_model, conds[1], x, timestep, model_options, rows,
                                                 lane.control_cache)
            uncond = cond.index_copy(0, rows.to(cond.device, non_blocking=True), computed.to(cond.dtype))
        if scheduled and first_evaluation_of_step:
            estimator.record(x, cond, uncond, sigma, computed=True)
        latch_allowed = False if caches.step_reused(model_options) else latch_in_range
        uncond = tracker.observe(x, cond, uncond, step, sigma, latch_allowed=latch_allowed, rows=rows)
        return [cond, uncond]

    adapters.install_run_state(m, key, make_state, finish)
    adapters.add_calc_cond_batch_wrapper(m, key, calc_cond_batch)
    return m, key


class AdaptiveGuidance(io.ComfyNode):
    """MODEL patch: works with the plain KSampler and with any guider that runs standard CFG."""

    INPUTS = inp.NodeInputs(PATCH_NODE, [model_socket("The model to patch (sampled with cfg > 1).")] + ag_widgets()
                            + interval_widgets(), rules=[INTERVAL_RULE], defaults=DEFAULTS)
    validate_inputs = INPUTS.validator()

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="TFG_AdaptiveGuidance",
            display_name="Adaptive Guidance (TFG)",
            category=CATEGORY,
            description=_DESCRIPTION + " Use this patch with KSampler; use Adaptive Guider (TFG) with "
                                       "SamplerCustomAdvanced.",
            inputs=cls.INPUTS.schema(),
            outputs=[io.Model.Output(tooltip="The model with Adaptive Guidance installed.")],
        )

    @classmethod
    def execute(cls, **values) -> io.NodeOutput:
        v = cls.INPUTS.checked(values)
        patched, _ = apply_adaptive_guidance(v.model, cls.INPUTS.params(v), PATCH_NODE)
        return io.NodeOutput(patched)


class AdaptiveGuider(comfy.samplers.CFGGuider):
    """CFGGuider on a model that carries the Adaptive Guidance patch; the report of the last run is
    kept in `tfg_adaptive_guidance_report`."""

    tfg_adaptive_guidance_report: str | None = None


def make_guider(patched_model, positive, negative, cfg) -> AdaptiveGuider:
    guider = AdaptiveGuider(patched_model)
    guider.set_conds(positive, negative)
    guider.set_cfg(cfg)
    return guider


class AdaptiveGuiderNode(io.ComfyNode):
    """GUIDER for SamplerCustomAdvanced."""

    INPUTS = inp.NodeInputs(GUIDER_NODE, [
        model_socket("The model to sample."),
        *conditioning_sockets("Negative (unconditional) prompt; AG keeps it until the latch."),
        guider_cfg_widget("CFG scale until the latch"),
    ] + ag_widgets() + interval_widgets(), rules=[INTERVAL_RULE], defaults=DEFAULTS)
    validate_inputs = INPUTS.validator()

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="TFG_AdaptiveGuider",
            display_name="Adaptive Guider (TFG)",
            category=CATEGORY,
            description=_DESCRIPTION + " A GUIDER for SamplerCustomAdvanced; use Adaptive Guidance (TFG) with "
                                       "KSampler.",
            inputs=cls.INPUTS.schema(),
            outputs=[io.Guider.Output(tooltip="A CFG guider that skips the uncond pass once latched.")],
        )

    @classmethod
    def execute(cls, **values) -> io.NodeOutput:
        v = cls.INPUTS.checked(values)
        patched, _ = apply_adaptive_guidance(v.model, cls.INPUTS.params(v), GUIDER_NODE)
        return io.NodeOutput(make_guider(patched, v.positive, v.negative, v.cfg))


NODES = [AdaptiveGuidance, AdaptiveGuiderNode]
