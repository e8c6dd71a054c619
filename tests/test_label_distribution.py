"""The classes of generated images (train.gen_labels, eval's --labels): drawn from the training
split's class counts by default (as StyleGAN2-ADA), uniform as a choice; training draws them with
the checkpointed RNG, eval by (seed, index) alone, and every record says which."""

from __future__ import annotations

import contextlib
import json
import shutil
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from conftest import cli
from pipeline import generate
from pipeline.catalog import from_dict, load_config
from pipeline.data.loader import ShardSet
from pipeline.errors import UserError
from pipeline.metrics.compare import _differences
from pipeline.metrics.records import protocol_key, read_records
from pipeline.networks import build_networks
from pipeline.rundir import RunDir
from pipeline.training import loop
from pipeline.training.ema import EMA
from pipeline.training.phases import MicroBatch, NonFiniteGuard, build_phases
from pipeline.training.run_config import resolve_run_config
from pipeline.training.snapshot import list_snapshots, load_snapshot
from pipeline.training.state import TrainState
from pipeline.training.stats import Stats

CPU = torch.device("cpu")
COUNTS = [180, 20]          # 90% / 10%
TINY = ["model.name=mlp", "model.conditional=true", "model.g_width=0.125", "model.d_width=0.125",
        "data.batch_size=16", "data.num_workers=0", "data.shuffle_buffer=50", "log.progress=false",
        "log.trackers=[]", "log.grid_size=4", "train.threads=1", "ema.halflife_kimg=0.1"]


@pytest.fixture(scope="module")
def skewed_dir(tmp_path_factory):
    """200 random 8x8 grey images, 180 of class 0 and 20 of class 1, in 2 shards."""
    from pipeline.data.prepare import prepare

    root = tmp_path_factory.mktemp("skewed")
    rng = np.random.default_rng(0)
    labels = rng.permutation(np.repeat([0, 1], COUNTS))
    np.savez(root / "src.npz", images=rng.integers(0, 256, (200, 8, 8, 1), dtype=np.uint8), labels=labels)
    prepare(f"npz:{root / 'src.npz'}", root / "data", shard_size=100, workers=1, progress=False)
    return root / "data"


def g_step_labels(cfg, classes, monkeypatch, n: int = 4000) -> torch.Tensor:
    """The labels one real `g_step` gives G's main phase (its accumulate and step spied on)."""
    torch.manual_seed(0)
    G, D = build_networks(cfg.model, resolution=8, channels=1, num_classes=2)
    phases = build_phases(cfg, G=G, D=D, device=CPU, dtype=None, report=lambda name, value: None)
    state = TrainState(G, D, EMA(G, 0.0), phases, NonFiniteGuard(10, lambda: "", lambda: 0.0))
    session = SimpleNamespace(per_proc=n, device=CPU, stats=Stats(CPU), autocast=contextlib.nullcontext)
    seen = []
    monkeypatch.setattr(loop, "accumulate", lambda phase, batches, autocast: seen.extend(b.labels for b in batches))
    monkeypatch.setattr(loop, "step", lambda phase, guard, report: torch.tensor(True))
    torch.manual_seed(3)
    loop.g_step(session, state, [MicroBatch(z=None, labels=None)], n, classes)
    return torch.cat(seen)


def test_g_steps_draw_classes_in_the_training_splits_proportions(skewed_dir, monkeypatch):
    cfg = from_dict({}, [*TINY, f"data.path={skewed_dir}"])
    assert cfg.train.gen_labels == "data"
    classes = loop.gen_labels(cfg, ShardSet.resolve(str(skewed_dir)))
    assert classes.kind == "data" and classes.weights == tuple(COUNTS) and "manifest.json" in classes.source
    drawn = g_step_labels(cfg, classes, monkeypatch)
    assert abs((drawn == 1).float().mean().item() - 0.1) < 0.02          # 4 standard deviations at n = 4000
    # uniform: today's draw, bit for bit (torch.randint from the same RNG state)
    uniform = from_dict({}, [*TINY, f"data.path={skewed_dir}", "train.gen_labels=uniform"])
    drawn = g_step_labels(uniform, loop.gen_labels(uniform, ShardSet.resolve(str(skewed_dir))), monkeypatch)
    torch.manual_seed(3)
    assert torch.equal(drawn, torch.randint(2, (4000,)))
    # A class the split lacks is never drawn; counts a manifest lacks are one line naming the remedy.
    torch.manual_seed(0)
    assert set(generate.LabelDistribution("data", 3, (9, 0, 1)).draw(5000, CPU).tolist()) == {0, 2}
    old = skewed_dir.parent / "old"
    shutil.copytree(skewed_dir, old, dirs_exist_ok=True)
    manifest = json.loads((old / "manifest.json").read_text())
    del manifest["splits"]["train"]["class_counts"]
    (old / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(UserError, match=r"train.gen_labels=data .* has no counts .* set train.gen_labels=uniform"):
        generate.data_labels(old, "train", 2)


def test_eval_labels_follow_the_data_by_seed_and_index_alone(skewed_dir):
    classes = generate.LabelDistribution("data", 2, tuple(COUNTS), "test")
    labels = classes.of_images(seed=5, start=0, count=20000)
    assert abs((labels == 1).float().mean().item() - 0.1) < 0.01
    assert torch.equal(classes.of_images(5, 137, 400), labels[137:537])          # any range, same classes
    assert not torch.equal(classes.of_images(6, 0, 200), labels[:200])             # another seed, others
    zero = generate.LabelDistribution("data", 3, (9, 0, 1)).of_images(0, 0, 5000)
    assert set(zero.tolist()) == {0, 2}
    assert torch.equal(generate.LabelDistribution("uniform", 2).of_images(0, 3, 9), torch.arange(3, 12) % 2)
    # What G is given in generate.images: the same whatever the batch, i % C without a distribution.
    torch.manual_seed(0)
    G, _ = build_networks(from_dict({}, TINY).model, resolution=8, channels=1, num_classes=2)
    seen = []
    forward = G.forward
    G.forward = lambda z, c, **kw: (seen.append(c.clone()), forward(z, c, **kw))[1]
    for batch in (3, 7):
        generate.images(G, seed=5, start=0, count=100, batch=batch, classes=classes)
    assert torch.equal(torch.cat(seen[:len(seen) // 2])[:100], labels[:100])
    assert torch.equal(torch.cat(seen[len(seen) // 2:])[:100], labels[:100])
    seen.clear()
    generate.images(G, seed=5, count=20)
    assert torch.equal(torch.cat(seen)[:20], torch.arange(20) % 2)


def train(cfg_overrides: list[str], run):
    """`ganpipe train` in this process: the run's recorded config (resuming) or a new one."""
    cfg = resolve_run_config(None if RunDir(run).config.is_file() else "configs/mnist_dcgan.yaml", run, cfg_overrides)
    assert loop.training_loop(cfg, run) == 0
    return cfg


def final_state(run) -> dict:
    from pipeline.training.checkpoint import list_checkpoints

    return torch.load(list_checkpoints(run)[-1] / "state.pt", weights_only=True)


def test_the_choice_survives_resume_exactly_and_eval_records_which(tmp_path, skewed_dir):
    common = [*TINY, f"data.path={skewed_dir}", "train.tick_kimg=0.032", "train.checkpoint_kimg=0.032",
              "train.snapshot_kimg=0.032"]
    train([*common, "train.total_kimg=0.064"], tmp_path / "straight")
    train([*common, "train.total_kimg=0.032"], tmp_path / "split")
    with pytest.raises(UserError, match="train.gen_labels"):
        resolve_run_config(None, tmp_path / "split", ["train.gen_labels=uniform"])
    assert train(["train.total_kimg=0.064"], tmp_path / "split").train.gen_labels == "data"
    a, b = final_state(tmp_path / "straight"), final_state(tmp_path / "split")
    assert all(torch.equal(v, b["G"][k]) for k, v in a["G"].items())
    run = tmp_path / "split"
    snaps = list_snapshots(RunDir(run).snapshots)
    assert len(snaps) == 2
    for snap in snaps:
        _, meta = load_snapshot(snap)
        assert meta["labels"]["kind"] == "data" and meta["labels"]["weights"] == COUNTS

    # Eval draws what the snapshots record; the batch changes nothing; uniform is another series.
    score = ["eval", "--run-dir", str(run), "--snapshot", "latest", "--extractor", "mnist", "--num-gen", "64",
             "--metrics", "fid"]
    cli(*score, "--batch-size", "3")
    cli(*score, "--batch-size", "7")
    cli(*score, "--labels", "uniform")
    data3, data7, uniform = read_records(run)
    assert data3["value"] == data7["value"] and protocol_key(data3) == protocol_key(data7)
    assert data3["labels"].startswith("data (drawn per image from the class weights of split 'train'")
    assert data3["label_weights"] == COUNTS
    assert uniform["labels"] == generate.BALANCED and "label_weights" not in uniform
    assert protocol_key(uniform) != protocol_key(data3)
    assert _differences(data3, uniform).startswith("labels data ")       # `ganpipe compare` names the field
    # A uniform score keys as every score before the choice existed (they were all i % num_classes).
    old = {k: v for k, v in uniform.items() if k != "labels"}
    assert protocol_key(old) == protocol_key(uniform)
    with pytest.raises(AssertionError, match="--labels"):
        cli(*score, "--labels", "balanced")
    assert load_config(RunDir(run).config).train.gen_labels == "data"


def test_a_run_recorded_before_gen_labels_keeps_drawing_uniformly(tmp_path):
    """RUN/config.yaml is a full dump: one without train.gen_labels was trained with uniform classes,
    and resuming it (with or without --config) or scoring it by default must go on so."""
    import yaml

    from pipeline.catalog import from_dict, load_recorded
    from pipeline.errors import UserError
    from pipeline.config import config_yaml
    from pipeline.rundir import RunDir
    from pipeline.training.run_config import resolve_run_config

    root = tmp_path / "run"
    root.mkdir()
    run = RunDir(root)
    recorded = yaml.safe_load(config_yaml(from_dict({"model": {"conditional": True}})))
    del recorded["train"]["gen_labels"]
    run.config.write_text(yaml.safe_dump(recorded))
    config = tmp_path / "c.yaml"
    config.write_text("model: {conditional: true}\n")
    assert load_recorded(run.config).train.gen_labels == "uniform"
    assert resolve_run_config(None, root, []).train.gen_labels == "uniform"
    assert resolve_run_config(str(config), root, []).train.gen_labels == "uniform"
    with pytest.raises(UserError, match=r"train\.gen_labels: 'uniform' there, 'data' now"):
        resolve_run_config(str(config), root, ["train.gen_labels=data"])
    recorded["train"]["gen_labels"] = "data"                 # recorded after the field: its value stands
    run.config.write_text(yaml.safe_dump(recorded))
    assert resolve_run_config(str(config), root, []).train.gen_labels == "data"


def test_a_run_recorded_with_cudnn_autotuning_resumes_under_the_new_default(tmp_path):
    """speed.cudnn_benchmark's default went from on to off (until gpu-check measures it): a run whose
    config.yaml recorded it on resumes with the same --config, as the speed levers change no result."""
    from pipeline.catalog import from_dict
    from pipeline.config import config_yaml
    from pipeline.rundir import RunDir
    from pipeline.training.run_config import resolve_run_config

    root = tmp_path / "run"
    root.mkdir()
    RunDir(root).config.write_text(config_yaml(from_dict({}, ["speed.cudnn_benchmark=true"])))
    config = tmp_path / "c.yaml"
    config.write_text("data: {batch_size: 64}\n")
    assert resolve_run_config(str(config), root, []).speed.cudnn_benchmark is False
