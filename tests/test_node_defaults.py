"""Every node runs with every input at its declared default (issue 18.1), in the smallest graph that feeds it
(tests/node_graphs.py: tiny SD1.5 model, 64 px images and latents, 4-step schedules; optional sockets unconnected
unless the node cannot run without them), over HTTP on a real ComfyUI server.

A default that cannot run on the tiny models on a CPU is not run: the test fails and says which and why."""
from __future__ import annotations

import pytest

import node_graphs as ng

NODES = ng.pack_nodes()
MAX_SIDE = 512
"""Largest image side a default may ask for here (pixels): the tiny UNet's attention at 2048² on a CPU needs tens of
GB; 512 is already 64x the pixels of the 64 px inputs."""


def cost_problem(node_id: str, values: dict) -> str | None:
    """Why these values are too expensive to run here (None when they are not), from the pack's own planning."""
    if isinstance(values.get("stages"), str):
        dh = ng.host.pack_module("kernels.diffusehigh")
        try:
            sizes = dh.plan_stages(values["stages"], (ng.SIZE, ng.SIZE))
        except (ValueError, TypeError):
            return None                   # not an absolute plan (e.g. a family-dependent 'auto'): let the node say
        big = [s for s in sizes if max(s) > MAX_SIDE]
        if big:
            return (f"stages default {values['stages']!r} asks for {' -> '.join(f'{w}x{h}' for w, h in sizes)} px "
                    f"from a {ng.SIZE} px image whatever the model (the SDXL schedule): more than {MAX_SIDE} px per "
                    f"side cannot run on the tiny models on a CPU, and is not a default that works on SD1.5 either")
    return None


@pytest.fixture(scope="module")
def coefficients(comfy_server) -> str:
    return ng.ensure_coefficients(comfy_server)


@pytest.mark.parametrize("node_id", list(NODES))
def test_node_runs_with_every_input_at_its_default(comfy_server, coefficients, node_id):
    spec = ng.declaration(NODES[node_id])
    assert spec is not None, f"{node_id} has no input declaration (INPUTS): its defaults are not declared in one place"
    values = ng.defaults(spec, comfy_server, node_id)
    problem = cost_problem(node_id, values)
    assert problem is None, f"{spec.node} ({node_id}) at its defaults cannot run here: {problem}"
    prompt = ng.target_graph(node_id, values, coefficients_name=coefficients)
    try:
        entry = comfy_server.run_prompt(prompt, check=False, timeout=600)
    except RuntimeError as e:
        pytest.fail(f"{spec.node} ({node_id}) at its defaults {values} is refused before the run: {str(e)[:2000]}",
                    pytrace=False)
    error = ng.execution_error(entry)
    assert error is None, (f"{spec.node} ({node_id}) at its defaults fails in {error.get('node_type')} (node "
                           f"{error.get('node_id')}): {error.get('exception_message')}\n  defaults: {values}")
    assert entry["status"]["status_str"] == "success"
