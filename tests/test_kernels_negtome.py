"""NegToMe kernel: the maths, pure torch, no ComfyUI."""
from __future__ import annotations

import pytest
import torch

import host

K = host.pack_module("kernels.negtome")
MATCHINGS = list(K.MATCHINGS)


def _group(images=4, tokens=37, dim=16, seed=0, dtype=torch.float32, shared=0.6):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(1, tokens, dim, generator=g)
    x = shared * base + (1 - shared) * torch.randn(images, tokens, dim, generator=g)
    return x.to(dtype)


def _released_negtome(x, alpha, tau, mask=None):
    """A literal restatement of the released function's maths (reference = image 0, reduce over dim=-2)."""
    xn = torch.nn.functional.normalize(x, dim=-1)
    s = torch.einsum("fnd,md->fnm", xn, xn[0])
    if mask is not None:
        s = s.masked_fill(~mask.view(1, 1, -1), float("-inf"))
    v, i = s.max(dim=-2)
    m = v > tau
    r = x[0][i]
    return torch.where(m.unsqueeze(-1), (1 + alpha) * x - alpha * r, x)


def test_defaults_validate():
    assert K.NegToMeParams().validate() == []
    bad = K.NegToMeParams(matching="nope", window="x", blocks="custom", custom_blocks="", threshold=2.0)
    problems = " ".join(bad.validate())
    for word in ("matching", "window", "custom_blocks", "threshold"):
        assert word in problems


def test_custom_window_order_checked():
    assert K.NegToMeParams(window="custom", start_percent=0.5, end_percent=0.2).validate()
    assert not K.NegToMeParams(window="paper", start_percent=0.5, end_percent=0.2).validate()


def test_parse_block_list():
    assert K.parse_block_list("output.3-5, middle.0") == {("output", 3), ("output", 4), ("output", 5),
                                                          ("middle", 0)}
    assert K.parse_block_list("double.0 ; single.2-3") == {("double", 0), ("single", 2), ("single", 3)}
    with pytest.raises(ValueError, match="output.x"):
        K.parse_block_list("output.x")
    with pytest.raises(ValueError, match="empty range"):
        K.parse_block_list("output.5-3")


@pytest.mark.parametrize("matching", MATCHINGS)
def test_alpha_zero_returns_input(matching):
    x = _group()
    out, count = K.merge_group(x, 0.0, 0.0, matching)
    assert out is x and count == 0


@pytest.mark.parametrize("matching", MATCHINGS)
def test_single_image_returns_input(matching):
    x = _group(images=1)
    out, _ = K.merge_group(x, 0.9, 0.0, matching)
    assert out is x


def test_official_matches_released_maths():
    x = _group(images=3, tokens=29, dim=8, dtype=torch.float64)
    out, count = K.merge_group(x, 0.9, 0.3, "official")
    expected = _released_negtome(x, 0.9, 0.3)
    expected[0] = x[0]
    assert count > 0
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("matching", MATCHINGS)
@pytest.mark.parametrize("budget", [4, 4 * 7, 4 * 37 * 5, 10 ** 9])
def test_chunked_matches_unchunked(matching, budget):
    x = _group(images=4, tokens=37, dim=16)
    out, _ = K.merge_group(x, 0.9, 0.4, matching, budget_bytes=budget)
    ref = K.reference_negtome(x, 0.9, 0.4, matching)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-6)


@pytest.mark.parametrize("matching", ["official", "best_match"])
def test_mask_matches_unchunked(matching):
    x = _group(images=3, tokens=30, dim=8)
    mask = torch.arange(30) % 3 == 0
    out, _ = K.merge_group(x, 1.5, 0.2, matching, ref_mask=mask, budget_bytes=4 * 30 * 2)
    ref = K.reference_negtome(x, 1.5, 0.2, matching, ref_mask=mask)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-6)


def test_empty_mask_changes_nothing():
    x = _group()
    out, count = K.merge_group(x, 0.9, -1.0, "official", ref_mask=torch.zeros(37, dtype=torch.bool))
    assert out is x and count == 0


def test_mask_with_all_others_rejected():
    with pytest.raises(ValueError, match="all_others"):
        K.merge_group(_group(), 0.9, 0.1, "all_others", ref_mask=torch.ones(37, dtype=torch.bool))


@pytest.mark.parametrize("matching", ["official", "best_match"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_image_zero_never_changes(matching, dtype):
    x = _group(dtype=dtype)
    out, count = K.merge_group(x, 1.9, -1.0, matching)
    assert count > 0
    assert torch.equal(out[0], x[0])
    assert out.dtype == dtype


def test_all_others_pushes_image_zero_too():
    x = _group()
    out, _ = K.merge_group(x, 0.9, -1.0, "all_others")
    assert not torch.equal(out[0], x[0])


def test_unmatched_tokens_bit_identical_and_input_untouched():
    x = _group(dtype=torch.float16)
    before = x.clone()
    out, count = K.merge_group(x, 0.9, 0.8, "best_match")
    assert torch.equal(x, before)
    xn = torch.nn.functional.normalize(x.float(), dim=-1)
    v = (xn @ xn[0].T).max(dim=-1).values
    keep = v <= 0.8
    keep[0] = True
    assert torch.equal(out[keep], x[keep])
    assert count == int((~keep).sum())


def test_threshold_above_one_merges_nothing():
    x = _group()
    out, count = K.merge_group(x, 0.9, 1.0, "official")
    assert out is x and count == 0


def test_negative_alpha_pulls_toward_reference():
    x = _group(images=2)
    pushed, _ = K.merge_group(x, 0.5, -1.0, "best_match")
    pulled, _ = K.merge_group(x, -0.5, -1.0, "best_match")
    d0 = (x[1] - x[0]).norm()
    assert (pulled[1] - x[0]).norm() < d0 < (pushed[1] - x[0]).norm()


def test_alpha_minus_one_copies_matched_tokens():
    x = _group(images=2)
    out, _ = K.merge_group(x, -1.0, -1.0, "best_match")
    xn = torch.nn.functional.normalize(x, dim=-1)
    idx = (xn[1] @ xn[0].T).argmax(dim=-1)
    torch.testing.assert_close(out[1], x[0][idx])


def test_merge_chunks_are_independent():
    a, b = _group(seed=1), _group(seed=2)
    out, _ = K.merge_chunks(torch.cat([a, b]), 2, 0.9, 0.3, "official")
    torch.testing.assert_close(out[:4], K.merge_group(a, 0.9, 0.3)[0])
    torch.testing.assert_close(out[4:], K.merge_group(b, 0.9, 0.3)[0])
    with pytest.raises(ValueError, match="does not split"):
        K.merge_chunks(torch.cat([a, b]), 3, 0.9, 0.3)


@pytest.mark.parametrize("matching", MATCHINGS)
def test_similarity_blocks_respect_reported_peak(matching, monkeypatch):
    seen = []
    original = K._similarity_block

    def spy(a, b):
        out = original(a, b)
        seen.append(out.numel() * out.element_size())
        return out

    monkeypatch.setattr(K, "_similarity_block", spy)
    tokens, budget = 50, 4 * 50 * 3 + 17
    K.merge_group(_group(tokens=tokens), 0.9, 0.3, matching, budget_bytes=budget)
    peak = K.similarity_peak_bytes(tokens, tokens, budget, matching)
    assert seen and max(seen) <= peak <= max(budget, 4 * tokens)
    whole = 4 * tokens * tokens
    assert peak < whole


def test_peak_extra_bytes_grows_linearly_not_quadratically_with_budget_fixed():
    small = K.peak_extra_bytes(4, 4096, 64, 2 ** 20)
    large = K.peak_extra_bytes(4, 16384, 64, 2 ** 20)
    assert large < 5 * small  # 4x tokens; a whole N x N matrix would be 16x
    assert K.similarity_peak_bytes(16384, 16384, 2 ** 20) <= 2 ** 20


@pytest.mark.parametrize("h,w,factor", [(8, 8, 1), (9, 7, 2), (13, 11, 4), (128, 96, 4)])
def test_token_grid_odd_sizes(h, w, factor):
    gh, gw = -(-h // factor), -(-w // factor)
    assert K.token_grid(h, w, gh * gw) == (gh, gw)
    assert K.token_grid(h, w, 7919) is None


def test_mask_to_tokens():
    mask = torch.zeros(16, 16)
    mask[:, :8] = 1
    tokens = K.mask_to_tokens(mask, (4, 4)).view(4, 4)
    assert tokens[:, :2].all() and not tokens[:, 2:].any()
