"""Shared fixtures. Tests that need ComfyUI take the `comfy_root` fixture; without a host they skip
with one loud line, and the pure-kernel tests still run. Under CI (TFG_REQUIRE_HOST=1, which .ci/run sets, or
CI=true) a missing host is an error instead: CI never passes on skipped host tests."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

import host  # noqa: E402

# The session-wide headless server fixture (`comfy_server`): one server for every module that uses it.
pytest_plugins = ["headless_server"]

_HOST = host.find_comfyui()
_SKIP_REASON = ("NO COMFYUI HOST FOUND (set COMFYUI_PATH, install the pack in ComfyUI/custom_nodes, "
                "or run `python tools/host.py` to bring ComfyUI 0.3.75): node and headless tests skipped")


def _host_required() -> bool:
    return os.environ.get("TFG_REQUIRE_HOST") == "1" or os.environ.get("CI", "").lower() == "true"


def pytest_configure(config):
    if _HOST is None and _host_required():
        raise pytest.UsageError("NO COMFYUI HOST FOUND and TFG_REQUIRE_HOST=1/CI=true: refusing to skip the node "
                                "and headless tests. Run `python tools/host.py --requirements` (brings ComfyUI "
                                "0.3.75) or set COMFYUI_PATH.")


def pytest_report_header(config):
    import tiny_models
    lines = [f"ComfyUI host: {_HOST}" if _HOST else _SKIP_REASON]
    lines.append(f"tiny test models: {tiny_models.CACHE_DIR} (about {tiny_models.CACHE_SIZE_NOTE}; "
                 f"set {tiny_models.CACHE_ENV} to move it)")
    return lines


def pytest_collection_modifyitems(config, items):
    if _HOST is None:
        config.issue_config_time_warning(pytest.PytestWarning(_SKIP_REASON), stacklevel=2)


def _no_host():
    if _host_required():
        pytest.fail(_SKIP_REASON.replace("skipped", "required (TFG_REQUIRE_HOST=1 / CI=true)"), pytrace=False)
    pytest.skip(_SKIP_REASON)


@pytest.fixture(scope="session")
def comfy_root() -> Path:
    if _HOST is None:
        _no_host()
    return host.setup_inprocess_comfyui(_HOST)


@pytest.fixture(scope="session")
def comfy_host_path() -> Path:
    """The ComfyUI checkout path, without importing it into this process (for subprocess servers)."""
    if _HOST is None:
        _no_host()
    return _HOST


@pytest.fixture(scope="session", autouse=True)
def _release_tiny_models():
    """Drop the cached tiny models before interpreter shutdown (ComfyUI's ModelPatcher.__del__ is noisy then)."""
    yield
    if "sampling_helpers" in sys.modules:
        sys.modules["sampling_helpers"]._setups.clear()


def pytest_unconfigure(config):
    """Models still held by test modules are collected at interpreter shutdown, after ComfyUI's own modules
    are torn down; ComfyUI's ModelPatcher.__del__ then fails ("'NoneType' object has no attribute
    'ON_DETACH'") and Python prints "Exception ignored in ... ModelPatcher.__del__" after the test summary.
    It is harmless (the process is exiting) and not a test failure: those messages alone are dropped."""
    import gc
    if "sampling_helpers" in sys.modules:
        sys.modules["sampling_helpers"]._setups.clear()
    gc.collect()

    def hook(unraisable, _previous=sys.__unraisablehook__, _name="ModelPatcher.__del__"):
        if _name in (getattr(unraisable.object, "__qualname__", None) or ""):
            return
        _previous(unraisable)

    import atexit
    atexit.register(setattr, sys, "unraisablehook", hook)   # after pytest has restored its own hook


FAMILIES = ["sd15", "sdxl", "sd3", "flux"]


@pytest.fixture(params=FAMILIES)
def setup(request, comfy_root, tmp_path_factory):
    """A tiny model of each family with a positive and a negative prompt (sampling_helpers.Setup)."""
    from sampling_helpers import get_setup
    return get_setup(request.param, tmp_path_factory)


@pytest.fixture
def sd15(comfy_root, tmp_path_factory):
    from sampling_helpers import get_setup
    return get_setup("sd15", tmp_path_factory)


@pytest.fixture(params=["wan21_t2v", "wan21_i2v", "wan22_t2v", "hunyuan_video", "ltxv", "qwen_image", "chroma",
                        "sd35"])
def dit(request, comfy_root):
    """(name, tiny_dit_models.TinyDiT) for each newer DiT family (tests/tiny_dit_models.py)."""
    import tiny_dit_models
    return request.param, tiny_dit_models.get(request.param)


# The pack's node modules, imported through the host's loader (tests/host.py).
@pytest.fixture(scope="session")
def ag(comfy_root):
    return host.pack_module("nodes.adaptive_guidance")


@pytest.fixture(scope="session")
def la(comfy_root):
    return host.pack_module("nodes.linear_ag")


@pytest.fixture(scope="session")
def nt(comfy_root):
    return host.pack_module("nodes.negtome")


@pytest.fixture(scope="session")
def adapters(comfy_root):
    return host.pack_module("nodes.adapters")
