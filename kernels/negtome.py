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

The similarity matrix never materialises whole: it is computed in blocks of at most `budget_bytes` fp32
values (at least one row/column of the reference, see `similarity_peak_bytes`). Norms and similarities are
computed in fp32; the extrapolated tokens are cast back to the input dtype; unmatched tokens are returned
bit-identical. Pure torch; device and dtype follow the inputs; inputs are never modified.
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

# Official active windows (pipeline timestep units): SDXL DDPM t in [800, 1000]; Flux t = sigma * 1000 in
# [900, 1000]. SD1.5/SD3 have no official setting; we use the same as SDXL/Flux respectively.
PAPER_UNET_MIN_TIMESTEP = 800.0
"""UNet (discrete eps/v) families: active while the model timestep is >= this (DDPM units, 0..999)."""
PAPER_FLOW_MIN_SIGMA = 0.9
"""Flow families (Flux, SD3): active while sigma >= this (ComfyUI's Flux/SD3 sigmas are the shifted ones)."""
PAPER_UNET_MIN_GRID = 32
"""SDXL pipeline default `min_attn_dim`: output-block layers whose token grid is at least this on both sides."""

DEFAULT_BUDGET_MB = 64.0


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
    """Largest similarity block computed at once, in MiB of fp32 values."""

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
def block_rows(n_other: int, budget_bytes: int) -> int:
    """Rows of a similarity block against `n_other` tokens that fit in the budget (at least 1)."""
    return max(1, int(budget_bytes) // (4 * max(1, n_other)))


def similarity_peak_bytes(n_tokens: int, n_ref: int, budget_bytes: int, matching: str = "official") -> int:
    """Peak bytes of one fp32 similarity block for groups of `n_tokens` image tokens matched against `n_ref`
    reference tokens (per other image for `all_others`, so n_ref = n_tokens there). Never more than
    max(budget_bytes, 4 * n_tokens) for `official` (blocks of reference columns x all source tokens), or
    max(budget_bytes, 4 * n_ref) otherwise (blocks of source rows x all reference tokens)."""
    if matching == "official":
        cols = min(n_ref, block_rows(n_tokens, budget_bytes))
        return 4 * n_tokens * cols
    rows = min(n_tokens, block_rows(n_ref, budget_bytes))
    return 4 * rows * n_ref


def peak_extra_bytes(n_images: int, n_tokens: int, dim: int, budget_bytes: int, matching: str = "official",
                     element_size: int = 4) -> int:
    """Upper bound on the extra memory of one `merge_group` call: fp32 normalised copies of two images at a time
    (the reference or other image, and the current one), the per-image best-match values and indices, one
    similarity block with its max/argmax, the gathered and extrapolated tokens (fp32) and the output (in the
    input's element size). Only the output grows with the number of images; nothing grows with n_tokens^2."""
    normalised = 4 * 2 * n_tokens * dim
    best = (4 + 8) * 2 * n_tokens
    sim = similarity_peak_bytes(n_tokens, n_tokens, budget_bytes, matching)
    gathered = 4 * n_tokens * dim * 2
    output = element_size * n_images * n_tokens * dim
    return normalised + best + sim + gathered + output


# ----------------------------------------------------------------------------------------------
# Kernel
# ----------------------------------------------------------------------------------------------
def _similarity_block(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """fp32 cosine block a @ b^T of already-normalised rows (module-level so tests can observe its size)."""
    return a @ b.transpose(-1, -2)


def _normalise(x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(x.float(), dim=-1)


def _best_over_sources(src_n: torch.Tensor, ref_n: torch.Tensor, ref_mask: torch.Tensor | None,
                       budget_bytes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Official reduction: for each reference token j, max_i cos(src_i, ref_j) and its argmax i."""
    n_src, n_ref = src_n.shape[0], ref_n.shape[0]
    cols = block_rows(n_src, budget_bytes)
    vals = torch.empty(n_ref, dtype=torch.float32, device=src_n.device)
    idx = torch.empty(n_ref, dtype=torch.long, device=src_n.device)
    for start in range(0, n_ref, cols):
        block = _similarity_block(src_n, ref_n[start:start + cols])  # (n_src, c)
        v, i = block.max(dim=0)
        vals[start:start + cols] = v
        idx[start:start + cols] = i
        del block
    if ref_mask is not None:
        vals = vals.masked_fill(~ref_mask, float("-inf"))
    return vals, idx


def _best_over_refs(src_n: torch.Tensor, ref_n: torch.Tensor, ref_mask: torch.Tensor | None,
                    budget_bytes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Best-match reduction: for each source token i, max_j cos(src_i, ref_j) and its argmax j."""
    n_src, n_ref = src_n.shape[0], ref_n.shape[0]
    rows = block_rows(n_ref, budget_bytes)
    vals = torch.empty(n_src, dtype=torch.float32, device=src_n.device)
    idx = torch.empty(n_src, dtype=torch.long, device=src_n.device)
    for start in range(0, n_src, rows):
        block = _similarity_block(src_n[start:start + rows], ref_n)  # (r, n_ref)
        if ref_mask is not None:
            block = block.masked_fill(~ref_mask.view(1, -1), float("-inf"))
        v, i = block.max(dim=1)
        vals[start:start + rows] = v
        idx[start:start + rows] = i
        del block
    return vals, idx


def _extrapolate(x: torch.Tensor, matched: torch.Tensor, merge: torch.Tensor, alpha: float) -> torch.Tensor:
    """where(merge, (1 + alpha) x - alpha matched, x): fp32 arithmetic, input dtype out, x kept bit-exact."""
    pushed = ((1.0 + alpha) * x.float() - alpha * matched.float()).to(x.dtype)
    return torch.where(merge.unsqueeze(-1), pushed, x)


def merge_group(x: torch.Tensor, alpha: float, threshold: float, matching: str = "official",
                ref_mask: torch.Tensor | None = None, budget_bytes: int = int(DEFAULT_BUDGET_MB * 2 ** 20),
                ) -> tuple[torch.Tensor, int]:
    """NegToMe on one group of images (one CFG chunk): x is (F, N, D), image 0 the reference for `official`
    and `best_match`. `ref_mask` (N,) bool marks the reference tokens that may be matched (image-0 modes).
    Returns (new tensor, number of merged tokens). x is not modified; with alpha == 0, F < 2 or nothing
    matched, x itself is returned."""
    if matching not in MATCHINGS:
        raise ValueError(f"unknown matching {matching!r}; expected one of {MATCHINGS}")
    if x.dim() != 3:
        raise ValueError(f"expected (images, tokens, features), got shape {tuple(x.shape)}")
    n_images, n_tokens, _ = x.shape
    if alpha == 0.0 or n_images < 2:
        return x, 0
    if ref_mask is not None:
        if matching == "all_others":
            raise ValueError("a reference-token mask needs a single reference image (matching official or "
                             "best_match), not all_others")
        ref_mask = ref_mask.to(device=x.device, dtype=torch.bool).reshape(-1)
        if ref_mask.numel() != n_tokens:
            raise ValueError(f"ref_mask has {ref_mask.numel()} entries for {n_tokens} tokens")
        if not bool(ref_mask.any()):
            return x, 0
    ref_n = _normalise(x[0]) if matching != "all_others" else None
    rows = [x[0]]
    merged_total = 0
    first = 1 if matching in ("official", "best_match") else 0
    if first == 0:
        rows = []
    for f in range(first, n_images):
        src_n = _normalise(x[f])  # one image at a time: never the whole group in fp32
        if matching == "official":
            vals, idx = _best_over_sources(src_n, ref_n, ref_mask, budget_bytes)
            matched = x[0].index_select(0, idx)
        elif matching == "best_match":
            vals, idx = _best_over_refs(src_n, ref_n, ref_mask, budget_bytes)
            matched = x[0].index_select(0, idx)
        else:  # all_others: running best over each other image, one image at a time
            vals = torch.full((n_tokens,), float("-inf"), dtype=torch.float32, device=x.device)
            matched = torch.zeros_like(x[f])
            for g in range(n_images):
                if g == f:
                    continue
                v, i = _best_over_refs(src_n, _normalise(x[g]), None, budget_bytes)
                better = v > vals
                vals = torch.where(better, v, vals)
                matched = torch.where(better.unsqueeze(-1), x[g].index_select(0, i), matched)
        merge = vals > threshold
        count = int(merge.sum())
        merged_total += count
        rows.append(_extrapolate(x[f], matched, merge, alpha) if count else x[f])
    if merged_total == 0:
        return x, 0
    return torch.stack(rows, dim=0), merged_total


def merge_chunks(x: torch.Tensor, n_chunks: int, alpha: float, threshold: float, matching: str = "official",
                 ref_mask: torch.Tensor | None = None, budget_bytes: int = int(DEFAULT_BUDGET_MB * 2 ** 20),
                 ) -> tuple[torch.Tensor, int]:
    """merge_group on each of `n_chunks` equal batch chunks (ComfyUI's cond/uncond chunks), independently."""
    if n_chunks < 1 or x.shape[0] % n_chunks:
        raise ValueError(f"batch of {x.shape[0]} does not split into {n_chunks} chunks")
    outs, total = [], 0
    for chunk in x.chunk(n_chunks, dim=0):
        out, count = merge_group(chunk, alpha, threshold, matching, ref_mask, budget_bytes)
        outs.append(out)
        total += count
    if total == 0:
        return x, 0
    return torch.cat(outs, dim=0), total


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
