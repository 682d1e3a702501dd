"""Test-only nodes for the hostile-input tests: nodes that break a tensor on its way to a pack node (NaN or ±Inf in
a LATENT, IMAGE, MASK or CONDITIONING: one element of each tensor it carries, so a check that samples instead of
scanning misses it), and a MODEL passthrough that is never cached."""
from __future__ import annotations

import torch

POISONS = {"nan": float("nan"), "inf": float("inf"), "-inf": float("-inf")}


def _poisoned(t: torch.Tensor, value: float) -> torch.Tensor:
    if not (isinstance(t, torch.Tensor) and t.is_floating_point() and t.numel()):
        return t
    out = t.clone()
    out.view(-1)[out.numel() // 2] = value
    return out


class _NonFinite:
    IO_TYPE = ""
    FUNCTION = "poison"
    CATEGORY = "TFG/testing"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"value": (cls.IO_TYPE,), "poison": (list(POISONS), {"default": "nan"})}}

    @classmethod
    def IS_CHANGED(cls, value, poison):
        return poison


class NonFiniteLatent(_NonFinite):
    IO_TYPE = "LATENT"
    RETURN_TYPES = ("LATENT",)

    def poison(self, value, poison):
        out = dict(value)
        out["samples"] = _poisoned(value["samples"], POISONS[poison])
        return (out,)


class NonFiniteImage(_NonFinite):
    IO_TYPE = "IMAGE"
    RETURN_TYPES = ("IMAGE",)

    def poison(self, value, poison):
        return (_poisoned(value, POISONS[poison]),)


class NonFiniteMask(_NonFinite):
    IO_TYPE = "MASK"
    RETURN_TYPES = ("MASK",)

    def poison(self, value, poison):
        return (_poisoned(value, POISONS[poison]),)


class NonFiniteConditioning(_NonFinite):
    """Poisons the cross-attention tensor of every entry (not the pooled output)."""
    IO_TYPE = "CONDITIONING"
    RETURN_TYPES = ("CONDITIONING",)

    def poison(self, value, poison):
        return ([[_poisoned(cond, POISONS[poison]), dict(extra)] for cond, extra in value],)


class UncachedModel:
    """Passes the MODEL through unchanged but is never served from ComfyUI's cache, so everything downstream runs
    again while the loader stays cached: a later prompt sees any state an earlier one left on the loaded model."""
    RETURN_TYPES = ("MODEL",)
    FUNCTION = "passthrough"
    CATEGORY = "TFG/testing"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model": ("MODEL",)}}

    @classmethod
    def IS_CHANGED(cls, model):
        return float("nan")                  # never equal to itself: re-executed every prompt

    def passthrough(self, model):
        return (model,)


NODE_CLASS_MAPPINGS = {
    "TFGTest_NonFiniteLatent": NonFiniteLatent,
    "TFGTest_NonFiniteImage": NonFiniteImage,
    "TFGTest_NonFiniteMask": NonFiniteMask,
    "TFGTest_NonFiniteConditioning": NonFiniteConditioning,
}
NODE_DISPLAY_NAME_MAPPINGS = {k: f"Non-finite {v.IO_TYPE.title()} (TFG tests)" for k, v in NODE_CLASS_MAPPINGS.items()}
NODE_CLASS_MAPPINGS["TFGTest_UncachedModel"] = UncachedModel
NODE_DISPLAY_NAME_MAPPINGS["TFGTest_UncachedModel"] = "Uncached Model (TFG tests)"
