"""The smallest API-format graph that feeds each node of the pack, for the generated HTTP tests.

Everything is derived from the node itself: its sockets and outputs from its V3 schema, its widgets from its
input declaration (`INPUTS`, nodes/inputs.py). Sockets are fed from one tiny model (the `comfy_server` fixture's
SD1.5 checkpoint, or a testing-pack loader for SDXL / Flux / SD3), 64 px images and latents and 4-step schedules;
every output is consumed up to a PreviewImage so the node really executes. Only required sockets are fed, plus the
optional ones a node cannot run without (`NEEDED_OPTIONAL`).
"""
from __future__ import annotations

import math
from pathlib import Path

import host
from headless_server import TINY_LOADERS, TINY_SD15_NAME

TARGET = "target"
SIZE = 64
"""Pixels of every image and empty latent (8x8 latent on the SD1.5 VAE: the smallest the tiny UNet takes well)."""
STEPS = 4
"""Schedule length of the feeding BasicScheduler and consuming samplers."""
SAMPLE_CFG = 4.0
"""cfg of the consuming samplers (> 1: the guidance patches need an uncond pass)."""

PRIMITIVES = {"int": "PrimitiveInt", "float": "PrimitiveFloat", "string": "PrimitiveString",
              "bool": "PrimitiveBoolean"}
"""Core V3 primitive nodes (comfy_extras/nodes_primitive.py: same ids on ComfyUI 0.3.64 and 0.3.75)."""

POISON_NODES = {"LATENT": "TFGTest_NonFiniteLatent", "IMAGE": "TFGTest_NonFiniteImage",
                "MASK": "TFGTest_NonFiniteMask", "CONDITIONING": "TFGTest_NonFiniteConditioning"}
"""Testing-pack nodes (tests/testing_pack/hostile.py) that put NaN / Inf into a tensor passing through."""

NEEDED_OPTIONAL = {
    "TFG_DiffuseHigh": [("image", "latent")],     # the source to upscale: one of image / latent
    "TFG_DiffuseHighProgressive": [("image", "latent")],
}
"""Optional sockets a node cannot run without, as groups of alternatives: the first of each group is fed unless
another member is asked for (feed_optional / poison). All other optional sockets stay unconnected."""

EMPTY_LATENT_SIZE = {"TFG_ASGDiffusion": 128}
"""Pixels of the empty latent fed to a node that needs more than SIZE: ASGDiffusion splits it into
scale_width x scale_height patches of at least 64 px (2x2 by default)."""

FILE_INPUTS = {("TFG_LinearAGFit", "filename"): "write", ("TFG_LinearAGLoad", "coefficients_name"): "read"}
"""Inputs that name a file (besides every FileStem widget, found from the declarations)."""

QUICK = {
    "TFG_LinearAG": {"estimator": "hold_delta"},             # fitted needs a coefficients input
    "TFG_LinearAGGuider": {"estimator": "hold_delta"},
    "TFG_DiffuseHigh": {"steps": 2, "schedule_steps": 4, "guidance_steps": 1},
    "TFG_DiffuseHighProgressive": {"stages": "x2", "steps": 2, "schedule_steps": 4, "guidance_steps": 1},
    "TFG_ASGDiffusion": {"steps": 3},
    "TFG_TALEComposite": {"energy": "latent", "steps": 8, "inner_steps": 1},
    "TFG_StyleSSPStartPoint": {"skip_steps": 1},
}
"""Cheaper (still valid) values for the tests that are not about defaults: they only need the node to run."""


# ----------------------------------------------------------------------------------------------
# The pack, read in-process
# ----------------------------------------------------------------------------------------------

_nodes: dict | None = None


def pack_nodes() -> dict:
    """node id -> class, in the order of the pack's `get_node_list()` ({} when no ComfyUI host is found)."""
    global _nodes
    if _nodes is None:
        root = host.find_comfyui()
        if root is None:
            return {}
        host.setup_inprocess_comfyui(Path(root))
        _nodes = host.module_node_classes(host.load_pack())
    return _nodes


def inputs_module():
    return host.pack_module("nodes.inputs")


def declaration(cls):
    """The node's NodeInputs, or None when it has none."""
    spec = getattr(cls, "INPUTS", None)
    return spec if isinstance(spec, inputs_module().NodeInputs) else None


def sockets(cls) -> list:
    """[(name, io type, optional)] of the node's linked inputs, from its V3 schema."""
    out = []
    for i in cls.GET_SCHEMA().inputs:
        io_type = str(i.get_io_type())
        if io_type not in ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"):
            out.append((i.id, io_type, bool(i.optional)))
    return out


def outputs(cls) -> list[str]:
    return [str(o.get_io_type()) for o in cls.GET_SCHEMA().outputs]


def numeric_widgets(spec) -> list:
    return [w for w in spec.widgets if w.kind in ("int", "float")]


def finite_sockets(spec) -> list[str]:
    Socket = inputs_module().Socket
    return [i.name for i in spec.items if isinstance(i, Socket) and i.finite]


def file_inputs(node_id: str, spec) -> list[str]:
    """Widgets of this node that name a file: every FileStem widget, and those listed in FILE_INPUTS."""
    pattern = inputs_module().FILE_STEM_PATTERN
    names = [w.name for w in spec.widgets if w.kind == "string" and w.pattern == pattern]
    names += [n for (node, n) in FILE_INPUTS if node == node_id and n not in names]
    return names


def defaults(spec, server=None, node_id: str | None = None) -> dict:
    """Every widget at its declared default. A choice whose options are read at run time (a file list) takes the
    server's first option (GET /object_info), as the UI would."""
    values = {}
    for w in spec.widgets:
        if w.kind == "combo" and callable(w.options) and server is not None:
            values[w.name] = server_first_option(server, node_id, w.name)
        else:
            values[w.name] = spec.default(w)
    return values


def server_options(server, node_id: str, name: str) -> list:
    info = server.get(f"/object_info/{node_id}")[node_id]["input"]
    for section in ("required", "optional"):
        if name in info.get(section, {}):
            spec = info[section][name]
            opts = spec[0] if isinstance(spec[0], list) else spec[1].get("options", [])
            return list(opts)
    raise KeyError(f"{node_id} has no input {name} on the server")


def server_first_option(server, node_id: str, name: str):
    opts = server_options(server, node_id, name)
    return opts[0] if opts else None


def quick_values(node_id: str, spec, server=None) -> dict:
    """The defaults with QUICK's cheaper values (which must pass the node's own checks)."""
    values = defaults(spec, server, node_id)
    values.update({k: v for k, v in QUICK.get(node_id, {}).items() if k in values})
    server_side = {w.name for w in spec.widgets if w.kind == "combo" and callable(w.options)}  # listed by the server
    problems = spec.problems({k: v for k, v in values.items() if k not in server_side})
    assert not problems, f"node_graphs.QUICK[{node_id!r}] is not valid for the node: {problems}"
    return values


def schema_values(node_id: str, **overrides) -> dict:
    """Widget defaults as the node's schema lists them (what GET /object_info shows), with QUICK's cheaper values
    and `overrides`: for pack nodes used as helpers in a graph (feeding or consuming the node under test),
    whether or not they have a declaration, so an appended input never breaks a helper."""
    info = pack_nodes()[node_id].GET_NODE_INFO_V1()["input"]
    values = {}
    for section in ("required", "optional"):
        for name, spec in info.get(section, {}).items():
            opts = spec[1] if len(spec) > 1 else {}
            if isinstance(spec[0], list) or spec[0] == "COMBO":
                choices = spec[0] if isinstance(spec[0], list) else opts.get("options", [])
                values[name] = opts.get("default", choices[0] if choices else None)
            elif spec[0] in ("INT", "FLOAT", "STRING", "BOOLEAN") and "default" in opts:
                values[name] = opts["default"]
    values.update({k: v for k, v in QUICK.get(node_id, {}).items() if k in values})
    values.update(overrides)
    return values


def _pack_node(node_id: str, links: dict, **widgets) -> dict:
    return {"class_type": node_id, "inputs": {**schema_values(node_id, **widgets), **links}}


# ----------------------------------------------------------------------------------------------
# Graph building
# ----------------------------------------------------------------------------------------------

def _base(g: dict, family: str) -> None:
    if family == "sd15":
        g["L"] = {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": TINY_SD15_NAME}}
    else:
        g["L"] = {"class_type": TINY_LOADERS[family], "inputs": {}}
    g["pos"] = {"class_type": "CLIPTextEncode", "inputs": {"text": "a red fox in fresh snow", "clip": ["L", 1]}}
    g["neg"] = {"class_type": "CLIPTextEncode", "inputs": {"text": "blurry, lowres", "clip": ["L", 1]}}
    g["img"] = {"class_type": "LoadImage", "inputs": {"image": "example.png"}}
    g["mask"] = {"class_type": "LoadImageMask", "inputs": {"image": "example.png", "channel": "red"}}
    g["enc"] = {"class_type": "VAEEncode", "inputs": {"pixels": ["img", 0], "vae": ["L", 2]}}
    g["empty"] = {"class_type": "EmptySD3LatentImage" if family in ("sd3", "flux") else "EmptyLatentImage",
                  "inputs": {"width": SIZE, "height": SIZE, "batch_size": 1}}
    g["sig"] = {"class_type": "BasicScheduler", "inputs": {"model": ["L", 0], "scheduler": "normal",
                                                          "steps": STEPS, "denoise": 1.0}}


def _ensure_recording_chain(g: dict) -> None:
    """A LinearAG Record on the model, sampled once, for nodes that take a recording (LinearAG Fit)."""
    g["rec"] = _pack_node("TFG_LinearAGRecord", {"model": ["L", 0]})
    g["recks"] = _ksampler(["rec", 0])


def _ksampler(model, latent=("empty", 0)) -> dict:
    return {"class_type": "KSampler", "inputs": {
        "model": model, "seed": 0, "steps": STEPS, "cfg": SAMPLE_CFG, "sampler_name": "euler", "scheduler": "normal",
        "positive": ["pos", 0], "negative": ["neg", 0], "latent_image": list(latent), "denoise": 1.0}}


def _preview_latent(g: dict, key: str, latent) -> None:
    g[f"{key}_dec"] = {"class_type": "VAEDecode", "inputs": {"samples": latent, "vae": ["L", 2]}}
    g[f"{key}_out"] = {"class_type": "PreviewImage", "inputs": {"images": [f"{key}_dec", 0]}}


def _feed(g: dict, node_id: str, name: str, io_type: str, coefficients_name: str | None):
    if io_type == "MODEL":
        return ["L", 0]
    if io_type == "CLIP":
        return ["L", 1]
    if io_type == "VAE":
        return ["L", 2]
    if io_type == "CONDITIONING":
        return ["neg", 0] if name == "negative" else ["pos", 0]
    if io_type == "IMAGE":
        return ["img", 0]
    if io_type == "MASK":
        return ["mask", 0]
    if io_type == "SIGMAS":
        return ["sig", 0]
    if io_type == "LATENT":
        if node_id == "TFG_DigitsImage":            # a sampled latent of the shipped digits model
            _digits_chain(g, "dm")
            return ["dks", 0]
        if node_id == "TFG_LinearAGFit":
            _ensure_recording_chain(g)
            return ["recks", 0]
        if name == "inverted":                      # StyleSSP Start Point: the inversion of the content
            g["inv"] = _pack_node("TFG_Inversion", {"model": ["L", 0], "positive": ["pos", 0], "latent": ["enc", 0],
                                                    "sigmas": ["sig", 0]})
            return ["inv", 0]
        if name != "latent_image":
            return ["enc", 0]
        if node_id not in EMPTY_LATENT_SIZE:
            return ["empty", 0]
        size = EMPTY_LATENT_SIZE[node_id]
        g["empty_target"] = dict(g["empty"], inputs={"width": size, "height": size, "batch_size": 1})
        return ["empty_target", 0]
    if io_type == "TFG_LINEAR_AG_RECORDING":
        _ensure_recording_chain(g)
        return ["rec", 1]
    if io_type == "TFG_LINEAR_AG_COEFFICIENTS":
        if coefficients_name is None:
            raise ValueError(f"{node_id}.{name}: a coefficients file name is needed (see ensure_coefficients)")
        g["coef"] = _pack_node("TFG_LinearAGLoad", {}, coefficients_name=coefficients_name)
        return ["coef", 0]
    if io_type == "CLIP_VISION":
        g["cv"] = {"class_type": "TFGTest_TinyCLIPVisionLoader", "inputs": {"family": "sd15"}}
        return ["cv", 0]
    raise ValueError(f"node_graphs: no feeder for {node_id}.{name} ({io_type}); add one")


def _digits_chain(g: dict, loader: str) -> None:
    """The shipped digits model (`loader`: a TFG_DigitsModel node key, added when missing) sampled by KSampler into
    g["dks"] (its own conditioning and one-channel latent: the SD1.5 prompts do not fit it)."""
    if loader not in g:
        g[loader] = {"class_type": "TFG_DigitsModel", "inputs": {"digit": 3, "batch_size": 2}}
    g["dks"] = {"class_type": "KSampler", "inputs": {
        "model": [loader, 0], "seed": 0, "steps": STEPS, "cfg": SAMPLE_CFG, "sampler_name": "euler",
        "scheduler": "normal", "positive": [loader, 1], "negative": [loader, 2], "latent_image": [loader, 3],
        "denoise": 1.0}}


def _consume(g: dict, node_id: str, outs: list[str]) -> None:
    """Every output of the target reaches a PreviewImage."""
    t = TARGET
    done = set()
    if node_id == "TFG_DigitsModel":                # model, conditionings and latent belong together
        _digits_chain(g, t)
        g["dimg"] = {"class_type": "TFG_DigitsImage", "inputs": {"samples": ["dks", 0], "scale": 8}}
        g["dimg_out"] = {"class_type": "PreviewImage", "inputs": {"images": ["dimg", 0]}}
        return
    if "SIGMAS" in outs and "NOISE" in outs and "LATENT" in outs:
        lat, sig, noise = outs.index("LATENT"), outs.index("SIGMAS"), outs.index("NOISE")
        g["c_guider"] = {"class_type": "CFGGuider", "inputs": {"model": ["L", 0], "positive": ["pos", 0],
                                                               "negative": ["neg", 0], "cfg": SAMPLE_CFG}}
        g["c_sampler"] = {"class_type": "KSamplerSelect", "inputs": {"sampler_name": "euler"}}
        g["c_sca"] = {"class_type": "SamplerCustomAdvanced", "inputs": {
            "noise": [t, noise], "guider": ["c_guider", 0], "sampler": ["c_sampler", 0], "sigmas": [t, sig],
            "latent_image": [t, lat]}}
        _preview_latent(g, "c_sca", ["c_sca", 0])
        done |= {lat, sig, noise}
    for i, io_type in enumerate(outs):
        if i in done:
            continue
        key = f"c{i}"
        if io_type == "MODEL":
            g[f"{key}_ks"] = _ksampler([t, i])
            _preview_latent(g, key, [f"{key}_ks", 0])
        elif io_type == "GUIDER":
            g[f"{key}_noise"] = {"class_type": "RandomNoise", "inputs": {"noise_seed": 0}}
            g[f"{key}_sampler"] = {"class_type": "KSamplerSelect", "inputs": {"sampler_name": "euler"}}
            g[f"{key}_sca"] = {"class_type": "SamplerCustomAdvanced", "inputs": {
                "noise": [f"{key}_noise", 0], "guider": [t, i], "sampler": [f"{key}_sampler", 0],
                "sigmas": ["sig", 0], "latent_image": ["empty", 0]}}
            _preview_latent(g, key, [f"{key}_sca", 0])
        elif io_type == "SAMPLER":                  # an inversion sampler walks the sigmas upward
            g[f"{key}_noise"] = {"class_type": "DisableNoise", "inputs": {}}
            g[f"{key}_guider"] = {"class_type": "CFGGuider", "inputs": {
                "model": ["L", 0], "positive": ["pos", 0], "negative": ["neg", 0], "cfg": 1.0}}
            g[f"{key}_flip"] = {"class_type": "FlipSigmas", "inputs": {"sigmas": ["sig", 0]}}
            g[f"{key}_sca"] = {"class_type": "SamplerCustomAdvanced", "inputs": {
                "noise": [f"{key}_noise", 0], "guider": [f"{key}_guider", 0], "sampler": [t, i],
                "sigmas": [f"{key}_flip", 0], "latent_image": ["enc", 0]}}
            _preview_latent(g, key, [f"{key}_sca", 0])
        elif io_type == "LATENT":
            _preview_latent(g, key, [t, i])
        elif io_type == "IMAGE":
            g[f"{key}_out"] = {"class_type": "PreviewImage", "inputs": {"images": [t, i]}}
        elif io_type == "MASK":
            g[f"{key}_img"] = {"class_type": "MaskToImage", "inputs": {"mask": [t, i]}}
            g[f"{key}_out"] = {"class_type": "PreviewImage", "inputs": {"images": [f"{key}_img", 0]}}
        elif io_type == "TFG_LINEAR_AG_RECORDING":  # LinearAG Record: fit what its model output recorded
            model_out = outs.index("MODEL")
            g[f"{key}_fit"] = _pack_node("TFG_LinearAGFit", {"recording": [t, i], "samples": [f"c{model_out}_ks", 0]},
                                         filename="tfg_graph_record")
            _consume_coefficients(g, key, [f"{key}_fit", 0])
        elif io_type == "TFG_LINEAR_AG_COEFFICIENTS":
            _consume_coefficients(g, key, [t, i])
        elif io_type in ("SIGMAS", "NOISE"):
            pass                                    # only together with a LATENT (above)
        else:
            raise ValueError(f"node_graphs: no consumer for output {i} ({io_type}) of {node_id}; add one")


def _consume_coefficients(g: dict, key: str, link) -> None:
    g[f"{key}_lag"] = _pack_node("TFG_LinearAG", {"model": ["L", 0], "coefficients": link}, estimator="fitted")
    g[f"{key}_ks"] = _ksampler([f"{key}_lag", 0])
    _preview_latent(g, key, [f"{key}_ks", 0])


def target_graph(node_id: str, widgets: dict, *, family: str = "sd15", link: dict | None = None,
                 poison: dict | None = None, feed_optional=(), coefficients_name: str | None = None) -> dict:
    """The smallest graph around `node_id` (as TARGET) with these widget values.

    link: {widget name: kind} widgets fed by a core Primitive node (PRIMITIVES[kind]) holding the value instead;
    poison: {socket name: "nan" | "inf" | "-inf"} sockets whose tensor passes a testing-pack node that breaks it;
    feed_optional: optional sockets to connect besides NEEDED_OPTIONAL."""
    cls = pack_nodes()[node_id]
    g: dict = {}
    _base(g, family)
    inputs = {}
    asked = set(feed_optional) | set(poison or ())
    wanted_optional = set(asked)
    for group in NEEDED_OPTIONAL.get(node_id, ()):
        if not asked & set(group):
            wanted_optional.add(group[0])
    for name, io_type, optional in sockets(cls):
        if optional and name not in wanted_optional:
            continue
        link_to = _feed(g, node_id, name, io_type, coefficients_name)
        if poison and name in poison:
            g[f"poison_{name}"] = {"class_type": POISON_NODES[io_type],
                                   "inputs": {"value": link_to, "poison": poison[name]}}
            link_to = [f"poison_{name}", 0]
        inputs[name] = link_to
    for name, value in widgets.items():
        if link and name in link:
            g[f"prim_{name}"] = {"class_type": PRIMITIVES[link[name]], "inputs": {"value": value}}
            inputs[name] = [f"prim_{name}", 0]
        else:
            inputs[name] = value
    g[TARGET] = {"class_type": node_id, "inputs": inputs}
    _consume(g, node_id, outputs(cls))
    return g


def ensure_coefficients(server) -> str:
    """A LinearAG coefficients file in the server's models/tfg_linear_ag/ (fitted once on the tiny SD1.5 model,
    STEPS euler steps) so LinearAG Load lists it and LinearAG's coefficients input can be fed; its name."""
    name = server_first_option(server, "TFG_LinearAGLoad", "coefficients_name")
    if name is None:
        server.run_prompt(target_graph("TFG_LinearAGFit", schema_values("TFG_LinearAGFit",
                                                                        filename="tfg_test_coefficients")))
        name = server_first_option(server, "TFG_LinearAGLoad", "coefficients_name")
    assert name, "LinearAG Fit ran but LinearAG Load lists no coefficients file"
    return name


# ----------------------------------------------------------------------------------------------
# Server answers
# ----------------------------------------------------------------------------------------------

def node_error_texts(data: dict, node_key: str = TARGET) -> list[tuple[str | None, str]]:
    """[(input name or None, text)] of a 400 answer's node_errors for one node."""
    entry = (data.get("node_errors") or {}).get(node_key) or {}
    out = []
    for err in entry.get("errors", []):
        extra = err.get("extra_info") or {}
        text = " ".join(str(err.get(k, "")) for k in ("type", "message", "details"))
        out.append((extra.get("input_name"), text))
    return out


def names_input(data: dict, name: str, node_key: str = TARGET) -> bool:
    """True when the 400 answer says that this node's input `name` is wrong: ComfyUI's own checks set
    extra_info.input_name to the one input; a node's validate_inputs answer (custom_validation_failed) is repeated
    for every input it lists, so there the text itself must name the input."""
    import re
    pattern = re.compile(rf"(?<![\w]){re.escape(name)}(?![\w])")
    for err in ((data.get("node_errors") or {}).get(node_key) or {}).get("errors", []):
        extra = err.get("extra_info") or {}
        if err.get("type") == "custom_validation_failed":
            details = str(err.get("details", ""))
            problem = details.split(" - ", 1)[1] if " - " in details else ""
            if pattern.search(problem):
                return True
        elif extra.get("input_name") == name:
            return True
    return False


def execution_error(entry: dict) -> dict | None:
    """The execution_error message of a /history entry (None when the prompt did not fail)."""
    for kind, data in entry.get("status", {}).get("messages", []):
        if kind == "execution_error":
            return data
    return None


def value_texts(value) -> set[str]:
    """How a message may show a number."""
    out = {str(value), repr(value)}
    if isinstance(value, float):
        out.add(f"{value:g}")
        if math.isfinite(value) and value.is_integer():
            out.add(str(int(value)))
    return out
