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


DIT_BLOCK_LISTS = {
    "flux": {"double": "double_blocks", "single": "single_blocks"},
    "chroma": {"double": "double_blocks", "single": "single_blocks"},
    "hunyuan_video": {"double": "double_blocks", "single": "single_blocks"},
    "sd3": {"joint": "joint_blocks"},
    "wan": {"block": "blocks"},
    "ltxv": {"block": "transformer_blocks"},
    "qwen_image": {"block": "transformer_blocks"},
}
"""The network attribute holding each block kind's blocks, per DiT family key."""

DIT_FAMILIES = tuple(DIT_BLOCK_LISTS)


def dit_block_counts(model, family: adapters.ModelFamily, node_name: str) -> dict[str, int]:
    """Blocks of each kind of a DiT (e.g. Flux {"double", "single"}, SD3 {"joint"}, Wan {"block"}); a node error
    when the network lacks them."""
    net = model.get_model_object("diffusion_model")
    lists = DIT_BLOCK_LISTS.get(family.key)
    if lists is None:
        raise adapters.node_error(node_name, family, "this family has no DiT block layout NegToMe knows.",
                                  "use a supported family or remove this node.")
    counts = {}
    for kind, attr in lists.items():
        blocks = getattr(net, attr, None)
        if blocks is None:
            raise adapters.node_error(node_name, family, f"{type(net).__name__} has no {attr}, the patch points "
                                                         "NegToMe needs.", f"use a {family.name} model of "
                                                         "ComfyUI's own architecture (or report it).")
        counts[kind] = len(blocks)
    return counts


def patch_size_of(net, family: adapters.ModelFamily):
    """The network's patch size: an int (h = w) or a (t, h, w) tuple; LTX-Video's lives on its patchifier."""
    if family.key == "ltxv":
        patchifier = getattr(net, "patchifier", None)
        return tuple(getattr(patchifier, "patch_size", (1, 1, 1)))
    size = getattr(net, "patch_size", 2)
    return tuple(size) if isinstance(size, (tuple, list)) else int(size)


def install_unet(m, key: str, info_key: str, blocks: str, custom: frozenset | None, merge: Merge) -> None:
    """attn1 and attn2 output patches (after the output projection, before the residual add: the SDXL pipeline's
    placement), each selected layer merging its image tokens on active calls."""

    layers: dict = {}  # (latent h, w, tokens, block) -> (grid, selected): pure rules, asked once per layer shape

    def attn_output_patch(n, extra_options):
        info = extra_options.get(info_key)
        if info is None or not info["active"]:
            return n
        shape, block = extra_options.get("original_shape"), extra_options.get("block")
        layer = (None if shape is None else (int(shape[-2]), int(shape[-1])), n.shape[1],
                 None if block is None else tuple(block))
        known = layers.get(layer)
        if known is None:
            if len(layers) > 4096:
                layers.clear()
            grid = token_grid_of(shape, n.shape[1])
            known = layers[layer] = (grid, unet_layer_selected(block, grid, blocks, custom))
        grid, selected = known
        if not selected:
            return n
        state = adapters.run_state({"transformer_options": extra_options}, key)
        return merge(n, extra_options.get("cond_or_uncond", [0]), state, info["step"], grid)

    m.set_model_attn1_output_patch(attn_output_patch)
    m.set_model_attn2_output_patch(attn_output_patch)


def install_dit(m, key: str, info_key: str, family: adapters.ModelFamily, counts: dict[str, int],
                custom: frozenset | None, merge: Merge, node_name: str) -> None:
    """One `dit` block replacement per selected block (chained to any previous occupant of the slot): for the
    duration of that block only, an `optimized_attention_override` edits the image-token span of the block's
    first attention output (the joint attention, or Wan/LTX-Video's image self-attention), before the output
    projection: the Flux pipeline's placement."""
    arch = family.key
    replace = m.model_options.get("transformer_options", {}).get("patches_replace", {}).get("dit", {})
    patch_size = patch_size_of(m.get_model_object("diffusion_model"), family)

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
                                  info["txt_len"], info["height"], info["width"], patch_size, info.get("frames"),
                                  arch)
            calls = [0]
            prev_override = to.get("optimized_attention_override")

            def override(func, *a, **kw):
                out = prev_override(func, *a, **kw) if prev_override is not None else func(*a, **kw)
                calls[0] += 1
                if calls[0] != 1 or not span.matches(tuple(out.shape)):
                    return out  # e.g. SD3.5's extra image self-attention: not a joint attention output
                start, length, total = span.start, span.length, out.shape[1]
                img = out.narrow(1, start, length)
                result = torch.empty_like(out, memory_format=torch.contiguous_format)
                merged = merge(img, to.get("cond_or_uncond", [0]), state, info["step"], span.grid,
                               into=result.narrow(1, start, length))  # written in place: no concatenation copy
                if merged is img:
                    return out
                if start:  # the other tokens, copied only where there are some (narrow: no indexing overhead)
                    result.narrow(1, 0, start).copy_(out.narrow(1, 0, start))
                if start + length < total:
                    rest = total - start - length
                    result.narrow(1, start + length, rest).copy_(out.narrow(1, start + length, rest))
                return result

            new_args = {**args, "transformer_options": {**to, "optimized_attention_override": override}}
            result = call(new_args, extra)
            if calls[0] == 0:
                raise adapters.node_error(
                    node_name, family, f"{DIT_SLOTS[kind]} {index} ran no attention through optimized_attention "
                                       "with the block's transformer_options (e.g. Wan 2.2 S2V's blocks do not pass "
                                       "them on), so NegToMe cannot reach its attention output.",
                    "remove NegToMe for this model, or report this with your ComfyUI version.")
            return result
        return block_patch

    for kind, index in dit_blocks(arch, counts, custom):
        slot = DIT_SLOTS[kind]
        previous = replace.get((slot, index))
        m.set_model_patch_replace(make_block_patch(kind, slot, index, previous), "dit", slot, index)
