"""LinearAG nodes: record trajectories from ordinary CFG runs, fit and save per-step coefficients, load
them, and sample with estimated unconditional predictions (MODEL patch for KSampler, GUIDER for
SamplerCustomAdvanced). Sampling shares Adaptive Guidance's skip mechanism."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass

import torch
from comfy_api.latest import io

import folder_paths
import safetensors.torch

from ..kernels.linear_ag import AFTER_RULES, ESTIMATORS, LinearAGParams, TrajectoryStats, UncondEstimator, to_score
from . import adapters, files
from .adaptive_guidance import (adaptive_guidance_inputs, apply_adaptive_guidance, guider_cfg_input,
                                make_guider, validate_guider_cfg)

DEFAULTS = LinearAGParams()
CATEGORY = "TFG/guidance"
COEFFICIENTS_FOLDER = "tfg_linear_ag"
FORMAT_VERSION = "1"
RecordingType = io.Custom("TFG_LINEAR_AG_RECORDING")
CoefficientsType = io.Custom("TFG_LINEAR_AG_COEFFICIENTS")

PAPER = "LinearAG (Castillo et al., Adaptive Guidance, arXiv 2312.12487, AAAI 2025)"


def _register_folder() -> None:
    if COEFFICIENTS_FOLDER not in folder_paths.folder_names_and_paths:
        folder_paths.folder_names_and_paths[COEFFICIENTS_FOLDER] = (
            [os.path.join(folder_paths.models_dir, COEFFICIENTS_FOLDER)], {".safetensors"})


_register_folder()


def coefficients_folder() -> str:
    """Where LinearAG Fit writes: the first models/tfg_linear_ag folder."""
    return folder_paths.get_folder_paths(COEFFICIENTS_FOLDER)[0]


def fitted_files() -> list[str]:
    """The coefficients files LinearAG Load can offer (read when the node list is built)."""
    return folder_paths.get_filename_list(COEFFICIENTS_FOLDER)


def coefficients_path(name) -> str:
    """The full path of a listed coefficients file, confined to the models/tfg_linear_ag folders."""
    problem = None
    for folder in folder_paths.get_folder_paths(COEFFICIENTS_FOLDER):
        try:
            return str(files.confined_existing(folder, name))
        except files.FileNameError as exc:
            problem = str(exc)
    raise adapters.node_error("LinearAG Load Coefficients", None, f"cannot load {name!r}: {problem}.",
                              f"pick a file written by LinearAG Fit (listed from models/{COEFFICIENTS_FOLDER}/).")


# ----------------------------------------------------------------------------------------------
# Recording and coefficients
# ----------------------------------------------------------------------------------------------
class LinearAGRecording:
    """Least-squares statistics gathered from full-CFG runs of one schedule (accumulates over runs)."""

    def __init__(self, history: int):
        self.history = history
        self.stats: TrajectoryStats | None = None
        self.family: str | None = None
        self.sampler: str | None = None
        self.sigmas: torch.Tensor | None = None

    def begin_run(self, family: adapters.ModelFamily, run: adapters.RunInfo) -> None:
        same = (self.stats is not None and self.family == family.name and self.sampler == run.sampler_name
                and self.sigmas is not None and self.sigmas.shape == run.sigmas.shape
                and torch.allclose(self.sigmas, run.sigmas, rtol=1e-4, atol=1e-6))
        if same:
            return
        if self.stats is not None and self.stats.trajectories:
            adapters.logger.warning(
                "%s LinearAG Record: the run's model family/sampler/schedule changed; discarding %d trajectories "
                "recorded with %s/%s/%d steps.", adapters.PACK_NAME, self.stats.trajectories, self.family,
                self.sampler, len(self.sigmas) - 1)
        self.stats = TrajectoryStats(self.history, run.steps)
        self.family, self.sampler, self.sigmas = family.name, run.sampler_name, run.sigmas


@dataclass(frozen=True)
class LinearAGCoefficients:
    coefficients: torch.Tensor
    fitted: torch.Tensor
    family: str
    sampler: str
    sigmas: torch.Tensor
    history: int
    trajectories: int
    source: str

    @property
    def steps(self) -> int:
        return len(self.sigmas) - 1

    def describe(self) -> str:
        return (f"{self.source}: {self.family}, sampler {self.sampler}, {self.steps} steps, K={self.history}, "
                f"{self.trajectories} trajectories, {int(self.fitted.sum())} steps fitted")

    def check_run(self, node: str, family: adapters.ModelFamily, run: adapters.RunInfo) -> None:
        """Raise unless these coefficients were fitted for this kind of run."""
        problems = []
        if family.name != self.family:
            problems.append(f"model family {family.name} (fitted for {self.family})")
        if run.sampler_name != self.sampler:
            problems.append(f"sampler {run.sampler_name} (fitted for {self.sampler})")
        if run.steps != self.steps:
            problems.append(f"{run.steps} steps (fitted for {self.steps})")
        elif not torch.allclose(run.sigmas, self.sigmas, rtol=1e-3, atol=1e-5):
            problems.append("a different sigma schedule (scheduler or denoise differ from the fit)")
        if problems:
            raise adapters.node_error(
                node, family, f"the coefficients {self.source} do not fit this run: " + "; ".join(problems) + ".",
                "fit coefficients with the same model family, sampler, scheduler and step count (LinearAG Record "
                "→ Fit), or use an online estimator (hold_delta / extrapolate_delta).")

    def to_file(self, path: str) -> None:
        metadata = {"format": f"tfg-linear-ag/{FORMAT_VERSION}", "family": self.family, "sampler": self.sampler,
                    "steps": str(self.steps), "history": str(self.history), "space": "eps",
                    "trajectories": str(self.trajectories), "sigmas": json.dumps(self.sigmas.tolist())}
        safetensors.torch.save_file({"coefficients": self.coefficients.contiguous(),
                                     "fitted": self.fitted.to(torch.uint8).contiguous()}, path, metadata=metadata)

    @classmethod
    def from_file(cls, path: str) -> "LinearAGCoefficients":
        with safetensors.safe_open(path, framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        if not metadata.get("format", "").startswith("tfg-linear-ag/"):
            raise ValueError(f"{path} is not a LinearAG coefficients file (no tfg-linear-ag metadata)")
        return cls(tensors["coefficients"].float(), tensors["fitted"].bool(), metadata["family"],
                   metadata["sampler"], torch.tensor(json.loads(metadata["sigmas"])), int(metadata["history"]),
                   int(metadata["trajectories"]), os.path.basename(path))


def fit_recording(recording: LinearAGRecording, ridge: float, source: str) -> LinearAGCoefficients:
    coefficients, fitted = recording.stats.fit(ridge)
    return LinearAGCoefficients(coefficients, fitted, recording.family, recording.sampler, recording.sigmas,
                                recording.history, recording.stats.trajectories, source)


def install_recorder(model, recording: LinearAGRecording, node_name: str):
    """Clone `model`; every full-CFG run of the clone adds its trajectories to `recording`."""
    m = model.clone()
    key = adapters.new_patch_key("linear_ag_record")
    family = adapters.detect_family(m)

    class _Run:
        def __init__(self):
            self.past: list = []  # newest first: (eps_c, eps_u)
            self.last_step = -1
            self.batch = 0

    def make_state(guider, run: adapters.RunInfo):
        adapters.require_cfg_run(guider, node_name, family, "there is nothing to record",
                                 "record with the cfg you will sample with (> 1).")
        recording.begin_run(family, run)
        return _Run()

    def finish(state, guider) -> None:
        recording.stats.trajectories += state.batch
        adapters.logger.info("%s %s [%s]: %d trajectories recorded (%d in total)", adapters.PACK_NAME, node_name,
                             family.name, state.batch, recording.stats.trajectories)

    def calc_cond_batch(executor, base_model, conds, x, timestep, model_options):
        out = executor(base_model, conds, x, timestep, model_options)
        state = adapters.run_state(model_options, key)
        if state is None or len(conds) != 2 or conds[0] is None or conds[1] is None:
            return out
        step = adapters.step_index(timestep, adapters.sample_sigmas_of(model_options))
        if step == state.last_step:
            return out
        state.last_step, state.batch = step, x.shape[0]
        sigma = float(timestep.flatten()[0])
        eps_c, eps_u = to_score(x, out[0], sigma), to_score(x, out[1], sigma)
        recording.stats.add_step(step, eps_c, eps_u, state.past)
        state.past.insert(0, (eps_c, eps_u))
        del state.past[recording.history:]
        return out

    adapters.install_run_state(m, key, make_state, finish)
    adapters.add_calc_cond_batch_wrapper(m, key, calc_cond_batch)
    return m


def apply_linear_ag(model, params: LinearAGParams, coefficients: LinearAGCoefficients | None, node_name: str):
    problems = params.validate()
    if problems:
        raise adapters.node_error(node_name, None, "; ".join(problems), "correct the inputs.")
    if params.estimator == "fitted":
        if coefficients is None:
            raise adapters.node_error(
                node_name, adapters.detect_family(model), "estimator 'fitted' needs coefficients.",
                "connect LinearAG Load Coefficients (or LinearAG Fit), or choose hold_delta/extrapolate_delta.")
        params = params.replace(history=coefficients.history)

    def make_estimator(guider, run: adapters.RunInfo, family: adapters.ModelFamily):
        if params.estimator != "fitted":
            return UncondEstimator(params)
        coefficients.check_run(node_name, family, run)
        return UncondEstimator(params, coefficients.coefficients, coefficients.fitted)

    patched, _ = apply_adaptive_guidance(model, params.guidance, node_name, make_estimator=make_estimator)
    return patched


# ----------------------------------------------------------------------------------------------
# Nodes
# ----------------------------------------------------------------------------------------------
def _estimation_inputs() -> list:
    return [
        io.Combo.Input("estimator", options=list(ESTIMATORS), default=DEFAULTS.estimator,
                       tooltip="How the skipped uncond predictions are estimated. fitted: the per-step affine "
                               "regression (the paper's LinearAG; needs coefficients). hold_delta / "
                               "extrapolate_delta: online, no fitting (reuse or extrapolate the last guidance "
                               "delta). previous_uncond: reuse the last uncond (a baseline). off: plain "
                               "Adaptive Guidance (neutral)."),
        io.Float.Input("estimate_until", default=DEFAULTS.estimate_until, min=0.0, max=1.0, step=0.01,
                       tooltip="Odd steps in this first fraction of the run are estimated instead of computed; "
                               "later steps follow 'after'. Paper: 0.5 (the first half). Neutral: "
                               "estimator=off."),
        io.Combo.Input("after", options=list(AFTER_RULES), default=DEFAULTS.after,
                       tooltip="After the estimated part: cond_only = conditional prediction only (the paper); "
                               "adaptive = Adaptive Guidance's latch rule decides. Ignored with estimator=off."),
    ]


_SAMPLE_DESCRIPTION = (
    f"{PAPER}: estimates the unconditional prediction on alternating steps of the first part of the run from "
    "past predictions (an affine per-step regression fitted offline, or an online delta rule), then latches to "
    "conditional-only like Adaptive Guidance. Works on SD1.x, SD2.x, SDXL, SD3 and Flux with real CFG "
    "(cfg > 1). Fitted coefficients only fit the model family, sampler, scheduler and step count they were "
    "recorded with (a mismatch raises an error). Cost: one model pass on estimated and latched steps instead of "
    "two (the paper: about 25 evaluations where CFG needs 40); negligible arithmetic.")


class LinearAGRecord(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="TFG_LinearAGRecord",
            display_name="LinearAG Record (TFG)",
            category=CATEGORY,
            description=f"{PAPER}, step 1 of 3: sample with this model (ordinary CFG, any batch size) to record "
                        "the cond/uncond trajectories LinearAG is fitted on. Runs accumulate while the schedule "
                        "stays the same. Works on SD1.x, SD2.x, SDXL, SD3 and Flux with cfg > 1. Cost: a small "
                        "least-squares update per step; sampling itself is unchanged.",
            inputs=[
                io.Model.Input("model", tooltip="The model to record (sample it with cfg > 1)."),
                io.Int.Input("history", default=DEFAULTS.history, min=1, max=8,
                             tooltip="K: past steps used as regressors. Neutral: none. Our default 2 "
                                     "(the paper does not state K)."),
            ],
            outputs=[io.Model.Output(tooltip="The model, recording every sampling run."),
                     RecordingType.Output(display_name="recording", tooltip="Connect to LinearAG Fit.")],
        )

    @classmethod
    def execute(cls, model, history) -> io.NodeOutput:
        recording = LinearAGRecording(history)
        return io.NodeOutput(install_recorder(model, recording, "LinearAG Record"), recording)


class LinearAGFit(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="TFG_LinearAGFit",
            display_name="LinearAG Fit (TFG)",
            category=CATEGORY,
            description=f"{PAPER}, step 2 of 3: fits one affine coefficient set per step (least squares over all "
                        f"pixels of the recorded trajectories) and saves it to models/{COEFFICIENTS_FOLDER}/ with "
                        "the model family, sampler, schedule and K in its metadata. Works for every family the "
                        "recording came from. Cost: a small linear solve per step.",
            inputs=[
                RecordingType.Input("recording", tooltip="From LinearAG Record."),
                io.Latent.Input("samples", tooltip="The recorded sampler's output: connecting it makes the fit run "
                                                   "after the recording run."),
                io.String.Input("filename", default="linear_ag",
                                tooltip="Name of the coefficients file (letters, digits, - and _). Neutral: none."),
                io.Float.Input("ridge", default=DEFAULTS.ridge, min=0.0, max=1.0, step=1e-6,
                               tooltip="Relative Tikhonov regularisation of the fit. Neutral: 0. Default 1e-6."),
                io.Boolean.Input("overwrite", default=False, optional=True,
                                 tooltip="Replace an existing file of that name. Off: a numbered file "
                                         "(name_00001, …) is written instead, as SaveImage does."),
            ],
            outputs=[CoefficientsType.Output(display_name="coefficients", tooltip="Connect to LinearAG.")],
            is_output_node=True,
        )

    @classmethod
    def validate_inputs(cls, filename) -> bool | str:
        if filename is None:  # linked: checked again when the node executes
            return True
        problem = files.stem_problem(filename)
        return True if problem is None else f"LinearAG Fit: filename {problem}"

    @classmethod
    def execute(cls, recording, samples, filename, ridge, overwrite=False) -> io.NodeOutput:
        problem = files.stem_problem(filename)
        if problem:
            raise adapters.node_error("LinearAG Fit", None, f"filename {problem}.",
                                      f"type a plain name; the file is written to models/{COEFFICIENTS_FOLDER}/.")
        if recording.stats is None or not recording.stats.equations:
            raise adapters.node_error("LinearAG Fit", None, "the recording holds no trajectories.",
                                      "sample (cfg > 1, at least history + 1 steps) with the model from LinearAG "
                                      "Record and connect that sampler's output to 'samples'.")
        folder = coefficients_folder()
        os.makedirs(folder, exist_ok=True)
        path = files.new_file(folder, filename, ".safetensors", overwrite=bool(overwrite))
        coefficients = fit_recording(recording, ridge, path.name)
        replaced = path.exists()
        coefficients.to_file(str(path))
        text = f"{'replaced' if replaced else 'wrote'} models/{COEFFICIENTS_FOLDER}/{coefficients.describe()}"
        adapters.logger.info("%s LinearAG Fit: %s", adapters.PACK_NAME, text)
        return io.NodeOutput(coefficients, ui={"text": [text]})


class LinearAGLoad(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="TFG_LinearAGLoad",
            display_name="LinearAG Load Coefficients (TFG)",
            category=CATEGORY,
            description=f"{PAPER}: loads coefficients saved by LinearAG Fit from models/{COEFFICIENTS_FOLDER}/. "
                        "Any family. Cost: none.",
            inputs=[io.Combo.Input("coefficients_name", options=folder_paths.get_filename_list(COEFFICIENTS_FOLDER),
                                   tooltip="A file written by LinearAG Fit.")],
            outputs=[CoefficientsType.Output(display_name="coefficients", tooltip="Connect to LinearAG.")],
        )

    @classmethod
    def execute(cls, coefficients_name) -> io.NodeOutput:
        path = coefficients_path(coefficients_name)
        return io.NodeOutput(LinearAGCoefficients.from_file(path))


def _params(estimator, estimate_until, after, threshold, space, start_percent, decision,
            crossing_step) -> LinearAGParams:
    guidance = DEFAULTS.guidance.replace(threshold=threshold, space=space, start_percent=start_percent,
                                         decision=decision, crossing_step=crossing_step)
    return DEFAULTS.replace(estimator=estimator, estimate_until=estimate_until, after=after, guidance=guidance)


class LinearAG(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="TFG_LinearAG",
            display_name="LinearAG (TFG)",
            category=CATEGORY,
            description=_SAMPLE_DESCRIPTION + " Use with KSampler; use LinearAG Guider with SamplerCustomAdvanced.",
            inputs=[io.Model.Input("model", tooltip="The model to patch (sampled with cfg > 1).")]
            + _estimation_inputs() + adaptive_guidance_inputs()
            + [CoefficientsType.Input("coefficients", optional=True,
                                      tooltip="From LinearAG Load Coefficients / Fit; needed by estimator=fitted.")],
            outputs=[io.Model.Output(tooltip="The model with LinearAG installed.")],
        )

    @classmethod
    def execute(cls, model, estimator, estimate_until, after, threshold, space, start_percent, decision,
                crossing_step, coefficients=None) -> io.NodeOutput:
        params = _params(estimator, estimate_until, after, threshold, space, start_percent, decision, crossing_step)
        return io.NodeOutput(apply_linear_ag(model, params, coefficients, "LinearAG"))


class LinearAGGuider(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="TFG_LinearAGGuider",
            display_name="LinearAG Guider (TFG)",
            category=CATEGORY,
            description=_SAMPLE_DESCRIPTION + " A GUIDER for SamplerCustomAdvanced; use LinearAG with KSampler.",
            inputs=[
                io.Model.Input("model", tooltip="The model to sample."),
                io.Conditioning.Input("positive", tooltip="Positive (conditional) prompt."),
                io.Conditioning.Input("negative", tooltip="Negative prompt. Fitted coefficients assume the "
                                                          "negative they were recorded with."),
                guider_cfg_input("CFG scale."),
            ] + _estimation_inputs() + adaptive_guidance_inputs()
            + [CoefficientsType.Input("coefficients", optional=True,
                                      tooltip="From LinearAG Load Coefficients / Fit; needed by estimator=fitted.")],
            outputs=[io.Guider.Output(tooltip="A CFG guider with estimated uncond passes.")],
        )

    @classmethod
    def validate_inputs(cls, cfg) -> bool | str:
        return validate_guider_cfg(cfg, "LinearAG")

    @classmethod
    def execute(cls, model, positive, negative, cfg, estimator, estimate_until, after, threshold, space,
                start_percent, decision, crossing_step, coefficients=None) -> io.NodeOutput:
        params = _params(estimator, estimate_until, after, threshold, space, start_percent, decision, crossing_step)
        return io.NodeOutput(make_guider(apply_linear_ag(model, params, coefficients, "LinearAG Guider"),
                                         positive, negative, cfg))


NODES = [LinearAGRecord, LinearAGFit, LinearAGLoad, LinearAG, LinearAGGuider]
