"""The pack's digits demonstration model as nodes a user can load (the quick start's workflow uses them).

The model is the pack's evaluation model (benchmarks/eval_model.py): a small class-conditional UNet trained on
scikit-learn's 8x8 digits, shipped as benchmarks/weights/digits_eval.safetensors (2 MB). It is an EPS model with the
SD1.5 schedule, so the pack's techniques run on it like on an SD-UNet, in seconds on a CPU, with no download.

* Digits Model (TFG demo): MODEL, the digit's conditioning, the empty (null-class) conditioning and an empty
  8x8 one-channel LATENT; feed them to KSampler.
* Digits To Image (TFG demo): a sampled digits LATENT as an IMAGE for SaveImage / PreviewImage.
"""
from __future__ import annotations

import logging
import threading

from comfy_api.latest import io

from . import inputs as inp

logger = logging.getLogger(__name__)

CATEGORY = "TFG/demo"
LOADER_NODE = "Digits Model (TFG demo)"
IMAGE_NODE = "Digits To Image (TFG demo)"

_lock = threading.Lock()
_loaded: dict = {}


def load_digits_model():
    """The shipped digits model (loaded once per process)."""
    with _lock:
        if "model" not in _loaded:
            from ..benchmarks import eval_model
            _loaded["model"] = eval_model.load_eval_model()
            logger.info("TFG digits demo model loaded from %s", eval_model.WEIGHTS)
        return _loaded["model"]


class DigitsModel(io.ComfyNode):
    INPUTS = inp.NodeInputs(LOADER_NODE, [
        inp.Int("digit", "The digit (class) to condition on.", param=None, default=3, min=0, max=9),
        inp.Int("batch_size", "Images in the empty latent (NegToMe needs 2 or more to push them apart).",
                param=None, default=8, min=1, max=4096),
    ])
    validate_inputs = INPUTS.validator()

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="TFG_DigitsModel",
            display_name=LOADER_NODE,
            category=CATEGORY,
            description="The pack's shipped digits model (a class-conditional UNet trained on 8x8 digits, 2 MB, "
                        "EPS with the SD1.5 schedule): try any technique in seconds on a CPU, no download. "
                        "Sample with KSampler (cfg about 5, 20 steps) and view with Digits To Image (TFG demo).",
            inputs=cls.INPUTS.schema(),
            outputs=[io.Model.Output(display_name="MODEL", tooltip="The digits UNet."),
                     io.Conditioning.Output(display_name="positive", tooltip="The digit's conditioning."),
                     io.Conditioning.Output(display_name="negative",
                                            tooltip="The empty (null-class) conditioning, for CFG."),
                     io.Latent.Output(display_name="LATENT", tooltip="An empty 8x8 one-channel latent batch.")],
        )

    @classmethod
    def execute(cls, **values) -> io.NodeOutput:
        v = cls.INPUTS.checked(values)
        model = load_digits_model()
        return io.NodeOutput(model.model, model.cond(v.digit), model.uncond(), model.empty_latent(v.batch_size))


class DigitsToImage(io.ComfyNode):
    INPUTS = inp.NodeInputs(IMAGE_NODE, [
        inp.Socket(io.Latent.Input("samples", tooltip="A sampled digits latent (one channel, values in [-1, 1])."),
                   finite=True),
        inp.Int("scale", "Nearest-neighbour upscale factor (8 gives 64x64 images).", param=None, default=8,
                min=1, max=64),
    ])
    validate_inputs = INPUTS.validator()

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="TFG_DigitsImage",
            display_name=IMAGE_NODE,
            category=CATEGORY,
            description="A digits-model LATENT as an RGB IMAGE (clamped to [0, 1], upscaled by `scale`).",
            inputs=cls.INPUTS.schema(),
            outputs=[io.Image.Output(tooltip="The digits as images.")],
        )

    @classmethod
    def execute(cls, **values) -> io.NodeOutput:
        import torch
        v = cls.INPUTS.checked(values)
        samples = v.samples["samples"].float()
        if samples.dim() != 4 or samples.shape[1] != 1:
            raise inp.InputError(f"{IMAGE_NODE}: input 'samples' must be a one-channel digits latent "
                                 f"[B, 1, H, W], got shape {tuple(samples.shape)}")
        x = ((samples + 1.0) / 2.0).clamp(0.0, 1.0)
        x = torch.nn.functional.interpolate(x, scale_factor=v.scale, mode="nearest")
        return io.NodeOutput(x.movedim(1, -1).expand(-1, -1, -1, 3).contiguous())


NODES = [DigitsModel, DigitsToImage]
