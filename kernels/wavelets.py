"""2-D discrete wavelet transforms (DWT / inverse DWT) for the pack, through the maintained `ptwt` library
(PyTorch Wavelet Toolbox; built on PyWavelets' filter banks, GPU capable).

The DiffuseHigh reference uses `pytorch_wavelets.DWTForward(J=1, wave="db4", mode="symmetric")`, whose
coefficients equal PyWavelets' `pywt.dwt2(x, "db4", mode="symmetric")`; `ptwt.wavedec2` with the same
wavelet and mode computes the same coefficients (tests/test_kernels_diffusehigh.py checks both against
PyWavelets). Coefficient layout: `low` is the coarsest approximation band (B, C, h, w) with
h = floor((H + L - 1) / 2) per level (db4: L = 8, so (H + 7) // 2); `highs` lists the detail bands per level,
coarsest first, each a tuple (horizontal, vertical, diagonal) of (B, C, h_j, w_j) tensors.

Transforms run in float32 (float64 stays float64) on the input's device; results are cast back to the input
dtype. Inputs are never modified. No ComfyUI import.
"""
from __future__ import annotations

import functools
import re

import torch

WAVELETS = ("db4", "haar")
"""Wavelets offered by the nodes: db4 (the reference's) and Haar."""
MODE = "symmetric"
"""Boundary extension of the reference (pytorch_wavelets / PyWavelets `symmetric`: half-sample symmetric)."""

MIN_PTWT = (0, 1, 9)
"""Oldest ptwt checked against PyWavelets here (tests/test_kernels_diffusehigh.py): 0.1.9 is also what pip installs
on Python 3.10, where ptwt 1.x (Python >= 3.11) is not available; 1.x computes the same transforms."""
_PTWT_FIX = ("pip install -U \"ptwt>=0.1.9\" in ComfyUI's Python (ptwt 1.x needs Python >= 3.11; on Python 3.10 "
             "pip installs 0.1.9, which computes the same transforms)")


def _version_tuple(text: str) -> tuple[int, ...]:
    parts = []
    for piece in text.split(".")[:3]:
        digits = re.match(r"\d+", piece)
        if digits is None:
            break
        parts.append(int(digits.group()))
    return tuple(parts)


@functools.lru_cache(maxsize=1)
def _ptwt():
    """The ptwt module, imported on first use (the pack loads without it; only the wavelet nodes need it);
    a missing or too old ptwt is a clear error naming the fix."""
    try:
        import ptwt
    except ImportError as e:
        raise ImportError("the TFG wavelet kernels (DiffuseHigh) need the `ptwt` package (PyTorch Wavelet Toolbox), "
                          f"which is not installed. Fix: {_PTWT_FIX}.") from e
    try:
        from importlib.metadata import version
        installed = version("ptwt")
    except Exception:  # noqa: BLE001  no distribution metadata (e.g. a source checkout): trust it
        installed = None
    if installed is not None and _version_tuple(installed) < MIN_PTWT:
        raise ImportError(f"the TFG wavelet kernels (DiffuseHigh) need ptwt >= "
                          f"{'.'.join(map(str, MIN_PTWT))}, but ptwt {installed} is installed (older releases "
                          f"are not checked against PyWavelets). Fix: {_PTWT_FIX}.")
    return ptwt


def _work_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def dwt2(x: torch.Tensor, wavelet: str = "db4", levels: int = 1, mode: str = MODE):
    """Multi-level 2-D DWT over the last two dimensions of `x` (..., H, W).

    Returns (low, highs): the level-`levels` approximation and the detail tuples, coarsest level first."""
    if wavelet not in WAVELETS:
        raise ValueError(f"unknown wavelet {wavelet!r}; one of {WAVELETS}")
    if levels < 1:
        raise ValueError("levels must be >= 1")
    coeffs = _ptwt().wavedec2(x.to(_work_dtype(x)), wavelet, mode=mode, level=int(levels))
    low = coeffs[0].to(x.dtype)
    highs = [tuple(band.to(x.dtype) for band in level) for level in coeffs[1:]]
    return low, highs


def idwt2(low: torch.Tensor, highs, wavelet: str = "db4", size: tuple[int, int] | None = None) -> torch.Tensor:
    """Inverse of `dwt2`: reconstruct from the approximation `low` and the detail tuples `highs` (coarsest first).

    The synthesis of a symmetric-mode transform yields up to one extra row/column per level for odd sizes;
    `size` = (H, W) crops the result to the original size."""
    work = _work_dtype(low)
    levels = [tuple(band.to(work) for band in level) for level in highs]
    try:
        from ptwt.constants import WaveletDetailTuple2d
        levels = [WaveletDetailTuple2d(*level) for level in levels]
    except ImportError:  # older ptwt takes plain tuples
        pass
    out = _ptwt().waverec2((low.to(work), *levels), wavelet)
    if size is not None:
        out = out[..., : size[0], : size[1]]
    return out.to(low.dtype)


def low_band(x: torch.Tensor, wavelet: str = "db4", levels: int = 1) -> torch.Tensor:
    """The approximation (low-frequency) band of `x` at the coarsest of `levels` levels."""
    return dwt2(x, wavelet, levels)[0]
