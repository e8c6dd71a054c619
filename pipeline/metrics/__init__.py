"""The evaluation stage: scores saved snapshots (FID/KID) while training goes on.

    ganpipe refstats DATA_DIR --extractor mnist        # reference statistics, cached beside the data
    ganpipe eval --run-dir RUN --all --extractor mnist # score every snapshot not yet scored
    ganpipe watch --run-dir RUN --extractor mnist      # periodic job: each new snapshot once

Modules: `features` (extractor registry: inception, mnist), `fid` (statistics, Fréchet distance
and KID through clean-fid), `refstats` (reference statistics cache), `evaluate` (generation from
a snapshot, records in RUN/metrics.jsonl, RUN/best.json, TensorBoard, RUN/metrics.png), `watch`
(the polling job), `mnist_extractor` (the offline feature network and its training script).
"""
