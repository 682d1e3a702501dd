"""NegToMe installation on a cloned ModelPatcher: UNet attention output patches, or DiT block replacements.

Both take `merge(tokens, cond_or_uncond, state, step, grid, into=None) -> tokens` (the per-layer NegToMe call
built by nodes/negtome.py) and the per-call info the APPLY_MODEL wrapper puts in transformer_options under
`info_key` ({"active", "step", "height", "width", "txt_len"}). Which layers and tokens are merged is decided by
kernels/negtome_span.py.
"""
from __future__ import annotations

from typing import Callable

import torch

from ..kernels.negtome_span import DIT_SLOTS, dit_blocks, dit_image_span, token_grid_of, unet_layer_selected
from . import adapters

Merge = Callable[..., torch.Tensor]


def dit_block_counts(model, family: adapters.ModelFamily, node_name: str) -> dict[str, int]:
    """Blocks of each kind of a Flux ({"double", "single"}) or SD3 ({"joint"}) model; a node error when the
    network lacks them."""
    net = model.get_model_object("diffusion_model")
    if family.key == "flux":
        double, single = getattr(net, "double_blocks", None), getattr(net, "single_blocks", None)
        if double is None or single is None:
            raise adapters.node_error(node_name, family, f"{type(net).__name__} has no double_blocks/single_blocks, "
                                                         "the patch points NegToMe needs.", "use a Flux model.")
        return {"double": len(double), "single": len(single)}
    joint = getattr(net, "joint_blocks", None)
    if joint is None:
        raise adapters.node_error(node_name, family, f"{type(net).__name__} has no joint_blocks, the patch points "
                                                     "NegToMe needs.", "use an SD3 MMDiT model.")
    return {"joint": len(joint)}


def install_unet(m, key: str, info_key: str, blocks: str, custom: frozenset | None, merge: Merge) -> None:
    """attn1 and attn2 output patches (after the output projection, before the residual add: the SDXL pipeline's
    placement), each selected layer merging its image tokens on active calls."""

    def attn_output_patch(n, extra_options):
        info = extra_options.get(info_key)
        if info is None or not info["active"]:
            return n
        grid = token_grid_of(extra_options.get("original_shape"), n.shape[1])
        if not unet_layer_selected(extra_options.get("block"), grid, blocks, custom):
            return n
        state = adapters.run_state({"transformer_options": extra_options}, key)
        return merge(n, extra_options.get("cond_or_uncond", [0]), state, info["step"], grid)

    m.set_model_attn1_output_patch(attn_output_patch)
    m.set_model_attn2_output_patch(attn_output_patch)


def install_dit(m, key: str, info_key: str, family: adapters.ModelFamily, counts: dict[str, int],
                custom: frozenset | None, merge: Merge, node_name: str) -> None:
    """One `dit` block replacement per selected block (chained to any previous occupant of the slot): for the
    duration of that block only, an `optimized_attention_override` edits the image-token span of the joint
    attention output (before the output projection: the Flux pipeline's placement)."""
    arch = "flux" if family.key == "flux" else "sd3"
    replace = m.model_options.get("transformer_options", {}).get("patches_replace", {}).get("dit", {})
    net = m.get_model_object("diffusion_model")
    patch_size = int(getattr(net, "patch_size", 2))

    def make_block_patch(kind: str, slot: str, index: int, previous):
        def block_patch(args, extra):
            to = args.get("transformer_options") or {}
            info = to.get(info_key)
            call = previous if previous is not None else (lambda a, e: e["original_block"](a))
            if info is None or not info["active"]:
                return call(args, extra)
            state = adapters.run_state({"transformer_options": to}, key)
            txt = args.get("txt")
            span = dit_image_span(kind, args["img"].shape[1], None if txt is None else txt.shape[1],
                                  info["txt_len"], info["height"], info["width"], patch_size)
            calls = [0]
            prev_override = to.get("optimized_attention_override")

            def override(func, *a, **kw):
                out = prev_override(func, *a, **kw) if prev_override is not None else func(*a, **kw)
                calls[0] += 1
                if calls[0] != 1 or not span.matches(tuple(out.shape)):
                    return out  # e.g. SD3.5's extra image self-attention: not a joint attention output
                start, stop = span.start, span.start + span.length
                img = out[:, start:stop]
                result = torch.empty_like(out, memory_format=torch.contiguous_format)
                merged = merge(img, to.get("cond_or_uncond", [0]), state, info["step"], span.grid,
                               into=result[:, start:stop])  # written in place: no concatenation copy
                if merged is img:
                    return out
                result[:, :start] = out[:, :start]
                result[:, stop:] = out[:, stop:]
                return result

            new_args = {**args, "transformer_options": {**to, "optimized_attention_override": override}}
            result = call(new_args, extra)
            if calls[0] == 0:
                raise adapters.node_error(
                    node_name, family, f"{DIT_SLOTS[kind]} {index} ran no attention through optimized_attention, "
                                       "so NegToMe cannot reach its attention output.",
                    "report this with your ComfyUI version.")
            return result
        return block_patch

    for kind, index in dit_blocks(arch, counts, custom):
        slot = DIT_SLOTS[kind]
        previous = replace.get((slot, index))
        m.set_model_patch_replace(make_block_patch(kind, slot, index, previous), "dit", slot, index)
