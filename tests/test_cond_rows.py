"""nodes/cond_rows.py: the unconditional pass for some rows of the batch equals those rows of the full pass, with
per-row prompts, area and per-image mask conditions and a ControlNet-type hint of one image per row."""
from __future__ import annotations

import pytest
import torch

import host


@pytest.fixture(scope="module")
def rows_module(comfy_root):
    return host.pack_module("nodes.cond_rows")


def encode(clip_setup, texts):
    """A conditioning whose tensors hold one row per text (one prompt per image)."""
    import nodes
    clip = clip_setup
    parts = [nodes.CLIPTextEncode().encode(clip, t)[0][0] for t in texts]
    extra = {k: torch.cat([p[1][k] for p in parts]) for k in parts[0][1] if isinstance(parts[0][1][k], torch.Tensor)}
    return [[torch.cat([p[0] for p in parts]), extra]]


def fake_control(hint, extra_concat=()):
    """A ControlNet-type object that records the hint rows it sees (ComfyUI's broadcast; with `extra_concat`, the
    extra images an inpainting ControlNet concatenates, repeated to the hint's batch as ComfyUI does) and adds
    nothing."""
    import comfy.controlnet
    import comfy.utils

    class RecordingControl(comfy.controlnet.ControlBase):
        def __init__(self):
            super().__init__()
            self.cond_hint_original = hint
            self.extra_concat_orig = list(extra_concat)
            self.seen = []

        def get_control(self, x_noisy, t, cond, batched_number, transformer_options):
            if self.cond_hint is None:
                self.cond_hint = self.cond_hint_original.clone()
                extras = [comfy.utils.repeat_to_batch_size(c, self.cond_hint.shape[0]) for c in self.extra_concat_orig]
                self.cond_hint = torch.cat([self.cond_hint] + extras, dim=1)
            if x_noisy.shape[0] != self.cond_hint.shape[0]:
                self.cond_hint = comfy.controlnet.broadcast_image_to(self.cond_hint, x_noisy.shape[0],
                                                                     batched_number)
            self.seen.append(self.cond_hint[:, 0, 0, 0].tolist() if not self.extra_concat_orig else
                             self.cond_hint[:, :, 0, 0].tolist())
            return None

        def copy(self):
            return self

    return RecordingControl()


def test_uncond_rows_equal_the_full_pass(sd15, rows_module):
    import comfy.patcher_extension
    import comfy.sd
    import node_helpers
    import tiny_models
    # the CLIP of the tiny checkpoint, for per-row prompts
    clip = comfy.sd.load_checkpoint_guess_config(str(tiny_models.tiny_sd15_checkpoint()), output_clip=True)[1]
    with torch.inference_mode():
        negative = encode(clip, ["blurry", "a dark cave", "low quality"])
    masks = torch.zeros(3, 64, 64)
    masks[0, :32], masks[1, :, :16], masks[2, 40:, 40:] = 1.0, 1.0, 1.0
    masked = node_helpers.conditioning_set_values(negative, {"mask": masks, "set_area_to_bounds": False,
                                                             "mask_strength": 0.7})
    area = node_helpers.conditioning_set_values(negative, {"area": (4, 4, 2, 2), "strength": 0.5})
    control = fake_control(torch.arange(3.0).view(3, 1, 1, 1).expand(3, 3, 64, 64).clone())
    controlled = node_helpers.conditioning_set_values(negative, {"control": control})
    rows = torch.tensor([0, 2])
    checked = []

    def wrapper(executor, base_model, conds, x, timestep, model_options):
        full = executor(base_model, conds, x, timestep, model_options)
        if conds[1] is not None and not checked:
            control.seen.clear()
            again = executor(base_model, conds, x, timestep, model_options)
            hint_before = control.cond_hint.clone()
            part = rows_module.uncond_for_rows(executor, base_model, conds[1], x, timestep, model_options, rows, {})
            checked.append((again[1][rows], part, control.seen[:], hint_before, control.cond_hint))
        return full

    m = sd15.model.clone()
    m.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.CALC_COND_BATCH, "test.rows", wrapper)
    import nodes
    with torch.inference_mode():
        nodes.common_ksampler(m, 3, 2, 5.0, "euler", "normal", sd15.positive, negative + masked + area + controlled,
                              {"samples": sd15.latent(3)}, denoise=1.0)
    full_rows, part, seen, hint_before, hint_after = checked[0]
    assert part.shape[0] == 2
    torch.testing.assert_close(part, full_rows, atol=1e-5, rtol=1e-5)
    assert seen[-1] == [0.0, 2.0]  # the controlled pass saw the hints of rows 0 and 2
    assert torch.equal(hint_after, hint_before)  # the object's own cache is put back


def test_pieces_follow_comfyui_batch_rules(comfy_root, rows_module):
    import comfy.conds
    rows = torch.tensor([1, 3])
    per_row = comfy.conds.CONDRegular(torch.arange(4.0).view(4, 1))
    assert rows_module.model_cond_rows(per_row, rows, 4).cond.flatten().tolist() == [1.0, 3.0]
    tiled = comfy.conds.CONDCrossAttn(torch.arange(2.0).view(2, 1, 1))  # repeated over 4 rows: 0 1 0 1
    assert rows_module.model_cond_rows(tiled, rows, 4).cond.flatten().tolist() == [1.0, 1.0]
    shared = comfy.conds.CONDRegular(torch.ones(1, 5))
    assert rows_module.model_cond_rows(shared, rows, 4) is shared
    constant = comfy.conds.CONDConstant(3)
    assert rows_module.model_cond_rows(constant, rows, 4) is constant
    masks = torch.arange(2.0).view(2, 1, 1).expand(2, 4, 4)
    assert rows_module.mask_rows(masks, rows, 4)[:, 0, 0].tolist() == [1.0, 1.0]
    assert rows_module.timestep_rows(torch.tensor([9.0, 8.0, 7.0, 6.0]), rows, 4).tolist() == [8.0, 6.0]
    original = [{"model_conds": {"c": per_row}, "mask": masks}]
    sliced = rows_module.conds_rows(original, rows, 4)
    assert original[0]["model_conds"]["c"] is per_row and original[0]["mask"] is masks  # inputs untouched
    assert sliced[0]["model_conds"]["c"].cond.shape[0] == 2


def test_inpainting_controlnet_extras_follow_the_rows(comfy_root, rows_module):
    """An inpainting ControlNet's extra images (one per image) are sliced with the hint: the pass over rows [0, 2]
    of 3 sees hint and extras of those rows; a one-image extra is shared as is; the object is put back."""
    hint = torch.arange(3.0).view(3, 1, 1, 1).expand(3, 1, 4, 4).clone()
    per_row_extra = (10 + torch.arange(3.0)).view(3, 1, 1, 1).expand(3, 1, 4, 4).clone()
    shared_extra = torch.full((1, 1, 4, 4), 7.0)
    control = fake_control(hint, [per_row_extra, shared_extra])
    original_extras = control.extra_concat_orig
    rows = torch.tensor([0, 2])
    with rows_module.controls_for_rows([{"control": control}], rows, 3, {}):
        control.get_control(torch.zeros(2, 4, 4, 4), None, {}, 1, {})
    assert control.seen[-1] == [[0.0, 10.0, 7.0], [2.0, 12.0, 7.0]]
    assert control.extra_concat_orig is original_extras and control.cond_hint_original is hint
