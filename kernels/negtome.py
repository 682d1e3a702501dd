"""Negative Token Merging (NegToMe; Singh et al., "Negative Token Merging: Image-based Adversarial Feature
Guidance", arXiv 2412.01339, CVPR 2025).

Inside selected attention layers, every image token that matches a reference token (cosine > tau) is pushed
away from it by linear extrapolation, `(1 + alpha) * x - alpha * matched` (alpha < 0 pulls toward it).

Three matchings (`MATCHINGS`):

* ``official``: the released `negtome()` maths, reference = image 0 of the group. Similarities
  S[f, i, j] = cos(token i of image f, token j of image 0) are reduced over the *source* tokens i (the released
  code's ``max(dim=-2)``): output position j of image f is extrapolated away from reference token i*(j) of
  image 0, where i*(j) is the source token that best matches reference token j, when that best similarity
  exceeds tau. An optional mask over reference tokens j switches positions off (the released masked_fill).
  Image 0 is returned unchanged (its self-match extrapolates to itself; the code keeps it up to rounding,
  we keep it exactly).
* ``best_match``: the paper's prose reading, reference = image 0: each source token i of image f is pushed
  away from its own best-matching reference token j*(i). Image 0 is returned unchanged.
* ``all_others`` (our improvement, not in the paper): each token of every image (image 0 included) is pushed
  away from its best match over the union of all *other* images' tokens, so every pair of images repels.

The similarity matrix never materialises whole: it is computed in blocks of at most `budget_bytes` (at least
one row/column of the reference, see `similarity_peak_bytes`). When one source image of every CFG chunk fits a
block, all chunks of a call go through together (one normalisation when the normalised copy fits the budget,
one batched product per block of source images written straight into the results, one gather, one extrapolation:
a fixed number of tensor ops per call, fewer kernel launches than the released code's per-chunk maths); when only
one chunk's does, chunk by chunk the same way; otherwise chunk by chunk, image blocks, then column/row blocks.
Similarities (`SIMILARITIES`): `model` (default) searches in the features' dtype as the released code does;
`checked` does the same and re-scores the chosen matches nearest the threshold in fp32; `fp32` searches in fp32
(`check_tolerance` states how close the first two are to `fp32`). The extrapolation is computed in fp32
and rounded once to the input dtype; unmatched tokens are returned bit-identical (half-precision features whose
token rows are contiguous take them through lerp(x, x, -alpha), exact for finite values up to the sign of a zero;
an infinite one comes back NaN). The hot path (`merge_batch`) never synchronises with the host: the merged-token
count stays a device tensor. Pure torch; device and dtype follow the inputs; inputs are never modified.
"""
from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass

import torch

MATCHINGS = ("official", "best_match", "all_others")
WINDOWS = ("paper", "custom")
BLOCK_PRESETS = ("paper", "all", "custom")
SIMILARITIES = ("fp32", "model", "checked")

# Official active windows (pipeline timestep units): SDXL DDPM t in [800, 1000]; Flux t = sigma * 1000 in
# [900, 1000]. SD1.5/SD3 have no official setting; we use the same as SDXL/Flux respectively.
PAPER_UNET_MIN_TIMESTEP = 800.0
"""UNet (discrete eps/v) families: active while the model timestep is >= this (DDPM units, 0..999)."""
PAPER_FLOW_MIN_SIGMA = 0.9
"""Flow families (Flux, SD3): active while sigma >= this (ComfyUI's Flux/SD3 sigmas are the shifted ones)."""
PAPER_UNET_MIN_GRID = 32
"""SDXL pipeline default `min_attn_dim`: output-block layers whose token grid is at least this on both sides."""

DEFAULT_BUDGET_MB = 64.0
_HALF = (torch.float16, torch.bfloat16)


def check_tolerance(dtype: torch.dtype) -> float:
    """The stated tolerance of the model-dtype search (`model`, `checked`) on features of `dtype` against the
    `fp32` search on the same features (0 for fp32 features: identical).

    The search in the features' dtype errs by at most about 5 units of roundoff (normalised inputs rounded, the
    similarity rounded), below 4 * eps. So the chosen match's fp32 cosine is within this of the best fp32 cosine,
    and the merged tokens are fp32's except where the best fp32 cosine lies within this of tau (`model`: either
    side). `checked` applies the threshold to the chosen match's fp32 cosine (for the RESCORE_FRACTION of a layer
    call's positions nearest the threshold, which holds every position within the tolerance unless more than that
    share lie there), so its merged tokens differ from fp32's only where the best fp32 cosine lies in
    (tau, tau + tolerance]."""
    if dtype == torch.float32 or not dtype.is_floating_point:
        return 0.0
    return 4.0 * torch.finfo(dtype).eps


@dataclass(frozen=True)
class NegToMeParams:
    """Single source of defaults for the NegToMe kernel and nodes."""

    alpha: float = 0.9
    """Extrapolation strength: x' = (1 + alpha) x - alpha * matched. 0 = off; < 0 pulls toward the reference.
    Official default 0.9 (Flux and SDXL pipelines); the SDXL demo slider defaults to 1.5."""
    threshold: float = 0.7
    """tau: only tokens with cosine > tau are merged. Official: 0.7 (SDXL), 0.65 (Flux)."""
    matching: str = "official"
    """One of MATCHINGS."""
    window: str = "paper"
    """`paper`: the official per-family window (UNets: timestep >= 800; Flux/SD3: sigma >= 0.9);
    `custom`: start_percent..end_percent of the schedule."""
    start_percent: float = 0.0
    """Custom window start (fraction of the schedule; 0 = highest noise)."""
    end_percent: float = 0.2
    """Custom window end (1 = the last step)."""
    blocks: str = "paper"
    """One of BLOCK_PRESETS: `paper` (UNets: output blocks with token grid >= 32 on both sides; Flux: every
    double and single block; SD3: every joint block), `all` (every attention layer), `custom` (custom_blocks)."""
    custom_blocks: str = ""
    """Comma-separated list for blocks=custom, e.g. `output.3-5, middle.0` (UNets), `double.0-18, single.0-37`
    (Flux), `joint.0-23` (SD3)."""
    budget_mb: float = DEFAULT_BUDGET_MB
    """Largest similarity block computed at once, in MiB (fp32 values, or the model dtype's)."""
    similarity: str = "model"
    """One of SIMILARITIES: `model` (default): norms and cosine similarities in the features' own dtype
    (bf16/fp16), as the released code does; `checked`: the same search, the chosen matches nearest the threshold
    re-scored in fp32; `fp32`: the search in fp32 (several times slower on GPUs). See `check_tolerance`; the three
    are identical on fp32 features."""

    def validate(self) -> list[str]:
        problems = []
        if not math.isfinite(self.alpha) or not -10.0 <= self.alpha <= 10.0:
            problems.append(f"alpha must be in [-10, 10], got {self.alpha}")
        if not -1.0 <= self.threshold <= 1.0:
            problems.append(f"threshold must be in [-1, 1], got {self.threshold}")
        if self.matching not in MATCHINGS:
            problems.append(f"matching must be one of {MATCHINGS}, got {self.matching!r}")
        if self.window not in WINDOWS:
            problems.append(f"window must be one of {WINDOWS}, got {self.window!r}")
        if not 0.0 <= self.start_percent <= 1.0 or not 0.0 <= self.end_percent <= 1.0:
            problems.append(f"start_percent and end_percent must be in [0, 1], got {self.start_percent}, "
                            f"{self.end_percent}")
        elif self.window == "custom" and self.start_percent > self.end_percent:
            problems.append(f"start_percent ({self.start_percent}) must not exceed end_percent ({self.end_percent})")
        if self.blocks not in BLOCK_PRESETS:
            problems.append(f"blocks must be one of {BLOCK_PRESETS}, got {self.blocks!r}")
        if self.blocks == "custom":
            try:
                if not parse_block_list(self.custom_blocks):
                    problems.append("blocks=custom needs a non-empty custom_blocks list, e.g. 'output.3-5'")
            except ValueError as e:
                problems.append(str(e))
        if self.similarity not in SIMILARITIES:
            problems.append(f"similarity must be one of {SIMILARITIES}, got {self.similarity!r}")
        if not self.budget_mb > 0:
            problems.append(f"budget_mb must be > 0, got {self.budget_mb}")
        return problems

    def replace(self, **changes) -> "NegToMeParams":
        return dataclasses.replace(self, **changes)

    @property
    def budget_bytes(self) -> int:
        return max(4, int(self.budget_mb * 1024 * 1024))


# ----------------------------------------------------------------------------------------------
# Block lists
# ----------------------------------------------------------------------------------------------
_ITEM = re.compile(r"^([a-z_]+)\.(\d+)(?:-(\d+))?$")


def parse_block_list(text: str) -> frozenset[tuple[str, int]]:
    """`"output.3-5, middle.0"` -> {("output", 3), ("output", 4), ("output", 5), ("middle", 0)}."""
    out: set[tuple[str, int]] = set()
    for raw in text.replace(";", ",").split(","):
        item = raw.strip().lower()
        if not item:
            continue
        m = _ITEM.match(item.replace(" ", ""))
        if m is None:
            raise ValueError(f"custom_blocks: cannot read {raw.strip()!r}; write NAME.INDEX or NAME.FIRST-LAST, "
                             "e.g. output.3-5")
        first = int(m.group(2))
        last = int(m.group(3)) if m.group(3) is not None else first
        if last < first:
            raise ValueError(f"custom_blocks: empty range {raw.strip()!r}")
        out.update((m.group(1), i) for i in range(first, last + 1))
    return frozenset(out)


# ----------------------------------------------------------------------------------------------
# Memory plan
# ----------------------------------------------------------------------------------------------
def similarity_dtype(x_dtype: torch.dtype, similarity: str = "fp32") -> torch.dtype:
    """The dtype the similarity search runs in: fp32, or the features' own dtype for `model` and `checked`."""
    if similarity == "fp32":
        return torch.float32
    if similarity in ("model", "checked"):
        return x_dtype if x_dtype.is_floating_point else torch.float32
    raise ValueError(f"unknown similarity {similarity!r}; expected one of {SIMILARITIES}")


def block_rows(n_other: int, budget_bytes: int, element_size: int = 4) -> int:
    """Rows of a similarity block against `n_other` tokens that fit in the budget (at least 1)."""
    return max(1, int(budget_bytes) // (element_size * max(1, n_other)))


def images_per_block(n_tokens: int, n_ref: int, budget_bytes: int, n_sources: int, element_size: int = 4) -> int:
    """Source images (of `n_tokens` tokens each) whose similarity blocks against `n_ref` reference tokens are
    computed together: as many as fit in the budget, at least 1, at most `n_sources`."""
    return max(1, min(n_sources, int(budget_bytes) // (element_size * max(1, n_tokens * n_ref))))


def _all_others_joint(n_images: int, n_tokens: int, budget_bytes: int, element_size: int = 4) -> bool:
    """all_others compares every token of the group with every other at once (one masked product) when that
    whole similarity fits in the budget; otherwise each pair of images once, in blocks of rows."""
    return element_size * (n_images * n_tokens) ** 2 <= budget_bytes


def similarity_peak_bytes(n_tokens: int, n_ref: int, budget_bytes: int, matching: str = "official",
                          element_size: int = 4, n_images: int | None = None) -> int:
    """Upper bound on the bytes of one similarity block for groups of `n_tokens`-token images matched against
    `n_ref` reference tokens (per other image for `all_others`, so n_ref = n_tokens there): never more than
    max(budget_bytes, one line), where a line is one reference column (`official`: element_size * n_tokens) or one
    source row (otherwise: element_size * n_ref). Several images share a block when they fit in the budget. With
    `n_images` (images per group) the bound is also capped by the whole group's similarity."""
    line = element_size * (n_tokens if matching == "official" else n_ref)
    peak = max(int(budget_bytes), line)
    if n_images is not None:
        if matching == "all_others":
            whole = element_size * (n_images * n_tokens) ** 2 if _all_others_joint(
                n_images, n_tokens, budget_bytes, element_size) else element_size * n_tokens * n_ref
        else:
            whole = element_size * max(1, n_images - 1) * n_tokens * n_ref
        peak = min(peak, whole)
    return peak


def _piece_images(n_tokens: int, dim: int, budget_bytes: int) -> int:
    """Images per extrapolation piece: their fp32 temporaries fit in the budget (at least one image)."""
    return max(1, int(budget_bytes) // (4 * max(1, n_tokens * dim)))


def peak_extra_bytes(n_images: int, n_tokens: int, dim: int, budget_bytes: int, matching: str = "official",
                     element_size: int = 4, similarity_size: int = 4) -> int:
    """Upper bound on the extra memory of one group (CFG chunk): the normalised copy (at most the whole group),
    one similarity block with its max/argmax, the gathered and extrapolated tokens of one extrapolation or
    re-scoring piece (fp32, at least one image) and the output (in the input's element size). These grow linearly
    with the number of images and tokens; nothing grows with n_tokens^2."""
    normalised = similarity_size * n_images * n_tokens * dim  # at most the whole group (the batched path)
    best = (4 + 8) * n_images * n_tokens
    sim = similarity_peak_bytes(n_tokens, n_tokens, budget_bytes, matching, similarity_size, n_images)
    piece = min(n_images, _piece_images(n_tokens, dim, budget_bytes))
    gathered = (4 * 2 + element_size) * piece * n_tokens * dim
    output = element_size * n_images * n_tokens * dim
    return normalised + best + sim + gathered + output


# ----------------------------------------------------------------------------------------------
# Kernel
# ----------------------------------------------------------------------------------------------
# No step below reads a value back to the host: the number of merged tokens stays a device tensor, so a patched
# layer never stalls the GPU queue. Images are processed in blocks (as many as the budget allows), so small token
# grids take one similarity product per CFG chunk, and large ones fall back to column/row blocks of one image.

def _itemsize(dtype: torch.dtype) -> int:
    return 2 if dtype in _HALF else 4 if dtype == torch.float32 else torch.finfo(dtype).bits // 8


def _similarity_block(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosine block a @ b^T of already-normalised rows (module-level so tests can observe its size)."""
    return torch.bmm(a, b.mT) if a.dim() == 3 else torch.mm(a, b.t())


def _normalise(x: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """F.normalize(x.to(dtype), dim=-1), bit for bit (x / max(||x||, 1e-12), the norm in `dtype`), in three ops."""
    if x.dtype != dtype:
        x = x.to(dtype)
    return x / torch.linalg.vector_norm(x, dim=-1, keepdim=True).clamp_min_(1e-12)


def _best_over_sources(src_n: torch.Tensor, ref_n: torch.Tensor, ref_mask: torch.Tensor | None,
                       budget_bytes: int, n_images: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Official reduction for `n_images` source images stacked in src_n (n_images * N, D): for each image and
    reference token j, max_i cos(src_i, ref_j) and its argmax i (the first on ties). Returns (n_images, n_ref)
    values and indices. Blocks are (reference columns) x (source rows), so the reduction runs along the
    innermost dimension."""
    n_rows, n_ref = src_n.shape[0], ref_n.shape[0]
    n_src = n_rows // n_images
    cols = block_rows(n_rows, budget_bytes, src_n.element_size())
    if cols >= n_ref:
        vals, idx = _similarity_block(ref_n, src_n).view(n_ref, n_images, n_src).max(dim=2)
    else:
        vals = torch.empty(n_ref, n_images, dtype=src_n.dtype, device=src_n.device)
        idx = torch.empty(n_ref, n_images, dtype=torch.long, device=src_n.device)
        for start in range(0, n_ref, cols):
            block = _similarity_block(ref_n[start:start + cols], src_n)  # (c, n_images * n_src)
            v, i = block.view(block.shape[0], n_images, n_src).max(dim=2)
            vals[start:start + cols] = v
            idx[start:start + cols] = i
            del block
    vals, idx = vals.t(), idx.t()
    if ref_mask is not None:
        vals = vals.masked_fill(~ref_mask.view(1, -1), float("-inf"))
    return vals, idx


def _best_over_refs(src_n: torch.Tensor, ref_n: torch.Tensor, ref_mask: torch.Tensor | None,
                    budget_bytes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Best-match reduction: for each source row i, max_j cos(src_i, ref_j) and its argmax j."""
    n_src, n_ref = src_n.shape[0], ref_n.shape[0]
    rows = block_rows(n_ref, budget_bytes, src_n.element_size())
    off = None if ref_mask is None else ~ref_mask.view(1, -1)
    if rows >= n_src:
        block = _similarity_block(src_n, ref_n)
        if off is not None:
            block.masked_fill_(off, float("-inf"))
        return block.max(dim=1)
    vals = torch.empty(n_src, dtype=src_n.dtype, device=src_n.device)
    idx = torch.empty(n_src, dtype=torch.long, device=src_n.device)
    for start in range(0, n_src, rows):
        block = _similarity_block(src_n[start:start + rows], ref_n)  # (r, n_ref)
        if off is not None:
            block.masked_fill_(off, float("-inf"))
        v, i = block.max(dim=1)
        vals[start:start + rows] = v
        idx[start:start + rows] = i
        del block
    return vals, idx


def _extrapolate(x: torch.Tensor, matched: torch.Tensor, merge: torch.Tensor, alpha: float,
                 out: torch.Tensor | None = None) -> torch.Tensor:
    """where(merge, (1 + alpha) x - alpha matched, x): fp32 arithmetic, input dtype out, x kept bit-exact.
    `matched` is a temporary of the caller (it may be scaled in place); `out` receives the result.

    Half-precision features take one fused pass, lerp(x, matched, -alpha) = x + alpha (x - matched) computed in
    fp32 (PyTorch's opmath) and rounded once: no fp32 copies of the tokens."""
    if x.dtype in _HALF:
        pushed = torch.lerp(x, matched, -alpha, out=matched)  # into the caller's temporary: no new tensor
    elif x.dtype == torch.float32:
        pushed = torch.mul(x, 1.0 + alpha)  # a new tensor
        pushed.sub_(matched.mul_(alpha))
    else:
        pushed = x.float() * (1.0 + alpha)
        pushed.sub_(matched.float().mul_(alpha))
        pushed = pushed.to(x.dtype)
    return torch.where(merge.unsqueeze(-1), pushed, x, out=out)


def _push(src: torch.Tensor, table: torch.Tensor, idx: torch.Tensor, merge: torch.Tensor, alpha: float,
          out: torch.Tensor, budget_bytes: int) -> None:
    """out[k] = extrapolate(src[k], table[idx[k]], merge[k]) for src (K, N, D), in pieces of whole images."""
    n_src, n_tokens, dim = src.shape
    piece = _piece_images(n_tokens, dim, budget_bytes)
    for p0 in range(0, n_src, piece):
        p1 = min(n_src, p0 + piece)
        matched = table.index_select(0, idx[p0:p1].reshape(-1)).view(p1 - p0, n_tokens, dim)
        _extrapolate(src[p0:p1], matched, merge[p0:p1], alpha, out=out[p0:p1])


def _fp32_cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosine of the row pairs of a (..., D) and b (broadcastable), in fp32 arithmetic (half-precision products are
    exact in fp32), with F.normalize's eps."""
    dot = a.to(torch.float32, copy=True).mul_(b).sum(-1)
    na = torch.linalg.vector_norm(a, dim=-1, dtype=torch.float32).clamp_min_(1e-12)
    nb = torch.linalg.vector_norm(b, dim=-1, dtype=torch.float32).clamp_min_(1e-12)
    return dot.div_(na * nb)


RESCORE_FRACTION = 0.125
"""`checked` re-scores, per layer call, the positions whose model-dtype similarity is nearest the threshold: this
fraction of them (at least RESCORE_MIN, at most all)."""
RESCORE_MIN = 4096


def _rescore_near_threshold(vals: torch.Tensor, threshold: float, pair_rows) -> torch.Tensor:
    """`checked`: fp32 values for the positions of `vals` (model dtype, any shape) nearest the threshold, the
    model-dtype values elsewhere (as fp32). `pair_rows(flat positions)` returns the (K, D) feature rows of each
    position's chosen pair. A fixed number of positions (no host read-back): when more than that lie within the
    tolerance of the threshold, the nearest are re-scored and the others keep their model-dtype value."""
    flat = vals.reshape(-1).float()
    n = flat.numel()
    k = min(n, max(RESCORE_MIN, math.ceil(n * RESCORE_FRACTION)))
    if k == n:
        sel = torch.arange(n, device=vals.device)
    else:  # masked (-inf) positions are farthest and never chosen
        sel = (flat - threshold).abs_().topk(k, largest=False, sorted=False).indices
    a, b = pair_rows(sel)
    return flat.scatter(0, sel, _fp32_cosine(a, b)).view(vals.shape)


def _image_zero_pairs(x4: torch.Tensor, idx: torch.Tensor, matching: str):
    """pair_rows for image-0 positions (C, K, N) of x4 (C, F, N, D) whose sources are images f0.. (idx (C, K, N)):
    official pairs source token idx with reference token j; best_match source token j with reference token idx."""
    n_chunks, n_src, n_tokens = idx.shape
    flat_idx = idx.reshape(-1)
    first = x4.shape[1] - n_src  # sources are the last n_src images

    def pair_rows(sel):
        c = sel // (n_src * n_tokens)
        f = (sel // n_tokens) % n_src + first
        j = sel % n_tokens
        i = flat_idx[sel]
        if matching == "official":
            return x4[c, f, i], x4[c, 0, j]
        return x4[c, f, j], x4[c, 0, i]

    return pair_rows


def _image_zero_group(x: torch.Tensor, out: torch.Tensor, alpha: float, threshold: float, matching: str,
                      ref_mask: torch.Tensor | None, budget_bytes: int, sim_dtype: torch.dtype,
                      check: bool = False) -> torch.Tensor:
    """`official` / `best_match` on one group x (F, N, D) into out; returns the merged-token count (device)."""
    n_images, n_tokens, dim = x.shape
    ref = x[0]
    out[0].copy_(ref)
    ref_n = _normalise(ref, sim_dtype)
    size = ref_n.element_size()
    k = images_per_block(n_tokens, n_tokens, budget_bytes, n_images - 1, size)
    count = None
    for f0 in range(1, n_images, k):
        f1 = min(n_images, f0 + k)
        src = x[f0:f1]
        src_n = _normalise(src, sim_dtype).reshape(-1, dim)  # only this block of images, never the whole group
        if matching == "official":
            vals, idx = _best_over_sources(src_n, ref_n, ref_mask, budget_bytes, f1 - f0)
        else:
            vals, idx = _best_over_refs(src_n, ref_n, ref_mask, budget_bytes)
        del src_n
        idx = idx.reshape(f1 - f0, n_tokens)
        if check:
            vals = _masked(_rescore_near_threshold(vals.reshape(1, f1 - f0, n_tokens), threshold, _image_zero_pairs(
                x[None, :f1], idx[None], matching))[0], ref_mask, matching, idx)
        merge = (vals > threshold).reshape(f1 - f0, n_tokens)
        _push(src, ref, idx, merge, alpha, out[f0:f1], budget_bytes)
        merged = merge.sum()
        count = merged if count is None else count + merged
    return count


def _masked(vals: torch.Tensor, ref_mask: torch.Tensor | None, matching: str, idx: torch.Tensor) -> torch.Tensor:
    """Re-scored values with masked reference tokens off again (official: the output position j is the reference
    token; best_match: the chosen reference token idx, masked only when every reference token is)."""
    if ref_mask is None:
        return vals
    off = ~ref_mask if matching == "official" else ~ref_mask[idx]
    return vals.masked_fill(off, float("-inf"))


def _image_zero_blocks(src_n: torch.Tensor, ref_n: torch.Tensor, matching: str, ref_mask: torch.Tensor | None,
                       out: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Best similarities and their indices for the normalised source images src_n (C, n, N, D) against each chunk's
    normalised reference ref_n (C, N, D), with one batched product: (C, n, N) values and indices (written into
    `out` when given). `official`: per output position j, the best source token i; `best_match`: per source token
    i, the best reference token j."""
    n_chunks, n, n_tokens, dim = src_n.shape
    flat = src_n.reshape(n_chunks, n * n_tokens, dim)  # a view: the normalised copy is contiguous
    if matching == "official":  # (C, N_ref, n * N_src): the reduction runs along the innermost (source) dimension,
        block = _similarity_block(ref_n, flat)  # permuted so the results come out (C, n, N_ref)
        block = block.view(n_chunks, n_tokens, n, n_tokens).permute(0, 2, 1, 3)
    else:
        block = _similarity_block(flat, ref_n).view(n_chunks, n, n_tokens, n_tokens)  # (C, n, N_src, N_ref)
        if ref_mask is not None:
            block.masked_fill_(~ref_mask, float("-inf"))
    return block.max(dim=3) if out is None else torch.max(block, dim=3, out=out)


def _image_zero_batched(x4: torch.Tensor, out4: torch.Tensor, alpha: float, threshold: float, matching: str,
                        ref_mask: torch.Tensor | None, budget_bytes: int, sim_dtype: torch.dtype,
                        check: bool) -> torch.Tensor:
    """`official` / `best_match` on every chunk of x4 (C, F, N, D) at once, into out4: per block of source images
    (the same images of every chunk) one batched similarity product of at most budget_bytes, written straight into
    the (C, F-1, N) results; then one gather and one extrapolation. The group is normalised once when its
    normalised copy fits the budget (else the reference once and each block's sources). The caller checked that
    one image per chunk fits. A fixed, small number of tensor ops whatever the batch (tests pin the count)."""
    n_chunks, n_images, n_tokens, dim = x4.shape
    n_src = n_images - 1
    size = _itemsize(sim_dtype)
    k = min(n_src, int(budget_bytes) // (size * n_chunks * n_tokens * n_tokens))
    # (select/narrow rather than x[:, 0] indexing: the per-call Python cost counts on launch-bound GPUs)
    xn = _normalise(x4, sim_dtype) if size * x4.numel() <= budget_bytes else None
    ref_n = xn.select(1, 0) if xn is not None else _normalise(x4.select(1, 0), sim_dtype)  # (C, N, D)
    if k >= n_src:
        vals, idx = _image_zero_blocks(xn.narrow(1, 1, n_src) if xn is not None else
                                       _normalise(x4.narrow(1, 1, n_src), sim_dtype), ref_n, matching, ref_mask)
    else:
        vals = torch.empty((n_chunks, n_src, n_tokens), dtype=sim_dtype, device=x4.device)
        idx = torch.empty((n_chunks, n_src, n_tokens), dtype=torch.long, device=x4.device)
        for f0 in range(0, n_src, k):
            n = min(k, n_src - f0)
            src_n = xn.narrow(1, 1 + f0, n) if xn is not None else _normalise(x4.narrow(1, 1 + f0, n), sim_dtype)
            _image_zero_blocks(src_n, ref_n, matching, ref_mask, out=(vals.narrow(1, f0, n), idx.narrow(1, f0, n)))
            del src_n
    del xn, ref_n
    if ref_mask is not None and matching == "official":
        vals = vals.masked_fill(~ref_mask, float("-inf"))
    if check:
        vals = _masked(_rescore_near_threshold(vals, threshold, _image_zero_pairs(x4, idx, matching)), ref_mask,
                       matching, idx)
    merge = torch.gt(vals, threshold)  # (C, F-1, N)
    ref, src, out_src = x4.select(1, 0), x4.narrow(1, 1, n_src), out4.narrow(1, 1, n_src)
    out4.select(1, 0).copy_(ref)
    row, chunk_rows = x4.stride(1) // dim, x4.stride(0) // dim  # token rows between images, between chunks
    if not (x4.stride(3) == 1 and x4.stride(2) == dim and row * dim == x4.stride(1) >= n_tokens * dim and
            chunk_rows * dim == x4.stride(0)):  # token rows not adjacent: gather each chunk's reference tokens
        matched = torch.gather(ref, 1, idx.view(n_chunks, n_src * n_tokens, 1).expand(-1, -1, dim))
        _extrapolate(src, matched.view(n_chunks, n_src, n_tokens, dim), merge, alpha, out=out_src)
        return merge.sum()
    # The call's tokens as one table of rows over their storage (for a DiT token span the rows between images are
    # other tokens, never picked): image f's token j of chunk c is row c * chunk_rows + f * row + j. One
    # index_select of rows (the fastest gather on CPUs; on GPUs as fast as any).
    table = x4.as_strided(((n_chunks - 1) * chunk_rows + n_src * row + n_tokens, dim), (dim, 1))
    offsets, own_rows = _table_rows(n_chunks, n_images, n_tokens, row, chunk_rows, x4.device)
    if n_chunks > 1:
        idx = idx.add_(offsets)  # chunk c's image 0 starts at row c * chunk_rows (idx is this call's own tensor)
    if x4.dtype in _HALF:
        # An unmerged position picks its own token, and lerp(x, x, -alpha) == x exactly (finite x): one gather and
        # one lerp write every source token, no `where` pass over the tokens.
        matched = table.index_select(0, torch.where(merge, idx, own_rows).view(-1))
        torch.lerp(src, matched.view(n_chunks, n_src, n_tokens, dim), -alpha, out=out_src)
    else:
        matched = table.index_select(0, idx.view(-1))
        _extrapolate(src, matched.view(n_chunks, n_src, n_tokens, dim), merge, alpha, out=out_src)
    return merge.sum()


_TABLE_ROWS: dict = {}


def _table_rows(n_chunks: int, n_images: int, n_tokens: int, row: int, chunk_rows: int,
                device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Constants of a call's token table, made once per layer shape and device (no arange launches per call):
    (C, 1, 1) int64 first row of each chunk, and (C, F-1, N) int64 row of each source token."""
    key = (n_chunks, n_images, n_tokens, row, chunk_rows, device)
    rows = _TABLE_ROWS.get(key)
    if rows is None:
        if len(_TABLE_ROWS) >= 64:
            _TABLE_ROWS.clear()
        with torch.inference_mode(False), torch.no_grad():  # normal tensors: usable in and out of inference mode
            offsets = torch.arange(n_chunks, device=device).view(n_chunks, 1, 1) * chunk_rows
            images = torch.arange(1, n_images, device=device).view(1, n_images - 1, 1) * row
            rows = offsets, offsets + images + torch.arange(n_tokens, device=device).view(1, 1, n_tokens)
        _TABLE_ROWS[key] = rows
    return rows


def _fits_batched(n_chunks: int, n_images: int, n_tokens: int, dim: int, budget_bytes: int, similarity_size: int,
                  element_size: int) -> bool:
    """Whether a call's chunks go through `_image_zero_batched`: one source image of every chunk fits a similarity
    block of the budget, and (fp32 features, whose extrapolation makes fp32 temporaries) those temporaries fit."""
    sources = n_chunks * (n_images - 1)
    temporaries = 0 if element_size < 4 else 4 * sources * n_tokens * dim
    return similarity_size * n_chunks * n_tokens * n_tokens <= budget_bytes and temporaries <= budget_bytes


def _all_others_group(x: torch.Tensor, out: torch.Tensor, alpha: float, threshold: float, budget_bytes: int,
                      sim_dtype: torch.dtype, check: bool = False) -> torch.Tensor:
    """`all_others` on one group x (F, N, D) into out; returns the merged-token count (device). Ties go to the
    lowest other image, then the lowest token (the order of a running strict maximum over images)."""
    n_images, n_tokens, dim = x.shape
    total = n_images * n_tokens
    size = torch.finfo(sim_dtype).bits // 8
    if _all_others_joint(n_images, n_tokens, budget_bytes, size):  # one masked (F*N, F*N) product
        xn = _normalise(x, sim_dtype).reshape(total, dim)
        block = _similarity_block(xn, xn)
        # not the own image: the diagonal (N, N) blocks, filled through a view
        block.view(n_images, n_tokens, n_images, n_tokens).diagonal(dim1=0, dim2=2).fill_(float("-inf"))
        vals, idx = block.max(dim=1)
        del block, xn
    else:  # each pair of images once: S(f, g) gives f's best in g (rows) and g's best in f (columns)
        vals, idx = _all_others_pairs(x, budget_bytes, sim_dtype)
    idx = idx.view(n_images, n_tokens)
    if check:
        flat_idx = idx.reshape(-1)
        vals = _rescore_near_threshold(vals, threshold, lambda sel: (
            x[sel // n_tokens, sel % n_tokens], x[flat_idx[sel] // n_tokens, flat_idx[sel] % n_tokens]))
    merge = (vals > threshold).view(n_images, n_tokens)
    if x.is_contiguous():
        _push(x, x.view(total, dim), idx, merge, alpha, out, budget_bytes)
    else:  # a strided token slice: gather (image, token) pairs instead of copying the group
        piece = _piece_images(n_tokens, dim, budget_bytes)
        for p0 in range(0, n_images, piece):
            p1 = min(n_images, p0 + piece)
            matched = x[idx[p0:p1] // n_tokens, idx[p0:p1] % n_tokens]
            _extrapolate(x[p0:p1], matched, merge[p0:p1], alpha, out=out[p0:p1])
    return merge.sum()


def _column_max(block: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """block.max(dim=0) (first index on ties). CPUs reduce along rows several times faster, so there the block is
    transposed into a contiguous copy first; GPUs reduce columns efficiently as they are."""
    if block.device.type == "cpu":
        return block.t().contiguous().max(dim=1)
    return block.max(dim=0)


def _all_others_pairs(x: torch.Tensor, budget_bytes: int, sim_dtype: torch.dtype
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """Best match of every token over all other images, one similarity product per unordered pair of images
    (half the products of comparing each ordered pair). Candidates reach each image in increasing order of the
    other image, and a strict maximum keeps the first, so ties resolve as a running maximum over images would.
    Returns (F * N,) values and indices into the group's flattened tokens."""
    n_images, n_tokens, dim = x.shape
    size = torch.finfo(sim_dtype).bits // 8
    keep = size * n_images * n_tokens * dim <= budget_bytes  # normalise the group once when it fits
    group_n = _normalise(x, sim_dtype) if keep else None
    best_v = torch.full((n_images, n_tokens), float("-inf"), dtype=sim_dtype, device=x.device)
    best_i = torch.zeros((n_images, n_tokens), dtype=torch.long, device=x.device)
    rows = block_rows(n_tokens, budget_bytes, size)

    def offer(h: int, r0: int, v: torch.Tensor, i: torch.Tensor) -> None:
        r1 = r0 + v.shape[0]
        better = v > best_v[h, r0:r1]
        best_v[h, r0:r1] = torch.where(better, v, best_v[h, r0:r1])
        best_i[h, r0:r1] = torch.where(better, i, best_i[h, r0:r1])

    for f in range(n_images):
        f_n = group_n[f] if keep else _normalise(x[f], sim_dtype)
        for g in range(f + 1, n_images):
            g_n = group_n[g] if keep else _normalise(x[g], sim_dtype)
            col_v = col_i = None
            for r0 in range(0, n_tokens, rows):
                block = _similarity_block(f_n[r0:r0 + rows], g_n)  # (r, N): f's rows r0.. against image g
                v, i = block.max(dim=1)
                offer(f, r0, v, i + g * n_tokens)
                v, i = _column_max(block)  # image g's tokens against these rows of image f
                del block
                if col_v is None:
                    col_v, col_i = v, i + r0
                else:  # a later row block wins only when strictly better: the first row on ties
                    better = v > col_v
                    col_v, col_i = torch.where(better, v, col_v), torch.where(better, i + r0, col_i)
            offer(g, 0, col_v, col_i + f * n_tokens)
    return best_v.view(-1), best_i.view(-1)


def _check_args(x: torch.Tensor, matching: str, ref_mask: torch.Tensor | None,
                similarity: str) -> torch.Tensor | None:
    if matching not in MATCHINGS:
        raise ValueError(f"unknown matching {matching!r}; expected one of {MATCHINGS}")
    if similarity not in SIMILARITIES:
        raise ValueError(f"unknown similarity {similarity!r}; expected one of {SIMILARITIES}")
    if x.dim() != 3:
        raise ValueError(f"expected (images, tokens, features), got shape {tuple(x.shape)}")
    if ref_mask is None:
        return None
    if matching == "all_others":
        raise ValueError("a reference-token mask needs a single reference image (matching official or "
                         "best_match), not all_others")
    ref_mask = ref_mask.to(device=x.device, dtype=torch.bool).reshape(-1)
    if ref_mask.numel() != x.shape[1]:
        raise ValueError(f"ref_mask has {ref_mask.numel()} entries for {x.shape[1]} tokens")
    return ref_mask


def merge_batch(x: torch.Tensor, n_chunks: int, alpha: float, threshold: float, matching: str = "official",
                ref_mask: torch.Tensor | None = None, budget_bytes: int = int(DEFAULT_BUDGET_MB * 2 ** 20),
                similarity: str = "fp32", out: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """NegToMe on each of `n_chunks` equal batch chunks of x (B, N, D) (ComfyUI's cond/uncond chunks),
    independently, without any host synchronisation: returns (result, merged-token count as a 0-dim int64
    tensor on x's device). Image 0 of each chunk is the reference for `official` and `best_match`; `ref_mask`
    (N,) bool marks the reference tokens that may be matched (image-0 modes). `out` (optional, x's shape and
    dtype, e.g. a slice of a larger buffer) receives the result. With alpha == 0 or chunks of one image, x itself
    is returned (out untouched) and the count is 0. x is never modified; unmatched tokens are copied bit-exact."""
    ref_mask = _check_args(x, matching, ref_mask, similarity)
    n_rows, n_tokens, dim = x.shape
    if n_chunks < 1 or n_rows % n_chunks:
        raise ValueError(f"batch of {n_rows} does not split into {n_chunks} chunks")
    per_chunk = n_rows // n_chunks
    if alpha == 0.0 or per_chunk < 2:
        return x, torch.zeros((), dtype=torch.long, device=x.device)
    if out is None:
        out = torch.empty((n_rows, n_tokens, dim), dtype=x.dtype, device=x.device)
    elif out.shape != x.shape or out.dtype != x.dtype:
        raise ValueError(f"out must have shape {tuple(x.shape)} and dtype {x.dtype}")
    sim_dtype = similarity_dtype(x.dtype, similarity)
    check = similarity == "checked" and sim_dtype != torch.float32
    if matching != "all_others":
        size, element = _itemsize(sim_dtype), x.element_size()
        together = (n_chunks if _fits_batched(n_chunks, per_chunk, n_tokens, dim, budget_bytes, size, element) else
                    1 if _fits_batched(1, per_chunk, n_tokens, dim, budget_bytes, size, element) else 0)
        if together:  # every chunk in one batched call, or one chunk per call: a fixed number of ops per call
            x4, out4 = x.view(n_chunks, per_chunk, n_tokens, dim), out.view(n_chunks, per_chunk, n_tokens, dim)
            if together == n_chunks:
                return out, _image_zero_batched(x4, out4, alpha, threshold, matching, ref_mask, budget_bytes,
                                                sim_dtype, check)
            count = None
            for c in range(0, n_chunks, together):
                merged = _image_zero_batched(x4.narrow(0, c, together), out4.narrow(0, c, together), alpha,
                                             threshold, matching, ref_mask, budget_bytes, sim_dtype, check)
                count = merged if count is None else count + merged
            return out, count
    count = None
    for c in range(n_chunks):
        rows = slice(c * per_chunk, (c + 1) * per_chunk)
        if matching == "all_others":
            merged = _all_others_group(x[rows], out[rows], alpha, threshold, budget_bytes, sim_dtype, check)
        else:
            merged = _image_zero_group(x[rows], out[rows], alpha, threshold, matching, ref_mask, budget_bytes,
                                       sim_dtype, check)
        count = merged if count is None else count + merged
    return out, count


def merge_group(x: torch.Tensor, alpha: float, threshold: float, matching: str = "official",
                ref_mask: torch.Tensor | None = None, budget_bytes: int = int(DEFAULT_BUDGET_MB * 2 ** 20),
                similarity: str = "fp32") -> tuple[torch.Tensor, int]:
    """NegToMe on one group of images (one CFG chunk): x is (F, N, D), image 0 the reference for `official`
    and `best_match`. Returns (new tensor, number of merged tokens); reads the count back once (use
    `merge_batch` on hot paths). x is not modified; with alpha == 0, F < 2 or nothing matched, x itself is
    returned."""
    return merge_chunks(x, 1, alpha, threshold, matching, ref_mask, budget_bytes, similarity)


def merge_chunks(x: torch.Tensor, n_chunks: int, alpha: float, threshold: float, matching: str = "official",
                 ref_mask: torch.Tensor | None = None, budget_bytes: int = int(DEFAULT_BUDGET_MB * 2 ** 20),
                 similarity: str = "fp32") -> tuple[torch.Tensor, int]:
    """merge_batch with the count read back once: x itself (and 0) when nothing merged."""
    out, count = merge_batch(x, n_chunks, alpha, threshold, matching, ref_mask, budget_bytes, similarity)
    merged = int(count)
    if merged == 0:
        return x, 0
    return out, merged


def reference_negtome(x: torch.Tensor, alpha: float, threshold: float, matching: str = "official",
                      ref_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Plain, unchunked implementation (for tests): the whole (F, N, N) similarity at once."""
    xn = _normalise(x)
    n_images = x.shape[0]
    if matching == "all_others":
        out = []
        for f in range(n_images):
            others = torch.cat([x[g] for g in range(n_images) if g != f], dim=0)
            on = _normalise(others)
            s = xn[f] @ on.T
            v, i = s.max(dim=-1)
            out.append(torch.where((v > threshold).unsqueeze(-1),
                                   ((1 + alpha) * x[f].float() - alpha * others[i].float()).to(x.dtype), x[f]))
        return torch.stack(out)
    s = xn @ xn[0].T  # (F, N, N)
    if matching == "official":
        if ref_mask is not None:
            s = s.masked_fill(~ref_mask.view(1, 1, -1), float("-inf"))
        v, i = s.max(dim=-2)
    else:
        if ref_mask is not None:
            s = s.masked_fill(~ref_mask.view(1, 1, -1), float("-inf"))
        v, i = s.max(dim=-1)
    matched = x[0][i]
    out = torch.where((v > threshold).unsqueeze(-1), ((1 + alpha) * x.float() - alpha * matched.float()).to(x.dtype),
                      x)
    out[0] = x[0]
    return out


# ----------------------------------------------------------------------------------------------
# Token grids and masks
# ----------------------------------------------------------------------------------------------
def token_grid(height: int, width: int, n_tokens: int, max_factor: int = 64) -> tuple[int, int] | None:
    """The (h, w) grid of `n_tokens` tokens of a latent of height x width downsampled by a power of two
    (ceil division, as strided convolutions and patch padding do), or None when no factor fits."""
    factor = 1
    while factor <= max_factor:
        h, w = -(-height // factor), -(-width // factor)
        if h * w == n_tokens:
            return h, w
        factor *= 2
    return None


def mask_to_tokens(mask: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """A (H, W) (or (1, H, W)) mask resized to a token grid by area averaging; a token is on when at least
    half of its area is on. Returns a flat bool (h*w,) tensor."""
    m = mask.float()
    while m.dim() > 2:
        m = m[0]
    m = torch.nn.functional.interpolate(m[None, None], size=grid, mode="area")[0, 0]
    return (m >= 0.5).reshape(-1)
