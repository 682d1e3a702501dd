"""Headless acceptance tests: a real ComfyUI server (subprocess, CPU, loopback) with the pack installed,
driven over HTTP + websocket with API-format prompts on the tiny random-weight models; and the quick-start demo
(tools/quickstart.py) end to end, as a user runs it."""
from __future__ import annotations

import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

from headless_server import (PACK_DIR_NAME, TESTING_PACK_DIR_NAME, TINY_LOADERS, TINY_SD15_NAME, VIDEO_FRAMES,
                             WORKFLOWS_API_DIR, executed_nodes, load_api_workflow)

STEPS = 6
SIZE = 64
API_WORKFLOWS = sorted(WORKFLOWS_API_DIR.glob("*.json"))
MAX_IMPORT_SECONDS = 0.3


# ----------------------------------------------------------------------------------------------
# API-format graph builders
# ----------------------------------------------------------------------------------------------

def _ag_inputs(model_link, threshold=0.995, space="x0", start_percent=0.0, decision="per_sample",
               crossing_step="cond", interval_start=0.0, interval_end=1.0):
    return {"model": model_link, "threshold": threshold, "space": space, "start_percent": start_percent,
            "decision": decision, "crossing_step": crossing_step, "interval_start": interval_start,
            "interval_end": interval_end}


def _base_graph(family: str) -> dict:
    """Loader (1), positive (2), negative (3), empty latent (4)."""
    if family == "sd15":
        loader = {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": TINY_SD15_NAME}}
        latent = {"class_type": "EmptyLatentImage", "inputs": {"width": SIZE, "height": SIZE, "batch_size": 1}}
    else:
        loader = {"class_type": TINY_LOADERS[family], "inputs": {}}
        latent = {"class_type": "EmptySD3LatentImage" if family in ("sd3", "flux") else "EmptyLatentImage",
                  "inputs": {"width": SIZE, "height": SIZE, "batch_size": 1}}
    return {
        "1": loader,
        "2": {"class_type": "CLIPTextEncode", "inputs": {"text": "a red fox in fresh snow", "clip": ["1", 1]}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": "blurry, lowres", "clip": ["1", 1]}},
        "4": latent,
    }


def _add_ksampler_branch(g: dict, tag: str, seed: int, ag: dict | None, cfg: float = 6.0) -> str:
    """KSampler on the plain model (ag None) or on a TFG_AdaptiveGuidance patch; returns the save node id."""
    model = ["1", 0]
    if ag is not None:
        g[f"{tag}ag"] = {"class_type": "TFG_AdaptiveGuidance", "inputs": _ag_inputs(model, **ag)}
        model = [f"{tag}ag", 0]
    g[f"{tag}ks"] = {"class_type": "KSampler", "inputs": {
        "model": model, "seed": seed, "steps": STEPS, "cfg": cfg, "sampler_name": "euler", "scheduler": "normal",
        "positive": ["2", 0], "negative": ["3", 0], "latent_image": ["4", 0], "denoise": 1.0}}
    g[f"{tag}lat"] = {"class_type": "SaveLatent", "inputs": {"samples": [f"{tag}ks", 0],
                                                             "filename_prefix": f"tfgtest/{tag}"}}
    g[f"{tag}dec"] = {"class_type": "VAEDecode", "inputs": {"samples": [f"{tag}ks", 0], "vae": ["1", 2]}}
    g[f"{tag}save"] = {"class_type": "SaveImage", "inputs": {"images": [f"{tag}dec", 0],
                                                             "filename_prefix": f"tfgtest/{tag}"}}
    return f"{tag}save"


def _add_guider_branch(g: dict, tag: str, ag: dict | None, cfg: float = 6.0) -> str:
    """SamplerCustomAdvanced with core CFGGuider (ag None) or TFG_AdaptiveGuider; shared noise/sampler/sigmas."""
    g.setdefault("noise", {"class_type": "RandomNoise", "inputs": {"noise_seed": 7}})
    g.setdefault("sampler", {"class_type": "KSamplerSelect", "inputs": {"sampler_name": "euler"}})
    g.setdefault("sigmas", {"class_type": "BasicScheduler", "inputs": {"model": ["1", 0], "scheduler": "simple",
                                                                      "steps": STEPS, "denoise": 1.0}})
    conds = {"model": ["1", 0], "positive": ["2", 0], "negative": ["3", 0], "cfg": cfg}
    if ag is None:
        g[f"{tag}guider"] = {"class_type": "CFGGuider", "inputs": conds}
    else:
        inputs = _ag_inputs(["1", 0], **ag)
        inputs.update(conds)
        g[f"{tag}guider"] = {"class_type": "TFG_AdaptiveGuider", "inputs": inputs}
    g[f"{tag}sca"] = {"class_type": "SamplerCustomAdvanced", "inputs": {
        "noise": ["noise", 0], "guider": [f"{tag}guider", 0], "sampler": ["sampler", 0], "sigmas": ["sigmas", 0],
        "latent_image": ["4", 0]}}
    g[f"{tag}lat"] = {"class_type": "SaveLatent", "inputs": {"samples": [f"{tag}sca", 0],
                                                             "filename_prefix": f"tfgtest/{tag}"}}
    g[f"{tag}dec"] = {"class_type": "VAEDecode", "inputs": {"samples": [f"{tag}sca", 0], "vae": ["1", 2]}}
    g[f"{tag}save"] = {"class_type": "SaveImage", "inputs": {"images": [f"{tag}dec", 0],
                                                             "filename_prefix": f"tfgtest/{tag}"}}
    return f"{tag}save"


def _single_latent(server, entry, node_id):
    latents = server.latents_by_node(entry)
    assert node_id in latents and len(latents[node_id]) == 1, latents.keys()
    return latents[node_id][0]


def _single_image(server, entry, node_id) -> np.ndarray:
    images = server.images_by_node(entry)
    assert node_id in images and len(images[node_id]) == 1, images.keys()
    return images[node_id][0]


# ----------------------------------------------------------------------------------------------
# Tests
# ----------------------------------------------------------------------------------------------

def test_pack_imported_cleanly_and_fast(comfy_server):
    log = comfy_server.log_text()
    ours = [line for line in log.splitlines() if PACK_DIR_NAME in line or TESTING_PACK_DIR_NAME in line]
    failures = [line for line in ours if "IMPORT FAILED" in line or "Cannot import" in line]
    assert not failures, "\n".join(failures)

    times = {}
    for line in log.splitlines():
        m = re.match(r"^\s*([0-9.]+) seconds(?: \(IMPORT FAILED\))?: (.+)$", line)
        if m:
            times[m.group(2).strip().rstrip("/").rsplit("/", 1)[-1]] = float(m.group(1))
    assert PACK_DIR_NAME in times, f"no import-time line for the pack in the log:\n{log[-3000:]}"
    assert times[PACK_DIR_NAME] <= MAX_IMPORT_SECONDS, times

    for node in ("TFG_AdaptiveGuidance", "TFG_AdaptiveGuider", *TINY_LOADERS.values()):
        assert node in comfy_server.get(f"/object_info/{node}"), node


def test_api_workflows_exist():
    assert API_WORKFLOWS, f"no API-format workflows in {WORKFLOWS_API_DIR}"


def _prerequisite(path):
    """A workflow that consumes what another one writes (LinearAG apply ← fit) names its producer."""
    producer = path.with_name(path.name.replace("_2_apply_", "_1_fit_"))
    return producer if producer != path else None


def _size(path) -> int:
    """ASGDiffusion needs at least 64 px per native patch: 128 px at its 2x2 split."""
    return 2 * SIZE if path.name.startswith("asg_") else SIZE


@pytest.mark.parametrize("path", API_WORKFLOWS, ids=[p.name for p in API_WORKFLOWS])
def test_api_workflow_runs(comfy_server, path):
    if _prerequisite(path) is not None:
        comfy_server.run_prompt(load_api_workflow(_prerequisite(path), size=SIZE, steps=4))
    prompt = load_api_workflow(path, size=_size(path), steps=4)
    entry = comfy_server.run_prompt(prompt)
    assert entry["status"]["status_str"] == "success"
    images = comfy_server.image_arrays(entry)
    assert images, f"{path.name} saved no image"
    by_node = comfy_server.images_by_node(entry)
    videos = comfy_server.videos_by_node(entry)
    for node_id, node in prompt.items():
        if node["class_type"] == "SaveImage":
            assert by_node.get(node_id), f"{path.name}: SaveImage {node_id} produced no image (a branch did not run)"
        if node["class_type"] == "SaveVideo":
            clips = videos.get(node_id, [])
            assert len(clips) == 1, f"{path.name}: SaveVideo {node_id} saved {len(clips)} videos (a branch did not run)"
            assert clips[0].shape[0] == VIDEO_FRAMES, f"{path.name}: {clips[0].shape[0]} frames, not {VIDEO_FRAMES}"
    for image in images:
        # upscaling workflows (DiffuseHigh, ASG) save larger images than the tiny latent
        assert min(image.shape[:2]) >= SIZE and image.dtype == np.uint8 and image.shape[2] == 3


DIT_AB_WORKFLOWS = {"ag_ab_wan21.json": "Wan 2.1", "ag_ab_qwen_image.json": "Qwen-Image"}
AG_REPORT = r"Adaptive Guidance \[{family}\]: .*?latched: (.*?); .*?model passes (\d+) of (\d+)"


def _upstream(prompt: dict, node_id: str, class_type: str) -> str:
    """The nearest node of `class_type` that feeds `node_id` (through its linked inputs)."""
    todo, seen = [node_id], set()
    while todo:
        current = todo.pop(0)
        for value in prompt[current]["inputs"].values():
            if isinstance(value, list) and len(value) == 2 and str(value[0]) in prompt and str(value[0]) not in seen:
                source = str(value[0])
                if prompt[source]["class_type"] == class_type:
                    return source
                seen.add(source)
                todo.append(source)
    raise AssertionError(f"no {class_type} upstream of node {node_id}")


def _add_branch_probes(prompt: dict) -> dict:
    """SaveLatent on each branch's KSampler and SaveImage on its VAEDecode, the branches named by the titles
    "A: ..." / "B: ..." of the workflow's save nodes. Returns {"A": (latent probe, image probe), "B": ...}. (The
    videos themselves are not compared: libx264 does not encode equal frames to equal files run after run.)"""
    probes = {}
    for node_id, node in list(prompt.items()):
        title = node.get("_meta", {}).get("title", "")
        if node["class_type"] in ("SaveImage", "SaveVideo") and title[:2] in ("A:", "B:"):
            label = title[0]
            prompt[f"probe_lat_{label}"] = {"class_type": "SaveLatent", "inputs": {
                "samples": [_upstream(prompt, node_id, "KSampler"), 0], "filename_prefix": f"tfgtest/probe_{label}"}}
            prompt[f"probe_img_{label}"] = {"class_type": "SaveImage", "inputs": {
                "images": [_upstream(prompt, node_id, "VAEDecode"), 0], "filename_prefix": f"tfgtest/probe_{label}"}}
            probes[label] = (f"probe_lat_{label}", f"probe_img_{label}")
    assert set(probes) == {"A", "B"}, f"expected save nodes titled 'A: ...' and 'B: ...': {sorted(probes)}"
    return probes


@pytest.mark.parametrize("name", sorted(DIT_AB_WORKFLOWS))
def test_dit_ab_workflow_differs_only_by_adaptive_guidance(comfy_server, name):
    """The shipped Wan / Qwen-Image A/B graphs on the tiny models: with the AG node never latching
    (start_percent 1.0) branch B is A to the bit (latent and decoded frames) and runs every CFG pass; latching
    (threshold 0.5), B differs from A and the server log reports fewer model passes than CFG's, under the family's
    name."""
    family = DIT_AB_WORKFLOWS[name]
    results = {}
    for case, ag_inputs in (("never", {"start_percent": 1.0}), ("latch", {"threshold": 0.5, "start_percent": 0.0})):
        prompt = load_api_workflow(name, size=SIZE, steps=4)
        ags = [n for n in prompt.values() if n["class_type"] == "TFG_AdaptiveGuidance"]
        assert len(ags) == 1, f"{name}: expected one Adaptive Guidance node"
        ags[0]["inputs"].update(ag_inputs)
        probes = _add_branch_probes(prompt)
        before = len(comfy_server.log_text())
        entry = comfy_server.run_prompt(prompt)
        reports = re.findall(AG_REPORT.format(family=re.escape(family)), comfy_server.log_text()[before:])
        assert len(reports) == 1, f"{name} ({case}): expected one AG report for {family}:\n" \
                                  f"{comfy_server.log_text()[before:][-3000:]}"
        latents, images = comfy_server.latents_by_node(entry), comfy_server.images_by_node(entry)
        outputs = {label: (latents[lat][0], images[img]) for label, (lat, img) in probes.items()}
        results[case] = (reports[0], outputs)
    (latched, run, full), outputs = results["never"]
    assert latched == "never" and int(run) == int(full) > 0, results["never"][0]
    (lat_a, frames_a), (lat_b, frames_b) = outputs["A"], outputs["B"]
    assert torch.equal(lat_a, lat_b), f"{name}: AG that never latches changed branch B's latent"
    assert len(frames_a) == len(frames_b) and all(np.array_equal(a, b) for a, b in zip(frames_a, frames_b)), \
        f"{name}: AG that never latches changed branch B's frames"
    (latched, run, full), outputs = results["latch"]
    assert latched != "never" and int(run) < int(full), results["latch"][0]
    (lat_a, frames_a), (lat_b, frames_b) = outputs["A"], outputs["B"]
    assert not torch.equal(lat_a, lat_b), f"{name}: a latching AG left branch B unchanged: not sensitive"
    assert any(not np.array_equal(a, b) for a, b in zip(frames_a, frames_b)), \
        f"{name}: branch B's latent changed but its frames did not"


@pytest.mark.parametrize("bad", [{"threshold": 1.5}, {"start_percent": -0.2}], ids=["threshold", "start_percent"])
def test_invalid_ag_inputs_rejected_then_server_still_works(comfy_server, bad):
    g = _base_graph("sd15")
    save = _add_ksampler_branch(g, "x", seed=1, ag=dict(bad))
    status, data = comfy_server.post_prompt(g)
    assert status == 400, data
    assert "xag" in data.get("node_errors", {}), data
    assert set(data["node_errors"]) == {"xag"}, data["node_errors"]
    assert data["node_errors"]["xag"]["class_type"] == "TFG_AdaptiveGuidance"
    text = repr(data["node_errors"]["xag"]["errors"])
    assert next(iter(bad)) in text, text

    g = _base_graph("sd15")
    save = _add_ksampler_branch(g, "x", seed=1, ag={"threshold": 0.995})
    entry = comfy_server.run_prompt(g)
    assert _single_image(comfy_server, entry, save).shape == (SIZE, SIZE, 3)


def test_queued_prompts_match_solo_runs(comfy_server):
    prompts, saves = [], []
    for i in range(10):
        g = _base_graph("sd15")
        ag = {"threshold": 0.995, "space": "x0"} if i % 2 == 0 else None
        saves.append(_add_ksampler_branch(g, "q", seed=1000 + i, ag=ag))
        prompts.append(g)

    log_before = len(comfy_server.log_text())
    queued = comfy_server.run_prompts(prompts)
    reports = [line for line in comfy_server.log_text()[log_before:].splitlines()
               if "Adaptive Guidance" in line and "latched: sample 0 at step" in line]
    assert len(reports) == 5, "the AG prompts did not all latch:\n" + "\n".join(reports)
    queued_images = [_single_image(comfy_server, e, s) for e, s in zip(queued, saves)]
    queued_latents = [_single_latent(comfy_server, e, "qlat") for e in queued]
    assert len({img.tobytes() for img in queued_images}) == 10, "distinct seeds gave identical images"

    for i, (prompt, save) in enumerate(zip(prompts, saves)):
        for attempt in range(3):
            comfy_server.free(settle=0.3 + attempt)       # empty the output cache: a true solo run
            entry = comfy_server.run_prompt(prompt)
            if {"1", "qks"} <= executed_nodes(entry):
                break
        else:
            pytest.fail(f"prompt {i}: the solo run was served from the cache: {executed_nodes(entry)}")
        kind = "AG" if i % 2 == 0 else "CFG"
        assert np.array_equal(_single_image(comfy_server, entry, save), queued_images[i]), f"prompt {i} ({kind})"
        assert torch.equal(_single_latent(comfy_server, entry, "qlat"), queued_latents[i]), f"prompt {i} ({kind})"


@pytest.mark.parametrize("family", ["sd15", "flux"])
def test_unlatched_ag_is_bit_identical_through_ksampler(comfy_server, family):
    g = _base_graph(family)
    plain = _add_ksampler_branch(g, "a", seed=5, ag=None)
    never = _add_ksampler_branch(g, "b", seed=5, ag={"threshold": 0.5, "start_percent": 1.0})
    latch = _add_ksampler_branch(g, "c", seed=5, ag={"threshold": 0.5, "start_percent": 0.0})
    entry = comfy_server.run_prompt(g)
    a, b, c = (_single_image(comfy_server, entry, n) for n in (plain, never, latch))
    assert np.array_equal(a, b), "AG with start_percent 1.0 changed the KSampler image"
    assert not np.array_equal(a, c), "a latching AG left the image unchanged: the comparison is not sensitive"
    la, lb, lc = (_single_latent(comfy_server, entry, n.replace("save", "lat")) for n in (plain, never, latch))
    assert torch.equal(la, lb), "AG with start_percent 1.0 changed the KSampler latent"
    assert not torch.equal(la, lc)


@pytest.mark.parametrize("family", ["sd15", "flux"])
def test_unlatched_ag_guider_is_bit_identical_to_cfg_guider(comfy_server, family):
    g = _base_graph(family)
    plain = _add_guider_branch(g, "a", ag=None)
    never = _add_guider_branch(g, "b", ag={"threshold": 0.5, "start_percent": 1.0})
    latch = _add_guider_branch(g, "c", ag={"threshold": 0.5, "start_percent": 0.0})
    entry = comfy_server.run_prompt(g)
    a, b, c = (_single_image(comfy_server, entry, n) for n in (plain, never, latch))
    assert np.array_equal(a, b), "TFG_AdaptiveGuider with start_percent 1.0 differs from CFGGuider"
    assert not np.array_equal(a, c), "a latching AG guider left the image unchanged: the comparison is not sensitive"
    la, lb, lc = (_single_latent(comfy_server, entry, n.replace("save", "lat")) for n in (plain, never, latch))
    assert torch.equal(la, lb), "TFG_AdaptiveGuider with start_percent 1.0 gives a different latent from CFGGuider"
    assert not torch.equal(la, lc)


def test_guider_with_cfg_one_samples_cond_only_with_one_warning(comfy_server):
    """Shared workflows toggle cfg: at cfg 1 the guider runs (conditional-only, as ComfyUI would) and says once
    that Adaptive Guidance had nothing to skip."""
    g = _base_graph("sd15")
    _add_guider_branch(g, "x", ag={"threshold": 0.9}, cfg=1.0)
    before = len(comfy_server.log_text())
    entry = comfy_server.run_prompt(g)
    assert entry["status"]["status_str"] == "success"
    log = comfy_server.log_text()[before:]
    assert log.count("cfg is 1") == 1 and "Adaptive Guider" in log and "Set cfg above 1" in log, log[-2000:]


def test_model_patch_at_cfg_one_warns_once_naming_node_and_family(comfy_server):
    g = _base_graph("flux")
    _add_ksampler_branch(g, "x", seed=1, ag={"threshold": 0.9}, cfg=1.0)
    before = len(comfy_server.log_text())
    entry = comfy_server.run_prompt(g)
    assert entry["status"]["status_str"] == "success"
    log = comfy_server.log_text()[before:]
    assert log.count("cfg is 1") == 1, log[-2000:]
    assert "Adaptive Guidance [model family: Flux]" in log and "Set cfg above 1" in log


def test_linear_ag_coefficients_for_other_steps_fail_naming_the_node(comfy_server):
    fit = WORKFLOWS_API_DIR / "linear_ag_1_fit_sd15.json"
    comfy_server.run_prompt(load_api_workflow(fit, size=SIZE, steps=4))
    apply = load_api_workflow(WORKFLOWS_API_DIR / "linear_ag_2_apply_sd15.json", size=SIZE, steps=6)
    entry = comfy_server.run_prompt(apply, check=False)
    assert entry["status"]["status_str"] == "error"
    errors = [m for m in entry["status"]["messages"] if m[0] == "execution_error"]
    message = errors[0][1]["exception_message"]
    assert "TFG LinearAG [model family: SD1.x]" in message and "6 steps (fitted for 4)" in message, message


def test_benchmark_eval_model_graph_runs_on_the_server(comfy_server):
    """benchmarks/comfy_nodes/digits_ag_api.json: the trained eval model in a headless graph with the AG patch."""
    import json
    graph = json.loads((WORKFLOWS_API_DIR.parents[1] / "benchmarks" / "comfy_nodes" / "digits_ag_api.json").read_text())
    entry = comfy_server.run_prompt(graph)
    assert entry["status"]["status_str"] == "success"
    images = comfy_server.image_arrays(entry)
    assert images and all(image.dtype == np.uint8 for image in images)


def test_ui_workflows_are_listed_in_the_template_browser(comfy_server):
    listed = comfy_server.get("/workflow_templates").get(PACK_DIR_NAME, [])
    shipped = {p.stem for p in WORKFLOWS_API_DIR.parent.glob("*.json")}
    assert shipped and shipped <= set(listed), (shipped, listed)


QUICKSTART_LINE = re.compile(
    r"TFG quick start: Adaptive Guidance saved ([\d.]+)% of model evaluations \((\d+) of (\d+) passes of CFG\), "
    r"SSIM ([\d.]+) vs CFG; NegToMe diversity ([+-][\d.]+)% vs CFG \(([\d.]+) vs ([\d.]+)\); (\d+) images in (.+)")


def test_quickstart_demo_end_to_end(comfy_host_path, tmp_path):
    """The quick-start command: starts its own headless ComfyUI with the pack, queues the shipped digits A/B graph
    over HTTP, shows progress, saves every image and prints exactly one result line with measured figures."""
    pack = WORKFLOWS_API_DIR.parents[1]
    env = {**os.environ, "COMFYUI_PATH": str(comfy_host_path), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, str(pack / "tools" / "quickstart.py"), "--out", str(out), "--no-install"],
                          capture_output=True, text=True, timeout=420, env=env, cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-6000:]
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stdout
    m = QUICKSTART_LINE.fullmatch(lines[0])
    assert m, lines[0]
    pct, passes, cfg_passes = float(m[1]), int(m[2]), int(m[3])
    assert cfg_passes == 2 * 20 * 8 and passes < cfg_passes           # CFG: cond + uncond row per step and image
    assert abs(pct - 100.0 * (cfg_passes - passes) / cfg_passes) < 0.06
    assert 0.0 < float(m[4]) < 1.0                                    # AG's images differ from CFG's, a little
    assert float(m[6]) != float(m[7])                                 # NegToMe changed the batch
    assert "step 20/20" in proc.stderr                                # progress was shown
    pngs = sorted(out.rglob("*.png"))
    assert int(m[8]) == len(pngs) == 24
    assert {p.name.split("_0")[0] for p in pngs} == {"A_cfg", "B_adaptive_guidance", "C_negtome"}
