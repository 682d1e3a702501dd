"""Generate the node help pages web/docs/<node id>.md, which ComfyUI's node help panel shows.

The frontend fetches `/extensions/<pack folder>/docs/<node id>/<locale>.md`, then `/extensions/<pack folder>/docs/
<node id>.md`, from the pack's WEB_DIRECTORY (web/). Each page is built from one source per fact:
- what the node does, its families and cost: the node's schema description (nodes/*.py);
- the input table: the node's declarations (`NodeClass.INPUTS.markdown_table()`, nodes/inputs.py), so defaults,
  ranges, neutral and paper values are never typed twice; a node not yet on nodes/inputs.py gets a table from its
  V3 schema, marked as such;
- the outputs: the schema's outputs;
- the example workflows: the shipped workflows/*.json that use the node (found by scanning them);
- a short hand-written part (the summary and the faithful/improved modes): NOTES below.

    python tools/gen_docs.py            # write web/docs/*.md (and delete pages of nodes that no longer exist)
    python tools/gen_docs.py --check    # exit 1 if a committed page differs from what would be generated

Needs a ComfyUI host (COMFYUI_PATH, or see tools/host.py); tests/test_docs.py runs the --check comparison.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCS_DIR = ROOT / "web" / "docs"
WORKFLOWS_DIR = ROOT / "workflows"
REPO_URL = "https://github.com/tfg-nodes/trainfree-guidance/blob/main"

# Per technique page under docs/ (the detail: limitations, measured figures, design notes).
TECHNIQUE_PAGES = {
    "adaptive_guidance": "adaptive-guidance.md", "linear_ag": "linear-ag.md", "negtome": "negtome.md",
    "diffusehigh": "diffusehigh.md", "asg": "asg.md", "inversion": "inversion.md", "stylessp": "stylessp.md",
    "tale": "tale.md",
}

# The hand-written part: (in short, faithful vs improved). Everything else on a page is generated.
NOTES = {
    "TFG_AdaptiveGuidance": (
        "Faster sampling: stops paying for the unconditional pass once guidance no longer changes the result. "
        "Patch a MODEL for KSampler.",
        "Faithful: `space` eps and `crossing_step` cond are the paper's rule. Improved (defaults): the cosine is "
        "measured on x0 (eps latches at the first step on real models) and each image of a batch latches on its "
        "own (`decision` per_sample)."),
    "TFG_AdaptiveGuider": (
        "Adaptive Guidance as a GUIDER for SamplerCustomAdvanced (same rule and inputs as Adaptive Guidance).",
        "As Adaptive Guidance: eps / cond is the paper's rule; x0 and per-sample latching are the pack's defaults."),
    "TFG_LinearAGRecord": (
        "Step 1 of the fitted LinearAG: records the cond/uncond predictions of ordinary CFG runs.",
        "Faithful: the paper fits its per-step regression on such recordings; nothing here changes the sampling."),
    "TFG_LinearAGFit": (
        "Step 2 of the fitted LinearAG: fits the per-step affine coefficients and saves them under "
        "models/tfg_linear_ag/.",
        "Faithful: least squares per step over all pixels, as in the paper."),
    "TFG_LinearAGLoad": (
        "Step 3 of the fitted LinearAG: loads saved coefficients for LinearAG (TFG) with estimator fitted.",
        "No modes: the file's metadata (family, sampler, schedule, steps) is checked against the run."),
    "TFG_LinearAG": (
        "Faster sampling than Adaptive Guidance: the unconditional pass is also replaced by an estimate on "
        "alternating early steps. Patch a MODEL for KSampler.",
        "Faithful: `estimator` fitted (needs Record → Fit → Load). Improved (default): extrapolate_delta, online "
        "with no fitting."),
    "TFG_LinearAGGuider": (
        "LinearAG as a GUIDER for SamplerCustomAdvanced (same rule and inputs as LinearAG).",
        "As LinearAG: fitted is the paper's estimator; extrapolate_delta (default) needs no fitting."),
    "TFG_NegToMe": (
        "More varied batches: images of one batch push their matching features apart. Sample a batch of 2 or "
        "more with one seed.",
        "Faithful: the reference is image 0 of the batch (the official code). Improved: match against all other "
        "images of the batch."),
    "TFG_NegToMeReference": (
        "Keep away from (or, with alpha < 0, toward) a reference image you give, e.g. to avoid copying it.",
        "Faithful: the official matching and blocks; the options beyond them are marked in the input table."),
    "TFG_DiffuseHigh": (
        "Higher resolution from a base image: upscale, sharpen, re-noise and denoise once at the target size.",
        "Faithful: the official SDXL settings (t = 281 of 1000, CFG 10, DWT low-frequency guidance)."),
    "TFG_DiffuseHighProgressive": (
        "DiffuseHigh in several stages (e.g. 2x then 3x then 4x) from one base image.",
        "Faithful: the official stage schedule where the family has one; `auto` stages follow the detected "
        "family."),
    "TFG_DiffuseHighGuidance": (
        "The DiffuseHigh structure guidance alone, as a model patch for your own img2img pass.",
        "Faithful: the official low-frequency (DWT) replacement during the first steps."),
    "TFG_ASGDiffusion": (
        "Text-to-image at an integer multiple of the model's size without repeated objects (a sampler of its "
        "own).",
        "Faithful: ASGDiffusion on its CutDiffusion base as published; the options beyond it are marked in the "
        "input table."),
    "TFG_InversionSampler": (
        "DDIM inversion (optionally with ReNoise) as a SAMPLER for SamplerCustomAdvanced.",
        "Faithful (defaults): the official StyleSSP inversion (ReNoise 1, reference averaging, regulariser)."),
    "TFG_Inversion": (
        "Inverts an image's latent to noise along a schedule, for StyleSSP and other editing.",
        "Faithful (defaults): the official StyleSSP inversion; plain DDIM inversion with renoise_steps 0."),
    "TFG_StyleSSPFrequency": (
        "StyleSSP's frequency manipulation of an inverted latent alone.",
        "Faithful (`mode` faithful): the official 3-D FFT band mask. Improved: per-channel 2-D low-frequency "
        "reduction."),
    "TFG_StyleSSPStartPoint": (
        "Style transfer: builds the sampling start point from the content image's inversion; attach your style "
        "adapter to the sampler.",
        "Faithful (defaults): the official frequency manipulation and resume schedule. Improved: `mode` "
        "improved, `schedule` inversion."),
    "TFG_TALEComposite": (
        "Insert an object from one image into another (e.g. a photo object into a painting) in the target's "
        "style.",
        "Faithful: `energy` clip with the released code's choices (`style_gradient` detached, `history` and "
        "`trajectories` as released). Improved (defaults): no gradients, or a latent energy; fixed style "
        "gradient."),
    "TFG_DigitsModel": (
        "Loads the pack's shipped 2 MB digits model, to try every technique without downloading a checkpoint.",
        "Not a technique: a demonstration model (8x8 digits, class-conditional)."),
    "TFG_DigitsImage": (
        "Turns a sampled digits latent into an IMAGE for SaveImage or PreviewImage.",
        "Not a technique: a viewer for the digits model's samples."),
}

# Combo inputs whose options ComfyUI lists at run time (machine- or version-dependent): shown as this text.
RUNTIME_OPTIONS = {
    "coefficients_name": "the files in models/tfg_linear_ag/",
    "scheduler": "ComfyUI's schedulers",
    "sampler_name": "ComfyUI's samplers",
}


# ----------------------------------------------------------------------------------------------
# Loading the pack's nodes
# ----------------------------------------------------------------------------------------------

def _tests_host():
    spec = importlib.util.spec_from_file_location("tfg_tests_host", ROOT / "tests" / "host.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def pack_nodes(comfy_path: str | None = None) -> dict:
    """node id -> node class, in the extension's order."""
    host = _tests_host()
    root = Path(comfy_path) if comfy_path else host.find_comfyui()
    if root is None:
        raise SystemExit("gen_docs: no ComfyUI host (set COMFYUI_PATH or run `python tools/host.py`)")
    host.setup_inprocess_comfyui(root)
    return host.module_node_classes(host.load_pack())


# ----------------------------------------------------------------------------------------------
# One page
# ----------------------------------------------------------------------------------------------

def _cell(text) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def declared_table(cls) -> str:
    """The declared input table, with run-time option lists replaced by a fixed description (so the page does
    not depend on the machine's files or the ComfyUI version)."""
    declared = cls.INPUTS
    widget_type = type(declared.widgets[0]) if declared.widgets else None
    items = []
    for item in declared.items:
        if widget_type is not None and isinstance(item, widget_type) and item.kind == "combo" \
                and callable(item.options):
            if item.field is not None and declared.defaults is not None:
                default = declared.default(item)
            else:
                default = "(the first listed)"
            item = dataclasses.replace(item, options=(RUNTIME_OPTIONS.get(item.name, "listed at run time"),),
                                       default=default)
        items.append(item)
    stable = dataclasses.replace(declared, items=items, rules=[])
    return stable.markdown_table()


def schema_table(schema) -> str:
    """Inputs read from the V3 schema, for a node that is not on nodes/inputs.py yet."""
    rows = ["| input | default | allowed | neutral | paper | what it does |", "|---|---|---|---|---|---|"]
    for item in schema.inputs:
        io_type = getattr(item, "io_type", "")
        default = getattr(item, "default", None)
        lo, hi = getattr(item, "min", None), getattr(item, "max", None)
        options = getattr(item, "options", None)
        if options and not callable(options):
            allowed = ", ".join(map(str, options))
        elif lo is not None or hi is not None:
            allowed = f"{'' if lo is None else lo} – {'' if hi is None else hi}"
        else:
            allowed = "—"
        kind = f"`{default}`" if default is not None else f"link: {io_type}"
        optional = " (optional)" if getattr(item, "optional", False) else ""
        rows.append(f"| `{item.id}` | {kind} | {_cell(allowed)} | — | — | "
                    f"{_cell(getattr(item, 'tooltip', '') or '')}{optional} |")
    return "\n".join(rows)


def workflows_using(node_id: str) -> list[str]:
    found = []
    for path in sorted(WORKFLOWS_DIR.glob("*.json")) + sorted((WORKFLOWS_DIR / "extras").glob("*.json")):
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except ValueError:
            continue
        if any(n.get("type") == node_id for n in data.get("nodes", [])):
            found.append(path.relative_to(ROOT).as_posix())
    return found


def page(node_id: str, cls) -> str:
    schema = cls.GET_SCHEMA()
    summary, modes = NOTES.get(node_id, ("", ""))
    lines = [f"# {schema.display_name}", "", f"`{node_id}` · category `{schema.category}`", ""]
    if summary:
        lines += [f"**In short:** {summary}", ""]
    lines += ["## What it does", "", (schema.description or "").strip(), ""]
    if modes:
        lines += ["## Faithful and improved", "", modes, ""]
    lines += ["## Inputs", ""]
    if hasattr(cls, "INPUTS"):
        lines += [declared_table(cls), ""]
    else:
        lines += ["*(Read from the node's V3 schema: this node is not on the pack's input declarations yet, so "
                  "neutral and paper values are missing.)*", "", schema_table(schema), ""]
    if schema.outputs:
        lines += ["## Outputs", "", "| output | type | what it is |", "|---|---|---|"]
        for out in schema.outputs:
            name = getattr(out, "display_name", None) or out.io_type
            lines.append(f"| {_cell(name)} | {out.io_type} | {_cell(getattr(out, 'tooltip', '') or '')} |")
        lines.append("")
    workflows = workflows_using(node_id)
    if workflows:
        lines += ["## Example workflows", "",
                  "In ComfyUI: Templates → Extensions → this pack. In the repository:", ""]
        lines += [f"- [{w}]({REPO_URL}/{w})" for w in workflows]
        lines.append("")
    technique = cls.__module__.rsplit(".", 1)[-1]
    if technique in TECHNIQUE_PAGES:
        lines += [f"More (limitations, measured figures): [docs/{TECHNIQUE_PAGES[technique]}]"
                  f"({REPO_URL}/docs/{TECHNIQUE_PAGES[technique]})", ""]
    return "\n".join(lines).rstrip() + "\n"


def generate(comfy_path: str | None = None) -> dict[str, str]:
    """{file name: text} for every node of the pack."""
    return {f"{node_id}.md": page(node_id, cls) for node_id, cls in pack_nodes(comfy_path).items()}


def _say(line: str) -> None:
    sys.stdout.write(line + "\n")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="compare with web/docs/ instead of writing")
    parser.add_argument("--comfyui", default=os.environ.get("COMFYUI_PATH"), help="ComfyUI checkout")
    args = parser.parse_args(argv)
    pages = generate(args.comfyui)
    existing = {p.name for p in DOCS_DIR.glob("*.md")} if DOCS_DIR.is_dir() else set()
    stale = sorted(existing - set(pages))
    differ = sorted(n for n, text in pages.items()
                    if not (DOCS_DIR / n).is_file() or (DOCS_DIR / n).read_text(encoding="utf-8") != text)
    if args.check:
        for name in differ:
            _say(f"web/docs/{name}: differs from the generator's output (run python tools/gen_docs.py)")
        for name in stale:
            _say(f"web/docs/{name}: no such node any more")
        return 1 if differ or stale else 0
    DOCS_DIR.mkdir(parents=True, exist_ok=True)
    for name in differ:
        (DOCS_DIR / name).write_text(pages[name], encoding="utf-8")
    for name in stale:
        (DOCS_DIR / name).unlink()
    missing = sorted(n for n in pages if n[:-3] not in NOTES)
    _say(f"web/docs: {len(pages)} pages, {len(differ)} written, {len(stale)} removed"
          + (f"; no hand-written part for {', '.join(missing)}" if missing else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
