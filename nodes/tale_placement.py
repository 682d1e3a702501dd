"""TALE placement: the background, the object image and its mask checked and placed on background-sized canvases
(the node's IMAGE/MASK inputs in, a `Placement` out). The geometry itself is pure torch in kernels/tale.py.

Input shapes, as documented on the node:
- one background, one foreground, one object mask and at most one placement mask per run: a batch of more than
  one is an error naming the input (pick one, e.g. with ImageFromBatch);
- a mask of another size than its image but of the same aspect ratio (within 1%) is resized to the image's size
  the way ComfyUI's own nodes resize masks (ImageCompositeMasked, VAE Encode for Inpaint: bilinear
  `torch.nn.functional.interpolate`); another aspect ratio is an error naming both sizes;
- an empty object or placement mask is an error; a full one is the whole image (the object is the whole
  foreground / it fills the background);
- a background with fewer than 2 latent pixels, or an object that covers fewer than 2, is an error naming the fix.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..kernels import tale as K
from . import adapters

NODE = "TALE Composite"
ASPECT_TOLERANCE = 0.01
"""Relative aspect-ratio difference up to which a mask of another size is resized to its image."""


@dataclass
class Placement:
    background: torch.Tensor
    """(1, H, W, 3) background, cropped to a multiple of the VAE factor."""
    canvas: torch.Tensor
    """(1, H, W, 3) the scaled object image on a black background-sized canvas."""
    pixel_mask: torch.Tensor
    """(H, W) float mask of the placed object."""
    box: K.Box
    """Pixel box of the placed object."""
    latent_mask: torch.Tensor
    """(h, w) boolean latent mask."""

    def preview(self) -> torch.Tensor:
        m = self.pixel_mask[None, :, :, None]
        return self.background * (1 - m) + self.canvas * m


def _one_image(image: torch.Tensor, name: str, family) -> torch.Tensor:
    if image.dim() != 4 or image.shape[-1] < 3:
        raise adapters.node_error(NODE, family, f"{name} has shape {tuple(image.shape)}, not an RGB IMAGE.",
                                  f"connect an IMAGE to {name}.")
    if image.shape[0] != 1:
        raise adapters.node_error(NODE, family, f"{name} is a batch of {image.shape[0]} images; TALE composes one "
                                                "object into one background per run.",
                                  f"connect a single image to {name} (e.g. through ImageFromBatch), or run the node "
                                  "once per image.")
    return image[:, :, :, :3].float().cpu()


def _one_mask(mask: torch.Tensor, name: str, family) -> torch.Tensor:
    m = mask.float()
    if m.dim() == 3:
        if m.shape[0] != 1:
            raise adapters.node_error(NODE, family, f"{name} is a batch of {m.shape[0]} masks; TALE uses one.",
                                      f"connect a single mask to {name}.")
        m = m[0]
    if m.dim() != 2:
        raise adapters.node_error(NODE, family, f"{name} has shape {tuple(mask.shape)}, not a mask.",
                                  f"connect a MASK to {name}.")
    return m.cpu()


def fit_mask(mask: torch.Tensor, height: int, width: int, name: str, image_name: str, family) -> torch.Tensor:
    """A (h, w) mask at the image's size: unchanged when it has it; resized like ComfyUI's own nodes resize masks
    (bilinear interpolate) when only the resolution differs (aspect within 1%); an error otherwise."""
    h, w = mask.shape
    if (h, w) == (height, width):
        return mask
    if abs((w / h) / (width / height) - 1.0) > ASPECT_TOLERANCE:
        raise adapters.node_error(NODE, family, f"{name} is {w}x{h} but {image_name} is {width}x{height} (another "
                                                "aspect ratio, so it was not drawn on that image).",
                                  f"use a mask made from {image_name} (same size, or the same aspect ratio: it is "
                                  "then resized).")
    adapters.warn_once(f"tale.resize.{name}.{w}x{h}.{width}x{height}",
                       f"{adapters.PACK_NAME} {NODE}: {name} is {w}x{h}, {image_name} {width}x{height}: the mask is "
                       "resized to the image (bilinear, like ComfyUI's own mask inputs).")
    return F.interpolate(mask[None, None], size=(height, width), mode="bilinear")[0, 0]


def make_placement(background, foreground, object_mask, placement, placement_mask, box_x, box_y, box_scale,
                   factor: int, family=None) -> Placement:
    """Validate the images and masks and place the object (raises node errors naming the problem)."""
    import kornia
    bg = _one_image(background, "background", family)
    fg = _one_image(foreground, "foreground", family)
    H0, W0 = bg.shape[1:3]
    if (H0 // factor) * (W0 // factor) < 2:
        raise adapters.node_error(NODE, family, f"the background is {W0}x{H0} px: its latent has "
                                                f"{(H0 // factor) * (W0 // factor)} pixel(s) ({factor}x{factor} image "
                                                "pixels each), and the object needs at least 2.",
                                  f"upscale the background (e.g. ImageScale) to at least {8 * factor} px a side.")
    obj = fit_mask(_one_mask(object_mask, "object_mask", family), fg.shape[1], fg.shape[2], "object_mask",
                   "the foreground image", family)
    obj_box = K.mask_bbox(obj)
    if obj_box is None:
        raise adapters.node_error(NODE, family, "object_mask is empty (no pixel >= 0.5), so there is no object.",
                                  "paint or segment the object in the foreground image.")
    if placement == "mask":
        if placement_mask is None:
            raise adapters.node_error(NODE, family, "placement is 'mask' but no placement_mask is connected.",
                                      "connect a mask of the background's size, or use placement 'box'.")
        pm = fit_mask(_one_mask(placement_mask, "placement_mask", family), H0, W0, "placement_mask",
                      "the background", family)
        target = K.mask_bbox(pm)
        if target is None:
            raise adapters.node_error(NODE, family, "placement_mask is empty (no pixel >= 0.5).",
                                      "mark where the object should go on the background.")
        h, w = K.fit_size(obj_box.height, obj_box.width, target.height, target.width)
        cy, cx = (target.top + target.bottom) / 2.0, (target.left + target.right) / 2.0
    elif placement == "box":
        if placement_mask is not None:
            adapters.warn_once("tale.placement_mask_ignored", f"{adapters.PACK_NAME} {NODE}: placement is 'box', so "
                                                              "the connected placement_mask is ignored (set placement "
                                                              "to 'mask' to use it).")
        h = max(1, int(round(obj_box.height * box_scale)))
        w = max(1, int(round(obj_box.width * box_scale)))
        cy, cx = box_y * H0, box_x * W0
    else:
        raise adapters.node_error(NODE, family, f"unknown placement {placement!r}.", "use 'mask' or 'box'.")
    try:
        box0 = K.place_object(cy, cx, h, w, H0, W0)
    except K.PlacementError as e:
        raise adapters.node_error(NODE, family, f"{e}.", "move the placement inside the background or make the "
                                                         "object smaller (box_scale / a smaller placement mask).")
    # object image and mask, scaled, on background-sized canvases
    rows, cols = obj_box.slices()
    crop = fg[:, rows, cols].movedim(-1, 1)
    crop_m = obj[rows, cols][None, None]
    scaled = kornia.geometry.transform.resize(crop, (h, w), interpolation="bilinear", antialias=True)
    scaled_m = kornia.geometry.transform.resize(crop_m, (h, w), interpolation="bilinear", antialias=True)
    canvas = torch.zeros(1, 3, H0, W0)
    canvas_m = torch.zeros(1, 1, H0, W0)
    r, c = box0.slices()
    canvas[:, :, r, c] = scaled.clamp(0, 1)
    canvas_m[:, :, r, c] = (scaled_m >= 0.5).float()
    # crop everything like VAE Encode crops to a multiple of the VAE factor
    bg_c = K.crop_to_multiple(bg, factor, 1, 2)
    canvas_c = K.crop_to_multiple(canvas.movedim(1, -1), factor, 1, 2)
    mask_c = K.crop_to_multiple(canvas_m[0, 0], factor, 0, 1)
    box = K.mask_bbox(mask_c)
    if box is not None and float(mask_c.sum()) < float(canvas_m.sum()):
        adapters.warn_once(f"tale.cropped.{H0}x{W0}", f"{adapters.PACK_NAME} {NODE}: the background is {W0}x{H0}, "
                                                      f"not a multiple of {factor}; like VAE Encode the border rows/"
                                                      "columns are cropped, and part of the placed object with them.")
    if box is None:
        raise adapters.node_error(NODE, family, "the placed object lies entirely in the border rows/columns VAE "
                                                f"encoding crops away (the background is {W0}x{H0}, not a multiple of "
                                                f"{factor}).", "move the object inward.")
    lat = K.latent_mask(mask_c, factor)
    if int(lat.sum()) < 2:
        raise adapters.node_error(NODE, family, f"the placed object covers {int(lat.sum())} latent pixel(s) "
                                                f"({factor}x{factor} image pixels each); normalisation needs at "
                                                "least 2.",
                                  "make the object larger (box_scale or a larger placement mask).")
    return Placement(bg_c, canvas_c, mask_c, box, lat)
