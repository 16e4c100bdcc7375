"""User-facing errors: the CLI prints these as one clear message, never a traceback."""
from __future__ import annotations


class TunelabError(Exception):
    """A mistake in the user's input (config, data, paths); shown without a traceback."""


class ConfigError(TunelabError, ValueError):
    """A config key has a bad value or is unknown. The message names the key path."""


class DataError(TunelabError, ValueError):
    """A data row is malformed. Carries the file, line (1-based) and field."""

    def __init__(self, message: str, *, file: str, line: int | None = None, field: str | None = None):
        self.file, self.line, self.field = file, line, field
        where = file if line is None else f"{file}:{line}"
        if field:
            where += f": field '{field}'"
        super().__init__(f"{where}: {message}")


class Interrupted(TunelabError):
    """Training stopped on SIGINT/SIGTERM after saving what it had; the message says how to resume.
    `exit_code` is what `tunelab train` exits with (130 for SIGINT, 143 for SIGTERM)."""

    def __init__(self, message: str, *, exit_code: int = 130):
        self.exit_code = exit_code
        super().__init__(message)
