"""Train the evaluation model (seeded): `python benchmarks/train.py` rewrites benchmarks/weights/.

Class-conditional EPS training on scikit-learn's 8x8 digits with 15% condition dropout, AdamW with cosine
decay, EMA weights saved (fp16). The default step count finishes in well under 10 minutes on 2 CPU cores.
"""
from __future__ import annotations

import argparse
import copy
import logging
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _host  # noqa: E402

logger = logging.getLogger("tfg.benchmarks.train")

DEFAULTS = dict(steps=1600, batch=128, lr=1e-3, weight_decay=0.01, ema=0.999, dropout=0.15, seed=0, warmup=100)


def train(steps: int, batch: int, lr: float, weight_decay: float, ema: float, dropout: float, seed: int,
          warmup: int, out: Path, threads: int | None = None, log_every: int = 200) -> dict:
    import torch
    em = _host.host.pack_module("benchmarks.eval_model")
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)

    x_all, y_all = em.load_digits()
    base = em.build_base_model()
    net = base.diffusion_model
    em.init_weights(net, gen)
    net.train()
    sampling = base.model_sampling
    embeddings = torch.nn.Parameter(torch.randn(em.NUM_CLASSES + 1, em.CONTEXT_DIM, generator=gen))
    params = list(net.parameters()) + [embeddings]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    ema_net = copy.deepcopy(net).eval()
    ema_emb = embeddings.detach().clone()
    for p in ema_net.parameters():
        p.requires_grad_(False)

    n_train = x_all.shape[0]
    sigmas = sampling.sigmas.float()
    t0 = time.perf_counter()
    running = 0.0
    for step in range(steps):
        lr_now = lr * min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * step / steps))
        for group in opt.param_groups:
            group["lr"] = lr_now
        idx = torch.randint(0, n_train, (batch,), generator=gen)
        x0 = x_all[idx]
        # light augmentation would change the data distribution the metrics compare against: none
        labels = y_all[idx].clone()
        drop = torch.rand(batch, generator=gen) < dropout
        labels[drop] = em.NULL_CLASS
        t = torch.randint(0, sigmas.shape[0], (batch,), generator=gen)
        sigma = sigmas[t]
        noise = torch.randn(x0.shape, generator=gen)
        x_noisy = x0 + noise * sigma.view(-1, 1, 1, 1)
        xc = sampling.calculate_input(sigma, x_noisy)
        timestep = sampling.timestep(sigma).float()
        context = embeddings[labels].unsqueeze(1)
        eps = net(xc, timestep, context=context)
        loss = torch.nn.functional.mse_loss(eps, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        with torch.no_grad():
            decay = min(ema, (1 + step) / (10 + step))
            for pe, p in zip(ema_net.parameters(), net.parameters()):
                pe.mul_(decay).add_(p.detach(), alpha=1 - decay)
            ema_emb.mul_(decay).add_(embeddings.detach(), alpha=1 - decay)
        running = 0.98 * running + 0.02 * loss.item() if step else loss.item()
        if (step + 1) % log_every == 0 or step + 1 == steps:
            logger.info("step %d/%d loss %.4f lr %.2e %.1fs", step + 1, steps, running, lr_now,
                        time.perf_counter() - t0)

    seconds = time.perf_counter() - t0
    base.diffusion_model = ema_net
    meta = dict(steps=steps, batch=batch, lr=lr, weight_decay=weight_decay, ema=ema, dropout=dropout, seed=seed,
                final_loss=f"{running:.4f}", train_seconds=f"{seconds:.0f}", torch=torch.__version__)
    em.save_weights(base, ema_emb, out, meta)
    logger.info("saved %s (loss %.4f, %.0f s)", out, running, seconds)
    return meta


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for key, value in DEFAULTS.items():
        parser.add_argument(f"--{key.replace('_', '-')}", type=type(value), default=value)
    parser.add_argument("--out", type=Path, default=None, help="weights file (default: the committed one)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1: on a busy 2-core machine two threads ran 10-25x slower)")
    args = parser.parse_args(argv)
    _host.configure_logging()
    try:
        import sklearn  # noqa: F401
    except ImportError:
        raise SystemExit("benchmarks/train.py needs scikit-learn (the digits data set): pip install scikit-learn")
    _host.setup()
    em = _host.host.pack_module("benchmarks.eval_model")
    out = args.out or em.WEIGHTS
    kwargs = {k: getattr(args, k) for k in DEFAULTS}
    train(out=out, threads=args.threads, **kwargs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
