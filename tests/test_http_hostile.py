"""Hostile inputs over HTTP on a real ComfyUI server, generated per node from the input declarations (issue 17.5).

- Every input that names a file (FileStem widgets, LinearAG Fit `filename`, LinearAG Load `coefficients_name`),
  typed and linked from a PrimitiveString, with traversal names (absolute, `..`, separators, reserved device
  names): a named error; no file appears outside the pack's folders of the server's base directory (tree compared
  before/after) nor anywhere else under the test's own names; an existing file is never overwritten silently.
- Every LATENT / IMAGE / MASK / CONDITIONING input of every pack node fed a tensor holding NaN or ±Inf (testing-pack
  nodes, tests/testing_pack/hostile.py): the run stops with an error naming the node and the input.
- The server stays up, and the next valid prompts' outputs (on the model the hostile prompts used, still cached)
  equal those from before the hostile prompts.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch

import node_graphs as ng
from headless_server import PACK_ROOT, executed_nodes

NODES = ng.pack_nodes()
MARK = "tfgescape" + uuid.uuid4().hex[:8]
"""In every hostile file name, to find anything written under one of them anywhere."""
PACK_FOLDERS = ("models/tfg_linear_ag",)
"""Where the pack may write under the server's base directory (ComfyUI itself writes output/, temp/, user/)."""
HOST_FOLDERS = ("output", "temp", "user")
REFERENCE_NODES = ("TFG_AdaptiveGuidance", "TFG_NegToMe", "TFG_StyleSSPFrequency")
TENSOR_TYPES = tuple(ng.POISON_NODES)
POISONS = ("nan", "inf", "-inf")


def _declaration(node_id: str):
    spec = ng.declaration(NODES[node_id])
    if spec is None:
        pytest.fail(f"{node_id} has no input declaration (INPUTS): its file and tensor inputs are not declared",
                    pytrace=False)
    return spec


# ----------------------------------------------------------------------------------------------
# Fixtures: the outside folder, the decoy file, the base tree and the reference outputs
# ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def outside():
    """A folder outside the server's base directory that hostile absolute names point into (must stay empty)."""
    path = Path(tempfile.mkdtemp(prefix="tfg_outside_"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def decoy(comfy_server) -> Path:
    """An existing .safetensors file outside the pack's folder (as a user's checkpoint would be)."""
    path = Path(comfy_server.base) / "models" / "checkpoints" / f"{MARK}_decoy.safetensors"
    path.write_bytes(b"decoy: must never be overwritten " + MARK.encode())
    return path


def _tree(base: Path) -> dict[str, tuple[int, int, str]]:
    """relative path -> (size, mtime_ns, sha1) of every file under base (symlinked folders not followed)."""
    out = {}
    for root, dirs, files in os.walk(base):
        for f in files:
            p = Path(root) / f
            try:
                st = p.stat()
            except OSError:
                continue
            digest = hashlib.sha1(p.read_bytes()).hexdigest() if st.st_size < (64 << 20) else ""
            out[str(p.relative_to(base))] = (st.st_size, st.st_mtime_ns, digest)
    return out


def _allowed(rel: str) -> bool:
    return rel == "server.log" or any(rel == f or rel.startswith(f + "/") for f in PACK_FOLDERS + HOST_FOLDERS)


def _marked_files(roots) -> list[str]:
    found = []
    for root in roots:
        for dirpath, dirs, files in os.walk(root):
            found += [os.path.join(dirpath, n) for n in files + dirs if MARK in n and "decoy" not in n]
    return found


def _reference_outputs(server, fresh: bool) -> dict:
    """{node id: (images, latents)} of the reference prompts. The model passes TFGTest_UncachedModel, so the pack
    node and everything after it run again while the loaded model stays cached (fresh: the cache is cleared
    first, as for the baseline); every decoded latent is also saved, so the comparison is exact."""
    if fresh:
        server.free(unload_models=False, free_memory=True)
    out = {}
    for node_id in REFERENCE_NODES:
        g = ng.target_graph(node_id, ng.schema_values(node_id))
        for node in list(g.values()):
            for k, v in node["inputs"].items():
                if v == ["L", 0]:
                    node["inputs"][k] = ["uncached", 0]
        g["uncached"] = {"class_type": "TFGTest_UncachedModel", "inputs": {"model": ["L", 0]}}
        for key, node in list(g.items()):
            if node["class_type"] == "VAEDecode":
                g[f"{key}_latent"] = {"class_type": "SaveLatent", "inputs": {
                    "samples": node["inputs"]["samples"], "filename_prefix": f"tfg_reference/{node_id}"}}
        entry = server.run_prompt(g, timeout=300)
        assert ng.TARGET in executed_nodes(entry), f"{node_id}: the reference prompt was served from the cache"
        images = server.image_arrays(entry)
        latents = [t for ts in server.latents_by_node(entry).values() for t in ts]
        assert images and latents, f"{node_id}: the reference prompt produced no image or latent"
        out[node_id] = (images, latents)
    return out


@pytest.fixture(scope="module")
def before(comfy_server, decoy, outside):
    """The base tree and the reference outputs before any hostile prompt."""
    ng.ensure_coefficients(comfy_server)
    return {"tree": _tree(Path(comfy_server.base)), "outputs": _reference_outputs(comfy_server, fresh=True),
            "decoy": decoy.read_bytes()}


# ----------------------------------------------------------------------------------------------
# File names
# ----------------------------------------------------------------------------------------------

def hostile_names(outside: Path, decoy: Path) -> list[str]:
    return [
        str(outside / f"{MARK}_abs"),                          # absolute, outside everything
        str(decoy.with_suffix("")),                            # absolute, onto an existing file (+ .safetensors)
        str(decoy),                                            # absolute, the existing file's full name
        f"../{MARK}_up1",                                      # out of the pack's folder
        f"../../{MARK}_up2",                                   # out of models/
        f"../checkpoints/{decoy.stem}",                        # onto the existing file, relatively
        f"../../custom_nodes/tfg_guidance/{MARK}_in_pack",     # into the pack's code
        f"sub/{MARK}_sep",                                     # separator
        f"sub\\{MARK}_backslash",                              # Windows separator
        f"C:{MARK}_drive",                                     # Windows drive-relative
        "..", ".", "", "CON", "nul", "com1", "LPT9", "aux.safetensors",
    ]


def _file_cases():
    cases = []
    for node_id, cls in NODES.items():
        spec = ng.declaration(cls)
        names = ng.file_inputs(node_id, spec) if spec is not None else \
            [n for (node, n) in ng.FILE_INPUTS if node == node_id]
        cases += [(node_id, name) for name in names]
    return cases


FILE_CASES = _file_cases()


def test_file_inputs_are_declared(comfy_host_path):
    """The known file inputs exist, so the traversal tests below cannot pass by finding nothing to test."""
    assert set(ng.FILE_INPUTS) <= set(FILE_CASES), f"file inputs not found on the nodes: " \
                                                   f"{sorted(set(ng.FILE_INPUTS) - set(FILE_CASES))}"


def _names_input_in_run(entry: dict, name: str) -> tuple[bool, str]:
    error = ng.execution_error(entry)
    if error is None:
        return False, "the run succeeded"
    text = str(error.get("exception_message", ""))
    if str(error.get("node_id")) != ng.TARGET:
        return False, f"failed in {error.get('node_type')} (node {error.get('node_id')}), not the node: {text[:300]}"
    if name not in text:
        return False, f"error does not name the input: {text[:300]}"
    return True, text


@pytest.mark.parametrize("node_id,name", FILE_CASES)
def test_traversal_file_names_typed_and_linked_are_refused(comfy_server, before, outside, decoy, node_id, name):
    spec = _declaration(node_id)
    valid = ng.quick_values(node_id, spec, comfy_server)
    failures = []
    for hostile in hostile_names(outside, decoy):
        # typed: refused before the run
        status, data = comfy_server.post_prompt(ng.target_graph(node_id, {**valid, name: hostile}))
        where = f"{spec.node} ({node_id}) input '{name}' = {hostile!r}"
        if status == 200:
            failures.append(f"{where} typed: accepted (HTTP 200)")
            comfy_server.history(data["prompt_id"], timeout=300)       # let it finish: the checks below see its files
        elif not ng.names_input(data, name):
            failures.append(f"{where} typed: HTTP {status} without naming the input: {ng.node_error_texts(data)}")
        # linked from a PrimitiveString: ComfyUI cannot check it before the run; the node must when it runs
        prompt = ng.target_graph(node_id, {**valid, name: hostile}, link={name: "string"})
        status, data = comfy_server.post_prompt(prompt)
        if status == 400:
            if not ng.names_input(data, name):
                failures.append(f"{where} linked: HTTP 400 without naming the input: {ng.node_error_texts(data)}")
            continue
        entry = comfy_server.run_prompt(prompt, check=False, timeout=300)
        ok, why = _names_input_in_run(entry, name)
        if not ok:
            failures.append(f"{where} linked: {why}")
    assert comfy_server.proc.poll() is None, "the server died"
    assert decoy.read_bytes() == before["decoy"], f"{spec.node}: the existing file {decoy} was overwritten"
    escaped = _marked_files([outside, Path(comfy_server.base), PACK_ROOT])
    assert not escaped, f"{spec.node} ({node_id}) input '{name}': files written outside the pack's folder: {escaped}"
    assert not failures, f"{len(failures)} hostile names not refused as they should be:\n" + "\n".join(failures)


def test_refitting_under_an_existing_name_never_overwrites_it(comfy_server, before):
    """Fit twice under one name (different ridge: different coefficients): the first file stays as it was."""
    _declaration("TFG_LinearAGFit")
    folder = Path(comfy_server.base) / PACK_FOLDERS[0]
    name = f"{MARK}_keep"
    first = ng.target_graph("TFG_LinearAGFit", ng.schema_values("TFG_LinearAGFit", filename=name, ridge=1e-6))
    comfy_server.run_prompt(first, timeout=300)
    written = sorted(p for p in folder.glob(f"{name}*"))
    assert len(written) == 1, f"LinearAG Fit wrote {written} for one fit"
    kept = written[0].read_bytes()
    second = ng.target_graph("TFG_LinearAGFit", ng.schema_values("TFG_LinearAGFit", filename=name, ridge=0.5))
    entry = comfy_server.run_prompt(second, check=False, timeout=300)
    assert written[0].read_bytes() == kept, f"LinearAG Fit silently overwrote {written[0].name}"
    after = sorted(p for p in folder.glob(f"{name}*"))
    if ng.execution_error(entry) is None:
        assert len(after) == 2, f"the second fit succeeded but no second file appeared: {after}"
        assert after[1].read_bytes() != kept, "the second fit (other ridge) wrote the same coefficients"


# ----------------------------------------------------------------------------------------------
# Non-finite tensors
# ----------------------------------------------------------------------------------------------

def _tensor_cases():
    cases = []
    for node_id, cls in NODES.items():
        for name, io_type, optional in ng.sockets(cls):
            if io_type in TENSOR_TYPES:
                cases.append((node_id, name, io_type))
    return cases


TENSOR_CASES = _tensor_cases()


@pytest.mark.parametrize("node_id,name,io_type", TENSOR_CASES)
def test_non_finite_tensor_inputs_stop_the_run_naming_node_and_input(comfy_server, before, node_id, name, io_type):
    spec = _declaration(node_id)
    poison = POISONS[TENSOR_CASES.index((node_id, name, io_type)) % len(POISONS)]
    declared = name in ng.finite_sockets(spec)
    values = ng.quick_values(node_id, spec, comfy_server)
    prompt = ng.target_graph(node_id, values, poison={name: poison})
    entry = comfy_server.run_prompt(prompt, check=False, timeout=300)
    assert comfy_server.proc.poll() is None, "the server died"
    ok, why = _names_input_in_run(entry, name)
    assert ok, (f"{spec.node} ({node_id}) input '{name}' ({io_type}) holding {poison}: {why}"
                f"{'' if declared else ' (the input is not declared finite=True)'}")
    assert spec.node in why or node_id in why, f"{node_id}: the error does not name the node: {why[:300]}"


# ----------------------------------------------------------------------------------------------
# Afterwards
# ----------------------------------------------------------------------------------------------

def test_after_the_hostile_prompts_the_server_is_up_nothing_escaped_and_outputs_are_unchanged(comfy_server, before,
                                                                                               outside):
    """Runs last in this file."""
    assert comfy_server.proc.poll() is None, "the server died"
    base = Path(comfy_server.base)
    old, new = before["tree"], _tree(base)
    added = sorted(p for p in set(new) - set(old) if not _allowed(p))
    changed = sorted(p for p in set(new) & set(old) if new[p] != old[p] and not _allowed(p))
    removed = sorted(p for p in set(old) - set(new) if not _allowed(p))
    assert not (added or changed or removed), (f"outside the pack's folders of {base}: added {added}, changed "
                                               f"{changed}, removed {removed}")
    assert not list(outside.iterdir()), f"files appeared in {outside}: {list(outside.iterdir())}"
    outputs = _reference_outputs(comfy_server, fresh=False)
    for node_id, (images, latents) in before["outputs"].items():
        new_images, new_latents = outputs[node_id]
        assert len(new_latents) == len(latents) and all(torch.equal(a, b) for a, b in zip(new_latents, latents)), \
            f"{node_id}: the valid prompt's latent changed after the hostile prompts"
        assert len(new_images) == len(images) and all(np.array_equal(a, b) for a, b in zip(new_images, images)), \
            f"{node_id}: the valid prompt's image changed after the hostile prompts"
