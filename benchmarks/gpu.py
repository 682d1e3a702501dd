"""GPU timing of guidance on full-size architectures: `python benchmarks/gpu.py [--models ...] [--write]`.

Builds full-size models from ComfyUI's own classes (`comfy.supported_models`: SDXL 2.57 B, Flux-dev 11.9 B,
Wan 2.1 T2V 1.3 B and 14 B, Qwen-Image 20.4 B; hyperparameters and conditioning shapes in gpu_models.py) with
random weights in bf16 (no checkpoint: timing does not depend on the weights), samples through ComfyUI's KSampler
path and reports what users pay, per method: model evaluations per image (rows counted at APPLY_MODEL), their
ratio to CFG's, wall time (torch.cuda.synchronize around each run) as the median of `--repeats` runs with their
range, the ratio to CFG's median, and the peak GPU memory (torch.cuda.max_memory_allocated, weights included).

Method: every method first runs once untimed, so that every batch shape and code path it uses is warm (AG's half
batches after its latch, the per-image rows, NegToMe's active window, LinearAG's estimated steps); then each
method is timed `--repeats` (3) times in rotated order. The results JSON (`--json`) is rewritten after every timed
round, so a run stopped by a time limit keeps what it measured (rows then show fewer runs).

Rows per model (`--only` picks groups; CFG always runs):
* "cond only (cfg 1)": the floor (ComfyUI skips the uncond pass at cfg 1); `--no-floor` drops it.
* AG latching at 50% and 30% of the schedule (group ag; ag50: 50% only). Random weights make the cosine
  meaningless, so these rows force the latch: threshold 0, start_percent p (less 0.001: the first step at or
  past p). The evaluation counts are those of a
  real AG run latching there, and the time includes all of AG's own work (cosine, bookkeeping, cond-only passes).
* AG with the images of one batch latching at DIFFERENT steps (group ag_per_image; batch >= 2; 30/40/50/60% of
  the schedule, image i latching at step floor(p_i * steps + 0.5)): the per-row path, one cond call for the batch
  plus one uncond call for the images that have not latched. A benchmark-only hook (`forced_latches`) swaps AG's
  tracker for the duration of the row; nothing in the pack's nodes changes.
* LinearAG at the pack's defaults on the paper's schedule (AG's latch off; group linear_ag).
* NegToMe at the pack's defaults, diversity mode (group negtome; negtome_other: the other similarity settings).
  Diversity needs 2 or more images per batch: on models timed at batch 1 (Wan, Qwen-Image) the NegToMe rows run at
  `--negtome-batch` (2) against their own "CFG (batch 2)" row. Wan: video tokens of every block's self attention;
  Qwen-Image: image tokens of every joint block (the pack's placement).

Ratios. time / CFG: against the median of the CFG row of the same batch. eval ratio: network rows per image
against CFG's (cond only = 0.5). Floor-implied time / CFG: what the row would cost if a step's time were affine
in the rows it computes, fitted to the CFG row (2 rows a step) and the floor row (1 row): with f = floor / CFG
time and r the eval ratio, floor-implied = f + (r - 0.5) * 2 * (1 - f); e.g. SDXL's floor costs 0.531x CFG for
0.5x the rows, so a method with r = 0.775 is expected at 0.789x, and "time - floor-implied" is the cost of the
method's own work (cosine, bookkeeping, split calls) beyond the rows it computes.

Device-time budget (H200, bf16; per image-row estimates scaled from the measured Flux row, 0.155 s per 1024²
row ~ 450 TFLOP/s effective): SDXL 1024² 0.018 s, Flux 0.155 s, Wan 1.3B at 832x480x33 (14 040 tokens) 0.16 s,
Wan 14B there 1.1 s, Qwen-Image 1024² 0.16 s. Rows a step: CFG 2, floor 1, AG50 ~1.6-1.75, AG30 ~1.5,
LinearAG ~1.25, CFG + NegToMe at batch 2: 4 + 4. One run of every method is warm-up + 3 timed rounds:
* SDXL 1024² b4, 20 steps (CFG, floor, AG50, AG30, per-image, LinearAG, NegToMe): ~16 s a round -> ~60 s.
* Flux 1024² b4, 10 steps (CFG, NegToMe; no floor): ~25 s a round -> ~95 s.
* Wan 1.3B 832x480x33 b1, 8 steps (CFG, floor, AG50, AG30, LinearAG: 7.4 rows a step; CFG and NegToMe at b2:
  8): 8 x 0.16 x 15.4 ~ 20 s a round -> 3 rounds + a 3-step warm-up + start-up ~ 75 s. Qwen-Image 1024² b1,
  8 steps, same rows: ~75 s.
* Wan 14B 832x480x33 b1, 4 steps (CFG, floor, AG50, LinearAG: 6 rows a step; AG30 equals AG50 at 4 steps, and
  NegToMe at batch 2 would add ~35 s a round): 4 x 1.1 x 6 ~ 26 s a round -> ~115 s with warm-up and build.
With the kernel check (~40 s) and start-up (~15 s) that is ~480 s of the 540 s that benchmarks/device_check.sh
allows itself (it runs each model as its own part under a hard time limit, this script with --json, and writes
BENCHMARKS.md from the saved JSON with `--render ... --write`). On the device machine, with carry [".host",
".whl"] (made by `python tools/device_bundle.py`: the trimmed host tree and the wheels the machine lacks), one
command:
`python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl &&
PYTHONPATH=/tmp/site COMFYUI_PATH=$PWD/.host/ComfyUI timeout 590 bash benchmarks/device_check.sh` ($OUT is set).

`--tiny` builds scaled-down configs of the same classes and runs on whatever device there is (for the CPU tests);
its figures are not GPU figures and are never written to BENCHMARKS.md.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import importlib
import json
import logging
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _host  # noqa: E402
import gpu_models  # noqa: E402
from gpu_models import FAMILIES, build_base_model, model_config, parameter_count, unet_config  # noqa: E402,F401

logger = logging.getLogger("tfg.benchmarks.gpu")

HERE = Path(__file__).resolve().parent
BENCHMARKS_MD = HERE.parent / "BENCHMARKS.md"
EXPECTED_PARAMS = {key: f.expected_params for key, f in FAMILIES.items()}

CFG_ROW = "CFG"
FLOOR_ROW = "cond only (cfg 1)"
PER_IMAGE_FRACTIONS = (0.3, 0.4, 0.5, 0.6)
LATCH_EARLY = 1e-3
"""AG rows latch from start_percent p - LATCH_EARLY: the first step at or past p (a step exactly at p would
otherwise fall either side of sigma(p) by rounding)."""


def conditioning(family: str, tiny: bool, seed: int, device="cpu"):
    return gpu_models.conditioning(family, tiny, seed)


# ------------------------------------------------------------------------------------------------
# Forced per-image latches (benchmark-only hook)
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PerImageLatch:
    """AG with image i of a batch forced to latch at fractions[i % len(fractions)] of the schedule."""
    fractions: tuple[float, ...] = PER_IMAGE_FRACTIONS

    def latch_steps(self, steps: int, batch: int) -> list[int]:
        return [latch_step(self.fractions[i % len(self.fractions)], steps) for i in range(batch)]


def latch_step(fraction: float, steps: int) -> int:
    return int(math.floor(fraction * steps + 0.5))


@contextlib.contextmanager
def forced_latches(latch_steps: list[int]):
    """For the duration of the block, AG's per-run tracker (nodes.adaptive_guidance.AdaptiveGuidanceTracker)
    is a subclass that measures the cosine as usual but latches image i at step latch_steps[i] instead of on the
    cosine (the crossing step hands cond on, as AG's default crossing_step "cond"). The node's own paths run
    unchanged: the full CFG call while no image has latched, then one cond call for the batch plus one uncond call
    for the open images, then cond-only calls once all have latched."""
    import torch
    ag = _host.host.pack_module("nodes.adaptive_guidance")
    base = ag.AdaptiveGuidanceTracker

    class ScheduledLatchTracker(base):
        """Latches image i once its evaluation count reaches latch_steps[i] (euler: one evaluation a step, and every
        step measures until all images have latched), without reading anything back to the host."""
        evaluations = 0
        due_at = None

        def _crossed(self, gamma, measured, batch, step, latch_allowed):
            if self.due_at is None:
                self.due_at = torch.tensor([latch_steps[i % len(latch_steps)] for i in range(batch)]).to(
                    self.latched.device, non_blocking=True)
            due = self.due_at <= self.evaluations
            self.evaluations += 1
            return due

    ag.AdaptiveGuidanceTracker = ScheduledLatchTracker
    try:
        yield
    finally:
        ag.AdaptiveGuidanceTracker = base


# ------------------------------------------------------------------------------------------------
# Methods and their expected evaluation counts
# ------------------------------------------------------------------------------------------------
def make_method(name: str, spec, cfg: float, h):
    """A harness Method: spec None = CFG, "cond_only" = cfg 1 (the floor), a float = AG forced to latch at that
    fraction of the schedule, PerImageLatch = AG with per-image forced latches, NegToMeParams = CFG + NegToMe,
    else LinearAGParams."""
    P = _host.host.pack_module("kernels.adaptive_guidance").AdaptiveGuidanceParams
    if spec is None:
        return h.Method(name, cfg)
    if spec == "cond_only":
        return h.Method(name, 1.0)
    if isinstance(spec, float):
        return h.Method(name, cfg, P(threshold=0.0, space="x0", start_percent=max(0.0, spec - LATCH_EARLY)))
    if isinstance(spec, PerImageLatch):
        return h.Method(name, cfg, P(threshold=1.0, space="x0"))  # never latches on its own; see forced_latches
    if type(spec).__name__ == "NegToMeParams":
        return h.Method(name, cfg, negtome=spec)
    return h.Method(name, cfg, linear_ag=spec)


def expected_evals(spec, steps: int, batch: int, sigmas=None, percent_to_sigma=None) -> float:
    """Network rows per image the method must compute in a `steps`-step run (one model call per step, as euler):
    CFG and NegToMe 2 a step, the floor 1; AG latching at fraction p: 2 a step up to and including the first step
    whose sigma is at or below sigma(p) (the crossing step still computes the uncond), then 1; per-image latches
    likewise per image; LinearAG: 2 on computed steps, 1 on estimated and cond-only steps."""
    if spec is None or type(spec).__name__ == "NegToMeParams":
        return 2.0 * steps
    if spec == "cond_only":
        return float(steps)
    if isinstance(spec, float):
        start = float(percent_to_sigma(max(0.0, spec - LATCH_EARLY)))
        crossing = next((k for k in range(steps) if float(sigmas[k]) <= start), None)
        return float(steps + (steps if crossing is None else crossing + 1))
    if isinstance(spec, PerImageLatch):
        latches = spec.latch_steps(steps, batch)
        return steps + sum(min(s, steps - 1) + 1 for s in latches) / batch
    lag = _host.host.pack_module("kernels.linear_ag")
    return float(sum(2 if lag.step_mode(spec, k, steps) == "compute" else 1 for k in range(steps)))


def linear_ag_timing_params():
    """LinearAG at the pack's defaults (estimator, paper schedule: odd steps of the first half estimated,
    conditional-only after it) with AG's latch off: the paper's evaluation count. None when the pack has none."""
    try:
        lag = _host.host.pack_module("kernels.linear_ag")
    except ImportError:
        return None
    P = _host.host.pack_module("kernels.adaptive_guidance").AdaptiveGuidanceParams
    return lag.LinearAGParams().replace(after="cond_only", guidance=P(threshold=1.0))


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


METHOD_GROUPS = ("ag", "ag50", "ag_per_image", "linear_ag", "negtome", "negtome_other")
"""ag: AG latching at 50% and 30%; ag50: at 50% only; ag_per_image: images latching at 30/40/50/60% (batch >= 2);
linear_ag; negtome: the pack defaults; negtome_other: the other similarity settings."""


def plan_methods(only: set[str], batch: int = 4, negtome_batch: int | None = None) -> list:
    """(name, spec, batch) rows for the method groups in `only` (empty: all but ag50; ag_per_image only when
    batch >= 2). NegToMe rows run at `negtome_batch` (default: `batch`)."""
    wanted = (lambda key: (not only and key != "ag50") or key in only)
    nt_batch = negtome_batch or batch
    methods = []
    if wanted("ag") or wanted("ag50"):
        methods.append(("AG, latch at 50% of the schedule", 0.5, batch))
    if wanted("ag"):
        methods.append(("AG, latch at 30% of the schedule", 0.3, batch))
    if wanted("ag_per_image") and batch >= 2:
        text = "/".join(f"{p:.0%}" for p in PER_IMAGE_FRACTIONS)
        methods.append((f"AG, images latching at {text} (per-row uncond)", PerImageLatch(), batch))
    linear = linear_ag_timing_params()
    if linear is not None and wanted("linear_ag"):
        methods.append((f"LinearAG ({linear.estimator}), paper schedule", linear, batch))
    default = negtome_params()
    if default is not None and wanted("negtome"):
        methods.append((f"CFG + NegToMe (pack defaults, similarity {default.similarity})", default, nt_batch))
    if default is not None and wanted("negtome_other"):
        others = [s for s in _host.host.pack_module("kernels.negtome").SIMILARITIES if s != default.similarity]
        methods += [(f"CFG + NegToMe (similarity {s})", negtome_params(s), nt_batch) for s in others]
    return methods


# ------------------------------------------------------------------------------------------------
# One model
# ------------------------------------------------------------------------------------------------
def _plan(methods, batch: int, floor: bool) -> list[tuple[str, object, int]]:
    """CFG (and the floor) first, then the methods; a "CFG (batch b)" reference before the first row of
    another batch size."""
    plan = [(CFG_ROW, None, batch)] + ([(FLOOR_ROW, "cond_only", batch)] if floor else [])
    for entry in methods:
        name, spec, b = entry if len(entry) == 3 else (*entry, batch)
        if name in (CFG_ROW, FLOOR_ROW):
            continue
        if b != batch and not any(s is None and pb == b for _, s, pb in plan):
            plan.append((cfg_row_name(b), None, b))
        plan.append((name, spec, b))
    return plan


def cfg_row_name(batch: int) -> str:
    return f"{CFG_ROW} (batch {batch})"


def run_family(family: str, tiny: bool, size, batch: int, steps: int, device, dtype, methods,
               repeats: int = 3, warm_steps: int | None = None, floor: bool = True, progress=None):
    """Time `methods` ((name, spec) or (name, spec, batch); see `make_method`) on `family` at `size` (an int:
    square image; or (width, height, frames)), `batch` images, `steps` steps, as users pay for them: CFG and a
    "cond only (cfg 1)" floor row are added; every method first runs once untimed (every batch shape and code
    path it uses is warm), then each is timed `repeats` times in rotated order. `progress(result)` is called
    after every timed round with the rows so far."""
    import torch
    import comfy.model_patcher
    import comfy.samplers
    import comfy.utils
    comfy_nodes = importlib.import_module("nodes")  # ComfyUI's own top-level nodes module
    h = _host.host.pack_module("benchmarks.harness")
    fam = FAMILIES[family]
    comfy.utils.PROGRESS_BAR_ENABLED = False
    if isinstance(size, int):
        size = (size, size, gpu_models.default_size(family, tiny)[2] if fam.layout == "video" else 0)

    t0 = time.perf_counter()
    base = build_base_model(family, tiny, device, dtype)
    params = sum(p.numel() for p in base.diffusion_model.parameters())
    patcher = comfy.model_patcher.ModelPatcher(base, load_device=device, offload_device=device)
    build_s = time.perf_counter() - t0
    positive = conditioning(family, tiny, 1)
    negative = conditioning(family, tiny, 2)
    channels = base.latent_format.latent_channels
    latents = {}
    cuda = torch.device(device).type == "cuda"
    sampling = patcher.get_model_object("model_sampling")
    sigmas = comfy.samplers.calculate_sigmas(sampling, fam.scheduler, steps).cpu()

    def sync():
        if cuda:
            torch.cuda.synchronize()

    def sample(method, spec, row_batch, n_steps):
        latent = latents.setdefault(row_batch, {"samples": torch.zeros(
            gpu_models.latent_shape(family, size, row_batch, channels))})
        counter = h.PassCounter()
        model, _ = h.prepare(patcher, method)
        model = h.with_counter(model, counter)
        hook = forced_latches(spec.latch_steps(n_steps, row_batch)) if isinstance(spec, PerImageLatch) \
            else contextlib.nullcontext()
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        sync()
        t = time.perf_counter()
        with hook, torch.inference_mode():
            out = comfy_nodes.common_ksampler(model, 7, n_steps, method.cfg, fam.sampler, fam.scheduler, positive,
                                              negative, latent, denoise=1.0)[0]["samples"]
        sync()
        seconds = time.perf_counter() - t
        peak = torch.cuda.max_memory_allocated() / 2 ** 30 if cuda else None
        finite = bool(torch.isfinite(out).all())
        if not finite:
            logger.warning("%s %s: non-finite output (random weights)", family, method.name)
        return counter, seconds, peak, finite

    plan = _plan(methods, batch, floor)
    built = [(name, make_method(name, spec, fam.cfg, h), spec, b) for name, spec, b in plan]
    warm = steps if warm_steps is None else min(steps, warm_steps)
    failed = {}
    for name, method, spec, b in built:  # untimed: loads the model, compiles kernels, every shape and path
        try:  # the per-image row warms at its own step count: each number of open images is its own shape
            sample(method, spec, b, steps if isinstance(spec, PerImageLatch) else warm)
        except Exception as e:  # noqa: BLE001  a technique under development must not cost the other rows
            logger.error("%s %s failed: %s", family, name, e)
            failed[name] = type(e).__name__
    timed = [entry for entry in built if entry[0] not in failed]
    samples = {entry[0]: [] for entry in timed}
    info = {}
    meta = dict(family=family, title=fam.title, params=params, build_s=build_s, cfg=fam.cfg, sampler=fam.sampler,
                scheduler=fam.scheduler, steps=steps, repeats=repeats, warm_steps=warm, size=list(size), batch=batch,
                tiny=tiny)

    def expected(spec, b):
        return expected_evals(spec, steps, b, sigmas, sampling.percent_to_sigma)

    def result(rounds_done):
        rows = _rows(built, failed, samples, info, {name: expected(spec, b) for name, _, spec, b in built})
        return dict(meta, rows=rows, rounds=rounds_done)

    if progress is not None:  # saved before timing: a model stopped during its runs still shows its rows
        progress(result(0))
    for r in range(repeats):
        shift = r % max(1, len(timed))
        for name, method, spec, b in timed[shift:] + timed[:shift]:  # rotated: drift hits every method alike
            counter, seconds, peak, finite = sample(method, spec, b, steps)
            samples[name].append(seconds)
            previous = info.get(name)
            info[name] = dict(evals=counter.rows / b, uncond=counter.uncond / b, calls=counter.calls, peak=peak if previous is None or previous["peak"] is None
                              else max(previous["peak"], peak), finite=finite and (previous or {}).get("finite", True))
            logger.info("%s %-44s %.2f evals/image %.2fs", family, name, counter.rows / b, seconds)
        if progress is not None:
            progress(result(r + 1))
    return result(repeats)


def _rows(built, failed, samples, info, expected) -> list[dict]:
    nan = float("nan")
    rows = []
    for name, _, spec, b in built:
        runs = samples.get(name, [])
        if name in failed or not runs:
            why = f"failed: {failed[name]}" if name in failed else "not timed"
            rows.append(dict(method=f"{name} ({why})", batch=b, evals=nan, expected_evals=expected[name],
                             seconds=nan, spread=(nan, nan), peak=None, times=[], runs=0, finite=None,
                             ratio=nan, eval_ratio=nan, floor_ratio=None, floor_excess=None, kind=_kind(spec)))
            continue
        times = sorted(runs)
        rows.append(dict(method=name, batch=b, evals=info[name]["evals"], uncond=info[name]["uncond"],
                         calls=info[name]["calls"],
                         expected_evals=expected[name],
                         seconds=times[len(times) // 2], spread=(times[0], times[-1]), peak=info[name]["peak"],
                         times=list(runs), runs=len(runs), finite=info[name]["finite"], kind=_kind(spec)))
    for r in rows:
        ref = next((x for x in rows if x["kind"] == "cfg" and x["batch"] == r["batch"] and x["runs"]), None)
        floor = next((x for x in rows if x["kind"] == "floor" and x["batch"] == r["batch"] and x["runs"]), None)
        if not r["runs"] or ref is None:
            r.update(ratio=nan, eval_ratio=nan, floor_ratio=None, floor_excess=None)
            continue
        r["ratio"] = r["seconds"] / ref["seconds"]
        r["eval_ratio"] = r["evals"] / ref["evals"]
        r["floor_ratio"] = r["floor_excess"] = None
        if floor is not None:
            f = floor["seconds"] / ref["seconds"]
            r["floor_ratio"] = f + (r["eval_ratio"] - 0.5) * 2.0 * (1.0 - f)
            r["floor_excess"] = r["ratio"] - r["floor_ratio"]
    return rows


def evals_as_expected(row: dict) -> bool:
    """The row computed exactly the rows its schedule prescribes (see expected_evals)."""
    expected = row.get("expected_evals")
    return expected is not None and abs(row["evals"] - expected) < 1e-6


def _kind(spec) -> str:
    if spec is None:
        return "cfg"
    if spec == "cond_only":
        return "floor"
    if isinstance(spec, (float, PerImageLatch)):
        return "ag"
    if type(spec).__name__ == "NegToMeParams":
        return "negtome"
    return "linear_ag"


# ------------------------------------------------------------------------------------------------
# Output
# ------------------------------------------------------------------------------------------------
def _fmt(value, spec: str, empty: str = "–") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return empty
    return format(value, spec)


def render(results: dict, ctx: dict) -> str:
    """The markdown section: one table over every model in `results` (family -> run_family's result)."""
    out = [f"Run {ctx['date']} on {ctx['device']} (torch {ctx['torch']}, CUDA {ctx['cuda']}, ComfyUI "
           f"{ctx['comfyui']}), random weights in {ctx['dtype']}. "
           + ("Commands: " + "; ".join(f"`{c}`" for c in ctx["commands"]) if ctx.get("commands")
              else f"Command: `{ctx['command']}`") + ".", ""]
    out.append("| model | method | batch | evals/image | eval ratio | wall (s), median [min–max] | time / CFG | "
               "time − eval ratio | floor-implied time / CFG | time − floor-implied | peak GPU memory, incl. "
               "weights (GiB) |")
    out.append("|---|---|---|---|---|---|---|---|---|---|---|")
    short = []
    for family, res in results.items():
        size = f"{res['params'] / 1e9:.2f} B" if res["params"] >= 1e8 else f"{res['params'] / 1e6:.2f} M"
        model = (f"{res.get('title', family)} ({size} params; {gpu_models.describe_size(tuple(res['size']))}; "
                 f"{res['steps']} steps; cfg {res['cfg']}, {res['sampler']}/{res['scheduler']})")
        for r in res["rows"]:
            lo, hi = r["spread"]
            runs = "" if r["runs"] in (0, res["repeats"]) else f" ({r['runs']} of {res['repeats']} runs)"
            if r["runs"] and r["runs"] < res["repeats"]:
                short.append(f"{family} {r['method']}")
            wall = "–" if not r["runs"] else f"{r['seconds']:.2f} [{lo:.2f}–{hi:.2f}]{runs}"
            evals = _fmt(r["evals"], ".2f")
            if r["runs"] and not evals_as_expected(r):
                evals += f" (expected {r['expected_evals']:.2f})"
            out.append(f"| {model} | {r['method']} | {r['batch']} | {evals} | "
                       f"{_fmt(r['eval_ratio'], '.3f')} | {wall} | {_fmt(r['ratio'], '.3f')} | "
                       f"{_fmt(r['ratio'] - r['eval_ratio'] if r['runs'] else None, '+.3f')} | "
                       f"{_fmt(r['floor_ratio'], '.3f')} | {_fmt(r['floor_excess'], '+.3f')} | "
                       f"{_fmt(r['peak'], '.1f')} |")
    out.append("")
    out.append(
        f"Each method ran once untimed first (warm-up of every batch shape and code path it uses: {ctx['warm']}; "
        f"the per-image row at its full step count), then {ctx['repeats']} timed runs in rotated order; wall is the median with the range "
        "of the runs, time / CFG is against the median of the CFG row of the same batch. eval ratio: network rows "
        "per image against CFG's (cond only = 0.5). Floor-implied time / CFG = f + (eval ratio − 0.5) × 2 × (1 − f), "
        "f = the floor's time / CFG: the time if a step cost as much as its rows, on the line through the CFG row "
        "(2 rows a step) and the cond-only row (1 row); time − floor-implied is the method's own cost beyond the "
        "rows it computes. AG rows force the latch at the given fraction of the schedule (random weights make the "
        "cosine meaningless): the evaluation counts equal those of a real run latching there; the per-image row "
        "latches image i of the batch at the i-th fraction (a benchmark-only hook), so the uncond pass runs for the "
        "open images only, in a second call. LinearAG: the pack's defaults on the paper's schedule, AG's latch off. "
        "NegToMe rows: diversity mode at the pack defaults, with the similarity setting named; on models timed at "
        "batch 1 they run at batch 2 against CFG at batch 2.")
    if short:
        out.append("Stopped by the time limit before all timed runs: " + "; ".join(short) + ".")
    if not ctx.get("negtome", True):
        out.append("NegToMe: not in the pack, no row.")
    out.append(f"Whole run: {ctx['total']:.0f} s.")
    return "\n".join(out)


def context(args_list, device_name: str, dtype, warm: str, repeats: int, total: float, tiny: bool) -> dict:
    import torch
    return dict(date=datetime.datetime.now().strftime("%Y-%m-%d %H:%M"), device=device_name, torch=torch.__version__,
                cuda=torch.version.cuda, comfyui=_comfyui_version(), dtype=str(dtype).replace("torch.", ""),
                negtome=negtome_available(), repeats=repeats, warm=warm, tiny=tiny,
                command=" ".join(["python benchmarks/gpu.py", *args_list]), total=total)


def family_order(family: str) -> int:
    """Position in gpu_models.FAMILIES (tables list the models in that order)."""
    return list(FAMILIES).index(family) if family in FAMILIES else len(FAMILIES)


def render_saved(paths: list[str]) -> tuple[str, dict, bool]:
    """Merge the results JSONs of several runs (device_check.sh's parts) into one section: (markdown, results,
    any tiny)."""
    saved = []
    for path in paths:
        try:
            saved.append(json.loads(Path(path).read_text()))
        except (OSError, ValueError) as e:
            logger.error("%s: unreadable (%s); skipped", path, e)
    saved.sort(key=lambda data: min((family_order(f) for f in data.get("results") or {}), default=99))
    results, contexts = {}, []
    for data in saved:
        results.update(data.get("results") or {})
        if data.get("context"):
            contexts.append(data["context"])
    if not contexts:
        raise SystemExit(f"no results with a context in {paths}")
    first = contexts[0]
    tiny = any(c.get("tiny") for c in contexts) or any(r.get("tiny") for r in results.values())
    ctx = dict(first, commands=[c["command"] for c in contexts], total=sum(c.get("total", 0.0) for c in contexts),
               warm="; ".join(sorted({c["warm"] for c in contexts})),
               repeats=max(c["repeats"] for c in contexts))
    return render(results, ctx), results, tiny


def _per_family(text: str, families: list[str], cast, default):
    """"20" -> the same for every family; "sdxl=20,flux=10" -> per family (others: default, which may be a
    function of the family)."""
    pick = default if callable(default) else (lambda f: default)
    if "=" not in text:
        return {f: cast(text) if text else pick(f) for f in families}
    out = {f: pick(f) for f in families}
    for part in text.split(","):
        if part.strip():
            family, _, value = part.partition("=")
            out[family.strip()] = cast(value.strip())
    return out


def _write_json(path: str | None, ctx, results) -> None:
    """Write atomically (a run killed by a time limit never leaves half a file)."""
    if path:
        tmp = Path(f"{path}.tmp")
        tmp.write_text(json.dumps(dict(context=ctx, results=results), indent=1, default=str))
        tmp.replace(path)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="sdxl,flux", help=f"comma list of {', '.join(FAMILIES)}")
    parser.add_argument("--size", default="", help="N (square), WxH or WxHxFRAMES; per model as "
                        "wan14b=832x480x33,sdxl=1024 (defaults: gpu_models.py; --tiny: tiny sizes)")
    parser.add_argument("--batch", default="", help="images (clips) per run, or per model (defaults: SDXL/Flux "
                        "4, Wan/Qwen-Image 1)")
    parser.add_argument("--negtome-batch", default="", help="batch of the NegToMe rows (default: the model's "
                        "batch, at least 2)")
    parser.add_argument("--steps", default="", help="a number, or per model as sdxl=20,flux=10 (defaults: "
                        "gpu_models.py; 3 with --tiny)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per method (rotated order; median)")
    parser.add_argument("--warm-steps", default="6", help="steps of each method's untimed warm-up run, or per model")
    parser.add_argument("--no-floor", default="", help="comma list of models without the cond-only floor row")
    parser.add_argument("--tiny", action="store_true", help="scaled-down configs on any device (tests)")
    parser.add_argument("--write", action="store_true", help="rewrite this run's section of BENCHMARKS.md")
    parser.add_argument("--section", default=None, help="BENCHMARKS.md section (markers results:<section>); "
                        "default gpu, or gpu:<only> with a plain --only list")
    parser.add_argument("--only", default="", help=f"method groups besides CFG and the floor, of "
                        f"{', '.join(METHOD_GROUPS)}: a comma list, or per model as sdxl=ag+negtome,flux=negtome")
    parser.add_argument("--json", default=None, help="also write the results to this JSON file (after every "
                        "timed round)")
    parser.add_argument("--render", nargs="+", default=None, metavar="JSON", help="render saved results JSONs "
                        "(several runs merged) instead of running; with --write, into BENCHMARKS.md")
    parser.add_argument("--verbose", action="store_true")
    args = parser.parse_args(argv)
    if args.tiny and args.write:
        parser.error("--tiny figures are not GPU figures; --write is refused")
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    _host.configure_logging(args.verbose)
    section = args.section or "gpu"

    if args.render:
        markdown, _, tiny = render_saved(args.render)
        sys.stdout.write(markdown + "\n")
        if args.write:
            if tiny:
                sys.stderr.write("benchmarks/gpu.py: these results are --tiny figures; --write is refused\n")
                return 2
            _host.write_results_section(markdown, f"<!-- results:{section}:start -->",
                                        f"<!-- results:{section}:end -->", BENCHMARKS_MD)
        return 0

    families = [f.strip() for f in args.models.split(",") if f.strip()]
    unknown_models = set(families) - set(FAMILIES)
    if unknown_models:
        parser.error(f"--models: unknown {sorted(unknown_models)} (known: {', '.join(FAMILIES)})")
    try:
        sizes = _per_family(args.size, families, str, "")
        sizes = {f: gpu_models.parse_size(sizes[f], f, args.tiny) if sizes[f]
                 else gpu_models.default_size(f, args.tiny) for f in families}
    except ValueError as e:
        parser.error(f"--size: {e}")
    batches = _per_family(args.batch, families, int, lambda f: FAMILIES[f].batch)
    nt_batches = _per_family(args.negtome_batch, families, int, lambda f: max(2, batches[f]))
    steps = _per_family(args.steps, families, int, lambda f: 3 if args.tiny else FAMILIES[f].steps)
    warm_steps = _per_family(args.warm_steps, families, int, 6)
    no_floor = {f.strip() for f in args.no_floor.split(",") if f.strip()}
    only = _per_family(args.only.replace("+", ";"), families,
                       lambda text: {k.strip() for k in text.replace(";", ",").split(",") if k.strip()}, set())
    for groups in only.values():
        unknown = groups - set(METHOD_GROUPS)
        if unknown:
            parser.error(f"--only: unknown {sorted(unknown)}")

    import torch
    has_cuda = torch.cuda.is_available()
    if not has_cuda and not args.tiny:
        sys.stderr.write("benchmarks/gpu.py: no CUDA device found. This script times full-size models and needs an "
                         "NVIDIA GPU (about 60 GB free for Qwen-Image). Use --tiny for a CPU check of the builders.\n")
        return 2
    _host.setup(cpu=not has_cuda)
    import comfy.model_management
    device = comfy.model_management.get_torch_device()
    dtype = torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    device_name = torch.cuda.get_device_name(device) if has_cuda else "CPU (tiny configs)"
    argv_list = list(sys.argv[1:] if argv is None else argv)
    warm_text = ", ".join(f"{f} {warm_steps[f]} steps" for f in families)
    t0 = time.perf_counter()
    results = {}

    def ctx_now():
        return context(argv_list, device_name, dtype, warm_text, args.repeats,
                       time.perf_counter() - t0, args.tiny)

    for family in families:
        def progress(res, family=family):  # after every timed round: a run stopped by a time limit keeps it
            _write_json(args.json, ctx_now(), dict(results, **{family: res}))

        methods = plan_methods(only[family], batches[family], nt_batches[family])
        results[family] = run_family(family, args.tiny, sizes[family], batches[family], steps[family], device,
                                     dtype, methods, args.repeats, warm_steps[family],
                                     floor=family not in no_floor, progress=progress)
        _write_json(args.json, ctx_now(), results)
        comfy.model_management.unload_all_models()  # free this family's weights before the next one
        gc.collect()
        comfy.model_management.soft_empty_cache()
    ctx = ctx_now()
    markdown = render(results, ctx)
    if not args.tiny:
        for family, res in results.items():
            expected = EXPECTED_PARAMS[family]
            if abs(res["params"] - expected) / expected > 0.02:
                logger.warning("%s: %d parameters, expected about %.3g", family, res["params"], expected)
    sys.stdout.write(markdown + "\n")
    _write_json(args.json, ctx, results)
    if args.write:
        if args.section is None and args.only and "=" not in args.only:
            section = f"gpu:{','.join(sorted(only[families[0]]))}"
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
