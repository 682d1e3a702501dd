"""NegToMe per-layer cost against the released maths: `python benchmarks/negtome_overhead.py [--tiny] [--json F]`.

Times the pack's kernel (`merge_batch`, as the node calls it: no host read-back, the result written into the
output buffer) with each similarity setting (`model`, the default; `fp32`; `checked`) against the plain released
maths (the official `negtome()` function's arithmetic in the model dtype: normalise, the whole (F, N, N)
similarity, max over dim -2, gather, extrapolate; applied per CFG chunk as the pipelines do), at the shapes NegToMe
meets in a 1024x1024 batch-4 run, and prints one table with the ratios (target: the default within 1.2x of the
released maths):

* 4x1024x1280: SDXL output blocks 0-2 (32x32 grid; 60 layer calls per active step), fp16/bf16;
* 4x4096x640: SDXL output blocks 3-5 (64x64 grid; 12 calls per active step);
* 4x4096x3072: Flux-dev double/single blocks (57 calls per active step), bf16.

Each shape is timed for one CFG chunk (4 images) and for a whole call (8 rows = 4 images x cond/uncond). Calls
are queued back to back and synchronised once per timing, the settings take turns each round (median reported).
It also reports how many tokens each setting merges and how many differ from fp32 matching, and the largest
similarity block each allocates (the budget is 64 MiB). Uses CUDA when available, else the CPU (`--tiny` shrinks
the shapes; on a CPU the model dtype is fp32, where all settings are the same maths). Needs no ComfyUI.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import host  # noqa: E402  (tests/host.py: loads the pack without ComfyUI)

K = host.pack_module("kernels.negtome")

# name, images, tokens, features, dtype, layer calls per active step (1024x1024, batch 4, pack defaults)
SHAPES = [
    ("sdxl out0-2 32x32", 4, 1024, 1280, torch.bfloat16, 60),
    ("sdxl out3-5 64x64", 4, 4096, 640, torch.bfloat16, 12),
    ("flux block 64x64", 4, 4096, 3072, torch.bfloat16, 57),
]
TINY_SHAPES = [
    ("tiny 16x16", 4, 256, 64, torch.float32, 60),
    ("tiny 32x32", 4, 1024, 32, torch.float32, 12),
    ("tiny 32x32 wide", 4, 1024, 96, torch.float32, 57),
]
SETTINGS = tuple(sorted(K.SIMILARITIES, key=lambda s: s != K.NegToMeParams().similarity))  # the default first


def emit(text: str = "") -> None:
    """Results go to stdout (the pack uses logging, never print)."""
    sys.stdout.write(text + "\n")


def released_negtome(x: torch.Tensor, alpha: float, tau: float) -> torch.Tensor:
    """The released negtome() maths on one group (F, N, D), in x's dtype (image 0 is the reference)."""
    xn = torch.nn.functional.normalize(x, dim=-1)
    s = xn @ xn[0].transpose(0, 1)  # (F, N, N)
    v, i = s.max(dim=-2)
    r = x[0][i]
    return torch.where((v > tau).unsqueeze(-1), (1 + alpha) * x - alpha * r, x)


def released_call(x: torch.Tensor, n_chunks: int, alpha: float, tau: float) -> torch.Tensor:
    return torch.cat([released_negtome(c, alpha, tau) for c in x.chunk(n_chunks)])


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_rows(rows: dict, iters: int, warmup: int, rounds: int, device) -> dict:
    """Median over `rounds` of the mean ms per call of each row's function; rows take turns each round."""
    samples = {k: [] for k in rows}
    with torch.inference_mode():
        for fn in rows.values():
            for _ in range(warmup):
                fn()
        sync(device)
        for r in range(rounds):
            order = list(rows.items())
            order = order[r % len(order):] + order[:r % len(order)]  # rotated order
            for k, fn in order:
                start = time.perf_counter()
                for _ in range(iters):
                    fn()
                sync(device)
                samples[k].append((time.perf_counter() - start) * 1000.0 / iters)
    return {k: sorted(v)[len(v) // 2] for k, v in samples.items()}


def features(n_rows: int, tokens: int, dim: int, dtype, device, seed: int = 0) -> torch.Tensor:
    """Layer outputs whose images share structure (as a batch sampled from one prompt does), so tokens match."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    shared = torch.randn(1, tokens, dim, generator=g)
    x = 0.75 * shared + 0.5 * torch.randn(n_rows, tokens, dim, generator=g)
    return x.to(device=device, dtype=dtype)


def largest_block(fn) -> int:
    """Bytes of the largest similarity block `fn` allocates (through the kernel's block function)."""
    seen = [0]
    original = K._similarity_block

    def spy(a, b):
        out = original(a, b)
        seen[0] = max(seen[0], out.numel() * out.element_size())
        return out

    K._similarity_block = spy
    try:
        fn()
    finally:
        K._similarity_block = original
    return seen[0]


def run(args) -> dict:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    params = K.NegToMeParams()
    alpha, tau, budget = params.alpha, args.threshold, params.budget_bytes
    shapes = TINY_SHAPES if args.tiny else SHAPES
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
        if not args.tiny:
            emit("note: full-size shapes on the CPU are slow; use --tiny for a quick CPU run")
    iters = args.iters or (20 if device.type == "cuda" else 2)
    warmup = 3 if device.type == "cuda" else 1
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    emit(f"NegToMe per-layer cost on {name} (torch {torch.__version__}); matching official, alpha {alpha}, "
         f"threshold {tau}, budget {params.budget_mb:g} MiB; median of {args.rounds} rotated timings of {iters} "
         "calls")
    emit("")
    emit("| shape | rows | setting | ms/call | / released | tokens merged | differ from fp32 | largest block (MiB) |")
    emit("|---|---|---|---|---|---|---|---|")
    results = []
    for label, images, tokens, dim, dtype, calls in shapes:
        if device.type == "cpu":
            dtype = torch.float32  # half-precision matmuls are not what a CPU run would use
        for n_chunks in (1, 2):
            x = features(images * n_chunks, tokens, dim, dtype, device)
            out = torch.empty_like(x)
            rows = {"released maths": lambda x=x, c=n_chunks: released_call(x, c, alpha, tau)}
            for setting in SETTINGS:
                rows[setting] = (lambda x=x, c=n_chunks, s=setting:
                                 K.merge_batch(x, c, alpha, tau, "official", None, budget, s, out=out))
            sources = (torch.arange(images * n_chunks, device=device) % images) != 0  # image 0 never changes

            def changed(a, b):  # tokens of the source images that differ
                return int((a != b).any(dim=-1)[sources].sum())

            with torch.inference_mode():
                exact, _ = K.merge_batch(x, n_chunks, alpha, tau, "official", None, budget, "fp32")
                exact = exact.clone()
                info = {}
                for setting in SETTINGS:
                    got, count = K.merge_batch(x, n_chunks, alpha, tau, "official", None, budget, setting)
                    info[setting] = (int(count), changed(got, exact), largest_block(rows[setting]) / 2 ** 20)
                released = released_call(x, n_chunks, alpha, tau)
                info["released maths"] = (changed(released, x), changed(released, exact),
                                          images * tokens * tokens * x.element_size() / 2 ** 20)
            times = time_rows(rows, iters, warmup, args.rounds, device)
            base = times["released maths"]
            shape = f"{images}x{tokens}x{dim} {str(dtype).replace('torch.', '')}"
            for setting, ms in times.items():
                merged, differ, block = info[setting]
                emit(f"| {label} {shape} | {images * n_chunks} | {setting} | {ms:.3f} | {ms / base:.2f} | {merged} | "
                     f"{differ} | {block:.0f} |")
                results.append(dict(shape=label, images=images, tokens=tokens, dim=dim, dtype=str(dtype),
                                    rows=images * n_chunks,
                                    setting=setting, ms=ms, ratio=ms / base, merged=merged, differ_from_fp32=differ,
                                    largest_block_mib=block, calls_per_active_step=calls))
    emit("")
    emit("Per active step (layer calls x ms of a whole 8-row call), ms:")
    for label, _, _, _, _, calls in shapes:
        per = {r["setting"]: r["ms"] * calls for r in results if r["shape"] == label and r["rows"] == 8}
        emit(f"  {label:22s} x{calls:3d}  " + "  ".join(f"{k} {v:8.2f}" for k, v in per.items()))
    worst = max((r["ratio"] for r in results if r["setting"] == params.similarity), default=float("nan"))
    emit(f"\nDefault ({params.similarity}) at most {worst:.2f}x the released maths (target <= 1.2x on a GPU).")
    return dict(device=name, torch=torch.__version__, alpha=alpha, threshold=tau, budget_mb=params.budget_mb,
                default_similarity=params.similarity, rows=results, worst_default_ratio=worst)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tiny", action="store_true", help="small shapes (CPU runs)")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--iters", type=int, default=None, help="calls per timing (default 20 GPU, 2 CPU)")
    parser.add_argument("--rounds", type=int, default=5, help="timings per row; the median is reported")
    parser.add_argument("--threads", type=int, default=1,
                        help="CPU threads for a CPU run (default 1: stable figures on a shared machine)")
    parser.add_argument("--threshold", type=float, default=K.NegToMeParams().threshold)
    parser.add_argument("--json", default=None, help="also write the rows to this JSON file")
    args = parser.parse_args(argv)
    result = run(args)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
