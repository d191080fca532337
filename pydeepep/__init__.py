"""pydeepep: expert-parallel communication for Mixture-of-Experts models (Python bindings of libdeepep).

Arrays in are any device arrays exposing DLPack or ``__cuda_array_interface__`` (CuPy, PyTorch, JAX, numba,
cuda.core); arrays out are :class:`DeviceArray` objects exporting both. Streams are cuda.core streams, objects with
``__cuda_stream__``, PyTorch/CuPy streams or integer handles.
"""

from __future__ import annotations

import os as _os

from .errors import (
    DeepEPBufferTooSmall,
    DeepEPCudaError,
    DeepEPError,
    DeepEPInternalError,
    DeepEPInvalidArgument,
    DeepEPInvalidUsage,
    DeepEPNoDevice,
    DeepEPNotSupported,
    DeepEPNvshmemError,
    DeepEPOutOfMemory,
    DeepEPRemoteError,
    DeepEPTimeoutError,
)

_PACKAGE_DIR = _os.path.dirname(_os.path.abspath(__file__))


def get_include() -> str:
    """Directory holding deepep/deepep.h and deepep/version.h, for C and C++ builds."""
    return _os.path.join(_PACKAGE_DIR, "include")


def get_lib_dir() -> str:
    """Directory holding libdeepep.so."""
    return _os.path.join(_PACKAGE_DIR, "lib")


def get_cmake_dir() -> str:
    """Directory holding deepepConfig.cmake (pass as deepep_DIR, or add its parent to CMAKE_PREFIX_PATH)."""
    return _os.path.join(_PACKAGE_DIR, "lib", "cmake", "deepep")


from ._core import (  # noqa: E402
    CombineResult,
    Communicator,
    DeviceArray,
    DispatchResult,
    Event,
    Handle,
    LowLatencyCombineResult,
    LowLatencyDispatchResult,
    RefusedHandle,
    buffer_size_hint,
    empty,
    empty_cache,
    error_string,
    get_unique_id,
    to_device,
    version,
)
from .launch import LaunchError, spawn  # noqa: E402

__version__ = "{}.{}.{}".format(*version())

# pydeepep.bootstrap and pydeepep.reference after a plain `import pydeepep` (bootstrap needs the names above).
from . import bootstrap as bootstrap  # noqa: E402
from . import reference as reference  # noqa: E402

__all__ = [
    "Communicator",
    "CombineResult",
    "DeviceArray",
    "DispatchResult",
    "Event",
    "Handle",
    "LowLatencyCombineResult",
    "LowLatencyDispatchResult",
    "RefusedHandle",
    "DeepEPError",
    "DeepEPBufferTooSmall",
    "DeepEPCudaError",
    "DeepEPInternalError",
    "DeepEPInvalidArgument",
    "DeepEPInvalidUsage",
    "DeepEPNoDevice",
    "DeepEPNotSupported",
    "DeepEPNvshmemError",
    "DeepEPOutOfMemory",
    "DeepEPRemoteError",
    "DeepEPTimeoutError",
    "LaunchError",
    "buffer_size_hint",
    "empty",
    "empty_cache",
    "error_string",
    "get_cmake_dir",
    "get_include",
    "get_lib_dir",
    "get_unique_id",
    "spawn",
    "to_device",
    "version",
]
