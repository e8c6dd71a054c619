"""Errors the CLI prints as one line (no traceback): each message names the file, key or shard
and says what to do. Kept in a module without heavy imports so the CLI can catch them cheaply."""


class UserError(Exception):
    """Bad input from the user (arguments, paths, options)."""


class DataError(RuntimeError):
    """Data that cannot be trained on or evaluated; names the shard and what to do."""


class TrainingError(RuntimeError):
    """Training cannot go on; the message names the last good checkpoint."""
