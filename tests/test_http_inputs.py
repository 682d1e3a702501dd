"""Every widget input of every node, over HTTP on a real ComfyUI server, generated from the input declarations
(issue 13.3): out-of-range, wrongly typed and unknown values are refused with HTTP 400 before anything runs, naming
the node and the input; every numeric (and switch and text) input linked from a core Primitive node is accepted
and the node runs, and a linked value out of range stops the run in that node naming the input; the server stays
up and the next valid prompt runs.

A node without a declaration (`INPUTS`, nodes/inputs.py) fails here: every node must have one."""
from __future__ import annotations

import pytest

import node_graphs as ng

NODES = ng.pack_nodes()
NODE_IDS = list(NODES)
WRONG_TYPE = "not-a-number"
UNKNOWN_CHOICE = "tfg-no-such-option"


def _declaration(node_id: str):
    spec = ng.declaration(NODES[node_id])
    if spec is None:
        pytest.fail(f"{node_id} has no input declaration (INPUTS = inputs.NodeInputs(...) and validate_inputs = "
                    f"INPUTS.validator()): its inputs cannot be checked from one place", pytrace=False)
    return spec


@pytest.fixture(scope="module")
def coefficients(comfy_server) -> str:
    return ng.ensure_coefficients(comfy_server)


def invalid_cases(spec) -> list[tuple]:
    """(widget, what, value) for every widget: numbers above max / below min / as text, unknown choices."""
    cases = []
    for w in spec.widgets:
        if w.kind in ("int", "float"):
            if w.max is not None:
                cases.append((w, "above max", int(w.max) + 1 if w.kind == "int" else float(w.max) + 1.0))
            if w.min is not None:
                cases.append((w, "below min", int(w.min) - 1 if w.kind == "int" else float(w.min) - 1.0))
            cases.append((w, "wrong type", WRONG_TYPE))
        elif w.kind == "combo":
            cases.append((w, "unknown choice", UNKNOWN_CHOICE))
    return cases


def _cancel(server, data: dict) -> None:
    """A prompt that should have been refused was queued: take it out again (or stop it) so it runs no further."""
    import requests
    pid = data.get("prompt_id")
    if pid:
        requests.post(f"{server.url}/queue", json={"delete": [pid]}, timeout=10)
        requests.post(f"{server.url}/interrupt", timeout=10)


@pytest.mark.parametrize("node_id", NODE_IDS)
def test_invalid_widget_values_are_refused_before_the_run(comfy_server, coefficients, node_id):
    spec = _declaration(node_id)
    valid = ng.quick_values(node_id, spec, comfy_server)
    cases = invalid_cases(spec)
    failures = []
    for w, what, value in cases:
        prompt = ng.target_graph(node_id, {**valid, w.name: value}, coefficients_name=coefficients)
        status, data = comfy_server.post_prompt(prompt)
        where = f"{spec.node} ({node_id}) input '{w.name}' {what} ({value!r})"
        if status != 400:
            failures.append(f"{where}: HTTP {status}, not 400 (queued: it would reach execution)")
            _cancel(comfy_server, data)
            continue
        if ng.TARGET not in (data.get("node_errors") or {}):
            failures.append(f"{where}: node_errors do not name the node: {str(data)[:600]}")
            continue
        if not ng.names_input(data, w.name):
            failures.append(f"{where}: the error does not name the input: {ng.node_error_texts(data)}")
            continue
        texts = " ".join(t for _, t in ng.node_error_texts(data))
        if not any(v in texts for v in ng.value_texts(value)):
            failures.append(f"{where}: the error does not show the value: {texts[:400]}")
    assert not failures, f"{len(failures)} of {len(cases)} invalid values not refused as they should be:\n" + \
        "\n".join(failures)


@pytest.mark.parametrize("node_id", NODE_IDS)
def test_inputs_linked_from_primitives_are_accepted_and_run(comfy_server, coefficients, node_id):
    """Every numeric input from PrimitiveInt / PrimitiveFloat, and every switch and text input from
    PrimitiveBoolean / PrimitiveString, in one prompt: accepted, and the node runs."""
    spec = _declaration(node_id)
    values = ng.quick_values(node_id, spec, comfy_server)
    link = {w.name: w.kind for w in spec.widgets if w.kind in ng.PRIMITIVES}
    prompt = ng.target_graph(node_id, values, link=link, coefficients_name=coefficients)
    try:
        entry = comfy_server.run_prompt(prompt, check=False, timeout=300)
    except RuntimeError as e:
        pytest.fail(f"{spec.node} ({node_id}) with {sorted(link)} linked from Primitive nodes: refused "
                    f"before the run: {str(e)[:2000]}", pytrace=False)
    error = ng.execution_error(entry)
    assert error is None, (f"{spec.node} ({node_id}) with {sorted(link)} linked: the run failed in "
                           f"{error.get('node_type')} (node {error.get('node_id')}): {error.get('exception_message')}")
    assert entry["status"]["status_str"] == "success"
    assert comfy_server.proc.poll() is None, "the server died"


@pytest.mark.parametrize("node_id", NODE_IDS)
def test_linked_out_of_range_values_stop_the_run_naming_the_input(comfy_server, coefficients, node_id):
    """A linked value passes validation (ComfyUI hands None) and must be checked when the node executes: each
    numeric input linked from a Primitive holding a value out of its range (below min, else above max) stops the
    run in this node with an error naming the input and the value."""
    spec = _declaration(node_id)
    valid = ng.quick_values(node_id, spec, comfy_server)
    cases = []
    for w in ng.numeric_widgets(spec):
        if w.min is not None:                  # below min first: a seed's max is beyond PrimitiveInt's own range
            cases.append((w, int(w.min) - 1 if w.kind == "int" else float(w.min) - 1.0))
        elif w.max is not None:
            cases.append((w, int(w.max) + 1 if w.kind == "int" else float(w.max) + 1.0))
    if not cases:
        pytest.skip(f"{node_id} has no numeric input with a range")
    prompts = [ng.target_graph(node_id, {**valid, w.name: value}, link={w.name: w.kind},
                               coefficients_name=coefficients) for w, value in cases]
    try:
        entries = comfy_server.run_prompts(prompts, check=False, timeout=300)
    except RuntimeError as e:
        pytest.fail(f"{spec.node} ({node_id}): a prompt with a linked numeric input was refused before the run: "
                    f"{str(e)[:2000]}", pytrace=False)
    failures = []
    for (w, value), entry in zip(cases, entries):
        error = ng.execution_error(entry)
        where = f"{spec.node} ({node_id}) input '{w.name}' linked = {value!r}"
        if error is None:
            failures.append(f"{where}: the run succeeded (the linked value is not checked at execute)")
            continue
        text = str(error.get("exception_message", ""))
        if str(error.get("node_id")) != ng.TARGET:
            failures.append(f"{where}: failed in {error.get('node_type')}, not in the node: {text[:300]}")
        elif w.name not in text or not any(v in text for v in ng.value_texts(value)):
            failures.append(f"{where}: the error does not name the input and the value: {text[:300]}")
    assert comfy_server.proc.poll() is None, "the server died"
    assert not failures, f"{len(failures)} of {len(cases)} linked out-of-range values not stopped:\n" + \
        "\n".join(failures)


def test_every_pack_node_has_an_input_declaration(comfy_host_path):
    assert NODES, "no pack nodes found (no ComfyUI host?)"
    missing = [n for n, cls in NODES.items() if ng.declaration(cls) is None]
    assert not missing, f"{len(missing)} of {len(NODES)} nodes have no INPUTS declaration: {missing}"


def test_the_server_stays_up_and_the_next_valid_prompt_runs(comfy_server):
    """Runs after the refused prompts above (file order)."""
    assert comfy_server.proc.poll() is None, "the server died during the invalid-input tests"
    prompt = ng.target_graph("TFG_AdaptiveGuidance", ng.schema_values("TFG_AdaptiveGuidance"))
    entry = comfy_server.run_prompt(prompt, timeout=300)
    assert entry["status"]["status_str"] == "success"
    assert comfy_server.image_arrays(entry), "the valid prompt produced no image"
