"""Train the digit classifier: ``python -m reuse_bench.train_classifier`` (fixed seed, a few minutes on CPU).

Same 4500 training digits as the diffusion model (``mnist_data.split``), random shifts of up to two pixels;
accuracy is measured on the 500 held-out digits and stored in ``assets/digit_classifier.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch
import torch.nn.functional as F

from .digit_classifier import RECORD_PATH, WEIGHTS_PATH, DigitClassifier
from .mnist_data import load_mnist_5k, shifted, split, to_model_range


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=12)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)

    images, labels = load_mnist_5k()
    train_idx, held_idx = split(labels)
    x_train, y_train = to_model_range(images[train_idx]), torch.from_numpy(labels[train_idx])
    x_held, y_held = to_model_range(images[held_idx]), torch.from_numpy(labels[held_idx])

    model = DigitClassifier()
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, args.lr, total_steps=args.epochs * (len(x_train) // args.batch))
    t0 = time.time()
    for epoch in range(args.epochs):
        model.train()
        order = torch.randperm(len(x_train), generator=gen)
        for i in range(len(x_train) // args.batch):
            idx = order[i * args.batch : (i + 1) * args.batch]
            loss = F.cross_entropy(model(shifted(x_train[idx], gen)), y_train[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        model.eval()
        acc = (model.predict(x_held) == y_held).float().mean().item()
        print(f"epoch {epoch + 1}/{args.epochs} loss {loss.item():.4f} held-out accuracy {acc:.4f}", flush=True)

    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(WEIGHTS_PATH))
    record = {
        "held_out_accuracy": round(acc, 4),
        "held_out_images": len(x_held),
        "training_images": len(x_train),
        "command": "python -m reuse_bench.train_classifier " + " ".join(sys.argv[1:] if argv is None else argv),
        "seed": args.seed,
        "epochs": args.epochs,
        "batch": args.batch,
        "lr": args.lr,
        "wall_time_s": round(time.time() - t0, 1),
        "torch": torch.__version__,
    }
    RECORD_PATH.write_text(json.dumps(record, indent=1))
    print(f"saved {WEIGHTS_PATH}; held-out accuracy {acc:.4f}")


if __name__ == "__main__":
    main()
