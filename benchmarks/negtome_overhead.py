"""NegToMe per-layer overhead: `python benchmarks/negtome_overhead.py [--tiny] [--iters N]`.

Times one patched attention layer at the shapes NegToMe meets in a 1024x1024, batch-4, CFG run (8 rows = 4 images
x cond/uncond): a stand-in layer (the attention output projection, a D x D linear in the model dtype) followed by

* identity (no NegToMe),
* the previous implementation (kept here only as a reference: one image at a time, `int(merge.sum())` per image,
  rows stacked, the DiT token slice concatenated back), and
* the pack's current hook path (`merge_batch`: no host read-back, source images of a CFG chunk in one similarity
  block when the budget allows, result written straight into the output buffer), with fp32 similarities (the
  default) and with `similarity="model"` (the released code's dtype),

and prints per-call milliseconds and the overhead over identity. Calls are queued back to back and synchronised
once per timing, as in a real forward pass, so a host read-back inside the hook shows as lost overlap. It also
checks that old and new give the same tokens. Shapes (pack defaults, diversity mode, official matching):

* SDXL output blocks 0-2: 32x32 grid, 1024 tokens x 1280 features (60 layer calls per active step), fp16;
* SDXL output blocks 3-5: 64x64 grid, 4096 tokens x 640 features (12 layer calls per active step), fp16;
* Flux-dev double/single blocks: 4096 image tokens (after 512 text tokens) x 3072 features (57 calls), bf16.

Uses CUDA when available, else the CPU; `--tiny` shrinks the shapes for a CPU run. Needs no ComfyUI. A GPU run
takes well under a minute.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import host  # noqa: E402  (tests/host.py: loads the pack without ComfyUI)

K = host.pack_module("kernels.negtome")

# name, tokens, features, text tokens before the image tokens (DiT slice) or None (UNet output patch), dtype,
# layer calls per active step
SHAPES = [
    ("sdxl out0-2 32x32", 1024, 1280, None, torch.float16, 60),
    ("sdxl out3-5 64x64", 4096, 640, None, torch.float16, 12),
    ("flux block 64x64", 4096, 3072, 512, torch.bfloat16, 57),
]
TINY_SHAPES = [
    ("tiny unet 16x16", 256, 64, None, torch.float32, 60),
    ("tiny unet 32x32", 1024, 32, None, torch.float32, 12),
    ("tiny dit 32x32", 1024, 96, 64, torch.float32, 57),
]


# ----------------------------------------------------------------------------------------------
# The previous implementation (reference only; not in the pack)
# ----------------------------------------------------------------------------------------------

def emit(text: str = "") -> None:
    """Results go to stdout (the pack uses logging, never print)."""
    sys.stdout.write(text + "\n")

def old_merge_group(x, alpha, threshold, matching="official", budget_bytes=64 * 2 ** 20):
    def norm(t):
        return torch.nn.functional.normalize(t.float(), dim=-1)

    def over_sources(src_n, ref_n):
        cols = max(1, budget_bytes // (4 * src_n.shape[0]))
        vals = torch.empty(ref_n.shape[0], device=x.device)
        idx = torch.empty(ref_n.shape[0], dtype=torch.long, device=x.device)
        for s in range(0, ref_n.shape[0], cols):
            v, i = (src_n @ ref_n[s:s + cols].T).max(dim=0)
            vals[s:s + cols], idx[s:s + cols] = v, i
        return vals, idx

    def over_refs(src_n, ref_n):
        rows = max(1, budget_bytes // (4 * ref_n.shape[0]))
        vals = torch.empty(src_n.shape[0], device=x.device)
        idx = torch.empty(src_n.shape[0], dtype=torch.long, device=x.device)
        for s in range(0, src_n.shape[0], rows):
            v, i = (src_n[s:s + rows] @ ref_n.T).max(dim=1)
            vals[s:s + rows], idx[s:s + rows] = v, i
        return vals, idx

    n_images, n_tokens, _ = x.shape
    if alpha == 0.0 or n_images < 2:
        return x, 0
    ref_n = norm(x[0]) if matching != "all_others" else None
    rows = [x[0]] if matching != "all_others" else []
    total = 0
    for f in range(0 if matching == "all_others" else 1, n_images):
        src_n = norm(x[f])
        if matching == "official":
            vals, idx = over_sources(src_n, ref_n)
            matched = x[0].index_select(0, idx)
        elif matching == "best_match":
            vals, idx = over_refs(src_n, ref_n)
            matched = x[0].index_select(0, idx)
        else:
            vals = torch.full((n_tokens,), float("-inf"), device=x.device)
            matched = torch.zeros_like(x[f])
            for g in range(n_images):
                if g != f:
                    v, i = over_refs(src_n, norm(x[g]))
                    better = v > vals
                    vals = torch.where(better, v, vals)
                    matched = torch.where(better.unsqueeze(-1), x[g].index_select(0, i), matched)
        merge = vals > threshold
        count = int(merge.sum())  # host read-back, per image
        total += count
        if count:
            pushed = ((1.0 + alpha) * x[f].float() - alpha * matched.float()).to(x.dtype)
            rows.append(torch.where(merge.unsqueeze(-1), pushed, x[f]))
        else:
            rows.append(x[f])
    if total == 0:
        return x, 0
    return torch.stack(rows, dim=0), total


def old_merge_chunks(x, n_chunks, alpha, threshold, matching, budget_bytes):
    outs, total = [], 0
    for chunk in x.chunk(n_chunks, dim=0):
        out, count = old_merge_group(chunk, alpha, threshold, matching, budget_bytes)
        outs.append(out)
        total += count
    return (x, 0) if total == 0 else (torch.cat(outs, dim=0), total)


# ----------------------------------------------------------------------------------------------
# Hooks as the node runs them
# ----------------------------------------------------------------------------------------------
def make_hooks(params, txt: int | None, n_chunks: int = 2):
    budget, alpha, tau, matching = params.budget_bytes, params.alpha, params.threshold, params.matching

    def identity(out):
        return out

    def old(out):
        counts = []
        if txt is None:
            merged, n = old_merge_chunks(out, n_chunks, alpha, tau, matching, budget)
            if n:  # the node's per-layer bookkeeping (Python ints)
                counts.append(n)
            return merged
        img = out[:, txt:]
        merged, n = old_merge_chunks(img, n_chunks, alpha, tau, matching, budget)
        if n:
            counts.append(n)
        return out if merged is img else torch.cat([out[:, :txt], merged], dim=1)

    def new(out, similarity=params.similarity):
        pending = []
        if txt is None:
            merged, n = K.merge_batch(out, n_chunks, alpha, tau, matching, None, budget, similarity)
            pending.append(n)  # device tensor, read once per run
            return merged
        result = torch.empty_like(out)
        img = out[:, txt:]
        merged, n = K.merge_batch(img, n_chunks, alpha, tau, matching, None, budget, similarity,
                                  out=result[:, txt:])
        pending.append(n)
        result[:, :txt] = out[:, :txt]
        return result

    return {"identity": identity, "old (per image, syncs)": old, "new (fp32 sims)": new,
            "new (similarity=model)": lambda out: new(out, "model")}


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_layers(layer, hooks: dict, x, iters: int, warmup: int, rounds: int, device) -> dict:
    """Median over `rounds` of the mean ms per call of hook(layer(x)), calls queued back to back with one
    synchronisation per round; the hooks take turns each round, so machine noise hits them alike."""
    samples = {k: [] for k in hooks}
    with torch.inference_mode():
        for hook in hooks.values():
            for _ in range(warmup):
                hook(layer(x))
        sync(device)
        for _ in range(rounds):
            for k, hook in hooks.items():
                start = time.perf_counter()
                for _ in range(iters):
                    hook(layer(x))
                sync(device)
                samples[k].append((time.perf_counter() - start) * 1000.0 / iters)
    return {k: sorted(v)[len(v) // 2] for k, v in samples.items()}


def features(n_rows: int, tokens: int, dim: int, txt: int | None, dtype, device, seed: int = 0):
    """Layer inputs whose images share structure (as a batch sampled from one prompt does), so tokens match."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    length = tokens + (txt or 0)
    shared = torch.randn(1, length, dim, generator=g)
    x = 0.75 * shared + 0.5 * torch.randn(n_rows, length, dim, generator=g)
    return x.to(device=device, dtype=dtype)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tiny", action="store_true", help="small shapes (CPU runs)")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--iters", type=int, default=None, help="calls per timing (default 10 GPU, 2 CPU)")
    parser.add_argument("--rounds", type=int, default=5, help="timings per row; the median is reported")
    parser.add_argument("--threads", type=int, default=1,
                        help="CPU threads for a CPU run (default 1: stable figures on a shared machine)")
    parser.add_argument("--matching", default=None, choices=K.MATCHINGS, help="default: the pack default")
    parser.add_argument("--threshold", type=float, default=None, help="default: the pack default")
    args = parser.parse_args(argv)

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    params = K.NegToMeParams()
    changes = {k: v for k, v in (("matching", args.matching), ("threshold", args.threshold)) if v is not None}
    params = params.replace(**changes)
    shapes = TINY_SHAPES if args.tiny else SHAPES
    if device.type == "cpu" and not args.tiny:
        emit("note: full-size shapes on the CPU are slow; use --tiny for a quick CPU run")
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    iters = args.iters or (10 if device.type == "cuda" else 2)
    warmup = 3 if device.type == "cuda" else 1
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    emit(f"NegToMe per-layer overhead on {name} (torch {torch.__version__}); matching={params.matching}, "
          f"threshold={params.threshold}, alpha={params.alpha}, budget={params.budget_mb:g} MiB; 8 rows = 4 images "
          f"x 2 CFG chunks; median of {args.rounds} timings of {iters} calls")
    summary = []
    for label, tokens, dim, txt, dtype, calls in shapes:
        if device.type == "cpu":
            dtype = torch.float32  # half-precision matmuls are not what a CPU run would use
        x = features(8, tokens, dim, txt, dtype, device)
        weight = (torch.randn(dim, dim, generator=torch.Generator().manual_seed(1)) / dim ** 0.5).to(device, dtype)

        def layer(t, w=weight):
            return torch.nn.functional.linear(t, w) + t  # stand-in: output projection keeping the features alike

        hooks = make_hooks(params, txt)
        with torch.inference_mode():
            y = layer(x)
            old_out = hooks["old (per image, syncs)"](y)
            new_out = hooks["new (fp32 sims)"](y)
            img = y if txt is None else y[:, txt:]
            _, merged = K.merge_batch(img, 2, params.alpha, params.threshold, params.matching, None,
                                      params.budget_bytes)
            merged = int(merged)
            same = torch.equal(old_out, new_out)
            diff = float((old_out.float() - new_out.float()).abs().max())
        times = time_layers(layer, hooks, x, iters, warmup, args.rounds, device)
        base = times["identity"]
        emit(f"\n{label}: x {tuple(x.shape)} {str(dtype).replace('torch.', '')}, {merged} tokens merged per call; "
              f"old == new: {same} (max |diff| {diff:.3g})")
        for k, ms in times.items():
            extra = "" if k == "identity" else f"   overhead {ms - base:8.3f} ms  ({ms / base:5.2f}x layer)"
            emit(f"  {k:26s} {ms:9.3f} ms/call{extra}")
        summary.append((label, calls, times["old (per image, syncs)"] - base, times["new (fp32 sims)"] - base,
                        times["new (similarity=model)"] - base))
    emit("\nPer active step (layer calls x overhead), ms:   old   new(fp32)   new(model)")
    for label, calls, old_ms, new_ms, model_ms in summary:
        emit(f"  {label:22s} x{calls:3d}  {calls * old_ms:9.2f} {calls * new_ms:9.2f} {calls * model_ms:9.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
