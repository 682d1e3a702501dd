"""Workflow files (UI, API, ComfyUI PNG), UI → API conversion with GET /object_info, overrides
(--seed/--ckpt/--set) and readable prompt errors. Standard library only."""
from __future__ import annotations

import json
import logging
import os
import random
import re
import struct
import zlib
from pathlib import Path
from typing import Any, Iterable

from .errors import ConversionError, OverrideError

log = logging.getLogger("comfy_headless")


# --------------------------------------------------------------------------------------
# Workflow files
# --------------------------------------------------------------------------------------

def detect_format(workflow: Any) -> str:
    """Return "ui" or "api" for a parsed workflow; raise ConversionError otherwise."""
    if isinstance(workflow, dict):
        if isinstance(workflow.get("nodes"), list):
            return "ui"
        if workflow and all(isinstance(v, dict) and "class_type" in v for v in workflow.values()):
            return "api"
    raise ConversionError("not a ComfyUI workflow: expected the UI format (with \"nodes\" and \"links\") "
                          "or the API format ({id: {\"class_type\", \"inputs\"}})")


def read_png_workflow(data: bytes) -> dict[str, str]:
    """Text chunks of a PNG (ComfyUI stores "prompt" and "workflow" there)."""
    if data[:8] != b"\x89PNG\r\n\x1a\n":
        raise ConversionError("not a PNG file")
    out: dict[str, str] = {}
    pos = 8
    while pos + 8 <= len(data):
        length, ctype = struct.unpack(">I4s", data[pos:pos + 8])
        chunk = data[pos + 8:pos + 8 + length]
        pos += 12 + length
        try:
            if ctype == b"tEXt":
                key, _, text = chunk.partition(b"\0")
                out[key.decode("latin-1")] = text.decode("latin-1")
            elif ctype == b"zTXt":
                key, _, rest = chunk.partition(b"\0")
                out[key.decode("latin-1")] = zlib.decompress(rest[1:]).decode("latin-1")
            elif ctype == b"iTXt":
                key, _, rest = chunk.partition(b"\0")
                compressed = rest[0] == 1
                rest = rest[2:]
                _lang, _, rest = rest.partition(b"\0")
                _tkey, _, text = rest.partition(b"\0")
                if compressed:
                    text = zlib.decompress(text)
                out[key.decode("latin-1")] = text.decode("utf-8")
        except (ValueError, IndexError, zlib.error):
            log.debug("skipping unreadable PNG text chunk %r", ctype)
        if ctype == b"IEND":
            break
    return out


def load_workflow(path: str | os.PathLike) -> tuple[str, dict]:
    """Read a workflow file (JSON or a ComfyUI PNG). Returns (format, workflow) with format
    "ui" or "api". A PNG gives its embedded "prompt" (API) when present, else its
    "workflow" (UI); see :func:`png_ui_workflow` for the UI companion."""
    p = Path(path)
    try:
        raw = p.read_bytes()
    except OSError as e:
        raise ConversionError(f"cannot read workflow file {p}: {e}") from e
    if raw[:8] == b"\x89PNG\r\n\x1a\n":
        texts = read_png_workflow(raw)
        if "prompt" not in texts and "workflow" not in texts:
            raise ConversionError(f"{p}: PNG without an embedded ComfyUI workflow")
        key = "prompt" if "prompt" in texts else "workflow"
        try:
            wf = json.loads(texts[key])
        except ValueError as e:
            raise ConversionError(f"{p}: embedded {key!r} is not valid JSON: {e}") from e
        return detect_format(wf), wf
    try:
        wf = json.loads(raw.decode("utf-8-sig"))
    except (UnicodeDecodeError, ValueError) as e:
        raise ConversionError(f"{p}: not valid JSON: {e}") from e
    if isinstance(wf, dict) and isinstance(wf.get("prompt"), dict) and "nodes" not in wf:
        wf = wf["prompt"]           # a saved POST /prompt body
    return detect_format(wf), wf


def png_ui_workflow(path: str | os.PathLike) -> dict | None:
    """The UI workflow embedded in a ComfyUI PNG, or None."""
    raw = Path(path).read_bytes()
    if raw[:8] != b"\x89PNG\r\n\x1a\n":
        return None
    text = read_png_workflow(raw).get("workflow")
    try:
        wf = json.loads(text) if text else None
    except ValueError:
        return None
    return wf if isinstance(wf, dict) and "nodes" in wf else None


# --------------------------------------------------------------------------------------
# UI -> API conversion
# --------------------------------------------------------------------------------------

#: Node types that exist only in the frontend.
UI_ONLY_TYPES = frozenset({"Note", "MarkdownNote", "Reroute", "PrimitiveNode"})
MODE_MUTED = 2      # LGraphEventMode.NEVER
MODE_BYPASS = 4     # LGraphEventMode.BYPASS
#: Input types for which the frontend (v1.2x) creates a widget (its core widget registry,
#: plus WEBCAM from a core extension). Other types are sockets unless the saved node
#: marks the input with ``"widget"`` (custom widgets registered by JS extensions).
WIDGET_TYPES = frozenset({
    "INT", "FLOAT", "BOOLEAN", "STRING", "COMBO", "MARKDOWN", "IMAGEUPLOAD", "FILEUPLOAD", "COLOR",
    "IMAGECOMPARE", "TREESELECT", "MULTISELECT", "CHART", "GALLERIA", "SELECTBUTTON", "TEXTAREA",
    "WEBCAM",
})
CONTROL_VALUES = frozenset({"fixed", "increment", "decrement", "randomize", "increment-wrap"})
SEED_INPUTS = ("seed", "noise_seed")
_SUBGRAPH_IN = -10
_SUBGRAPH_OUT = -20
_MISSING = object()


def _norm_link(link: Any) -> tuple | None:
    """(id, origin_id, origin_slot, target_id, target_slot, type) from a list or dict link."""
    if isinstance(link, (list, tuple)) and len(link) >= 5:
        return (link[0], link[1], link[2], link[3], link[4], link[5] if len(link) > 5 else None)
    if isinstance(link, dict) and "id" in link:
        return (link["id"], link.get("origin_id"), link.get("origin_slot"), link.get("target_id"),
                link.get("target_slot"), link.get("type"))
    return None


def _same_id(a: Any, b: Any) -> bool:
    return str(a) == str(b)


def _types_compatible(a: Any, b: Any) -> bool:
    """LiteGraph's isValidConnection: wildcards, equality, comma-separated type lists."""
    if a in ("", "*", None, 0) or b in ("", "*", None, 0) or a == b:
        return True
    a, b = str(a).lower(), str(b).lower()
    if "," not in a and "," not in b:
        return a == b
    return any(x == y or x in ("", "*") or y in ("", "*") for x in a.split(",") for y in b.split(","))


def _ordered_inputs(spec: dict) -> list[tuple[str, Any, dict]]:
    """(name, type, options) of a node's inputs in the frontend's widget order: required
    then optional (each by ``input_order`` when present), then anything left over."""
    inputs = spec.get("input") or {}
    order = spec.get("input_order") or {}
    out: list[tuple[str, Any, dict]] = []
    seen: set[str] = set()
    for section in ("required", "optional"):
        sect = inputs.get(section) or {}
        names = [n for n in (order.get(section) or []) if n in sect] or list(sect)
        names += [n for n in sect if n not in names]
        for name in names:
            if name in seen:
                continue
            seen.add(name)
            entry = sect[name]
            if isinstance(entry, (list, tuple)) and entry:
                itype = entry[0]
                opts = entry[1] if len(entry) > 1 and isinstance(entry[1], dict) else {}
            else:
                itype, opts = entry, {}
            out.append((name, itype, opts))
    return out


def _is_combo(itype: Any) -> bool:
    return isinstance(itype, (list, tuple)) or itype == "COMBO"


def _widget_kind(name: str, itype: Any, opts: dict, ui_widget_names: set[str]) -> bool:
    if opts.get("forceInput"):
        return False
    wtype = opts.get("widgetType") or itype
    if _is_combo(wtype) or (isinstance(wtype, str) and wtype in WIDGET_TYPES):
        return True
    return name in ui_widget_names


def _control_extras(name: str, itype: Any, opts: dict) -> int:
    """How many frontend-only widgets follow this widget in widgets_values."""
    wtype = opts.get("widgetType") or itype
    if wtype == "INT":
        ctrl = opts.get("control_after_generate")
        if ctrl is None:
            ctrl = name in SEED_INPUTS
        return 1 if ctrl else 0
    if _is_combo(wtype) and opts.get("control_after_generate"):
        return 2                     # control mode + control_filter_list
    return 0


def _default_value(itype: Any, opts: dict) -> Any:
    if "default" in opts:
        return opts["default"]
    wtype = opts.get("widgetType") or itype
    if isinstance(wtype, (list, tuple)):
        return wtype[0] if wtype else _MISSING
    if wtype == "COMBO":
        options = opts.get("options") or []
        return options[0] if options else _MISSING
    return {"INT": 0, "FLOAT": 0, "STRING": "", "BOOLEAN": False}.get(wtype, _MISSING)


def process_dynamic_prompt(text: str, rng: random.Random) -> str:
    """The frontend's dynamic prompts for STRING widgets with ``dynamicPrompts``: strip
    ``/* */`` and ``//`` comments and replace ``{a|b|c}`` (nestable, ``\\`` escapes) by a
    random choice."""
    text = re.sub(r"/\*[\s\S]*?\*/|//.*", "", text)
    pos = 0

    def choice_block() -> str:
        nonlocal pos
        options, current, depth = [], "", 0
        while pos < len(text):
            ch = text[pos]
            pos += 1
            if ch == "\\":
                current += "\\" + (text[pos] if pos < len(text) else "")
                pos += 1
                continue
            if ch == "{":
                depth += 1
            elif ch == "}":
                if not depth:
                    break
                depth -= 1
            elif ch == "|" and not depth:
                options.append(current)
                current = ""
                continue
            current += ch
        options.append(current)
        return process_dynamic_prompt(rng.choice(options), rng)

    result = ""
    while pos < len(text):
        ch = text[pos]
        pos += 1
        if ch == "\\":
            result += "\\" + (text[pos] if pos < len(text) else "")
            pos += 1
        elif ch == "{":
            result += choice_block()
        else:
            result += ch
    return re.sub(r"\\([{}|])", r"\1", result)


class _Node:
    __slots__ = ("uid", "scope", "raw", "type", "mode", "kind", "inputs", "outputs", "instance", "sg",
                 "promoted")

    def __init__(self, uid: str, scope: str, raw: dict, kind: str, mode: int):
        self.uid, self.scope, self.raw, self.kind, self.mode = uid, scope, raw, kind, mode
        self.type = raw.get("type")
        self.inputs = [i for i in (raw.get("inputs") or []) if isinstance(i, dict)]
        self.outputs = [o for o in (raw.get("outputs") or []) if isinstance(o, dict)]
        self.instance: str | None = None     # sg_input pseudo node: uid of its subgraph node
        self.sg: dict | None = None          # subgraph definition (instances and sg_input)
        self.promoted: dict[str, Any] = {}   # subgraph node: promoted widget values by input name

    def title(self, object_info: dict) -> str:
        """The saved title, else the display name (what the frontend shows and exports)."""
        spec = object_info.get(self.type) or {}
        return str(self.raw.get("title") or spec.get("display_name") or self.type)


class _UIGraph:
    """A UI workflow flattened into one id space (subgraph inner nodes get "outer:inner" ids,
    like the frontend's API export), plus link resolution through virtual/bypassed nodes."""

    def __init__(self, ui: dict, object_info: dict):
        self.object_info = object_info
        self.nodes: dict[str, _Node] = {}
        self.links: dict[tuple[str, str], tuple] = {}     # (scope, link id) -> normalized link
        self.sg_outputs: dict[tuple[str, int], tuple[str, str]] = {}   # (instance uid, slot) -> link key
        defs = (ui.get("definitions") or {}).get("subgraphs") or []
        self.subgraphs = {str(d.get("id")): d for d in defs if isinstance(d, dict) and d.get("id")}
        self._add(ui.get("nodes") or [], ui.get("links") or [], "", None, None, 0)

    def _add(self, nodes: list, links: list, scope: str, instance: str | None, sg: dict | None,
             depth: int) -> None:
        if depth > 32:
            raise ConversionError("subgraphs nested more than 32 levels deep (recursive definition?)")
        for link in links:
            nl = _norm_link(link)
            if nl is None:
                continue
            key = (scope, str(nl[0]))
            self.links[key] = (scope + str(nl[1]), nl[2], scope + str(nl[3]), nl[4], nl[5])
            if instance is not None and _same_id(nl[3], _SUBGRAPH_OUT):
                self.sg_outputs[(instance, int(nl[4]))] = key
        if instance is not None:
            pseudo = _Node(scope + str(_SUBGRAPH_IN), scope, {"type": "<subgraph input>"}, "sg_input", 0)
            pseudo.instance, pseudo.sg = instance, sg
            self.nodes[pseudo.uid] = pseudo
        outer_mode = self.nodes[instance].mode if instance is not None else 0
        for raw in nodes:
            if not isinstance(raw, dict) or "id" not in raw:
                continue
            uid = scope + str(raw["id"])
            ntype = raw.get("type")
            mode = raw.get("mode") or 0
            if outer_mode in (MODE_MUTED, MODE_BYPASS):
                mode = MODE_MUTED            # inside a muted/bypassed subgraph: never emitted
            if ntype in self.subgraphs:
                kind = "subgraph"
            elif ntype in UI_ONLY_TYPES:
                kind = {"Reroute": "reroute", "PrimitiveNode": "primitive"}.get(ntype, "note")
            elif ntype in self.object_info:
                kind = "real"
            elif isinstance(ntype, str) and (ntype.startswith("workflow>") or ntype.startswith("workflow/")):
                raise ConversionError(
                    f"node {uid} is a legacy group node ({ntype!r}); convert it to nodes in the UI "
                    "(right click > Convert to nodes) or export the workflow in API format")
            else:
                kind = "unknown"
            node = _Node(uid, scope, raw, kind, mode)
            self.nodes[uid] = node
            if kind == "subgraph":
                sgdef = self.subgraphs[ntype]
                self._add(sgdef.get("nodes") or [], sgdef.get("links") or [], uid + ":", uid, sgdef,
                          depth + 1)
                node.sg = sgdef
                node.promoted = self._promoted_widgets(node, sgdef, uid + ":")

    def _promoted_widgets(self, node: _Node, sgdef: dict, inner_scope: str) -> dict[str, Any]:
        """Map a subgraph node's widgets_values onto the subgraph inputs that feed inner widgets."""
        values = node.raw.get("widgets_values")
        if not isinstance(values, list) or not values:
            return {}
        linked_names = {i.get("name") for i in node.inputs if i.get("link") is not None}
        candidates = []
        for idx, sg_input in enumerate(sgdef.get("inputs") or []):
            name = sg_input.get("name")
            if name in linked_names and not any(
                    i.get("name") == name and i.get("widget") for i in node.inputs):
                continue                     # a plain socket on the subgraph node
            feeds_widget = False
            for key, link in self.links.items():
                if key[0] != inner_scope or link[0] != inner_scope + str(_SUBGRAPH_IN) or link[1] != idx:
                    continue
                target = self.nodes.get(link[2])
                if target is not None and isinstance(link[3], int) and link[3] < len(target.inputs) \
                        and target.inputs[link[3]].get("widget"):
                    feeds_widget = True
            if feeds_widget:
                candidates.append(name)
        if len(candidates) != len(values):
            log.warning("subgraph node %s: %d widget values for %d promoted widgets; using the inner "
                        "nodes' own values", node.uid, len(values), len(candidates))
            return {}
        return dict(zip(candidates, values))

    # -- resolution -----------------------------------------------------------------
    # Results: None (unconnected), ("link", uid, slot) or ("value", v).

    def resolve_link(self, key: tuple[str, str], want: Any, visited: set) -> tuple | None:
        link = self.links.get(key)
        if link is None:
            log.warning("dangling link id %s%s ignored", key[0], key[1])
            return None
        return self.resolve_output(link[0], link[1], want, visited)

    def resolve_input(self, node: _Node, idx: int, want: Any, visited: set) -> tuple | None:
        if idx < 0 or idx >= len(node.inputs):
            return None
        entry = node.inputs[idx]
        if entry.get("link") is None:
            return None
        mark = (node.uid, "I", idx)
        if mark in visited:
            raise ConversionError(f"circular link through node {node.uid}")
        visited.add(mark)
        return self.resolve_link((node.scope, str(entry["link"])), want or entry.get("type"), visited)

    def resolve_output(self, uid: str, slot: Any, want: Any, visited: set) -> tuple | None:
        node = self.nodes.get(uid)
        if node is None:
            log.warning("link from missing node %s ignored", uid)
            return None
        slot = int(slot)
        mark = (uid, "O", slot)
        if mark in visited:
            raise ConversionError(f"circular link through node {uid}")
        visited.add(mark)
        if node.mode == MODE_BYPASS and node.kind != "sg_input":
            idx = self._bypass_index(node, slot, want)
            return None if idx < 0 else self.resolve_input(node, idx, None, visited)
        if node.kind == "subgraph":
            if node.mode == MODE_MUTED:
                return None
            key = self.sg_outputs.get((uid, slot))
            return None if key is None else self.resolve_link(key, want, visited)
        if node.kind == "sg_input":
            return self._resolve_sg_input(node, slot, want, visited)
        if node.kind == "reroute":
            return self.resolve_input(node, 0, want, visited) if node.inputs else None
        if node.kind == "primitive":
            values = node.raw.get("widgets_values")
            if isinstance(values, list) and values:
                return ("value", values[0])
            return None
        if node.kind == "note":
            return None
        return ("link", uid, slot)

    def _resolve_sg_input(self, node: _Node, slot: int, want: Any, visited: set) -> tuple | None:
        inst = self.nodes[node.instance]
        sg_inputs = (node.sg or {}).get("inputs") or []
        name = sg_inputs[slot].get("name") if slot < len(sg_inputs) else None
        for idx, entry in enumerate(inst.inputs):
            if entry.get("name") == name:
                if entry.get("link") is not None:
                    return self.resolve_input(inst, idx, want, visited)
                break
        if name in inst.promoted:
            return ("value", inst.promoted[name])
        return None

    @staticmethod
    def _bypass_index(node: _Node, slot: int, want: Any) -> int:
        inputs = node.inputs
        if want in ("*", "", None):
            return slot if len(inputs) > slot else (0 if inputs else -1)
        out_type = node.outputs[slot].get("type") if slot < len(node.outputs) else want
        if slot < len(inputs) and _types_compatible(inputs[slot].get("type"), out_type) \
                and _types_compatible(inputs[slot].get("type"), want):
            return slot
        for i, entry in enumerate(inputs):
            if entry.get("type") == want:
                return i
        for i, entry in enumerate(inputs):
            if _types_compatible(entry.get("type"), out_type) and _types_compatible(entry.get("type"), want):
                return i
        return -1


def _map_widget_values(node: _Node, spec: dict, rng: random.Random) -> dict[str, Any]:
    """widgets_values of one node -> {input name: value} for its widget inputs."""
    ui_widgets = {i.get("widget", {}).get("name") or i.get("name")
                  for i in node.inputs if isinstance(i.get("widget"), dict)}
    specs = _ordered_inputs(spec)
    widgets = [(n, t, o) for (n, t, o) in specs if _widget_kind(n, t, o, ui_widgets)]
    values = node.raw.get("widgets_values")
    out: dict[str, Any] = {}
    if isinstance(values, dict):                  # some custom nodes save widgets by name
        for name, _t, _o in widgets:
            if name in values:
                out[name] = values[name]
    else:
        values = list(values) if isinstance(values, list) else []
        # Old saves kept widget slots for forceInput inputs (the frontend's migrateWidgetsValues).
        forced = [item for item in specs if item[2].get("forceInput")
                  and _widget_kind(item[0], item[1], {**item[2], "forceInput": False}, ui_widgets)]
        if forced:
            legacy = [item for item in specs if item in widgets or item in forced]
            if sum(1 + _control_extras(*item) for item in legacy) == len(values):
                kept, pos = [], 0
                for item in legacy:
                    width = 1 + _control_extras(*item)
                    if item not in forced:
                        kept.extend(values[pos:pos + width])
                    pos += width
                values = kept
        # Positional, like the frontend. The control widget(s) after seed-like widgets hold a
        # mode ("randomize", ...; very old saves: a bool). When the list is shorter than the
        # widgets need (hand-written files), skip a control slot only if it holds a mode.
        complete = len(values) >= sum(1 + _control_extras(*w) for w in widgets)
        pos = 0
        for i, (name, itype, opts) in enumerate(widgets):
            if pos >= len(values):
                break
            out[name] = values[pos]
            pos += 1
            extras = _control_extras(name, itype, opts)
            if not extras or pos >= len(values):
                continue
            mode = values[pos]
            if complete or isinstance(mode, bool) or (isinstance(mode, str) and mode in CONTROL_VALUES):
                pos += 1
                if extras == 2 and pos < len(values) and (complete or len(values) - pos > len(widgets) - i - 1):
                    pos += 1                   # the combo's control_filter_list
            else:
                log.warning("node %s (%s): no control_after_generate value after %r; "
                            "mapping the following widget values without it", node.uid, node.type, name)
    for name, itype, opts in widgets:
        if name not in out:
            default = _default_value(itype, opts)
            if default is not _MISSING:
                log.debug("node %s (%s): no saved value for %r, using default %r",
                          node.uid, node.type, name, default)
                out[name] = default
    for name, itype, opts in widgets:
        value = out.get(name)
        if isinstance(value, str) and opts.get("dynamicPrompts"):
            out[name] = process_dynamic_prompt(value, rng)
    return out


def ui_to_api(ui_workflow: dict, object_info: dict, *, rng: random.Random | None = None) -> dict:
    """Convert a UI-format workflow to the API format that ``POST /prompt`` takes.

    ``object_info`` is the server's ``GET /object_info`` answer (at least the classes the
    workflow uses). Mirrors the frontend's graphToPrompt (v1.2x):

    * widget inputs (INT/FLOAT/STRING/BOOLEAN/COMBO..., not ``forceInput``) take their
      values from ``widgets_values`` in input order (required, then optional, by
      ``input_order`` when present); the extra "control_after_generate" value stored after
      seed-like INT widgets (``control_after_generate`` or named seed/noise_seed; combos
      with control store two extra values) is skipped; list values are wrapped as
      ``{"__value__": [...]}``; ``dynamicPrompts`` strings get ``{a|b}`` resolved with
      ``rng`` (default: a fixed seed) and comments stripped, like the frontend;
    * links (``[id, from_node, from_slot, to_node, to_slot, type]`` or dict links) become
      ``["from_id", from_slot]``, followed through Reroute nodes, bypassed nodes (mode 4:
      to the input whose type matches, else dropped) and subgraphs (flattened; inner node
      ids become "outer:inner"); a PrimitiveNode's value is inlined into its targets; a
      link into a widget input replaces the widget value;
    * Note/MarkdownNote/Reroute/PrimitiveNode and muted (mode 2) / bypassed (mode 4) nodes
      are not emitted; links to nodes that are not emitted are dropped;
    * a node type missing from ``object_info`` raises :class:`ConversionError` when other
      nodes take its outputs, or when no output node is left without it; otherwise it is
      skipped with a warning (frontend-only nodes of JS extensions look like that).

    Legacy group nodes ("workflow>...") are not supported (ConversionError). The input is
    not modified.
    """
    if detect_format(ui_workflow) != "ui":
        raise ConversionError("ui_to_api expects a UI-format workflow (with \"nodes\")")
    rng = rng if rng is not None else random.Random(0)
    graph = _UIGraph(ui_workflow, object_info)
    api: dict[str, dict] = {}
    for node in graph.nodes.values():
        if node.kind != "real" or node.mode in (MODE_MUTED, MODE_BYPASS):
            continue
        spec = object_info[node.type]
        inputs = _map_widget_values(node, spec, rng)
        for name, value in list(inputs.items()):
            if isinstance(value, list):
                inputs[name] = {"__value__": value}
        dyn = {n for n, _t, o in _ordered_inputs(spec) if o.get("dynamicPrompts")}
        for idx, entry in enumerate(node.inputs):
            if entry.get("link") is None:
                continue
            name = (entry.get("widget") or {}).get("name") or entry.get("name")
            resolved = graph.resolve_input(node, idx, None, set())
            if resolved is None:
                continue
            if resolved[0] == "value":
                value = resolved[1]
                if isinstance(value, str) and name in dyn:
                    value = process_dynamic_prompt(value, rng)
                inputs[name] = {"__value__": value} if isinstance(value, list) else value
            else:
                inputs[name] = [resolved[1], resolved[2]]
        api[node.uid] = {"inputs": inputs, "class_type": node.type, "_meta": {"title": node.title(object_info)}}

    unknown = [n for n in graph.nodes.values() if n.kind == "unknown" and n.mode != MODE_MUTED]
    needed: dict[str, list[str]] = {}
    for nid, entry in api.items():
        for name, value in list(entry["inputs"].items()):
            if isinstance(value, list) and len(value) == 2 and isinstance(value[0], str) \
                    and value[0] not in api:
                target = graph.nodes.get(value[0])
                if target is not None and target.kind == "unknown" and target.mode != MODE_MUTED:
                    needed.setdefault(str(target.type), []).append(f"{nid}.{name}")
                del entry["inputs"][name]
    hint = ("Install the custom nodes that provide them, or check the server log for nodes that "
            "failed to import")
    if needed:
        detail = "; ".join(f"{t!r} (feeding {', '.join(v)})" for t, v in sorted(needed.items()))
        raise ConversionError(f"the server does not know these node types: {detail}. {hint}")
    if unknown:
        has_outputs = any(object_info[e["class_type"]].get("output_node") for e in api.values())
        knows_outputs = any("output_node" in object_info[e["class_type"]] for e in api.values())
        types = sorted({str(n.type) for n in unknown})
        if knows_outputs and not has_outputs:
            raise ConversionError(f"the server does not know these node types: {', '.join(map(repr, types))}, "
                                  f"and without them the workflow has no output node. {hint}")
        for node in unknown:
            log.warning("skipping node %s of type %r: the server does not know it and no node that "
                        "runs takes its outputs (a frontend-only or missing output node?)", node.uid, node.type)
    return api


# --------------------------------------------------------------------------------------
# Overrides
# --------------------------------------------------------------------------------------

def _parse_value(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text


def parse_set_override(text: str) -> tuple[str, str, Any]:
    """"NODE.INPUT=VALUE" -> (NODE, INPUT, value); VALUE is JSON when it parses, else a string."""
    left, sep, value = text.partition("=")
    node, dot, name = left.rpartition(".")
    if not sep or not dot or not node.strip() or not name.strip():
        raise OverrideError(f"--set {text!r}: expected NODE.INPUT=VALUE (NODE: id, class_type or title)")
    return node.strip(), name.strip(), _parse_value(value)


def _find_node(api: dict, ref: str) -> str:
    if ref in api:
        return ref
    by_class = [nid for nid, n in api.items() if n.get("class_type") == ref]
    if len(by_class) == 1:
        return by_class[0]
    by_title = [nid for nid, n in api.items() if (n.get("_meta") or {}).get("title") == ref]
    if len(by_title) == 1:
        return by_title[0]
    matches = by_class or by_title
    if matches:
        raise OverrideError(f"node {ref!r} is ambiguous: it matches nodes {', '.join(sorted(matches))}; "
                            "use the node id")
    listing = ", ".join(f"{nid} ({n.get('class_type')}, {(n.get('_meta') or {}).get('title', '')!r})"
                        for nid, n in api.items())
    raise OverrideError(f"no node {ref!r} (by id, class_type or title). Nodes: {listing}")


def apply_overrides(api: dict, *, seed: int | None = None, ckpt: str | None = None,
                    sets: Iterable[tuple[str, str, Any] | str] = (),
                    object_info: dict | None = None) -> list[str]:
    """Apply --seed / --ckpt / --set to an API graph in place. Returns a list of change
    descriptions. Raises OverrideError when a target does not exist."""
    changes: list[str] = []

    def put(nid: str, name: str, value: Any) -> None:
        api[nid].setdefault("inputs", {})[name] = value
        changes.append(f"{nid}.{name} = {json.dumps(value)}")

    if seed is not None:
        hits = [(nid, k) for nid, n in api.items() for k in (n.get("inputs") or {}) if k in SEED_INPUTS]
        if not hits:
            raise OverrideError("--seed: the workflow has no seed/noise_seed input")
        for nid, k in hits:
            put(nid, k, seed)
    if ckpt is not None:
        hits = [nid for nid, n in api.items() if "ckpt_name" in (n.get("inputs") or {})]
        if not hits:
            raise OverrideError("--ckpt: the workflow has no ckpt_name input")
        for nid in hits:
            put(nid, "ckpt_name", ckpt)
    for item in sets:
        ref, name, value = parse_set_override(item) if isinstance(item, str) else item
        nid = _find_node(api, ref)
        node = api[nid]
        known = set(node.get("inputs") or {})
        spec = (object_info or {}).get(node.get("class_type"))
        if spec:
            known |= {n for n, _t, _o in _ordered_inputs(spec)}
        if name not in known:
            raise OverrideError(f"--set {ref}.{name}: node {nid} ({node.get('class_type')}) has no input "
                                f"{name!r}; its inputs: {', '.join(sorted(known)) or '(none)'}")
        put(nid, name, value)
    return changes


# --------------------------------------------------------------------------------------
# Server errors
# --------------------------------------------------------------------------------------

def format_prompt_error(response: dict, api: dict | None = None) -> str:
    """Readable text for a POST /prompt 400 answer ({"error": ..., "node_errors": ...})."""
    lines = []
    err = response.get("error")
    if isinstance(err, dict):
        head = err.get("message") or err.get("type") or "invalid prompt"
        lines.append(f"error: {head} [{err.get('type', '?')}]")
        details = err.get("details")
        if details:
            lines.append(f"  {details}")
    elif err:
        lines.append(f"error: {err}")
    node_errors = response.get("node_errors") or {}
    if node_errors:
        lines.append("node_errors:")
        for nid, info in node_errors.items():
            ctype = (info or {}).get("class_type") or ((api or {}).get(nid) or {}).get("class_type", "?")
            title = (((api or {}).get(nid) or {}).get("_meta") or {}).get("title")
            lines.append(f"  node {nid} ({ctype}{', ' + repr(title) if title and title != ctype else ''}):")
            for e in (info or {}).get("errors") or []:
                extra = e.get("extra_info") or {}
                where = f" [input {extra['input_name']}]" if extra.get("input_name") else ""
                msg = e.get("message") or e.get("type")
                det = e.get("details")
                lines.append(f"    - {e.get('type', 'error')}: {msg}{where}" + (f": {det}" if det else ""))
    elif isinstance(err, dict) and err.get("type") == "prompt_outputs_failed_validation":
        lines.append("node_errors: (none reported)")
    return "\n".join(lines) if lines else json.dumps(response)


# --------------------------------------------------------------------------------------
# HTTP / WebSocket client
# --------------------------------------------------------------------------------------
