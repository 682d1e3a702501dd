"""CPU benchmark suite: `python benchmarks/run.py` samples the trained digits model through ComfyUI with CFG, Adaptive
Guidance (several thresholds, both spaces, several start percents), the existing ComfyUI port's rule and the
"hold the last guidance delta" variant; prints one markdown table; rewrites the results section of BENCHMARKS.md
from that output and saves the cond/uncond cosine-per-step curves as a PNG.

Every figure comes from this run (same seeds and noise for every row; wall times measured in the same process).
"""
from __future__ import annotations

import argparse
import datetime
import logging
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _host  # noqa: E402

logger = logging.getLogger("tfg.benchmarks.run")

HERE = Path(__file__).resolve().parent
BENCHMARKS_MD = HERE.parent / "BENCHMARKS.md"
PLOT = HERE / "results" / "gamma_curves.png"
START, END = "<!-- results:cpu:start -->", "<!-- results:cpu:end -->"

X0_THRESHOLDS = (0.98, 0.99, 0.995, 0.998, 0.999)
X0_GUARDED = ((0.98, 0.3), (0.99, 0.3), (0.98, 0.5), (0.99, 0.5))  # (threshold, start_percent)
EPS_THRESHOLDS = (0.996, 0.999, 0.9995)
EPS_STARTS = (0.0, 0.3, 0.5)
PORT_THRESHOLDS = (0.99, 0.996)
DELTA_THRESHOLDS = (0.99, 0.995)

# Recommendation rule (applied to this run's x0 rows with the pack's defaults for decision/crossing):
# the largest evaluation saving whose class accuracy stays within ACC_TOL of CFG's and whose mean SSIM to CFG
# is at least SSIM_MIN.
ACC_TOL = 0.01
SSIM_MIN = 0.95
SAVING_NOISE = 1.5  # percentage points


def build_methods(cfg: float, quick: bool):
    h = _host.host.pack_module("benchmarks.harness")
    P = _host.host.pack_module("kernels.adaptive_guidance").AdaptiveGuidanceParams
    M = h.Method
    x0_thr = X0_THRESHOLDS if not quick else (0.99, 0.999)
    eps_thr = EPS_THRESHOLDS if not quick else (0.996,)
    methods = [
        M("CFG", cfg, group="reference"),
        M("cond only (cfg 1)", 1.0, group="reference"),
        M("unconditional", 1.0, unconditional=True, group="reference"),
    ]
    for t, start in [(t, 0.0) for t in x0_thr] + (list(X0_GUARDED) if not quick else []):
        methods.append(M(f"AG x0 {t}" + (f" start {start}" if start else ""), cfg,
                         P(threshold=t, space="x0", start_percent=start), group="AG x0"))
    # the batch-wide rule at the same thresholds: per_sample (the default) against it at equal SSIM
    for t in x0_thr:
        methods.append(M(f"AG x0 {t}, decision batch", cfg, P(threshold=t, space="x0", decision="batch"),
                         group="batch rule"))
    for start in (EPS_STARTS if not quick else (0.0,)):
        for t in eps_thr:
            methods.append(M(f"AG eps {t}" + (f" start {start}" if start else ""), cfg,
                             P(threshold=t, space="eps", start_percent=start), group="AG eps"))
    for t in (PORT_THRESHOLDS if not quick else (0.99,)):
        methods.append(M(f"port rule x0 {t} (batch, cfg on crossing)", cfg,
                         P(threshold=t, space="x0", decision="batch", crossing_step="cfg"), group="port"))
    if not quick:  # the port rule's two differences from the defaults, one at a time (batch: the rows above)
        methods.append(M("AG x0 0.99, crossing_step cfg", cfg, P(threshold=0.99, space="x0", crossing_step="cfg"),
                         group="rule"))
    for t in (DELTA_THRESHOLDS if not quick else (0.99,)):
        for mode in ("x0", "eps"):
            methods.append(M(f"AG x0 {t} + hold delta ({mode})", cfg, P(threshold=t, space="x0"),
                             hold_delta=mode, group="hold delta"))
    methods += _negtome_methods(cfg, quick)
    return methods


def _negtome_methods(cfg: float, quick: bool):
    """NegToMe diversity rows on the eval model: at 8×8 the paper's block preset (token grid ≥ 32²) holds no
    layer, so every attention layer is used; the paper's window; official matching (reference = image 0 of
    each sampling call) and the all-others improvement."""
    host = _host.host
    try:
        kernel = host.pack_module("kernels.negtome")
        host.pack_module("nodes.negtome")
    except ImportError:
        return []
    h = host.pack_module("benchmarks.harness")
    base = kernel.NegToMeParams(blocks="all")
    strong = base.replace(alpha=3.0, threshold=0.3, window="custom", start_percent=0.0, end_percent=0.5)
    rows = [(f"NegToMe α {base.alpha} τ {base.threshold} (official defaults, all layers)", base),
            ("NegToMe α 3 τ 0.3, window 0–0.5 (all layers)", strong)]
    if not quick:
        rows.append(("NegToMe α 3 τ 0.3, window 0–0.5, all_others (all layers)", strong.replace(matching="all_others")))
    return [h.Method(name, cfg, negtome=p, group="NegToMe") for name, p in rows]


LINEAR_AG_FIT_SEED = 900_000  # recording seeds, apart from the evaluation seeds
LINEAR_AG_HELDOUT_SEED = 950_000  # estimation-error seeds, apart from both


def _linear_ag_methods(eval_model, args, classes):
    """LinearAG rows (when the pack has LinearAG): coefficients fitted on separate seeds, then the paper's
    schedule with each estimator, and the fitted one handing over to AG's latch. None when unavailable."""
    host = _host.host
    try:
        lag = host.pack_module("kernels.linear_ag")
        host.pack_module("nodes.linear_ag")
    except ImportError:
        return None
    h = host.pack_module("benchmarks.harness")
    P = host.pack_module("kernels.adaptive_guidance").AdaptiveGuidanceParams
    defaults = lag.LinearAGParams()
    coefficients, trajectories, seconds = h.fit_linear_ag(
        eval_model, classes, args.fit_per_class, args.batch, args.steps, LINEAR_AG_FIT_SEED, args.cfg,
        args.sampler, args.scheduler, history=defaults.history, ridge=defaults.ridge)
    methods = []
    for estimator in ("fitted", "hold_delta", "extrapolate_delta", "previous_uncond"):
        params = defaults.replace(estimator=estimator, after="cond_only")
        methods.append(h.Method(f"LinearAG {estimator}, then cond only (paper schedule)", args.cfg,
                                linear_ag=params, coefficients=coefficients, group="LinearAG"))
    for estimator in ("fitted", "extrapolate_delta"):
        params = defaults.replace(estimator=estimator, after="cond_only", estimate_until=0.4)
        methods.append(h.Method(f"LinearAG {estimator}, estimate_until 0.4, then cond only", args.cfg,
                                linear_ag=params, coefficients=coefficients, group="LinearAG"))
    params = defaults.replace(estimator="fitted", after="adaptive", guidance=P(threshold=0.99, space="x0"))
    methods.append(h.Method("LinearAG fitted, then AG x0 0.99", args.cfg, linear_ag=params,
                            coefficients=coefficients, group="LinearAG"))
    # one-step estimation error of each estimator on held-out seeds (the acceptance check)
    k1, _, _ = h.fit_linear_ag(eval_model, classes, args.fit_per_class, args.batch, args.steps, LINEAR_AG_FIT_SEED,
                               args.cfg, args.sampler, args.scheduler, history=1, ridge=defaults.ridge)
    estimators = {
        f"fitted K={defaults.history}": (defaults.replace(estimator="fitted"),
                                         (coefficients.coefficients, coefficients.fitted)),
        "fitted K=1": (defaults.replace(estimator="fitted", history=1), (k1.coefficients, k1.fitted)),
        "hold_delta": (defaults.replace(estimator="hold_delta"), ()),
        "extrapolate_delta": (defaults.replace(estimator="extrapolate_delta"), ()),
        "previous_uncond": (defaults.replace(estimator="previous_uncond"), ()),
    }
    probe = h.estimator_errors(eval_model, estimators, defaults, classes, max(2, args.per_class // 2), args.batch,
                               args.steps, LINEAR_AG_HELDOUT_SEED, args.cfg, args.sampler, args.scheduler)
    errors = {name: probe.mean(name) for name in estimators}
    return methods, trajectories, seconds, errors


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def evaluate(args):
    import torch
    host = _host.host
    em = host.pack_module("benchmarks.eval_model")
    h = host.pack_module("benchmarks.harness")
    metrics = host.pack_module("benchmarks.metrics")

    torch.set_num_threads(args.threads)
    eval_model = em.load_eval_model(args.weights)
    t0 = time.perf_counter()
    judge = metrics.DigitClassifier(seed=0)
    judge_seconds = time.perf_counter() - t0
    classes = list(range(em.NUM_CLASSES))
    common = dict(classes=classes, per_class=args.per_class, batch=args.batch, steps=args.steps, seed=args.seed,
                  sampler=args.sampler, scheduler=args.scheduler)

    # warm-up (first-call costs out of the timings)
    h.run_method(eval_model, h.Method("warmup", args.cfg), classes=[0], per_class=args.batch, batch=args.batch,
                 steps=args.steps, seed=args.seed, sampler=args.sampler, scheduler=args.scheduler)

    methods = build_methods(args.cfg, args.quick)
    linear = _linear_ag_methods(eval_model, args, classes)
    if linear is not None:
        methods += linear[0]
    results = {}
    for m in methods:
        results[m.name] = (m, h.run_method(eval_model, m, **common))
        logger.info("%-48s %.1fs", m.name, results[m.name][1].seconds)
    # the same two methods through SamplerCustomAdvanced (the second ComfyUI path)
    P = host.pack_module("kernels.adaptive_guidance").AdaptiveGuidanceParams
    adv = [h.Method("CFG [SamplerCustomAdvanced]", args.cfg, group="path"),
           h.Method("AG x0 0.995 [SamplerCustomAdvanced]", args.cfg, P(threshold=0.995, space="x0"), group="path")]
    for m in adv:
        results[m.name] = (m, h.run_method(eval_model, m, path="advanced", **common))
    # a second CFG timing at the end: the spread of the two is the timing noise of this machine
    cfg_again = h.run_method(eval_model, methods[0], **common)

    # cosine curves of a plain CFG run (not timed)
    recorder = h.GammaRecorder()
    h.run_method(eval_model, methods[0], recorder=recorder, **common)

    ref = results["CFG"][1]
    ref_px = em.to_pixels(ref.images)
    cfg_seconds = (ref.seconds + cfg_again.seconds) / 2
    cfg_cpu = (ref.cpu_seconds + cfg_again.cpu_seconds) / 2
    rows = []
    for name, (m, r) in results.items():
        px = em.to_pixels(r.images)
        rows.append(dict(
            name=name, method=m, result=r,
            evals=r.evals_per_image,
            saved=100.0 * (1 - r.counter.rows / ref.counter.rows) if m.name != "unconditional" else None,
            latch=(sum(r.latch_steps) / len(r.latch_steps)) if r.latch_steps else None,
            never=sum(1 for s in r.latch_steps if s >= r.steps),
            ssim=float(metrics.ssim(px, ref_px).mean()),
            psnr=metrics.psnr_of_set(px, ref_px),
            acc=judge.accuracy(px, r.labels),
            fd=judge.fd_to_real(px),
            div=metrics.within_class_diversity(px, r.labels),
            time=r.seconds / cfg_seconds,
            cpu=r.cpu_seconds / cfg_cpu,
        ))
    context = dict(
        date=datetime.datetime.now().strftime("%Y-%m-%d %H:%M"),
        cpu=cpu_model(), cores=__import__("os").cpu_count(), torch=torch.__version__, threads=args.threads,
        comfyui=_comfyui_version(), judge_acc=judge.heldout_accuracy, judge_seconds=judge_seconds,
        fd_floor=judge.real_floor(), n=len(classes) * args.per_class, args=args,
        linear_fit=None if linear is None else linear[1:3],
        linear_errors=None if linear is None else linear[3],
        cfg_seconds=(ref.seconds, cfg_again.seconds), cfg_cpu=(ref.cpu_seconds, cfg_again.cpu_seconds),
        weights=eval_model.metadata,
    )
    return rows, recorder, context


def _comfyui_version() -> str:
    try:
        import comfyui_version
        return comfyui_version.__version__
    except Exception:  # noqa: BLE001
        return "unknown"


def _db(value: float) -> str:
    return "∞" if value == float("inf") else f"{value:.1f}"


def _f(value, fmt):
    return "–" if value is None else format(value, fmt)


def render(rows, recorder, ctx) -> str:
    a = ctx["args"]
    out = []
    out.append(f"Run {ctx['date']} on {ctx['cpu']} ({ctx['cores']} cores, torch {ctx['torch']}, "
               f"{ctx['threads']} torch thread(s)), ComfyUI {ctx['comfyui']}. Command: `python benchmarks/run.py "
               f"--per-class {a.per_class} --batch {a.batch} --steps {a.steps} --cfg {a.cfg} --seed {a.seed}`.")
    out.append("")
    out.append(f"{ctx['n']} samples ({a.per_class} per class, {a.batch} per sampling call, one class per call, "
               f"seeds {a.seed}…), {a.sampler}/{a.scheduler}, {a.steps} steps, CFG {a.cfg}, through "
               "`nodes.common_ksampler` (KSampler) unless marked [SamplerCustomAdvanced]. Judge: MLP on the real "
               f"digits, {ctx['judge_acc']:.3f} accuracy on held-out real digits (fitted in "
               f"{ctx['judge_seconds']:.1f} s); FD of held-out real digits to all real digits: "
               f"{ctx['fd_floor']:.2f}. CFG wall time {ctx['cfg_seconds'][0]:.1f} s and "
               f"{ctx['cfg_seconds'][1]:.1f} s wall, {ctx['cfg_cpu'][0]:.1f} s and {ctx['cfg_cpu'][1]:.1f} s CPU "
               "(first and last row of the run; their spread is this machine's timing noise). Model: "
               f"{ctx['weights'].get('steps', '?')} training steps, loss {ctx['weights'].get('final_loss', '?')}, "
               f"trained in {ctx['weights'].get('train_seconds', '?')} s (`benchmarks/train.py`, torch "
               f"{ctx['weights'].get('torch', '?')})." + (
                   "" if not ctx.get("linear_fit") else
                   f" LinearAG coefficients: fitted on {ctx['linear_fit'][0]} recorded CFG trajectories (other "
                   f"seeds) in {ctx['linear_fit'][1]:.1f} s, estimate_until and history at the pack's defaults."))
    out.append("")
    out.append("| method | evals/image | saved vs CFG | mean latch step | SSIM vs CFG | PSNR vs CFG (dB) | "
               "class acc | FD to real | diversity | wall time / CFG | CPU time / CFG |")
    out.append("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        latch = _f(r["latch"], ".1f")
        if r["latch"] is not None and r["never"]:
            latch += f" ({r['never']} never)"
        saved = "–" if r["saved"] is None else f"{r['saved']:.1f}%"
        out.append(f"| {r['name']} | {r['evals']:.1f} | {saved} | {latch} | {r['ssim']:.3f} | "
                   f"{_db(r['psnr'])} | {r['acc']:.3f} | {r['fd']:.2f} | {r['div']:.3f} | {r['time']:.2f} | "
                   f"{r['cpu']:.2f} |")
    out.append("")
    out.append("evals/image: network rows per image counted at APPLY_MODEL (CFG = 2 × steps). saved: fewer rows "
               "than CFG. mean latch step: the step where a sample's AG cosine first reached γ̄ (never-latched "
               f"samples count as {a.steps}). SSIM/PSNR: against the CFG sample of the same seed and noise, on "
               "images clamped to [0, 1] (SSIM: mean per image; PSNR: of the mean squared error over the set). class acc: the judge's accuracy against the requested class. FD: Fréchet "
               "distance of the judge's hidden features to the real digits. diversity: mean pairwise L2 distance "
               "between same-class samples (for the unconditional row, within the seed groups). wall / CPU time / CFG: "
               "against the mean of the two CFG runs; on a shared machine the CPU time of this process (one torch "
               "thread) is the steadier of the two.")
    out.append("")
    if ctx.get("linear_errors"):
        errors = ctx["linear_errors"]
        out.append("LinearAG one-step estimation error on held-out CFG trajectories (seeds apart from the fit and "
                   "the table), on the steps LinearAG estimates, given the true history: "
                   "‖D̂_u − D_u‖ / ‖D_c − D_u‖ (1.0 = no better than dropping guidance on that step).")
        out.append("")
        out.append("| estimator | relative error |")
        out.append("|---|---|")
        for name, value in sorted(errors.items(), key=lambda kv: kv[1]):
            out.append(f"| {name} | {value:.3f} |")
        out.append("")
    out.append(_gamma_table(recorder))
    out.append("")
    out.append(_recommendation(rows, recorder))
    return "\n".join(out)


def _gamma_table(recorder) -> str:
    import numpy as np
    lines = ["Cosine between the cond and uncond predictions per step (plain CFG run, mean [min] over all "
             "samples):", "", "| step | sigma | x0 space | eps space |", "|---|---|---|---|"]
    for step in sorted(recorder.x0):
        x0 = np.array(recorder.x0[step])
        eps = np.array(recorder.eps[step])
        lines.append(f"| {step} | {recorder.sigma[step]:.3f} | {x0.mean():.4f} [{x0.min():.4f}] | "
                     f"{eps.mean():.5f} [{eps.min():.5f}] |")
    return "\n".join(lines)


def _recommendation(rows, recorder=None) -> str:
    ref = next(r for r in rows if r["name"] == "CFG")
    candidates = [r for r in rows if r["method"].group == "AG x0" and r["method"].hold_delta is None]
    good = [r for r in candidates if r["acc"] >= ref["acc"] - ACC_TOL and r["ssim"] >= SSIM_MIN]
    lines = [f"Recommendation rule: among the AG x0 rows (per_sample, crossing cond), those whose class accuracy "
             f"is within {ACC_TOL:.2f} of CFG's and whose SSIM to CFG is ≥ {SSIM_MIN:.2f}; of these, the largest "
             f"saving, where savings within {SAVING_NOISE:g} points count as equal and the smaller start_percent "
             "(then the higher SSIM) wins."]
    if good:
        top = max(r["saved"] for r in good)
        near = [r for r in good if r["saved"] >= top - SAVING_NOISE]
        best = min(near, key=lambda r: (r["method"].ag.start_percent, -r["ssim"]))
        p = best["method"].ag
        lines.append(f"**This run supports: space x0, threshold {p.threshold}, start_percent {p.start_percent}** "
                     f"({best['saved']:.1f}% evaluations saved, SSIM {best['ssim']:.3f}, class accuracy "
                     f"{best['acc']:.3f} vs CFG {ref['acc']:.3f}).")
    else:
        lines.append("No AG x0 row met the rule in this run.")
    by_name = {r["name"]: r for r in rows}
    guarded = [r for r in candidates if r["method"].ag.start_percent > 0]
    for r in guarded:
        plain = next((x for x in candidates if x["method"].ag == r["method"].ag.replace(start_percent=0.0)), None)
        if plain is not None:
            lines.append(f"start_percent {r['method'].ag.start_percent} at γ̄ {r['method'].ag.threshold}: "
                         f"{r['saved']:.1f}% saved, SSIM {r['ssim']:.3f} (start 0: {plain['saved']:.1f}%, "
                         f"{plain['ssim']:.3f}).")
    eps_rows = [r for r in rows if r["method"].group == "AG eps"]
    if eps_rows and recorder is not None and recorder.eps:
        import numpy as np
        first = np.array(recorder.eps[min(recorder.eps)])
        means = {s: float(np.mean(v)) for s, v in recorder.eps.items()}
        lines.append(f"eps space: the cosine is {first.mean():.5f} on average at step 0 (minimum "
                     f"{first.min():.5f}) and never below {min(means.values()):.5f} on average at any step, so "
                     f"every eps threshold ≤ {first.min():.4f} latches every sample at step 0 (cfg-1 output); "
                     "with a start_percent guard an eps threshold acts as a fixed switch-off point.")
        worst = min(eps_rows, key=lambda r: r["ssim"])
        lines.append(f"eps space: lowest SSIM {worst['ssim']:.3f} ({worst['name']}, {worst['saved']:.1f}% saved).")
    ours = by_name.get("AG x0 0.99")
    port = by_name.get("port rule x0 0.99 (batch, cfg on crossing)")
    if ours and port:
        parts = [f"pack defaults {ours['saved']:.1f}% saved / SSIM {ours['ssim']:.3f}",
                 f"port rule {port['saved']:.1f}% / {port['ssim']:.3f}"]
        for key, label in (("AG x0 0.99, decision batch", "decision batch only"),
                           ("AG x0 0.99, crossing_step cfg", "crossing_step cfg only")):
            if key in by_name:
                parts.append(f"{label} {by_name[key]['saved']:.1f}% / {by_name[key]['ssim']:.3f}")
        lines.append("At γ̄ 0.99 (x0): " + "; ".join(parts) + ".")
    lines += _per_sample_vs_batch(rows)
    negtome = [r for r in rows if r["method"].group == "NegToMe"]
    if negtome:
        ref_div = next(r for r in rows if r["name"] == "CFG")
        lines.append("NegToMe (diversity within each sampling call's class): CFG diversity "
                     f"{ref_div['div']:.3f}, class accuracy {ref_div['acc']:.3f}; " + "; ".join(
                         f"{r['name']} diversity {r['div']:.3f} ({'higher' if r['div'] > ref_div['div'] else 'not higher'}), "
                         f"class accuracy {r['acc']:.3f} "
                         f"({'within' if abs(r['acc'] - ref_div['acc']) <= 0.02 else 'outside'} ±0.02 of CFG)"
                         for r in negtome) + ".")
    linear = [r for r in rows if r["method"].group == "LinearAG"]
    if linear:
        lines.append("LinearAG: " + "; ".join(f"{r['name']} {r['saved']:.1f}% saved / SSIM {r['ssim']:.3f} / FD "
                                               f"{r['fd']:.2f}" for r in linear) + ".")
    delta = [r for r in rows if r["method"].hold_delta]
    for r in delta:
        plain = next((x for x in rows if x["method"].group == "AG x0" and x["method"].ag == r["method"].ag), None)
        if plain is not None:
            diff = r["ssim"] - plain["ssim"]
            verdict = "as close to" if abs(diff) < 0.0005 else ("closer to" if diff > 0 else "further from")
            lines.append(f"{r['name']}: SSIM {r['ssim']:.3f} vs plain AG {plain['ssim']:.3f}, FD {r['fd']:.2f} vs "
                         f"{plain['fd']:.2f}, at {r['evals']:.1f} vs {plain['evals']:.1f} evals/image: {verdict} "
                         "CFG.")
    return "\n".join(lines)


def _interpolate(points, ssim):
    """Saving at `ssim` on the piecewise-linear curve through (ssim, saving) points; None outside their range."""
    points = sorted(points)
    for (s0, v0), (s1, v1) in zip(points, points[1:]):
        if s0 <= ssim <= s1:
            return v0 if s1 == s0 else v0 + (v1 - v0) * (ssim - s0) / (s1 - s0)
    return None


def _per_sample_vs_batch(rows) -> list[str]:
    """The default decision (per_sample: each image stops its uncond pass when it latches) against the batch-wide
    rule (one cosine over the batch), compared at equal SSIM to CFG (interpolated between the batch rows)."""
    ours = [r for r in rows if r["method"].group == "AG x0" and r["method"].hold_delta is None
            and r["method"].ag.start_percent == 0.0]
    batch = [r for r in rows if r["method"].group == "batch rule"]
    if not ours or len(batch) < 2:
        return []
    parts = []
    for r in sorted(ours, key=lambda r: r["method"].ag.threshold):
        other = _interpolate([(b["ssim"], b["saved"]) for b in batch], r["ssim"])
        if other is not None:
            parts.append(f"γ̄ {r['method'].ag.threshold}: {r['saved']:.1f}% vs {other:.1f}% at SSIM {r['ssim']:.3f} "
                         f"({r['saved'] - other:+.1f} points)")
    if not parts:
        return []
    return ["per_sample (default) vs decision batch, evaluations saved at equal SSIM to CFG (the batch rule "
            "interpolated between its rows): " + "; ".join(parts) + "."]


def save_plot(recorder, path: Path, note: str) -> Path | None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.warning("matplotlib is not installed (pip install matplotlib): no gamma plot written")
        return None
    import numpy as np
    steps = sorted(recorder.x0)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for space, store, color in (("x0", recorder.x0, "tab:blue"), ("eps", recorder.eps, "tab:red")):
        vals = [np.array(store[s]) for s in steps]
        mean = np.array([v.mean() for v in vals])
        lo = np.array([np.percentile(v, 10) for v in vals])
        hi = np.array([np.percentile(v, 90) for v in vals])
        axes[0].plot(steps, mean, color=color, label=f"{space} space (mean)")
        axes[0].fill_between(steps, lo, hi, color=color, alpha=0.2, label=f"{space} 10–90%")
        axes[1].semilogy(steps, np.clip(1 - mean, 1e-7, None), color=color, label=f"{space} space")
        axes[1].fill_between(steps, np.clip(1 - hi, 1e-7, None), np.clip(1 - lo, 1e-7, None), color=color,
                             alpha=0.2)
    axes[0].set(xlabel="step", ylabel="γ = cos(cond, uncond)", title="cond/uncond cosine per step")
    axes[1].set(xlabel="step", ylabel="1 − γ (log)", title="distance from 1")
    for t in (0.99, 0.995, 0.999):
        axes[1].axhline(1 - t, color="gray", lw=0.6, ls=":")
        axes[1].text(steps[0], (1 - t) * 1.08, f"γ̄ {t}", fontsize=7, color="gray")
    axes[0].legend(fontsize=8)
    axes[1].legend(fontsize=8)
    fig.suptitle(note, fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--per-class", type=int, default=15, help="samples per class (default 15 → 150)")
    parser.add_argument("--batch", type=int, default=5, help="images per sampling call (one class per call)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--fit-per-class", type=int, default=10,
                        help="LinearAG: recorded CFG trajectories per class for the fit (separate seeds)")
    parser.add_argument("--cfg", type=float, default=5.0)
    parser.add_argument("--seed", type=int, default=1000)
    parser.add_argument("--sampler", default="euler")
    parser.add_argument("--scheduler", default="normal")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1: steadier timings on a shared 2-core machine)")
    parser.add_argument("--weights", type=Path, default=None, help="weights file (default: the committed one)")
    parser.add_argument("--quick", action="store_true", help="a few rows only (smoke run)")
    parser.add_argument("--no-write", action="store_true", help="print only; leave BENCHMARKS.md and the plot")
    parser.add_argument("--verbose", action="store_true")
    args = parser.parse_args(argv)
    _host.configure_logging(args.verbose)
    try:
        import sklearn  # noqa: F401
    except ImportError:
        raise SystemExit("benchmarks/run.py needs scikit-learn (the data set and the judge): "
                         "pip install scikit-learn matplotlib")
    _host.setup()
    t0 = time.perf_counter()
    rows, recorder, ctx = evaluate(args)
    markdown = render(rows, recorder, ctx)
    total = time.perf_counter() - t0
    markdown += f"\n\nWhole suite: {total:.0f} s."
    sys.stdout.write(markdown + "\n")
    if not args.no_write:
        plot = save_plot(recorder, PLOT, f"digits eval model, CFG {args.cfg}, {args.steps} steps, "
                                         f"{ctx['n']} samples, {ctx['date']}")
        if plot is not None:
            markdown += f"\n\n![cond/uncond cosine per step]({plot.relative_to(BENCHMARKS_MD.parent).as_posix()})"
        _host.write_results_section(markdown, START, END, BENCHMARKS_MD)
        logger.info("wrote %s%s", BENCHMARKS_MD, f" and {plot}" if plot else "")
    return 0


if __name__ == "__main__":
    sys.exit(main())
