"""Which attention layers NegToMe acts on, and which tokens of a layer's output are the image tokens it merges.

Pure rules (no torch maths, no ComfyUI): the nodes ask them per layer call.

* UNets (SD1.x/SD2.x/SDXL): a layer is selected by its block (`("output", 3)`) and its token grid. The paper's
  preset is the SDXL pipeline's: output blocks whose token grid is at least `PAPER_UNET_MIN_GRID` on both sides.
* DiTs: every block of the family, or a custom list; within a block, the image (or video) tokens are one contiguous
  span of the block's first attention output (`dit_image_span`): the joint [txt, img] attention of Flux/Chroma
  double blocks, SD3/SD3.5 joint blocks and Qwen-Image blocks; [img, txt] of HunyuanVideo double blocks; the
  [txt, img] / [img, txt] input of Flux/Chroma / HunyuanVideo single blocks; the image self-attention of Wan and
  LTX-Video blocks. Video tokens are frames x h x w per clip (frame-major), all in one span.
"""
from __future__ import annotations

from dataclasses import dataclass

from .negtome import PAPER_UNET_MIN_GRID, parse_block_list, token_grid

BLOCK_NAMES = {"unet": ("input", "middle", "output"), "flux": ("double", "single"), "sd3": ("joint",),
               "chroma": ("double", "single"), "hunyuan_video": ("double", "single"), "wan": ("block",),
               "ltxv": ("block",), "qwen_image": ("block",)}
"""Block names a custom list may use, per architecture (the pack's family key for DiTs)."""

DIT_SLOTS = {"double": "double_block", "single": "single_block", "joint": "double_block", "block": "double_block"}
"""ComfyUI's `dit` patch slot of each block kind (SD3's joint blocks, and the single block list of Wan, LTX-Video
and Qwen-Image, use the double_block slot)."""

IMAGE_FIRST = frozenset({"hunyuan_video", "wan", "ltxv"})
"""Architectures whose block attention puts the image tokens first (HunyuanVideo's [img, txt]; the image
self-attention of Wan and LTX-Video); the others put the text first."""


def custom_block_problems(text: str, arch: str, counts: dict[str, int]) -> list[str]:
    """Problems of a custom block list for an architecture ("unet", "flux", "sd3") whose DiT blocks number
    `counts` ({} for UNets, whose block depth is not checked). [] when the list can be used."""
    try:
        wanted = parse_block_list(text)
    except ValueError as e:
        return [str(e)]
    if not wanted:
        return ["custom_blocks is empty; write e.g. 'output.3-5'"]
    names = BLOCK_NAMES[arch]
    problems = []
    for name, index in sorted(wanted):
        if name not in names:
            problems.append(f"custom_blocks names {name!r}, which this architecture does not have (use "
                            f"{', '.join(names)}, e.g. '{names[-1]}.0')")
        elif name in counts and index >= counts[name]:
            problems.append(f"custom_blocks asks for {name}.{index}, but the model has {counts[name]} {name} "
                            f"blocks (0-{counts[name] - 1})")
    return problems


def token_grid_of(original_shape, n_tokens: int) -> tuple[int, int] | None:
    """The (h, w) token grid of a UNet layer with `n_tokens` tokens, from the latent's `original_shape`
    (ComfyUI's extra_options["original_shape"]); None when unknown or when no downsampling factor fits."""
    if original_shape is None:
        return None
    return token_grid(int(original_shape[-2]), int(original_shape[-1]), n_tokens)


def unet_layer_selected(block: tuple | None, grid: tuple[int, int] | None, blocks: str,
                        custom: frozenset | None = None) -> bool:
    """Whether a UNet attention layer in `block` (ComfyUI's ("input"|"middle"|"output", index)) with token grid
    `grid` (None when unknown) is merged under the preset `blocks` ("paper", "all", "custom" with `custom`)."""
    if block is None:
        return False
    if blocks == "all":
        return True
    if blocks == "custom":
        return custom is not None and (block[0], int(block[1])) in custom
    return block[0] == "output" and grid is not None and min(grid) >= PAPER_UNET_MIN_GRID


def dit_blocks(arch: str, counts: dict[str, int], custom: frozenset | None = None) -> list[tuple[str, int]]:
    """The (kind, index) DiT blocks NegToMe patches: every block of the architecture, or those in `custom`."""
    kinds = BLOCK_NAMES[arch]
    selected = [(kind, i) for kind in kinds for i in range(counts.get(kind, 0))]
    return selected if custom is None else [b for b in selected if b in custom]


@dataclass(frozen=True)
class TokenSpan:
    """The image tokens of a joint attention output: `length` tokens from `start`, in an output of `total`."""

    start: int
    length: int
    total: int
    grid: tuple[int, ...]
    """The image tokens' (h, w) grid, or (frames, h, w) for 5-D latents (frame-major; for masks)."""

    def matches(self, shape: tuple) -> bool:
        """Whether an attention output of `shape` (batch, tokens, features) is the joint output this span
        describes (other attention calls in a block, e.g. SD3.5's extra image self-attention, are not)."""
        return len(shape) == 3 and shape[1] == self.total and self.start + self.length <= shape[1]


def patch_grid(frames: int | None, height: int, width: int, patch_size) -> tuple[int, ...]:
    """The token grid of a latent: (h, w), or (frames, h, w) when `frames` is given (5-D latents), each side
    ceil-divided by the patch size (an int for h and w, or a (t, h, w) sequence) like the patch padding."""
    if isinstance(patch_size, (tuple, list)):
        pt, ph, pw = (int(p) for p in (tuple(patch_size) if len(patch_size) == 3 else (1, *patch_size)))
    else:
        pt, ph = 1, int(patch_size)
        pw = ph
    hw = (-(-height // ph), -(-width // pw))
    return hw if frames is None else (-(-frames // pt), *hw)


def dit_image_span(kind: str, img_len: int, txt_len: int | None, context_len: int | None, height: int,
                   width: int, patch_size, frames: int | None = None, arch: str = "flux") -> TokenSpan:
    """Where the image tokens are in a DiT block's first attention output.

    kind: "double" (double block: attention over [txt, img], or [img, txt] for HunyuanVideo; `img_len` = the
    block's image tokens, `txt_len` = its text tokens), "single" (single block: its input is already [txt, img]
    ([img, txt] for HunyuanVideo), `img_len` is that whole length; the text length is the conditioning's
    `context_len`, else what the latent's own tokens leave), "joint" (SD3: [context, x]) or "block" (Wan and
    LTX-Video: the image self-attention, `img_len` tokens; Qwen-Image: [txt, img]). The latent's own tokens are
    the patch grid (`patch_grid`; frames x h x w for video, frame-major); extra image tokens after them
    (reference latents, e.g. Kontext or Qwen-Image Edit, extra Wan frames) are left alone."""
    grid = patch_grid(frames, height, width, patch_size)
    n_main = 1
    for side in grid:
        n_main *= side
    image_first = arch in IMAGE_FIRST
    if kind == "double":
        if image_first:
            return TokenSpan(0, min(n_main, img_len), img_len + int(txt_len or 0), grid)
        start = int(txt_len or 0)
        return TokenSpan(start, n_main, start + img_len, grid)
    if kind == "single":
        if image_first:
            return TokenSpan(0, min(n_main, img_len), img_len, grid)
        start = int(context_len) if context_len is not None else img_len - n_main
        return TokenSpan(start, n_main, img_len, grid)
    if kind == "joint":
        start = int(txt_len or 0)
        return TokenSpan(start, img_len, start + img_len, grid)
    if kind == "block":
        if image_first:
            return TokenSpan(0, min(n_main, img_len), img_len, grid)
        start = int(txt_len or 0)
        return TokenSpan(start, min(n_main, img_len), start + img_len, grid)
    raise ValueError(f"unknown DiT block kind {kind!r}; expected double, single, joint or block")
