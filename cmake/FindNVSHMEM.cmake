# Finds NVSHMEM: the pip wheel `nvidia-nvshmem-cu13` (located through Python) or a tree named by NVSHMEM_DIR.
# Defines NVSHMEM::host (the host shared library) and NVSHMEM::device (the static device library, for -rdc links).
#
# The wheel ships lib/libnvshmem_host.so.3 (no unversioned name), lib/libnvshmem_device.a and bootstrap plugins,
# and no CMake package of its own.

set(_nvshmem_hints)
if(DEFINED NVSHMEM_DIR)
  list(APPEND _nvshmem_hints "${NVSHMEM_DIR}")
endif()
if(DEFINED ENV{NVSHMEM_DIR})
  list(APPEND _nvshmem_hints "$ENV{NVSHMEM_DIR}")
endif()
if(NOT _nvshmem_hints)
  find_package(Python3 COMPONENTS Interpreter QUIET)
  if(Python3_Interpreter_FOUND)
    execute_process(
      COMMAND "${Python3_EXECUTABLE}" -c
              "import importlib.util, os; s = importlib.util.find_spec('nvidia.nvshmem'); print(list(s.submodule_search_locations)[0] if s else '')"
      OUTPUT_VARIABLE _nvshmem_wheel OUTPUT_STRIP_TRAILING_WHITESPACE ERROR_QUIET)
    if(_nvshmem_wheel)
      list(APPEND _nvshmem_hints "${_nvshmem_wheel}")
    endif()
  endif()
endif()

find_path(NVSHMEM_INCLUDE_DIR nvshmem.h HINTS ${_nvshmem_hints} PATH_SUFFIXES include NO_DEFAULT_PATH)
find_library(NVSHMEM_HOST_LIBRARY NAMES nvshmem_host libnvshmem_host.so.3 HINTS ${_nvshmem_hints}
             PATH_SUFFIXES lib lib64 NO_DEFAULT_PATH)
find_library(NVSHMEM_DEVICE_LIBRARY NAMES libnvshmem_device.a nvshmem_device HINTS ${_nvshmem_hints}
             PATH_SUFFIXES lib lib64 NO_DEFAULT_PATH)

include(FindPackageHandleStandardArgs)
find_package_handle_standard_args(NVSHMEM REQUIRED_VARS NVSHMEM_INCLUDE_DIR NVSHMEM_HOST_LIBRARY NVSHMEM_DEVICE_LIBRARY)

if(NVSHMEM_FOUND)
  get_filename_component(NVSHMEM_LIBRARY_DIR "${NVSHMEM_HOST_LIBRARY}" DIRECTORY)
  if(NOT TARGET NVSHMEM::host)
    add_library(NVSHMEM::host SHARED IMPORTED)
    set_target_properties(NVSHMEM::host PROPERTIES IMPORTED_LOCATION "${NVSHMEM_HOST_LIBRARY}"
                                                   IMPORTED_NO_SONAME FALSE
                                                   INTERFACE_INCLUDE_DIRECTORIES "${NVSHMEM_INCLUDE_DIR}")
    add_library(NVSHMEM::device STATIC IMPORTED)
    set_target_properties(NVSHMEM::device PROPERTIES IMPORTED_LOCATION "${NVSHMEM_DEVICE_LIBRARY}"
                                                     INTERFACE_INCLUDE_DIRECTORIES "${NVSHMEM_INCLUDE_DIR}")
  endif()
endif()
