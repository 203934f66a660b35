"""The one error type of checkpoint handling (a user error: one line that names the fix)."""


class CheckpointError(ValueError):
    """A checkpoint cannot be used or written; the message names the fix."""
