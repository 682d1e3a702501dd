"""One pass of the model for some rows (images) of the batch only.

ComfyUI batches every conditioning over the whole latent batch: `calc_cond_batch` repeats each model condition
to the batch size (`repeat_to_batch_size`), takes the first rows of a per-image mask, and broadcasts a ControlNet
hint to the batch. To run the unconditional pass for rows `rows` of a batch of `batch` images, every per-row
value is first expanded to the whole batch exactly as ComfyUI would, then the rows are taken:
- the model conditions (`model_conds`: cross-attention, pooled `y`, concat latents of inpainting models, …),
- area/mask conditions (`mask`, per image; `area` is spatial and applies as is),
- ControlNet-type objects whose hint holds one image per row (the hint, and the extra images an inpainting
  ControlNet concatenates to it, that they see during the pass; their own caches are put back afterwards),
- the timestep (one sigma per row).
Everything else in a condition (area, strength, timestep range, hooks, GLIGEN) and in `model_options` is shared
by every row in ComfyUI and is handed on unchanged.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch

import comfy.conds
import comfy.utils

_CONTROL_CACHES = ("cond_hint", "control_input")
"""Attributes in which ControlNet-type objects keep what they derived from their hint (batch-shaped)."""


def _rows_on(rows: torch.Tensor, device) -> torch.Tensor:
    """The row indices on `device`; a copy from the host does not wait for the GPU's queued work (a blocking
    copy would: it synchronises the stream)."""
    return rows.to(device, non_blocking=rows.device.type == "cpu")


def _rows_of(tensor: torch.Tensor, rows: torch.Tensor, batch: int) -> torch.Tensor:
    """`tensor` as a batch of `batch` rows would see it (ComfyUI's repeat_to_batch_size), at `rows`."""
    if tensor.shape[0] == 1:
        return tensor
    return comfy.utils.repeat_to_batch_size(tensor, batch)[_rows_on(rows, tensor.device)]


def model_cond_rows(cond, rows: torch.Tensor, batch: int):
    """One entry of a condition's `model_conds` for `rows` (constants and unknown objects as they are)."""
    if not isinstance(cond, comfy.conds.CONDRegular) or isinstance(cond, comfy.conds.CONDConstant):
        return cond
    value = cond.cond
    if isinstance(value, torch.Tensor) and value.dim() > 0:
        return cond if value.shape[0] == 1 else cond._copy_with(_rows_of(value, rows, batch))
    if isinstance(value, (list, tuple)) and all(isinstance(v, torch.Tensor) and v.dim() > 0 for v in value):
        return cond._copy_with([_rows_of(v, rows, batch) for v in value])
    return cond


def mask_rows(mask: torch.Tensor, rows: torch.Tensor, batch: int) -> torch.Tensor:
    """A condition mask [M, H, W] for `rows`: ComfyUI takes mask[:batch] and tiles it over the batch."""
    if mask.shape[0] == 1:
        return mask
    first = mask[:batch]
    if batch % first.shape[0] != 0:  # ComfyUI cannot tile it either; leave its error to it
        return mask
    tiled = first.repeat((batch // first.shape[0],) + (1,) * (first.dim() - 1))
    return tiled[_rows_on(rows, mask.device)]


def conds_rows(conds: list[dict] | None, rows: torch.Tensor, batch: int) -> list[dict] | None:
    """The conditions of one pass (a list of ComfyUI condition dicts) for `rows`; new dicts, inputs untouched."""
    if conds is None:
        return None
    out = []
    for cond in conds:
        c = dict(cond)
        if "model_conds" in c:
            c["model_conds"] = {k: model_cond_rows(v, rows, batch) for k, v in c["model_conds"].items()}
        if isinstance(c.get("mask"), torch.Tensor):
            c["mask"] = mask_rows(c["mask"], rows, batch)
        out.append(c)
    return out


def timestep_rows(timestep: torch.Tensor, rows: torch.Tensor, batch: int) -> torch.Tensor:
    if isinstance(timestep, torch.Tensor) and timestep.dim() > 0 and timestep.shape[0] == batch:
        return timestep[_rows_on(rows, timestep.device)]
    return timestep


def _controls(conds: list[dict] | None):
    seen = set()
    for cond in conds or ():
        control = cond.get("control")
        while control is not None and id(control) not in seen:
            seen.add(id(control))
            yield control
            control = getattr(control, "previous_controlnet", None)


@contextmanager
def controls_for_rows(conds: list[dict] | None, rows: torch.Tensor, batch: int, cache: dict):
    """For the duration of one pass over `rows`: ControlNet-type objects of `conds` whose hint holds several
    images see those rows' hints (as broadcast to the batch by ComfyUI). Their original hint and derived caches
    are restored afterwards; what they derived for these rows is kept in `cache` (per run) for the next step."""
    import comfy.controlnet
    swapped = []
    key_rows = tuple(rows.tolist())
    for control in _controls(conds):
        hint = getattr(control, "cond_hint_original", None)
        if not isinstance(hint, torch.Tensor) or hint.shape[0] <= 1:
            continue
        saved = {name: getattr(control, name) for name in ("cond_hint_original", "extra_concat_orig") + _CONTROL_CACHES
                 if hasattr(control, name)}
        kept = cache.get(id(control))
        derived = kept[1] if kept is not None and kept[0] == key_rows else {}
        control.cond_hint_original = comfy.controlnet.broadcast_image_to(hint, batch, 1)[_rows_on(rows, hint.device)]
        extra = getattr(control, "extra_concat_orig", None)
        if isinstance(extra, list) and extra:
            # ComfyUI repeats each extra image to the hint's batch, then broadcasts hint + extras to the latent batch
            control.extra_concat_orig = [
                c if not isinstance(c, torch.Tensor) or c.shape[0] <= 1 else comfy.controlnet.broadcast_image_to(
                    comfy.utils.repeat_to_batch_size(c, hint.shape[0]), batch, 1)[_rows_on(rows, c.device)]
                for c in extra]
        for name in _CONTROL_CACHES:
            if hasattr(control, name):
                setattr(control, name, derived.get(name))
        swapped.append((control, saved))
    try:
        yield
    finally:
        for control, saved in reversed(swapped):
            cache[id(control)] = (key_rows, {name: getattr(control, name) for name in _CONTROL_CACHES
                                             if hasattr(control, name)})
            for name, value in saved.items():
                setattr(control, name, value)


def uncond_for_rows(executor, base_model, uncond_conds, x: torch.Tensor, timestep, model_options, rows: torch.Tensor,
                    control_cache: dict) -> torch.Tensor:
    """The unconditional prediction for `rows` of the batch only (shape [len(rows), …]), through `executor`
    (a CALC_COND_BATCH executor: calc_cond_batch(model, conds, x, timestep, model_options))."""
    batch = x.shape[0]
    sub_conds = conds_rows(uncond_conds, rows, batch)
    with controls_for_rows(sub_conds, rows, batch, control_cache):
        out = executor(base_model, [None, sub_conds], x[_rows_on(rows, x.device)], timestep_rows(timestep, rows, batch),
                       model_options)
    return out[1]
