"""Exceptions shared across lazarus-core."""


class BackendUnavailableError(RuntimeError):
    """An explicitly requested kernel backend cannot run here; the message says what is missing."""
