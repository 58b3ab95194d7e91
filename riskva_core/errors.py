"""User-facing errors: the CLI prints ``str(err)`` as one line and exits with ``exit_code``."""
from __future__ import annotations


class RiskvaError(Exception):
    """An error caused by input, not by a bug: shown as one line, never a traceback."""

    exit_code = 2

    def __init__(self, message: str, exit_code: int | None = None):
        super().__init__(message)
        if exit_code is not None:
            self.exit_code = exit_code


def is_out_of_memory(exc: BaseException) -> bool:
    """The device ran out of memory: an infrastructure failure (retry, or a smaller batch), never
    an answer about an input, so it must not be reported as a per-image error."""
    import torch

    return isinstance(exc, torch.OutOfMemoryError) or (
        isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower())
