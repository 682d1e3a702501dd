"""NegToMe headless: the shipped NegToMe workflows on a real ComfyUI server (tiny models), A/B behaviour through
the HTTP API, and loud failures. Needs the pack's nodes registered in nodes/__init__.py."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from headless_server import WORKFLOWS_API_DIR, load_api_workflow

SIZE = 64
STEPS = 4
WORKFLOWS = sorted(WORKFLOWS_API_DIR.glob("negtome_*.json"))


def _node_of(prompt: dict, class_type: str, title_part: str = "") -> str:
    ids = [k for k, v in prompt.items() if v["class_type"] == class_type and title_part in v["_meta"]["title"]]
    assert len(ids) == 1, (class_type, title_part, ids)
    return ids[0]


def _ab_images(server, entry, prompt):
    images = server.images_by_node(entry)
    a = images[_node_of(prompt, "SaveImage", "A:")]
    b = images[_node_of(prompt, "SaveImage", "B:")]
    return a, b


def test_negtome_workflows_exist():
    names = {p.name for p in WORKFLOWS}
    assert {"negtome_diversity_sdxl.json", "negtome_diversity_flux.json", "negtome_reference_sdxl.json"} <= names, \
        names


@pytest.mark.parametrize("name", ["negtome_diversity_sdxl.json", "negtome_diversity_flux.json"])
def test_diversity_ab_changes_images_but_not_image_zero(comfy_server, name):
    """The shipped A/B graph (batch 4, same seed). The tiny models' 8x8 latents are below the paper's SDXL
    block gate (token grid >= 32), so the test widens the block choice and the threshold to see an effect."""
    prompt = load_api_workflow(WORKFLOWS_API_DIR / name, size=SIZE, steps=STEPS)
    nt = prompt[_node_of(prompt, "TFG_NegToMe")]
    nt["inputs"].update(blocks="all", threshold=-1.0, alpha=1.5, window="custom", start_percent=0.0,
                        end_percent=1.0)
    entry = comfy_server.run_prompt(prompt)
    assert entry["status"]["status_str"] == "success"
    a, b = _ab_images(comfy_server, entry, prompt)
    assert len(a) == len(b) == 4
    assert np.array_equal(a[0], b[0]), "image 0 is the reference and must not change"
    assert any(not np.array_equal(x, y) for x, y in zip(a[1:], b[1:])), "NegToMe changed nothing"


@pytest.mark.parametrize("name", ["negtome_diversity_sdxl.json", "negtome_diversity_flux.json"])
def test_alpha_zero_is_bit_identical_over_http(comfy_server, name):
    prompt = load_api_workflow(WORKFLOWS_API_DIR / name, size=SIZE, steps=STEPS)
    prompt[_node_of(prompt, "TFG_NegToMe")]["inputs"].update(alpha=0.0, blocks="all", threshold=-1.0)
    entry = comfy_server.run_prompt(prompt)
    a, b = _ab_images(comfy_server, entry, prompt)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))


def test_bad_window_is_rejected_before_the_run_naming_the_input(comfy_server):
    """start_percent > end_percent is caught by validate_inputs: HTTP 400 with node_errors, nothing queued."""
    prompt = load_api_workflow(WORKFLOWS_API_DIR / "negtome_diversity_sdxl.json", size=SIZE, steps=STEPS)
    del prompt[_node_of(prompt, "SaveImage", "A:")]  # only the NegToMe branch: its error leaves no valid output
    node = _node_of(prompt, "TFG_NegToMe")
    prompt[node]["inputs"].update(window="custom", start_percent=0.8, end_percent=0.2)
    status, data = comfy_server.post_prompt(prompt)
    assert status == 400, data
    errors = data.get("node_errors", {})
    assert node in errors and "start_percent" in repr(errors[node]["errors"]), errors


UPLOADED_NAME = "comfy_example.png"


def _upload_example_image(server) -> str:
    """ComfyUI's own input/example.png (a real photo), uploaded under another name: the server's example.png is
    the small test image every other shipped workflow loads, and must not be replaced for the later tests."""
    import requests
    example = Path(server.comfy_path) / "input" / "example.png"
    if not example.is_file():
        pytest.skip(f"{example} not found")
    with open(example, "rb") as f:
        r = requests.post(f"{server.url}/upload/image", files={"image": (UPLOADED_NAME, f, "image/png")},
                          data={"overwrite": "true"}, timeout=30)
    assert r.status_code == 200, r.text
    return UPLOADED_NAME


def _reference_prompt(server, **node_inputs):
    uploaded = _upload_example_image(server)
    prompt = load_api_workflow(WORKFLOWS_API_DIR / "negtome_reference_sdxl.json", size=SIZE, steps=STEPS)
    loads = [n for n in prompt.values() if n["class_type"] == "LoadImage"]
    assert loads, "the reference workflow loads no image"
    for node in loads:
        node["inputs"]["image"] = uploaded
    scale = prompt[_node_of(prompt, "ImageScale")]
    scale["inputs"].update(width=SIZE, height=SIZE)
    prompt[_node_of(prompt, "TFG_NegToMeReference")]["inputs"].update(node_inputs)
    return prompt


def test_reference_workflow_runs_and_changes_the_images(comfy_server):
    prompt = _reference_prompt(comfy_server, blocks="all", threshold=-1.0, alpha=1.5, window="custom",
                               start_percent=0.0, end_percent=1.0)
    entry = comfy_server.run_prompt(prompt)
    assert entry["status"]["status_str"] == "success"
    a, b = _ab_images(comfy_server, entry, prompt)
    assert len(a) == len(b) == 2, "the reference row must be discarded"
    assert all(not np.array_equal(x, y) for x, y in zip(a, b))


def test_reference_workflow_with_empty_mask_changes_nothing(comfy_server):
    prompt = _reference_prompt(comfy_server, blocks="all", threshold=-1.0, alpha=1.5)
    prompt["emptymask"] = {"class_type": "SolidMask", "inputs": {"value": 0.0, "width": SIZE, "height": SIZE},
                           "_meta": {"title": "empty mask"}}
    prompt[_node_of(prompt, "TFG_NegToMeReference")]["inputs"]["mask"] = ["emptymask", 0]
    entry = comfy_server.run_prompt(prompt)
    a, b = _ab_images(comfy_server, entry, prompt)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert "mask is empty" in comfy_server.log_text()


def test_invalid_custom_blocks_are_an_http_400_naming_the_node(comfy_server):
    prompt = load_api_workflow(WORKFLOWS_API_DIR / "negtome_diversity_sdxl.json", size=SIZE, steps=STEPS)
    del prompt[_node_of(prompt, "SaveImage", "A:")]  # only the NegToMe branch: its error leaves no valid output
    node = _node_of(prompt, "TFG_NegToMe")
    prompt[node]["inputs"].update(blocks="custom", custom_blocks="output.x")
    status, data = comfy_server.post_prompt(prompt)
    assert status == 400, data
    errors = data.get("node_errors", {})
    assert node in errors and errors[node]["class_type"] == "TFG_NegToMe", errors
    assert "output.x" in repr(errors[node]["errors"])
