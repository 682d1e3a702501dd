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
                "or check ComfyUI out into ~/comfy/ComfyUI): node and headless tests skipped")


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
