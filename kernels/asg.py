"""ASGDiffusion (Li et al., "ASGDiffusion: Parallel High-Resolution Generation with Asynchronous Structure
Guidance", arXiv 2412.06163) on its CutDiffusion base (Lin et al., arXiv 2404.15141, `lmbxmu/CutDiffusion`).

There is no official ASGDiffusion code. What follows is the paper's method on CutDiffusion's released sampler;
every choice the paper leaves open is marked [choice] here and listed in the README.

Target latent (B, C, s_h*h, s_w*w), native size (h, w), K = s_h*s_w patches (s_h, s_w are the integer scale
factors, inputs of the node; the target size is the latent's); the schedule is split at
`structure_fraction` (paper: 25 + 25 of 50 steps).

Structure stage (`StructureDenoiser`), every model evaluation:
  1. the latent is read as K dilated native-size patches (`patches.dilated_split`; CutDiffusion draws K
     independent patch noises, which de-interleaving one i.i.d. target noise gives in distribution);
  2. pixel interaction (CutDiffusion, ``shuffle``): for every (channel, y, x) a random permutation of the patch
     index is applied before the model and undone on its output [choice: on by default, as the CutDiffusion
     README runs it; argsort of uniform noise from a per-run seeded generator instead of a randperm loop];
  3. ONE model evaluation of all B*K patch rows (the caller's CFG happens inside that evaluation);
  4. structure guidance (paper Eq. 3-4), in the model's noise parametrisation e = (x - D) / sigma (epsilon for
     SD1.x/SDXL, velocity for flow models), for every patch k > 0 of each image:
         e~_k = e_k + w * M_k * (e_0 - e_k)
     patch 0 is the structure ("key") patch and is not changed. `asynchronous` (the paper's ASG): e_0 is the
     key patch's prediction from the PREVIOUS model evaluation (one step stale), so no patch waits for the key
     patch inside a step; the first evaluation has no stale prediction and is unguided [choice]. Synchronous
     (option): e_0 of the same evaluation.
  5. M_k (paper: the normalised cross-attention heat map from the UNet up-sampling blocks): `heat_from_attention`
     is the attention mass of each image token on every text token but the first (BOS) one, averaged over
     heads and over every cross-attention layer of the output blocks (each resized bilinearly to the patch
     grid), taken from the conditional pass of the same evaluation [choice: which tokens]; `normalise_mask`
     scales each patch's map to [0, 1] by min-max [choice]. mask="none" is the paper's unmasked Eq. 3.
  At the stage switch the patches are interleaved back (`patches.dilated_merge`, CutDiffusion's switch).

Detail stage (`DetailDenoiser`): MultiDiffusion-style native-size windows with stride = window * (1 - overlap)
(CutDiffusion: 128 latent window, stride 64), random jitter of up to (window - stride) // 4 with zero padding
(CutDiffusion), windows denoised in batches of `window_batch` and averaged per pixel. CutDiffusion averages
the windows' scheduler outputs x_{t-1}; averaging the denoised predictions instead is the same for every
sampler whose step is affine in the denoised prediction with coefficients shared by all pixels (Euler, DDIM,
DPM-Solver++ 2M, ...), and lets any ComfyUI sampler run the stage.

Pure torch; the model is any callable ``model(x, sigma, **extra) -> denoised`` (ComfyUI's k-diffusion
convention). Inputs are never modified.
"""
from __future__ import annotations

import dataclasses
import math
import random
from dataclasses import dataclass
from typing import Callable

import torch

from . import patches as P

MASKS = ("cross_attention", "none", "auto")
"""auto: cross_attention where the model has text cross-attention layers (UNet families), none elsewhere
(SD3/Flux joint attention): `resolve_mask`."""
BLENDS = P.BLENDS
LATENT_DOWNSCALE = 8
"""Pixels per latent pixel of every supported family (SD1.x, SDXL, SD3, Flux VAEs), for messages."""
MAX_SCALE = 8
"""Largest patch grid side (the paper reports a collapse at 4x4 already)."""


@dataclass(frozen=True)
class ASGParams:
    """Single source of defaults for the ASGDiffusion kernel and node."""

    scale_width: int = 2
    """Patches across: target width / native width (paper's main setting 2048 from SDXL's 1024: 2)."""
    scale_height: int = 2
    """Patches down: target height / native height."""
    structure_fraction: float = 0.5
    """Share of the steps in the structure stage (paper and CutDiffusion: 25 of 50 steps)."""
    guidance_scale: float = 0.5
    """w of Eq. 3-4, constant over the structure stage. The paper gives no value (no code; its ablation shows
    large values blur): 0.5 is our choice. 0 = CutDiffusion (no structure guidance)."""
    mask: str = "auto"
    """cross_attention (paper, Eq. 4; UNet families), none (Eq. 3, any family) or auto (cross_attention where the
    model has cross-attention layers, else none: the default runs on every family)."""
    asynchronous: bool = True
    """True: the key patch's prediction one model evaluation stale (paper's ASG); False: the same evaluation."""
    pixel_interaction: bool = True
    """CutDiffusion's per-pixel random permutation of the patches in the structure stage."""
    window_overlap: float = 0.5
    """Detail-stage window overlap; stride = window * (1 - overlap) (CutDiffusion: 0.5, stride 64 of 128)."""
    jitter: bool = True
    """CutDiffusion's random window jitter (up to (window - stride) // 4) in the detail stage."""
    blend: str = "uniform"
    """uniform (CutDiffusion's average) or feather (our option: linear ramps on inner window sides)."""
    window_batch: int = 4
    """Detail-stage windows per model evaluation (memory bound; CutDiffusion's view_batch_size)."""
    steps: int = 50
    """Node default: total steps of both stages (paper: 50 = 25 + 25). The kernel follows the run's schedule."""
    cfg: float = 7.5
    """Node default: CFG scale of both stages (CutDiffusion's script: 7.5)."""
    sampler_name: str = "euler"
    """Node default: the k-diffusion sampler run in each stage (CutDiffusion: Euler)."""
    scheduler: str = "normal"
    """Node default: the noise schedule (no paper value; ComfyUI's default)."""
    seed: int = 0
    """Node default: the noise seed."""

    def replace(self, **changes) -> "ASGParams":
        return dataclasses.replace(self, **changes)

    def scales(self) -> tuple[int, int]:
        return self.scale_height, self.scale_width

    def validate(self) -> list[str]:
        problems = []
        for name in ("scale_width", "scale_height"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_SCALE:
                problems.append(f"{name} must be a whole number from 1 to {MAX_SCALE} (the dilated patch layout "
                                f"interleaves whole native-size patches), got {value!r}")
        if not 0.0 <= self.structure_fraction <= 1.0:
            problems.append(f"structure_fraction must be in [0, 1], got {self.structure_fraction}")
        if not math.isfinite(self.guidance_scale) or not 0.0 <= self.guidance_scale <= 1.0:
            problems.append(f"guidance_scale must be in [0, 1], got {self.guidance_scale}")
        if self.mask not in MASKS:
            problems.append(f"mask must be one of {MASKS}, got {self.mask!r}")
        if not 0.0 <= self.window_overlap < 1.0:
            problems.append(f"window_overlap must be in [0, 1), got {self.window_overlap}")
        if self.blend not in BLENDS:
            problems.append(f"blend must be one of {BLENDS}, got {self.blend!r}")
        if self.window_batch < 1:
            problems.append(f"window_batch must be at least 1, got {self.window_batch}")
        return problems


def resolve_mask(mask: str, has_cross_attention: bool) -> str:
    """The mask a run uses: `auto` -> cross_attention when the model has text cross-attention layers, else none."""
    if mask == "auto":
        return "cross_attention" if has_cross_attention else "none"
    return mask


def patch_size(height: int, width: int, scale_h: int, scale_w: int) -> tuple[int, int]:
    """Native (h, w) patch size in latent pixels of a (height, width) latent split into scale_h x scale_w patches;
    ValueError unless the latent divides into whole patches (the dilated layout interleaves whole patches)."""
    bad = []
    if height % scale_h:
        bad.append(f"height {height * LATENT_DOWNSCALE} px / {scale_h} = {height * LATENT_DOWNSCALE / scale_h:.6g} px")
    if width % scale_w:
        bad.append(f"width {width * LATENT_DOWNSCALE} px / {scale_w} = {width * LATENT_DOWNSCALE / scale_w:.6g} px")
    if bad:
        raise ValueError("ASGDiffusion needs integer scale factors (the target must be a whole number of native-size "
                         f"patches of whole latent pixels), got {' and '.join(bad)}; use a target whose width is a "
                         f"multiple of {LATENT_DOWNSCALE * scale_w} px and height a multiple of "
                         f"{LATENT_DOWNSCALE * scale_h} px (e.g. 2048x2048 with scale 2x2 for SDXL's 1024x1024)")
    return height // scale_h, width // scale_w


def split_steps(steps: int, structure_fraction: float) -> int:
    """Number of structure-stage steps (CutDiffusion: steps i < steps * proportion)."""
    return min(steps, max(0, math.ceil(steps * structure_fraction - 1e-9)))


# ----------------------------------------------------------------------------------------------
# Pixel interaction
# ----------------------------------------------------------------------------------------------
def interaction_permutation(batch: int, k: int, shape: tuple[int, int, int], generator: torch.Generator,
                            device=None) -> torch.Tensor:
    """(B, K, C, h, w) int64: at every (c, y, x) of image b, a uniform random permutation of the K patches;
    model row j takes patch perm[b, j, c, y, x] there."""
    noise = torch.rand((batch, k) + tuple(shape), generator=generator)
    return noise.argsort(dim=1).to(device)


def permute_rows(x: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    """(B*K, C, h, w) patch rows -> model rows (gather along the patch index)."""
    b, k = perm.shape[:2]
    return x.reshape((b, k) + x.shape[1:]).gather(1, perm).reshape(x.shape)


def unpermute_rows(y: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    """Inverse of `permute_rows` (scatter back)."""
    b, k = perm.shape[:2]
    src = y.reshape((b, k) + y.shape[1:])
    return torch.empty_like(src).scatter_(1, perm, src).reshape(y.shape)


def unpermute_heat(heat: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    """(B*K, h, w) per-model-row maps -> per-patch maps: patch k's map at (y, x) is the mean over channels of
    the map of the row that carried its channel c there."""
    b, k, c = perm.shape[:3]
    rows = heat.reshape(b, k, 1, *heat.shape[1:]).expand(b, k, c, *heat.shape[1:])
    return torch.empty_like(rows).scatter_(1, perm, rows).mean(dim=2).reshape(heat.shape)


# ----------------------------------------------------------------------------------------------
# Cross-attention mask
# ----------------------------------------------------------------------------------------------
def heat_from_attention(q: torch.Tensor, k: torch.Tensor, heads: int, max_elements: int = 2 ** 24) -> torch.Tensor:
    """(b, N) attention mass of each query token on every key token but the first (the BOS token, which soaks
    up the attention of background pixels), averaged over heads. q: (b, N, heads*d), k: (b, T, heads*d); the
    probabilities are computed in fp32, a few heads at a time (at most `max_elements` probabilities)."""
    b, n, inner = q.shape
    d = inner // heads
    qh = q.reshape(b, n, heads, d).transpose(1, 2).float()
    kh = k.reshape(b, k.shape[1], heads, d).transpose(1, 2).float()
    per_head = max(1, max_elements // max(1, b * n * k.shape[1]))
    total = torch.zeros(b, n, dtype=torch.float32, device=q.device)
    for h0 in range(0, heads, per_head):
        scores = torch.matmul(qh[:, h0:h0 + per_head], kh[:, h0:h0 + per_head].transpose(-1, -2)) * d ** -0.5
        total += (1.0 - scores.softmax(dim=-1)[..., 0]).sum(dim=1)
    return total / heads


def resize_map(heat: torch.Tensor, grid: tuple[int, int], size: tuple[int, int]) -> torch.Tensor:
    """(b, N) token map on a (gh, gw) grid -> (b, h, w), bilinear."""
    m = heat.reshape(heat.shape[0], 1, grid[0], grid[1])
    if tuple(grid) != tuple(size):
        m = torch.nn.functional.interpolate(m, size=size, mode="bilinear", align_corners=False)
    return m[:, 0]


def normalise_mask(heat: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """(R, h, w) maps -> (R, 1, h, w) in [0, 1], min-max per row; a flat map (no information) becomes ones."""
    flat = heat.reshape(heat.shape[0], -1).float()
    lo, hi = flat.min(dim=1, keepdim=True).values, flat.max(dim=1, keepdim=True).values
    span = hi - lo
    m = torch.where(span > eps, (flat - lo) / span.clamp_min(eps), torch.ones_like(flat))
    return m.reshape(heat.shape[0], 1, *heat.shape[1:])


# ----------------------------------------------------------------------------------------------
# Structure guidance
# ----------------------------------------------------------------------------------------------
def structure_guidance(denoised: torch.Tensor, x: torch.Tensor, sigma: torch.Tensor, reference: torch.Tensor,
                       scale: float, k: int, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Eq. 3-4 on denoised predictions: with e = (x - D) / sigma, e~_k = e_k + w * M_k * (e_ref - e_k) for every
    patch k > 0, i.e. D~_k = D_k - sigma * w * M_k * (e_ref - e_k). Patch 0 rows come back unchanged.

    denoised, x: (B*K, C, h, w); sigma: (B*K,) or scalar, > 0; reference: (B, C, h, w) key-patch noise
    prediction; mask: (B*K, 1, h, w) in [0, 1] or None (unmasked, Eq. 3)."""
    rows = denoised.shape[0]
    b = rows // k
    s = sigma.reshape(-1, 1, 1, 1).to(torch.float32) if isinstance(sigma, torch.Tensor) else torch.tensor(
        float(sigma)).reshape(1, 1, 1, 1)
    s = s.to(denoised.device)
    eps = (x.float() - denoised.float()) / s
    ref = reference.float().repeat_interleave(k, dim=0)
    pull = scale * (ref - eps)
    if mask is not None:
        pull = pull * mask.float()
    keep = torch.ones(b, k, 1, 1, 1, dtype=torch.bool, device=denoised.device)
    keep[:, 1:] = False
    keep = keep.reshape(rows, 1, 1, 1)
    guided = denoised.float() - s * pull
    return torch.where(keep, denoised, guided.to(denoised.dtype))


class StructureDenoiser:
    """The structure stage as a denoiser over (B*K, C, h, w) patch rows; one instance per sampling run.

    `heat_maps()` (mask="cross_attention") returns the (B*K, h, w) maps recorded during the last model call, in
    model-row order, or None when nothing was recorded; `on_call()` runs before each model call (interrupts)."""

    def __init__(self, model: Callable, params: ASGParams, k: int, seed: int,
                 heat_maps: Callable[[], torch.Tensor | None] | None = None,
                 on_call: Callable[[], None] | None = None,
                 on_missing_mask: Callable[[], None] | None = None):
        self.model, self.params, self.k = model, params, k
        self.heat_maps, self.on_call, self.on_missing_mask = heat_maps, on_call, on_missing_mask
        self.generator = torch.Generator().manual_seed(int(seed) % (2 ** 63))
        self.previous_reference: torch.Tensor | None = None
        self.calls = 0
        self.guided_calls = 0

    def __getattr__(self, name):
        # Samplers read attributes of the model they are given (e.g. inner_model.model_sampling): pass them
        # through to the wrapped model.
        if name in ("model", "__setstate__"):
            raise AttributeError(name)
        return getattr(self.model, name)

    @property
    def wants_mask(self) -> bool:
        return self.k > 1 and self.params.mask == "cross_attention" and self.params.guidance_scale != 0.0

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, **extra) -> torch.Tensor:
        if self.on_call is not None:
            self.on_call()
        self.calls += 1
        k = self.k
        if k == 1:
            return self.model(x, sigma, **extra)
        b = x.shape[0] // k
        perm = None
        if self.params.pixel_interaction:
            perm = interaction_permutation(b, k, tuple(x.shape[1:]), self.generator, x.device)
            denoised = unpermute_rows(self.model(permute_rows(x, perm), sigma, **extra), perm)
        else:
            denoised = self.model(x, sigma, **extra)
        heat = self.heat_maps() if self.wants_mask and self.heat_maps is not None else None
        s = sigma.reshape(-1)[:1].float()
        if float(s) <= 0.0:
            return denoised
        current = ((x[::k].float() - denoised[::k].float()) / s).detach()
        reference = self.previous_reference if self.params.asynchronous else current
        self.previous_reference = current
        if reference is None or self.params.guidance_scale == 0.0:
            return denoised
        mask = None
        if self.params.mask == "cross_attention":
            if heat is None:
                if self.on_missing_mask is not None:
                    self.on_missing_mask()
            else:
                if perm is not None:
                    heat = unpermute_heat(heat, perm)
                mask = normalise_mask(heat).to(denoised.device)
        self.guided_calls += 1
        return structure_guidance(denoised, x, s, reference.to(denoised.device), self.params.guidance_scale, k,
                                  mask)


class DetailDenoiser:
    """The detail stage as a denoiser over the full (B, C, H, W) latent; one instance per sampling run."""

    def __init__(self, model: Callable, params: ASGParams, window: tuple[int, int], seed: int,
                 on_chunk: Callable[[], None] | None = None):
        self.model, self.params, self.window = model, params, window
        self.rng = random.Random(int(seed))
        self.on_chunk = on_chunk
        self.calls = 0
        self.model_calls = 0

    def __getattr__(self, name):
        # Samplers read attributes of the model they are given (e.g. inner_model.model_sampling): pass them
        # through to the wrapped model.
        if name in ("model", "__setstate__"):
            raise AttributeError(name)
        return getattr(self.model, name)

    def layout(self, height: int, width: int):
        wh, ww = self.window
        sh = max(1, int(round(wh * (1.0 - self.params.window_overlap))))
        sw = max(1, int(round(ww * (1.0 - self.params.window_overlap))))
        windows = P.window_layout(height, width, wh, ww, sh, sw)
        jh = (wh - sh) // 4 if self.params.jitter and height > wh else 0
        jw = (ww - sw) // 4 if self.params.jitter and width > ww else 0
        return windows, jh, jw

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, **extra) -> torch.Tensor:
        self.calls += 1
        b, c, height, width = x.shape
        windows, jh, jw = self.layout(height, width)
        if len(windows) == 1 and windows[0] == (0, height, 0, width):
            if self.on_chunk is not None:
                self.on_chunk()
            self.model_calls += 1
            return self.model(x, sigma, **extra)
        edges = P.window_edges(windows, height, width)
        placed = P.jitter_windows(windows, height, width, jh, jw, self.rng) if (jh or jw) else list(windows)
        xp = P.pad_for_jitter(x, jh, jw)
        sigma_rows = sigma.reshape(-1)
        outs = []
        n = self.params.window_batch
        for i in range(0, len(placed), n):
            if self.on_chunk is not None:
                self.on_chunk()
            chunk = placed[i:i + n]
            tiles = P.split_windows(xp, chunk)
            s = sigma_rows.repeat(len(chunk)) if sigma_rows.numel() == b else sigma_rows[:1].expand(tiles.shape[0])
            self.model_calls += 1
            outs.append(self.model(tiles, s, **extra))
        merged = P.merge_windows(torch.cat(outs, dim=0), placed, xp.shape, self.params.blend, edges)
        return P.crop_padding(merged, jh, jw)
