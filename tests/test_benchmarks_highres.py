"""The DiffuseHigh GPU benchmark script (benchmarks/gpu_highres.py): its --tiny run on the CPU (same code path as
the GPU run: the SDXL UNet class, the pack's stage function, every row), its refusals, and the markdown it
writes between the BENCHMARKS.md markers."""
from __future__ import annotations

import importlib.util
import re
import subprocess
import sys

import pytest
import torch

import host

SCRIPT = host.PACK_ROOT / "benchmarks" / "gpu_highres.py"


def _module():
    spec = importlib.util.spec_from_file_location("tfg_gpu_highres_for_tests", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_tiny_run_prints_every_row_and_the_table(comfy_host_path):
    out = subprocess.run([sys.executable, str(SCRIPT), "--tiny", "--sizes", "32,64", "--steps", "3",
                          "--guidance-steps", "1", "--large-steps", "2"],
                         capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = [line for line in out.stdout.splitlines() if line.startswith("row: ")]
    assert len(rows) == 6, out.stdout
    assert not any("failed" in r for r in rows), rows
    table = [line for line in out.stdout.splitlines() if line.startswith("| 32²") or line.startswith("| 64²")]
    assert len(table) == 6
    ratios = [float(line.split("|")[5]) for line in table if line.startswith("| 32²")]
    assert len(ratios) == 4 and all(r > 0 for r in ratios)
    assert re.search(r"Latent-mode guidance costs [0-9.]+× a plain img2img stage", out.stdout)
    assert "CPU (tiny configs)" in out.stdout
    estimates = [float(r.split("estimate ")[1].split(" GiB")[0]) for r in rows]
    assert all(e > 0 for e in estimates), rows


def test_refusals():
    if not torch.cuda.is_available():
        out = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True, timeout=300)
        assert out.returncode == 2 and "no CUDA device" in out.stderr
    out = subprocess.run([sys.executable, str(SCRIPT), "--tiny", "--write"], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 2 and "--write is refused" in out.stderr


def test_markdown_section_is_replaced_between_the_markers(tmp_path):
    m = _module()
    res = dict(params=2.567e9, vae_params=83.65e6, build_s=4.0, plain_spread=0.01, rows=[
        dict(size=2048, name="plain img2img stage (guidance off)", steps=15, guided=0, seconds=10.0, peak=12.0,
             ratio=1.0),
        dict(size=2048, name="DiffuseHigh, image guidance (official)", steps=15, guided=5, seconds=20.0, peak=14.0,
             ratio=2.0),
        dict(size=2048, name="DiffuseHigh, latent guidance", steps=15, guided=5, seconds=10.4, peak=12.0,
             ratio=1.04),
        dict(size=4096, name="DiffuseHigh, latent guidance", steps=2, guided=1, seconds=9.0, peak=30.0,
             ratio=None, above=24.5, estimate=21.04),
    ])
    ctx = dict(date="2026-01-01 00:00", device="GPU", torch="2", cuda="12", comfyui="0.3.64", dtype="bfloat16",
               command="python benchmarks/gpu_highres.py", total=100.0)
    md = m.render(res, ctx)
    assert "| 2048² | DiffuseHigh, latent guidance | 15 (5 guided) | 10.40 | 1.040 | 12.0 | – | – |" in md
    assert "| 4096² | DiffuseHigh, latent guidance | 2 (1 guided) | 9.00 | – | 30.0 | 24.5 | 21.0 |" in md
    assert "pre-run estimate is what the node refuses to start below" in md
    assert "1.040× a plain img2img stage at 2048² (meets the ≤ 1.10× target)" in md
    assert "about 1.92 s of VAE decode + encode per guided step" in md
    path = tmp_path / "BENCHMARKS.md"
    path.write_text(f"# Benchmarks\n\nintro\n\n{m.START}\nold\n{m.END}\n\ntail\n")
    import _host  # benchmarks/_host.py (on the path through the module)
    _host.write_results_section(md, m.START, m.END, path)
    text = path.read_text()
    assert "old" not in text and md in text and text.endswith("tail\n") and text.count(m.START) == 1
