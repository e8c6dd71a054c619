"""Every user-facing error type. The CLI prints any of them as one line (no traceback) and exits
with status 2 (bad input) or 1 (training cannot go on). Each message names the file, key or shard
and says what to do. This module imports nothing, so every floor of the package can raise them.
"""


class UserError(Exception):
    """Bad input from the user (arguments, paths, options)."""


class ConfigError(UserError, ValueError):
    """A config problem; the message names the dotted key and the remedy."""


class SourceError(UserError, ValueError):
    """An image collection `ganpipe prepare` cannot read; names the path and what was expected."""


class SnapshotError(UserError, ValueError):
    """A snapshot that is incomplete, corrupt or of an unknown format; the message names it."""


class MissingExtra(UserError, ImportError):
    """An optional package a command needs is not installed; the message names the extra that has it."""


class DataError(RuntimeError):
    """Data that cannot be trained on or evaluated; names the shard and what to do."""


class BadSample(ValueError):
    """One sample that cannot be used (skipped and counted); `kind` is its counter name."""

    def __init__(self, message: str, kind: str = "undecodable"):
        super().__init__(message)
        self.kind = kind


class TruncatedTar(EOFError):
    """A tar stream that ends early or holds a corrupt header."""


class TrainingError(RuntimeError):
    """Training cannot go on; the message names the last good checkpoint."""


def printable(text: str | bytes, max_chars: int = 300) -> str:
    """`text` as it may be printed: an untrusted name (a tar member, a key, a file name, a manifest
    entry) with its control characters (ANSI escapes, carriage returns, bidi overrides) written
    out as `repr` writes them and backslashes doubled, so it can neither draw on the terminal nor
    pass for other text. Undecodable bytes, which the readers keep as surrogates
    (`surrogateescape`), come out as the byte they were (`\\xff`), so no encoder fails on them.
    Every message that quotes such a name goes through this function. A name longer than
    `max_chars` is cut there, and says so.
    """
    if isinstance(text, bytes):
        text = text.decode("utf-8", "surrogateescape")
    cut = ""
    if len(text) > max_chars:
        text, cut = text[:max_chars], f"...({len(text)} characters)"
    if text.isprintable() and "\\" not in text:
        return text + cut
    out = []
    for ch in text:
        if "\udc80" <= ch <= "\udcff":
            out.append(f"\\x{ord(ch) - 0xDC00:02x}")
        elif ch == "\\":
            out.append("\\\\")
        elif ch.isprintable():
            out.append(ch)
        else:
            out.append(repr(ch)[1:-1])
    return "".join(out) + cut
