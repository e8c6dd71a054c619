"""ganpipe: a distributed training pipeline for image GANs."""

__version__ = "0.1.0"

# The Python API (pipeline/api.py), imported on first use so that `import pipeline` (and the CLI's
# start-up) stays light: `import pipeline as ganpipe; ganpipe.load_generator(...)`.
_API = ("Generator", "load_generator", "read_metrics", "best_snapshot", "latest_snapshot", "resolve_snapshot")


def __getattr__(name: str):
    if name in _API:
        from pipeline import api

        return getattr(api, name)
    raise AttributeError(f"module 'pipeline' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_API])
