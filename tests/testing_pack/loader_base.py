"""What the testing pack's loaders share: one build per model per server process, and the loader node shape."""
from __future__ import annotations

import logging
import threading
from typing import Callable

logger = logging.getLogger(__name__)

_built: dict[tuple[str, str], object] = {}
_lock = threading.Lock()


def built_once(kind: str, family: str, build: Callable[[str], object]):
    """`build(family)`, made once per (kind, family) and shared by every later call."""
    key = (kind, family)
    with _lock:
        if key not in _built:
            _built[key] = build(family)
            logger.info("TFG testing pack: built tiny %s %s", family, kind)
        return _built[key]


class TinyLoader:
    """A loader node returning (MODEL, CLIP, VAE) like CheckpointLoaderSimple; subclasses set FAMILY and BUILD."""
    FAMILY = ""
    BUILD: Callable[[str], tuple] = None
    RETURN_TYPES = ("MODEL", "CLIP", "VAE")
    RETURN_NAMES = ("MODEL", "CLIP", "VAE")
    FUNCTION = "load"
    CATEGORY = "TFG/testing"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {},
                "optional": {"ckpt_name": ("STRING", {"default": "", "tooltip": "Ignored (keeps a swapped-in "
                                                                             "loader's graph valid)."})}}

    def load(self, ckpt_name=""):
        return built_once("model", self.FAMILY, type(self).BUILD)
