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
from . import adapters, caches, files
from . import inputs as inp
from .adaptive_guidance import (INTERVAL_RULE, ag_widgets, apply_adaptive_guidance, conditioning_sockets,
                                guider_cfg_widget, interval_widgets, make_guider, model_socket)

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
        adapters.refuse_context_windows(
            guider, node_name, family, "the recording would mix the windows' predictions into one trajectory.",
            "record on clips short enough for one window (without the Context Windows node); the fitted "
            "coefficients then apply with context windows, per window.")
        caches.refuse_recording(guider, node_name, family)
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
        caches.refuse_fitted_estimator(guider, node_name, family)
        coefficients.check_run(node_name, family, run)
        return UncondEstimator(params, coefficients.coefficients, coefficients.fitted)

    patched, _ = apply_adaptive_guidance(model, params.guidance, node_name, make_estimator=make_estimator)
    return patched


# ----------------------------------------------------------------------------------------------
# Nodes
# ----------------------------------------------------------------------------------------------
def estimation_widgets() -> list:
    return [
        inp.Choice("estimator", "How the skipped uncond predictions are estimated. extrapolate_delta (default): "
                                "online, no fitting; extrapolates the last two guidance deltas; chosen because the "
                                "pack's benchmark measures it closest to the true uncond of the estimators that "
                                "need no fit (BENCHMARKS.md). hold_delta: reuse the last delta. fitted: the "
                                "per-step affine regression (the paper's LinearAG; needs coefficients from LinearAG "
                                "Record → Fit → Load). previous_uncond: reuse the last uncond (a baseline)",
                   ESTIMATORS, neutral="off (plain Adaptive Guidance)", paper="fitted"),
        inp.Float("estimate_until", "Odd steps in this first fraction of the run are estimated instead of computed; "
                                    "later steps follow 'after'", neutral="estimator=off", paper="0.5 (the first half)",
                  min=0.0, max=1.0, step=0.01),
        inp.Choice("after", "After the estimated part: cond_only = conditional prediction only (the paper); "
                            "adaptive = Adaptive Guidance's latch rule decides. Ignored with estimator=off",
                   AFTER_RULES, paper="cond_only"),
    ]


def coefficients_socket() -> inp.Socket:
    return inp.Socket(CoefficientsType.Input("coefficients", optional=True,
                                             tooltip="From LinearAG Load Coefficients / Fit; needed by "
                                                     "estimator=fitted."))


_SAMPLE_DESCRIPTION = (
    f"{PAPER}: estimates the unconditional prediction on alternating steps of the first part of the run from "
    "past predictions (an online delta rule by default, or an affine per-step regression fitted offline), then "
    "latches to conditional-only like Adaptive Guidance. Works on SD1.x, SD2.x, SDXL, SD3 and Flux with real CFG "
    "(cfg > 1; at cfg 1 the run samples conditional-only with one warning). Fitted coefficients only fit the "
    "model family, sampler, scheduler and step count they were "
    "recorded with (a mismatch raises an error). Cost: one model pass on estimated and latched steps instead of "
    "two (the paper: about 25 evaluations where CFG needs 40); negligible arithmetic.")

NOTHING_FITTED = (f"no coefficients have been fitted yet (models/{COEFFICIENTS_FOLDER}/ holds no file). Fit them "
                  "first: sample with LinearAG Record's model (cfg > 1) and connect its recording and the sampler's "
                  "output to LinearAG Fit; or use LinearAG with an online estimator (extrapolate_delta, the "
                  "default), which needs no file")


class LinearAGRecord(io.ComfyNode):
    INPUTS = inp.NodeInputs("LinearAG Record", [
        inp.Socket(io.Model.Input("model", tooltip="The model to record (sample it with cfg > 1).")),
        inp.Int("history", "K: past steps used as regressors", paper="not stated (our default 2)", min=1, max=8),
    ], defaults=DEFAULTS)
    validate_inputs = INPUTS.validator()

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
            inputs=cls.INPUTS.schema(),
            outputs=[io.Model.Output(tooltip="The model, recording every sampling run."),
                     RecordingType.Output(display_name="recording", tooltip="Connect to LinearAG Fit.")],
        )

    @classmethod
    def execute(cls, **values) -> io.NodeOutput:
        v = cls.INPUTS.checked(values)
        recording = LinearAGRecording(v.history)
        return io.NodeOutput(install_recorder(v.model, recording, "LinearAG Record"), recording)


class LinearAGFit(io.ComfyNode):
    INPUTS = inp.NodeInputs("LinearAG Fit", [
        inp.Socket(RecordingType.Input("recording", tooltip="From LinearAG Record.")),
        inp.Socket(io.Latent.Input("samples", tooltip="The recorded sampler's output: connecting it makes the fit "
                                                      "run after the recording run (NaN there means the recorded "
                                                      "trajectories are broken too)."), finite=True),
        inp.FileStem("filename", f"Name of the coefficients file written to models/{COEFFICIENTS_FOLDER}/ (letters, "
                                 "digits, - and _)", param=None, default="linear_ag", check=files.stem_problem),
        inp.Float("ridge", "Relative Tikhonov regularisation of the fit", neutral="0", min=0.0, max=1.0, step=1e-6),
        inp.Bool("overwrite", "Replace an existing file of that name. Off: a numbered file (name_00001, …) is "
                              "written instead, as SaveImage does", param=None, default=False, optional=True),
    ], defaults=DEFAULTS)
    validate_inputs = INPUTS.validator()

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="TFG_LinearAGFit",
            display_name="LinearAG Fit (TFG)",
            category=CATEGORY,
            description=f"{PAPER}, step 2 of 3: fits one affine coefficient set per step (least squares over all "
                        f"pixels of the recorded trajectories) and saves it to models/{COEFFICIENTS_FOLDER}/ with "
                        "the model family, sampler, schedule and K in its metadata (never over an existing file "
                        "unless 'overwrite' is on). Works for every family the recording came from. Cost: a small "
                        "linear solve per step.",
            inputs=cls.INPUTS.schema(),
            outputs=[CoefficientsType.Output(display_name="coefficients", tooltip="Connect to LinearAG.")],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, **values) -> io.NodeOutput:
        v = cls.INPUTS.checked(values)  # a linked filename is known now: same checks as at validation
        recording = v.recording
        if recording.stats is None or not recording.stats.equations:
            raise adapters.node_error("LinearAG Fit", None, "the recording holds no trajectories.",
                                      "sample (cfg > 1, at least history + 1 steps) with the model from LinearAG "
                                      "Record and connect that sampler's output to 'samples'.")
        folder = coefficients_folder()
        try:
            path = files.new_file(folder, v.filename, ".safetensors", overwrite=bool(v.overwrite))
        except files.FileNameError as exc:
            raise adapters.node_error("LinearAG Fit", None, f"filename {exc}.",
                                      f"type a plain name; the file is written to models/{COEFFICIENTS_FOLDER}/.")
        os.makedirs(folder, exist_ok=True)
        coefficients = fit_recording(recording, v.ridge, path.name)
        replaced = path.exists()
        coefficients.to_file(str(path))
        text = f"{'replaced' if replaced else 'wrote'} models/{COEFFICIENTS_FOLDER}/{coefficients.describe()}"
        adapters.logger.info("%s LinearAG Fit: %s", adapters.PACK_NAME, text)
        return io.NodeOutput(coefficients, ui={"text": [text]})


class LinearAGLoad(io.ComfyNode):
    INPUTS = inp.NodeInputs("LinearAG Load Coefficients", [
        inp.Choice("coefficients_name", f"A file written by LinearAG Fit (models/{COEFFICIENTS_FOLDER}/)",
                   fitted_files, param=None),
    ])

    @classmethod
    def validate_inputs(cls, coefficients_name=None) -> bool | str:
        if not fitted_files():
            return f"{inp.PACK_NAME} LinearAG Load Coefficients: {NOTHING_FITTED}."
        problems = cls.INPUTS.problems({"coefficients_name": coefficients_name})
        return cls.INPUTS.message(problems) if problems else True

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="TFG_LinearAGLoad",
            display_name="LinearAG Load Coefficients (TFG)",
            category=CATEGORY,
            description=f"{PAPER}: loads coefficients saved by LinearAG Fit from models/{COEFFICIENTS_FOLDER}/ "
                        "(the list is read again when the node list is refreshed). Any family. Cost: none.",
            inputs=cls.INPUTS.schema(),
            outputs=[CoefficientsType.Output(display_name="coefficients", tooltip="Connect to LinearAG.")],
        )

    @classmethod
    def execute(cls, **values) -> io.NodeOutput:
        if not fitted_files():
            raise adapters.node_error("LinearAG Load Coefficients", None, NOTHING_FITTED + ".",
                                      "run LinearAG Record → Fit once, then refresh the node list.")
        v = cls.INPUTS.checked(values)
        return io.NodeOutput(LinearAGCoefficients.from_file(coefficients_path(v.coefficients_name)))


def sample_inputs(node: str, head: list) -> inp.NodeInputs:
    """LinearAG / LinearAG Guider: `head` sockets, the estimation inputs, AG's inputs (declared once in
    adaptive_guidance.py, as the nested `guidance` Params), the optional coefficients socket, then the appended
    guidance interval."""
    return inp.NodeInputs(node, head + estimation_widgets() + ag_widgets("guidance.") + [coefficients_socket()]
                          + interval_widgets("guidance."), rules=[INTERVAL_RULE], defaults=DEFAULTS)


class LinearAG(io.ComfyNode):
    INPUTS = sample_inputs("LinearAG", [model_socket("The model to patch (sampled with cfg > 1).")])
    validate_inputs = INPUTS.validator()

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="TFG_LinearAG",
            display_name="LinearAG (TFG)",
            category=CATEGORY,
            description=_SAMPLE_DESCRIPTION + " Use with KSampler; use LinearAG Guider with SamplerCustomAdvanced.",
            inputs=cls.INPUTS.schema(),
            outputs=[io.Model.Output(tooltip="The model with LinearAG installed.")],
        )

    @classmethod
    def execute(cls, **values) -> io.NodeOutput:
        v = cls.INPUTS.checked(values)
        return io.NodeOutput(apply_linear_ag(v.model, cls.INPUTS.params(v), v.coefficients, "LinearAG"))


class LinearAGGuider(io.ComfyNode):
    INPUTS = sample_inputs("LinearAG Guider", [
        model_socket("The model to sample."),
        *conditioning_sockets("Negative prompt. Fitted coefficients assume the negative they were recorded with."),
        guider_cfg_widget("CFG scale"),
    ])
    validate_inputs = INPUTS.validator()

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="TFG_LinearAGGuider",
            display_name="LinearAG Guider (TFG)",
            category=CATEGORY,
            description=_SAMPLE_DESCRIPTION + " A GUIDER for SamplerCustomAdvanced; use LinearAG with KSampler.",
            inputs=cls.INPUTS.schema(),
            outputs=[io.Guider.Output(tooltip="A CFG guider with estimated uncond passes.")],
        )

    @classmethod
    def execute(cls, **values) -> io.NodeOutput:
        v = cls.INPUTS.checked(values)
        patched = apply_linear_ag(v.model, cls.INPUTS.params(v), v.coefficients, "LinearAG Guider")
        return io.NodeOutput(make_guider(patched, v.positive, v.negative, v.cfg))


NODES = [LinearAGRecord, LinearAGFit, LinearAGLoad, LinearAG, LinearAGGuider]
