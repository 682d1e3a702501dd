"""Shared fixtures. Tests that need ComfyUI take the `comfy_root` fixture; without a host they skip
with one loud line, and the pure-kernel tests still run."""
from __future__ import annotations

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


def pytest_report_header(config):
    return f"ComfyUI host: {_HOST}" if _HOST else _SKIP_REASON


def pytest_collection_modifyitems(config, items):
    if _HOST is None:
        config.issue_config_time_warning(pytest.PytestWarning(_SKIP_REASON), stacklevel=2)


@pytest.fixture(scope="session")
def comfy_root() -> Path:
    if _HOST is None:
        pytest.skip(_SKIP_REASON)
    return host.setup_inprocess_comfyui(_HOST)


@pytest.fixture(scope="session")
def comfy_host_path() -> Path:
    """The ComfyUI checkout path, without importing it into this process (for subprocess servers)."""
    if _HOST is None:
        pytest.skip(_SKIP_REASON)
    return _HOST


@pytest.fixture(scope="session", autouse=True)
def _release_tiny_models():
    """Drop the cached tiny models before interpreter shutdown (ComfyUI's ModelPatcher.__del__ is noisy then)."""
    yield
    if "sampling_helpers" in sys.modules:
        sys.modules["sampling_helpers"]._setups.clear()


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
