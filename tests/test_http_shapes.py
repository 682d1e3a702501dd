"""Oversize requests and mismatched shapes over HTTP on a real server (issue 17): each ends in an error naming the
node and what to change, before any large allocation; the server stays up and the next valid prompt runs."""
from __future__ import annotations

import node_graphs as ng
import pytest


def _run(server, prompt) -> tuple[dict, str]:
    entry = server.run_prompt(prompt, check=False, timeout=300)
    assert server.proc.poll() is None, "the server died"
    error = ng.execution_error(entry)
    return entry, "" if error is None else str(error.get("exception_message", ""))


def _declared_values(server, node_id: str, **overrides) -> dict:
    spec = ng.declaration(ng.pack_nodes()[node_id])
    return {**ng.quick_values(node_id, spec, server), **overrides}


@pytest.mark.parametrize("stages", ["16384x16384", "x256"])
def test_diffusehigh_stage_beyond_memory_is_refused_before_it_runs(comfy_server, stages):
    """A stage plan inside the declared ranges but far beyond this machine's memory: the memory estimate refuses it
    (naming the estimate and what is free) instead of an out-of-memory crash mid-run."""
    values = _declared_values(comfy_server, "TFG_DiffuseHighProgressive", stages=stages)
    entry, message = _run(comfy_server, ng.target_graph("TFG_DiffuseHighProgressive", values))
    assert entry.get("status", {}).get("status_str") != "success", entry
    assert "DiffuseHigh" in message and "needs about" in message and "is free" in message, message


def test_tale_mask_of_another_aspect_names_both_sizes(comfy_server):
    values = _declared_values(comfy_server, "TFG_TALEComposite", placement="mask")
    prompt = ng.target_graph("TFG_TALEComposite", values)
    # a placement mask 64x16 against the 64x64 background
    prompt["wrong_mask"] = {"class_type": "SolidMask", "inputs": {"value": 1.0, "width": 64, "height": 16}}
    prompt[ng.TARGET]["inputs"]["placement_mask"] = ["wrong_mask", 0]
    _, message = _run(comfy_server, prompt)
    assert "TALE" in message and "placement_mask" in message, message


def test_the_server_runs_a_valid_prompt_after_the_refusals(comfy_server):
    values = _declared_values(comfy_server, "TFG_AdaptiveGuidance")
    entry, message = _run(comfy_server, ng.target_graph("TFG_AdaptiveGuidance", values))
    assert not message and entry.get("status", {}).get("status_str") == "success", entry
