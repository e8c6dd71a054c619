"""Optional packages. Each belongs to one extra of pyproject.toml; a command that needs a missing
one stops with one line naming the extra, and a side output that needs one is skipped with one.

    timm = require("timm", "dinov2", "--extractor dinov2-b14")    # the module, or MissingExtra
    if not optional("matplotlib", "plots", "RUN/metrics.png"):     # False, and one line on stderr
        return None
"""

from __future__ import annotations

import importlib
import sys
from types import ModuleType

from pipeline.errors import MissingExtra


def _hint(extra: str) -> str:
    return f"pip install 'ganpipe[{extra}]'"


def require(package: str, extra: str, what: str) -> ModuleType:
    """The top-level `package`, imported; MissingExtra saying that `what` needs it and which extra
    installs it when it is not installed."""
    try:
        return importlib.import_module(package)
    except ImportError as exc:
        if exc.name != package:         # installed but broken: its own error says more than ours
            raise
        raise MissingExtra(f"{what} needs {package}, which is not installed: {_hint(extra)}") from None


def optional(package: str, extra: str, what: str) -> bool:
    """Whether `package` imports. When it does not, one line on stderr says that `what` was skipped
    and which extra gives it."""
    try:
        require(package, extra, what)
    except MissingExtra:
        print(f"ganpipe: {what} skipped: {package} is not installed ({_hint(extra)})", file=sys.stderr, flush=True)
        return False
    return True
