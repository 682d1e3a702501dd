"""Benchmark-only ComfyUI nodes (V1): the digits evaluation model in a graph.

Not part of the pack's node list: users get the same model from the pack's own nodes, Digits Model (TFG demo) and
Digits To Image (TFG demo) (nodes/digits.py; the quick start's workflow uses them). This folder keeps the
benchmark's graph (digits_ag_api.json, with a weights input for retrained files) runnable; to use it, link it into
ComfyUI's custom_nodes, e.g. `ln -s /path/to/pack/benchmarks/comfy_nodes ComfyUI/custom_nodes/tfg_digits_eval`.

* TFG Digits Eval Model: MODEL, positive CONDITIONING for a digit, the empty (null-class) negative, and an
  empty 8x8 one-channel LATENT of the requested batch; feed them to KSampler / SamplerCustomAdvanced.
* TFG Digits To Image: the sampled LATENT as an IMAGE (nearest-neighbour upscaled) for SaveImage/PreviewImage.
"""
from __future__ import annotations

import importlib.util
import logging
import sys
import threading
from pathlib import Path

logger = logging.getLogger("tfg.benchmarks")

_BENCH_DIR = Path(__file__).resolve().parent.parent  # resolve(): usually loaded through a symlink
_MODULE = "tfg_benchmarks_eval_model"
_lock = threading.Lock()
_cache: dict = {}


def _eval_model_module():
    if _MODULE in sys.modules:
        return sys.modules[_MODULE]
    spec = importlib.util.spec_from_file_location(_MODULE, _BENCH_DIR / "eval_model.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[_MODULE] = module
    spec.loader.exec_module(module)
    return module


def _loaded(weights: str):
    with _lock:
        if weights not in _cache:
            em = _eval_model_module()
            _cache[weights] = em.load_eval_model(weights or None)
            logger.info("TFG digits eval model loaded from %s", weights or em.WEIGHTS)
        return _cache[weights]


class DigitsEvalModel:
    RETURN_TYPES = ("MODEL", "CONDITIONING", "CONDITIONING", "LATENT")
    RETURN_NAMES = ("MODEL", "positive", "negative", "LATENT")
    FUNCTION = "load"
    CATEGORY = "TFG/benchmarks"
    DESCRIPTION = ("The pack's digits evaluation model (a class-conditional UNet trained on scikit-learn's 8x8 "
                   "digits): MODEL, the digit's conditioning, the empty (null-class) conditioning and an empty "
                   "latent.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "digit": ("INT", {"default": 3, "min": 0, "max": 9, "tooltip": "Class to condition on."}),
            "batch_size": ("INT", {"default": 4, "min": 1, "max": 4096, "tooltip": "Images in the latent."}),
        }, "optional": {
            "weights": ("STRING", {"default": "", "tooltip": "Weights file; empty = the committed one."}),
        }}

    def load(self, digit, batch_size, weights=""):
        model = _loaded(weights)
        return (model.model, model.cond(digit), model.uncond(), model.empty_latent(batch_size))


class DigitsToImage:
    RETURN_TYPES = ("IMAGE",)
    FUNCTION = "convert"
    CATEGORY = "TFG/benchmarks"
    DESCRIPTION = "A digits-model LATENT ([-1, 1], one channel) as an RGB IMAGE, upscaled by `scale`."

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "samples": ("LATENT", {"tooltip": "Output of a sampler run on the digits model."}),
            "scale": ("INT", {"default": 8, "min": 1, "max": 64, "tooltip": "Nearest-neighbour upscale factor."}),
        }}

    def convert(self, samples, scale):
        import torch
        x = ((samples["samples"].float() + 1.0) / 2.0).clamp(0.0, 1.0)
        x = torch.nn.functional.interpolate(x, scale_factor=scale, mode="nearest")
        return (x.movedim(1, -1).expand(-1, -1, -1, 3).contiguous(),)


NODE_CLASS_MAPPINGS = {"TFG_DigitsEvalModel": DigitsEvalModel, "TFG_DigitsToImage": DigitsToImage}
NODE_DISPLAY_NAME_MAPPINGS = {"TFG_DigitsEvalModel": "TFG Digits Eval Model (benchmark)",
                              "TFG_DigitsToImage": "TFG Digits To Image (benchmark)"}
