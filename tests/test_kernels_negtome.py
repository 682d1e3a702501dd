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


def _record_block_bytes(monkeypatch) -> list[int]:
    """The bytes of every similarity block the kernel materialises, in order (filled as the kernel runs)."""
    seen = []
    original = K._similarity_block

    def spy(a, b):
        out = original(a, b)
        seen.append(out.numel() * out.element_size())
        return out

    monkeypatch.setattr(K, "_similarity_block", spy)
    return seen


@pytest.mark.parametrize("matching", MATCHINGS)
def test_similarity_blocks_respect_reported_peak(matching, monkeypatch):
    seen = _record_block_bytes(monkeypatch)
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


# ------------------------------------------------------------------------------------------------
# The vectorised, sync-free path against the previous per-image implementation
# ------------------------------------------------------------------------------------------------
def _per_image_reference(x, alpha, tau, matching="official", ref_mask=None, budget=64 * 2 ** 20):
    """The previous merge_group, kept here as the reference: one image at a time, fp32 normalised copies,
    column/row blocks of at most `budget` bytes, a running strict maximum over other images for all_others,
    rows stacked at the end. Returns (out, count)."""
    def norm(t):
        return torch.nn.functional.normalize(t.float(), dim=-1)

    def over_sources(src_n, ref_n):
        cols = max(1, budget // (4 * src_n.shape[0]))
        parts = [(src_n @ ref_n[s:s + cols].T).max(dim=0) for s in range(0, ref_n.shape[0], cols)]
        v, i = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
        return (v if ref_mask is None else v.masked_fill(~ref_mask, float("-inf"))), i

    def over_refs(src_n, ref_n, mask):
        rows = max(1, budget // (4 * ref_n.shape[0]))
        vs, is_ = [], []
        for s in range(0, src_n.shape[0], rows):
            block = src_n[s:s + rows] @ ref_n.T
            if mask is not None:
                block = block.masked_fill(~mask.view(1, -1), float("-inf"))
            v, i = block.max(dim=1)
            vs.append(v)
            is_.append(i)
        return torch.cat(vs), torch.cat(is_)

    n_images, n_tokens, _ = x.shape
    rows, total = ([x[0]], 0) if matching != "all_others" else ([], 0)
    ref_n = norm(x[0])
    for f in range(0 if matching == "all_others" else 1, n_images):
        src_n = norm(x[f])
        if matching == "official":
            vals, idx = over_sources(src_n, ref_n)
            matched = x[0].index_select(0, idx)
        elif matching == "best_match":
            vals, idx = over_refs(src_n, ref_n, ref_mask)
            matched = x[0].index_select(0, idx)
        else:
            vals = torch.full((n_tokens,), float("-inf"))
            matched = torch.zeros_like(x[f])
            for g in range(n_images):
                if g != f:
                    v, i = over_refs(src_n, norm(x[g]), None)
                    better = v > vals
                    vals = torch.where(better, v, vals)
                    matched = torch.where(better.unsqueeze(-1), x[g].index_select(0, i), matched)
        merge = vals > tau
        total += int(merge.sum())
        rows.append(torch.where(merge.unsqueeze(-1), _extrapolated(x[f], matched, alpha), x[f]))
    return torch.stack(rows), total


def _extrapolated(x, matched, alpha):
    """The kernel's extrapolation rule: (1+alpha) x - alpha m in fp32 for fp32 features; for half precision one
    fused lerp computed in fp32 and rounded once (test_half_precision_extrapolation_is_the_fp32_formula_rounded)."""
    if x.dtype in (torch.float16, torch.bfloat16):
        return torch.lerp(x, matched, -alpha)
    return ((1.0 + alpha) * x.float() - alpha * matched.float()).to(x.dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_extrapolation_is_the_fp32_formula_rounded(dtype):
    g = torch.Generator().manual_seed(3)
    x, m = torch.randn(2, 4096, 64, generator=g).to(dtype), torch.randn(2, 4096, 64, generator=g).to(dtype)
    merge = torch.rand(2, 4096, generator=g) > 0.5
    for alpha in (0.9, 3.0, -1.0):
        out = K._extrapolate(x, m.clone(), merge, alpha)
        exact = ((1.0 + alpha) * x.double() - alpha * m.double())
        formula = exact.float().to(dtype)  # the fp32 formula, rounded to the features' dtype
        pushed = out[merge]
        # rounded once from an fp32 value: within one unit of the features' precision of the terms' magnitude
        scale = ((1.0 + alpha) * x.double()).abs() + (alpha * m.double()).abs()
        assert ((pushed.double() - exact[merge]).abs() <= torch.finfo(dtype).eps * scale[merge]).all()
        assert (pushed == formula[merge]).float().mean() > 0.99
        assert torch.equal(out[~merge], x[~merge])


# budgets: a single value per block; part of one image; exactly one image; two of three source images; the group's
# normalised copy but not its whole all_others similarity; all
_BUDGETS = [4, 4 * 37 * 5, 4 * 37 * 37, 4 * 37 * 37 * 2, 20000, 4 * (4 * 37) ** 2, 10 ** 9]


@pytest.mark.parametrize("matching", MATCHINGS)
@pytest.mark.parametrize("budget", _BUDGETS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_fast_path_matches_per_image_reference(matching, budget, dtype):
    x = _group(images=4, tokens=37, dim=24, seed=7, dtype=dtype)
    tau = 0.6 if matching == "all_others" else 0.35  # some tokens merge, some do not
    out, count = K.merge_group(x, 1.3, tau, matching, budget_bytes=budget)
    ref, ref_count = _per_image_reference(x, 1.3, tau, matching, budget=budget)
    assert 0 < count < 4 * 37 and count == ref_count
    assert out.dtype == dtype
    # same normalisation and reductions; only the matmul's blocking differs (fp32 rounding, never an argmax here)
    assert torch.equal(out, ref)


@pytest.mark.parametrize("matching", ["official", "best_match"])
@pytest.mark.parametrize("budget", [4 * 30 * 2, 4 * 30 * 30 * 2, 10 ** 9])
def test_fast_path_with_mask_matches_per_image_reference(matching, budget):
    x = _group(images=3, tokens=30, dim=8, seed=4)
    mask = torch.arange(30) % 3 == 0
    out, count = K.merge_group(x, 1.5, 0.2, matching, ref_mask=mask, budget_bytes=budget)
    ref, ref_count = _per_image_reference(x, 1.5, 0.2, matching, ref_mask=mask, budget=budget)
    assert count == ref_count > 0
    assert torch.equal(out, ref)


@pytest.mark.parametrize("matching", MATCHINGS)
@pytest.mark.parametrize("budget", [4 * 37 * 37 * 3, 10 ** 9])  # one chunk at a time / both chunks at once
def test_merge_batch_chunks_match_per_image_reference_per_chunk(matching, budget):
    a, b = _group(seed=1, dtype=torch.bfloat16), _group(seed=2, dtype=torch.bfloat16)
    mask = None if matching == "all_others" else torch.arange(37) % 4 != 1
    out, count = K.merge_batch(torch.cat([a, b]), 2, 0.9, 0.3, matching, ref_mask=mask, budget_bytes=budget)
    ra, ca = _per_image_reference(a, 0.9, 0.3, matching, ref_mask=mask, budget=budget)
    rb, cb = _per_image_reference(b, 0.9, 0.3, matching, ref_mask=mask, budget=budget)
    assert isinstance(count, torch.Tensor) and count.dim() == 0 and int(count) == ca + cb
    assert torch.equal(out, torch.cat([ra, rb]))


@pytest.mark.parametrize("matching", MATCHINGS)
def test_merge_batch_reads_nothing_back_to_the_host(matching, monkeypatch):
    """The hot path must not synchronise: no Python-level read of a tensor value inside merge_batch."""
    x = _group(images=4, tokens=37, dim=16)
    mask = None if matching == "all_others" else torch.arange(37) % 2 == 0

    def forbidden(*a, **k):
        raise AssertionError("host read-back on the hot path")

    for name in ("item", "tolist", "__bool__", "__int__", "__float__", "__index__", "numpy"):
        monkeypatch.setattr(torch.Tensor, name, forbidden)
    for budget in (4 * 37, 10 ** 9):
        out, count = K.merge_batch(x, 2, 0.9, 0.1, matching, ref_mask=mask, budget_bytes=budget)
        for xs in (x.to(torch.bfloat16), x):  # the default (checked) re-scoring, half precision and fp32
            K.merge_batch(xs, 2, 0.9, 0.1, matching, ref_mask=mask, budget_bytes=budget, similarity="checked")
    monkeypatch.undo()
    ref, ref_count = K.merge_chunks(x, 2, 0.9, 0.1, matching, ref_mask=mask)
    assert int(count) == ref_count > 0 and torch.equal(out, ref)


@pytest.mark.parametrize("matching", MATCHINGS)
@pytest.mark.parametrize("budget", [4 * 37 * 5, 10 ** 9])
def test_merge_batch_into_a_slice_of_a_strided_buffer(matching, budget):
    """The DiT path passes a token slice of the attention output and writes into a slice of a new buffer."""
    g = torch.Generator().manual_seed(3)
    full = torch.randn(4, 5 + 37, 16, generator=g)
    full[:, 5:] += 2 * torch.randn(1, 37, 16, generator=g)
    before = full.clone()
    img = full[:, 5:]
    buffer = torch.full((4, 42, 16), 7.0)
    out, count = K.merge_batch(img, 2, 0.9, 0.2, matching, budget_bytes=budget, out=buffer[:, 5:])
    assert out.data_ptr() == buffer[:, 5:].data_ptr()
    expected = torch.cat([_per_image_reference(img[:2].contiguous(), 0.9, 0.2, matching, budget=budget)[0],
                          _per_image_reference(img[2:].contiguous(), 0.9, 0.2, matching, budget=budget)[0]])
    assert int(count) > 0
    assert torch.equal(buffer[:, 5:], expected)
    assert torch.equal(buffer[:, :5], torch.full((4, 5, 16), 7.0))
    assert torch.equal(full, before)


def test_merge_batch_static_noops_and_errors():
    x = _group()
    for alpha, chunks in ((0.0, 1), (0.9, 4)):
        out, count = K.merge_batch(x, chunks, alpha, 0.1)
        assert out is x and int(count) == 0
    with pytest.raises(ValueError, match="does not split"):
        K.merge_batch(x, 3, 0.9, 0.1)
    with pytest.raises(ValueError, match="out must have"):
        K.merge_batch(x, 1, 0.9, 0.1, out=torch.empty(4, 37, 15))
    with pytest.raises(ValueError, match="similarity"):
        K.merge_batch(x, 1, 0.9, 0.1, similarity="fp64")


def test_model_dtype_similarity_is_fp32_on_fp32_and_the_released_maths_on_bf16():
    x = _group(images=3, tokens=29, dim=8)
    fp32, _ = K.merge_group(x, 0.9, 0.3, "official")
    same, _ = K.merge_group(x, 0.9, 0.3, "official", similarity="model")
    assert torch.equal(fp32, same)
    xb = x.to(torch.bfloat16)
    out, count = K.merge_group(xb, 0.9, 0.3, "official", similarity="model", budget_bytes=2 * 29 * 29)
    xn = torch.nn.functional.normalize(xb, dim=-1)  # the released code: bf16 norms and similarities
    v, i = (xn @ xn[0].T).max(dim=-2)
    merge = v > 0.3
    merge[0] = False
    expected = torch.where(merge.unsqueeze(-1), _extrapolated(xb, xb[0][i], 0.9), xb)
    assert count == int(merge.sum()) > 0
    assert torch.equal(out, expected)
    assert K.NegToMeParams(similarity="bf16").validate()


def test_peak_bound_with_several_images_per_block(monkeypatch):
    seen = _record_block_bytes(monkeypatch)
    tokens, budget = 20, 4 * 20 * 20 * 2  # two of the three source images per block
    for matching in MATCHINGS:
        seen.clear()
        K.merge_group(_group(tokens=tokens), 0.9, 0.3, matching, budget_bytes=budget)
        peak = K.similarity_peak_bytes(tokens, tokens, budget, matching, n_images=4)
        assert seen and max(seen) <= peak <= budget
    seen.clear()
    K.merge_group(_group(tokens=tokens), 0.9, 0.3, "official", budget_bytes=budget)
    assert len(seen) == 2  # images 1-2 together, then image 3


def test_column_max_matches_max_over_rows_with_ties():
    block = torch.tensor([[1.0, 3.0, 2.0], [1.0, 3.0, 5.0], [0.0, 3.0, 5.0]])
    v, i = K._column_max(block)
    ev, ei = block.max(dim=0)
    assert torch.equal(v, ev) and torch.equal(i, ei) and i.tolist() == [0, 0, 1]


# ------------------------------------------------------------------------------------------------
# similarity="checked" (the default): model-dtype search, fp32 re-score of the chosen match
# ------------------------------------------------------------------------------------------------
def _fp32_candidates(x, matching):
    """Per output position (F, N): the best and second-best fp32 cosine over its candidates (image 0 of the
    image-0 modes never merges: -inf)."""
    xn = torch.nn.functional.normalize(x.float(), dim=-1)
    n_images, n_tokens, _ = x.shape
    if matching == "all_others":
        s = xn.reshape(-1, xn.shape[-1]) @ xn.reshape(-1, xn.shape[-1]).T
        own = torch.arange(n_images).repeat_interleave(n_tokens)
        s = s.masked_fill(own[:, None] == own[None, :], float("-inf"))
        top = s.topk(2, dim=1).values.view(n_images, n_tokens, 2)
    else:
        s = xn @ xn[0].T  # (F, N_src, N_ref)
        top = (s.topk(2, dim=1).values.transpose(1, 2) if matching == "official" else s.topk(2, dim=2).values)
        top[0] = float("-inf")
    return top[..., 0], top[..., 1]


@pytest.mark.parametrize("matching", MATCHINGS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("budget", [4 * 96 * 5, 10 ** 9])  # blocks of a few rows / one block
def test_checked_similarity_is_fp32_matching_within_the_stated_tolerance(matching, dtype, budget):
    x = _group(images=4, tokens=96, dim=64, seed=5, dtype=dtype, shared=0.5)
    tau, tol = 0.45, K.check_tolerance(dtype)
    exact, n_exact = K.merge_group(x, 1.3, tau, matching, budget_bytes=budget, similarity="fp32")
    checked, n_checked = K.merge_group(x, 1.3, tau, matching, budget_bytes=budget, similarity="checked")
    model, _ = K.merge_group(x, 1.3, tau, matching, budget_bytes=budget, similarity="model")
    best, second = _fp32_candidates(x, matching)
    assert 0 < n_exact < x.shape[0] * x.shape[1]
    differs = (checked != exact).any(dim=-1)
    in_band = (best > tau) & (best <= tau + tol)
    near_tie = (best - second <= tol) & (best > tau)
    # merged tokens are fp32's except in the stated band; the match differs only between near-equal candidates
    assert not (differs & ~in_band & ~near_tie).any()
    assert abs(n_checked - n_exact) <= int(in_band.sum())
    assert differs.float().mean() < 0.05
    # and the model-dtype search alone is no closer to fp32 than checked
    assert int(differs.sum()) <= int((model != exact).any(dim=-1).sum())


def test_checked_similarity_is_fp32_on_fp32_features():
    assert K.check_tolerance(torch.float32) == 0.0
    x = _group(images=4, tokens=37, dim=16, seed=9)
    for matching in MATCHINGS:
        a, na = K.merge_group(x, 0.9, 0.3, matching, similarity="fp32")
        b, nb = K.merge_group(x, 0.9, 0.3, matching, similarity="checked")
        assert na == nb and torch.equal(a, b)


@pytest.mark.parametrize("matching", ["official", "best_match"])
def test_checked_similarity_keeps_masked_reference_tokens_off(matching):
    x = _group(images=3, tokens=30, dim=8, seed=4, dtype=torch.bfloat16)
    mask = torch.arange(30) % 3 == 0
    out, count = K.merge_group(x, 1.5, 0.2, matching, ref_mask=mask, similarity="checked")
    exact, n_exact = K.merge_group(x, 1.5, 0.2, matching, ref_mask=mask, similarity="fp32")
    assert count > 0 and abs(count - n_exact) <= 2
    if matching == "official":  # output positions of masked-off reference tokens never change
        assert torch.equal(out[:, ~mask], x[:, ~mask])
    none, n_none = K.merge_group(x, 1.5, 0.2, matching, ref_mask=torch.zeros(30, dtype=torch.bool),
                                 similarity="checked")
    assert n_none == 0 and none is x


def test_default_similarity_is_the_model_dtype_within_the_stated_tolerance():
    assert K.NegToMeParams().similarity == "model" and K.SIMILARITIES[:2] == ("fp32", "model")
    for matching in MATCHINGS:
        x = _group(images=4, tokens=96, dim=64, seed=5, dtype=torch.bfloat16, shared=0.5)
        tau, tol = 0.45, K.check_tolerance(torch.bfloat16)
        exact, _ = K.merge_group(x, 1.3, tau, matching, similarity="fp32")
        model, _ = K.merge_group(x, 1.3, tau, matching, similarity=K.NegToMeParams().similarity)
        best, second = _fp32_candidates(x, matching)
        differs = (model != exact).any(dim=-1)
        in_band = (best - tau).abs() <= tol
        near_tie = (best - second <= tol) & (best > tau)
        assert not (differs & ~in_band & ~near_tie).any()


# ------------------------------------------------------------------------------------------------
# Token-span rule (which layers and which tokens): kernels/negtome_span.py
# ------------------------------------------------------------------------------------------------
S = host.pack_module("kernels.negtome_span")


def test_unet_layer_selection():
    assert S.unet_layer_selected(("output", 2), (32, 32), "paper")
    assert not S.unet_layer_selected(("output", 2), (16, 32), "paper")  # below the paper's 32 on one side
    assert not S.unet_layer_selected(("input", 4), (64, 64), "paper")
    assert not S.unet_layer_selected(("output", 2), None, "paper")  # unknown grid: not the paper preset
    assert S.unet_layer_selected(("middle", 0), None, "all")
    assert not S.unet_layer_selected(None, (64, 64), "all")
    custom = K.parse_block_list("output.3-5, middle.0")
    assert S.unet_layer_selected(("output", 4), (8, 8), "custom", custom)
    assert not S.unet_layer_selected(("output", 6), (64, 64), "custom", custom)
    assert S.token_grid_of((2, 4, 128, 96), 48 * 64 // 4) == (32, 24)
    assert S.token_grid_of(None, 100) is None


def test_dit_blocks_and_custom_problems():
    counts = {"double": 3, "single": 2}
    assert S.dit_blocks("flux", counts) == [("double", 0), ("double", 1), ("double", 2), ("single", 0),
                                            ("single", 1)]
    assert S.dit_blocks("flux", counts, K.parse_block_list("single.1")) == [("single", 1)]
    assert S.dit_blocks("sd3", {"joint": 2}) == [("joint", 0), ("joint", 1)]
    assert S.custom_block_problems("double.0-2, single.1", "flux", counts) == []
    assert "double.3" in " ".join(S.custom_block_problems("double.3", "flux", counts))
    assert "'output'" in " ".join(S.custom_block_problems("output.1", "flux", counts))
    assert S.custom_block_problems("output.40", "unet", {}) == []  # UNet depth is not checked
    assert "empty" in " ".join(S.custom_block_problems(" , ", "unet", {}))
    assert "output.x" in " ".join(S.custom_block_problems("output.x", "unet", {}))


def test_dit_image_spans():
    # Flux double block: [txt 7, img 12 (a 6x8 latent, patch 2 -> 3x4)] in the joint attention output
    span = S.dit_image_span("double", 12, 7, 7, 6, 8, 2)
    assert (span.start, span.length, span.total, span.grid) == (7, 12, 19, (3, 4))
    assert span.matches((2, 19, 64)) and not span.matches((2, 12, 64)) and not span.matches((2, 19))
    # extra image tokens after the latent's own (reference latents) are left alone
    span = S.dit_image_span("double", 12 + 5, 7, 7, 6, 8, 2)
    assert (span.start, span.length, span.total) == (7, 12, 24)
    # Flux single block: its input is [txt, img]; the text length comes from the conditioning, else the rest
    span = S.dit_image_span("single", 19, None, 7, 6, 8, 2)
    assert (span.start, span.length, span.total) == (7, 12, 19)
    assert S.dit_image_span("single", 19, None, None, 6, 8, 2).start == 7
    # odd latent sizes: the patch padding rounds up
    assert S.dit_image_span("double", 12, 3, 3, 5, 7, 2).grid == (3, 4)
    # SD3 joint block: [context, x], every x token
    span = S.dit_image_span("joint", 16, 10, 10, 8, 8, 2)
    assert (span.start, span.length, span.total) == (10, 16, 26)
    with pytest.raises(ValueError, match="kind"):
        S.dit_image_span("triple", 1, 1, 1, 2, 2, 2)


@pytest.mark.parametrize("matching", MATCHINGS)
@pytest.mark.parametrize("budget", [4 * 96 * 5, 10 ** 9])
def test_checked_rescores_the_positions_nearest_the_threshold_without_host_reads(matching, budget, monkeypatch):
    """Large layers re-score a fixed share of positions, the nearest the threshold: the same result as re-scoring
    every position while the tolerance band holds fewer positions than that share."""
    x = _group(images=4, tokens=96, dim=64, seed=5, dtype=torch.bfloat16, shared=0.5)
    tau = 0.45
    every, n_every = K.merge_group(x, 1.3, tau, matching, budget_bytes=budget, similarity="checked")
    best, _ = _fp32_candidates(x, matching)
    band = int(((best - tau).abs() <= K.check_tolerance(torch.bfloat16)).sum())
    monkeypatch.setattr(K, "RESCORE_MIN", 1)
    monkeypatch.setattr(K, "RESCORE_FRACTION", 0.5)
    assert band < 0.5 * 96 * 3  # the share covers the band here
    for name in ("item", "tolist", "__bool__", "__int__", "__float__", "__index__", "numpy"):
        monkeypatch.setattr(torch.Tensor, name, lambda *a, **k: (_ for _ in ()).throw(AssertionError("read-back")))
    share, count = K.merge_batch(x, 1, 1.3, tau, matching, budget_bytes=budget, similarity="checked")
    monkeypatch.undo()
    assert torch.equal(share, every) and int(count) == n_every


@pytest.mark.parametrize("matching", ["official", "best_match"])
def test_video_token_counts_stay_within_the_64_mib_budget(matching, monkeypatch):
    """Two clips of 20000 tokens each (e.g. 21 latent frames x 30 x 32 patches): the whole similarity would be
    1.6 GB; every block the kernel materialises stays within the default 64 MiB budget, the result keeps the
    shape, clip 0 (the reference) is unchanged, and sampled positions follow the unchunked rule."""
    seen = _record_block_bytes(monkeypatch)
    clips, tokens, dim, tau, alpha = 2, 20000, 64, 0.3, 0.9
    x = _group(images=clips, tokens=tokens, dim=dim, seed=4)
    budget = K.NegToMeParams().budget_bytes
    assert budget == 64 * 2 ** 20
    out, count = K.merge_batch(x, 1, alpha, tau, matching)
    assert out.shape == x.shape and torch.isfinite(out).all()
    assert torch.equal(out[0], x[0]) and 0 < int(count) <= tokens
    assert seen and max(seen) <= budget < 4 * tokens * tokens
    assert K.similarity_peak_bytes(tokens, tokens, budget, matching) <= budget
    assert K.peak_extra_bytes(clips, tokens, dim, budget, matching) <= 4 * budget
    # sampled positions against the unchunked rule (one column / row of the similarity at a time)
    xn = torch.nn.functional.normalize(x, dim=-1)
    for j in torch.randperm(tokens, generator=torch.Generator().manual_seed(1))[:40].tolist():
        if matching == "official":  # output j: best source token i for reference token j
            v, i = (xn[1] @ xn[0, j]).max(dim=0)
            expected = (1 + alpha) * x[1, j] - alpha * x[0, int(i)] if v > tau else x[1, j]
        else:  # source token j pushed from its own best reference token
            v, i = (xn[0] @ xn[1, j]).max(dim=0)
            expected = (1 + alpha) * x[1, j] - alpha * x[0, int(i)] if v > tau else x[1, j]
        torch.testing.assert_close(out[1, j], expected, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------------
# Per-call cost: ops dispatched per layer call, no host synchronisation (the counter of benchmarks/negtome_overhead.py)
# ------------------------------------------------------------------------------------------------
def _overhead_benchmark():
    """benchmarks/negtome_overhead.py as a module: its op counter and its released-maths reference."""
    import importlib.util
    import sys

    name = "tfg_negtome_overhead_benchmark"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, host.PACK_ROOT / "benchmarks" / "negtome_overhead.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def test_op_counter_sees_launches_views_and_syncs():
    """The counter the bounds below rely on: views are not launches; a read-back and a bool-mask index are syncs."""
    B = _overhead_benchmark()
    x = torch.randn(4, 8)
    plain = B.count_ops(lambda: (x * 2).t().sum(0))
    assert (plain.launches, plain.ops, plain.syncs) == (2, 3, 0)
    assert B.count_ops(lambda: (x.sum() > 0).item()).syncs == 1
    assert B.count_ops(lambda: x[x > 0]).syncs >= 1
    assert B.count_ops(lambda: torch.nonzero(x)).syncs == 1


@pytest.mark.parametrize("matching", MATCHINGS)
@pytest.mark.parametrize("similarity", K.SIMILARITIES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("budget", [4 * 37 * 5, 4 * 37 * 37 * 2, 10 ** 9])
def test_merge_batch_dispatches_no_sync_ops(matching, similarity, dtype, budget):
    """No op on the hot path reads a value back or has a data-dependent shape (on a GPU each would stall the
    queue), whichever matching, similarity, budget (column blocks, image blocks, one product), mask or batch."""
    B = _overhead_benchmark()
    x = _group(images=4, tokens=37, dim=16, dtype=dtype)
    for mask in (None, torch.arange(37) % 2 == 0):
        if mask is not None and matching == "all_others":
            continue
        for chunks in (1, 2):
            x2 = torch.cat([x, x.flip(0)]) if chunks == 2 else x
            count = B.count_ops(lambda: K.merge_batch(x2, chunks, 0.9, 0.1, matching, mask, budget, similarity))
            assert count.syncs == 0, dict(count.by_name)


# SDXL 1024x1024 shapes (output blocks 0-2: 32x32 tokens x 1280; 3-5: 64x64 x 640) and Flux's (64x64 x 3072), on the
# meta device: the op counts of the real sizes without memory or maths.
_SDXL_32, _SDXL_64, _FLUX = (1024, 1280), (4096, 640), (4096, 3072)


def _counts(tokens, dim, rows, dtype, matching="official", similarity="model"):
    B = _overhead_benchmark()
    x = torch.empty(rows, tokens, dim, dtype=dtype, device="meta")
    out = torch.empty_like(x)
    budget = K.NegToMeParams().budget_bytes
    pack = B.count_ops(lambda: K.merge_batch(x, rows // 4, 0.9, 0.7, matching, None, budget, similarity, out=out))
    released = B.count_ops(lambda: B.released_call(x[:4], 1, 0.9, 0.7))  # the released maths on one chunk
    return pack, released


@pytest.mark.parametrize("matching", ["official", "best_match"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_one_product_calls_cost_no_more_ops_than_the_released_maths_on_one_chunk(matching, dtype):
    """SDXL output blocks 0-2 (4x1024x1280): one similarity product for the whole call, so a layer call of one CFG
    chunk (4 rows) launches no more kernels than the released maths on that chunk (+1 for fp32 features, whose
    exact (1 + alpha) x - alpha m takes three ops where half precision takes one lerp), a call of both chunks
    (8 rows; the released maths: twice as many) one more (the chunks' row offsets), and either dispatches at most
    11 more ops (views) in all. Fails when a loop of small ops or a per-chunk pass creeps in."""
    fp32_extra = 1 if dtype == torch.float32 else 0
    for rows in (4, 8):
        pack, released = _counts(*_SDXL_32, rows, dtype, matching)
        assert pack.syncs == 0
        assert pack.launches <= released.launches + fp32_extra + (rows == 8), dict(pack.by_name)
        assert pack.ops <= released.ops + 11, dict(pack.by_name)
        assert pack.by_name["bmm"] == 1 and pack.by_name["max"] == 1


@pytest.mark.parametrize("shape", [_SDXL_64, _FLUX], ids=["sdxl64", "flux"])
@pytest.mark.parametrize("rows", [4, 8])
def test_block_loops_cost_two_ops_per_block_and_three_per_normalisation(shape, rows):
    """Calls whose similarity takes several 64 MiB blocks: each further block costs one product and one max, and
    groups whose normalised copy exceeds the budget one normalisation (three ops) per block of sources besides
    the reference's; nothing else grows with the blocks or the chunks (one addition of the chunks' row offsets;
    bf16, the default similarity)."""
    tokens, dim = shape
    budget = K.NegToMeParams().budget_bytes
    pack, released = _counts(tokens, dim, rows, torch.bfloat16)
    chunks = rows // 4
    per_block = max(1, budget // (2 * chunks * tokens * tokens))
    blocks = -(-3 // per_block)
    assert blocks > 1 and pack.by_name["bmm"] == blocks and pack.by_name["max"] == blocks
    renormalised = 2 * rows * tokens * dim > budget
    bound = released.launches + 2 * (blocks - 1) + (3 * blocks if renormalised else 0) + (chunks > 1)
    assert pack.syncs == 0
    assert pack.launches <= bound, dict(pack.by_name)
    assert pack.by_name["linalg_vector_norm"] == (1 + blocks if renormalised else 1)


def test_chunks_that_fit_only_one_at_a_time_repeat_the_one_chunk_ops():
    """fp32 features at 4096 tokens x 640: both chunks' similarity (128 MiB) exceeds the budget, one chunk's fits:
    the 8-row call costs twice the 4-row call's kernels plus one addition of the counts, no column blocks."""
    four, _ = _counts(*_SDXL_64, 4, torch.float32)
    eight, _ = _counts(*_SDXL_64, 8, torch.float32)
    assert eight.syncs == 0 and eight.by_name["bmm"] == 2 * four.by_name["bmm"]
    assert eight.launches <= 2 * four.launches + 1, dict(eight.by_name)


@pytest.mark.parametrize("matching", ["official", "best_match"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("budget", [2 * 29 * 29, 2 * 2 * 29 * 29, 2 * 2 * 29 * 29 * 3, 10 ** 9])
def test_batched_model_similarity_is_the_released_maths_per_chunk(matching, dtype, budget):
    """The default (`model`) on half-precision features, two CFG chunks: per block of source images, one image per
    chunk at a time (budget of one chunk's image), both chunks per product, or everything at once: each chunk's
    result is the released maths' on that chunk in the features' dtype (F.normalize, max over the sources), image
    0 kept, the pushed tokens the fp32 formula rounded once (official; best_match: the max over reference tokens)."""
    tau, alpha = 0.3, 0.9
    x = torch.cat([_group(images=4, tokens=29, dim=8, seed=s, dtype=dtype) for s in (1, 2)])
    out, count = K.merge_batch(x, 2, alpha, tau, matching, budget_bytes=budget, similarity="model")
    expected, total = [], 0
    for xb in x.split(4):
        xn = torch.nn.functional.normalize(xb, dim=-1)
        s = xn @ xn[0].T  # (F, N_src, N_ref)
        v, i = s.max(dim=-2) if matching == "official" else s.max(dim=-1)
        merge = v > tau
        merge[0] = False
        total += int(merge.sum())
        expected.append(torch.where(merge.unsqueeze(-1), _extrapolated(xb, xb[0][i], alpha), xb))
    assert int(count) == total > 0
    assert torch.equal(out, torch.cat(expected))


def _released_half(x, n_chunks, alpha, tau):
    """The released maths per chunk in the features' dtype (image 0 kept; pushed tokens the fp32 formula rounded
    once); returns (result, merged count)."""
    expected, total = [], 0
    for xb in x.split(x.shape[0] // n_chunks):
        xn = torch.nn.functional.normalize(xb, dim=-1)
        v, i = (xn @ xn[0].T).max(dim=-2)
        merge = v > tau
        merge[0] = False
        total += int(merge.sum())
        expected.append(torch.where(merge.unsqueeze(-1), _extrapolated(xb, xb[0][i], alpha), xb))
    return torch.cat(expected), total


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("budget", [2 * 29 * 29, 10 ** 9])
@pytest.mark.parametrize("layout", ["contiguous", "token span", "features strided"])
def test_half_precision_token_table_path_is_the_released_maths(dtype, budget, layout, monkeypatch):
    """Half-precision features whose token rows are contiguous (a UNet layer output, or a DiT block's image-token
    span between text tokens) take unmerged tokens through lerp(x, x, -alpha) from one token table instead of a
    where pass; other layouts take the where pass. Both give the released maths' result bit for bit, merged and
    unmerged tokens alike (alpha on both sides of lerp's 0.5 switch, and negative), x untouched."""
    g = torch.Generator().manual_seed(7)
    full = torch.randn(8, 3 + 29 + 2, 8, generator=g)
    full[:, 3:32] += 1.5 * torch.randn(1, 29, 8, generator=g)
    full = full.to(dtype)
    if layout == "features strided":  # (B, N, D) with the features not adjacent: no token table
        full = full.transpose(1, 2).contiguous().transpose(1, 2)
    before = full.clone()
    x = full[:, 3:32].contiguous() if layout == "contiguous" else full[:, 3:32]
    for alpha in (0.9, 0.3, -1.0):
        with monkeypatch.context() as m:
            if layout != "features strided":  # the table path must not fall back to the where pass
                m.setattr(K, "_extrapolate", lambda *a, **k: (_ for _ in ()).throw(AssertionError("where path")))
            out, count = K.merge_batch(x, 2, alpha, 0.8, "official", budget_bytes=budget, similarity="model")
        expected, total = _released_half(x, 2, alpha, 0.8)
        assert 0 < int(count) == total < 2 * 3 * 29
        assert torch.equal(out, expected)
    assert torch.equal(full, before)
