"""TALE: training-free cross-domain image composition via adaptive latent manipulation and energy-guided
optimisation (Pham et al., ACM MM 2024, arXiv 2408.03637). Pure torch, no ComfyUI import.

The algorithm (re-implemented from the paper and the released diffusers pipeline's maths):

1. Both the background and the foreground (the object placed on a background-sized black canvas) are encoded
   and inverted. **Selective initiation**: at step T' the composite latent is the background's latent with the
   foreground's latent pasted under the object mask (`paste`).
2. For the next tau steps (T' < i <= T'+tau), before each step the composite is reset to the background's latent
   outside the object (`keep_object`), and **adaptive latent normalisation** moves the object region toward the
   background's per-channel statistics: `a_j * AdaIN(obj; mean/std of the whole background latent) +
   (1 - a_j) * obj` with a_j = adain_max * j / tau (0.1, 0.2, ..., 0.5 for the defaults; `adain_blend`).
3. On the same steps, **energy-guided latent optimisation**: `inner_steps` times, the composite's predicted clean
   latent (CFG `cfg`) is decoded and scored by an energy, and the composite moves down its gradient inside the
   object only: x <- x - dE/dx * mask (step size 1; the weights fold the learning rate). The reference's energy is
   `text_weight * (1 - cos(CLIP_img(I), CLIP_txt(prompt))) + style_weight * ||Gram(F(I[object box])) -
   Gram(F(background))||_F`, F = patch tokens after CLIP-vision layer `style_layer` (`clip_energy`).
   The released pipeline detaches the style term (it stacks the norms with `torch.tensor`), so only the text term
   moves the latent; `style_gradient="kept"` fixes that, `"detached"` reproduces it.
4. The rest of the schedule is ordinary sampling (`dpmpp_2m_step`, `euler_step`: the host's arithmetic).

The loop that strings these together, with the denoisers passed in as functions, is kernels/tale_loop.py.

Geometry (`place_object`, `latent_mask`) works on a background-sized canvas, so the object's latent box and the
composite's latent box are the same array positions: no integer-rounding mismatch, at any border.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

ENERGIES = ("clip", "latent", "none")
STYLE_GRADIENTS = ("kept", "detached")
HISTORIES = ("reset", "reblend", "reference")
TRAJECTORIES = ("inverted", "replay")
SOLVERS = ("dpmpp_2m", "euler")
PLACEMENTS = ("mask", "box")


@dataclass(frozen=True)
class PlacementParams:
    """Where the object goes on the background (the reference's location.png is placement "mask")."""

    mode: str = "box"
    """One of PLACEMENTS. mask: the object is fitted (aspect kept) into the bounding box of a placement mask and
    centred in it; box: centred at (box_x, box_y), scaled by box_scale."""
    box_x: float = 0.5
    """mode box: horizontal centre as a fraction of the background width."""
    box_y: float = 0.5
    """mode box: vertical centre as a fraction of the background height."""
    box_scale: float = 1.0
    """mode box: the object's size relative to its size in the foreground image (1 = same pixels)."""

    def validate(self) -> list[str]:
        problems = []
        if self.mode not in PLACEMENTS:
            problems.append(f"placement must be one of {PLACEMENTS}, got {self.mode!r}")
        for name in ("box_x", "box_y"):
            v = getattr(self, name)
            if not (math.isfinite(v) and 0.0 <= v <= 1.0):
                problems.append(f"{name} must be in [0, 1], got {v}")
        if not (math.isfinite(self.box_scale) and self.box_scale > 0):
            problems.append(f"box_scale must be > 0, got {self.box_scale}")
        return problems


@dataclass(frozen=True)
class TALEParams:
    """Single source of defaults for the TALE kernel and node (reference: `main.py` of tkpham3105/TALE)."""

    steps: int = 20
    """Sampling steps of the whole schedule (reference: 20, DPM-Solver++ 2M)."""
    t_prime: int = 12
    """T': the step at which the object is pasted into the background (selective initiation)."""
    tau: int = 5
    """Steps after T' with adaptive latent normalisation and energy optimisation (0 = paste only)."""
    cfg: float = 10.0
    """CFG scale of the composite (reference comp_guidance_scale 10)."""
    text_weight: float = 15.0
    """Weight of the image-text term 1 - cos(CLIP image, prompt)."""
    style_weight: float = 0.15
    """Weight of the Gram style distance (CLIP tokens; with energy=latent: latent patch Gram)."""
    latent_weight: float = 0.02
    """energy=latent only: weight of the latent style energy (ours, no reference value; per latent pixel, so the
    step does not depend on the object's size)."""
    inner_steps: int = 3
    """Gradient steps per normalisation step (reference repeat=3)."""
    adain_max: float = 0.5
    """AdaIN weight at the last of the tau steps; it rises linearly from adain_max/tau (0.1 -> 0.5)."""
    energy: str = "none"
    """One of ENERGIES: clip (VAE decode + CLIP vision, the reference), latent (no decoder, no CLIP: Gram of 3x3
    latent patches of the object's predicted clean latent vs the clean background latent), none (no gradient:
    initiation + normalisation only).

    Default none, not the reference's clip: clip needs an optional CLIP vision input (and on SD1.x a text target
    the SD1 text encoder cannot give), so it cannot be a default that runs as it is. Of the two that need no
    optional input, none is the one that runs wherever plain sampling runs: measured on an H200 (SDXL, 1024²,
    20/12/5/3) it took 4.3 s and 6.3 GiB peak against 13.7 s and 22.3 GiB for latent (clip: 13.4 s, 37.8 GiB),
    works with a ControlNet, and has no untuned weight (the latent energy is ours, without a reference value)."""
    style_gradient: str = "kept"
    """One of STYLE_GRADIENTS: kept (our fix: the style term has a gradient), detached (the released code)."""
    style_layer: int = 2
    """CLIP-vision transformer layer (0-based) whose patch tokens form the Gram matrix (reference: 2)."""
    solver: str = "dpmpp_2m"
    """One of SOLVERS (reference: DPM-Solver++ 2M)."""
    scheduler: str = "normal"
    """ComfyUI scheduler name for the sigmas."""
    history: str = "reset"
    """One of HISTORIES: what the multistep solver uses as its previous prediction at the paste step T'.
    reset: none (a first-order step, like starting a sampler at T'); reblend: the background's and foreground's
    predictions at T'-1 blended by the object mask; reference: as the released code, the prediction of a composite
    pasted at step 0 and denoised up to T' only for this (T' extra CFG passes; the inversion then goes to step 0)."""
    placement: PlacementParams = PlacementParams()
    """Where the object goes (read by the node's placement, not by the loop)."""
    trajectories: str = "inverted"
    """One of TRAJECTORIES: where the background/foreground latents at steps T'..T'+tau come from. inverted: the
    inversion's own states (inversion stops at T'; no denoising before T' at all); replay: the reference's way,
    invert to the first step and denoise background and foreground again alongside (more model passes)."""

    def validate(self) -> list[str]:
        problems = []
        if self.steps < 1:
            problems.append(f"steps must be >= 1, got {self.steps}")
        if not 0 <= self.t_prime < self.steps:
            problems.append(f"t_prime must be in [0, steps-1] = [0, {self.steps - 1}], got {self.t_prime}")
        if self.tau < 0:
            problems.append(f"tau must be >= 0, got {self.tau}")
        elif self.t_prime + self.tau > self.steps - 1:
            problems.append(f"t_prime + tau must be at most steps - 1 = {self.steps - 1} (the normalisation steps "
                            f"must lie inside the schedule), got {self.t_prime} + {self.tau}")
        if self.inner_steps < 0:
            problems.append(f"inner_steps must be >= 0, got {self.inner_steps}")
        for name in ("cfg", "text_weight", "style_weight", "latent_weight", "adain_max"):
            v = getattr(self, name)
            if not math.isfinite(v):
                problems.append(f"{name} must be finite, got {v}")
        if self.text_weight < 0 or self.style_weight < 0 or self.latent_weight < 0:
            problems.append("text_weight, style_weight and latent_weight must be >= 0")
        if not 0.0 <= self.adain_max <= 1.0:
            problems.append(f"adain_max must be in [0, 1], got {self.adain_max}")
        for name, options in (("energy", ENERGIES), ("style_gradient", STYLE_GRADIENTS), ("history", HISTORIES),
                              ("trajectories", TRAJECTORIES), ("solver", SOLVERS)):
            if getattr(self, name) not in options:
                problems.append(f"{name} must be one of {options}, got {getattr(self, name)!r}")
        if self.style_layer < 0:
            problems.append(f"style_layer must be >= 0, got {self.style_layer}")
        return problems + self.placement.validate()

    @property
    def t_prime_percent(self) -> float:
        """T' as a fraction of the schedule (reference 12/20 = 0.6)."""
        return self.t_prime / self.steps

    @property
    def tau_percent(self) -> float:
        """tau as a fraction of the schedule (reference 5/20 = 0.25)."""
        return self.tau / self.steps

    def replace(self, **changes) -> "TALEParams":
        return dataclasses.replace(self, **changes)

    @property
    def optimising(self) -> bool:
        """True when the window steps take energy gradients."""
        if self.energy == "none" or self.inner_steps <= 0 or self.tau <= 0:
            return False
        if self.energy == "latent":
            return self.latent_weight > 0
        return self.text_weight > 0 or self.style_weight > 0

    def window(self) -> range:
        """Step indices with normalisation (and optimisation): T'+1 .. T'+tau."""
        return range(self.t_prime + 1, self.t_prime + self.tau + 1)


def schedule_steps(steps: int, t_prime_percent: float, tau_percent: float) -> tuple[int, int]:
    """(T', tau) in steps from fractions of the schedule: round(fraction * steps), tau at least 1 step when its
    fraction is > 0 (20 steps, 0.6, 0.25 -> 12, 5: the reference)."""
    t_prime = int(round(t_prime_percent * steps))
    tau = int(round(tau_percent * steps))
    if tau_percent > 0 and tau == 0:
        tau = 1
    return t_prime, tau


# ----------------------------------------------------------------------------------------------
# Geometry
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Box:
    """A half-open pixel (or latent) rectangle: rows top..bottom-1, columns left..right-1."""

    top: int
    left: int
    height: int
    width: int

    @property
    def bottom(self) -> int:
        return self.top + self.height

    @property
    def right(self) -> int:
        return self.left + self.width

    def slices(self) -> tuple[slice, slice]:
        return slice(self.top, self.bottom), slice(self.left, self.right)


def mask_bbox(mask: torch.Tensor, threshold: float = 0.5) -> Box | None:
    """Bounding box of mask >= threshold of a (H, W) mask; None when empty."""
    on = mask >= threshold
    rows = torch.nonzero(on.any(dim=1)).flatten()
    cols = torch.nonzero(on.any(dim=0)).flatten()
    if rows.numel() == 0:
        return None
    top, bottom = int(rows[0]), int(rows[-1]) + 1
    left, right = int(cols[0]), int(cols[-1]) + 1
    return Box(top, left, bottom - top, right - left)


def fit_size(obj_h: int, obj_w: int, box_h: float, box_w: float) -> tuple[int, int]:
    """The object's size scaled to fit inside a box_h x box_w box, aspect kept (at least 1 pixel)."""
    scale = min(box_h / obj_h, box_w / obj_w)
    return max(1, int(round(obj_h * scale))), max(1, int(round(obj_w * scale)))


class PlacementError(ValueError):
    """The object cannot be placed as asked (outside the background, larger than it)."""


def place_object(center_y: float, center_x: float, height: int, width: int, bg_h: int, bg_w: int,
                 tolerance: int = 1) -> Box:
    """The pixel box of a height x width object centred at (center_y, center_x) (pixels, may be fractional).

    Rounding may move a box touching a border by one pixel past it: up to `tolerance` pixels are shifted back
    inside (on either side). Anything else outside the background, or an object larger than it, raises
    PlacementError."""
    if height > bg_h or width > bg_w:
        raise PlacementError(f"the placed object ({width}x{height} px) is larger than the background "
                             f"({bg_w}x{bg_h} px)")
    top = int(math.floor(center_y - height / 2.0 + 0.5))
    left = int(math.floor(center_x - width / 2.0 + 0.5))
    over = {"top": -top, "left": -left, "bottom": top + height - bg_h, "right": left + width - bg_w}
    worst = max(over, key=over.get)
    if over[worst] > tolerance:
        raise PlacementError(f"the placed object ({width}x{height} px at left={left}, top={top}) extends "
                             f"{over[worst]} px beyond the {worst} border of the {bg_w}x{bg_h} px background")
    top = min(max(top, 0), bg_h - height)
    left = min(max(left, 0), bg_w - width)
    return Box(top, left, height, width)


def latent_mask(pixel_mask: torch.Tensor, factor: int, threshold: float = 0.5) -> torch.Tensor:
    """(H, W) pixel mask on the background canvas -> (H//factor, W//factor) boolean latent mask.

    Like the reference (`seg[::8, ::8]`): the pixel at the top-left of each latent cell decides."""
    h, w = pixel_mask.shape[-2] // factor, pixel_mask.shape[-1] // factor
    return pixel_mask[..., : h * factor: factor, : w * factor: factor] >= threshold


def crop_to_multiple(t: torch.Tensor, factor: int, h_dim: int, w_dim: int) -> torch.Tensor:
    """Crop dims h_dim/w_dim to multiples of factor, centred as ComfyUI's VAE encode crops pixels."""
    out = t
    for dim in (h_dim, w_dim):
        size = out.shape[dim]
        keep = (size // factor) * factor
        if keep != size:
            offset = (size % factor) // 2
            out = out.narrow(dim, offset, keep)
    return out


# ----------------------------------------------------------------------------------------------
# Latent manipulation
# ----------------------------------------------------------------------------------------------
def _mask4(mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(h, w) / (B, h, w) / (B, 1, h, w) boolean mask broadcast to like's (B, C, h, w)."""
    m = mask
    if m.dim() == 2:
        m = m[None, None]
    elif m.dim() == 3:
        m = m[:, None]
    return m.to(device=like.device, dtype=torch.bool).expand_as(like)


def paste(background: torch.Tensor, foreground: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Selective initiation: the background with the foreground under the mask (new tensor)."""
    return torch.where(_mask4(mask, background), foreground, background)


def keep_object(composite: torch.Tensor, background: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The background outside the mask, the composite inside it (the reference's per-step re-blend)."""
    return torch.where(_mask4(mask, composite), composite, background)


def adain_weights(tau: int, adain_max: float) -> list[float]:
    """The reference's rising AdaIN weights a_j = adain_max * j / tau, j = 1..tau."""
    return [adain_max / tau * (j + 1) for j in range(tau)]


def adain_blend(composite: torch.Tensor, background: torch.Tensor, mask: torch.Tensor, alpha: float,
                eps: float = 1e-5) -> torch.Tensor:
    """Adaptive latent normalisation of the masked object region toward the background's statistics.

    Per image and channel: the object's masked values are standardised with their own mean and (unbiased)
    std (var + eps), rescaled to the whole background's mean/std (var + eps), and blended
    alpha * normalised + (1 - alpha) * original. Outside the mask the composite is returned bit-identical.
    Statistics in fp32; the result has the composite's dtype."""
    m = _mask4(mask, composite)
    x = composite.float()
    bg = background.float()
    mf = m.float()
    count = mf.sum(dim=(2, 3), keepdim=True)
    if bool((count < 2).any()):
        raise ValueError("adain_blend needs at least 2 masked latent pixels per image")
    mean = (x * mf).sum(dim=(2, 3), keepdim=True) / count
    var = (((x - mean) * mf) ** 2).sum(dim=(2, 3), keepdim=True) / (count - 1) + eps
    bg_flat = bg.flatten(2)
    bg_mean = bg_flat.mean(dim=2)[..., None, None]
    bg_std = (bg_flat.var(dim=2) + eps).sqrt()[..., None, None]
    normalised = (x - mean) / var.sqrt() * bg_std + bg_mean
    blended = (alpha * normalised + (1.0 - alpha) * x).to(composite.dtype)
    return torch.where(m, blended, composite)


# ----------------------------------------------------------------------------------------------
# Solvers (the host's arithmetic, so a run started at T' equals the host's sampler started there)
# ----------------------------------------------------------------------------------------------
def dpmpp_2m_step(x: torch.Tensor, denoised: torch.Tensor, old_denoised: torch.Tensor | None,
                  sigma_prev: torch.Tensor | None, sigma: torch.Tensor, sigma_next: torch.Tensor) -> torch.Tensor:
    """One DPM-Solver++(2M) step from sigma to sigma_next (k-diffusion form; first order without history or
    into sigma_next = 0)."""
    t, t_next = sigma.log().neg(), sigma_next.log().neg()
    h = t_next - t
    ratio = t_next.neg().exp() / t.neg().exp()
    if old_denoised is None or sigma_next == 0:
        return ratio * x - (-h).expm1() * denoised
    h_last = t - sigma_prev.log().neg()
    r = h_last / h
    denoised_d = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old_denoised
    return ratio * x - (-h).expm1() * denoised_d


def euler_step(x: torch.Tensor, denoised: torch.Tensor, sigma: torch.Tensor, sigma_next: torch.Tensor
               ) -> torch.Tensor:
    """One Euler (DDIM for eps models) step in k-diffusion form."""
    d = (x - denoised) / sigma
    return x + d * (sigma_next - sigma)


# ----------------------------------------------------------------------------------------------
# Energies
# ----------------------------------------------------------------------------------------------
def gram(features: torch.Tensor) -> torch.Tensor:
    """(B, N, D) tokens -> (B, D, D) Gram matrices F^T F (the reference's unnormalised form), fp32."""
    f = features.float()
    return f.transpose(1, 2) @ f


def gram_distance(features: torch.Tensor, reference_gram: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of ||Gram(features) - reference_gram||_F."""
    diff = gram(features) - reference_gram.float()
    return torch.linalg.matrix_norm(diff, ord="fro").mean()


def text_distance(image_embeds: torch.Tensor, text_embeds: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of 1 - cos(image embedding, text embedding)."""
    return (1.0 - F.cosine_similarity(image_embeds.float(), text_embeds.float().expand_as(image_embeds), dim=1)
            ).mean()


def clip_pixels(image01: torch.Tensor, size: int, mean, std, mode: str = "bicubic", antialias: bool = False
                ) -> torch.Tensor:
    """(B, 3, H, W) image in [0, 1] (not clamped, differentiable) -> CLIP input: squashed to size x size and
    normalised (the reference resizes after normalising; bicubic is linear, so the order does not matter)."""
    import kornia
    mean_t = torch.tensor(mean, device=image01.device, dtype=image01.dtype).view(1, 3, 1, 1)
    std_t = torch.tensor(std, device=image01.device, dtype=image01.dtype).view(1, 3, 1, 1)
    x = (image01 - mean_t) / std_t
    if x.shape[-2:] != (size, size):
        x = kornia.geometry.transform.resize(x, (size, size), interpolation=mode, align_corners=False,
                                             antialias=antialias)
    return x


VisionEncoder = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
"""pixels (B, 3, s, s) normalised -> (patch tokens of the style layer (B, N, D), projected image embeds (B, P))."""


@dataclass
class EnergyTerms:
    total: torch.Tensor
    """The value whose gradient is taken."""
    text: float
    style: float


def clip_energy(image01: torch.Tensor, box: Box, encode: VisionEncoder, text_embeds: torch.Tensor,
                reference_gram: torch.Tensor, params: TALEParams, mean, std, size: int = 224) -> EnergyTerms:
    """The reference energy on a decoded composite image (B, 3, H, W) in [0, 1]: text_weight * (1 - cos) on the
    whole image + style_weight * Gram distance of the object box's tokens to the background's Gram."""
    total = image01.new_zeros(())
    text_v = style_v = 0.0
    if params.text_weight > 0:
        _, embeds = encode(clip_pixels(image01, size, mean, std))
        text = text_distance(embeds, text_embeds)
        total = total + params.text_weight * text
        text_v = float(text.detach())
    if params.style_weight > 0:
        rows, cols = box.slices()
        crop = image01[:, :, rows, cols]
        tokens, _ = encode(clip_pixels(crop, size, mean, std))
        style = gram_distance(tokens, reference_gram)
        style_v = float(style.detach())
        term = params.style_weight * style
        total = total + (term.detach() if params.style_gradient == "detached" else term)
    return EnergyTerms(total, text_v, style_v)


def latent_patch_features(latent: torch.Tensor, box: Box | None = None, mask: torch.Tensor | None = None
                          ) -> torch.Tensor:
    """(B, C, h, w) latent -> (B, N, C*9) features of its 3x3 patches (inside box, at masked centres), fp32."""
    x = latent.float()
    patches = F.unfold(F.pad(x, (1, 1, 1, 1), mode="replicate"), kernel_size=3)  # (B, C*9, h*w)
    patches = patches.transpose(1, 2).reshape(x.shape[0], x.shape[2], x.shape[3], -1)
    if box is not None:
        rows, cols = box.slices()
        patches = patches[:, rows, cols]
        if mask is not None:
            mask = mask[..., rows, cols]
    if mask is not None:
        m = mask.reshape(-1) if mask.dim() == 2 else mask[0].reshape(-1)
        flat = patches.reshape(x.shape[0], -1, patches.shape[-1])
        return flat[:, m.to(flat.device)]
    return patches.reshape(x.shape[0], -1, patches.shape[-1])


def latent_gram(features: torch.Tensor) -> torch.Tensor:
    """Gram of latent patch features normalised by the token count (size independent)."""
    return gram(features) / max(features.shape[1], 1)


def latent_energy(denoised: torch.Tensor, box: Box, mask: torch.Tensor, reference_gram: torch.Tensor,
                  params: TALEParams) -> EnergyTerms:
    """Latent-space style energy (ours; no decoder, no CLIP): latent_weight * N * ||Gram(3x3 patches of the object's
    predicted clean latent) - Gram(background's clean latent)||_F, both Grams averaged over their N resp. all
    patches; the factor N (object latent pixels) makes the per-pixel step independent of the object's size."""
    feats = latent_patch_features(denoised, box, mask)
    style = torch.linalg.matrix_norm(latent_gram(feats) - reference_gram.float(), ord="fro").mean()
    term = params.latent_weight * feats.shape[1] * style
    total = term.detach() if params.style_gradient == "detached" else term
    return EnergyTerms(total, 0.0, float(style.detach()))


def masked_gradient_step(x: torch.Tensor, grad: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """x - grad inside the mask (the reference's step size 1), x unchanged outside (bit-identical)."""
    m = _mask4(mask, x)
    return torch.where(m, x - grad.to(x.dtype), x)
