"""The evaluation stage: scores saved snapshots (FID/KID) while training goes on.

    ganpipe refstats DATA_DIR --extractor mnist        # reference statistics, cached beside the data
    ganpipe eval --run-dir RUN --all --extractor mnist # score every snapshot not yet scored
    ganpipe watch --run-dir RUN --extractor mnist      # periodic job: each new snapshot once

Modules: `features` (extractor registry: inception, mnist), `mnist_net` (the offline feature
network and its weights), `fid` (statistics, Fréchet distance and KID through clean-fid),
`refstats` (reference statistics cache), `records` (RUN/metrics.jsonl, RUN/best.json,
RUN/metrics.png), `evaluator` (scores snapshots under one protocol; images from
`pipeline.generate`), `commands` (`ganpipe eval` and `ganpipe watch`), and
`train_mnist_extractor` (the script that reproduces the mnist weights).
"""
