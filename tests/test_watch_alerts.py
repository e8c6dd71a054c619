"""Watching a run go wrong: divergence and collapse alerts from the scores, `ganpipe watch
--stop-on-alert`, and the trainer stopping cleanly at its next tick on RUN/STOP, then resuming."""

from __future__ import annotations

import json

import torch

from pipeline.metrics.alerts import AlertRules, check, new_alerts, record_alerts, recorded_alerts
from pipeline.metrics.records import read_records
from pipeline.rundir import RunDir
from pipeline.training.checkpoint import list_checkpoints
from pipeline.training.snapshot import list_snapshots
from test_metrics import make_run, mlp_generator, mnist_ext, mnist_ref, one_digit_generator  # noqa: F401
from test_posthoc_ema import PHEMA, ganpipe, phema_run  # noqa: F401
from test_train import assert_same_state, final_state, rows, train

STOP = RunDir.STOP


def scores(metric: str, values: list[float], seed: int = 0, extractor: str = "mnist") -> list[dict]:
    """Hand-made score records of one series, a snapshot per kimg 1, 2, ..."""
    return [{"name": f"{metric}_{extractor}", "metric": metric, "value": v, "snapshot": f"snapshot-{i:09d}",
             "snapshot_sha256": f"sha{i}", "cur_nimg": i * 1000, "kimg": float(i), "extractor": extractor,
             "extractor_sha256": "e", "resize": "clean28", "num_gen": 500, "seed": seed, "seeding": "seed-index-v1",
             "reference": {"split": "train", "num": 4000, "manifest_sha256": "m"}}
            for i, v in enumerate(values, start=1)]


def kinds(alerts: list[dict]) -> list[tuple]:
    return [(a["alert"], a["name"], a["snapshot"]) for a in alerts]


def test_divergence_needs_every_one_of_the_newest_snapshots_worse_than_the_best_by_the_margin():
    rules = AlertRules(worse_by=0.25, patience=3)
    # best 30; the newest three are all above 37.5
    alerts = check(scores("fid", [50, 40, 30, 45, 46, 47]), rules)
    assert kinds(alerts) == [("divergence", "fid_mnist", "snapshot-000000006")]
    a = alerts[0]
    assert (a["kind"], a["best"], a["best_snapshot"], a["value"]) == ("alert", 30, "snapshot-000000003", 47)
    assert check(scores("fid", [50, 40, 30, 45, 37, 47]), rules) == []          # 37 is within 25% of 30
    assert check(scores("fid", [50, 40, 30, 45, 46]), rules) == []              # two in a row, not three
    assert check(scores("fid", [60, 50, 40, 30]), rules) == []                  # improving
    assert kinds(check(scores("fid", [50, 40, 30, 45, 37, 47]), AlertRules(worse_by=0.2, patience=3)))
    assert kinds(check(scores("fid", [30, 45]), AlertRules(worse_by=0.25, patience=1)))
    # Higher is better for precision: a fall below the best by the margin.
    assert kinds(check(scores("precision", [0.5, 0.8, 0.5, 0.55, 0.58]), AlertRules(metrics=("precision",))))
    assert check(scores("precision", [0.5, 0.8, 0.5, 0.55, 0.7]), AlertRules(metrics=("precision",))) == []
    assert check(scores("precision", [0.5, 0.8, 0.5, 0.55, 0.58]), rules) == []    # not a checked metric
    # A new protocol (another seed) starts a new series: its two scores are not three in a row.
    mixed = scores("fid", [50, 40, 30, 45, 46, 47]) + scores("fid", [44, 45], seed=1)
    assert check(mixed, rules) == []


def test_collapse_is_recall_or_coverage_below_the_threshold_for_the_newest_snapshots():
    recall = scores("recall", [0.5, 0.15, 0.1, 0.05])
    assert kinds(check(recall, AlertRules(min_recall=0.2))) == [("collapse", "recall_mnist", "snapshot-000000004")]
    assert check(recall, AlertRules(min_recall=0.2, patience=4)) == []           # 0.5 was above
    assert check(recall, AlertRules()) == []                                     # no threshold: off
    assert check(recall, AlertRules(min_coverage=0.2)) == []                     # coverage's, not recall's
    coverage = scores("coverage", [0.3, 0.1, 0.1, 0.1])
    assert kinds(check(coverage, AlertRules(min_coverage=0.2))) == [("collapse", "coverage_mnist", "snapshot-000000004")]


def test_alerts_are_recorded_once_and_score_readers_skip_them(tmp_path):
    from pipeline.metrics.records import append_records

    recs = scores("fid", [30, 45, 46, 47])
    append_records(tmp_path, recs)
    alerts = check(recs, AlertRules(patience=3))
    assert len(new_alerts(tmp_path, alerts)) == 1
    record_alerts(tmp_path, alerts)
    assert new_alerts(tmp_path, alerts) == [] and kinds(recorded_alerts(tmp_path)) == kinds(alerts)
    assert read_records(tmp_path) == recs                  # the alert line is not a score
    assert RunDir(tmp_path).stop == tmp_path / STOP        # the watcher writes the file the trainer reads


def test_watch_records_the_alert_and_stops_the_run(tmp_path, mnist_dir, mnist_ref, capsys):
    # A good snapshot (one real digit) then two of noise: FID worse than the best, twice in a row.
    run = make_run(tmp_path, mnist_dir, {1000: one_digit_generator(mnist_dir), 2000: mlp_generator(0),
                                         3000: mlp_generator(1)})
    out, _ = ganpipe(capsys, "watch", "--run-dir", str(run), "--once", "--extractor", "mnist", "--num-gen", "300",
                     "--metrics", "fid", "--batch-size", "100", "--alert-patience", "2", "--alert-worse-by", "0.2",
                     "--stop-on-alert")
    fids = [r["value"] for r in read_records(run)]
    assert len(fids) == 3 and min(fids[1:]) > 1.2 * fids[0]       # what the alert is about, as scored
    alerts = recorded_alerts(run)
    assert kinds(alerts) == [("divergence", "fid_mnist", "snapshot-000003000")]
    assert alerts[0]["best_snapshot"] == "snapshot-000001000" and alerts[0]["patience"] == 2
    assert "ALERT divergence: fid_mnist diverging" in out and "--stop-on-alert" in out
    assert (run / STOP).read_text().startswith("ganpipe watch --stop-on-alert: fid_mnist diverging")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / "tb"))
    acc.Reload()
    assert [(e.step, e.value) for e in acc.Scalars("Alerts/fid_mnist")] == [(3000, 1.0)]


def test_trainer_stops_at_the_next_tick_on_run_stop_and_resumes_exactly(tmp_path, mnist_dir, phema_run):
    """RUN/STOP present from the start: the first tick checkpoints and exits 0; with the file
    removed the run resumes and ends exactly where an uninterrupted one (phema_run) does, EMA
    profiles and raw G included."""
    run = tmp_path / "run"
    run.mkdir()
    (run / STOP).write_text("diverging, says the test\n")
    out = train(run, mnist_dir, *PHEMA)
    assert "stopped on request (diverging, says the test): checkpoint" in out.stdout
    assert "exiting with status 0" in out.stdout and "at kimg 0.032" in out.stdout
    assert [r["kimg"] for r in rows(run)] == [0.032] and not (run / "FINISHED").exists()
    assert [p.name for p in list_checkpoints(run)] == ["ckpt-000000032"] and (run / STOP).is_file()

    (run / STOP).unlink()
    out = train(run, mnist_dir, *PHEMA)
    assert "resumed from" in out.stdout and "ckpt-000000032" in out.stdout and (run / "FINISHED").is_file()
    assert [r["kimg"] for r in rows(run)] == [0.032, 0.064, 0.096, 0.128]
    a, b = final_state(phema_run), final_state(run)
    assert_same_state(a, b)
    assert a["posthoc_ema"]["t"] == b["posthoc_ema"]["t"] == 8
    for pa, pb in zip(a["posthoc_ema"]["models"], b["posthoc_ema"]["models"]):
        assert all(torch.equal(pa[k], pb[k]) for k in pa)
    # Every snapshot, before and after the stop, has the same weights, raw and profiles as the straight run's.
    for sa, sb in zip(list_snapshots(phema_run / "snapshots"), list_snapshots(run / "snapshots"), strict=True):
        ma, mb = json.loads(sa.read_text()), json.loads(sb.read_text())
        assert ma["sha256"] == mb["sha256"]
        assert {k: v["sha256"] for k, v in ma["variants"].items()} == {k: v["sha256"] for k, v in mb["variants"].items()}
