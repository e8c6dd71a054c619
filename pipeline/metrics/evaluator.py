"""The evaluator: one run, its extractors, their references and one protocol; many snapshots.

    ev = Evaluator(RUN, metrics=["fid", "kid"], extractor="mnist")   # every process builds one
    ev = Evaluator(RUN, metrics=["fid", "pr", "is"], extractor="inception,dinov2-l14")
    ev = Evaluator(RUN, metrics=["fid", "pr"])            # no extractor named: fid on inception, pr on vgg16
    ev.start(main="watch")                                           # the main protocol; best.json in line
    for meta in ev.pending():                                        # snapshots not yet scored
        with ev.claimed(meta["json_path"], recheck=True) as mine:    # one scorer per snapshot and protocol
            if mine:
                ev.record(ev.score(meta["json_path"]))               # score on all, record on rank 0
    ev.close()

Scoring a snapshot: load the EMA generator (safetensors + JSON, no code executed, sha256 checked),
generate N images with `pipeline.generate` (image i, its latent and its class depend only on the
seed and i, so neither the batch size nor the number of processes changes which images are
scored), quantise them to uint8 as a saved PNG would be, run every extractor once over
them, keep per extractor running float64 sums (FID), IS sums and the features of the first
min(N, `--num-real`) images (KID, precision/recall, density/coverage) (`stats.py`), and score them
against the reference statistics of the run's data (`refstats.py`, computed on first use). With
several processes each generates every world_size-th batch; the sums are gathered every round
and added in batch order (the same bits for any number of processes), the sample goes to rank 0,
which scores and writes (`records.py`). `ganpipe eval` and
`ganpipe watch` (`commands.py`) both drive it.

A conditional G's classes follow `--labels`: `data` draws them from the class distribution the
run trained with (the weights its snapshots record, train.gen_labels; else the training split's
class counts in the reference data's manifest), `uniform` gives image i the class i % num_classes;
the default is the run's train.gen_labels. Every record says which (`labels`, `label_weights`),
and scores of the two are separate series (records.protocol_key).

A snapshot that cannot be scored (a record of the wrong types, weights that do not fit its model
or do not match its sha256, images no extractor takes) is a SnapshotError; `mark_bad` writes a
`bad_snapshot` line to metrics.jsonl, and `pending` skips it from then on, until its files change.
While a process scores a snapshot it holds a claim on it under its protocol (io.LockFile), so a
second scorer (`eval --all` beside `watch`) leaves it alone.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch

from pipeline import dist, generate
from pipeline.data.manifest import MANIFEST, read_manifest
from pipeline.errors import DataError, SnapshotError, UserError
from pipeline.io import LockFile, sha256_bytes
from pipeline.metrics.features import CLASSIFIERS, Extractor, check_data, get_extractors, parse_extractors
from pipeline.metrics.records import (BEST_METRICS, KIND_BAD, append_records, bad_marks, main_protocol,
                                      main_protocol_line, plot_metrics, protocol_key, read_lines, read_records,
                                      record_main_protocol, scores, sync_best, write_best)
from pipeline.metrics.refstats import SAMPLE_MAX, RefStats, reference_stats
from pipeline.metrics.scores import IS_RESIZES, METRICS, Metric, Setup, extractor_plan
from pipeline.metrics.stats import IS_SPLITS, generated_statistics
from pipeline.training.snapshot import list_snapshots, load_snapshot, read_snapshot_meta
from pipeline.training.trackers import Sink
from pipeline.rundir import RunDir

GENERATORS = ("ema", "raw")     # --generator: the snapshot's EMA G, or the raw G (train.snapshot_raw)


def generated_features(G: torch.nn.Module, extractor: Extractor, *, num: int, batch_size: int, seed: int,
                       psi: float = 1.0, cutoff: int | None = None,
                       classes: generate.LabelDistribution | None = None) -> np.ndarray | None:
    """Features of images 0..num-1 of `seed` (of the classes `classes` gives them, default i %
    num_classes); rank r does batches r, r+world, ... (batches rounded up to whole micro-batches
    of `pipeline.generate`, so none is computed twice); the whole array on rank 0, None elsewhere."""
    if getattr(G, "resolution", 0) == 0:
        raise UserError("this snapshot's generator makes flat vectors (resolution 0), not images: "
                        "FID/KID need images")
    step = generation_batch(batch_size)
    mine = []
    for b in range(dist.rank(), math.ceil(num / step), dist.world_size()):
        start = b * step
        x = generate.images(G, seed=seed, start=start, count=min(step, num - start), device=extractor.device,
                            batch=step, psi=psi, cutoff=cutoff, classes=classes)
        mine.append((b, extractor(generate.to_uint8(x))))
    parts = dist.gather_objects(mine)
    if parts is None:
        return None
    batches = sorted((b, f) for part in parts for b, f in part)
    return np.concatenate([f for _, f in batches])


def generation_batch(batch_size: int) -> int:
    """--batch-size rounded up to whole micro-batches of `pipeline.generate` (250 -> 256)."""
    return math.ceil(batch_size / generate.MICRO_BATCH) * generate.MICRO_BATCH


class Evaluator:
    """Scores snapshots of one run under one protocol; all processes call `score`, rank 0 records."""

    weights = "ema"                 # which G of each snapshot (GENERATORS); set by __init__
    classes: generate.LabelDistribution | None = None   # a conditional G's classes (--labels); set by __init__

    def __init__(self, run_dir: str | Path, *, metrics: list[str], extractor: str | None = None,
                 num_gen: int | None = None, num_real: int | None = SAMPLE_MAX, is_resize: str = "clean",
                 split: str = "train", seed: int = 0, batch_size: int = 250, device: str | None = None,
                 inception_weights: str | None = None, data: str | Path | None = None,
                 psi: float = 1.0, cutoff: int | None = None, best_metrics: list[str] | None = None,
                 log: Callable[[str], None] = print, weights: str = "ema", labels: str | None = None):
        from pipeline.catalog import load_recorded

        self.run_dir = Path(run_dir)
        if not RunDir(self.run_dir).config.is_file():
            raise UserError(f"{self.run_dir}: not a run directory (no config.yaml; `ganpipe train` writes it)")
        cfg = load_recorded(RunDir(self.run_dir).config)
        self.data_dir = Path(data or cfg.data.path).expanduser()
        if not (self.data_dir / MANIFEST).is_file():
            raise UserError(f"reference data {self.data_dir} (data.path of {RunDir(self.run_dir).config}) has no "
                            f"{MANIFEST}: reference statistics need a directory made by `ganpipe prepare`; "
                            "pass --data DIR")
        if seed < 0:
            raise UserError(f"--seed {seed}: must be >= 0")
        if batch_size < 1:
            raise UserError(f"--batch-size {batch_size}: must be at least 1")
        self.metrics = metrics
        self.split, self.seed = split, seed
        # Truncation is part of the protocol: psi 1 means none, whatever the cutoff.
        self.psi, self.cutoff = float(psi), (cutoff if psi != 1 else None)
        if weights not in GENERATORS:
            raise UserError(f"--generator {weights}: choose one of {', '.join(GENERATORS)}")
        self.weights = weights          # which G of each snapshot: part of the protocol
        self.batch_size = generation_batch(batch_size)
        self.device = dist.init_process_group(dist.default_device(device))
        self.rank, self.world = dist.rank(), dist.world_size()
        self.log = log if self.rank == 0 else (lambda msg: None)
        self.best_metrics = list(best_metrics or BEST_METRICS)
        self.specs: dict[str, Metric] = {m: METRICS.get(m) for m in metrics}
        # Which extractors serve which metric: every one named, or each metric's own (pr/dc: vgg16).
        self.uses = extractor_plan(metrics, parse_extractors(extractor) if extractor else None)
        names = list(dict.fromkeys(n for m in metrics for n in self.uses[m]))
        if is_resize not in IS_RESIZES:
            raise UserError(f"--is-resize {is_resize}: choose one of {', '.join(IS_RESIZES)}")
        if num_real is not None and num_real < 2:
            raise UserError(f"--num-real {num_real}: KID and the k-NN metrics need at least 2 real images (or 'all')")
        self.num_real, self.is_resize = num_real, is_resize
        shape = read_manifest(self.data_dir)
        check_data(names, shape["channels"], shape["resolution"], f"the reference data {self.data_dir}")
        # How a conditional G's classes are chosen: part of the protocol.
        self.classes = self._classes(labels, cfg, shape["num_classes"])
        self._told: set[str] = set()      # label mismatches already said
        if any(s.classes for s in self.specs.values()) and not set(names) & set(CLASSIFIERS):
            # Checked before any network is loaded: the IS needs a classifier among the extractors.
            raise UserError(f"--metrics is needs class logits, which {', '.join(names)} lack{'s' * (len(names) == 1)}: "
                            f"use --extractor inception (the Inception Score's network; "
                            f"{' or '.join(CLASSIFIERS)} have logits), e.g. --extractor {names[0]},inception")
        self.extractors = get_extractors(names, self.device, inception_weights)
        self.extractor = self.extractors[0]
        if any(s.classes for s in self.specs.values()) and not any(e.num_classes for e in self.extractors):
            raise UserError(f"--metrics is needs class logits; the weights of {', '.join(names)} have no "
                            "classification layer (the Inception file's `output` layer is missing)")
        self.num_gen = num_gen or max(e.default_num_gen for e in self.extractors)
        if self.num_gen < 2:
            raise UserError(f"--num-gen {self.num_gen}: FID/KID need at least 2 generated images")
        if "is" in self.specs and self.num_gen < IS_SPLITS:
            raise UserError(f"--num-gen {self.num_gen}: the Inception Score's {IS_SPLITS} splits need at least "
                            f"{IS_SPLITS} images")
        # The generated sample matches the real one in size (both papers compare equal numbers): the
        # first min(N, --num-real) images; --num-real all: all N.
        self.sample_gen = (min(self.num_gen, num_real or self.num_gen)
                           if any(s.sample for s in self.specs.values()) else 0)
        if ("pr" in self.specs or "dc" in self.specs) and 0 < self.sample_gen <= 5:
            raise UserError(f"--num-gen {self.num_gen}: precision/recall and density/coverage need more than "
                            "5 generated images (k = 3 and 5 nearest neighbours)")
        if ("pr" in self.specs or "dc" in self.specs) and num_real is not None and num_real <= 5:
            raise UserError(f"--num-real {num_real}: precision/recall and density/coverage need more than "
                            "5 real images (k = 3 and 5 nearest neighbours)")
        # Rank 0 alone needs the references (it scores); the others only generate.
        self.refs: dict[str, RefStats] | None = dist.on_main(lambda: {ext.name: reference_stats(
            self.data_dir, split, ext, batch_size=batch_size, log=self.log, sample_max=num_real)
            for ext in self.extractors},
            (UserError, DataError, FileNotFoundError))
        self.ref: RefStats | None = None if self.refs is None else self.refs[self.extractor.name]
        for ext in self.extractors:
            ref = None if self.refs is None else self.refs[ext.name]
            if ref is not None and ext.name in self.uses.get("fid", ()) and min(ref.num, self.num_gen) <= ext.dim:
                self.log(f"warning: {min(ref.num, self.num_gen)} samples for {ext.dim}-d {ext.name} features: "
                         "the covariance is singular and FID is unreliable (use more images)")
        self.tensorboard = "tensorboard" in cfg.log.trackers
        # TensorBoard and the run's W&B/MLflow runs (RUN/trackers.json) get the records (rank 0 alone
        # records; every rank checks that the chosen trackers are installed, so that all fail together).
        self._sink = Sink.for_evaluation(cfg, self.run_dir, self.log)

    def _classes(self, choice: str | None, cfg, num_classes: int) -> generate.LabelDistribution | None:
        """The classes generated images get (None for an unconditional run): `choice` (--labels), by
        default the run's train.gen_labels; `data` weights from the newest snapshot's record (what
        training drew from), else from the training split's class counts in the reference manifest."""
        if choice is not None and choice not in generate.LABEL_CHOICES:
            raise UserError(f"--labels {choice}: choose one of {', '.join(generate.LABEL_CHOICES)}")
        if not cfg.model.conditional:
            return None
        choice = choice or cfg.train.gen_labels
        if choice == "uniform":
            return generate.LabelDistribution("uniform", num_classes)
        for path in reversed(list_snapshots(RunDir(self.run_dir).snapshots)):
            try:
                meta = read_snapshot_meta(path, check_hash=False)
            except SnapshotError:
                continue
            if isinstance(meta.get("labels"), dict) and meta["labels"]["kind"] == "data":
                return generate.LabelDistribution.from_record(meta["labels"], meta["num_classes"])
            break
        return generate.data_labels(self.data_dir, cfg.data.split, num_classes, flag="--labels")

    def classes_of(self, G: torch.nn.Module, meta: dict) -> generate.LabelDistribution | None:
        """The classes of G's images (None: i % num_classes, or none for an unconditional G); a
        UserError when G has not the classes of the data weights. Says (once) when the snapshot was
        trained with another class distribution than the one scored."""
        if self.classes is None or self.classes.kind == "uniform" or not G.num_classes:
            self._trained_with(meta)
            return None
        if G.num_classes != self.classes.num_classes:
            raise UserError(f"{meta['json_path']}: its generator has {G.num_classes} classes, the class weights "
                            f"of {self.classes.source} {self.classes.num_classes}; score it against the data it was "
                            "trained on (--data DIR), or with --labels uniform")
        self._trained_with(meta)
        return self.classes

    def _trained_with(self, meta: dict) -> None:
        trained = meta.get("labels")
        if self.classes is None or not isinstance(trained, dict):
            return
        same = trained["kind"] == self.classes.kind and (
            trained["kind"] == "uniform" or tuple(trained["weights"]) == self.classes.weights)
        if not same and trained["kind"] not in self._told:
            self._told.add(trained["kind"])
            self.log(f"note: {Path(meta['json_path']).stem} was trained with {trained['kind']} classes "
                     f"(train.gen_labels); its scores here draw {self.classes.kind} classes (--labels)")

    def protocol(self, ext: Extractor | None = None) -> dict:
        """The fields that make a score of extractor `ext` (default: the first) comparable; stored with
        every record (each metric adds its own: `setup` and scores.py)."""
        ext = ext or self.extractor
        assert self.refs is not None
        ref = self.refs[ext.name]
        return {**ext.protocol(), "num_gen": self.num_gen, "seed": self.seed,
                "seeding": generate.SEEDING, "psi": self.psi, "cutoff": self.cutoff, "weights": self.weights,
                **(self.classes.protocol() if self.classes is not None else {"labels": "none"}),
                "reference": {"data": str(self.data_dir.resolve()), "split": self.split, "num": ref.num,
                              "sample_num": ref.sample_num, "manifest_sha256": ref.meta["manifest_sha256"]}}

    def setup(self, ext: Extractor) -> Setup:
        assert self.refs is not None
        return Setup(num_gen=self.num_gen, sample_gen=self.sample_gen, sample_ref=self.refs[ext.name].sample_num,
                     seed=self.seed, device=ext.device, is_resize=ext.resize_tag(self.is_resize))

    def _planned(self) -> list[tuple[Extractor, str, Metric]]:
        """(extractor, --metrics name, metric) of every score a snapshot gets; the IS only with class logits."""
        return [(ext, name, spec) for ext in self.extractors for name, spec in self.specs.items()
                if ext.name in self.uses[name] and (not spec.classes or ext.num_classes)]

    def series_keys(self) -> dict[str, tuple]:
        """{record name: protocol key} of every score this evaluator gives a snapshot."""
        suffix = "" if self.weights == "ema" else f"_{self.weights}"
        out = {}
        for ext, _, spec in self._planned():
            proto = {**self.protocol(ext), **spec.protocol(self.setup(ext))}
            out |= {f"{m}_{ext.name}{suffix}": protocol_key({**proto, "metric": m}) for m in spec.records}
        return out

    def _keys(self, sha: str) -> set[tuple]:
        return {(sha, key) for key in self.series_keys().values()}

    def about(self) -> dict:
        """This protocol in words, for the `main_protocol` line and messages."""
        return {"extractors": [e.name for e in self.extractors], "metrics": list(self.specs), "num_gen": self.num_gen,
                "split": self.split, "seed": self.seed, "generator": self.weights, "psi": self.psi,
                "cutoff": self.cutoff, "labels": self.classes.kind if self.classes is not None else "none"}

    def start(self, main: str | None = None, force: bool = False) -> None:
        """Before scoring (rank 0): record this protocol as the run's main one when `main` names the
        command that may set it (`watch` always; `eval --all` when the run has none, or with
        `force`: --main); say so when this is another protocol; then rewrite best.json and
        metrics.png where they disagree with metrics.jsonl (a watcher killed between the two)."""
        if self.rank != 0:
            return
        mine, line = self.series_keys(), main_protocol_line(self.run_dir)
        recorded = main_protocol(self.run_dir, [line] if line else [])
        if main and mine != recorded and (force or not recorded or main == "watch"):
            record_main_protocol(self.run_dir, mine, self.about(), main)
            self.log(f"the run's main protocol is now this one ({_words(self.about())}): best.json, metrics.png and "
                     "train.keep_snapshots follow its scores"
                     + (f"; it replaces the one `{line.get('by')}` recorded at {line.get('time')} "
                        f"({_words(line)})" if line else ""))
        elif any(name in recorded and recorded[name] != key for name, key in mine.items()):
            self.log(f"another protocol than the run's main one ({_words(line)}, recorded by `{line.get('by')}`): "
                     "these scores go to metrics.jsonl and are printed, but best.json, metrics.png and snapshot "
                     "pruning keep following the main one; ganpipe.best_snapshot(RUN, protocol={...}) ranks these"
                     + (", and `eval --all --main` makes this protocol the main one" if main else ""))
        if what := sync_best(self.run_dir, self.best_metrics):
            self.log(f"best.json disagreed with metrics.jsonl ({what}): rewritten from metrics.jsonl")

    def pending(self) -> list[dict]:
        """Records (unchecked JSON) of complete snapshots not yet scored under this protocol, oldest
        first; a record that does not read comes as {"json_path": ...} alone (scoring it says why).
        Snapshots marked bad (`mark_bad`) are left out until their files change."""
        done = {(r["snapshot_sha256"], protocol_key(r)) for r in read_records(self.run_dir)}
        marked = {m.get("identity") for m in bad_marks(self.run_dir)}
        out = []
        for path in list_snapshots(RunDir(self.run_dir).snapshots):
            if marked and self.identity(path) in marked:
                continue
            try:
                meta = read_snapshot_meta(path, check_hash=False)
            except SnapshotError:
                if path.is_file():       # else pruned since the listing
                    out.append({"json_path": str(path)})
                continue
            if not self._keys(meta["sha256"]) <= done:
                out.append(meta)
        return out

    def identity(self, json_path: str | Path) -> str:
        """What a bad mark names: the record's bytes, its weights file's size and mtime, and which G
        (a snapshot rewritten or repaired is another one)."""
        path = Path(json_path)
        try:
            record = sha256_bytes(path.read_bytes())[:32]
        except OSError:
            record = "gone"
        try:
            st = path.with_suffix(".safetensors").stat()
            weights = f"{st.st_size}-{st.st_mtime_ns}"
        except OSError:
            weights = "none"
        return f"{record}-{weights}-{self.weights}"

    def marked_bad(self) -> list[dict]:
        """The bad marks of snapshots that are still there as they were when marked (rank 0)."""
        listed = {self.identity(p) for p in list_snapshots(RunDir(self.run_dir).snapshots)}
        return [m for m in bad_marks(self.run_dir) if m.get("identity") in listed]

    def mark_bad(self, json_path: str | Path, error: Exception) -> None:
        """Record in metrics.jsonl that this snapshot cannot be scored, and why (rank 0)."""
        if self.rank == 0:
            append_records(self.run_dir, [{"kind": KIND_BAD, "snapshot": Path(json_path).stem, "generator": self.weights,
                                           "identity": self.identity(json_path), "error": str(error)[:2000],
                                           "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}])

    @contextlib.contextmanager
    def claimed(self, json_path: str | Path, recheck: bool = False) -> Iterator[bool]:
        """Whether this process scores the snapshot now (every rank gets rank 0's answer): False when
        another scorer holds its claim under this protocol (said in the log), or, with `recheck`,
        when it was scored under this protocol since it was listed. The claim lasts the block."""
        claim = None
        if self.rank == 0:
            key = f"{sha256_bytes(_bytes(json_path))[:24]}-{self.protocol_id()}"
            claim = LockFile(RunDir(self.run_dir).claim(key))
            if not claim.acquire():
                self.log(f"{Path(json_path).stem} is being scored under this protocol by {claim.describe()}: left to it")
                claim = None
            elif recheck and self._scored(json_path):
                claim.release()
                claim = None
        mine = bool(dist.broadcast_object(claim is not None))
        try:
            yield mine
        finally:
            if claim is not None:
                claim.release()

    def _scored(self, json_path: str | Path) -> bool:
        try:
            sha = read_snapshot_meta(json_path, check_hash=False)["sha256"]
        except SnapshotError:
            return False
        return self._keys(sha) <= {(r["snapshot_sha256"], protocol_key(r)) for r in read_records(self.run_dir)}

    def protocol_id(self) -> str:
        """A short name of this protocol (its series' keys), for claim files."""
        return sha256_bytes(json.dumps(sorted(self.series_keys().items())).encode())[:16]

    def score(self, snapshot: str | Path) -> list[dict]:
        """Score one snapshot (sha256 checked); records on rank 0, [] on other ranks."""
        t0 = time.perf_counter()
        G, meta = load_snapshot(snapshot, device=self.extractor.device, weights=self.weights)
        if G.channels not in (1, 3) or not G.resolution:
            raise SnapshotError(f"{meta['json_path']}: its generator makes {G.channels}-channel "
                                f"{'images' if G.resolution else 'vectors'}; the extractors score grey or RGB images")
        classes = self.classes_of(G, meta)
        # A post-hoc EMA rebuild (`ganpipe posthoc-ema`) is its own protocol: weights "posthoc" and its std.
        which = {}
        if "posthoc_ema" in meta:
            std = meta["posthoc_ema"].get("std") if isinstance(meta["posthoc_ema"], dict) else None
            if isinstance(std, bool) or not isinstance(std, (int, float)):
                raise SnapshotError(f"{meta['json_path']}: posthoc_ema.std {str(std)[:80]!r} is not a number")
            which = {"weights": "posthoc", "posthoc_std": std}
        suffix = "" if self.weights == "ema" else f"_{self.weights}"      # raw scores: their own series
        t1 = time.perf_counter()
        # One pass: every image generated once, every extractor run once over it.
        # Each extractor keeps what its own metrics need.
        used = {flag: {n for m, spec in self.specs.items() if getattr(spec, flag) for n in self.uses[m]}
                for flag in ("moments", "classes", "sample")}
        stats = generated_statistics(
            G, self.extractors, num=self.num_gen, batch_size=self.batch_size, seed=self.seed,
            moments=used["moments"], classes=used["classes"],
            keep={n: self.sample_gen for n in used["sample"]},
            generate_kwargs={"psi": self.psi, "cutoff": self.cutoff, "classes": classes}, is_resize=self.is_resize)
        gen_s = time.perf_counter() - t1
        if self.rank != 0:
            return []
        assert self.refs is not None
        records = []
        for ext, name, spec in self._planned():
            t2 = time.perf_counter()
            setup = self.setup(ext)
            values = spec.compute(stats[ext.name], self.refs[ext.name], setup)
            metric_s = (time.perf_counter() - t2) / len(values)
            for metric, (value, extra) in values.items():
                records.append({
                    "name": f"{metric}_{ext.name}{suffix}", "metric": metric, "value": value,
                    "snapshot": Path(meta["json_path"]).stem, "snapshot_sha256": meta["sha256"],
                    "cur_nimg": meta["cur_nimg"], "kimg": meta.get("kimg", meta["cur_nimg"] / 1000),
                    **self.protocol(ext),
                    **spec.protocol(setup), **extra, **which,
                    "seconds": round(metric_s + gen_s + (t1 - t0), 3),
                    "generate_featurize_s": round(gen_s, 3),
                    "images_per_s": round(self.num_gen / max(gen_s, 1e-9), 1),
                    "extractors": [e.name for e in self.extractors],   # featurised in the same pass
                    "batch_size": self.batch_size, "world_size": self.world, "device": str(ext.device),
                    "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                })
        return records

    def refresh_best(self) -> None:
        """Rewrite best.json and metrics.png from metrics.jsonl with this evaluator's best metrics (rank 0)."""
        if self.rank != 0:
            return
        lines = read_lines(self.run_dir)
        everything = scores(lines)
        if everything:
            main = main_protocol(self.run_dir, lines)
            write_best(self.run_dir, everything, self.best_metrics, main)
            plot_metrics(self.run_dir, everything, main)

    def record(self, records: list[dict]) -> None:
        """Append to metrics.jsonl, then refresh best.json, TensorBoard and metrics.png (rank 0)."""
        if self.rank != 0 or not records:
            return
        append_records(self.run_dir, records)
        lines = read_lines(self.run_dir)
        everything = scores(lines)
        main = main_protocol(self.run_dir, lines)
        write_best(self.run_dir, everything, self.best_metrics, main)
        # Scores under another protocol than the main one of their name get a tag of their own in
        # TensorBoard / W&B / MLflow, apart from the main curve.
        other = {id(r) for r in records if main.get(r["name"], protocol_key(r)) != protocol_key(r)}
        self._sink.scores([{**r, "name": f"{r['name']}/{_tag(r)}"} if id(r) in other else r for r in records],
                          self.run_dir, self.tensorboard)
        plot_metrics(self.run_dir, everything, main)
        for r in records:
            ref = r["reference"]
            self.log(f"{r['snapshot']} kimg {r['kimg']:g}: {r['name']} {r['value']:.6g} "
                     f"({r['num_gen']} generated vs {ref['split']} {ref['num']}, {r['seconds']:.1f} s)"
                     + (" (not the main protocol)" if id(r) in other else ""))

    @property
    def writer(self):
        """The TensorBoard writer of RUN/tb once a score was recorded here (None before)."""
        return None if self._sink.tensorboard is None else self._sink.tensorboard.writer

    def close(self) -> None:
        self._sink.close()


def _bytes(path: str | Path) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError:
        return str(path).encode()


def _tag(record: dict) -> str:
    """A record's protocol in a tracker tag: n1000-test-seed0 (and its generator, psi)."""
    tag = f"n{record['num_gen']}-{record['reference']['split']}-seed{record['seed']}"
    if record.get("weights", "ema") != "ema":
        tag += f"-{record['weights']}"
    return tag + (f"-psi{record['psi']:g}" if record.get("psi", 1.0) != 1.0 else "")


def _words(about: dict | None) -> str:
    """A protocol in words, from a `main_protocol` line or `Evaluator.about()`."""
    if not about:
        return "?"
    out = (f"{','.join(about.get('metrics', []))} with {','.join(about.get('extractors', []))}, "
           f"{about.get('num_gen')} generated vs {about.get('split')}, seed {about.get('seed')}, "
           f"{about.get('generator', 'ema')} G")
    out += f", psi {about['psi']:g}" if about.get("psi", 1.0) != 1.0 else ""
    return out + (f", {about['labels']} classes" if about.get("labels", "none") != "none" else "")
