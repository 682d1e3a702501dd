"""benchmarks/gpu.py on the CPU: full-size configs (structure only), and its timing method on the tiny twins
(warm-up of every method before timing, a cond-only floor row, repeated runs in rotated order, medians, exact
evaluation counts per row); benchmarks/gpu_summary.py's target rows; benchmarks/device_check.sh end to end in its
TINY mode and under a hanging part."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import host

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
BENCHMARKS_MD = BENCH.parent / "BENCHMARKS.md"


@pytest.fixture(scope="module")
def gpu(comfy_root):
    sys.path.insert(0, str(BENCH))
    try:
        import gpu as module
        import gpu_summary  # noqa: F401
    finally:
        sys.path.remove(str(BENCH))
    return module


@pytest.fixture(scope="module")
def summary(gpu):
    return sys.modules["gpu_summary"]


def _gpu_section() -> str:
    text = BENCHMARKS_MD.read_text() if BENCHMARKS_MD.is_file() else ""
    found = re.search(r"<!-- results:gpu:start -->.*?<!-- results:gpu:end -->", text, re.S)
    return found.group(0) if found else ""


def _rows(res) -> dict:
    return {r["method"]: r for r in res["rows"]}


# ---- full-size configs --------------------------------------------------------------------------
def test_full_size_configs_have_the_published_parameter_counts(gpu):
    assert gpu.parameter_count("sdxl") == pytest.approx(2.567e9, rel=0.01)
    assert gpu.parameter_count("flux") == pytest.approx(11.90e9, rel=0.01)
    assert gpu.parameter_count("wan1.3b") == pytest.approx(1.42e9, rel=0.01)
    assert gpu.parameter_count("wan14b") == pytest.approx(14.29e9, rel=0.01)
    assert gpu.parameter_count("qwen") == pytest.approx(20.43e9, rel=0.01)


def test_full_size_latents_and_conditioning_have_the_released_shapes(gpu):
    models = sys.modules["gpu_models"]
    video = models.parse_size("832x480x33", "wan14b", False)
    assert video == (832, 480, 33) and models.default_size("wan1.3b", False) == video
    assert models.latent_shape("wan14b", video, 1, 16) == (1, 16, 9, 60, 104)  # 9 x 30 x 52 = 14 040 tokens
    assert models.latent_shape("qwen", models.parse_size("1024", "qwen", False), 2, 16) == (2, 16, 1, 128, 128)
    assert models.latent_shape("sdxl", (1024, 1024, 0), 4, 4) == (4, 4, 128, 128)
    for family, text, extra in (("wan14b", (1, 512, 4096), set()), ("qwen", (1, 128, 3584), set()),
                                ("sdxl", (1, 77, 2048), {"pooled_output"}),
                                ("flux", (1, 256, 4096), {"pooled_output", "guidance"})):
        (context, options), = models.conditioning(family, False, 1)
        assert tuple(context.shape) == text and set(options) == extra, family
    with pytest.raises(ValueError):
        models.parse_size("x", "sdxl", False)


def test_expected_evaluation_counts_follow_the_schedules(gpu):
    import comfy.samplers
    base = gpu.build_base_model("sdxl", True, torch.device("cpu"), torch.float32)
    sampling = base.model_sampling
    sigmas = comfy.samplers.calculate_sigmas(sampling, "normal", 20)
    counts = {name: gpu.expected_evals(spec, 20, b, sigmas, sampling.percent_to_sigma)
              for name, spec, b in gpu.plan_methods(set(), batch=4)}
    # 20 steps: AG latching at 50% computes the uncond on steps 0-10 (31 rows of 40), at 30% on 0-6 (27); the
    # per-image row latches at steps 6/8/10/12 (uncond rows 7+9+11+13 over 4 images); LinearAG estimates steps
    # 1,3,5,7,9 and is cond-only from step 10 (25)
    assert counts["AG, latch at 50% of the schedule"] == 31.0
    assert counts["AG, latch at 30% of the schedule"] == 27.0
    assert counts["AG, images latching at 30%/40%/50%/60% (per-row uncond)"] == 30.0
    assert [v for k, v in counts.items() if k.startswith("LinearAG")] == [25.0]
    assert all(v == 40.0 for k, v in counts.items() if "NegToMe" in k)


# ---- the timing method on the tiny twins ----------------------------------------------------------
def test_every_method_is_warmed_then_timed_in_rotated_order(gpu, monkeypatch):
    harness = host.pack_module("benchmarks.harness")
    calls = []
    prepare = harness.prepare

    def spy(model, method, *a, **k):
        calls.append(method.name)
        return prepare(model, method, *a, **k)

    monkeypatch.setattr(harness, "prepare", spy)
    snapshots = []
    methods = [("AG, latch at 0%", 0.0), ("NegToMe", gpu.negtome_params())]
    res = gpu.run_family("sdxl", True, 32, 2, 2, torch.device("cpu"), torch.float32, methods, repeats=3,
                         warm_steps=2, progress=lambda r: snapshots.append(json.loads(json.dumps(r, default=str))))
    rounds = [(r["rounds"], [x["runs"] for x in r["rows"]]) for r in snapshots]
    names = ["CFG", "cond only (cfg 1)", "AG, latch at 0%", "NegToMe"]
    assert [r["method"] for r in res["rows"]] == names
    assert calls[:4] == names  # one untimed run of each method first
    timed = calls[4:]
    assert len(timed) == 12 and all(timed.count(n) == 3 for n in names)
    assert [timed[0], timed[4], timed[8]] == [names[0], names[1], names[2]]  # each round starts one later
    assert rounds == [(0, [0] * 4), (1, [1] * 4), (2, [2] * 4), (3, [3] * 4)]  # saved after warm-up, every round
    rows = _rows(res)
    assert rows["CFG"]["evals"] == 4.0 and rows["CFG"]["ratio"] == 1.0
    assert rows["cond only (cfg 1)"]["evals"] == 2.0 and rows["cond only (cfg 1)"]["eval_ratio"] == 0.5
    assert rows["AG, latch at 0%"]["evals"] == 3.0  # latched at step 0: the uncond pass once
    for r in res["rows"]:
        assert r["evals"] == r["expected_evals"]
        assert len(r["times"]) == 3 and r["spread"][0] <= r["seconds"] <= r["spread"][1]
        assert r["ratio"] == pytest.approx(r["seconds"] / rows["CFG"]["seconds"])
    # what a run stopped by its time limit leaves: rows without runs, rows with fewer runs, both said
    ctx = dict(date="d", device="cpu", torch="t", cuda=None, comfyui="c", dtype="float32", repeats=3, warm="2",
               command="gpu.py", total=1.0)
    before = gpu.render({"sdxl": snapshots[0]}, ctx)
    assert "| SDXL (" in before and "| CFG (not timed) | 2 | – | – | – |" in before
    partial = gpu.render({"sdxl": snapshots[2]}, ctx)
    assert "(2 of 3 runs)" in partial and "Stopped by the time limit before all timed runs: sdxl CFG" in partial
    f = rows["cond only (cfg 1)"]["ratio"]
    ag = rows["AG, latch at 0%"]
    assert ag["floor_ratio"] == pytest.approx(f + (0.75 - 0.5) * 2 * (1 - f))
    assert ag["floor_excess"] == pytest.approx(ag["ratio"] - ag["floor_ratio"])


def test_floor_implied_ratio_is_the_line_through_cfg_and_the_floor(gpu):
    built = [("CFG", None, None, 4), ("cond only (cfg 1)", None, "cond_only", 4), ("AG", None, 0.5, 4)]
    samples = {"CFG": [2.88], "cond only (cfg 1)": [1.53], "AG": [2.33]}
    info = {"CFG": dict(evals=40.0, uncond=20.0, calls=20, peak=None, finite=True),
            "cond only (cfg 1)": dict(evals=20.0, uncond=0.0, calls=20, peak=None, finite=True),
            "AG": dict(evals=31.0, uncond=11.0, calls=20, peak=None, finite=True)}
    rows = {r["method"]: r for r in gpu._rows(built, {}, samples, info, {"CFG": 40, "cond only (cfg 1)": 20,
                                                                        "AG": 31})}
    f = 1.53 / 2.88  # SDXL's measured floor: 0.531x CFG for half the rows
    assert rows["AG"]["floor_ratio"] == pytest.approx(f + 0.275 * 2 * (1 - f)) == pytest.approx(0.789, abs=1e-3)
    assert rows["AG"]["floor_excess"] == pytest.approx(2.33 / 2.88 - rows["AG"]["floor_ratio"])
    assert rows["CFG"]["floor_ratio"] == pytest.approx(1.0)
    assert rows["cond only (cfg 1)"]["floor_ratio"] == pytest.approx(f)


def test_per_image_latches_take_the_per_row_uncond_path(gpu):
    ag = host.pack_module("nodes.adaptive_guidance")
    tracker = ag.AdaptiveGuidanceTracker
    methods = [m for m in gpu.plan_methods({"ag_per_image"}, batch=4)]
    assert [m[0] for m in methods] == ["AG, images latching at 30%/40%/50%/60% (per-row uncond)"]
    res = gpu.run_family("sdxl", True, 32, 4, 10, torch.device("cpu"), torch.float32, methods, repeats=1,
                         warm_steps=2)
    row = _rows(res)[methods[0][0]]
    # 10 steps, images latching at steps 3/4/5/6: uncond rows 4+5+6+7 = 22 over 4 images; steps 4-6 run the cond
    # call for the batch plus one uncond call for the open images: 10 + 3 calls
    assert row["uncond"] == 22 / 4 and row["evals"] == 10 + 22 / 4 == row["expected_evals"]
    assert row["calls"] == 13 and row["batch"] == 4 and row["eval_ratio"] == pytest.approx(15.5 / 20)
    assert ag.AdaptiveGuidanceTracker is tracker  # the hook is gone after the row
    assert gpu.plan_methods({"ag_per_image"}, batch=1) == []  # needs a batch of images


@pytest.mark.parametrize("family,steps,groups,expected", [
    # 8 steps of the flow schedule: AG 50% latches at step 4 (uncond on 0-4), 30% at step 3; LinearAG estimates
    # steps 1 and 3 and is cond-only from step 4; NegToMe runs at batch 2 against CFG at batch 2
    ("wan1.3b", 8, {"ag", "linear_ag", "negtome"},
     {"CFG": (1, 16), "cond only (cfg 1)": (1, 8), "AG, latch at 50% of the schedule": (1, 13),
      "AG, latch at 30% of the schedule": (1, 12), "LinearAG": (1, 10), "CFG (batch 2)": (2, 16),
      "CFG + NegToMe": (2, 16)}),
    ("qwen", 8, {"ag", "linear_ag", "negtome"},
     {"CFG": (1, 16), "cond only (cfg 1)": (1, 8), "AG, latch at 50% of the schedule": (1, 13),
      "AG, latch at 30% of the schedule": (1, 12), "LinearAG": (1, 10), "CFG (batch 2)": (2, 16),
      "CFG + NegToMe": (2, 16)}),
    ("wan14b", 4, {"ag50", "linear_ag"},
     {"CFG": (1, 8), "cond only (cfg 1)": (1, 4), "AG, latch at 50% of the schedule": (1, 7), "LinearAG": (1, 5)}),
])
def test_video_and_qwen_rows_have_exact_evaluation_counts(gpu, family, steps, groups, expected):
    methods = gpu.plan_methods(groups, batch=1, negtome_batch=2)
    res = gpu.run_family(family, True, gpu.gpu_models.default_size(family, True), 1, steps, torch.device("cpu"),
                         torch.float32, methods, repeats=1, warm_steps=2)
    got = {}
    for r in res["rows"]:
        key = next(k for k in expected if r["method"] == k or (k in ("LinearAG", "CFG + NegToMe")
                                                                 and r["method"].startswith(k)))
        got[key] = (r["batch"], r["evals"])
        assert r["evals"] == r["expected_evals"] and r["runs"] == 1 and r["finite"], r["method"]
    assert got == {k: (b, float(e)) for k, (b, e) in expected.items()}
    rows = _rows(res)
    if "CFG (batch 2)" in rows:
        negtome = next(r for r in res["rows"] if r["kind"] == "negtome")
        assert negtome["ratio"] == pytest.approx(negtome["seconds"] / rows["CFG (batch 2)"]["seconds"])
        assert negtome["floor_ratio"] is None  # no floor at batch 2
    assert res["size"] == list(gpu.gpu_models.default_size(family, True)) and res["tiny"]


def test_method_plan_and_per_model_options(gpu):
    names = [n for n, _, _ in gpu.plan_methods(set())]
    assert any(n.startswith("AG") for n in names) and any("LinearAG" in n for n in names)
    assert "AG, images latching at 30%/40%/50%/60% (per-row uncond)" in names
    assert [n for n in names if "NegToMe" in n] == ["CFG + NegToMe (pack defaults, similarity model)",
                                                    "CFG + NegToMe (similarity fp32)",
                                                    "CFG + NegToMe (similarity checked)"]
    assert [n for n, _, _ in gpu.plan_methods({"negtome"})] == names[-3:-2]
    assert [n for n, _, _ in gpu.plan_methods({"negtome_other"})] == names[-2:]
    assert [n for n, _, _ in gpu.plan_methods({"ag50"})] == ["AG, latch at 50% of the schedule"]
    assert [b for _, _, b in gpu.plan_methods({"ag", "negtome"}, batch=1, negtome_batch=2)] == [1, 1, 2]
    plan = gpu._plan(gpu.plan_methods({"ag50", "negtome"}, batch=1, negtome_batch=2), 1, floor=False)
    assert [(n, b) for n, _, b in plan] == [("CFG", 1), ("AG, latch at 50% of the schedule", 1), ("CFG (batch 2)", 2),
                                            ("CFG + NegToMe (pack defaults, similarity model)", 2)]
    assert gpu._per_family("sdxl=20,flux=10", ["sdxl", "flux"], int, 3) == {"sdxl": 20, "flux": 10}
    assert gpu._per_family("", ["sdxl"], int, 3) == {"sdxl": 3}
    assert gpu._per_family("", ["sdxl", "wan14b"], int, lambda f: gpu.FAMILIES[f].steps) == {"sdxl": 20, "wan14b": 4}


# ---- the command line ---------------------------------------------------------------------------
def test_tiny_cli_run_writes_json_and_refuses_write(tmp_path, comfy_root):
    env = dict(os.environ, OMP_NUM_THREADS="1", COMFYUI_PATH=str(comfy_root))
    out_json = tmp_path / "gpu.json"
    run = subprocess.run([sys.executable, str(BENCH / "gpu.py"), "--tiny", "--models", "sdxl,wan1.3b", "--steps",
                          "2", "--repeats", "2", "--warm-steps", "1", "--only", "sdxl=negtome,wan1.3b=negtome",
                          "--no-floor", "wan1.3b", "--json", str(out_json)],
                         capture_output=True, text=True, timeout=600, env=env)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "| SDXL" in run.stdout and "cond only (cfg 1)" in run.stdout and "median" in run.stdout
    assert "Wan 2.1 T2V 1.3B" in run.stdout and "×5 frames" in run.stdout and "floor-implied" in run.stdout
    data = json.loads(out_json.read_text())
    assert data["context"]["tiny"] and not list(tmp_path.glob("*.tmp"))
    methods = [r["method"] for r in data["results"]["sdxl"]["rows"]]
    assert methods[:2] == ["CFG", "cond only (cfg 1)"] and any("NegToMe" in m for m in methods)
    assert not any(m.startswith("AG") for m in methods)
    wan = [(r["method"], r["batch"], r["runs"]) for r in data["results"]["wan1.3b"]["rows"]]
    assert wan == [("CFG", 1, 2), ("CFG (batch 2)", 2, 2), ("CFG + NegToMe (pack defaults, similarity model)", 2, 2)]
    refused = subprocess.run([sys.executable, str(BENCH / "gpu.py"), "--tiny", "--write"], capture_output=True,
                             text=True, timeout=120, env=env)
    assert refused.returncode == 2 and "--write is refused" in refused.stderr
    before = _gpu_section()
    rendered = subprocess.run([sys.executable, str(BENCH / "gpu.py"), "--render", str(out_json), "--write"],
                              capture_output=True, text=True, timeout=120, env=env)
    assert rendered.returncode == 2 and "--write is refused" in rendered.stderr
    assert "| Wan 2.1 T2V 1.3B" in rendered.stdout and _gpu_section() == before


# ---- the summary of targets ---------------------------------------------------------------------
def _row(method, kind, ratio, eval_ratio=1.0, batch=4, runs=3, evals=40.0, expected=40.0, floor_ratio=None,
         peak=None):
    return dict(method=method, kind=kind, ratio=ratio, eval_ratio=eval_ratio, batch=batch, runs=runs, evals=evals,
                expected_evals=expected, floor_ratio=floor_ratio,
                floor_excess=None if floor_ratio is None else ratio - floor_ratio, peak=peak, finite=True)


def test_summary_rows_state_each_target(summary):
    results = {
        "sdxl": dict(repeats=3, rows=[
            _row("CFG", "cfg", 1.0, peak=6.2), _row("cond only (cfg 1)", "floor", 0.531, 0.5, evals=20, expected=20),
            _row("AG, latch at 50% of the schedule", "ag", 0.797, 0.775, evals=31, expected=31, floor_ratio=0.789),
            _row("LinearAG (extrapolate_delta), paper schedule", "linear_ag", 0.67, 0.625, evals=25, expected=25,
                 runs=2, floor_ratio=0.648),
            _row("CFG + NegToMe (pack defaults, similarity model)", "negtome", 1.025, peak=6.2)]),
        "flux": dict(repeats=3, rows=[_row("CFG", "cfg", 1.0),
                                      _row("CFG + NegToMe (pack defaults, similarity model)", "negtome", 1.02)]),
        "wan1.3b": dict(repeats=3, rows=[
            _row("CFG", "cfg", 1.0, batch=1, evals=16, expected=16),
            _row("AG, latch at 50% of the schedule", "ag", 0.8, 0.875, batch=1, evals=14, expected=13),
            _row("CFG (batch 2)", "cfg", 1.0, batch=2, evals=16, expected=16),
            _row("CFG + NegToMe (pack defaults, similarity model)", "negtome", 1.3, batch=2, evals=16, expected=16)]),
    }
    kernel = {"default_similarity": "model", "rows": [
        dict(shape="sdxl out0-2 32x32", rows=4, setting="model", ratio=1.1, largest_block_mib=6),
        dict(shape="flux block 64x64", rows=8, setting="model", ratio=1.3, largest_block_mib=64, launches=13,
             syncs=1)]}
    parts = [("negtome_kernel", 0, 30), ("gpu_sdxl", 0, 60), ("gpu_wan14b", 124, 130), ("gpu_qwen", -1, 0)]
    rows = {r["check"]: r for r in summary.checks(results, kernel, parts)}
    met = {name: r["ok"] for name, r in rows.items()}
    assert met["part gpu_sdxl"] and not met["part gpu_wan14b"] and "time limit" in rows["part gpu_wan14b"]["value"]
    assert not met["part gpu_qwen"] and "skipped" in rows["part gpu_qwen"]["value"]
    assert rows["sdxl CFG + NegToMe (pack defaults, similarity model): time / CFG (batch 4)"]["limit"] == "<= 1.02"
    assert not met["sdxl CFG + NegToMe (pack defaults, similarity model): time / CFG (batch 4)"]
    assert met["flux CFG + NegToMe (pack defaults, similarity model): time / CFG (batch 4)"]
    assert rows["wan1.3b CFG + NegToMe (pack defaults, similarity model): time / CFG (batch 2)"]["limit"] == "-"
    assert met["sdxl AG, latch at 50% of the schedule: time / CFG vs eval ratio"]
    assert rows["sdxl AG, latch at 50% of the schedule: time / CFG vs floor-implied"]["value"] == \
        "0.797 vs 0.789 (+0.008)"
    assert not met["sdxl LinearAG (extrapolate_delta), paper schedule: time / CFG vs eval ratio"]  # 0.67 > 0.655
    assert not met["sdxl: timed runs per row"] and "LinearAG" in rows["sdxl: timed runs per row"]["value"]
    assert met["sdxl: evaluations per image as scheduled"] and not met["wan1.3b: evaluations per image as scheduled"]
    assert rows["sdxl CFG + NegToMe (pack defaults, similarity model): peak GPU memory vs CFG (GiB)"]["value"] == \
        "6.2 vs 6.2"
    assert met["kernel sdxl out0-2 32x32 4 rows, model: / released maths"]
    assert not met["kernel flux block 64x64 8 rows, model: / released maths"]
    assert met["kernel flux block 64x64 8 rows: largest similarity block (MiB)"]
    assert not met["kernel flux block 64x64 8 rows: host syncs per call (kernel launches 13)"]
    assert not any("host syncs" in name for name in rows if name.startswith("kernel sdxl"))  # no count, no row
    text = summary.render(list(rows.values()))
    assert text.startswith("| check | value | target | met |") and "| NO |" in text
    broken = summary.checks({}, {"rows": [{"setting": "model"}]})
    assert broken[0]["check"] == "kernel JSON" and not broken[0]["ok"]


# ---- benchmarks/device_check.sh -----------------------------------------------------------------
def test_device_check_script_is_prepared():
    script = (BENCH / "device_check.sh").read_text()
    assert script.startswith("#!/usr/bin/env bash")
    for needle in ("COMFYUI_PATH", "$OUT", "gpu.py", "--write", "--render", "negtome_overhead.py", "gpu_summary.py",
                   "--models sdxl", "--models flux", "--models wan1.3b", "--models qwen", "--models wan14b",
                   "832x480x33", "ag_per_image", "timeout -k", "BUDGET_S:-540", ".host/ComfyUI", ".whl"):
        assert needle in script, needle
    syntax = subprocess.run(["bash", "-n", str(BENCH / "device_check.sh")], capture_output=True, text=True)
    assert syntax.returncode == 0, syntax.stderr


def test_device_check_script_stops_without_comfyui(tmp_path):
    env = dict(os.environ, COMFYUI_PATH=str(tmp_path / "missing"), OUT=str(tmp_path / "out"))
    run = subprocess.run(["bash", str(BENCH / "device_check.sh")], capture_output=True, text=True, timeout=60,
                         env=env, cwd=BENCH.parent)
    assert run.returncode == 3 and "ComfyUI" in run.stderr and "missing" in run.stderr


def test_device_check_tiny_runs_every_part_and_writes_nothing(tmp_path, comfy_root):
    out = tmp_path / "out"
    before = _gpu_section()
    env = dict(os.environ, TINY="1", REPEATS="1", OUT=str(out), COMFYUI_PATH=str(comfy_root), OMP_NUM_THREADS="1")
    run = subprocess.run(["bash", str(BENCH / "device_check.sh")], capture_output=True, text=True, timeout=900,
                         env=env, cwd=BENCH.parent)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-2000:]
    parts = [line.split() for line in (out / "parts.txt").read_text().splitlines()]
    assert [p[0] for p in parts] == ["negtome_kernel", "gpu_sdxl", "gpu_flux", "gpu_wan1.3b", "gpu_qwen",
                                     "gpu_wan14b"]
    assert all(p[1] == "0" for p in parts), parts
    section = (out / "gpu.md").read_text()
    for title in ("SDXL", "Flux-dev", "Wan 2.1 T2V 1.3B", "Wan 2.1 T2V 14B", "Qwen-Image"):
        assert f"| {title} (" in section, title
    assert "images latching at 30%/40%/50%/60%" in section and "CFG (batch 2)" in section
    checks = json.loads((out / "summary.json").read_text())["checks"]
    scheduled = [c for c in checks if c["check"].endswith("evaluations per image as scheduled")]
    assert len(scheduled) == 5 and all(c["ok"] for c in scheduled)
    assert any(c["check"].startswith("kernel ") for c in checks)
    assert not (out / "BENCHMARKS.md").exists() and _gpu_section() == before  # TINY never writes BENCHMARKS.md


def test_device_check_ends_within_its_budget_when_a_part_hangs(tmp_path, comfy_root):
    """A python that hangs in every gpu.py part: the part is killed at the budget, the rest are skipped, the
    summary says so, and the script ends within BUDGET_S."""
    fake = tmp_path / "python"
    fake.write_text("#!/usr/bin/env bash\n"
                    "case \" $* \" in *\" benchmarks/gpu.py \"*\" --json \"*) exec sleep 600 ;; esac\n"
                    f"exec {sys.executable} \"$@\"\n")
    fake.chmod(0o755)
    out = tmp_path / "out"
    env = dict(os.environ, TINY="1", REPEATS="1", OUT=str(out), COMFYUI_PATH=str(comfy_root), OMP_NUM_THREADS="1",
               PYTHON=str(fake), BUDGET_S="75")
    t0 = time.monotonic()
    run = subprocess.run(["bash", str(BENCH / "device_check.sh")], capture_output=True, text=True, timeout=300,
                         env=env, cwd=BENCH.parent)
    took = time.monotonic() - t0
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-2000:]
    assert took <= 75 + 10, took
    parts = {p.split()[0]: int(p.split()[1]) for p in (out / "parts.txt").read_text().splitlines()}
    assert parts["negtome_kernel"] == 0 and parts["gpu_sdxl"] in (124, 137, -1)
    assert parts["gpu_wan14b"] == -1  # no time left
    summary_text = (out / "summary.md").read_text()
    assert "skipped: no time left" in summary_text and "| NO |" in summary_text
