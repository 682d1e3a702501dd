"""GPU timing of guidance on full-size SDXL and Flux architectures: `python benchmarks/gpu.py [--write]`.

Builds the real SDXL UNet (2.6 B parameters) and Flux-dev transformer (11.9 B) from ComfyUI's own classes
(`comfy.supported_models.SDXL` / `.Flux`) with random weights (no checkpoint needed: timing does not depend on
the weights), then samples 1024x1024, batch 4 through ComfyUI's KSampler path and reports what users pay, per
method: model evaluations per image (counted at APPLY_MODEL) and their ratio to CFG, wall time (torch.cuda.synchronize
around each run) as the median of several runs with their range, the ratio to CFG's median, and the peak GPU
memory (torch.cuda.max_memory_allocated). A "cond only (cfg 1)" row gives the floor.

Method: every method first runs once untimed, so that every batch shape and code path it uses is warm (AG's half
batches after its latch, NegToMe's active window, LinearAG's estimated steps; the first method to meet a shape
no longer pays its one-time costs); then each method is timed `--repeats` times (3) in rotated order.

With random weights the AG cosine is meaningless, so AG rows force the latch at a fixed fraction of the
schedule (threshold 0, start_percent p): the evaluation counts are then those of a real AG run that latches
there, and the timing includes all of AG's own work (cosine, bookkeeping, the cond-only passes).

`--tiny` builds scaled-down configs of the same classes and runs on whatever device there is (for the CPU
tests); its figures are not GPU figures and are never written to BENCHMARKS.md.
"""
from __future__ import annotations

import importlib

import argparse
import datetime
import gc
import json
import logging
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _host  # noqa: E402

logger = logging.getLogger("tfg.benchmarks.gpu")

HERE = Path(__file__).resolve().parent
BENCHMARKS_MD = HERE.parent / "BENCHMARKS.md"

# Full-size architecture hyperparameters (what ComfyUI's model detection derives from the released checkpoints).
SDXL_UNET = {
    "use_checkpoint": False, "image_size": 32, "in_channels": 4, "out_channels": 4, "model_channels": 320,
    "num_res_blocks": [2, 2, 2], "channel_mult": [1, 2, 4], "transformer_depth": [0, 0, 2, 2, 10, 10],
    "transformer_depth_output": [0, 0, 0, 2, 2, 2, 10, 10, 10], "transformer_depth_middle": 10,
    "use_spatial_transformer": True, "use_linear_in_transformer": True, "context_dim": 2048,
    "num_head_channels": 64, "legacy": False, "num_classes": "sequential", "adm_in_channels": 2816,
    "use_temporal_attention": False, "use_temporal_resblock": False,
}
FLUX_DEV = {
    "image_model": "flux", "guidance_embed": True, "in_channels": 16, "out_channels": 16, "patch_size": 2,
    "vec_in_dim": 768, "context_in_dim": 4096, "hidden_size": 3072, "mlp_ratio": 4.0, "num_heads": 24,
    "depth": 19, "depth_single_blocks": 38, "axes_dim": [16, 56, 56], "theta": 10000, "qkv_bias": True,
}
# Scaled-down twins for --tiny (same classes, same code paths).
SDXL_TINY = dict(SDXL_UNET, model_channels=32, num_res_blocks=[1, 1], channel_mult=[1, 2], transformer_depth=[0, 1],
                 transformer_depth_output=[0, 0, 1, 1], transformer_depth_middle=1, context_dim=64,
                 num_head_channels=16)
FLUX_TINY = dict(FLUX_DEV, hidden_size=64, num_heads=4, depth=1, depth_single_blocks=1, axes_dim=[4, 6, 6],
                 context_in_dim=64)

FAMILIES = {
    # family: (config class name, full config, tiny config, text tokens, pooled dim, sampler, scheduler, cfg)
    "sdxl": ("SDXL", SDXL_UNET, SDXL_TINY, 77, 1280, "euler", "normal", 7.0),
    "flux": ("Flux", FLUX_DEV, FLUX_TINY, 256, 768, "euler", "simple", 3.5),
}
EXPECTED_PARAMS = {"sdxl": 2.567e9, "flux": 11.90e9}  # published sizes, for the sanity line in the output


def unet_config(family: str, tiny: bool = False) -> dict:
    return dict(FAMILIES[family][2] if tiny else FAMILIES[family][1])


def model_config(family: str, tiny: bool = False, dtype=None):
    """The comfy.supported_models config object for `family` (its unet_extra_config applied, then ours)."""
    import comfy.supported_models
    cls = getattr(comfy.supported_models, FAMILIES[family][0])
    cfg = cls(unet_config(family, tiny))
    if family == "sdxl":
        cfg.unet_config["num_head_channels"] = unet_config(family, tiny)["num_head_channels"]
    if dtype is not None:
        cfg.set_inference_dtype(dtype, None)
    return cfg


def build_base_model(family: str, tiny: bool, device, dtype, seed: int = 0):
    """A BaseModel of the family with random weights (std 1/sqrt(fan_in); norms 1, biases 0) on `device`.
    device="meta" builds the structure only (for counting parameters without memory)."""
    import torch
    base = model_config(family, tiny, dtype).get_model({}, device=device)
    if str(device) != "meta":
        gen = torch.Generator(device=device).manual_seed(seed)
        with torch.no_grad():
            for name, p in base.diffusion_model.named_parameters():
                if p.dim() >= 2:
                    fan_in = p[0].numel()
                    p.normal_(0.0, fan_in ** -0.5, generator=gen)
                elif name.endswith(("scale", "norm.weight")) or ".norm" in name and name.endswith("weight"):
                    p.fill_(1.0)
                else:
                    p.zero_()
    return base


def parameter_count(family: str, tiny: bool = False) -> int:
    base = build_base_model(family, tiny, "meta", None)
    return sum(p.numel() for p in base.diffusion_model.parameters())


def conditioning(family: str, tiny: bool, seed: int, device="cpu"):
    import torch
    _, _, _, tokens, pooled, _, _, _ = FAMILIES[family]
    ctx_dim = unet_config(family, tiny)["context_dim" if family == "sdxl" else "context_in_dim"]
    gen = torch.Generator().manual_seed(seed)
    extra = {"pooled_output": torch.randn(1, pooled, generator=gen)}
    if family == "flux":
        extra["guidance"] = 3.5
    return [[torch.randn(1, tokens, ctx_dim, generator=gen), extra]]


def run_family(family: str, tiny: bool, resolution: int, batch: int, steps: int, device, dtype, methods,
               repeats: int = 3, warm_steps: int | None = None):
    """Time `methods` ((name, spec) pairs; see `make_method`) on `family` at resolution x resolution, batch
    `batch`, `steps` steps, as users pay for them: a "cond only (cfg 1)" floor row is added; every method first
    runs once untimed (every batch shape and code path it uses is warm: AG's half batches after its latch,
    NegToMe's active window, LinearAG's estimated steps), then each is timed `repeats` times in rotated order.
    Rows report the median time with its spread, the ratio to CFG's median and the evaluation ratio."""
    import torch
    import comfy.model_patcher
    import comfy.utils
    comfy_nodes = importlib.import_module("nodes")  # ComfyUI's own top-level nodes module
    h = _host.host.pack_module("benchmarks.harness")
    _, _, _, _, _, sampler, scheduler, cfg = FAMILIES[family]
    comfy.utils.PROGRESS_BAR_ENABLED = False

    t0 = time.perf_counter()
    base = build_base_model(family, tiny, device, dtype)
    params = sum(p.numel() for p in base.diffusion_model.parameters())
    patcher = comfy.model_patcher.ModelPatcher(base, load_device=device, offload_device=device)
    build_s = time.perf_counter() - t0
    positive = conditioning(family, tiny, 1)
    negative = conditioning(family, tiny, 2)
    channels = base.latent_format.latent_channels
    latent = {"samples": torch.zeros(batch, channels, resolution // 8, resolution // 8)}
    cuda = torch.device(device).type == "cuda"

    def sync():
        if cuda:
            torch.cuda.synchronize()

    def sample(method, n_steps):
        counter = h.PassCounter()
        model, _ = h.prepare(patcher, method)
        model = h.with_counter(model, counter)
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        sync()
        t = time.perf_counter()
        with torch.inference_mode():
            out = comfy_nodes.common_ksampler(model, 7, n_steps, method.cfg, sampler, scheduler, positive, negative,
                                              latent, denoise=1.0)[0]["samples"]
        sync()
        seconds = time.perf_counter() - t
        peak = torch.cuda.max_memory_allocated() / 2 ** 30 if cuda else None
        if not torch.isfinite(out).all():
            logger.warning("%s %s: non-finite output (random weights)", family, method.name)
        return counter, seconds, peak

    plan = [(CFG_ROW, None), (FLOOR_ROW, "cond_only")] + [m for m in methods if m[0] not in (CFG_ROW, FLOOR_ROW)]
    built = [(name, make_method(name, spec, cfg, h)) for name, spec in plan]
    warm = steps if warm_steps is None else min(steps, warm_steps)
    failed = {}
    for name, method in built:  # untimed: loads the model, compiles kernels, every shape and path
        try:
            sample(method, warm)
        except Exception as e:  # noqa: BLE001  a technique under development must not cost the other rows
            logger.error("%s %s failed: %s", family, name, e)
            failed[name] = type(e).__name__
    timed = [(n, m) for n, m in built if n not in failed]
    samples = {n: [] for n, _ in timed}
    info = {}
    for r in range(repeats):
        shift = r % max(1, len(timed))
        for name, method in timed[shift:] + timed[:shift]:  # rotated order: drift hits every method alike
            counter, seconds, peak = sample(method, steps)
            samples[name].append(seconds)
            previous = info.get(name, (None, None))[1]
            info[name] = (counter.rows / batch, peak if previous is None else max(previous, peak))
            logger.info("%s %-44s %.1f evals/image %.2fs", family, name, counter.rows / batch, seconds)
    rows = []
    for name, _ in built:
        if name in failed:
            rows.append(dict(family=family, method=f"{name} (failed: {failed[name]})", evals=float("nan"),
                             seconds=float("nan"), spread=(float("nan"), float("nan")), peak=None, times=[]))
            continue
        times = sorted(samples[name])
        evals, peak = info[name]
        rows.append(dict(family=family, method=name, evals=evals, seconds=times[len(times) // 2],
                         spread=(times[0], times[-1]), peak=peak, times=samples[name]))
    ref = next(r for r in rows if r["method"] == CFG_ROW)
    for r in rows:
        r["ratio"] = r["seconds"] / ref["seconds"]
        r["eval_ratio"] = r["evals"] / ref["evals"]
    return dict(params=params, build_s=build_s, rows=rows, cfg=cfg, sampler=sampler, scheduler=scheduler,
                steps=steps, repeats=repeats, warm_steps=warm)


CFG_ROW = "CFG"
FLOOR_ROW = "cond only (cfg 1)"


def make_method(name: str, spec, cfg: float, h):
    """A harness Method: spec None = CFG, "cond_only" = cfg 1 (the floor), a float = AG forced to latch at that
    fraction of the schedule, NegToMeParams = CFG + NegToMe, else LinearAGParams."""
    P = _host.host.pack_module("kernels.adaptive_guidance").AdaptiveGuidanceParams
    if spec is None:
        return h.Method(name, cfg)
    if spec == "cond_only":
        return h.Method(name, 1.0)
    if isinstance(spec, float):
        return h.Method(name, cfg, P(threshold=0.0, space="x0", start_percent=spec))
    if type(spec).__name__ == "NegToMeParams":
        return h.Method(name, cfg, negtome=spec)
    return h.Method(name, cfg, linear_ag=spec)


def linear_ag_timing_params():
    """LinearAG with the online hold_delta estimator on the paper's schedule (odd steps of the first half
    estimated, conditional-only after it) and AG's latch off: the paper's evaluation count without a fit. None
    when the pack has no LinearAG."""
    try:
        lag = _host.host.pack_module("kernels.linear_ag")
    except ImportError:
        return None
    P = _host.host.pack_module("kernels.adaptive_guidance").AdaptiveGuidanceParams
    return lag.LinearAGParams().replace(estimator="hold_delta", after="cond_only", guidance=P(threshold=1.0))


def negtome_params(similarity: str | None = None):
    """The pack's NegToMe defaults (diversity mode; `similarity` replaced when given), or None when the pack has
    no NegToMe."""
    try:
        _host.host.pack_module("nodes.negtome")
        params = _host.host.pack_module("kernels.negtome").NegToMeParams()
    except (ImportError, AttributeError):
        return None
    return params if similarity is None else params.replace(similarity=similarity)


def negtome_available() -> bool:
    return negtome_params() is not None


def _per_family(text: str, families: list[str], cast, default):
    """"20" -> the same for every family; "sdxl=20,flux=10" -> per family (others: default)."""
    if "=" not in text:
        value = cast(text) if text else default
        return {f: value for f in families}
    out = {f: default for f in families}
    for part in text.split(","):
        if part.strip():
            family, _, value = part.partition("=")
            out[family.strip()] = cast(value.strip())
    return out


def plan_methods(only: set[str]) -> list:
    """(name, spec) rows for the method groups in `only` (empty: all; see METHOD_GROUPS)."""
    wanted = (lambda key: not only or key in only)
    methods = []
    if wanted("ag"):
        methods += [("AG, latch at 50% of the schedule", 0.5), ("AG, latch at 30% of the schedule", 0.3)]
    linear = linear_ag_timing_params()
    if linear is not None and wanted("linear_ag"):
        methods.append(("LinearAG hold_delta, paper schedule", linear))
    default = negtome_params()
    if default is not None and wanted("negtome"):
        methods.append((f"CFG + NegToMe (pack defaults, similarity {default.similarity})", default))
        if default.similarity != "fp32":
            methods.append(("CFG + NegToMe (similarity fp32)", negtome_params("fp32")))
    if default is not None and wanted("negtome_other"):
        others = [s for s in _host.host.pack_module("kernels.negtome").SIMILARITIES
                  if s not in (default.similarity, "fp32")]
        methods += [(f"CFG + NegToMe (similarity {s})", negtome_params(s)) for s in others]
    return methods


METHOD_GROUPS = ("ag", "linear_ag", "negtome", "negtome_other")
"""ag: AG latching at 50% and 30%; linear_ag; negtome: the pack defaults and similarity fp32; negtome_other: the
remaining similarity settings."""


def render(results: dict, ctx: dict) -> str:
    out = [f"Run {ctx['date']} on {ctx['device']} (torch {ctx['torch']}, CUDA {ctx['cuda']}, ComfyUI "
           f"{ctx['comfyui']}). Command: `{ctx['command']}`. {ctx['batch']} images of {ctx['res']}×{ctx['res']} "
           f"per run, random weights in {ctx['dtype']}.", ""]
    out.append("| model | method | steps | evals/image | eval ratio | wall (s), median [min–max] | s/image | "
               "time / CFG | time − eval ratio | peak GPU memory, incl. weights (GiB) |")
    out.append("|---|---|---|---|---|---|---|---|---|---|")
    for family, res in results.items():
        size = f"{res['params'] / 1e9:.2f} B" if res["params"] >= 1e8 else f"{res['params'] / 1e6:.2f} M"
        for r in res["rows"]:
            peak = "–" if r["peak"] is None else f"{r['peak']:.1f}"
            lo, hi = r["spread"]
            out.append(f"| {family} ({size} params, cfg {res['cfg']}, {res['sampler']}/{res['scheduler']}) | "
                       f"{r['method']} | {res['steps']} | {r['evals']:.1f} | {r['eval_ratio']:.3f} | "
                       f"{r['seconds']:.2f} [{lo:.2f}–{hi:.2f}] | {r['seconds'] / ctx['batch']:.2f} | "
                       f"{r['ratio']:.3f} | {r['ratio'] - r['eval_ratio']:+.3f} | {peak} |")
    out.append("")
    out.append(f"Each method ran once untimed first (warm-up of every batch shape and code path it uses, "
               f"{ctx['warm']} steps), then {ctx['repeats']} timed runs in rotated order; wall is the median with "
               "the range of the runs, time / CFG is against CFG's median. eval ratio: network rows per image "
               "against CFG's (cond only = 0.5). AG rows force the latch at the given fraction of the schedule "
               "(random weights make the cosine meaningless): evaluation counts equal those of a real run latching "
               "there. The LinearAG row uses the online hold_delta estimator (no fit needed; a fitted run has the "
               "same count). NegToMe rows: diversity mode at the pack defaults, with the similarity setting named.")
    if not ctx["negtome"]:
        out.append("NegToMe: not in the pack, no row.")
    out.append(f"Whole script: {ctx['total']:.0f} s.")
    return "\n".join(out)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="sdxl,flux")
    parser.add_argument("--resolution", type=int, default=None, help="default 1024 (64 with --tiny)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", default="", help="20 (3 with --tiny) by default; a number, or per model "
                        "as sdxl=20,flux=10")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per method (rotated order; median)")
    parser.add_argument("--warm-steps", type=int, default=6, help="steps of each method's untimed warm-up run")
    parser.add_argument("--tiny", action="store_true", help="scaled-down configs on any device (tests)")
    parser.add_argument("--write", action="store_true", help="rewrite this run's section of BENCHMARKS.md")
    parser.add_argument("--section", default=None, help="BENCHMARKS.md section (markers results:<section>); "
                        "default gpu, or gpu:<only> with a plain --only list")
    parser.add_argument("--only", default="", help=f"method groups besides CFG and the floor, of "
                        f"{', '.join(METHOD_GROUPS)}: a comma list, or per model as sdxl=ag+negtome,flux=negtome")
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")
    parser.add_argument("--verbose", action="store_true")
    args = parser.parse_args(argv)
    if args.tiny and args.write:
        parser.error("--tiny figures are not GPU figures; --write is refused")
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    _host.configure_logging(args.verbose)

    import torch
    has_cuda = torch.cuda.is_available()
    if not has_cuda and not args.tiny:
        sys.stderr.write("benchmarks/gpu.py: no CUDA device found. This script times full-size SDXL and Flux and "
                         "needs an NVIDIA GPU (about 40 GB free). Use --tiny for a CPU check of the builders.\n")
        return 2
    _host.setup(cpu=not has_cuda)
    import comfy.model_management
    device = comfy.model_management.get_torch_device()
    dtype = torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    resolution = args.resolution or (64 if args.tiny else 1024)
    families = [f.strip() for f in args.models.split(",") if f.strip()]
    unknown_models = set(families) - set(FAMILIES)
    if unknown_models:
        parser.error(f"--models: unknown {sorted(unknown_models)}")
    steps = _per_family(args.steps, families, int, 3 if args.tiny else 20)
    only = _per_family(args.only.replace("+", ";"), families,
                       lambda text: {k.strip() for k in text.replace(";", ",").split(",") if k.strip()}, set())
    for groups in only.values():
        unknown = groups - set(METHOD_GROUPS)
        if unknown:
            parser.error(f"--only: unknown {sorted(unknown)}")
    t0 = time.perf_counter()
    results = {}
    for family in families:
        results[family] = run_family(family, args.tiny, resolution, args.batch, steps[family], device, dtype,
                                     plan_methods(only[family]), args.repeats, args.warm_steps)
        if args.json:  # after each model, so that a run cut short keeps what it measured
            Path(args.json).write_text(json.dumps(dict(context=None, results=results), indent=1, default=str))
        comfy.model_management.unload_all_models()  # free this family's weights before the next one
        gc.collect()
        comfy.model_management.soft_empty_cache()
    ctx = dict(date=datetime.datetime.now().strftime("%Y-%m-%d %H:%M"),
               device=torch.cuda.get_device_name(device) if has_cuda else "CPU (tiny configs)",
               torch=torch.__version__, cuda=torch.version.cuda, comfyui=_comfyui_version(), batch=args.batch,
               res=resolution, dtype=str(dtype).replace("torch.", ""), negtome=negtome_available(),
               repeats=args.repeats, warm=args.warm_steps,
               command=" ".join(["python benchmarks/gpu.py", *(sys.argv[1:] if argv is None else argv)]),
               total=time.perf_counter() - t0)
    markdown = render(results, ctx)
    if not args.tiny:
        for family, res in results.items():
            expected = EXPECTED_PARAMS[family]
            if abs(res["params"] - expected) / expected > 0.02:
                logger.warning("%s: %d parameters, expected about %.3g", family, res["params"], expected)
    sys.stdout.write(markdown + "\n")
    if args.json:
        Path(args.json).write_text(json.dumps(dict(context=ctx, results=results), indent=1, default=str))
    if args.write:
        section = args.section
        if section is None:
            plain = args.only and "=" not in args.only
            section = f"gpu:{','.join(sorted(only[families[0]]))}" if plain else "gpu"
        _host.write_results_section(markdown, f"<!-- results:{section}:start -->", f"<!-- results:{section}:end -->",
                                    BENCHMARKS_MD)
    return 0


def _comfyui_version() -> str:
    try:
        import comfyui_version
        return comfyui_version.__version__
    except Exception:  # noqa: BLE001
        return "unknown"


if __name__ == "__main__":
    sys.exit(main())
