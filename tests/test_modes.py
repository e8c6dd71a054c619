"""StackedMNIST: the prepare source and the mode-coverage measurement of `ganpipe bench modes`."""

import math

import numpy as np
import torch

from pipeline.data.sources import parse_source
from pipeline.metrics.mnist_net import load_mnist_net
from pipeline.metrics.modes import classify_channels, kl_to_uniform, mode_counts, summary


def test_stackedmnist_source_stacks_three_labelled_digits():
    src = parse_source("stackedmnist:300")
    mnist = parse_source("mnist")
    digits = {bytes(img[..., 0].tobytes()): label for _, img, label in mnist.items}
    assert (src.channels, src.resolution, len(src.classes), len(src.items)) == (3, 28, 1000, 300)
    for _, img, label in src.items[:50]:
        assert img.shape == (28, 28, 3) and img.dtype == np.uint8
        # Every channel is a bundled digit, and the label spells the three digits' classes.
        channel_labels = [digits[bytes(np.ascontiguousarray(img[..., c]).tobytes())] for c in range(3)]
        assert label == 100 * channel_labels[0] + 10 * channel_labels[1] + channel_labels[2]
    assert len({label for _, _, label in src.items}) > 250          # random triples, not a few modes
    again = parse_source("stackedmnist:300")
    assert all(np.array_equal(a[1], b[1]) for a, b in zip(src.items, again.items))   # seeded draw


def test_classifier_reads_real_stacked_digits():
    net = load_mnist_net()[0]
    items = parse_source("stackedmnist:400").items
    x = torch.from_numpy(np.stack([img for _, img, _ in items])).permute(0, 3, 1, 2).float() / 127.5 - 1
    with torch.no_grad():
        modes = classify_channels(x, net).numpy()
    assert (modes == np.array([label for _, _, label in items])).mean() > 0.9


def test_kl_and_summary_against_hand_formula():
    counts = np.array([5, 0, 3, 2])
    p = np.array([0.5, 0.3, 0.2])
    assert math.isclose(kl_to_uniform(counts), float((p * np.log(p * 4)).sum()), rel_tol=1e-12)
    assert kl_to_uniform(np.full(1000, 7)) == 0.0
    one = np.zeros(1000, dtype=np.int64)
    one[123] = 50
    s = summary(one)
    assert s["modes"] == 1 and math.isclose(s["kl_to_uniform"], math.log(1000), abs_tol=1e-4) and s["max_share"] == 1
    # A single mode is all favouritism: each channel always shows one digit (log 10 each), and
    # the channels, being constant, carry no dependence.
    assert all(math.isclose(k, math.log(10), abs_tol=1e-4) for k in s["channel_kl"])
    assert math.isclose(s["dependence_kl"], 0.0, abs_tol=1e-3)
    # Even digits in every channel, but blue always repeats red: all the KL is dependence, log 10.
    tied = np.zeros((10, 10, 10), dtype=np.int64)
    for r in range(10):
        tied[r, :, r] = 3
    s = summary(tied.reshape(-1))
    assert s["channel_kl"] == [0.0, 0.0, 0.0] and math.isclose(s["dependence_kl"], math.log(10), abs_tol=1e-4)
    # Red favours digit 0 (half the images), independently of green and blue: all of it is red's.
    red = np.array([9] + [1] * 9, dtype=np.int64)
    s = summary((red[:, None, None] * np.ones((1, 10, 10), dtype=np.int64)).reshape(-1))
    assert s["channel_kl"][0] > 0.3 and s["channel_kl"][1:] == [0.0, 0.0] and abs(s["dependence_kl"]) < 1e-4
    assert math.isclose(s["kl_to_uniform"], kl_to_uniform(red), abs_tol=1e-4)


class _OneImage(torch.nn.Module):
    """A collapsed 'generator': every latent gives the same stacked image."""
    z_dim, num_classes, resolution, channels = 4, 0, 28, 3

    def __init__(self, image):
        super().__init__()
        self.register_buffer("image", image)
        self.w = torch.nn.Parameter(torch.zeros(()))

    def noise_shapes(self):
        return []

    def forward(self, z, labels=None, noise=None):
        return self.image.expand(len(z), -1, -1, -1) + 0 * self.w


def test_collapsed_generator_covers_one_mode():
    _, img, label = parse_source("stackedmnist:1").items[0]
    G = _OneImage(torch.from_numpy(img).permute(2, 0, 1).float()[None] / 127.5 - 1)
    counts = mode_counts(G, num=100, seed=0)
    assert counts.sum() == 100 and (counts > 0).sum() == 1 and counts.argmax() == label


def test_bench_modes_runs_configs_side_by_side():
    """The benchmark command end to end at toy size: real train subprocesses, a loss variant by `@`."""
    from pipeline import cli
    from pipeline.bench import modes as bench

    argv = ["bench", "modes", "--configs", "configs/stackedmnist_dcgan.yaml",
            "configs/stackedmnist_dcgan.yaml@loss.name=hinge", "--kimg", "0.128", "--num-gen", "64",
            "--data-size", "256", "--threads", "1",
            "--set", "data.num_workers=1", "model.g_width=0.125", "model.d_width=0.125"]
    out = bench.run(cli.build_parser(argv).parse_args(argv))
    assert set(out["results"]) == {"real_stackedmnist", "stackedmnist_dcgan", "stackedmnist_dcgan@loss.name=hinge"}
    for r in out["results"].values():
        assert r["samples"] == 64 and 1 <= r["modes"] <= 64
