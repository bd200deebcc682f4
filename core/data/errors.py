"""Exceptions shared by the data layer."""


class BadSample(Exception):
    """A sample that cannot be used; the stream skips it and counts it under `reason`."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class DataError(RuntimeError):
    """The data is too broken to go on (e.g. too many bad samples): stops the run."""
