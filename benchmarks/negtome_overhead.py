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
similarity block each allocates (the budget is 64 MiB), and next to each timing the tensor ops one call
dispatches (`count_ops`): `launches` (ops that run a kernel: on a GPU at these sizes the per-call cost is mostly
one launch each), `ops` (every dispatcher call, views included: the host-side cost) and `syncs` (ops that read a
value back to the host or have a data-dependent shape; must be 0). Uses CUDA when available, else the CPU
(`--tiny` shrinks the shapes; on a CPU the model dtype is fp32, where all settings are the same maths).
`--ops-only` prints just the op counts at the full shapes (on the meta device: no memory, no maths; seconds on a
CPU); `--micro --clock thread` times very small fp32 and bf16 calls by CPU time, where the per-call host cost
dominates (a CPU proxy of launch-bound GPU calls). Needs no ComfyUI.
"""
from __future__ import annotations

import argparse
import collections
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

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
MICRO_SHAPES = [  # the per-call host cost dominates: a CPU proxy of the launch-bound GPU calls (dtype kept)
    ("micro", 4, 16, 8, torch.float32, 0),
    ("micro", 4, 16, 8, torch.bfloat16, 0),
    ("micro", 4, 64, 80, torch.float32, 0),
    ("micro", 4, 64, 80, torch.bfloat16, 0),
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


NO_KERNEL = frozenset({"_unsafe_view", "alias", "detach", "_reshape_alias", "lift_fresh", "empty", "empty_strided",
                       "empty_like", "new_empty", "new_empty_strided", "resize_"})
"""Ops that are not views by their schema but run no kernel (metadata, allocation)."""
SYNC_OPS = frozenset({"_local_scalar_dense", "item", "is_nonzero", "nonzero", "nonzero_static", "equal", "allclose",
                      "masked_select", "_unique", "_unique2", "unique_dim", "unique_consecutive", "bincount",
                      "repeat_interleave", "histc", "_assert_async", "tolist", "_nested_tensor_from_mask"})
"""Ops that read a value back to the host or whose output shape depends on the data (a device sync on a GPU)."""


@dataclass
class OpCount:
    """The tensor ops one call dispatched (seen below autograd, as they run: composite ops such as matmul are
    counted as the ops they decompose into)."""

    ops: int = 0
    """Every dispatcher call, views included (the host-side cost of a call)."""
    launches: int = 0
    """Ops that run a kernel (not views, not allocations): one GPU launch each."""
    syncs: int = 0
    """Ops that synchronise with the host: `SYNC_OPS`, and indexing with a bool mask (a hidden nonzero)."""
    by_name: collections.Counter = field(default_factory=collections.Counter)

    def brief(self) -> str:
        return f"{self.launches}/{self.ops}/{self.syncs}"


class _OpCounter(TorchDispatchMode):
    def __init__(self, count: OpCount):
        super().__init__()
        self.count = count

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        count = self.count
        count.ops += 1
        count.by_name[name] += 1
        if not func.is_view and name not in NO_KERNEL:
            count.launches += 1
        if name in SYNC_OPS or (name in ("index", "index_put", "index_put_", "_index_put_impl_") and any(
                isinstance(t, torch.Tensor) and t.dtype in (torch.bool, torch.uint8)
                for t in (args[1] if len(args) > 1 and isinstance(args[1], (list, tuple)) else ()))):
            count.syncs += 1
        return func(*args, **kwargs)


def count_ops(fn, warm: bool = True) -> OpCount:
    """The ops one call of `fn()` dispatches (under no_grad, so composite ops count as what they run), after one
    uncounted call when `warm` (per-shape constants are made once, as in a run)."""
    count = OpCount()
    with torch.no_grad():
        if warm:
            fn()
        with _OpCounter(count):
            fn()
    return count


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_rows(rows: dict, iters: int, warmup: int, rounds: int, device, clock=time.perf_counter) -> dict:
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
                start = clock()
                for _ in range(iters):
                    fn()
                sync(device)
                samples[k].append((clock() - start) * 1000.0 / iters)
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
    shapes = MICRO_SHAPES if args.micro else TINY_SHAPES if args.tiny else SHAPES
    clock = time.thread_time if args.clock == "thread" else time.perf_counter
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
        if not (args.tiny or args.micro):
            emit("note: full-size shapes on the CPU are slow; use --tiny for a quick CPU run")
    iters = args.iters or (20 if device.type == "cuda" else 2)
    warmup = 3 if device.type == "cuda" else 1
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    emit(f"NegToMe per-layer cost on {name} (torch {torch.__version__}); matching official, alpha {alpha}, "
         f"threshold {tau}, budget {params.budget_mb:g} MiB; median of {args.rounds} rotated timings of {iters} "
         "calls")
    emit("")
    emit("| shape | rows | setting | ms/call | / released | kernel launches / ops / syncs per call | tokens merged | "
         "differ from fp32 | largest block (MiB) |")
    emit("|---|---|---|---|---|---|---|---|---|")
    results = []
    for label, images, tokens, dim, dtype, calls in shapes:
        if device.type == "cpu" and not args.micro:
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
            counts = {k: count_ops(fn) for k, fn in rows.items()}
            times = time_rows(rows, iters, warmup, args.rounds, device, clock)
            base = times["released maths"]
            shape = f"{images}x{tokens}x{dim} {str(dtype).replace('torch.', '')}"
            for setting, ms in times.items():
                merged, differ, block = info[setting]
                ops = counts[setting]
                emit(f"| {label} {shape} | {images * n_chunks} | {setting} | {ms:.3f} | {ms / base:.2f} | "
                     f"{ops.brief()} | {merged} | {differ} | {block:.0f} |")
                results.append(dict(shape=label, images=images, tokens=tokens, dim=dim, dtype=str(dtype),
                                    rows=images * n_chunks,
                                    setting=setting, ms=ms, ratio=ms / base, merged=merged, differ_from_fp32=differ,
                                    largest_block_mib=block, calls_per_active_step=calls, launches=ops.launches,
                                    ops=ops.ops, syncs=ops.syncs))
    emit("")
    if any(shape[5] for shape in shapes):
        emit("Per active step (layer calls x ms of a whole 8-row call), ms:")
    for label, _, _, _, _, calls in (shape for shape in shapes if shape[5]):
        per = {r["setting"]: r["ms"] * calls for r in results if r["shape"] == label and r["rows"] == 8}
        emit(f"  {label:22s} x{calls:3d}  " + "  ".join(f"{k} {v:8.2f}" for k, v in per.items()))
    worst = max((r["ratio"] for r in results if r["setting"] == params.similarity), default=float("nan"))
    emit(f"\nDefault ({params.similarity}) at most {worst:.2f}x the released maths (target <= 1.2x on a GPU).")
    syncs = sum(r["syncs"] for r in results if r["setting"] != "released maths")
    emit(f"Host syncs in the pack's calls: {syncs} (target 0).")
    return dict(device=name, torch=torch.__version__, alpha=alpha, threshold=tau, budget_mb=params.budget_mb,
                default_similarity=params.similarity, rows=results, worst_default_ratio=worst)


def op_table(args) -> dict:
    """Op counts per layer call at the full shapes, on the meta device (no maths, no memory): the released maths
    against each similarity setting, one CFG chunk (4 rows) and a whole call (8 rows), bf16 and fp32 features."""
    params = K.NegToMeParams()
    alpha, tau, budget = params.alpha, args.threshold, params.budget_bytes
    emit(f"NegToMe ops per layer call (torch {torch.__version__}, meta device): kernel launches / dispatcher ops / "
         f"host syncs; matching official, budget {params.budget_mb:g} MiB")
    emit("")
    emit("| shape | rows | dtype | released maths | " + " | ".join(SETTINGS) + " |")
    emit("|---|---|---|---|" + "---|" * len(SETTINGS))
    rows = []
    for label, images, tokens, dim, _, _ in SHAPES:
        for dtype in (torch.bfloat16, torch.float32):
            for n_chunks in (1, 2):
                x = torch.empty(images * n_chunks, tokens, dim, dtype=dtype, device="meta")
                out = torch.empty_like(x)
                counts = {"released maths": count_ops(lambda: released_call(x, n_chunks, alpha, tau))}
                for setting in SETTINGS:
                    counts[setting] = count_ops(lambda s=setting: K.merge_batch(
                        x, n_chunks, alpha, tau, "official", None, budget, s, out=out))
                emit(f"| {label} {images}x{tokens}x{dim} | {images * n_chunks} | {str(dtype).replace('torch.', '')} | "
                     + " | ".join(c.brief() for c in counts.values()) + " |")
                rows.append(dict(shape=label, rows=images * n_chunks, dtype=str(dtype),
                                 **{k: dict(launches=c.launches, ops=c.ops, syncs=c.syncs) for k, c in counts.items()}))
    return dict(torch=torch.__version__, budget_mb=params.budget_mb, op_rows=rows)


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
    parser.add_argument("--micro", action="store_true",
                        help="very small shapes, fp32 and bf16 (CPU: the per-call host cost, a launch-bound proxy)")
    parser.add_argument("--clock", choices=("wall", "thread"), default="wall",
                        help="wall time (GPU runs), or this thread's CPU time (steadier on a shared CPU)")
    parser.add_argument("--ops-only", action="store_true",
                        help="only the op counts per call at the full shapes (meta device; fast on a CPU)")
    args = parser.parse_args(argv)
    result = op_table(args) if args.ops_only else run(args)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
