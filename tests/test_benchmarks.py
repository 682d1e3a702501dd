"""The benchmark suite: metric functions, the trained evaluation model (it is trained and conditioned), the
harness's counting and the hold-delta variant, the GPU script's builders at tiny scale, the headless node."""
from __future__ import annotations

import importlib.util
import subprocess
import sys

import pytest
import torch

import host

BENCH = host.PACK_ROOT / "benchmarks"


@pytest.fixture(scope="module")
def metrics():
    return host.pack_module("benchmarks.metrics")


@pytest.fixture(scope="module")
def sklearn_available():
    pytest.importorskip("sklearn", reason="scikit-learn is a benchmark dependency (pip install scikit-learn)")


# ------------------------------------------------------------------------------------------------
# Metrics (no ComfyUI needed)
# ------------------------------------------------------------------------------------------------
def test_ssim_and_psnr(metrics):
    g = torch.Generator().manual_seed(0)
    a = torch.rand(6, 1, 8, 8, generator=g)
    b = (a + 0.2 * torch.randn(a.shape, generator=g)).clamp(0, 1)
    assert torch.allclose(metrics.ssim(a, a), torch.ones(6), atol=1e-6)
    s = metrics.ssim(a, b)
    assert s.shape == (6,) and bool((s < 0.99).all()) and bool((s > -1).all())
    assert float(metrics.ssim(a, 1 - a).mean()) < float(s.mean())
    assert torch.all(metrics.psnr(a, a) == 100.0)
    p = metrics.psnr(a, b)
    mse = (a - b).pow(2).flatten(1).mean(1)
    torch.testing.assert_close(p, (10 * torch.log10(1 / mse)).float(), atol=1e-4, rtol=1e-5)
    assert metrics.psnr_of_set(a, a) == float("inf")
    assert metrics.psnr_of_set(a, b) == pytest.approx(float(10 * torch.log10(1 / (a - b).pow(2).mean())), rel=1e-5)
    with pytest.raises(ValueError):
        metrics.ssim(a, b[:3])


def test_frechet_distance_and_diversity(metrics):
    import numpy as np
    rng = np.random.default_rng(0)
    f = rng.normal(size=(400, 8))
    assert metrics.frechet_distance(f, f) == pytest.approx(0.0, abs=1e-6)
    shifted = metrics.frechet_distance(f, f + 3.0)
    assert shifted == pytest.approx(8 * 9.0, rel=1e-6)
    scaled = metrics.frechet_distance(f, 2.0 * f)
    assert scaled > 1.0
    same = torch.zeros(4, 1, 8, 8)
    labels = torch.tensor([0, 0, 1, 1])
    assert metrics.within_class_diversity(same, labels) == 0.0
    two = torch.stack([torch.zeros(1, 8, 8), torch.ones(1, 8, 8)])
    assert metrics.within_class_diversity(two, torch.tensor([5, 5])) == pytest.approx(8.0)


def test_digit_classifier_fits_in_seconds(metrics, sklearn_available):
    import time
    t0 = time.perf_counter()
    judge = metrics.DigitClassifier(seed=0)
    assert time.perf_counter() - t0 < 30
    assert judge.heldout_accuracy >= 0.95
    real = torch.tensor(judge.heldout, dtype=torch.float32).view(-1, 1, 8, 8)
    assert judge.features(real).shape == (real.shape[0], 64)
    assert judge.real_floor() < 1.0


# ------------------------------------------------------------------------------------------------
# The evaluation model through ComfyUI
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def eval_model(comfy_root, sklearn_available):
    em = host.pack_module("benchmarks.eval_model")
    if not em.WEIGHTS.is_file():
        pytest.fail(f"{em.WEIGHTS} is missing: run python benchmarks/train.py")
    torch.set_num_threads(1)  # steadier on a shared machine; the model is tiny
    return em.load_eval_model()


@pytest.fixture(scope="module")
def harness(comfy_root):
    return host.pack_module("benchmarks.harness")


@pytest.fixture(scope="module")
def judge(metrics, sklearn_available):
    return metrics.DigitClassifier(seed=0)


def test_model_is_trained_and_conditioned(eval_model, harness, judge):
    """Acceptance: CFG samples are recognised as the requested class (>= 90%); unconditional samples are not."""
    em = host.pack_module("benchmarks.eval_model")
    common = dict(classes=list(range(10)), per_class=6, batch=6, steps=20, seed=500)
    cfg = harness.run_method(eval_model, harness.Method("CFG", 5.0), **common)
    uncond = harness.run_method(eval_model, harness.Method("uncond", 1.0, unconditional=True), **common)
    acc_cfg = judge.accuracy(em.to_pixels(cfg.images), cfg.labels)
    acc_uncond = judge.accuracy(em.to_pixels(uncond.images), uncond.labels)
    assert acc_cfg >= 0.90, acc_cfg
    assert acc_uncond <= 0.40, acc_uncond  # chance is 0.10
    # exact evaluation counts: CFG = 2 rows per step per image, unconditional at cfg 1 = 1
    assert cfg.counter.rows == 60 * 2 * 20 and uncond.counter.rows == 60 * 20
    # the unconditional samples still look like digits of all kinds (the model learned the data)
    predicted = set(judge.predict(em.to_pixels(uncond.images)).tolist())
    assert len(predicted) >= 5


def test_both_comfyui_paths_agree(eval_model, harness):
    common = dict(classes=[7], per_class=3, batch=3, steps=6, seed=3)
    k = harness.run_method(eval_model, harness.Method("CFG", 5.0), **common)
    a = harness.run_method(eval_model, harness.Method("CFG", 5.0), path="advanced", **common)
    torch.testing.assert_close(k.images, a.images, atol=1e-5, rtol=1e-5)


def test_ag_and_hold_delta_keep_the_evaluation_count(eval_model, harness):
    P = host.pack_module("kernels.adaptive_guidance").AdaptiveGuidanceParams
    common = dict(classes=[2], per_class=4, batch=4, steps=10, seed=11)
    ag = harness.Method("AG", 5.0, P(threshold=0.99, space="x0"))
    delta = harness.Method("AG+delta", 5.0, P(threshold=0.99, space="x0"), hold_delta="eps")
    cfg = harness.run_method(eval_model, harness.Method("CFG", 5.0), **common)
    r_ag = harness.run_method(eval_model, ag, **common)
    r_delta = harness.run_method(eval_model, delta, **common)
    assert r_ag.counter.rows == r_delta.counter.rows < cfg.counter.rows
    assert len(r_ag.latch_steps) == 4 and all(0 <= s <= 10 for s in r_ag.latch_steps)
    assert not torch.equal(r_ag.images, r_delta.images)
    # the pre-latch trajectory is CFG's, so AG stays close to it
    assert (r_ag.images - cfg.images).abs().max() < 2.0


def test_per_sample_rows_are_counted_per_image(eval_model, harness):
    """per_sample: each image computes its uncond up to and including its latch step, then never again; the
    batch rule latches every image together."""
    P = host.pack_module("kernels.adaptive_guidance").AdaptiveGuidanceParams
    steps = 12
    common = dict(classes=[3], per_class=4, batch=4, steps=steps, seed=11)
    r = harness.run_method(eval_model, harness.Method("AG", 5.0, P(threshold=0.99, space="x0")), **common)
    assert len(r.latch_steps) == 4 and len(set(r.latch_steps)) > 1  # the images latch at different steps
    assert r.counter.cond == 4 * steps
    assert r.counter.uncond == sum(min(s + 1, steps) for s in r.latch_steps)
    b = harness.run_method(eval_model, harness.Method("AG batch", 5.0, P(threshold=0.99, space="x0",
                                                                          decision="batch")), **common)
    assert len(set(b.latch_steps)) == 1 and b.counter.uncond == 4 * min(b.latch_steps[0] + 1, steps)


def test_linear_ag_rows_fit_and_count(eval_model, harness):
    """The LinearAG rows: the pack's recorder + fit on separate seeds, and the paper's schedule's count."""
    try:
        lag = host.pack_module("kernels.linear_ag")
    except ImportError:
        pytest.skip("LinearAG is not in the pack")
    steps = 8
    coefficients, trajectories, _ = harness.fit_linear_ag(eval_model, [1, 7], 2, 2, steps, 90_000, 5.0)
    assert trajectories == 4 and bool(coefficients.fitted[1:].any())
    common = dict(classes=[1], per_class=2, batch=2, steps=steps, seed=5)
    for estimator in ("fitted", "hold_delta"):
        params = lag.LinearAGParams().replace(estimator=estimator, after="cond_only")
        r = harness.run_method(eval_model, harness.Method(estimator, 5.0, linear_ag=params,
                                                          coefficients=coefficients), **common)
        # steps 0 and 2 full CFG, 1 and 3 estimated, 4..7 conditional only
        assert r.evals_per_image == 2 + 1 + 2 + 1 + 4, (estimator, r.evals_per_image)
        assert torch.isfinite(r.images).all()


def test_linear_ag_fitted_estimate_beats_the_baselines(eval_model, harness):
    """The issue's acceptance check at a small scale: on held-out CFG trajectories the fitted estimate of the
    uncond is closer than reusing the previous uncond or holding the last delta."""
    lag = host.pack_module("kernels.linear_ag")
    steps = 10
    coefficients, _, _ = harness.fit_linear_ag(eval_model, list(range(10)), 2, 2, steps, 90_000, 5.0)
    defaults = lag.LinearAGParams()
    estimators = {"fitted": (defaults.replace(estimator="fitted"), (coefficients.coefficients, coefficients.fitted)),
                  "hold_delta": (defaults.replace(estimator="hold_delta"), ()),
                  "previous_uncond": (defaults.replace(estimator="previous_uncond"), ())}
    probe = harness.estimator_errors(eval_model, estimators, defaults, [0, 3, 8], 2, 2, steps, 95_000, 5.0)
    assert all(probe.errors[name] for name in estimators)
    assert probe.mean("fitted") < probe.mean("hold_delta") < probe.mean("previous_uncond")


def test_hold_delta_substitutes_only_handed_on_rows(comfy_root, harness):
    holder = harness.HoldDelta("eps")
    cond = torch.ones(2, 1, 2, 2)
    real_uncond = torch.zeros(2, 1, 2, 2)
    first = holder.wrapper(lambda *a: [cond, real_uncond], None, None, None, torch.tensor([2.0]), {})
    assert torch.equal(first[1], real_uncond)  # measured: passed through
    handed = torch.stack([cond[0], real_uncond[1]])  # row 0 latched (uncond = cond), row 1 measured
    out = holder.wrapper(lambda *a: [cond, handed], None, None, None, torch.tensor([1.0]), {})
    torch.testing.assert_close(out[1][0], cond[0] - 1.0 * 0.5)  # delta 1 held in eps space: x0 delta * 1/2
    torch.testing.assert_close(out[1][1], real_uncond[1])


def test_headless_node_loads_the_model(eval_model):
    spec = importlib.util.spec_from_file_location("tfg_bench_comfy_nodes_test", BENCH / "comfy_nodes" / "__init__.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    model, positive, negative, latent = module.DigitsEvalModel().load(digit=4, batch_size=2)
    assert model.get_model_object("latent_format").latent_channels == 1
    assert positive[0][0].shape == (1, 1, 32) and negative[0][0].shape == (1, 1, 32)
    assert not torch.equal(positive[0][0], negative[0][0])
    assert latent["samples"].shape == (2, 1, 8, 8)
    image = module.DigitsToImage().convert(latent, 4)[0]
    assert image.shape == (2, 32, 32, 3)
    assert set(module.NODE_CLASS_MAPPINGS) == {"TFG_DigitsEvalModel", "TFG_DigitsToImage"}


def test_headless_api_graph_runs_in_process(eval_model, judge):
    """benchmarks/comfy_nodes/digits_ag_api.json, executed node by node with the real node classes (everything
    but the final SaveImage): the eval-model node feeds the pack's AG patch and ComfyUI's KSampler."""
    import json
    import nodes
    from comfy_api.internal import _ComfyNodeInternal
    spec = importlib.util.spec_from_file_location("tfg_bench_comfy_nodes_graph", BENCH / "comfy_nodes" / "__init__.py")
    bench_nodes = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench_nodes)
    classes = dict(nodes.NODE_CLASS_MAPPINGS, **bench_nodes.NODE_CLASS_MAPPINGS)
    classes["TFG_AdaptiveGuidance"] = host.pack_module("nodes.adaptive_guidance").AdaptiveGuidance
    graph = json.loads((BENCH / "comfy_nodes" / "digits_ag_api.json").read_text())
    outputs = {}
    for node_id in sorted(graph, key=int):
        node = graph[node_id]
        if node["class_type"] == "SaveImage":
            continue
        cls = classes[node["class_type"]]
        kwargs = {k: outputs[v[0]][v[1]] if isinstance(v, list) else v for k, v in node["inputs"].items()}
        with torch.inference_mode():
            if isinstance(cls, type) and issubclass(cls, _ComfyNodeInternal):
                outputs[node_id] = cls.execute(**kwargs).args
            else:
                outputs[node_id] = getattr(cls(), cls.FUNCTION)(**kwargs)
    image = outputs["4"][0]
    assert image.shape == (4, 64, 64, 3)
    em = host.pack_module("benchmarks.eval_model")
    assert judge.accuracy(em.to_pixels(outputs["3"][0]["samples"]), [3] * 4) >= 0.75


# ------------------------------------------------------------------------------------------------
# GPU script, checked on the CPU
# ------------------------------------------------------------------------------------------------
def test_gpu_script_builds_full_size_configs(comfy_root):
    sys.path.insert(0, str(BENCH))
    try:
        import gpu
    finally:
        sys.path.remove(str(BENCH))
    # full-size architectures, structure only (meta device): the published parameter counts
    assert gpu.parameter_count("sdxl") == pytest.approx(2.567e9, rel=0.01)
    assert gpu.parameter_count("flux") == pytest.approx(11.90e9, rel=0.01)
    # tiny twins of the same classes build with real weights, and the sampler runs
    res = gpu.run_family("sdxl", True, 32, 2, 2, torch.device("cpu"), torch.float32,
                         [("CFG", None), ("AG, latch at 0%", 0.0)])
    evals = {r["method"]: r["evals"] for r in res["rows"]}
    assert evals["CFG"] == 4.0 and evals["AG, latch at 0%"] == 3.0  # AG latched at step 0: uncond once
    assert min(evals.values()) == 2.0  # the cond-only (cfg 1) floor row


def test_gpu_script_refuses_without_cuda():
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    out = subprocess.run([sys.executable, str(BENCH / "gpu.py")], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "no CUDA device" in out.stderr


def test_negtome_runs_on_the_eval_model(eval_model, harness):
    """The NegToMe rows: the eval model is no known family but an SD UNet, so the UNet placement applies."""
    kernel = host.pack_module("kernels.negtome")
    params = kernel.NegToMeParams(alpha=3.0, threshold=0.3, window="custom", start_percent=0.0, end_percent=0.5,
                                  blocks="all")
    common = dict(classes=[4], per_class=3, batch=3, steps=8, seed=21)
    cfg = harness.run_method(eval_model, harness.Method("CFG", 5.0), **common)
    neg = harness.run_method(eval_model, harness.Method("NegToMe", 5.0, negtome=params), **common)
    assert neg.evals_per_image == cfg.evals_per_image == 16
    assert torch.equal(neg.images[0], cfg.images[0])  # official matching: the reference image 0 is untouched
    assert not torch.equal(neg.images[1:], cfg.images[1:])


def test_resolve_family_runs_unknown_sd_unets_as_sd_unet_and_refuses_the_rest(eval_model, sd15):
    """The shared family gate of NegToMe, ASG and TALE: a known family passes through, an unknown model on ComfyUI's
    SD UNet (the eval model) runs as "sd_unet", a family outside `supported` with another network is an error."""
    adapters = host.pack_module("nodes.adapters")
    patcher = eval_model.model  # the ModelPatcher
    assert adapters.resolve_family("X", sd15.model, ("sd1",), "no.", "fix.", "as UNet").key == "sd1"
    assert adapters.resolve_family("X", patcher, ("sd1",), "no.", "fix.", "as UNet").key == "sd_unet"
    with pytest.raises(ValueError, match=r"TFG X \[model family: .*\]: no\. Fix: fix\."):
        adapters.resolve_family("X", sd15.model, ("flux",), "no.", "fix.", "as UNet")
