"""ComfyUI's step caches (EasyCache and LazyCache, comfy_extras/nodes_easycache.py) in the same graph as Adaptive
Guidance, LinearAG and NegToMe, in both graph orders (cache node before and after the pack's node), on the tiny
SD1.5 model and a tiny Wan 2.1 model (5-D latents).

What is asserted (nodes/caches.py describes the policy):
* EasyCache: a reused (skipped) pass only ever adds a difference cached for the same conditioning and the same
  rows, and every pass of a skipped step reuses differences of one and the same computed step (never a cond/uncond
  pair from two steps); a step is either computed or reused as a whole. EasyCache did skip steps (its own log
  count equals the reused steps seen), outputs are finite, the passes Adaptive Guidance reports equal the passes
  that reached the model, and the result does not depend on the order of the nodes.
* LazyCache: skipped steps never reach the pack's hooks; Adaptive Guidance's evaluations are the steps LazyCache
  computed.
* NegToMe: merges on exactly the steps the network computed.
* Refused with the pack's error (node, family, problem, fix): LinearAG Record with a cache, LinearAG's fitted
  coefficients with LazyCache, EasyCache with context windows, NegToMe Reference whose window edge falls inside
  EasyCache's range, and a holder the pack does not know.
"""
from __future__ import annotations

import logging
import re
from collections import defaultdict
from dataclasses import dataclass, field

import pytest
import torch

from sampling_helpers import with_counter

STEPS = 8
CFG = 5.0
CACHE = dict(reuse_threshold=3.0, start_percent=0.0, end_percent=1.0, verbose=False)
"""Skips often on the tiny models (about half the steps) from the first step on."""
ORDERS = ["cache_first", "pack_first"]
KINDS = ["EasyCache", "LazyCache"]
AG = dict(threshold=0.999, space="eps", start_percent=0.0, decision="per_sample", crossing_step="cond")
"""On the tiny SD1.5 model with `staggered_positive` (3 images), plain AG latches image 0 at step 0, image 1 at
step 2 and image 2 at step 6: the uncond pass runs for 3, 2, 1, then 0 rows."""
NEGTOME = dict(alpha=0.9, threshold=-1.0, matching="official", window="custom", start_percent=0.0, end_percent=1.0,
               blocks="all", custom_blocks="")


@pytest.fixture(scope="module")
def ec(comfy_root):
    from comfy_extras import nodes_easycache
    return nodes_easycache


# ------------------------------------------------------------------------------------------------
# What EasyCache did, pass by pass
# ------------------------------------------------------------------------------------------------
@dataclass
class Pass:
    sigma: float
    uuids: list
    rows: int
    """Rows per uuid of this model call."""
    computed: bool
    cached: dict = field(default_factory=dict)
    """uuid -> (rows of the cached difference or None, sigma of the step that computed it) when the call began."""


class EasySpy:
    """Wraps EasyCache's diffusion-model wrapper (before the cache node executes): records every model call."""

    def __init__(self, original):
        self.original = original
        self.passes: list[Pass] = []
        self.computed_at: dict = {}

    def __call__(self, executor, *args, **kwargs):
        options = args[-1] if isinstance(args[-1], dict) else kwargs.get("transformer_options") or args[-2]
        holder = options["easycache"]
        uuids = list(options["uuids"])
        sigma = float(options["sigmas"].flatten()[0])
        before = {u: holder.uuid_cache_diffs.get(u) for u in uuids}
        ran = []

        def network(*a, **k):
            ran.append(True)
            return executor(*a, **k)

        cached = {u: (None if d is None else d.shape[0], self.computed_at.get(u)) for u, d in before.items()}
        out = self.original(network, *args, **kwargs)
        for u in uuids:
            if holder.uuid_cache_diffs.get(u) is not before[u]:
                self.computed_at[u] = sigma
        self.passes.append(Pass(sigma, uuids, args[0].shape[0] // len(uuids), bool(ran), cached))
        return out

    def clear(self):
        self.passes.clear()
        self.computed_at.clear()

    def reused_steps(self) -> list[float]:
        """Check the reuse rules and return the sigmas of the steps EasyCache reused."""
        by_step = defaultdict(list)
        for p in self.passes:
            by_step[p.sigma].append(p)
        reused = []
        for sigma, passes in by_step.items():
            assert len({p.computed for p in passes}) == 1, f"step at sigma {sigma:.4g} mixes computed and reused " \
                                                          f"passes: {passes}"
            if passes[0].computed:
                continue
            sources = set()
            for p in passes:
                for u in p.uuids:
                    rows, at = p.cached[u]
                    assert rows == p.rows, f"sigma {sigma:.4g}: a difference of {rows} rows reused for {p.rows} rows"
                    sources.add(at)
            assert len(sources) == 1, f"sigma {sigma:.4g}: differences of several steps reused together: {sources}"
            reused.append(sigma)
        return reused

    def computed_sigmas(self) -> set[float]:
        return {p.sigma for p in self.passes if p.computed}


@pytest.fixture
def spy(ec, monkeypatch):
    s = EasySpy(ec.easycache_forward_wrapper)
    monkeypatch.setattr(ec, "easycache_forward_wrapper", s)  # read when the EasyCache node executes
    return s


def require_batched_easycache(ec):
    """ComfyUI 0.3.64's EasyCache adds every conditioning's difference to the whole model call when the shapes
    match (fixed in later versions): plain CFG with a batch of 2 or more fails there, and a batch of 1 gets both
    differences, with no pack node in the graph. Tests of plain-CFG runs skip on such a host."""
    holder = ec.EasyCacheHolder(0.2, 0.0, 1.0, subsample_factor=1, offload_cache_diff=False)
    holder.uuid_cache_diffs = {"a": torch.full((1, 1), 1.0), "b": torch.full((1, 1), 2.0)}
    if not torch.equal(holder.apply_cache_diff(torch.zeros(2, 1), ["a", "b"]), torch.tensor([[1.0], [2.0]])):
        pytest.skip("this ComfyUI's EasyCache cannot reuse a batched cond/uncond call (0.3.64: every difference is "
                    "added to the whole call); plain CFG with EasyCache fails there without any pack node")


def cached(ec, model, kind, **overrides):
    node = ec.EasyCacheNode if kind == "EasyCache" else ec.LazyCacheNode
    return node.execute(model=model, **{**CACHE, **overrides}).args[0]


def in_order(ec, model, kind, order, apply_pack, **cache_overrides):
    """The cache node and the pack's node (`apply_pack(model) -> model`) in the given graph order."""
    if order == "cache_first":
        return apply_pack(cached(ec, model, kind, **cache_overrides))
    return cached(ec, apply_pack(model), kind, **cache_overrides)


def skipped_in_log(text: str, kind: str) -> int:
    found = re.findall(rf"{kind} - skipped (\d+)/(\d+) steps", text)
    assert found, f"no '{kind} - skipped' line in the log"
    return int(found[-1][0])


def latch_steps(text: str) -> set[int]:
    """The steps at which Adaptive Guidance latched images (its report)."""
    found = re.findall(r"latched: ([^;]*);", text)
    assert found, "no Adaptive Guidance report in the log"
    return {int(step) for step in re.findall(r"sample \d+ at step (\d+)", found[-1])}


def step_indices(model, sigmas) -> set[int]:
    schedule = torch.tensor(step_sigmas(model))
    return {int((schedule - s).abs().argmin()) for s in sigmas}


def passes_in_report(text: str) -> tuple[int, int]:
    found = re.findall(r"model passes (\d+) of (\d+)", text)
    assert found, "no Adaptive Guidance report in the log"
    return int(found[-1][0]), int(found[-1][1])


# ------------------------------------------------------------------------------------------------
# Tiny SD1.5
# ------------------------------------------------------------------------------------------------
def staggered_positive(s, mix=(0.0, 0.3, 1.0)):
    """One positive per image, from the negative prompt itself (cond == uncond) towards the real prompt."""
    neg, pos = s.negative[0], s.positive[0]
    rows = torch.cat([neg[0] + t * (pos[0] - neg[0]) for t in mix])
    extra = {k: torch.cat([neg[1][k] + t * (pos[1][k] - neg[1][k]) for t in mix])
             for k in pos[1] if isinstance(pos[1][k], torch.Tensor)}
    return [[rows, extra]]


def sample(s, model, positive=None, batch=3):
    import nodes
    with torch.inference_mode():
        latent = {"samples": s.latent(batch)}
        out = nodes.common_ksampler(model, 7, STEPS, CFG, "euler", "normal", positive or s.positive, s.negative,
                                    latent, denoise=1.0)[0]["samples"]
    return out.clone()


def step_sigmas(model) -> list[float]:
    import comfy.samplers
    return [float(v) for v in comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "normal",
                                                              STEPS)[:-1]]


SCENARIOS = {
    # name: (technique, node values)
    "ag_per_sample_staggered": ("ag", dict(AG)),
    "ag_guidance_interval": ("ag", dict(AG, threshold=1.0, interval_start=0.5)),
    "ag_decision_batch": ("ag", dict(AG, decision="batch")),
    "linear_ag_hold_delta_then_latch": ("la", dict(AG, estimator="hold_delta", estimate_until=0.75, after="adaptive")),
    "linear_ag_extrapolate_then_cond_only": ("la", dict(AG, estimator="extrapolate_delta", estimate_until=0.5,
                                                        after="cond_only")),
}


def pack_node(ag, la, scenario):
    technique, values = SCENARIOS[scenario]
    if technique == "ag":
        return lambda m: ag.AdaptiveGuidance.execute(model=m, **values).args[0]
    return lambda m: la.LinearAG.execute(model=m, coefficients=None, **values).args[0]


def run_scenario(s, ec, ag, la, scenario, kind, order, caplog, **cache_overrides):
    model = in_order(ec, s.model, kind, order, pack_node(ag, la, scenario), **cache_overrides)
    counted, counts = with_counter(model)
    caplog.clear()
    with caplog.at_level(logging.INFO):
        out = sample(s, counted, staggered_positive(s))
    return out, counts, caplog.text


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_easycache_reuses_only_matching_states(sd15, ec, ag, la, spy, caplog, scenario):
    outputs = {}
    for order in ORDERS:
        spy.clear()
        out, counts, log = run_scenario(sd15, ec, ag, la, scenario, "EasyCache", order, caplog)
        assert torch.isfinite(out).all()
        reused = spy.reused_steps()  # the reuse rules, pass by pass
        assert len(reused) >= 1 and skipped_in_log(log, "EasyCache") == len(reused)
        assert not latch_steps(log) & step_indices(sd15.model, reused)  # latches rest on computed predictions
        run, full = passes_in_report(log)
        assert counts["cond"] + counts["uncond"] == run and full == 2 * 3 * STEPS
        assert counts["cond"] == 3 * STEPS  # the cond pass of every image at every step, computed or reused
        network_rows = sum(p.rows * len(p.uuids) for p in spy.passes if p.computed)
        assert network_rows < run  # the reused steps never reached the network
        outputs[order] = out
    assert torch.equal(outputs["cache_first"], outputs["pack_first"])


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_lazycache_skipped_steps_never_reach_the_pack(sd15, ec, ag, la, caplog, scenario):
    outputs = {}
    for order in ORDERS:
        out, counts, log = run_scenario(sd15, ec, ag, la, scenario, "LazyCache", order, caplog)
        assert torch.isfinite(out).all()
        skipped = skipped_in_log(log, "LazyCache")
        assert skipped >= 1
        run, full = passes_in_report(log)
        assert full == 2 * 3 * (STEPS - skipped)  # AG evaluated exactly the steps LazyCache computed
        assert counts["cond"] == 3 * (STEPS - skipped) and counts["cond"] + counts["uncond"] == run
        outputs[order] = out
    assert torch.equal(outputs["cache_first"], outputs["pack_first"])


def test_per_sample_keeps_its_savings_and_the_interval_start_is_computed(sd15, ec, ag, la, spy, caplog):
    """The staggered latch: the uncond pass keeps running for the open images only. The guidance interval: the
    first step with an uncond pass has no cached uncond difference, so it is computed (no KeyError)."""
    spy.clear()
    _, counts, log = run_scenario(sd15, ec, ag, la, "ag_per_sample_staggered", "EasyCache", "pack_first", caplog)
    assert counts["uncond"] < 3 * STEPS and re.search(r"sample 1 at step \d", log) and "sample 0 at step 0" in log
    uncond_rows = {p.rows for p in spy.passes if len(p.uuids) == 1 and p.rows < 3}
    assert uncond_rows  # uncond passes of fewer rows than the batch ran through EasyCache
    spy.clear()
    run_scenario(sd15, ec, ag, la, "ag_guidance_interval", "EasyCache", "cache_first", caplog)
    by_sigma = defaultdict(list)
    for p in spy.passes:
        by_sigma[p.sigma].append(p)
    with_uncond = [sigma for sigma in sorted(by_sigma, reverse=True) if len(by_sigma[sigma]) == 2]  # cond, uncond
    assert 0 < len(with_uncond) < STEPS
    assert all(p.computed for p in by_sigma[with_uncond[0]])
    assert len(spy.reused_steps()) >= 1


@pytest.mark.parametrize("order", ORDERS)
def test_easycache_range_inside_the_run(sd15, ec, ag, la, spy, caplog, order):
    """EasyCache from 30% to 80% of the schedule: before its start it stores every pass (cond and uncond batched
    as ComfyUI does), after its end it hands calls on untouched."""
    spy.clear()
    out, counts, log = run_scenario(sd15, ec, ag, la, "ag_per_sample_staggered", "EasyCache", order, caplog,
                                    start_percent=0.3, end_percent=0.8)
    assert torch.isfinite(out).all()
    reused = spy.reused_steps()
    assert len(reused) >= 1 and skipped_in_log(log, "EasyCache") == len(reused)
    assert counts["cond"] + counts["uncond"] == passes_in_report(log)[0]
    first = max(p.sigma for p in spy.passes)
    assert {tuple(sorted(p.rows for p in spy.passes if p.sigma == first))} == {(3,)}  # one call, 3 rows per uuid
    assert len([p for p in spy.passes if p.sigma == first][0].uuids) == 2


def test_adaptive_guider_with_easycache(sd15, ec, ag, spy):
    """SamplerCustomAdvanced with the Adaptive Guider (TFG) on a model that carries EasyCache."""
    import comfy.samplers
    from comfy_extras import nodes_custom_sampler as ncs
    spy.clear()
    guider = ag.AdaptiveGuiderNode.execute(model=cached(ec, sd15.model, "EasyCache"),
                                           positive=staggered_positive(sd15), negative=sd15.negative, cfg=CFG,
                                           **AG).args[0]
    sigmas = comfy.samplers.calculate_sigmas(sd15.model.get_model_object("model_sampling"), "normal", STEPS)
    with torch.inference_mode():
        out = ncs.SamplerCustomAdvanced().sample(ncs.Noise_RandomNoise(7), guider, comfy.samplers.sampler_object(
            "euler"), sigmas, {"samples": sd15.latent(3)})[0]["samples"]
    assert torch.isfinite(out).all()
    reused = spy.reused_steps()
    assert len(reused) >= 1
    report = guider.tfg_adaptive_guidance_report
    assert "sample 0 at step 0" in report and not latch_steps(f"latched: {report.split('latched: ')[1]}") & \
        step_indices(sd15.model, reused)


def test_easycache_that_never_skips_changes_nothing(sd15, ec, ag, caplog):
    """reuse_threshold 0: EasyCache computes every step; the pack's arrangement (cond pass first, then the uncond
    pass, as ComfyUI does when memory is short) gives Adaptive Guidance's result and its exact pass counts."""
    plain_model, plain_counts = with_counter(pack_node(ag, None, "ag_per_sample_staggered")(sd15.model))
    caplog.clear()
    with caplog.at_level(logging.INFO):
        plain = sample(sd15, plain_model, staggered_positive(sd15))
    latches = re.findall(r"latched: [^;]*;", caplog.text)
    assert latches == ["latched: sample 0 at step 0, sample 1 at step 2, sample 2 at step 6;"]
    for order in ORDERS:
        out, counts, log = run_scenario(sd15, ec, ag, None, "ag_per_sample_staggered", "EasyCache", order, caplog,
                                        reuse_threshold=0.0)
        assert skipped_in_log(log, "EasyCache") == 0 and re.findall(r"latched: [^;]*;", log) == latches
        assert counts["cond"] == plain_counts["cond"] and counts["uncond"] == plain_counts["uncond"]
        # step 0 runs cond and uncond as two calls of 3 rows instead of one of 6: CPU kernels round differently
        torch.testing.assert_close(out, plain, atol=1e-3, rtol=1e-3)


# ------------------------------------------------------------------------------------------------
# NegToMe
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("order", ORDERS)
def test_negtome_merges_on_exactly_the_computed_steps(sd15, ec, nt, spy, caplog, order):
    require_batched_easycache(ec)
    keys = []

    def negtome(m):
        patched, key = nt.apply_negtome(m, nt.NegToMeParams(**NEGTOME))
        keys.append(key)
        return patched

    spy.clear()
    model = in_order(ec, sd15.model, "EasyCache", order, negtome)
    with caplog.at_level(logging.INFO):
        out = sample(sd15, model)
    assert torch.isfinite(out).all()
    reused = spy.reused_steps()
    assert len(reused) >= 1 and skipped_in_log(caplog.text, "EasyCache") == len(reused)
    computed = step_indices(sd15.model, spy.computed_sigmas())
    assert set(nt.LAST_RUN[keys[0]].layers_by_step) == computed


@pytest.mark.parametrize("order", ORDERS)
def test_negtome_with_lazycache(sd15, ec, nt, caplog, order):
    keys = []

    def negtome(m):
        patched, key = nt.apply_negtome(m, nt.NegToMeParams(**NEGTOME))
        keys.append(key)
        return patched

    model = in_order(ec, sd15.model, "LazyCache", order, negtome)
    with caplog.at_level(logging.INFO):
        out = sample(sd15, model)
    assert torch.isfinite(out).all()
    skipped = skipped_in_log(caplog.text, "LazyCache")
    assert skipped >= 1 and len(nt.LAST_RUN[keys[0]].layers_by_step) == STEPS - skipped


class FakeVAE:
    """An 8x downsampled, fixed random projection of the pixels (as in test_nodes_negtome.py)."""

    def __init__(self, channels):
        self.channels = channels

    def encode(self, pixels):
        proj = torch.randn(3, self.channels, generator=torch.Generator().manual_seed(11))
        x = torch.nn.functional.avg_pool2d(pixels[..., :3].movedim(-1, 1), 8)
        return torch.einsum("bchw,co->bohw", x, proj)


def reference_node(nt, s, **overrides):
    image = torch.rand(1, 64, 64, 3, generator=torch.Generator().manual_seed(5))
    return lambda m: nt.NegToMeReference.execute(model=m, vae=FakeVAE(s.latent_channels), image=image,
                                                 noise_reference=False, mask=None,
                                                 **{**NEGTOME, **overrides}).args[0]


@pytest.mark.parametrize("order", ORDERS)
def test_negtome_reference_window_edge_inside_easycache_is_refused(sd15, ec, nt, order):
    model = in_order(ec, sd15.model, "EasyCache", order, reference_node(nt, sd15, end_percent=0.5))
    with pytest.raises(ValueError, match=r"TFG NegToMe Reference \[model family: SD1.x\]: EasyCache .*reference row"
                                         r".*Fix: use LazyCache"):
        sample(sd15, model, batch=2)


@pytest.mark.parametrize("kind,end_percent", [("EasyCache", 1.0), ("LazyCache", 0.5)])
def test_negtome_reference_with_a_constant_layout_works(sd15, ec, nt, spy, caplog, kind, end_percent):
    if kind == "EasyCache":
        require_batched_easycache(ec)
    spy.clear()
    model = cached(ec, reference_node(nt, sd15, end_percent=end_percent)(sd15.model), kind)
    with caplog.at_level(logging.INFO):
        out = sample(sd15, model, batch=2)
    assert torch.isfinite(out).all() and skipped_in_log(caplog.text, kind) >= 1
    if kind == "EasyCache":
        assert {p.rows for p in spy.passes} == {3}  # 2 images + the reference row, reused as such
        assert len(spy.reused_steps()) >= 1


def test_negtome_reference_with_adaptive_guidance_and_easycache(sd15, ec, ag, nt, spy, caplog):
    """The reference row is added to the cond pass and to the open images' uncond pass alike."""
    spy.clear()
    model = cached(ec, pack_node(ag, None, "ag_per_sample_staggered")(reference_node(nt, sd15)(sd15.model)),
                   "EasyCache")
    with caplog.at_level(logging.INFO):
        out = sample(sd15, model, staggered_positive(sd15))
    assert torch.isfinite(out).all() and len(spy.reused_steps()) >= 1


# ------------------------------------------------------------------------------------------------
# Refused combinations
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_linear_ag_record_refuses_a_cache(sd15, ec, la, kind):
    recorded, _ = la.LinearAGRecord.execute(model=cached(ec, sd15.model, kind), history=2).args
    with pytest.raises(ValueError, match=rf"TFG LinearAG Record \[model family: SD1.x\]: a step cache \({kind}\).*"
                                         r"Fix: record without the cache node"):
        sample(sd15, recorded, batch=1)


def test_linear_ag_fitted_refuses_lazycache(sd15, ec, la):
    sigmas = torch.tensor(step_sigmas(sd15.model) + [0.0])
    coefficients = la.LinearAGCoefficients(torch.zeros(STEPS, 6), torch.ones(STEPS, dtype=torch.bool), "SD1.x",
                                           "euler", sigmas, 2, 1, "test.safetensors")
    model = la.LinearAG.execute(model=cached(ec, sd15.model, "LazyCache"), coefficients=coefficients,
                                **dict(AG, estimator="fitted", estimate_until=0.5, after="cond_only")).args[0]
    with pytest.raises(ValueError, match=r"TFG LinearAG \[model family: SD1.x\]: LazyCache skips whole sampling "
                                         r"steps.*Fix: use estimator hold_delta or extrapolate_delta"):
        sample(sd15, model, batch=1)


def test_an_unknown_holder_is_refused(sd15, ag):
    model = pack_node(ag, None, "ag_per_sample_staggered")(sd15.model).clone()
    model.model_options["transformer_options"]["easycache"] = object()
    with pytest.raises(ValueError, match=r"TFG Adaptive Guidance \[model family: SD1.x\]: the step cache in this "
                                         r"graph \(object.*Fix: remove the cache node"):
        sample(sd15, model, batch=1)


# ------------------------------------------------------------------------------------------------
# Tiny Wan 2.1 (5-D video latents)
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def wan(comfy_root):
    import tiny_dit_models
    return tiny_dit_models.get("wan21_t2v")


def wan_sample(d, model, batch=3, staggered=True):
    import comfy.sample
    import tiny_dit_models
    positive = d.positive
    if staggered:  # image 0 prompted with the negative itself: it latches at step 0, the others stay open
        neg, pos = d.negative[0][0], d.positive[0][0]
        positive = [[torch.cat([neg] + [pos] * (batch - 1)), {}]]
    latent = d.latent(batch)
    with torch.inference_mode():
        return comfy.sample.sample(model, tiny_dit_models.noise(latent), STEPS, CFG, "euler", "normal", positive,
                                   d.negative, latent, disable_pbar=True, seed=0).clone()


WAN_AG = dict(AG, threshold=0.9999)
"""On the tiny Wan model the eps cosine of a real prompt stays at 0.9998: image 0 (cond == uncond) latches at step
0, images 1 and 2 stay open."""


@pytest.mark.parametrize("kind", KINDS)
def test_wan_adaptive_guidance_with_caches(wan, ec, ag, spy, caplog, kind):
    outputs = {}
    for order in ORDERS:
        spy.clear()
        model = in_order(ec, wan.model, kind, order, lambda m: ag.AdaptiveGuidance.execute(model=m, **WAN_AG).args[0])
        counted, counts = with_counter(model)
        caplog.clear()
        with caplog.at_level(logging.INFO):
            out = wan_sample(wan, counted)
        assert torch.isfinite(out).all() and out.dim() == 5
        skipped = skipped_in_log(caplog.text, kind)
        assert skipped >= 1 and "latched: sample 0 at step 0;" in caplog.text
        run, full = passes_in_report(caplog.text)
        assert counts["cond"] + counts["uncond"] == run
        if kind == "EasyCache":
            reused = spy.reused_steps()
            assert len(reused) == skipped and counts["cond"] == 3 * STEPS
            assert not latch_steps(caplog.text) & step_indices(wan.model, reused)
            assert any(p.rows == 2 for p in spy.passes if len(p.uuids) == 1)  # the open images' uncond pass
        else:
            assert full == 2 * 3 * (STEPS - skipped)
        outputs[order] = out
    assert torch.equal(outputs["cache_first"], outputs["pack_first"])


def test_wan_linear_ag_and_negtome_with_easycache(wan, ec, la, nt, spy, caplog):
    spy.clear()
    values = dict(AG, threshold=1.0, estimator="extrapolate_delta", estimate_until=0.75, after="adaptive")
    model = cached(ec, la.LinearAG.execute(model=wan.model, coefficients=None, **values).args[0], "EasyCache")
    with caplog.at_level(logging.INFO):
        out = wan_sample(wan, model, staggered=False)
    assert torch.isfinite(out).all() and len(spy.reused_steps()) >= 1
    require_batched_easycache(ec)  # NegToMe alone: plain CFG batches cond and uncond in one call
    spy.clear()
    patched, key = nt.apply_negtome(wan.model, nt.NegToMeParams(**NEGTOME))
    with caplog.at_level(logging.INFO):
        out = wan_sample(wan, cached(ec, patched, "EasyCache"), batch=2, staggered=False)
    assert torch.isfinite(out).all() and len(spy.reused_steps()) >= 1
    computed = step_indices(wan.model, spy.computed_sigmas())
    assert set(nt.LAST_RUN[key].layers_by_step) == computed


def test_wan_easycache_with_context_windows_is_refused(wan, ec, ag):
    from comfy_extras.nodes_context_windows import WanContextWindowsManualNode
    model = cached(ec, pack_node(ag, None, "ag_per_sample_staggered")(wan.model), "EasyCache")
    windowed = WanContextWindowsManualNode.execute(model, 5, 1, "standard_static", 1, False, "pyramid").result[0]
    with pytest.raises(ValueError, match=r"TFG Adaptive Guidance \[model family: Wan 2.1\]: EasyCache and context "
                                         r"windows are both active.*Fix: use LazyCache"):
        wan_sample(wan, windowed, batch=1, staggered=False)
