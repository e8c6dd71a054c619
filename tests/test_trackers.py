"""W&B (offline) and MLflow (file store in RUN) beside TensorBoard: a real tiny run, its resume and an
eval, each read back through the tracker's own data: MlflowClient on the file store, and the records
of W&B's offline transaction log decoded with wandb's own protobuf schema (wandb 0.31 ships no Python
reader of .wandb files; the framing is the LevelDB log format it documents)."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, cli
from pipeline.errors import ConfigError

pytest.importorskip("wandb")
pytest.importorskip("mlflow")

TINY = ["model.g_width=0.125", "model.d_width=0.125", "data.batch_size=16", "data.num_workers=0",
        "data.shuffle_buffer=100", "log.progress=false", "train.threads=1", "log.grid_size=16",
        "train.tick_kimg=0.128", "train.snapshot_kimg=0.128", "train.checkpoint_kimg=0.128"]


# ---------------------------------------------------------------------------------------------
# Readers

def wandb_records(path: Path):
    """The protobuf Records of a .wandb file: a 7-byte header, then 32 KiB blocks of chunks
    (crc32 u32, length u16, type u8: 1 full, 2 first, 3 middle, 4 last); a block tail under 7 bytes is padding."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path} is no W&B transaction log"
    pos, parts = 7, b""
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:
            pos += 32768 - pos % 32768
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        parts += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(parts)
            parts = b""
            yield record


def wandb_segments(run: Path, run_id: str) -> list[dict]:
    """Each offline segment (one per process) of W&B run `run_id`, oldest first: its run record,
    config updates and history rows as {name: value}."""
    out = []
    for path in sorted(run.glob(f"wandb/offline-run-*-{run_id}/run-{run_id}.wandb")):
        seg = {"run": None, "config": {}, "history": []}
        for r in wandb_records(path):
            kind = r.WhichOneof("record_type")
            if kind == "run":
                seg["run"] = r.run
            elif kind == "config":
                seg["config"].update({u.key: json.loads(u.value_json) for u in r.config.update})
            elif kind == "history":
                seg["history"].append({"/".join(i.nested_key) or i.key: json.loads(i.value_json)
                                       for i in r.history.item})
        out.append(seg)
    return out


def mlflow_view(run: Path, run_id: str, metrics: list[str], monkeypatch) -> dict:
    """What MLflow's client reads from the run's file store (the opt-in MLflow 3 asks for, here only)."""
    from mlflow import MlflowClient

    with monkeypatch.context() as m:
        m.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
        client = MlflowClient((run / "mlruns").resolve().as_uri())
        got = client.get_run(run_id)
        return {"params": got.data.params, "tags": got.data.tags,
                "runs": [r.info.run_id for r in client.search_runs([got.info.experiment_id])],
                "history": {k: [(m.step, m.value) for m in client.get_metric_history(run_id, k)] for k in metrics},
                "samples": [a.path for a in client.list_artifacts(run_id, "samples")]}


def stats_rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "stats.jsonl").read_text().splitlines()]


def numeric(row: dict) -> dict:
    return {k: v for k, v in row.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


# ---------------------------------------------------------------------------------------------

def test_training_resume_and_eval_reach_wandb_and_mlflow(tmp_path, mnist_dir, monkeypatch):
    # Neither library is told anything by the environment: offline W&B and the file store are our defaults.
    for var in ("WANDB_MODE", "WANDB_DIR", "WANDB_RUN_ID", "MLFLOW_TRACKING_URI", "MLFLOW_RUN_ID",
                "MLFLOW_EXPERIMENT_NAME", "MLFLOW_ALLOW_FILE_STORE"):
        monkeypatch.delenv(var, raising=False)
    run = tmp_path / "run"
    args = ["train", "--config", "configs/mnist_dcgan.yaml", "--run-dir", str(run), f"data.path={mnist_dir}", *TINY,
            "log.trackers=[wandb,mlflow]", "log.tracker_project=trk-test"]
    cli(*args, "train.total_kimg=0.256")
    ids = json.loads((run / "trackers.json").read_text())
    wb_id, ml_id = ids["wandb"]["id"], ids["mlflow"]["id"]
    rows = stats_rows(run)
    assert [r["cur_nimg"] for r in rows] == [128, 256]
    assert not (run / "tb").exists()            # TensorBoard only when chosen (the default: test_train.py)

    # MLflow: every numeric value of every stats row at step cur_nimg, the config as dotted params, the grids.
    keys = sorted(numeric(rows[0]))
    assert {"Loss/D/main", "Loss/G/main", "Timing/sec_per_kimg", "kimg"} <= set(keys)
    ml = mlflow_view(run, ml_id, keys, monkeypatch)
    for k in keys:
        assert ml["history"][k] == [(r["cur_nimg"], pytest.approx(float(r[k]), nan_ok=True)) for r in rows], k
    assert ml["params"]["model.g_width"] == "0.125" and ml["params"]["data.batch_size"] == "16"
    assert ml["params"]["train.total_kimg"] == "0.256" and ml["params"]["log.tracker_project"] == "trk-test"
    assert ml["samples"] == ["samples/fakes-000000128.png", "samples/fakes-000000256.png"]

    # W&B: one offline segment, the same rows at step cur_nimg, the config, a sample image per tick.
    (seg,) = wandb_segments(run, wb_id)
    assert seg["run"].run_id == wb_id and seg["run"].project == "trk-test"
    assert seg["config"]["model.g_width"] == 0.125 and seg["config"]["log.trackers"] == ["wandb", "mlflow"]
    scalars = [h for h in seg["history"] if "Loss/D/main" in h]
    assert [h["_step"] for h in scalars] == [128, 256]
    for h, r in zip(scalars, rows):
        assert {k: h[k] for k in keys} == pytest.approx({k: float(r[k]) for k in keys}, nan_ok=True)
        assert h["Samples/fakes/_type"] == "images/separated" and h["Samples/fakes/count"] == 1
        media = next((run / "wandb").glob(f"offline-run-*-{wb_id}/files")) / h["Samples/fakes/filenames"][0]
        assert media.stat().st_size > 100

    # Resume for one more tick: the same tracker runs go on at later steps.
    out = cli(*args, "train.total_kimg=0.384")
    assert "resumed from" in out.stdout
    assert json.loads((run / "trackers.json").read_text()) == ids
    rows = stats_rows(run)
    ml = mlflow_view(run, ml_id, ["Loss/D/main"], monkeypatch)
    assert ml["runs"] == [ml_id]                                   # no second MLflow run in the experiment
    assert ml["history"]["Loss/D/main"] == [(r["cur_nimg"], pytest.approx(r["Loss/D/main"])) for r in rows]
    assert [s for s, _ in ml["history"]["Loss/D/main"]] == [128, 256, 384]
    assert ml["params"]["train.total_kimg"] == "0.256" and ml["tags"]["resumed.train.total_kimg"] == "0.384"
    first, second = wandb_segments(run, wb_id)                     # a second segment of the same run id
    assert second["run"].run_id == wb_id
    assert [h["_step"] for h in second["history"] if "Loss/D/main" in h] == [384]

    # Eval of one snapshot: into the training's MLflow run at the snapshot's cur_nimg, and into W&B's
    # companion eval run of the same group.
    cli("eval", "--run-dir", str(run), "--snapshot", "snapshot-000000256", "--metrics", "fid", "--extractor", "mnist",
        "--num-gen", "300", "--batch-size", "150", "--split", "test")
    (rec,) = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    ml = mlflow_view(run, ml_id, ["Metrics/fid_mnist"], monkeypatch)
    assert ml["history"]["Metrics/fid_mnist"] == [(256, pytest.approx(rec["value"]))]
    (ev,) = wandb_segments(run, f"{wb_id}-eval")
    assert ev["run"].run_group == wb_id and ev["run"].job_type == "eval"
    (row,) = [h for h in ev["history"] if "Metrics/fid_mnist" in h]
    assert row["kimg"] == 0.256 and row["Metrics/fid_mnist"] == pytest.approx(rec["value"])
    assert not (run / "tb").exists()


def test_a_tracker_name_outside_the_list_is_refused_by_key():
    from pipeline.catalog import from_dict

    with pytest.raises(ConfigError, match=r"log.trackers\[1\]: 'neptune' is not allowed; choose one of "
                                          "tensorboard, wandb, mlflow"):
        from_dict({}, ["log.trackers=[tensorboard,neptune]"])
    assert from_dict({}, ["log.trackers=[mlflow]"]).log.trackers == ["mlflow"]


def test_a_chosen_tracker_that_is_not_installed_names_the_install(monkeypatch):
    import importlib.util

    from pipeline.catalog import from_dict
    from pipeline.training import trackers

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "mlflow" else real(name, *a))
    assert trackers.chosen(from_dict({"log": {"trackers": ["tensorboard", "wandb", "wandb"]}})) == ["wandb"]
    with pytest.raises(ConfigError, match=r"log.trackers: mlflow is chosen but not installed; "
                                          r"pip install 'ganpipe\[trackers\]'"):
        trackers.chosen(from_dict({"log": {"trackers": ["mlflow"]}}))


def test_neither_library_is_imported_unless_chosen():
    # What `ganpipe --help`, `ganpipe train` and `ganpipe eval` import, and an Accelerator without trackers.
    code = ("import sys\n"
            "import pipeline.cli, pipeline.training.loop as loop, pipeline.metrics.commands\n"
            "from pipeline.config import Config\n"
            "from pipeline.training import trackers\n"
            "names = trackers.chosen(Config())\n"
            "acc = loop.start_processes(1, 60.0, names)\n"
            "assert names == [] and acc.trackers == []\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('wandb', 'mlflow')))\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_the_sites_tracker_settings_are_honoured_and_a_crash_ends_the_runs_as_failed(tmp_path, mnist_dir,
                                                                                      monkeypatch):
    """MLFLOW_TRACKING_URI (a team's server or store) and WANDB_DIR / WANDB_PROJECT are the
    environment's word unless the config says otherwise; a run that dies of an error ends its
    MLflow run FAILED and its W&B run with a nonzero exit code."""
    from mlflow import MlflowClient

    store, wandb_dir = (tmp_path / "team-mlruns").resolve().as_uri(), tmp_path / "team-wandb"
    wandb_dir.mkdir()
    env = {"MLFLOW_TRACKING_URI": store, "MLFLOW_ALLOW_FILE_STORE": "true", "WANDB_DIR": str(wandb_dir),
           "WANDB_PROJECT": "team-project", "WANDB_MODE": "offline"}
    run = tmp_path / "run"
    # D's loss is NaN from step 1 on: the run stops with an error after 2 skipped steps in a row.
    out = cli("train", "--config", "configs/mnist_dcgan.yaml", "--run-dir", str(run), f"data.path={mnist_dir}", *TINY,
              "log.trackers=[wandb,mlflow]", "train.total_kimg=0.256", "train.max_nonfinite_steps=2",
              env=env, faults=["nan-d-steps=" + ",".join(map(str, range(1, 20)))], check=False)
    assert out.returncode != 0 and "consecutive D steps with non-finite gradients" in out.stderr, out.stderr[-2000:]
    ids = json.loads((run / "trackers.json").read_text())
    assert ids["mlflow"]["uri"] == store and ids["mlflow"]["experiment"] == "team-project"
    assert not (run / "mlruns").exists() and not (run / "wandb").exists()
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    got = MlflowClient(store).get_run(ids["mlflow"]["id"])
    assert got.info.status == "FAILED"
    (segment,) = wandb_dir.glob(f"wandb/offline-run-*-{ids['wandb']['id']}/run-{ids['wandb']['id']}.wandb")
    exits = [r.exit.exit_code for r in wandb_records(segment) if r.WhichOneof("record_type") == "exit"]
    assert exits == [1]
    runs = [r.run for r in wandb_records(segment) if r.WhichOneof("record_type") == "run"]
    assert runs[0].project == "team-project"
