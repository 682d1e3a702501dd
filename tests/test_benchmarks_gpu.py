"""benchmarks/gpu.py on the CPU: full-size configs (structure only), and its timing method on the tiny twins
(warm-up of every method before timing, a cond-only floor row, repeated runs in rotated order, medians)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import host

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(scope="module")
def gpu(comfy_root):
    sys.path.insert(0, str(BENCH))
    try:
        import gpu as module
    finally:
        sys.path.remove(str(BENCH))
    return module


def test_full_size_configs_have_the_published_parameter_counts(gpu):
    assert gpu.parameter_count("sdxl") == pytest.approx(2.567e9, rel=0.01)
    assert gpu.parameter_count("flux") == pytest.approx(11.90e9, rel=0.01)


def test_every_method_is_warmed_then_timed_in_rotated_order(gpu, monkeypatch):
    harness = host.pack_module("benchmarks.harness")
    calls = []
    prepare = harness.prepare

    def spy(model, method, *a, **k):
        calls.append(method.name)
        return prepare(model, method, *a, **k)

    monkeypatch.setattr(harness, "prepare", spy)
    methods = [("AG, latch at 0%", 0.0), ("NegToMe", gpu.negtome_params())]
    res = gpu.run_family("sdxl", True, 32, 2, 2, torch.device("cpu"), torch.float32, methods, repeats=3,
                         warm_steps=2)
    names = ["CFG", "cond only (cfg 1)", "AG, latch at 0%", "NegToMe"]
    assert [r["method"] for r in res["rows"]] == names
    assert calls[:4] == names  # one untimed run of each method first
    timed = calls[4:]
    assert len(timed) == 12 and all(timed.count(n) == 3 for n in names)
    assert [timed[0], timed[4], timed[8]] == [names[0], names[1], names[2]]  # each round starts one later
    rows = {r["method"]: r for r in res["rows"]}
    assert rows["CFG"]["evals"] == 4.0 and rows["CFG"]["ratio"] == 1.0
    assert rows["cond only (cfg 1)"]["evals"] == 2.0 and rows["cond only (cfg 1)"]["eval_ratio"] == 0.5
    assert rows["AG, latch at 0%"]["evals"] == 3.0  # latched at step 0: the uncond pass once
    for r in res["rows"]:
        assert len(r["times"]) == 3 and r["spread"][0] <= r["seconds"] <= r["spread"][1]
        assert r["ratio"] == pytest.approx(r["seconds"] / rows["CFG"]["seconds"])


def test_method_plan_and_per_model_options(gpu):
    names = [n for n, _ in gpu.plan_methods(set())]
    assert any(n.startswith("AG") for n in names) and any("LinearAG" in n for n in names)
    assert [n for n in names if "NegToMe" in n] == ["CFG + NegToMe (pack defaults, similarity model)",
                                                    "CFG + NegToMe (similarity fp32)",
                                                    "CFG + NegToMe (similarity checked)"]
    assert [n for n, _ in gpu.plan_methods({"negtome"})] == names[-3:-1]
    assert [n for n, _ in gpu.plan_methods({"negtome_other"})] == names[-1:]
    assert gpu._per_family("sdxl=20,flux=10", ["sdxl", "flux"], int, 3) == {"sdxl": 20, "flux": 10}
    assert gpu._per_family("", ["sdxl"], int, 3) == {"sdxl": 3}


def test_tiny_cli_run_writes_json_and_refuses_write(tmp_path, comfy_root):
    env = dict(os.environ, OMP_NUM_THREADS="1", COMFYUI_PATH=str(comfy_root))
    out_json = tmp_path / "gpu.json"
    run = subprocess.run([sys.executable, str(BENCH / "gpu.py"), "--tiny", "--models", "sdxl", "--steps", "2",
                          "--repeats", "3", "--warm-steps", "1", "--only", "sdxl=negtome", "--json", str(out_json)],
                         capture_output=True, text=True, timeout=600, env=env)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "| sdxl" in run.stdout and "cond only (cfg 1)" in run.stdout and "median" in run.stdout
    data = json.loads(out_json.read_text())
    methods = [r["method"] for r in data["results"]["sdxl"]["rows"]]
    assert methods[:2] == ["CFG", "cond only (cfg 1)"] and any("NegToMe" in m for m in methods)
    assert not any(m.startswith("AG") for m in methods)
    refused = subprocess.run([sys.executable, str(BENCH / "gpu.py"), "--tiny", "--write"], capture_output=True,
                             text=True, timeout=120, env=env)
    assert refused.returncode == 2 and "--write is refused" in refused.stderr


def test_device_check_script_is_prepared():
    script = (BENCH / "device_check.sh").read_text()
    assert script.startswith("#!/usr/bin/env bash")
    for needle in ("COMFYUI_PATH", "$OUT", "gpu.py", "--write", "negtome_overhead.py", "sdxl=20,flux=10"):
        assert needle in script, needle
    syntax = subprocess.run(["bash", "-n", str(BENCH / "device_check.sh")], capture_output=True, text=True)
    assert syntax.returncode == 0, syntax.stderr


def test_device_check_script_stops_without_comfyui(tmp_path):
    env = dict(os.environ, COMFYUI_PATH=str(tmp_path / "missing"), OUT=str(tmp_path / "out"))
    run = subprocess.run(["bash", str(BENCH / "device_check.sh")], capture_output=True, text=True, timeout=60,
                         env=env, cwd=BENCH.parent)
    assert run.returncode == 3 and "ComfyUI" in run.stderr and "missing" in run.stderr
