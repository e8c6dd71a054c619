"""The evaluation stage: scores saved snapshots (FID, KID, P/R, D/C, IS) while training goes on.

    ganpipe refstats DATA_DIR --extractor mnist        # reference statistics, cached beside the data
    ganpipe eval --run-dir RUN --all --extractor mnist # score every snapshot not yet scored
    ganpipe watch --run-dir RUN --extractor mnist      # periodic job: each new snapshot once

Modules: `features` (extractor registry: inception, mnist, dinov2-b14, dinov2-l14), `mnist_net`
(the offline feature network and its weights), `fid` (Fréchet distance and KID through
clean-fid), `manifold` (precision/recall, density/coverage), `stats` (one pass over the generated
images: running float64 sums, IS sums, a feature sample), `scores` (the `--metrics` registry),
`refstats` (reference statistics cache), `records` (RUN/metrics.jsonl, RUN/best.json,
RUN/metrics.png, the run's main protocol, bad-snapshot marks), `claims` (one scorer per snapshot
and protocol), `evaluator` (scores snapshots under one protocol; images from
`pipeline.generate`), `commands` (`ganpipe eval` and `ganpipe watch`) and `compare` (`ganpipe
compare`). tools/train_mnist_extractor.py reproduces the mnist weights.
"""
