"""Experiment trackers beside TensorBoard: Weights & Biases and MLflow, through Accelerate's tracker API.

    ganpipe train --config configs/mnist_dcgan.yaml --run-dir RUN log.trackers=[tensorboard,wandb,mlflow]
    wandb sync RUN/wandb/offline-run-*                   # later, from a machine with a network
    MLFLOW_ALLOW_FILE_STORE=true mlflow ui --backend-store-uri RUN/mlruns   # the full `mlflow` package

What reaches each chosen tracker: every stats row of each tick (step = cur_nimg, images shown to D, as
in TensorBoard; the row's `kimg` too), each tick's sample grid (W&B: an image; MLflow: the PNG as an
artifact under samples/), the resolved config as the run's parameters (dotted keys), and the records
of `ganpipe eval`/`watch` as `Metrics/{metric}_{extractor}` at the snapshot's cur_nimg.

Training and evaluation write through one `Sink`: TensorBoard (our own `TensorBoard` writer of
RUN/tb, training's events and the evaluator's `.eval` file side by side: Accelerate's TensorBoard
tracker writes to logging_dir/project_name, which would move the event files users already use)
and the W&B / MLflow runs. W&B and MLflow are Accelerate's `WandBTracker` and `MLflowTracker`: the trainer passes
`log_with` to its Accelerator and calls `init_trackers` (rank 0 only: Accelerate starts no tracker on
the other ranks). W&B runs offline unless WANDB_MODE says otherwise (RUN/wandb/offline-run-*, no
network needed; WANDB_DIR, WANDB_PROJECT and WANDB_ENTITY are honoured); MLflow logs to
`log.mlflow_uri`, else the site's MLFLOW_TRACKING_URI, else the file store RUN/mlruns. A training
run that ends in an error ends its tracker runs as failed. MLflow 3 refuses file stores unless MLFLOW_ALLOW_FILE_STORE is set: we set it
(if unset) for our default store only.

RUN/trackers.json keeps each tracker's run id and where that run lives; a resumed run passes them
back (W&B `id` + `resume="allow"`, MLflow `run_id`), so it continues the same tracker run. A
resumed run whose project or MLflow URI changed starts a new tracker run there. MLflow does not
let a parameter change: values that a resume changed (say train.total_kimg) are set as tags
`resumed.KEY`. Ticks between the last checkpoint and a kill are logged again by the resumed run
(MLflow then holds two values at those steps; W&B, whose steps only go up, may drop the repeats
when it syncs).

The evaluator (`EvalTrackers`) is a separate job without an Accelerator (Accelerate's trackers need
its state), so it uses the libraries themselves: MlflowClient.log_batch into the training's MLflow
run, which leaves the run's status to the trainer (start_run and end_run would mark a live run
finished), and wandb.init of a companion run `ID-eval` in the training run's group (job_type eval):
a W&B run's step only goes up, and an eval job writes beside the trainer at older steps; its charts
use `kimg` as the x axis.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import secrets
import time
from pathlib import Path
from typing import Any, Callable

from pipeline.config import Config, flat_config
from pipeline.errors import ConfigError
from pipeline.io import write_json_atomic
from pipeline.rundir import RunDir

PACKAGES = {"wandb": "wandb", "mlflow": "mlflow"}   # tracker -> module it needs (mlflow-skinny provides mlflow)


def chosen(cfg: Config) -> list[str]:
    """The trackers besides TensorBoard that `log.trackers` asks for, in order, each installed."""
    out = []
    for name in cfg.log.trackers:
        if name == "tensorboard" or name in out:
            continue
        if importlib.util.find_spec(PACKAGES[name]) is None:
            raise ConfigError(f"log.trackers: {name} is chosen but not installed; "
                              f"pip install 'ganpipe[trackers]' (or {name}), or drop it from log.trackers")
        out.append(name)
    return out


def read_ids(run_dir: Path) -> dict:
    path = RunDir(run_dir).trackers
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path} is not valid JSON ({exc}); fix it, or delete it to start new tracker runs") from None
    return data if isinstance(data, dict) else {}


def wandb_mode() -> dict:
    """Offline unless the user's WANDB_MODE says otherwise (online, disabled)."""
    return {} if os.environ.get("WANDB_MODE") else {"mode": "offline"}


def wandb_dir(run_dir: Path) -> str:
    """Where W&B keeps its files: the user's WANDB_DIR, else the run directory (RUN/wandb)."""
    return os.environ.get("WANDB_DIR") or str(run_dir)


def tracker_project(cfg: Config, names: list[str]) -> str:
    """The W&B project / MLflow experiment: `log.tracker_project`, unless it is left at its default
    and the environment names one (WANDB_PROJECT, MLFLOW_EXPERIMENT_NAME; the first chosen tracker's)."""
    default = next(f.default for f in dataclasses.fields(type(cfg.log)) if f.name == "tracker_project")
    if cfg.log.tracker_project == default:
        for name in names:
            if env := os.environ.get({"wandb": "WANDB_PROJECT", "mlflow": "MLFLOW_EXPERIMENT_NAME"}[name]):
                return env
    return cfg.log.tracker_project


def mlflow_uri(cfg: Config, run_dir: Path) -> str:
    """`log.mlflow_uri`, else the site's MLFLOW_TRACKING_URI, else the file store RUN/mlruns."""
    return cfg.log.mlflow_uri or os.environ.get("MLFLOW_TRACKING_URI") or RunDir(run_dir).mlruns.resolve().as_uri()


def use_mlflow_store(cfg: Config, run_dir: Path) -> str:
    """Point MLflow at the run's store (`mlflow_uri`) and return its URI."""
    import mlflow

    uri = mlflow_uri(cfg, run_dir)
    if uri == RunDir(run_dir).mlruns.resolve().as_uri():
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")   # MLflow's own opt-in; read when a store opens
    mlflow.set_tracking_uri(uri)
    return uri


def _scalars(values: dict) -> dict[str, float]:
    return {k: v for k, v in values.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


class RunTrackers:
    """The training run's W&B and MLflow runs; empty (every call a no-op) on other ranks or when none is chosen."""

    def __init__(self, acc=None):
        self.acc = acc
        self.trackers = acc.trackers if acc is not None else []     # the Accelerator's own list

    def log(self, row: dict, step: int) -> None:
        if self.trackers:
            self.acc.log(_scalars(row), step=step)

    def image(self, name: str, png: Path, step: int) -> None:
        """A sample grid already written to `png`: a W&B image, an MLflow artifact under samples/."""
        for t in self.trackers:
            if t.name == "wandb":
                t.log_images({name: [str(png)]}, step=step)
            elif t.name == "mlflow":
                t.log_artifact(str(png), artifact_path="samples")

    def close(self, failed: bool = False) -> None:
        """Finish every tracker run, marked failed when training ended in an error; the list is
        emptied so that `acc.end_training()` finishes none twice."""
        for t in self.trackers:
            if failed and t.name == "mlflow":
                import mlflow

                mlflow.end_run(status="FAILED")
            elif failed and t.name == "wandb":
                t.run.finish(exit_code=1)
            else:
                t.finish()
        self.trackers.clear()


def open_training(acc, cfg: Config, run_dir: Path, names: list[str], log: Callable[[str], None]) -> RunTrackers:
    """Start (or continue, from RUN/trackers.json) the run's tracker runs and log its parameters.
    `acc` was built with `log_with=names`; call on every rank (Accelerate starts them on rank 0)."""
    if not names or not acc.is_main_process:
        return RunTrackers()
    project, ids = tracker_project(cfg, names), read_ids(run_dir)
    kwargs: dict[str, dict] = {}
    if "wandb" in names:
        prev = ids.get("wandb", {})
        run_id = prev["id"] if prev.get("project") == project and prev.get("id") else secrets.token_hex(4)
        kwargs["wandb"] = {"dir": wandb_dir(run_dir), "id": run_id, "resume": "allow", "name": run_dir.name,
                           "group": run_id, "job_type": "train", **wandb_mode()}
    if "mlflow" in names:
        uri = use_mlflow_store(cfg, run_dir)
        prev = ids.get("mlflow", {})
        same = (prev.get("experiment"), prev.get("uri")) == (project, uri)
        kwargs["mlflow"] = {"run_id": prev.get("id") if same else None, "run_name": run_dir.name}
    acc.init_trackers(project, config=None, init_kwargs=kwargs)
    params, where = flat_config(cfg), []
    for t in acc.trackers:
        if t.name == "wandb":
            t.store_init_configuration(params)
            ids["wandb"] = {"id": t.tracker.id, "project": project}
            where.append(f"wandb {t.tracker.id} ({kwargs['wandb'].get('mode') or os.environ['WANDB_MODE']}, "
                         f"{wandb_dir(run_dir)}/{RunDir.WANDB})")
        elif t.name == "mlflow":
            _mlflow_params(t, params)
            ids["mlflow"] = {"id": t.tracker.info.run_id, "experiment": project, "uri": uri}
            where.append(f"mlflow {t.tracker.info.run_id} ({uri})")
    write_json_atomic(RunDir(run_dir).trackers, ids)
    log(f"trackers: {'; '.join(where)}")
    return RunTrackers(acc)


def _mlflow_params(tracker, params: dict) -> None:
    """Log the parameters MLflow does not hold yet; values a resume changed become tags `resumed.KEY`."""
    import mlflow

    held = mlflow.get_run(tracker.tracker.info.run_id).data.params
    new = {k: v for k, v in params.items() if k not in held}
    if new:
        tracker.store_init_configuration(new)
    changed = {f"resumed.{k}": str(v) for k, v in params.items() if k in held and held[k] != str(v)}
    if changed:
        mlflow.set_tags(changed)


class EvalTrackers:
    """The evaluator's side: its records go to the trackers of the run's config (rank 0 only).
    Opened on the first `log`; the training run must have recorded its ids in RUN/trackers.json."""

    def __init__(self, run_dir: Path, cfg: Config, log: Callable[[str], None]):
        self.run_dir, self.cfg, self.say = run_dir, cfg, log
        self.names = chosen(cfg)            # fails early when the run's trackers are not installed here
        self.opened = False
        self.wandb = None                   # the companion wandb.Run
        self.mlflow: tuple[Any, str] | None = None  # (MlflowClient, run id)

    def _open(self) -> None:
        self.opened = True
        ids = read_ids(self.run_dir)
        for name in self.names:
            if not ids.get(name, {}).get("id"):
                self.say(f"trackers: no {name} run recorded in {RunDir(self.run_dir).trackers} (training starts it); "
                         f"eval metrics go to metrics.jsonl only")
            elif name == "mlflow":
                from mlflow import MlflowClient

                self.mlflow = (MlflowClient(use_mlflow_store(self.cfg, self.run_dir)), ids["mlflow"]["id"])
            elif name == "wandb":
                import wandb

                train = ids["wandb"]
                self.wandb = wandb.init(project=train["project"], dir=wandb_dir(self.run_dir), id=f"{train['id']}-eval",
                                        resume="allow", group=train["id"], job_type="eval",
                                        name=f"{self.run_dir.name}-eval", **wandb_mode())
                self.wandb.define_metric("kimg")
                self.wandb.define_metric("Metrics/*", step_metric="kimg")

    def log(self, records: list[dict]) -> None:
        """Records of `Evaluator.score` as `Metrics/NAME` at each snapshot's cur_nimg (W&B: at its kimg)."""
        if not self.names or not records:
            return
        if not self.opened:
            self._open()
        by_nimg: dict[int, dict] = {}
        for r in records:
            by_nimg.setdefault(r["cur_nimg"], {"kimg": r["kimg"]})[f"Metrics/{r['name']}"] = float(r["value"])
        if self.mlflow is not None:
            from mlflow.entities import Metric

            client, run_id = self.mlflow
            now = int(time.time() * 1000)
            client.log_batch(run_id, metrics=[Metric(k, v, now, nimg) for nimg, row in sorted(by_nimg.items())
                                              for k, v in row.items() if k != "kimg"])
        if self.wandb is not None:
            for nimg, row in sorted(by_nimg.items()):
                self.wandb.log({**row, "cur_nimg": nimg})

    def close(self) -> None:
        if self.wandb is not None:
            self.wandb.finish()
            self.wandb = None


class TensorBoard:
    """RUN/tb: the one TensorBoard writer of training (`suffix` "") and evaluation (".eval")."""

    def __init__(self, run_dir: Path, suffix: str = ""):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(RunDir(run_dir).tb), filename_suffix=suffix)

    def scalars(self, values: dict, step: int) -> None:
        """The numbers of `values` with hierarchical names (`Loss/D/main`)."""
        for name, value in _scalars(values).items():
            if "/" in name:
                self.writer.add_scalar(name, value, step)
        self.writer.flush()

    def png(self, name: str, png: Path, step: int) -> None:
        """An image from its PNG file, as the file's bytes: `add_image` would decode nothing but encode
        the grid again (costly for large grids), so the summary is built around the encoded bytes."""
        from PIL import Image
        from tensorboard.compat.proto.summary_pb2 import Summary

        with Image.open(png) as img:
            width, height, bands = img.width, img.height, len(img.getbands())
        image = Summary.Image(height=height, width=width, colorspace=bands, encoded_image_string=Path(png).read_bytes())
        self.writer.file_writer.add_summary(Summary(value=[Summary.Value(tag=name, image=image)]), step)
        self.writer.flush()

    def text(self, name: str, text: str, step: int) -> None:
        self.writer.add_text(name, text, global_step=step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class Sink:
    """Where a run's numbers, grids and scores go besides its own files: TensorBoard (when chosen)
    and the W&B / MLflow runs. Training opens it with its Accelerator's trackers (`RunTrackers`),
    evaluation with `EvalTrackers`; every method is a no-op for what is not there."""

    def __init__(self, tensorboard: TensorBoard | None, others: RunTrackers | EvalTrackers | None):
        self.tensorboard, self.others = tensorboard, others

    @classmethod
    def for_training(cls, acc, cfg: Config, run_dir: Path, log: Callable[[str], None]) -> "Sink":
        """Rank 0's sink of a training run (an empty one on other ranks)."""
        others = open_training(acc, cfg, run_dir, chosen(cfg), log)
        tb = TensorBoard(run_dir) if acc.is_main_process and "tensorboard" in cfg.log.trackers else None
        return cls(tb, others)

    @classmethod
    def for_evaluation(cls, cfg: Config, run_dir: Path, log: Callable[[str], None]) -> "Sink":
        """The evaluator's sink; TensorBoard's file is opened on the first record."""
        return cls(None, EvalTrackers(run_dir, cfg, log))

    def row(self, row: dict, step: int) -> None:
        """A training tick's stats row."""
        if self.tensorboard is not None:
            self.tensorboard.scalars(row, step)
        if isinstance(self.others, RunTrackers):
            self.others.log(row, step)

    def image(self, name: str, png: Path, step: int) -> None:
        """A sample grid already written to `png`."""
        if self.tensorboard is not None:
            self.tensorboard.png(name, png, step)
        if isinstance(self.others, RunTrackers):
            self.others.image(name, png, step)

    def scores(self, records: list[dict], run_dir: Path, tensorboard: bool) -> None:
        """Evaluation records as `Metrics/NAME` at each snapshot's cur_nimg."""
        if tensorboard and self.tensorboard is None:
            self.tensorboard = TensorBoard(run_dir, ".eval")
        if self.tensorboard is not None:
            for r in records:
                self.tensorboard.writer.add_scalar(f"Metrics/{r['name']}", r["value"], global_step=r["cur_nimg"])
            self.tensorboard.writer.flush()
        if isinstance(self.others, EvalTrackers):
            self.others.log(records)

    def close(self, failed: bool = False) -> None:
        """Close everything; `failed`: training ended in an error, and its tracker runs say so."""
        if self.tensorboard is not None:
            self.tensorboard.close()
            self.tensorboard = None
        if isinstance(self.others, RunTrackers):
            self.others.close(failed)
        elif self.others is not None:
            self.others.close()
