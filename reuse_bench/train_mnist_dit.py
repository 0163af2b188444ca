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

import json
from pathlib import Path

import torch
import torch.nn.functional as F

from . import builtin_dit as bd
from .training import seed, train, training_parser


def parse_args(argv=None):
    p = training_parser(
        __doc__.splitlines()[0],
        steps=2000,
        batch=32,
        lr=1e-3,
        ema=0.998,
        out=bd.ASSETS,
        checkpoint=Path("bench_out/train_checkpoints/mnist_dit.pt"),
    )
    p.add_argument("--eval-per-class", type=int, default=10, help="samples per class for the recorded accuracy")
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    seed(args)
    transformer, conditioning = bd.build_transformer(), bd.ClassConditioning()

    def batch_loss(x0, y, gen):
        s = torch.sigmoid(torch.randn(args.batch, generator=gen))
        noise = torch.randn(x0.shape, generator=gen)
        xs = (1 - s.view(-1, 1, 1, 1)) * x0 + s.view(-1, 1, 1, 1) * noise
        text, pooled = conditioning(y)
        return F.mse_loss(bd.packed_velocity(transformer, bd.pack(xs), s, text, pooled), bd.pack(noise - x0))

    trained = train(args, {"transformer": transformer, "conditioning": conditioning}, bd.NULL_CLASS, batch_loss)
    from safetensors.torch import save_file

    from .digit_classifier import load_classifier
    from .evaluate_dit import class_accuracy

    weights = args.out / bd.WEIGHTS_PATH.name
    save_file(bd.state_dict_for_saving(trained.ema["transformer"], trained.ema["conditioning"]), str(weights))
    model = bd.load_builtin_dit(weights)  # the fp16 weights as shipped
    accuracy = class_accuracy(model, load_classifier(), args.eval_per_class, bd.DEFAULT_STEPS)
    trained.log(f"classifier agreement at full compute: {json.dumps(accuracy)}")
    record = {
        "transformer_config": bd.TRANSFORMER_CONFIG,
        "conditioning": {
            "num_classes": bd.NUM_CLASSES,
            "null_class": bd.NULL_CLASS,
            "text_tokens": bd.TEXT_TOKENS,
            "joint_attention_dim": bd.JOINT_DIM,
            "pooled_projection_dim": bd.POOLED_DIM,
        },
        "parameters": trained.parameters,
        "training": trained.record(
            args,
            argv,
            "train_mnist_dit",
            sigma_sampling="logit-normal(0, 1)",
            first_loss=trained.loss_log[0][1] if trained.loss_log else None,
        ),
        "full_compute_class_accuracy": accuracy,
    }
    (args.out / bd.CONFIG_PATH.name).write_text(json.dumps(record, indent=1))
    trained.log(f"saved {weights} after {trained.steps} steps, {trained.wall_s:.0f}s")


if __name__ == "__main__":
    main()
