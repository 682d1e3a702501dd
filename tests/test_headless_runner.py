"""Tests of the headless runner (tools/headless: `python -m tools.headless`).

* pure: ui_to_api on small hand-written UI graphs and object_info dicts, overrides, file loading,
  the CLI offline (--convert-only --object-info) and its exit codes; no ComfyUI needed;
* real node definitions: object_info built from the in-process ComfyUI (`comfy_root`), a UI graph of
  core nodes converted and checked field by field and by ComfyUI's own validate_prompt;
* live: the runner as a subprocess against the session server (`comfy_server`, tiny SD1.5), on API and
  UI graphs, a rejected graph (exit 3), a runtime error (exit 1), the shipped UI workflow; and one
  self-started ComfyUI (`--comfyui ... --cpu`).
"""
from __future__ import annotations

import asyncio
import copy
import json
import logging
import os
import random
import socket
import struct
import subprocess
import sys
import uuid
import zlib
from pathlib import Path

import pytest

from headless_server import TINY_SD15_NAME

import host

REPO_ROOT = Path(__file__).resolve().parents[1]
HEADLESS = REPO_ROOT / "tools" / "headless"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

h = host.headless()


# ----------------------------------------------------------------------------------------------
# Hand-written object_info and UI graph builder
# ----------------------------------------------------------------------------------------------

def _spec(name, required=None, optional=None, output=(), display=None, output_node=False, order=None):
    inputs = {"required": dict(required or {})}
    if optional:
        inputs["optional"] = dict(optional)
    return {"input": inputs,
            "input_order": order or {k: list(v) for k, v in inputs.items()},
            "output": list(output), "output_name": list(output), "name": name,
            "display_name": display or name, "output_node": output_node}


OI = {
    "Loader": _spec("Loader", {"ckpt_name": [["a.safetensors", "b.safetensors"], {}]},
                    output=["MODEL", "CLIP", "VAE"], display="Load Checkpoint"),
    "Encode": _spec("Encode", {"clip": ["CLIP", {}],
                               "text": ["STRING", {"multiline": True, "dynamicPrompts": True}]},
                    output=["CONDITIONING"], display="Text Encode"),
    "Latent": _spec("Latent", {"width": ["INT", {"default": 512}], "height": ["INT", {"default": 512}]},
                    output=["LATENT"]),
    "Sampler": _spec("Sampler", {
        "model": ["MODEL", {}],
        "seed": ["INT", {"default": 0, "control_after_generate": True}],
        "steps": ["INT", {"default": 20}],
        "cfg": ["FLOAT", {"default": 8.0}],
        "sampler_name": [["euler", "heun"], {}],
        "positive": ["CONDITIONING", {}],
        "latent": ["LATENT", {}],
    }, optional={"denoise": ["FLOAT", {"default": 1.0}]}, output=["LATENT"]),
    "Noise": _spec("Noise", {"noise_seed": ["INT", {"default": 0}], "strength": ["FLOAT", {"default": 1.0}]},
                   output=["NOISE"]),
    "NoControl": _spec("NoControl", {"seed": ["INT", {"default": 0, "control_after_generate": False}],
                                     "steps": ["INT", {"default": 1}]}, output=["INT"]),
    "Patch": _spec("Patch", {"model": ["MODEL", {}], "strength": ["FLOAT", {"default": 1.0}]}, output=["MODEL"]),
    "Decode": _spec("Decode", {"samples": ["LATENT", {}], "vae": ["VAE", {}]}, output=["IMAGE"]),
    "Save": _spec("Save", {"images": ["IMAGE", {}], "filename_prefix": ["STRING", {"default": "ComfyUI"}]},
                  output_node=True),
    "IntNode": _spec("IntNode", {"value": ["INT", {"default": 0}]}, output=["INT"]),
    "Counter": _spec("Counter", {"count": ["INT", {"forceInput": True}], "label": ["STRING", {}]},
                     output=["STRING"]),
    "Pick": _spec("Pick", {"choice": ["COMBO", {"options": ["x", "y", "z"], "control_after_generate": True}],
                           "amount": ["FLOAT", {"default": 0.5}]}, output=["STRING"]),
    "Sizes": _spec("Sizes", {"sizes": ["STRING", {}], "mode": [["a", "b"], {}]}, output=["STRING"]),
}


class UIGraph:
    """Builds UI-format workflows the way the frontend saves them."""

    def __init__(self):
        self.nodes: list[dict] = []
        self.links: list[list] = []
        self.extra_top: dict = {}

    def node(self, nid, ntype, widgets=None, inputs=(), outputs=(), mode=0, title=None, widget_inputs=()):
        node = {"id": nid, "type": ntype, "pos": [0, 0], "size": [200, 100], "flags": {}, "order": len(self.nodes),
                "mode": mode,
                "inputs": [{"name": n, "type": t, "link": None} for n, t in inputs]
                + [{"name": n, "type": t, "widget": {"name": n}, "link": None} for n, t in widget_inputs],
                "outputs": [{"name": t, "type": t, "links": []} for t in outputs],
                "properties": {"Node name for S&R": ntype}}
        if widgets is not None:
            node["widgets_values"] = widgets
        if title is not None:
            node["title"] = title
        self.nodes.append(node)
        return node

    def _get(self, nid):
        return next(n for n in self.nodes if n["id"] == nid)

    def link(self, src, src_slot, dst, dst_input):
        src_node, dst_node = self._get(src), self._get(dst)
        slot = next(i for i, inp in enumerate(dst_node["inputs"]) if inp["name"] == dst_input)
        lid = len(self.links) + 1
        ltype = src_node["outputs"][src_slot]["type"]
        self.links.append([lid, src, src_slot, dst, slot, ltype])
        dst_node["inputs"][slot]["link"] = lid
        src_node["outputs"][src_slot]["links"].append(lid)
        return lid

    def workflow(self):
        return {"last_node_id": max((n["id"] for n in self.nodes if isinstance(n["id"], int)), default=0),
                "last_link_id": len(self.links), "nodes": self.nodes, "links": self.links, "groups": [],
                "config": {}, "extra": {}, "version": 0.4, **self.extra_top}


def _t2i_graph():
    """Loader(1) -> Encode(2) -> Sampler(4) <- Latent(3); Sampler -> Decode(5) -> Save(6)."""
    g = UIGraph()
    g.node(1, "Loader", ["b.safetensors"], outputs=["MODEL", "CLIP", "VAE"])
    g.node(2, "Encode", ["a fox"], inputs=[("clip", "CLIP")], outputs=["CONDITIONING"])
    g.node(3, "Latent", [64, 48], outputs=["LATENT"])
    g.node(4, "Sampler", [123, "randomize", 30, 6.5, "heun", 0.75],
           inputs=[("model", "MODEL"), ("positive", "CONDITIONING"), ("latent", "LATENT")], outputs=["LATENT"])
    g.node(5, "Decode", [], inputs=[("samples", "LATENT"), ("vae", "VAE")], outputs=["IMAGE"])
    g.node(6, "Save", ["out/x"], inputs=[("images", "IMAGE")])
    g.link(1, 1, 2, "clip")
    g.link(1, 0, 4, "model")
    g.link(2, 0, 4, "positive")
    g.link(3, 0, 4, "latent")
    g.link(4, 0, 5, "samples")
    g.link(1, 2, 5, "vae")
    g.link(5, 0, 6, "images")
    return g


# ----------------------------------------------------------------------------------------------
# ui_to_api: pure unit tests
# ----------------------------------------------------------------------------------------------

def test_detect_format():
    assert h.detect_format(_t2i_graph().workflow()) == "ui"
    assert h.detect_format({"1": {"class_type": "Save", "inputs": {}}}) == "api"
    for bad in ({}, [], {"1": {"inputs": {}}}, "x"):
        with pytest.raises(h.ConversionError):
            h.detect_format(bad)


def test_widgets_links_and_seed_control_value_skipped():
    api = h.ui_to_api(_t2i_graph().workflow(), OI)
    assert set(api) == {"1", "2", "3", "4", "5", "6"}
    assert api["1"] == {"inputs": {"ckpt_name": "b.safetensors"}, "class_type": "Loader",
                        "_meta": {"title": "Load Checkpoint"}}
    assert api["2"]["inputs"] == {"text": "a fox", "clip": ["1", 1]}
    assert api["3"]["inputs"] == {"width": 64, "height": 48}
    # "randomize" (the control_after_generate widget) is skipped; the optional widget comes after the required
    assert api["4"]["inputs"] == {"seed": 123, "steps": 30, "cfg": 6.5, "sampler_name": "heun", "denoise": 0.75,
                                  "model": ["1", 0], "positive": ["2", 0], "latent": ["3", 0]}
    assert api["5"]["inputs"] == {"samples": ["4", 0], "vae": ["1", 2]}
    assert api["6"]["inputs"] == {"filename_prefix": "out/x", "images": ["5", 0]}
    assert all("randomize" not in json.dumps(n) for n in api.values())


def test_seed_control_by_name_and_explicit_false():
    g = UIGraph()
    g.node(1, "Noise", [99, "fixed", 0.25], outputs=["NOISE"])           # noise_seed: control by name
    g.node(2, "NoControl", [5, 7], outputs=["INT"])                      # control_after_generate False
    g.node(3, "Save", ["p"], inputs=[("images", "IMAGE")])
    api = h.ui_to_api(g.workflow(), OI)
    assert api["1"]["inputs"] == {"noise_seed": 99, "strength": 0.25}
    assert api["2"]["inputs"] == {"seed": 5, "steps": 7}


def test_missing_control_value_in_short_hand_written_list():
    g = UIGraph()
    g.node(1, "Sampler", [7, 12, 3.0, "euler"], inputs=[("model", "MODEL")], outputs=["LATENT"])
    api = h.ui_to_api(g.workflow(), OI)
    assert api["1"]["inputs"] == {"seed": 7, "steps": 12, "cfg": 3.0, "sampler_name": "euler", "denoise": 1.0}


def test_legacy_boolean_control_value_and_defaults():
    g = UIGraph()
    g.node(1, "Sampler", [7, True, 12, 3.0, "heun", 0.5], inputs=[("model", "MODEL")], outputs=["LATENT"])
    g.node(2, "Latent", [256], outputs=["LATENT"])                         # height missing -> default
    api = h.ui_to_api(g.workflow(), OI)
    assert api["1"]["inputs"] == {"seed": 7, "steps": 12, "cfg": 3.0, "sampler_name": "heun", "denoise": 0.5}
    assert api["2"]["inputs"] == {"width": 256, "height": 512}


def test_combo_control_has_two_extra_values_and_force_input_is_no_widget():
    g = UIGraph()
    g.node(1, "Pick", ["y", "increment", "", 0.9], outputs=["STRING"])
    g.node(2, "IntNode", [3], outputs=["INT"])
    g.node(3, "Counter", ["lbl"], inputs=[("count", "INT")], outputs=["STRING"])
    g.link(2, 0, 3, "count")
    api = h.ui_to_api(g.workflow(), OI)
    assert api["1"]["inputs"] == {"choice": "y", "amount": 0.9}
    assert api["3"]["inputs"] == {"label": "lbl", "count": ["2", 0]}


def test_legacy_force_input_widget_slot_is_dropped():
    g = UIGraph()
    g.node(1, "Counter", [0, "lbl"], inputs=[("count", "INT")], outputs=["STRING"])   # old save: slot for count
    assert h.ui_to_api(g.workflow(), OI)["1"]["inputs"] == {"label": "lbl"}


def test_input_order_is_respected():
    oi = dict(OI)
    oi["Latent"] = _spec("Latent", {"width": ["INT", {}], "height": ["INT", {}]}, output=["LATENT"],
                         order={"required": ["height", "width"]})
    g = UIGraph()
    g.node(1, "Latent", [10, 20], outputs=["LATENT"])
    assert h.ui_to_api(g.workflow(), oi)["1"]["inputs"] == {"height": 10, "width": 20}


def test_reroutes_are_followed():
    g = _t2i_graph()
    # put two Reroutes between the loader's VAE and Decode.vae
    g.node(20, "Reroute", None, inputs=[("", "*")], outputs=["VAE"])
    g.node(21, "Reroute", None, inputs=[("", "*")], outputs=["VAE"])
    dec = g._get(5)
    g.links = [lk for lk in g.links if lk[0] != dec["inputs"][1]["link"]]
    g._get(1)["outputs"][2]["links"] = []
    g.link(1, 2, 20, "")
    g.link(20, 0, 21, "")
    g.link(21, 0, 5, "vae")
    api = h.ui_to_api(g.workflow(), OI)
    assert "20" not in api and "21" not in api
    assert api["5"]["inputs"]["vae"] == ["1", 2]


def test_primitive_node_is_inlined_into_widget_inputs():
    g = _t2i_graph()
    sampler = g._get(4)
    sampler["inputs"].append({"name": "seed", "type": "INT", "widget": {"name": "seed"}, "link": None})
    g.node(30, "PrimitiveNode", [424242, "fixed"], outputs=["INT"], title="Seed")
    g.link(30, 0, 4, "seed")
    enc = g._get(2)
    enc["inputs"].append({"name": "text", "type": "STRING", "widget": {"name": "text"}, "link": None})
    g.node(31, "PrimitiveNode", ["from primitive"], outputs=["STRING"])
    g.node(32, "Reroute", None, inputs=[("", "*")], outputs=["STRING"])
    g.link(31, 0, 32, "")
    g.link(32, 0, 2, "text")
    api = h.ui_to_api(g.workflow(), OI)
    assert "30" not in api and "31" not in api and "32" not in api
    assert api["4"]["inputs"]["seed"] == 424242
    assert api["4"]["inputs"]["steps"] == 30
    assert api["2"]["inputs"]["text"] == "from primitive"


def test_linked_widget_input_takes_the_link():
    g = _t2i_graph()
    g._get(3)["inputs"] = [{"name": "width", "type": "INT", "widget": {"name": "width"}, "link": None},
                           {"name": "height", "type": "INT", "widget": {"name": "height"}, "link": None}]
    g.node(40, "IntNode", [96], outputs=["INT"])
    g.link(40, 0, 3, "width")
    api = h.ui_to_api(g.workflow(), OI)
    assert api["3"]["inputs"] == {"width": ["40", 0], "height": 48}
    assert api["40"]["inputs"] == {"value": 96}


def test_notes_are_dropped():
    g = _t2i_graph()
    g.node(50, "Note", ["remember the milk"])
    g.node(51, "MarkdownNote", ["# hi"])
    api = h.ui_to_api(g.workflow(), OI)
    assert set(api) == {"1", "2", "3", "4", "5", "6"}


def test_muted_node_is_dropped_with_its_links():
    g = _t2i_graph()
    g.node(60, "Patch", [0.5], inputs=[("model", "MODEL")], outputs=["MODEL"], mode=2)
    sampler = g._get(4)
    g.links = [lk for lk in g.links if lk[0] != sampler["inputs"][0]["link"]]
    g.link(1, 0, 60, "model")
    g.link(60, 0, 4, "model")
    g._get(6)["mode"] = 2                                            # a muted output node too
    api = h.ui_to_api(g.workflow(), OI)
    assert "60" not in api and "6" not in api
    assert "model" not in api["4"]["inputs"]


def test_bypassed_node_is_connected_through_by_type():
    g = _t2i_graph()
    g.node(70, "Patch", [0.5], inputs=[("model", "MODEL")], outputs=["MODEL"], mode=4)
    sampler = g._get(4)
    g.links = [lk for lk in g.links if lk[0] != sampler["inputs"][0]["link"]]
    g.link(1, 0, 70, "model")
    g.link(70, 0, 4, "model")
    api = h.ui_to_api(g.workflow(), OI)
    assert "70" not in api
    assert api["4"]["inputs"]["model"] == ["1", 0]


def test_bypassed_node_without_matching_input_is_dropped():
    g = UIGraph()
    g.node(1, "IntNode", [3], outputs=["INT"])
    g.node(2, "Counter", ["lbl"], inputs=[("count", "INT")], outputs=["STRING"], mode=4)
    g.node(3, "Encode", ["t"], inputs=[("clip", "CLIP")], outputs=["CONDITIONING"],
           widget_inputs=[("text", "STRING")])
    g.link(1, 0, 2, "count")
    g.link(2, 0, 3, "text")                                          # STRING out, only an INT input
    api = h.ui_to_api(g.workflow(), OI)
    assert "2" not in api
    assert api["3"]["inputs"] == {"text": "t"}                       # the widget value stays


def test_list_widget_values_are_wrapped():
    g = UIGraph()
    g.node(1, "Sizes", [[1, 2, 3], "b"], outputs=["STRING"])
    assert h.ui_to_api(g.workflow(), OI)["1"]["inputs"] == {"sizes": {"__value__": [1, 2, 3]}, "mode": "b"}


def test_titles_and_dict_links():
    g = _t2i_graph()
    g._get(2)["title"] = "Positive"
    wf = g.workflow()
    wf["links"] = [{"id": lk[0], "origin_id": lk[1], "origin_slot": lk[2], "target_id": lk[3],
                    "target_slot": lk[4], "type": lk[5]} for lk in wf["links"]]
    api = h.ui_to_api(wf, OI)
    assert api["2"]["_meta"]["title"] == "Positive"
    assert api["4"]["_meta"]["title"] == "Sampler"
    assert api["5"]["inputs"] == {"samples": ["4", 0], "vae": ["1", 2]}


def test_dynamic_prompts_like_the_frontend():
    g = _t2i_graph()
    g._get(2)["widgets_values"] = ["a {red|blue} fox /* note */ in snow // trailing comment"]
    texts = {h.ui_to_api(g.workflow(), OI, rng=random.Random(s))["2"]["inputs"]["text"] for s in range(20)}
    assert texts == {"a red fox  in snow ", "a blue fox  in snow "}
    assert h.ui_to_api(g.workflow(), OI)["2"]["inputs"]["text"] == \
        h.ui_to_api(g.workflow(), OI)["2"]["inputs"]["text"]                 # default rng: reproducible
    assert h.process_dynamic_prompt(r"keep \{this\} {a|{b|b}}", random.Random(0)) in ("keep {this} a",
                                                                                      "keep {this} b")


def test_subgraph_is_flattened_with_promoted_widget():
    g = _t2i_graph()
    sg_id = "7c1e5a2b-0000-4000-8000-000000000001"
    enc = g._get(2)
    g.nodes.remove(enc)
    g.links = [lk for lk in g.links if lk[3] != 2 and lk[1] != 2]
    g._get(1)["outputs"][1]["links"] = []
    inst = g.node(2, sg_id, ["promoted text"], inputs=[("clip", "CLIP")], outputs=["CONDITIONING"])
    g.link(1, 1, 2, "clip")
    sampler = g._get(4)
    g.links = [lk for lk in g.links if lk[0] != sampler["inputs"][1]["link"]]
    g.link(2, 0, 4, "positive")
    g.extra_top["definitions"] = {"subgraphs": [{
        "id": sg_id, "name": "encode twice", "inputNode": {"id": -10}, "outputNode": {"id": -20},
        "inputs": [{"name": "clip", "type": "CLIP", "linkIds": [1]}, {"name": "text", "type": "STRING",
                                                                      "linkIds": [2]}],
        "outputs": [{"name": "CONDITIONING", "type": "CONDITIONING", "linkIds": [3]}],
        "nodes": [
            {"id": 5, "type": "Encode", "mode": 0, "widgets_values": ["inner default"],
             "inputs": [{"name": "clip", "type": "CLIP", "link": 1},
                        {"name": "text", "type": "STRING", "widget": {"name": "text"}, "link": 2}],
             "outputs": [{"name": "CONDITIONING", "type": "CONDITIONING", "links": [3]}]},
            {"id": 6, "type": "Note", "mode": 0, "widgets_values": ["inside"]},
        ],
        "links": [
            {"id": 1, "origin_id": -10, "origin_slot": 0, "target_id": 5, "target_slot": 0, "type": "CLIP"},
            {"id": 2, "origin_id": -10, "origin_slot": 1, "target_id": 5, "target_slot": 1, "type": "STRING"},
            {"id": 3, "origin_id": 5, "origin_slot": 0, "target_id": -20, "target_slot": 0,
             "type": "CONDITIONING"},
        ]}]}
    assert inst["type"] == sg_id
    api = h.ui_to_api(g.workflow(), OI)
    assert "2" not in api and "2:6" not in api
    assert api["2:5"] == {"inputs": {"text": "promoted text", "clip": ["1", 1]}, "class_type": "Encode",
                          "_meta": {"title": "Text Encode"}}
    assert api["4"]["inputs"]["positive"] == ["2:5", 0]


def test_unknown_node_types():
    g = _t2i_graph()
    g.node(80, "rgthree.Bookmark", [])                                # frontend-only, unconnected: skipped
    assert "80" not in h.ui_to_api(g.workflow(), OI)
    g.node(81, "MissingPatch", [1.0], inputs=[("model", "MODEL")], outputs=["MODEL"])
    sampler = g._get(4)
    g.links = [lk for lk in g.links if lk[0] != sampler["inputs"][0]["link"]]
    g.link(1, 0, 81, "model")
    g.link(81, 0, 4, "model")
    with pytest.raises(h.ConversionError, match="MissingPatch"):
        h.ui_to_api(g.workflow(), OI)
    g2 = _t2i_graph()
    g2._get(6)["type"] = "MissingSave"                               # the only output node is unknown
    with pytest.raises(h.ConversionError, match="no output node"):
        h.ui_to_api(g2.workflow(), OI)
    g3 = _t2i_graph()
    g3._get(6)["type"] = "workflow>My group"
    with pytest.raises(h.ConversionError, match="group node"):
        h.ui_to_api(g3.workflow(), OI)


def test_ui_to_api_does_not_modify_its_input():
    wf = _t2i_graph().workflow()
    before = copy.deepcopy(wf)
    h.ui_to_api(wf, OI)
    assert wf == before


# ----------------------------------------------------------------------------------------------
# Files and overrides
# ----------------------------------------------------------------------------------------------

def _png_with_text(chunks: dict[str, str]) -> bytes:
    def chunk(ctype: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + ctype + data + struct.pack(">I", zlib.crc32(ctype + data))
    ihdr = struct.pack(">IIBBBBB", 1, 1, 8, 2, 0, 0, 0)
    body = chunk(b"IHDR", ihdr)
    for key, text in chunks.items():
        body += chunk(b"tEXt", key.encode("latin-1") + b"\0" + text.encode("latin-1"))
    body += chunk(b"IDAT", zlib.compress(b"\0\0\0\0")) + chunk(b"IEND", b"")
    return PNG_SIGNATURE + body


def test_load_workflow_formats(tmp_path):
    ui = _t2i_graph().workflow()
    api = h.ui_to_api(ui, OI)
    (tmp_path / "ui.json").write_text(json.dumps(ui))
    (tmp_path / "api.json").write_text(json.dumps(api))
    (tmp_path / "body.json").write_text(json.dumps({"prompt": api, "client_id": "x"}))
    (tmp_path / "img.png").write_bytes(_png_with_text({"prompt": json.dumps(api), "workflow": json.dumps(ui)}))
    (tmp_path / "bad.json").write_text("{nope")
    assert h.load_workflow(tmp_path / "ui.json") == ("ui", ui)
    assert h.load_workflow(tmp_path / "api.json") == ("api", api)
    assert h.load_workflow(tmp_path / "body.json") == ("api", api)
    assert h.load_workflow(tmp_path / "img.png") == ("api", api)
    assert h.png_ui_workflow(tmp_path / "img.png") == ui
    for bad in ("bad.json", "missing.json"):
        with pytest.raises(h.ConversionError):
            h.load_workflow(tmp_path / bad)


def test_parse_set_override():
    assert h.parse_set_override("3.steps=20") == ("3", "steps", 20)
    assert h.parse_set_override("KSampler.cfg=7.5") == ("KSampler", "cfg", 7.5)
    assert h.parse_set_override("Load v1.5.ckpt_name=x.safetensors") == ("Load v1.5", "ckpt_name", "x.safetensors")
    assert h.parse_set_override('6.text="1"') == ("6", "text", "1")
    assert h.parse_set_override("6.text=a=b") == ("6", "text", "a=b")
    assert h.parse_set_override("6.flag=true") == ("6", "flag", True)
    assert h.parse_set_override('5.model=["4", 0]') == ("5", "model", ["4", 0])
    for bad in ("steps=3", "3.steps", ".steps=1", "3.=1"):
        with pytest.raises(h.OverrideError):
            h.parse_set_override(bad)


def _api_two_samplers():
    api = h.ui_to_api(_t2i_graph().workflow(), OI)
    api["7"] = copy.deepcopy(api["4"])
    api["7"]["_meta"]["title"] = "Second"
    api["8"] = {"class_type": "Noise", "inputs": {"noise_seed": 1, "strength": 1.0}, "_meta": {"title": "N"}}
    return api


def test_apply_overrides_seed_ckpt_and_set():
    api = _api_two_samplers()
    changes = h.apply_overrides(api, seed=5, ckpt="a.safetensors",
                                sets=["Load Checkpoint.ckpt_name=b.safetensors", "Second.steps=9",
                                      "Latent.width=32", ("3", "height", 16), "8.strength=0.5"], object_info=OI)
    assert api["4"]["inputs"]["seed"] == 5 and api["7"]["inputs"]["seed"] == 5
    assert api["8"]["inputs"]["noise_seed"] == 5
    assert api["1"]["inputs"]["ckpt_name"] == "b.safetensors"           # --set comes after --ckpt
    assert api["7"]["inputs"]["steps"] == 9 and api["4"]["inputs"]["steps"] == 30
    assert api["3"]["inputs"] == {"width": 32, "height": 16}
    assert api["8"]["inputs"]["strength"] == 0.5
    assert len(changes) == 9


def test_apply_overrides_errors():
    api = _api_two_samplers()
    h.apply_overrides(api, sets=["Sampler.steps=3"])       # two Sampler classes, but one node titled "Sampler"
    assert api["4"]["inputs"]["steps"] == 3 and api["7"]["inputs"]["steps"] == 30
    api["7"]["_meta"]["title"] = "Sampler"
    with pytest.raises(h.OverrideError, match="ambiguous"):
        h.apply_overrides(api, sets=["Sampler.steps=3"])
    with pytest.raises(h.OverrideError, match="no node 'Nope'"):
        h.apply_overrides(api, sets=["Nope.steps=3"])
    with pytest.raises(h.OverrideError, match="no input 'stepz'"):
        h.apply_overrides(api, sets=["4.stepz=3"], object_info=OI)
    with pytest.raises(h.OverrideError, match="no input 'denoise'"):
        h.apply_overrides({"1": {"class_type": "Sampler", "inputs": {}}}, sets=["1.denoise=0.5"])
    ok = {"1": {"class_type": "Sampler", "inputs": {}}}
    h.apply_overrides(ok, sets=["1.denoise=0.5"], object_info=OI)     # known from object_info
    assert ok["1"]["inputs"] == {"denoise": 0.5}
    with pytest.raises(h.OverrideError, match="seed"):
        h.apply_overrides({"1": {"class_type": "Save", "inputs": {}}}, seed=1)
    with pytest.raises(h.OverrideError, match="ckpt_name"):
        h.apply_overrides({"1": {"class_type": "Save", "inputs": {}}}, ckpt="x")


def test_format_prompt_error():
    resp = {"error": {"type": "prompt_outputs_failed_validation", "message": "Prompt outputs failed validation",
                      "details": "", "extra_info": {}},
            "node_errors": {"4": {"errors": [{"type": "value_smaller_than_min",
                                              "message": "Value -5 smaller than min of 1",
                                              "details": "steps", "extra_info": {"input_name": "steps"}}],
                                  "dependent_outputs": ["6"], "class_type": "Sampler"}}}
    text = h.format_prompt_error(resp, {"4": {"class_type": "Sampler", "_meta": {"title": "Main"}}})
    assert "Prompt outputs failed validation" in text and "node_errors:" in text
    assert "node 4 (Sampler, 'Main')" in text and "value_smaller_than_min" in text and "[input steps]" in text


# ----------------------------------------------------------------------------------------------
# Progress, completion and downloads against a fake server
# ----------------------------------------------------------------------------------------------

class FakeWS:
    def __init__(self, messages):
        import websocket
        self._timeout_exc = websocket.WebSocketTimeoutException
        self.messages = [m if isinstance(m, bytes) else json.dumps(m) for m in messages]
        self.closed = False

    def settimeout(self, t):
        pass

    def recv(self):
        if self.messages:
            return self.messages.pop(0)
        raise self._timeout_exc("no message")

    def close(self):
        self.closed = True


class FakeClient:
    """Stands in for ComfyClient: queue_prompt, history (after `done_after` polls), view, cancel."""

    def __init__(self, messages, entry, use_ws=True, done_after=0):
        self.ws = FakeWS(messages) if use_ws else None
        self.entry, self.done_after, self.polls = entry, done_after, 0
        self.cancelled, self.queued = [], []

    def connect_ws(self):
        return self.ws

    def queue_prompt(self, api, extra_data=None):
        self.queued.append((api, extra_data))
        return {"prompt_id": "pid", "number": 1, "node_errors": {}}

    def history(self, prompt_id):
        self.polls += 1
        return self.entry if self.entry is not None and self.polls > self.done_after else None

    def view(self, filename, subfolder="", ftype="output"):
        return f"{ftype}:{subfolder}:{filename}".encode()

    def cancel(self, prompt_id):
        self.cancelled.append(prompt_id)


def _msg(mtype, **data):
    return {"type": mtype, "data": data}


ENTRY = {"status": {"status_str": "success", "completed": True, "messages": []},
         "outputs": {"9": {"images": [{"filename": "a_00001_.png", "subfolder": "sub", "type": "output"}]},
                     "10": {"images": [{"filename": "ComfyUI_temp_x_00001_.png", "subfolder": "", "type": "temp"}],
                            "animated": [False]},
                     "11": {"text": ["hello"]}}}
API = {"3": {"class_type": "KSampler", "inputs": {}, "_meta": {"title": "KSampler"}}}


def test_run_workflow_progress_and_downloads(tmp_path, caplog):
    messages = [_msg("status", status={"exec_info": {"queue_remaining": 1}}),
                _msg("execution_start", prompt_id="pid"), b"\x00\x01binary preview",
                _msg("executing", node="3", display_node="3", prompt_id="other"),
                _msg("executing", node="3", display_node="3", prompt_id="pid"),
                _msg("progress", value=1, max=2, node="3", prompt_id="pid"),
                _msg("progress", value=2, max=2, node="3", prompt_id="pid"),
                _msg("executing", node=None, prompt_id="other"),
                _msg("executing", node=None, prompt_id="pid")]
    client = FakeClient(messages, ENTRY)
    with caplog.at_level(logging.INFO, logger="comfy_headless"):
        saved = h.run_workflow(client, API, ui_workflow={"nodes": []}, out_dir=tmp_path, timeout=10)
    assert [p.relative_to(tmp_path).as_posix() for p in saved] == ["sub/a_00001_.png", "ComfyUI_temp_x_00001_.png"]
    assert saved[1].read_bytes() == b"temp::ComfyUI_temp_x_00001_.png"
    assert client.queued[0][1] == {"extra_pnginfo": {"workflow": {"nodes": []}}}
    assert "#3 KSampler: step 2/2" in caplog.text and "hello" in caplog.text
    assert client.ws.closed
    again = h.run_workflow(FakeClient([_msg("executing", node=None, prompt_id="pid")], ENTRY), API, out_dir=tmp_path,
                           timeout=10)
    assert again[0].name == "a_00001_-1.png"                        # earlier results are not overwritten


def test_run_workflow_polls_history_without_websocket(tmp_path):
    client = FakeClient([], ENTRY, use_ws=False, done_after=2)
    assert len(h.run_workflow(client, API, out_dir=tmp_path, timeout=10)) == 2
    assert client.queued[0][1] is None                              # no extra_pnginfo for API input


def test_run_workflow_failures():
    err = _msg("execution_error", prompt_id="pid", node_id="3", node_type="KSampler", exception_type="ValueError",
               exception_message="bad sigma", traceback=["Traceback...\n", "  line 1\n"])
    with pytest.raises(h.ExecutionFailed, match="(?s)#3 KSampler.*ValueError: bad sigma.*Traceback") as e:
        h.run_workflow(FakeClient([err], None), API, timeout=10)
    assert e.value.exit_code == 1
    with pytest.raises(h.ExecutionFailed, match="interrupted"):
        h.run_workflow(FakeClient([_msg("execution_interrupted", prompt_id="pid", node_id="3")], None), API,
                       timeout=10)
    failed = {"status": {"status_str": "error", "completed": False,
                         "messages": [["execution_error", err["data"]]]}, "outputs": {}}
    with pytest.raises(h.ExecutionFailed, match="bad sigma"):
        h.run_workflow(FakeClient([], failed, use_ws=False), API, timeout=10)
    client = FakeClient([], None)
    with pytest.raises(h.RunTimeout) as e:
        h.run_workflow(client, API, timeout=0.3)
    assert e.value.exit_code == 5 and client.cancelled == ["pid"]


# ----------------------------------------------------------------------------------------------
# CLI without a server
# ----------------------------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_cli_convert_only_offline(tmp_path, capsys):
    (tmp_path / "oi.json").write_text(json.dumps(OI))
    (tmp_path / "wf.json").write_text(json.dumps(_t2i_graph().workflow()))
    out = tmp_path / "api.json"
    code = h.main([str(tmp_path / "wf.json"), "--object-info", str(tmp_path / "oi.json"), "--convert-only",
                   "--api-out", str(out), "--seed", "11", "--set", "Load Checkpoint.ckpt_name=a.safetensors", "-q"])
    assert code == 0
    api = json.loads(out.read_text())
    assert api["4"]["inputs"]["seed"] == 11 and api["1"]["inputs"]["ckpt_name"] == "a.safetensors"
    code = h.main([str(tmp_path / "wf.json"), "--object-info", str(tmp_path / "oi.json"), "--convert-only"])
    assert code == 0
    assert json.loads(capsys.readouterr().out)["6"]["class_type"] == "Save"


def test_cli_exit_codes_without_server(tmp_path, capsys):
    (tmp_path / "oi.json").write_text(json.dumps(OI))
    (tmp_path / "wf.json").write_text(json.dumps(_t2i_graph().workflow()))
    (tmp_path / "api.json").write_text(json.dumps(h.ui_to_api(_t2i_graph().workflow(), OI)))
    base = [str(tmp_path / "wf.json"), "--object-info", str(tmp_path / "oi.json"), "--convert-only"]
    assert h.main(base + ["--set", "4.nope=1"]) == 2
    assert "no input 'nope'" in capsys.readouterr().err
    assert h.main(base + ["--set", "Ghost.steps=1"]) == 2
    assert h.main([str(tmp_path / "missing.json"), "--server", "http://127.0.0.1:1"]) == 2
    code = h.main([str(tmp_path / "api.json"), "--server", f"http://127.0.0.1:{_free_port()}", "--timeout", "5"])
    assert code == 4
    assert "cannot connect" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        h.main(["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for option in ("--server", "--comfyui", "--cpu", "--server-arg", "--seed", "--ckpt", "--set", "--out",
                   "--timeout", "--api-out", "Exit codes"):
        assert option in text


def test_default_comfyui_path(monkeypatch, tmp_path):
    monkeypatch.setenv("COMFYUI_PATH", str(tmp_path))
    assert h.default_comfyui_path() == tmp_path
    monkeypatch.delenv("COMFYUI_PATH")
    monkeypatch.setenv("TFG_COMFYUI_CACHE", str(tmp_path / "no_host_yet"))
    found = host.find_comfyui()                       # tools/host.py's lookup: grandparent, then the cache
    assert h.default_comfyui_path() == (found if found is not None else tmp_path / "no_host_yet")


def test_help_names_the_checkpoint_option_and_how_to_find_node_ids(capsys):
    with pytest.raises(SystemExit):
        h.main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--ckpt NAME" in text and "models/checkpoints" in text
    assert "Node ids for --set" in text and "--convert-only" in text and "workflows/api/" in text


def test_runner_runs_as_module_and_as_folder():
    for cmd in ([sys.executable, "-m", "tools.headless", "--help"], [sys.executable, str(HEADLESS), "--help"]):
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=str(REPO_ROOT), timeout=60)
        assert proc.returncode == 0, proc.stderr
        assert "usage: python -m tools.headless" in proc.stdout


def test_library_functions_log_instead_of_printing(capsys, caplog):
    g = _t2i_graph()
    g.node(80, "rgthree.Bookmark", [])
    with caplog.at_level(logging.WARNING, logger="comfy_headless"):
        h.ui_to_api(g.workflow(), OI)
    assert "rgthree.Bookmark" in caplog.text
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == ""


# ----------------------------------------------------------------------------------------------
# Conversion against real node definitions (in-process ComfyUI)
# ----------------------------------------------------------------------------------------------

def _object_info_from_comfyui(class_names) -> dict:
    """What GET /object_info returns for these classes (mirrors server.py node_info, the fields we use)."""
    import nodes
    from comfy_api.internal import _ComfyNodeInternal
    out = {}
    for name in class_names:
        cls = nodes.NODE_CLASS_MAPPINGS[name]
        if issubclass(cls, _ComfyNodeInternal):
            info = cls.GET_NODE_INFO_V1()
        else:
            inputs = cls.INPUT_TYPES()
            info = {"input": inputs, "input_order": {k: list(v) for k, v in inputs.items()},
                    "output": cls.RETURN_TYPES, "output_name": getattr(cls, "RETURN_NAMES", cls.RETURN_TYPES),
                    "name": name, "display_name": nodes.NODE_DISPLAY_NAME_MAPPINGS.get(name, name),
                    "output_node": bool(getattr(cls, "OUTPUT_NODE", False))}
        out[name] = info
    return json.loads(json.dumps(out))                # tuples -> lists, as over HTTP


def tiny_t2i_ui(ckpt=TINY_SD15_NAME, steps=4, sampler="euler", size=64) -> dict:
    """The tiny SD1.5 text-to-image graph in UI format, as the frontend (v1.2x) saves it, with a Note and a
    Reroute on the VAE."""
    g = UIGraph()
    g.node(4, "CheckpointLoaderSimple", [ckpt], outputs=["MODEL", "CLIP", "VAE"], title="Load Checkpoint")
    g.node(6, "CLIPTextEncode", ["a red fox in fresh snow"], inputs=[("clip", "CLIP")],
           outputs=["CONDITIONING"], title="Positive")
    g.node(7, "CLIPTextEncode", ["blurry, lowres"], inputs=[("clip", "CLIP")], outputs=["CONDITIONING"],
           title="Negative")
    g.node(5, "EmptyLatentImage", [size, size, 1], outputs=["LATENT"])
    g.node(3, "KSampler", [42, "randomize", steps, 7.0, sampler, "normal", 1.0],
           inputs=[("model", "MODEL"), ("positive", "CONDITIONING"), ("negative", "CONDITIONING"),
                   ("latent_image", "LATENT")], widget_inputs=[("seed", "INT")], outputs=["LATENT"])
    g.node(8, "VAEDecode", [], inputs=[("samples", "LATENT"), ("vae", "VAE")], outputs=["IMAGE"])
    g.node(9, "SaveImage", ["headless_test/t2i"], inputs=[("images", "IMAGE")])
    g.node(10, "Reroute", None, inputs=[("", "*")], outputs=["VAE"])
    g.node(11, "Note", ["4 steps on the tiny random-weight SD1.5"])
    g.link(4, 1, 6, "clip")
    g.link(4, 1, 7, "clip")
    g.link(4, 0, 3, "model")
    g.link(6, 0, 3, "positive")
    g.link(7, 0, 3, "negative")
    g.link(5, 0, 3, "latent_image")
    g.link(3, 0, 8, "samples")
    g.link(4, 2, 10, "")
    g.link(10, 0, 8, "vae")
    g.link(8, 0, 9, "images")
    return g.workflow()


def tiny_t2i_api(ckpt=TINY_SD15_NAME, steps=4, sampler="euler", size=64) -> dict:
    return {
        "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt}},
        "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "a red fox in fresh snow", "clip": ["4", 1]}},
        "7": {"class_type": "CLIPTextEncode", "inputs": {"text": "blurry, lowres", "clip": ["4", 1]}},
        "5": {"class_type": "EmptyLatentImage", "inputs": {"width": size, "height": size, "batch_size": 1}},
        "3": {"class_type": "KSampler", "inputs": {
            "seed": 42, "steps": steps, "cfg": 7.0, "sampler_name": sampler, "scheduler": "normal", "denoise": 1.0,
            "model": ["4", 0], "positive": ["6", 0], "negative": ["7", 0], "latent_image": ["5", 0]}},
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["4", 2]}},
        "9": {"class_type": "SaveImage", "inputs": {"filename_prefix": "headless_test/t2i", "images": ["8", 0]}},
    }


CORE_CLASSES = ["CheckpointLoaderSimple", "CLIPTextEncode", "EmptyLatentImage", "KSampler", "VAEDecode", "SaveImage"]


def test_conversion_with_real_node_definitions(comfy_root):
    object_info = _object_info_from_comfyui(CORE_CLASSES)
    api = h.ui_to_api(tiny_t2i_ui(), object_info)
    expected = tiny_t2i_api()
    assert sorted(api) == sorted(expected)
    for nid, node in expected.items():
        assert api[nid]["class_type"] == node["class_type"], nid
        assert api[nid]["inputs"] == node["inputs"], nid
    assert api["4"]["_meta"]["title"] == "Load Checkpoint"
    assert api["5"]["_meta"]["title"] == "Empty Latent Image"               # display name when no title saved

    # ComfyUI's own validation accepts every converted value; only the (absent) checkpoint is not in its list.
    import execution
    ok, error, outputs, node_errors = asyncio.run(execution.validate_prompt(str(uuid.uuid4()), api, None))
    kinds = {(nid, e["type"], e["extra_info"].get("input_name")) for nid, ne in node_errors.items()
             for e in ne["errors"]}
    assert kinds <= {("4", "value_not_in_list", "ckpt_name")}, node_errors


# ----------------------------------------------------------------------------------------------
# Live: the runner as a subprocess
# ----------------------------------------------------------------------------------------------

def _run_cli(*args, timeout=180, env=None):
    return subprocess.run([sys.executable, "-m", "tools.headless", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, cwd=str(REPO_ROOT), env=env)


def _pngs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*.png") if p.read_bytes()[:8] == PNG_SIGNATURE)


def test_live_api_graph_with_preview(comfy_server, tmp_path):
    api = tiny_t2i_api()
    api["10"] = {"class_type": "PreviewImage", "inputs": {"images": ["8", 0]}}
    wf = tmp_path / "t2i_api.json"
    wf.write_text(json.dumps(api))
    out = tmp_path / "out"
    proc = _run_cli(wf, "--server", comfy_server.url, "--out", out, "--timeout", "120")
    assert proc.returncode == 0, proc.stderr
    saved = [Path(line) for line in proc.stdout.splitlines() if line.strip()]
    assert len(saved) == 2 and all(p.is_file() for p in saved)
    assert len(_pngs(out)) == 2
    assert any("_temp_" in p.name for p in saved)                            # the PreviewImage (temp) output
    assert "step 4/4" in proc.stderr


def test_live_ui_graph_with_overrides(comfy_server, tmp_path):
    wf = tmp_path / "t2i_ui.json"
    wf.write_text(json.dumps(tiny_t2i_ui(steps=25, ckpt="not_there.safetensors")))
    out, api_out = tmp_path / "out", tmp_path / "sent_api.json"
    proc = _run_cli(wf, "--server", comfy_server.url, "--out", out, "--ckpt", TINY_SD15_NAME, "--seed", 3,
                    "--set", "KSampler.steps=3", "--set", "Positive.text=a blue bird", "--api-out", api_out)
    assert proc.returncode == 0, proc.stderr
    sent = json.loads(api_out.read_text())
    assert sent["3"]["inputs"]["steps"] == 3 and sent["3"]["inputs"]["seed"] == 3
    assert sent["4"]["inputs"]["ckpt_name"] == TINY_SD15_NAME and sent["6"]["inputs"]["text"] == "a blue bird"
    assert "step 3/3" in proc.stderr
    (png,) = _pngs(out)
    meta = h.read_png_workflow(png.read_bytes())
    assert json.loads(meta["workflow"])["nodes"]                             # extra_pnginfo: the UI workflow
    assert json.loads(meta["prompt"])["3"]["inputs"]["steps"] == 3


@pytest.mark.parametrize("bad", [{"steps": -5}, {"sampler_name": "no_such_sampler"}])
def test_live_rejected_graph_exits_3(comfy_server, tmp_path, bad):
    api = tiny_t2i_api()
    api["3"]["inputs"].update(bad)
    wf = tmp_path / "bad.json"
    wf.write_text(json.dumps(api))
    proc = _run_cli(wf, "--server", comfy_server.url, "--out", tmp_path / "out")
    assert proc.returncode == 3, proc.stderr
    assert "node_errors" in proc.stderr and "node 3 (KSampler" in proc.stderr
    assert next(iter(bad)) in proc.stderr
    assert not (tmp_path / "out").exists() or not _pngs(tmp_path / "out")


def test_live_execution_error_exits_1(comfy_server, tmp_path):
    api = {"1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 0}},
           "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0],       # passes validation, fails
                                                       "filename_prefix": "../../outside_%s" % uuid.uuid4().hex}}}
    wf = tmp_path / "fails.json"
    wf.write_text(json.dumps(api))
    proc = _run_cli(wf, "--server", comfy_server.url, "--out", tmp_path / "out")
    assert proc.returncode == 1, proc.stderr
    assert "execution error in node #2 SaveImage" in proc.stderr
    assert "outside the output folder" in proc.stderr and "traceback" in proc.stderr


def test_live_shipped_ui_workflow_matches_api_twin_and_runs(comfy_server, tmp_path):
    ui_path = REPO_ROOT / "workflows" / "ag_ab_sd15.json"
    api_path = REPO_ROOT / "workflows" / "api" / "ag_ab_sd15.json"
    if not (ui_path.is_file() and api_path.is_file()):
        pytest.skip("shipped AG SD1.5 workflows not present")
    import requests
    object_info = requests.get(f"{comfy_server.url}/object_info", timeout=120).json()
    converted = h.ui_to_api(json.loads(ui_path.read_text()), object_info)
    twin = json.loads(api_path.read_text())
    assert sorted(converted) == sorted(twin)
    for nid, node in twin.items():
        assert converted[nid]["class_type"] == node["class_type"], nid
        assert converted[nid]["inputs"] == node["inputs"], nid
    sets = []
    for nid, node in converted.items():
        if node["class_type"] == "EmptyLatentImage":
            sets += ["--set", f"{nid}.width=64", "--set", f"{nid}.height=64"]
        if node["class_type"] == "KSampler":
            sets += ["--set", f"{nid}.steps=3"]
    proc = _run_cli(ui_path, "--server", comfy_server.url, "--out", tmp_path / "out", "--ckpt", TINY_SD15_NAME,
                    *sets)
    assert proc.returncode == 0, proc.stderr
    n_save = sum(n["class_type"] == "SaveImage" for n in converted.values())
    assert len(_pngs(tmp_path / "out")) == n_save


def test_self_started_comfyui(comfy_host_path, tmp_path):
    api = {"1": {"class_type": "EmptyImage", "inputs": {"width": 32, "height": 32, "batch_size": 1, "color": 0xFF0000}},
           "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "selfstart"}}}
    wf = tmp_path / "empty_image.json"
    wf.write_text(json.dumps(api))
    base = tmp_path / "base"
    base.mkdir()
    proc = _run_cli(wf, "--comfyui", comfy_host_path, "--cpu", f"--server-arg=--base-directory={base}",
                    "--server-arg=--database-url=sqlite:///:memory:", "--server-arg=--disable-api-nodes",
                    "--out", tmp_path / "out", "--startup-timeout", "120", timeout=240,
                    env={**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"})  # see headless_server
    assert proc.returncode == 0, proc.stderr
    (png,) = _pngs(tmp_path / "out")
    assert png.name.startswith("selfstart")
    assert list((base / "output").glob("selfstart*.png"))                  # the temp base directory was used
    assert "ComfyUI ready at http://127.0.0.1:" in proc.stderr


def test_launcher_fails_at_once_when_the_server_lacks_the_ready_node(comfy_host_path, tmp_path):
    """The one launcher (tools/headless/server.py): a server that answers without the expected node (a pack that
    failed to import) is an error as soon as it answers, naming the node and the log, not a startup timeout."""
    import time
    server = h.LocalComfyUI(comfy_host_path, cpu=True, base_directory=tmp_path / "base", ready_node="TFG_NoSuchNode",
                            extra_args=["--database-url", "sqlite:///:memory:", "--disable-api-nodes"],
                            startup_timeout=600, env={"OMP_NUM_THREADS": "1", "PYTHONPATH": None})
    t0 = time.monotonic()
    with pytest.raises(h.ServerConnectionError, match="started without the node TFG_NoSuchNode"):
        server.start()
    server.stop()
    assert time.monotonic() - t0 < 300 and server.proc is None
    assert server.log_path.is_file()                                      # kept for the user to read
