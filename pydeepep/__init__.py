"""pydeepep: expert-parallel communication for Mixture-of-Experts models (Python bindings of libdeepep).

Arrays in are any device arrays exposing DLPack or ``__cuda_array_interface__`` (CuPy, PyTorch, JAX, numba,
cuda.core); arrays out are :class:`DeviceArray` objects exporting both. Streams are cuda.core streams, objects with
``__cuda_stream__``, PyTorch/CuPy streams or integer handles.
"""

from __future__ import annotations

import os as _os
import sys as _sys
from importlib.machinery import EXTENSION_SUFFIXES as _EXTENSION_SUFFIXES

_PACKAGE_DIR = _os.path.dirname(_os.path.realpath(__file__))


def _built(directory: str) -> bool:
    """Whether `directory` holds pydeepep's compiled extension."""
    return any(_os.path.isfile(_os.path.join(directory, "_core" + suffix)) for suffix in _EXTENSION_SUFFIXES)


def _differing_modules(here: str, there: str) -> list[str]:
    """The Python modules of the package at `here` whose text differs at `there` (or is missing there)."""
    differing = []
    for name in sorted(n for n in _os.listdir(here) if n.endswith(".py")):
        try:
            with open(_os.path.join(here, name), "rb") as a, open(_os.path.join(there, name), "rb") as b:
                same = a.read() == b.read()
        except OSError:
            same = False
        if not same:
            differing.append(name)
    return differing


if not _built(_PACKAGE_DIR):
    # The source checkout, without its compiled extension: Python puts the current directory first on sys.path (`python
    # -m pydeepep.bench` in the repository root after `pip install .`), where it shadows the installed copy. Take the
    # submodules, the extension included, and the data directories from the first installed copy on sys.path, if it
    # was installed from this very source (the same Python modules); otherwise say so rather than mix the two.
    for _entry in _sys.path:
        _candidate = _os.path.join(_os.path.realpath(_entry or _os.curdir), "pydeepep")
        if _candidate != _PACKAGE_DIR and _built(_candidate):
            _differing = _differing_modules(_PACKAGE_DIR, _candidate)
            if _differing:
                raise ImportError(
                    f"pydeepep is imported from the source checkout {_PACKAGE_DIR}, which has no compiled extension, "
                    f"and the installed copy {_candidate} differs from it ({', '.join(_differing)}): reinstall "
                    "(pip install .), or run from outside the checkout"
                )
            __path__.insert(0, _candidate)
            _PACKAGE_DIR = _candidate
            break
    else:
        raise ImportError(
            f"pydeepep is imported from {_PACKAGE_DIR}, which has no compiled extension (a source checkout), and no "
            "installed pydeepep is on sys.path: install it first (pip install .)"
        )

from .errors import (  # noqa: E402
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
