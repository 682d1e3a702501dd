"""Shipped workflows: every UI-format graph has an API-format twin with the same nodes, links and widget
values (checked by converting UI → API with the headless runner and real node definitions); each says what it
needs in a Note (its model files and input images); one model file name per family across all workflows; titles
of at most 40 characters. (How they look in the real frontend: tests/test_browser.py.)"""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import host  # noqa: E402

WORKFLOWS = host.PACK_ROOT / "workflows"
UI_FILES = sorted(WORKFLOWS.glob("*.json"))
ALL_UI_FILES = UI_FILES + sorted((WORKFLOWS / "extras").glob("*.json"))
UI_ONLY_TYPES = {"Note", "MarkdownNote", "Reroute", "PrimitiveNode"}
MAX_TITLE = 40
# loader type -> its model-file widgets (index in widgets_values)
MODEL_WIDGETS = {"CheckpointLoaderSimple": (0,), "UNETLoader": (0,), "DualCLIPLoader": (0, 1), "VAELoader": (0,),
                 "CLIPLoader": (0,), "ControlNetLoader": (0,)}
IMAGE_LOADERS = ("LoadImage", "LoadImageMask")
SAVE_TYPES = ("SaveImage", "PreviewImage", "SaveVideo")


# comfy_extras modules whose nodes shipped workflows use (host.node_classes has the core and custom-sampler nodes)
EXTRA_NODE_MODULES = ("nodes_model_advanced", "nodes_sd3", "nodes_hunyuan", "nodes_video")


def _headless():
    return host.headless()


def node_info() -> dict:
    """/object_info of every node type a shipped workflow may use, in process."""
    import importlib
    classes = host.node_classes()
    for name in EXTRA_NODE_MODULES:
        classes.update(host.module_node_classes(importlib.import_module(f"comfy_extras.{name}")))
    return host.object_info(classes)


def _ui(path):
    return json.loads(path.read_text(encoding="utf-8"))


def _family(path) -> str:
    """The family the file name ends with (headless_server.workflow_family), else its last `_` part."""
    from headless_server import workflow_family
    try:
        return workflow_family(path)
    except ValueError:
        return path.stem.rsplit("_", 1)[-1]


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
    info = node_info()
    missing = {n["type"] for n in ui["nodes"]} - set(info) - UI_ONLY_TYPES
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
    saves = sum(types.count(t) for t in SAVE_TYPES)
    assert saves >= (1 if "_fit_" in ui_path.name else 2)


@pytest.mark.parametrize("ui_path", ALL_UI_FILES, ids=lambda p: p.name)
def test_titles_are_short(ui_path):
    long = [n.get("title") for n in _ui(ui_path)["nodes"] if len(n.get("title") or "") > MAX_TITLE]
    assert not long, f"titles over {MAX_TITLE} characters (put explanations in the Note): {long}"


@pytest.mark.parametrize("ui_path", ALL_UI_FILES, ids=lambda p: p.name)
def test_note_lists_model_files_and_input_images(ui_path):
    ui = _ui(ui_path)
    notes = [n["widgets_values"][0] for n in ui["nodes"] if n["type"] in ("Note", "MarkdownNote")]
    assert notes, f"{ui_path.name}: no Note explaining the workflow"
    text = "\n".join(notes)
    for node in ui["nodes"]:
        for index in MODEL_WIDGETS.get(node["type"], ()):
            name = node["widgets_values"][index]
            assert name in text, f"{ui_path.name}: the Note does not name the model file {name}"
    images = [n["widgets_values"][0] for n in ui["nodes"] if n["type"] in IMAGE_LOADERS]
    if images:
        assert "REPLACE" in text and all(i in text for i in images), \
            f"{ui_path.name}: the Note must say which input images to replace ({images})"
    else:
        assert re.search(r"input images?: none", text, re.I) or "digits" in ui_path.name, \
            f"{ui_path.name}: the Note should say that no input image is needed"


def test_one_model_file_name_per_family():
    """Per family, every workflow names the same file in each loader slot (checkpoint, diffusion model, text
    encoders, VAE; ControlNets differ by purpose)."""
    by_slot = {}
    for path in ALL_UI_FILES:
        for node in _ui(path)["nodes"]:
            if node["type"] == "ControlNetLoader":
                continue
            for index in MODEL_WIDGETS.get(node["type"], ()):
                by_slot.setdefault((_family(path), node["type"], index), set()).add(node["widgets_values"][index])
    assert any(key[1] == "CheckpointLoaderSimple" for key in by_slot)
    for (family, loader, index), names in by_slot.items():
        assert len(names) == 1, f"{family}: workflows disagree on the {loader} file name: {sorted(names)}"


# ----------------------------------------------------------------------------------------------
# python tests/test_workflows.py --sync: after a node gained (appended) inputs, append their defaults to the UI
# workflows' widgets_values and rewrite each API twin from its UI workflow with the runner's converter.
# ----------------------------------------------------------------------------------------------

NOT_OURS = {"quickstart_digits_ab.json"}    # kept in sync by tools/quickstart.py's owner


def _append_missing_widgets(ui: dict, info: dict) -> list[str]:
    workflow = sys.modules[host.HEADLESS_MODULE + ".workflow"]
    changed = []
    for node in ui["nodes"]:
        spec, values = info.get(node["type"]), node.get("widgets_values")
        if spec is None or not isinstance(values, list):
            continue
        ui_widgets = {i.get("widget", {}).get("name") or i.get("name")
                      for i in node.get("inputs", []) if isinstance(i.get("widget"), dict)}
        widgets = [w for w in workflow._ordered_inputs(spec) if workflow._widget_kind(*w, ui_widgets)]
        pos = 0
        for name, itype, opts in widgets:
            extras = workflow._control_extras(name, itype, opts)
            if pos >= len(values):
                values.append(workflow._default_value(itype, opts))
                values.extend(["fixed", ""][:extras])
                changed.append(f"#{node['id']} {node['type']}.{name}")
            pos += 1 + extras
    return changed


def sync() -> None:
    host.setup_inprocess_comfyui(host.find_comfyui())
    headless = _headless()
    info = node_info()
    for ui_path in UI_FILES:
        if ui_path.name in NOT_OURS:
            continue
        ui = _ui(ui_path)
        changed = _append_missing_widgets(ui, info)
        if changed:
            ui_path.write_text(json.dumps(ui, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
            sys.stdout.write(f"{ui_path.name}: appended {', '.join(changed)}\n")
        api_path = WORKFLOWS / "api" / ui_path.name
        api = headless.ui_to_api(ui, info)
        if not api_path.is_file() or _strip_meta(json.loads(api_path.read_text())) != _strip_meta(api):
            api_path.write_text(json.dumps(api, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
            sys.stdout.write(f"api/{api_path.name}: rewritten from the UI workflow\n")


if __name__ == "__main__":
    if sys.argv[1:] == ["--sync"]:
        sync()
    else:
        sys.exit(pytest.main([__file__, "-q", *sys.argv[1:]]))
