"""sftflow's exceptions: one base, so the CLI turns exactly these into one-line messages.

Each also derives from the builtin it stands for (``InputError`` is a ``ValueError``), so a
caller that catches the builtin keeps working. Anything that is not an ``SftflowError`` is a
bug, and the CLI shows its traceback.
"""

from __future__ import annotations


class SftflowError(Exception):
    """An error whose message says what went wrong and where: bad input, a refused stage, a down server."""


class ConfigError(SftflowError):
    """A config that cannot be used; the message names every bad field."""


class InputError(SftflowError, ValueError):
    """Bad input: a data file, a record, a path, a registry reference or a setting that cannot work."""


class MissingError(SftflowError, FileNotFoundError):
    """A file, folder or model that should exist and does not."""


class StageFailed(SftflowError, RuntimeError):
    """A stage that stopped for a reason it names (training failed, a gate refused, a check failed)."""


class Unreachable(SftflowError, ConnectionError):
    """A server (MLflow, vLLM, a rendezvous) that cannot be reached."""


class Unauthorized(SftflowError, PermissionError):
    """A server that refused the credentials it was sent, or their absence."""


class StageTimeout(SftflowError, TimeoutError):
    """Something that did not finish within its deadline."""


class OutOfMemory(SftflowError, MemoryError):
    """Training that ran out of device memory, with the estimate's advice."""


class DiskFull(SftflowError, OSError):
    """A write that found no space left, naming the stage."""
