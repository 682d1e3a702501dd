"""Spectral gains for latents: the FreeInit/FlexiEdit-style 3-D band mask that StyleSSP ships, and a per-channel
2-D Gaussian low-frequency reduction. Pure torch, no ComfyUI.

Frequencies are normalised as in the reference code: after an fftshift, index i of an axis of length N sits at
u = 2 i / N - 1 (so u = 0 at the centre index N // 2, the zero frequency). FFTs run in float64 (faithful: the
reference casts to float64) or float32 (float64 inputs stay float64), whatever the input dtype; results are cast
back to the input dtype. Inputs are never modified.
"""
from __future__ import annotations

import torch


def _axis(n: int, dtype=torch.float64) -> torch.Tensor:
    """The reference's normalised coordinate of each fftshifted index: 2 i / n - 1."""
    return 2.0 * torch.arange(n, dtype=dtype) / n - 1.0


def fft_dtype(dtype: torch.dtype, high_precision: bool) -> torch.dtype:
    return torch.float64 if (high_precision or dtype == torch.float64) else torch.float32


def reference_band_mask(channels: int, height: int, width: int, d_s: float = 0.3, d_t: float = 0.9,
                        d_l: float = 0.3) -> torch.Tensor:
    """StyleSSP's `gaussian_band_pass_filter` over a (channels, height, width) volume (float64).

    M = exp(-d_lp / (2 d_s^2)) + 1 - exp(-d_hp / (2 d_t^2)) with
    d_lp = ((d_s / d_l) u_c)^2 + u_h^2 + u_w^2 and d_hp = ((d_t / d_l) u_c)^2 + u_h^2 + u_w^2, the channel axis
    playing the reference's "temporal" axis. The reference comments "low-pass minus high-pass" but adds the two
    terms; so does this. All zeros when d_s or d_t is 0 (as in the reference)."""
    if d_s == 0 or d_t == 0:
        return torch.zeros(channels, height, width, dtype=torch.float64)
    uc, uh, uw = _axis(channels), _axis(height), _axis(width)
    spatial = uh.view(1, -1, 1) ** 2 + uw.view(1, 1, -1) ** 2
    d_lp = ((d_s / d_l) * uc).view(-1, 1, 1) ** 2 + spatial
    d_hp = ((d_t / d_l) * uc).view(-1, 1, 1) ** 2 + spatial
    return torch.exp(-d_lp / (2.0 * d_s ** 2)) + (1.0 - torch.exp(-d_hp / (2.0 * d_t ** 2)))


def apply_shifted_gain(x: torch.Tensor, gain: torch.Tensor, dims: tuple[int, ...], high_precision: bool = True
                       ) -> torch.Tensor:
    """real(ifftn(ifftshift(fftshift(fftn(x)) * gain))) over `dims`; `gain` is laid out in fftshifted order and
    broadcasts against x. Returns x's dtype."""
    wd = fft_dtype(x.dtype, high_precision)
    spec = torch.fft.fftshift(torch.fft.fftn(x.to(wd), dim=dims), dim=dims)
    spec = spec * gain.to(device=x.device, dtype=wd)
    out = torch.fft.ifftn(torch.fft.ifftshift(spec, dim=dims), dim=dims).real
    return out.to(x.dtype)


def gaussian_lowfreq_gain(height: int, width: int, radius: float, strength: float) -> torch.Tensor:
    """Per-channel 2-D gain 1 - strength * exp(-r^2 / (2 radius^2)), r^2 = u_h^2 + u_w^2 (fftshifted layout,
    float64): exactly 1 - strength at the zero frequency, 1 - strength * e^-1/2 at r = radius, -> 1 far out.
    radius 0 or strength 0 gives the identity gain."""
    if radius <= 0.0 or strength == 0.0:
        return torch.ones(height, width, dtype=torch.float64)
    r2 = _axis(height).view(-1, 1) ** 2 + _axis(width).view(1, -1) ** 2
    return 1.0 - strength * torch.exp(-r2 / (2.0 * radius ** 2))
