"""GPU timing and memory of DiffuseHigh stages on full-size SDXL: `python benchmarks/gpu_highres.py [--write]`.

Builds the real SDXL UNet (2.6 B parameters, `comfy.supported_models.SDXL`, the builders of benchmarks/gpu.py)
and the full-size SDXL VAE (`comfy.sd.VAE`, the SD/SDXL AutoencoderKL, 83.7 M parameters) with random weights
(timing and memory do not depend on the weights), then runs one DiffuseHigh stage per row through the pack's
own stage function (`nodes.diffusehigh.run_stage`: bicubic upsample + sharpen, VAE encode, ComfyUI's KSampler
path over the last `steps` of a 50-step ddim_uniform schedule at CFG 10, VAE decode; tiled VAE at the node
default of 1024 px), batch 1:

* at 2048² (from a 1024² image), the official stage (15 steps, 5 guided): plain img2img (guidance off),
  image-mode guidance (official: VAE decode + encode per guided step) and latent-mode guidance (no VAE round
  trip), each with wall time (torch.cuda.synchronize) and the ratio to the plain stage in the same run;
* at 4096² (from 2048²), peak GPU memory (torch.cuda.max_memory_allocated, weights included) of image- and
  latent-mode stages; these rows run `--large-steps` steps (default 2, 1 guided) because the peak of a stage
  is reached within its first guided step, and a full 4096² stage would not fit the time budget;
* for every row, the node's pre-run memory estimate (`nodes.diffusehigh.estimate_memory`, nodes/memory.py: what
  the node refuses to start below, weights excluded) next to the measured peak above the memory already
  allocated before the stage (the resident weights), so the estimate can be checked against the GPU.

Rows are printed as they finish; the markdown table at the end (and with --write, the section between the
`results:gpu-highres` markers of BENCHMARKS.md). `--tiny` runs the same code with the tiny SDXL twin and a tiny
VAE on any device at 64/128 px for the CPU tests; its figures are never written.
"""
from __future__ import annotations

import argparse
import datetime
import gc
import logging
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _host  # noqa: E402
import gpu  # noqa: E402  (the full-size builders)

logger = logging.getLogger("tfg.benchmarks.gpu_highres")

HERE = Path(__file__).resolve().parent
BENCHMARKS_MD = HERE.parent / "BENCHMARKS.md"
START, END = "<!-- results:gpu-highres:start -->", "<!-- results:gpu-highres:end -->"
TARGET_LATENT_RATIO = 1.10


def build_vae(tiny: bool, device, dtype, seed: int = 0):
    """The SD/SDXL AutoencoderKL (full size) with random weights, as a comfy.sd.VAE; tiny: the tests' TAESD."""
    import torch
    if tiny:
        import tiny_models  # tests/tiny_models.py (on the path through _host)
        return tiny_models.build_tiny_vae("sdxl")
    import comfy.sd
    from comfy.ldm.models.autoencoder import AutoencoderKL
    ddconfig = {"double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 128,
                "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0}
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in AutoencoderKL(ddconfig=ddconfig, embed_dim=4).state_dict().items()}
    gen = torch.Generator().manual_seed(seed)
    sd = {}
    for k, shape in shapes.items():
        if len(shape) >= 2:
            fan_in = 1
            for s in shape[1:]:
                fan_in *= s
            sd[k] = torch.randn(shape, generator=gen) * fan_in ** -0.5
        elif k.endswith("weight") and "norm" in k:
            sd[k] = torch.ones(shape)
        else:
            sd[k] = torch.zeros(shape)
    return comfy.sd.VAE(sd=sd, device=device)


class Bench:
    def __init__(self, tiny: bool, device, dtype):
        import torch
        import comfy.model_patcher
        import comfy.utils
        comfy.utils.PROGRESS_BAR_ENABLED = False
        self.nd = _host.host.pack_module("nodes.diffusehigh")
        self.tiny, self.device = tiny, device
        self.cuda = torch.device(device).type == "cuda"
        t0 = time.perf_counter()
        base = gpu.build_base_model("sdxl", tiny, device, dtype)
        self.params = sum(p.numel() for p in base.diffusion_model.parameters())
        self.model = comfy.model_patcher.ModelPatcher(base, load_device=device, offload_device=device)
        self.vae = build_vae(tiny, device, dtype)
        self.vae_params = sum(p.numel() for p in self.vae.first_stage_model.parameters())
        self.build_s = time.perf_counter() - t0
        self.positive = gpu.conditioning("sdxl", tiny, 1)
        self.negative = gpu.conditioning("sdxl", tiny, 2)
        self.family = _host.host.pack_module("nodes.adapters").detect_family(self.model)

    def sync(self):
        import torch
        if self.cuda:
            torch.cuda.synchronize()

    def estimate(self, size: int, params) -> float:
        """The node's pre-run estimate for this stage on the model's device, GiB (weights excluded)."""
        est = self.nd.estimate_memory(self.model, self.vae, 1, [(size, size)], params)
        return est.peak(self.model.load_device) / 2 ** 30

    def stage(self, size: int, params, seed: int = 7):
        """One stage from a random (size/2)² image to size²: (seconds, peak GiB or None, output); the memory
        allocated before the stage (GiB or None) is kept in self.resident."""
        import torch
        g = torch.Generator().manual_seed(seed)
        image = torch.rand(1, size // 2, size // 2, 3, generator=g)
        gc.collect()
        self.resident = None
        if self.cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            self.resident = torch.cuda.memory_allocated() / 2 ** 30
        self.sync()
        t = time.perf_counter()
        with torch.inference_mode():
            out, _ = self.nd.run_stage(self.model, self.positive, self.negative, self.vae, image, (size, size),
                                       params, seed, 0, self.family, "benchmark")
        self.sync()
        seconds = time.perf_counter() - t
        peak = torch.cuda.max_memory_allocated() / 2 ** 30 if self.cuda else None
        return seconds, peak, out


def run(tiny: bool, device, dtype, sizes: tuple[int, int], steps: int, guided: int, large_steps: int,
        emit) -> dict:
    nd_defaults = _host.host.pack_module("kernels.diffusehigh").DiffuseHighParams()
    bench = Bench(tiny, device, dtype)
    small, large = sizes
    base = nd_defaults.replace(steps=steps, guidance_steps=guided)
    if tiny:
        base = base.replace(schedule_steps=10, vae_tile_size=0)
    # warm-up: loads the models, first-call allocations and kernels (short stage at the small size)
    bench.stage(small, base.replace(steps=2, guidance_steps=1, guidance_mode="image"))
    rows = []
    plan = [
        (small, "plain img2img stage (guidance off)", base.replace(guidance_steps=0)),
        (small, "DiffuseHigh, image guidance (official)", base.replace(guidance_mode="image")),
        (small, "DiffuseHigh, latent guidance", base.replace(guidance_mode="latent")),
        (small, "plain img2img stage (repeat, last)", base.replace(guidance_steps=0)),
    ]
    large_guided = min(guided, max(1, large_steps // 2))
    large_plan = [
        (large, "DiffuseHigh, latent guidance", base.replace(steps=large_steps, guidance_steps=large_guided,
                                                             guidance_mode="latent")),
        (large, "DiffuseHigh, image guidance (official)", base.replace(steps=large_steps,
                                                                       guidance_steps=large_guided,
                                                                       guidance_mode="image")),
    ]
    for size, name, p in plan + large_plan:
        try:
            seconds, peak, out = bench.stage(size, p)
            import torch
            finite = bool(torch.isfinite(out).all())
        except Exception as e:  # noqa: BLE001  a failing row (e.g. out of memory) must not cost the others
            logger.error("%s %d: %s failed: %s", name, size, type(e).__name__, e)
            row = dict(size=size, name=f"{name} (failed: {type(e).__name__})", steps=p.steps,
                       guided=p.guidance_steps, seconds=float("nan"), peak=None)
            rows.append(row)
            emit(row)
            gc.collect()
            continue
        row = dict(size=size, name=name, steps=p.steps, guided=p.guidance_steps, seconds=seconds, peak=peak,
                   finite=finite, estimate=bench.estimate(size, p),
                   above=None if peak is None or bench.resident is None else peak - bench.resident)
        rows.append(row)
        emit(row)
    plain = [r["seconds"] for r in rows if r["size"] == small and r["name"].startswith("plain")]
    ref = sum(plain) / len(plain) if plain else float("nan")
    for r in rows:
        r["ratio"] = r["seconds"] / ref if r["size"] == small else None
    return dict(rows=rows, params=bench.params, vae_params=bench.vae_params, build_s=bench.build_s,
                plain_spread=(max(plain) - min(plain)) / ref if len(plain) > 1 else float("nan"))


def _fmt_row(r: dict) -> str:
    peak = "–" if r.get("peak") is None else f"{r['peak']:.1f}"
    ratio = "–" if r.get("ratio") is None else f"{r['ratio']:.3f}"
    above = "–" if r.get("above") is None else f"{r['above']:.1f}"
    estimate = "–" if r.get("estimate") is None else f"{r['estimate']:.1f}"
    return (f"| {r['size']}² | {r['name']} | {r['steps']} ({r['guided']} guided) | {r['seconds']:.2f} | {ratio} | "
            f"{peak} | {above} | {estimate} |")


def render(res: dict, ctx: dict) -> str:
    out = [f"Run {ctx['date']} on {ctx['device']} (torch {ctx['torch']}, CUDA {ctx['cuda']}, ComfyUI "
           f"{ctx['comfyui']}). Command: `{ctx['command']}`. SDXL UNet {res['params'] / 1e9:.2f} B + VAE "
           f"{res['vae_params'] / 1e6:.1f} M parameters, random weights, UNet in {ctx['dtype']}; batch 1; one stage "
           "from an image of half the size; euler / ddim_uniform, last steps of 50, CFG 10; VAE tiles of 1024 px "
           "(node default).", ""]
    out.append("| stage size | method | steps | wall (s) | time / plain stage | peak GPU memory, incl. weights (GiB) | "
               "peak above the resident weights (GiB) | node's pre-run estimate (GiB) |")
    out.append("|---|---|---|---|---|---|---|---|")
    for r in res["rows"]:
        out.append(_fmt_row(r))
    out.append("")
    byname = {(r["size"], r["name"]): r for r in res["rows"]}
    small = res["rows"][0]["size"]
    lat = byname.get((small, "DiffuseHigh, latent guidance"))
    img = byname.get((small, "DiffuseHigh, image guidance (official)"))
    notes = []
    if lat is not None and lat.get("ratio") is not None:
        verdict = "meets" if lat["ratio"] <= TARGET_LATENT_RATIO else "misses"
        notes.append(f"Latent-mode guidance costs {lat['ratio']:.3f}× a plain img2img stage at {small}² ({verdict} "
                     f"the ≤ {TARGET_LATENT_RATIO:.2f}× target)")
    if img is not None and img.get("ratio") is not None and lat is not None:
        per_step = (img["seconds"] - lat["seconds"]) / max(img["guided"], 1)
        notes.append(f"image mode {img['ratio']:.3f}× (about {per_step:.2f} s of VAE decode + encode per guided "
                     "step)")
    if notes:
        out.append("; ".join(notes) + ".")
    out.append(f"The plain stage ran first and last: its two timings differ by {100 * res['plain_spread']:.1f}% "
               "(the noise of the ratios, which use their mean). The largest-size rows run a shortened stage for "
               "the memory peak only (the peak of a stage is reached in its first guided step).")
    out.append("The pre-run estimate is what the node refuses to start below (nodes/memory.py: ComfyUI's own UNet and "
               "VAE estimates for the smallest batch it can fall back to, plus the stage's tensors; weights excluded, "
               "since ComfyUI can offload them); it should not exceed the measured peak above the resident weights.")
    out.append(f"Whole script: {ctx['total']:.0f} s (model build {res['build_s']:.0f} s).")
    return "\n".join(out)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default=None, help="timing size,memory size (default 2048,4096; --tiny 64,128)")
    parser.add_argument("--steps", type=int, default=None, help="stage steps at the timing size (default 15; "
                                                                "--tiny 4)")
    parser.add_argument("--guidance-steps", type=int, default=None, help="guided steps (default 5; --tiny 2)")
    parser.add_argument("--large-steps", type=int, default=2, help="stage steps at the memory size (default 2)")
    parser.add_argument("--tiny", action="store_true", help="tiny SDXL twin + tiny VAE on any device (tests)")
    parser.add_argument("--write", action="store_true", help="rewrite the gpu-highres section of BENCHMARKS.md")
    parser.add_argument("--verbose", action="store_true")
    args = parser.parse_args(argv)
    if args.tiny and args.write:
        parser.error("--tiny figures are not GPU figures; --write is refused")
    _host.configure_logging(args.verbose)

    import torch
    has_cuda = torch.cuda.is_available()
    if not has_cuda and not args.tiny:
        sys.stderr.write("benchmarks/gpu_highres.py: no CUDA device found. This script times full-size SDXL "
                         "DiffuseHigh stages at 2048² and 4096² and needs an NVIDIA GPU (about 40 GB free). Use "
                         "--tiny for a CPU check.\n")
        return 2
    _host.setup(cpu=not has_cuda)
    import comfy.model_management
    device = comfy.model_management.get_torch_device()
    dtype = torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    sizes = tuple(int(s) for s in (args.sizes or ("64,128" if args.tiny else "2048,4096")).split(","))
    if len(sizes) != 2:
        parser.error("--sizes takes two sizes: timing,memory")
    steps = args.steps or (4 if args.tiny else 15)
    guided = args.guidance_steps if args.guidance_steps is not None else (2 if args.tiny else 5)
    t0 = time.perf_counter()

    def emit(row):
        sys.stdout.write(f"row: {row['size']}² | {row['name']} | {row['steps']} steps ({row['guided']} guided) | "
                         f"{row['seconds']:.2f} s | peak "
                         f"{'–' if row.get('peak') is None else format(row['peak'], '.1f')} GiB | estimate "
                         f"{'–' if row.get('estimate') is None else format(row['estimate'], '.4f')} GiB\n")
        sys.stdout.flush()

    res = run(args.tiny, device, dtype, sizes, steps, guided, args.large_steps, emit)
    ctx = dict(date=datetime.datetime.now().strftime("%Y-%m-%d %H:%M"),
               device=torch.cuda.get_device_name(device) if has_cuda else "CPU (tiny configs)",
               torch=torch.__version__, cuda=torch.version.cuda, comfyui=gpu._comfyui_version(),
               dtype=str(dtype).replace("torch.", ""),
               command="python benchmarks/gpu_highres.py" + (" " + " ".join(argv) if argv else ""),
               total=time.perf_counter() - t0)
    markdown = render(res, ctx)
    sys.stdout.write(markdown + "\n")
    sys.stdout.flush()
    if args.write:
        _host.write_results_section(markdown, START, END, BENCHMARKS_MD)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
