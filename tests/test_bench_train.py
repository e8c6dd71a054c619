"""`ganpipe bench train` at toy size: the pairs run and report what they measured (the figures
themselves come from the full command on a quiet machine, never from a test)."""

import argparse

from pipeline.bench import train as bench_train


def test_bench_train_reports_the_trainer_against_the_bare_loop():
    args = argparse.Namespace(cases=["mlp-mnist"], kimg=0.256, skip_multiprocess=True, set=[], repeats=2)
    out = bench_train.run(args)
    entry = out["cases"]["mlp-mnist"]
    bare, full = entry["bare_pytorch_loop"], entry["trainer_1proc_2threads"]
    assert out["repeats"] == 2 and len(bare["runs"]) == len(full["runs"]) == 2
    assert all(r > 0 for r in (*bare["runs"], *full["runs"], *full["from_first_tick_runs"]))
    # each round's ratio pairs the runs of that round; the headline figures are medians
    assert entry["trainer_over_bare_runs"] == [round(f / b, 3) for f, b in zip(full["runs"], bare["runs"])]
    assert entry["trainer_over_bare"] == round(sum(entry["trainer_over_bare_runs"]) / 2, 3)
    assert bare["images_per_s"] == round(sum(bare["runs"]) / 2, 1)
    assert bare["params"] == {"G": 1_486_352, "D": 1_460_225}          # the MLP GAN's layers
    assert bare["steps"] == 2                                           # 0.128 kimg: the trainer's steady window
    assert full["startup_and_exit_s"] > 0 and "trainer_2procs_1thread" not in entry
    assert 0 < full["startup_s"] < full["wall_s_including_startup"]


def test_gloo_all_reduce_is_timed_between_two_processes():
    out = bench_train.allreduce_ms({"G": 1_000, "D": 200_000})
    assert out["G"]["numel"] == 1_000 and out["D"]["mib"] == round(200_000 * 4 / 2**20, 2)
    assert out["G"]["ms"] > 0 and out["D"]["ms"] > 0
    assert out["ms_per_G_step"] == round(out["G"]["ms"] + out["D"]["ms"], 3)


def test_bench_train_runs_a_precision_and_the_sync_debug_run():
    """`--precision bf16 --sync-debug` (what `make bench-gpu` asks of a GPU) on the CPU at toy
    size: the case is keyed by its precision, both loops ran under it, and the sync-debug trainer
    run finished (on a CPU the mode does not exist, so it says it checked nothing)."""
    args = argparse.Namespace(cases=["mlp-mnist"], kimg=0.256, skip_multiprocess=True, set=[], repeats=1,
                              precision=["bf16"], sync_debug=True)
    out = bench_train.run(args)
    entry = out["cases"]["mlp-mnist-bf16"]
    assert list(out["cases"]) == ["mlp-mnist-bf16"] and out["device"] == "cpu"
    assert entry["precision"] == entry["bare_pytorch_loop"]["precision"] == "bf16" and entry["batch"] == 64
    assert entry["sync_debug"] == {"checked": False, "passed": True}
    full = entry["trainer_1proc_2threads"]
    assert full["s_per_kimg"] > 0 and "gpu_utilisation_percent" not in full


def test_every_bench_case_is_a_config_the_trainer_accepts():
    """A case's config and overrides pass the same checks as `ganpipe config` (a case that the
    trainer refuses would only show on the machine that benchmarks it)."""
    from pipeline.bench.train import CASES
    from pipeline.catalog import load_config

    for name, case in CASES.items():
        cfg = load_config(case["config"], case["overrides"])
        assert cfg.model.name, name


def test_the_approximate_demo_case_differs_from_the_demo_only_in_approximate():
    """`rpgan-mnist-approx` restates the demo's penalties: they must stay the demo's (gamma, interval,
    schedule) with `approximate` on, or the side-by-side compares two recipes."""
    import dataclasses

    from pipeline.bench.train import CASES
    from pipeline.catalog import load_config

    exact, approx = (load_config(CASES[n]["config"], CASES[n]["overrides"]).loss.penalties
                     for n in ("rpgan-mnist", "rpgan-mnist-approx"))
    assert [p.approximate for p in exact] == [False, False] and [p.approximate for p in approx] == [True, True]
    assert [dataclasses.replace(p, approximate=False) for p in approx] == exact


def test_gpu_utilisation_keeps_the_steady_windows_samples(tmp_path):
    """Each nvidia-smi sample notes how many stats rows the run had written; the steady median
    takes those between the middle tick's row and the last (the window of bench train's img/s)."""
    from pipeline.bench.train import GpuUtilisation

    stats = tmp_path / "stats.jsonl"
    util = GpuUtilisation(stats)
    assert util.rows_written() == 0                        # no file yet
    stats.write_text("{}\n{}\n")
    assert util.rows_written() == 2
    # start-up (0 rows), the first ticks, the steady window (rows 3-4 of 5 written), the exit (5 rows)
    util.samples = [0, 0, 10, 10, 90, 95, 92, 0, 0, 0]
    util.rows_then = [0, 0, 1, 2, 3, 3, 4, 5, 5, 5]
    out = util.summary(steady_from=5 // 2 + 1, rows=5)
    assert out["median"] == 5.0 and out["steady_median"] == 92.0 and out["steady_samples"] == 3
    assert "steady_median" not in util.summary()


def test_the_bare_loop_runs_the_demos_conditional_networks(mnist_dir):
    # The demo is class-conditional: its bare loop builds G and D with the data's classes and feeds
    # them the real batch's labels (a conditional D refuses a batch without them).
    from conftest import REPO

    tiny = ["model.g_width=0.125", "model.d_width=0.125", "data.batch_size=16"]
    config = str(REPO / "configs" / "mnist_rpgan.yaml")
    cond = bench_train.bare_rate(config, mnist_dir, tiny, kimg=0.064, threads=1)
    plain = bench_train.bare_rate(config, mnist_dir, [*tiny, "model.conditional=false"], kimg=0.064, threads=1)
    assert cond["images_per_s"] > 0 and cond["steps"] == 2
    assert cond["params"]["G"] > plain["params"]["G"] and cond["params"]["D"] > plain["params"]["D"]
