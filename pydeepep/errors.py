"""Exceptions raised by pydeepep: one base class carrying the C result code, one subclass per kind."""

from __future__ import annotations

__all__ = [
    "DeepEPError",
    "DeepEPInvalidArgument",
    "DeepEPInvalidUsage",
    "DeepEPCudaError",
    "DeepEPNvshmemError",
    "DeepEPOutOfMemory",
    "DeepEPTimeoutError",
    "DeepEPNoDevice",
    "DeepEPNotSupported",
    "DeepEPInternalError",
    "DeepEPBufferTooSmall",
    "DeepEPRemoteError",
    "error_for_status",
]


class DeepEPError(RuntimeError):
    """A libdeepep call failed. ``status`` is the deepepResult_t code, ``message`` what was wrong."""

    status: int = -1

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.message = message
        if status is not None:
            self.status = status

    def __reduce__(self):  # picklable across processes (launchers send errors back to the parent)
        return (type(self), (self.message, self.status))


class DeepEPInvalidArgument(DeepEPError, ValueError):
    status = 1


class DeepEPInvalidUsage(DeepEPError):
    status = 2


class DeepEPCudaError(DeepEPError):
    status = 3


class DeepEPNvshmemError(DeepEPError):
    status = 4


class DeepEPOutOfMemory(DeepEPError, MemoryError):
    status = 5


class DeepEPTimeoutError(DeepEPError, TimeoutError):
    status = 6


class DeepEPNoDevice(DeepEPError):
    status = 7


class DeepEPNotSupported(DeepEPError):
    status = 8


class DeepEPInternalError(DeepEPError):
    status = 9


class DeepEPBufferTooSmall(DeepEPError):
    status = 10


class DeepEPRemoteError(DeepEPError):
    status = 11


_BY_STATUS = {
    cls.status: cls
    for cls in (
        DeepEPInvalidArgument,
        DeepEPInvalidUsage,
        DeepEPCudaError,
        DeepEPNvshmemError,
        DeepEPOutOfMemory,
        DeepEPTimeoutError,
        DeepEPNoDevice,
        DeepEPNotSupported,
        DeepEPInternalError,
        DeepEPBufferTooSmall,
        DeepEPRemoteError,
    )
}


def error_for_status(status: int, message: str) -> DeepEPError:
    """The exception for a non-zero deepepResult_t (an unknown code gives the base class)."""
    return _BY_STATUS.get(status, DeepEPError)(message, status)
