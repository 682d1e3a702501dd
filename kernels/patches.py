"""Patch layouts for patch-parallel high-resolution sampling (CutDiffusion, arXiv 2404.15141; ASGDiffusion,
arXiv 2412.06163). Pure torch; device and dtype follow the inputs; inputs are never modified.

Two layouts:

* **Dilated patches** (the structure stage): a (B, C, s_h*h, s_w*w) latent is viewed as K = s_h*s_w native-size
  (h, w) patches, patch k = a*s_w + b holding the pixels ``x[:, :, a::s_h, b::s_w]``. This is exactly
  CutDiffusion's stage switch (``latents_temp[:, :, h::H, w::W] += patch``), read in both directions, so
  `dilated_merge(dilated_split(x)) == x` bit for bit. Patch rows are image-major: row ``i*K + k``.
* **Overlapping windows** (the detail stage): MultiDiffusion-style native-size windows on a stride grid
  (`window_layout`, CutDiffusion's ``get_views`` per axis, so non-square latents and windows work), optional
  random jitter of the inner windows (`jitter_windows`, CutDiffusion's rule), a batched crop (`split_windows`)
  and a weighted average back (`merge_windows`). With uniform weights the average is CutDiffusion's
  ``value / count``; `feather` weights (our option) ramp linearly towards window borders that lie inside the
  latent, which hides seams.
"""
from __future__ import annotations

import random
from typing import Sequence

import torch

Window = tuple[int, int, int, int]
"""(top, bottom, left, right) in latent pixels, bottom/right exclusive."""

BLENDS = ("uniform", "feather")


# ----------------------------------------------------------------------------------------------
# Dilated patches
# ----------------------------------------------------------------------------------------------
def dilated_split(x: torch.Tensor, scale_h: int, scale_w: int) -> torch.Tensor:
    """(B, C, s_h*h, s_w*w) -> (B*K, C, h, w), row i*K + a*s_w + b = x[i, :, a::s_h, b::s_w]."""
    b, c, height, width = x.shape
    if height % scale_h or width % scale_w:
        raise ValueError(f"latent {height}x{width} does not split into {scale_h}x{scale_w} dilated patches")
    h, w = height // scale_h, width // scale_w
    # (B, C, h, s_h, w, s_w) -> (B, s_h, s_w, C, h, w)
    p = x.reshape(b, c, h, scale_h, w, scale_w).permute(0, 3, 5, 1, 2, 4)
    return p.reshape(b * scale_h * scale_w, c, h, w)


def dilated_merge(patches: torch.Tensor, scale_h: int, scale_w: int) -> torch.Tensor:
    """Inverse of `dilated_split`: (B*K, C, h, w) -> (B, C, s_h*h, s_w*w)."""
    n, c, h, w = patches.shape
    k = scale_h * scale_w
    if n % k:
        raise ValueError(f"{n} patch rows do not group into images of {k} patches")
    p = patches.reshape(n // k, scale_h, scale_w, c, h, w).permute(0, 3, 4, 1, 5, 2)
    return p.reshape(n // k, c, h * scale_h, w * scale_w)


# ----------------------------------------------------------------------------------------------
# Overlapping windows
# ----------------------------------------------------------------------------------------------
def _axis_starts(size: int, window: int, stride: int) -> list[int]:
    """CutDiffusion's get_views along one axis: ceil((size - window) / stride) + 1 windows on the stride grid,
    the last one shifted back to end at the border."""
    if size <= window:
        return [0]
    count = int((size - window) / stride - 1e-6) + 2
    starts = []
    for i in range(count):
        start = i * stride
        if start + window > size:
            start = size - window
        starts.append(max(start, 0))
    return starts


def window_layout(height: int, width: int, window_h: int, window_w: int, stride_h: int,
                  stride_w: int) -> list[Window]:
    """Row-major windows of (window_h, window_w) covering a (height, width) latent on a stride grid. A side no
    larger than its window gets one window of the whole side."""
    if min(window_h, window_w, stride_h, stride_w) < 1:
        raise ValueError("windows and strides must be at least 1 latent pixel")
    rows = _axis_starts(height, window_h, stride_h)
    cols = _axis_starts(width, window_w, stride_w)
    wh, ww = min(window_h, height), min(window_w, width)
    return [(t, t + wh, l, l + ww) for t in rows for l in cols]


def jitter_windows(windows: Sequence[Window], height: int, width: int, jitter_h: int, jitter_w: int,
                   rng: random.Random) -> list[Window]:
    """CutDiffusion's random jitter: every window moves by up to +-jitter per axis; a window touching one border
    moves only outwards from the interior (into the zero padding of `pad_for_jitter`), one touching both
    borders stays. Returned windows are in the padded frame (offset by jitter_h, jitter_w)."""

    def one(start, end, size, r):
        if r <= 0:
            return 0
        if start != 0 and end != size:
            return rng.randint(-r, r)
        if start == 0 and end != size:
            return rng.randint(-r, 0)
        if start != 0 and end == size:
            return rng.randint(0, r)
        return 0

    out = []
    for top, bottom, left, right in windows:
        dh = one(top, bottom, height, jitter_h)
        dw = one(left, right, width, jitter_w)
        out.append((top + dh + jitter_h, bottom + dh + jitter_h, left + dw + jitter_w, right + dw + jitter_w))
    return out


def pad_for_jitter(x: torch.Tensor, jitter_h: int, jitter_w: int) -> torch.Tensor:
    """Zero padding around the latent so jittered border windows stay inside (CutDiffusion pads with zeros)."""
    if jitter_h == 0 and jitter_w == 0:
        return x
    return torch.nn.functional.pad(x, (jitter_w, jitter_w, jitter_h, jitter_h), mode="constant", value=0.0)


def crop_padding(x: torch.Tensor, jitter_h: int, jitter_w: int) -> torch.Tensor:
    if jitter_h == 0 and jitter_w == 0:
        return x
    return x[:, :, jitter_h:x.shape[2] - jitter_h, jitter_w:x.shape[3] - jitter_w]


def split_windows(x: torch.Tensor, windows: Sequence[Window]) -> torch.Tensor:
    """(B, C, H, W) -> (len(windows)*B, C, wh, ww), window-major (rows j*B .. j*B+B-1 are window j)."""
    return torch.cat([x[:, :, t:b, l:r] for t, b, l, r in windows], dim=0)


Edges = tuple[bool, bool, bool, bool]
"""Which sides of a window lie inside the latent (top, bottom, left, right): True where it overlaps a neighbour."""


def window_edges(windows: Sequence[Window], height: int, width: int) -> list[Edges]:
    """Inner sides of un-jittered windows of a (height, width) latent."""
    return [(t > 0, b < height, l > 0, r < width) for t, b, l, r in windows]


def window_weights(window_h: int, window_w: int, blend: str, edges: Edges = (False, False, False, False),
                   dtype=torch.float32, device=None) -> torch.Tensor:
    """(1, 1, wh, ww) weights of one window. uniform: ones (CutDiffusion/MultiDiffusion). feather (our option):
    a linear ramp over a quarter of the window towards each inner side (never zero: the ramp starts at
    1/(ramp+1)), ones towards the latent's own borders."""
    if blend not in BLENDS:
        raise ValueError(f"blend must be one of {BLENDS}, got {blend!r}")
    if blend == "uniform" or not any(edges):
        return torch.ones(1, 1, window_h, window_w, dtype=dtype, device=device)

    def ramp(n, lead, trail):
        r = torch.ones(n, dtype=dtype, device=device)
        span = max(n // 4, 1)
        steps = torch.arange(1, span + 1, dtype=dtype, device=device) / (span + 1)
        if lead:
            r[:span] = torch.minimum(r[:span], steps)
        if trail:
            r[n - span:] = torch.minimum(r[n - span:], steps.flip(0))
        return r

    top, bottom, left, right = edges
    return (ramp(window_h, top, bottom)[:, None] * ramp(window_w, left, right)[None, :])[None, None]


def merge_windows(tiles: torch.Tensor, windows: Sequence[Window], shape: Sequence[int], blend: str = "uniform",
                  edges: Sequence[Edges] | None = None) -> torch.Tensor:
    """Weighted average of window tiles ((len(windows)*B, C, wh, ww), window-major) into a (B, C, H, W) tensor of
    `shape`. Pixels no window covers are 0. `edges` (for feather; default: from the windows and `shape`) names
    each window's inner sides. Sums in fp32 (fp64 for fp64 tiles); the result has the tiles' dtype. A pixel
    covered once with weight 1 comes back bit-identical."""
    b, c, height, width = shape
    if edges is None:
        edges = window_edges(windows, height, width)
    # accumulate in fp32 (half-precision sums of several windows lose visible precision), return the input dtype
    acc = torch.float64 if tiles.dtype == torch.float64 else torch.float32
    value = torch.zeros(b, c, height, width, dtype=acc, device=tiles.device)
    count = torch.zeros(1, 1, height, width, dtype=acc, device=tiles.device)
    for j, ((t, bt, l, r), edge) in enumerate(zip(windows, edges)):
        wgt = window_weights(bt - t, r - l, blend, edge, acc, tiles.device)
        value[:, :, t:bt, l:r] += tiles[j * b:(j + 1) * b].to(acc) * wgt
        count[:, :, t:bt, l:r] += wgt
    return torch.where(count > 0, value / count.clamp_min(torch.finfo(acc).tiny), value).to(tiles.dtype)
