"""LinearAG nodes in-process on the real ComfyUI with tiny random-weight models."""
from __future__ import annotations

import pytest
import torch

from sampling_helpers import STEPS, advanced_sample, ksample, with_counter

AG_DEFAULTS = dict(threshold=0.995, space="x0", start_percent=0.0, decision="per_sample", crossing_step="cond")


@pytest.fixture
def models_dir(tmp_path, monkeypatch, la):
    import folder_paths
    folder = tmp_path / la.COEFFICIENTS_FOLDER
    monkeypatch.setitem(folder_paths.folder_names_and_paths, la.COEFFICIENTS_FOLDER, ([str(folder)], {".safetensors"}))
    monkeypatch.delitem(folder_paths.filename_list_cache, la.COEFFICIENTS_FOLDER, raising=False)  # ComfyUI's list cache
    return folder


def patch(ag, model, **overrides):
    return ag.AdaptiveGuidance.execute(model=model, **{**AG_DEFAULTS, **overrides}).args[0]


def linear(la, model, coefficients=None, **overrides):
    values = dict(estimator="fitted", estimate_until=0.5, after="cond_only", **AG_DEFAULTS)
    values.update(overrides)
    return la.LinearAG.execute(model=model, coefficients=coefficients, **values).args[0]


def record_and_fit(la, s, steps, models_dir, batch=2, seeds=(11, 12), history=2, name="fit"):
    recorded, recording = la.LinearAGRecord.execute(model=s.model, history=history).args
    latent = None
    for seed in seeds:
        latent = ksample(s, recorded, seed=seed, batch=batch, steps=steps)
    out = la.LinearAGFit.execute(recording=recording, samples={"samples": latent}, filename=name, ridge=1e-6)
    return out.args[0], out.ui


def test_record_fit_save_load_roundtrip(sd15, la, models_dir):
    steps = 6
    coefficients, ui = record_and_fit(la, sd15, steps, models_dir)
    assert coefficients.trajectories == 4 and coefficients.steps == steps and coefficients.family == "SD1.x"
    assert coefficients.sampler == "euler" and coefficients.fitted.tolist() == [False] + [True] * (steps - 1)
    assert ui["text"][0].startswith("wrote models/tfg_linear_ag/fit.safetensors: SD1.x")
    assert (models_dir / "fit.safetensors").is_file()
    loaded = la.LinearAGLoad.execute(coefficients_name="fit.safetensors").args[0]
    assert torch.equal(loaded.coefficients, coefficients.coefficients)
    assert torch.equal(loaded.sigmas, coefficients.sigmas)
    assert "fit.safetensors" in la.LinearAGLoad.INPUT_TYPES()["required"]["coefficients_name"][1]["options"]


def test_recording_does_not_change_sampling(sd15, la):
    recorded, _ = la.LinearAGRecord.execute(model=sd15.model, history=2).args
    assert torch.equal(ksample(sd15, recorded), ksample(sd15, sd15.model))


def test_fitted_linear_ag_saves_evaluations(sd15, la, models_dir):
    steps = 8
    coefficients, _ = record_and_fit(la, sd15, steps, models_dir)
    counted, counts = with_counter(linear(la, sd15.model, coefficients, threshold=1.0))
    out = ksample(sd15, counted, steps=steps)
    assert torch.isfinite(out).all()
    # steps 0, 2 computed; 1, 3 estimated (cond only); 4..7 cond only (the paper's second half)
    assert counts["cond"] == steps and counts["uncond"] == 2
    assert not torch.equal(out, ksample(sd15, sd15.model, steps=steps))


def test_estimation_off_equals_adaptive_guidance_exactly(setup, la, ag):
    for threshold in (0.0, 0.9):
        ag_out = ksample(setup, patch(ag, setup.model, threshold=threshold))
        off = ksample(setup, linear(la, setup.model, None, estimator="off", threshold=threshold))
        assert torch.equal(ag_out, off)


@pytest.mark.parametrize("estimator", ["hold_delta", "extrapolate_delta", "previous_uncond"])
def test_online_estimators_need_no_fit(setup, la, estimator):
    counted, counts = with_counter(linear(la, setup.model, None, estimator=estimator, threshold=1.0))
    out = ksample(setup, counted, steps=8)
    assert torch.isfinite(out).all() and counts["uncond"] == 2 and counts["cond"] == 8


def test_guider_matches_model_patch(sd15, la, models_dir):
    import comfy.samplers
    steps = STEPS
    coefficients, _ = record_and_fit(la, sd15, steps, models_dir)
    guider = la.LinearAGGuider.execute(model=sd15.model, positive=sd15.positive, negative=sd15.negative, cfg=5.0,
                                       estimator="fitted", estimate_until=0.5, after="cond_only",
                                       coefficients=coefficients, **{**AG_DEFAULTS, "threshold": 1.0}).args[0]
    out = advanced_sample(sd15, guider, steps=steps)
    assert torch.isfinite(out).all()
    assert "uncond estimated at steps [1]" in guider.tfg_adaptive_guidance_report
    plain = comfy.samplers.CFGGuider(sd15.model)
    plain.set_conds(sd15.positive, sd15.negative)
    plain.set_cfg(5.0)
    assert not torch.equal(out, advanced_sample(sd15, plain, steps=steps))


def test_coefficients_for_another_step_count_raise(sd15, la, models_dir):
    coefficients, _ = record_and_fit(la, sd15, 4, models_dir)
    with pytest.raises(ValueError) as err:
        ksample(sd15, linear(la, sd15.model, coefficients), steps=6)
    message = str(err.value)
    assert "TFG LinearAG [model family: SD1.x]" in message and "6 steps (fitted for 4)" in message
    with pytest.raises(ValueError, match="sampler dpmpp_2m"):
        ksample(sd15, linear(la, sd15.model, coefficients), steps=4, sampler="dpmpp_2m")


def test_fitted_without_coefficients_raises(sd15, la):
    with pytest.raises(ValueError, match="needs coefficients"):
        linear(la, sd15.model, None)


def test_fit_without_recording_raises(sd15, la, models_dir):
    _, recording = la.LinearAGRecord.execute(model=sd15.model, history=2).args
    with pytest.raises(ValueError, match="no trajectories"):
        la.LinearAGFit.execute(recording=recording, samples={"samples": torch.zeros(1)}, filename="x", ridge=0.0)
    assert la.LinearAGFit.validate_inputs(filename="../evil") != True  # noqa: E712
    assert la.LinearAGFit.validate_inputs(filename="ok_name-1") is True


def test_recording_resets_when_the_schedule_changes(sd15, la, models_dir, caplog):
    recorded, recording = la.LinearAGRecord.execute(model=sd15.model, history=1).args
    ksample(sd15, recorded, steps=4)
    assert recording.stats.trajectories == 1
    ksample(sd15, recorded, steps=5)
    assert recording.stats.trajectories == 1 and recording.stats.steps == 5
    assert any("discarding 1 trajectories" in r.getMessage() for r in caplog.records)


# ------------------------------------------------------------------------------------------------
# File names from inputs (typed, or linked from a PrimitiveString: None at validation) stay in the folder
# ------------------------------------------------------------------------------------------------
@pytest.fixture
def one_recording(la, sd15):
    recorded, recording = la.LinearAGRecord.execute(model=sd15.model, history=1).args
    latent = ksample(sd15, recorded, steps=3)
    return recording, {"samples": latent}


def files_under(root):
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


@pytest.mark.parametrize("hostile", ["/tmp/tfg_evil_abs", "ABSOLUTE", "../x", "a/b", "a\\b", "CON", "nul", "",
                                     "x.safetensors", ".."])
def test_fit_refuses_hostile_names_at_execute_even_when_linked(la, models_dir, one_recording, tmp_path, hostile):
    if hostile == "ABSOLUTE":
        hostile = str(tmp_path / "outside" / "evil")
    recording, samples = one_recording
    assert la.LinearAGFit.validate_inputs(filename=None) is True  # linked: unknown at validation
    assert la.LinearAGFit.validate_inputs(filename=hostile) is not True
    with pytest.raises(ValueError, match=r"TFG LinearAG Fit: input 'filename' "):
        la.LinearAGFit.execute(recording=recording, samples=samples, filename=hostile, ridge=1e-6)
    assert files_under(tmp_path) == []
    assert not any(p.name.startswith("tfg_evil_abs") for p in __import__("pathlib").Path("/tmp").iterdir())


def test_fit_never_overwrites_silently(la, models_dir, one_recording, tmp_path):
    recording, samples = one_recording
    first = la.LinearAGFit.execute(recording=recording, samples=samples, filename="mine", ridge=1e-6)
    assert "wrote models/tfg_linear_ag/mine.safetensors" in first.ui["text"][0]
    before = (models_dir / "mine.safetensors").read_bytes()
    second = la.LinearAGFit.execute(recording=recording, samples=samples, filename="mine", ridge=0.5)
    assert "wrote models/tfg_linear_ag/mine_00001.safetensors" in second.ui["text"][0]
    assert (models_dir / "mine.safetensors").read_bytes() == before
    third = la.LinearAGFit.execute(recording=recording, samples=samples, filename="mine", ridge=0.5, overwrite=True)
    assert "replaced models/tfg_linear_ag/mine.safetensors" in third.ui["text"][0]
    assert (models_dir / "mine.safetensors").read_bytes() != before
    assert files_under(tmp_path) == ["tfg_linear_ag/mine.safetensors", "tfg_linear_ag/mine_00001.safetensors"]


@pytest.mark.parametrize("hostile", ["../fit.safetensors", "/etc/passwd", "missing.safetensors", ""])
def test_load_refuses_names_outside_the_folder(la, models_dir, hostile):
    models_dir.mkdir(parents=True, exist_ok=True)
    (models_dir.parent / "fit.safetensors").write_bytes(b"not inside")
    with pytest.raises(ValueError, match=r"TFG LinearAG Load Coefficients: .*Fix:"):
        la.LinearAGLoad.execute(coefficients_name=hostile)


# ------------------------------------------------------------------------------------------------
# Defaults: every node runs with nothing but its links (issue 18)
# ------------------------------------------------------------------------------------------------
def test_linear_ag_runs_with_every_input_at_its_default(sd15, la):
    assert la.DEFAULTS.estimator == "extrapolate_delta"
    steps = 8
    counted, counts = with_counter(la.LinearAG.execute(model=sd15.model).args[0])
    out = ksample(sd15, counted, steps=steps)
    assert torch.isfinite(out).all() and counts["cond"] == steps and 1 <= counts["uncond"] <= 2
    guider = la.LinearAGGuider.execute(model=sd15.model, positive=sd15.positive, negative=sd15.negative).args[0]
    assert guider.cfg == 8.0
    assert torch.isfinite(advanced_sample(sd15, guider, steps=steps)).all()
    assert "model passes" in guider.tfg_adaptive_guidance_report


def test_load_before_any_fit_says_what_to_do(la, models_dir):
    assert la.fitted_files() == []
    message = la.LinearAGLoad.validate_inputs(coefficients_name="linear_ag.safetensors")
    assert "no coefficients have been fitted yet" in message and "LinearAG Fit" in message
    assert la.LinearAGLoad.GET_SCHEMA().inputs[0].options == []
    with pytest.raises(ValueError, match=r"TFG LinearAG Load Coefficients: no coefficients have been fitted yet.*"
                                         r"Fix: run LinearAG Record → Fit"):
        la.LinearAGLoad.execute(coefficients_name=None)


def test_linear_ag_at_cfg_one_passes_through(sd15, la):
    model = la.LinearAG.execute(model=sd15.model).args[0]
    assert torch.equal(ksample(sd15, model, cfg=1.0), ksample(sd15, sd15.model, cfg=1.0))
    assert la.LinearAGGuider.validate_inputs(cfg=1.0) is True


def test_linear_ag_guidance_interval_is_appended_after_coefficients(la):
    ids = [i.id for i in la.LinearAG.GET_SCHEMA().inputs]
    assert ids[-3:] == ["coefficients", "interval_start", "interval_end"]
    assert "must not exceed" in la.LinearAG.validate_inputs(interval_start=0.9, interval_end=0.1)


def test_a_multistage_sampler_keeps_conditional_only_steps_conditional_only(sd15, la):
    """heun evaluates twice a step (the last step once), at sigmas[i] and sigmas[i + 1]; calls map to the nearest
    schedule entry: s0 (step 0: CFG), s1 (step 1: estimated), s1 (step 1 again: no second estimate, CFG), s2 (step 2:
    conditional-only, the schedule's end), then s2, s3, s3 stay conditional-only."""
    counted, counts = with_counter(linear(la, sd15.model, None, estimator="hold_delta", threshold=1.0))
    ksample(sd15, counted, steps=4, sampler="heun")
    assert counts == {"cond": 7, "uncond": 2, "calls": 7}
