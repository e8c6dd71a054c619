"""Config: YAML deltas over typed defaults, dotted overrides, errors that name the key."""

from __future__ import annotations

import pytest

from conftest import cli
from pipeline.catalog import load_config
from pipeline.config import ConfigError, config_hash, diff_configs, dump_config


def test_defaults_yaml_and_overrides_compose(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("seed: 3\ndata:\n  batch_size: 16\n  hflip: true\n")
    cfg = load_config(f, ["data.batch_size=32", "data.max_bad_fraction=0"])
    assert (cfg.seed, cfg.data.batch_size, cfg.data.hflip, cfg.data.num_workers) == (3, 32, True, -1)
    assert cfg.data.max_bad_fraction == 0.0 and isinstance(cfg.data.max_bad_fraction, float)
    dump_config(cfg, tmp_path / "resolved.yaml")
    again = load_config(tmp_path / "resolved.yaml")
    assert again == cfg and config_hash(again) == config_hash(cfg)
    assert diff_configs(cfg, load_config(None)) == ["data.batch_size", "data.hflip", "data.max_bad_fraction", "seed"]


@pytest.mark.parametrize("override, message", [
    ("data.batch_sise=3", "unknown config key 'data.batch_sise'; did you mean 'batch_size'? allowed keys here: batch_size"),
    ("dta.path=x", "unknown config key 'dta'; did you mean 'data'? allowed keys here: augment, data"),
    ("data.batch_size=ten", "data.batch_size: expected int, got 'ten'"),
    ("data.hflip=1", "data.hflip: expected bool"),
    ("data.batch_size=0", "data.batch_size: 0 is below the minimum 1"),
    ("data.max_bad_fraction=1.5", "data.max_bad_fraction: 1.5 is above the maximum 1.0"),
    ("data.channels=2", "data.channels: 2 is not allowed; choose one of 0, 1, 3"),
    ("data.batch_size", "is not of the form key=value"),
])
def test_bad_keys_and_values_name_themselves(override, message):
    with pytest.raises(ConfigError) as exc:
        load_config(None, [override])
    assert message in str(exc.value)


def test_bad_key_in_a_yaml_file_names_key_and_file(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("data:\n  shuffle_bufer: 10\n")
    with pytest.raises(ConfigError, match=r"data\.shuffle_bufer.*shuffle_buffer.*bad\.yaml"):
        load_config(f)


def test_cli_prints_resolved_config_and_rejects_bad_keys():
    out = cli("config", "data.batch_size=48", "seed=7")
    assert "batch_size: 48" in out.stdout and "seed: 7" in out.stdout
    bad = cli("config", "data.nope=1", check=False)
    assert bad.returncode == 2 and "unknown config key 'data.nope'" in bad.stderr


@pytest.mark.parametrize("override, message", [
    ("optim.g_betas=[0.5]", "optim.g_betas: [0.5] has 1 values, expected 2"),
    ("optim.d_betas=[0.5, 1.0]", "optim.d_betas[1]: 1.0 must be below 1.0"),
    ("optim.d_betas=[-0.1, 0.9]", "optim.d_betas[0]: -0.1 is below the minimum 0.0"),
    ("optim.g_lr=.nan", "optim.g_lr: nan is not a finite number"),
    ("loss.penalties=[{name: r1, weight: .nan}]", "loss.penalties[0].weight: nan is not a finite number"),
    ("train.total_kimg=.inf", "train.total_kimg: inf is not a finite number"),
    ("data.batch_size=100000000000", "data.batch_size: 100000000000 is above the maximum"),
    ("train.n_critic=1000000", "train.n_critic: 1000000 is above the maximum 1000"),
])
def test_values_that_would_fail_later_fail_at_load(override, message):
    with pytest.raises(ConfigError) as exc:
        load_config(None, [override])
    assert message in str(exc.value)


def test_exponent_without_a_dot_is_a_float():
    """YAML 1.1 reads `4e-4` as a string; in a float field it is the number the user typed."""
    from pipeline.catalog import load_config as load

    cfg = load(None, ["optim.g_lr=4e-4", "loss.penalties=[{name: r1, weight: 1E2}]"])
    assert cfg.optim.g_lr == 4e-4 and cfg.loss.penalties[0].weight == 100.0
    with pytest.raises(ConfigError, match=r"optim\.g_lr: expected float, got 'fast'"):
        load(None, ["optim.g_lr=fast"])
    with pytest.raises(ConfigError, match=r"model\.name"):
        load(None, ["model.name=4e-4"])      # a string field keeps the string (and the name check)


@pytest.mark.parametrize("old, new", [("train.g_lr=1e-3", "optim.g_lr"), ("train.ema_halflife_kimg=2", "ema.halflife_kimg"),
                                      ("train.augment=color", "augment.diffaugment"),
                                      ("train.mixed_precision=bf16", "speed.mixed_precision"),
                                      ("train.trackers=[wandb]", "log.trackers")])
def test_a_key_that_moved_to_its_section_is_refused_with_the_new_spelling(old, new):
    with pytest.raises(ConfigError, match=f"is now '{new}': write {new}="):
        load_config(None, [old])
    from pipeline.config import RENAMED
    section, key = RENAMED[old.split("=")[0]].split(".")
    assert load_config(None, [f"{new}={old.split('=')[1]}"]) is not None and key in {
        f.name for f in __import__("dataclasses").fields(getattr(load_config(None), section))}


@pytest.mark.parametrize("written, new, meant", [
    (["loss.penalty=r1", "loss.penalty_weight=10", "loss.penalty_interval=16"],
     "loss.penalties=[{name: r1, weight: 10, interval: 16}] (in YAML: penalties: [{name: r1, weight: 10, "
     "interval: 16}] under loss:)", [("r1", 10.0, 16)]),
    (["loss.penalty=wgan-gp"], "loss.penalties=[{name: wgan-gp, weight: 10}]", [("wgan-gp", 10.0, 1)]),   # the old default weight
    (["loss.penalty=r1", "loss.penalty_interval=4", "loss.penalties=[{name: pl, weight: 2.0, interval: 4}]",
      "model.name=stylegan2"],
     "loss.penalties=[{name: r1, weight: 10, interval: 4}, {name: pl, weight: 2.0, interval: 4}]",
     [("r1", 10.0, 4), ("pl", 2.0, 4)]),
    (["loss.penalty=none"], "loss.penalties=[]", []),
])
def test_the_single_penalty_keys_are_refused_with_the_penalties_entry_that_does_the_same(written, new, meant):
    with pytest.raises(ConfigError) as exc:
        load_config(None, written)
    assert str(exc.value).startswith(written[0].split("=")[0]) and " gone: write " in str(exc.value)
    assert new in str(exc.value)
    # What the message says to write loads, and means what the old keys meant.
    rest = [w for w in written if not w.startswith("loss.penalt")]
    penalties = load_config(None, [new.split(" (in YAML")[0], *rest]).loss.penalties
    assert [(p.name, p.weight, p.interval) for p in penalties] == meant


def test_a_yaml_file_with_the_single_penalty_keys_names_the_file(tmp_path):
    f = tmp_path / "old.yaml"
    f.write_text("loss:\n  penalty: r1\n  penalty_weight: 1.0\n  penalty_interval: 16\n")
    with pytest.raises(ConfigError, match=r"loss\.penalty, loss\.penalty_weight, loss\.penalty_interval are gone: "
                                          r"write loss\.penalties=\[\{name: r1, weight: 1\.0, interval: 16\}\].*old\.yaml"):
        load_config(f)


def test_there_is_one_loader_and_it_checks_names_and_fields():
    import pipeline.config as config

    assert not hasattr(config, "load_config") and not hasattr(config, "from_dict")
    with pytest.raises(ConfigError, match="model.name"):
        load_config(None, ["model.name=nope"])
