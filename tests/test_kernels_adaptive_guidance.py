"""Adaptive Guidance kernel: pure torch, no ComfyUI."""
from __future__ import annotations

import pytest
import torch

import host

ag = host.pack_module("kernels.adaptive_guidance")


def test_per_sample_cosine_matches_torch():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(3, 4, 5, 6, generator=g), torch.randn(3, 4, 5, 6, generator=g)
    expected = torch.nn.functional.cosine_similarity(a.flatten(1), b.flatten(1), dim=1)
    torch.testing.assert_close(ag.per_sample_cosine(a, b), expected)
    assert ag.per_sample_cosine(a, a).sub(1).abs().max() < 1e-6


def test_batch_cosine_is_one_value_over_the_batch():
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(2, 4, 3, 3, generator=g), torch.randn(2, 4, 3, 3, generator=g)
    out = ag.batch_cosine(a, b)
    expected = torch.nn.functional.cosine_similarity(a.reshape(1, -1), b.reshape(1, -1))
    assert out.shape == (2,) and torch.allclose(out, expected.expand(2))


def test_cosine_is_fp32_for_half_inputs():
    a = torch.randn(2, 8).half()
    assert ag.per_sample_cosine(a, a * 2).dtype == torch.float32


def test_spaces():
    x, d = torch.ones(1, 2), torch.full((1, 2), 0.25)
    assert torch.equal(ag.in_space(x, d, "x0"), d)
    assert torch.equal(ag.in_space(x, d, "eps"), x - d)
    with pytest.raises(ValueError):
        ag.in_space(x, d, "v")


def test_params_validate():
    assert ag.AdaptiveGuidanceParams().validate() == []
    bad = ag.AdaptiveGuidanceParams(threshold=1.5, start_percent=-0.1, space="v", decision="x", crossing_step="y")
    assert len(bad.validate()) == 5
    with pytest.raises(Exception):
        ag.AdaptiveGuidanceParams().threshold = 0.5  # frozen


def _pair(similar: list[bool]):
    """cond/uncond pairs: identical rows where `similar`, orthogonal otherwise."""
    cond = torch.zeros(len(similar), 4)
    uncond = torch.zeros(len(similar), 4)
    for i, s in enumerate(similar):
        cond[i, 0] = 1.0
        uncond[i, 0 if s else 1] = 1.0
    return torch.zeros_like(cond), cond, uncond


def test_tracker_per_sample_latch_and_paper_crossing_rule():
    t = ag.AdaptiveGuidanceTracker(ag.AdaptiveGuidanceParams(threshold=0.9, crossing_step="cond"))
    x, c, u = _pair([True, False])
    out = t.observe(x, c, u, step=0, sigma=10.0, latch_allowed=True)
    assert torch.equal(out[0], c[0]) and torch.equal(out[1], u[1])  # sample 0 uses cond on the crossing step
    assert t.latched.tolist() == [True, False] and not t.all_latched(2)
    x, c, u = _pair([False, True])
    out = t.observe(x, c, u, step=1, sigma=5.0, latch_allowed=True)
    assert torch.equal(out, c)  # sample 0 stays latched even though its cosine fell; sample 1 crosses
    assert t.all_latched(2) and t.latch_step == {0: 0, 1: 1}


def test_tracker_port_rule_applies_cfg_on_crossing_step():
    t = ag.AdaptiveGuidanceTracker(ag.AdaptiveGuidanceParams(threshold=0.9, crossing_step="cfg"))
    x, c, u = _pair([True])
    assert torch.equal(t.observe(x, c, u, 0, 10.0, True), u)
    assert torch.equal(t.observe(x, c, u, 1, 5.0, True), c)


def test_tracker_does_not_latch_before_start_and_never_modifies_inputs():
    t = ag.AdaptiveGuidanceTracker(ag.AdaptiveGuidanceParams(threshold=0.0))
    x, c, u = _pair([True, True])
    copies = [x.clone(), c.clone(), u.clone()]
    out = t.observe(x, c, u, 0, 10.0, latch_allowed=False)
    assert out is u and not t.latched.any()
    for a, b in zip((x, c, u), copies):
        assert torch.equal(a, b)


def test_tracker_batch_decision_latches_all_together():
    t = ag.AdaptiveGuidanceTracker(ag.AdaptiveGuidanceParams(threshold=0.6, decision="batch"))
    x, c, u = _pair([True, True, False])  # batch cosine 2/3 >= 0.6, though sample 2 alone is 0
    t.observe(x, c, u, 0, 1.0, True)
    assert t.all_latched(3)


def test_tracker_counts_and_summary():
    t = ag.AdaptiveGuidanceTracker(ag.AdaptiveGuidanceParams(threshold=0.9))
    x, c, u = _pair([True, True])
    t.observe(x, c, u, 0, 10.0, True)
    t.skip(1, 5.0, 2)
    t.skip(2, 1.0, 2)
    assert t.model_passes() == (4 + 2 + 2, 12)
    assert "8 of 12" in t.summary() and "0:1.0000" in t.summary()


def test_cfg_combine_reduces_to_cond_when_uncond_is_cond():
    c = torch.randn(2, 3)
    assert torch.equal(ag.cfg_combine(c, c, 7.5), c)
    u = torch.randn(2, 3)
    torch.testing.assert_close(ag.cfg_combine(c, u, 1.0), c)


def test_tracker_open_rows_measure_only_those_images_and_count_their_rows():
    t = ag.AdaptiveGuidanceTracker(ag.AdaptiveGuidanceParams(threshold=0.9))
    x, c, u = _pair([True, False, False])
    assert t.open_rows(3) is None  # nothing latched yet: the whole batch
    t.observe(x, c, u, 0, 10.0, True)
    rows = t.open_rows(3)
    assert rows.tolist() == [1, 2]
    x, c2, u2 = _pair([True, True, False])
    # what the node builds: cond for the latched image, the computed uncond for the open ones
    handed = torch.where(torch.tensor([True, False, False]).view(3, 1), c2, u2)
    out = t.observe(x, c2, handed, 1, 5.0, True, rows=rows)
    assert t.latched.tolist() == [True, True, False] and t.open_rows(3).tolist() == [2]
    assert torch.equal(out[:2], c2[:2]) and torch.equal(out[2], u2[2])
    assert len(t.records[-1].gamma) == 2 and t.records[-1].uncond_rows == 2
    assert t.model_passes() == (3 + 3 + 3 + 2, 12)
    assert t.open_rows(2) is None  # another batch size: not this run's latch


def test_threshold_one_never_latches():
    t = ag.AdaptiveGuidanceTracker(ag.AdaptiveGuidanceParams(threshold=1.0))
    x, c, _ = _pair([True])
    assert torch.equal(t.observe(x, c, c.clone(), 0, 1.0, True), c) and not t.latched.any()


def test_lazy_sigmas_and_device_latch_gates_settle_in_order():
    """Sigmas handed over as device scalars and a latch gate decided on the device resolve, at the next decision,
    to what floats would have given: record steps from the schedule, latch steps, gammas in row order."""
    schedule = torch.tensor([10.0, 5.0, 1.0, 0.0])
    t = ag.AdaptiveGuidanceTracker(ag.AdaptiveGuidanceParams(threshold=0.9), schedule)
    x, c, u = _pair([True, False])
    t.observe(x, c, u, None, torch.tensor(10.0), latch_allowed=torch.tensor(False))  # gate closed: no latch
    t.observe(x, c, u, None, torch.tensor(5.0), latch_allowed=torch.tensor(True))
    assert t.open_rows(2).tolist() == [1]  # the decision settles: image 0 latched at step 1
    t.skip(None, torch.tensor(1.0), 2)
    assert [(r.step, r.sigma) for r in t.records] == [(0, 10.0), (1, 5.0), (2, 1.0)]
    assert t.latch_step == {0: 1} and t.records[0].gamma == pytest.approx([1.0, 0.0])


def test_at_most_answers_as_the_host_in_float64():
    sigma = torch.tensor(0.25, dtype=torch.float32)
    bound = 0.24999999999999994  # rounds to 0.25 in float32, yet 0.25 > bound
    assert float(sigma) > bound and not bool(ag.at_most(sigma, bound))
    assert bool(ag.at_most(sigma, 0.25)) and bool(ag.at_most(sigma.double(), 0.25))
    assert bool(ag.at_most(torch.tensor(3.0, dtype=torch.bfloat16), 3.0))
