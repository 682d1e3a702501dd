"""Shipped workflows: every UI-format graph has an API-format twin with the same nodes, links and widget
values (checked by converting UI → API with the headless runner and real node definitions)."""
from __future__ import annotations

import importlib.util
import json

import pytest

import host

WORKFLOWS = host.PACK_ROOT / "workflows"
UI_FILES = sorted(WORKFLOWS.glob("*.json"))


def _headless():
    spec = importlib.util.spec_from_file_location("tfg_headless_for_tests", host.PACK_ROOT / "headless.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _strip_meta(api: dict) -> dict:
    return {nid: {"class_type": n["class_type"], "inputs": n["inputs"]} for nid, n in api.items()}


def test_workflows_exist_in_both_formats():
    assert UI_FILES, "no workflows shipped"
    for ui in UI_FILES:
        assert (WORKFLOWS / "api" / ui.name).is_file(), f"{ui.name} has no API twin in workflows/api/"
    for api in (WORKFLOWS / "api").glob("*.json"):
        assert (WORKFLOWS / api.name).is_file(), f"api/{api.name} has no UI-format original"


@pytest.mark.parametrize("ui_path", UI_FILES, ids=lambda p: p.name)
def test_ui_and_api_twins_agree(ui_path, comfy_root):
    headless = _headless()
    ui = json.loads(ui_path.read_text())
    api = json.loads((WORKFLOWS / "api" / ui_path.name).read_text())
    assert headless.detect_format(ui) == "ui" and headless.detect_format(api) == "api"
    info = host.object_info(host.node_classes())
    missing = {n["type"] for n in ui["nodes"]} - set(info)
    assert not missing, f"unknown node types {missing}"
    converted = headless.ui_to_api(ui, info)
    assert _strip_meta(converted) == _strip_meta(api)


@pytest.mark.parametrize("ui_path", UI_FILES, ids=lambda p: p.name)
def test_workflow_compares_with_and_without_the_technique(ui_path):
    """A/B graphs: two branches with the same seed, one through a TFG node, each saving an image. Fit graphs
    (LinearAG's record → fit) save what they recorded."""
    api = json.loads((WORKFLOWS / "api" / ui_path.name).read_text())
    types = [n["class_type"] for n in api.values()]
    assert any(t.startswith("TFG_") for t in types)
    saves = types.count("SaveImage") + types.count("PreviewImage")
    assert saves >= (1 if "_fit_" in ui_path.name else 2)
