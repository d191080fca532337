"""The C ABI of libdeepep, checked from outside: the header as C and C++, the exported symbols, every entry point's
argument checks through ctypes, and the C example. CPU tier: nothing here needs a GPU (the GPU cases skip without).

Where the library and headers are: `pydeepep.get_include()` / `pydeepep.get_lib_dir()` when pydeepep imports, else
the environment, e.g. against a source build:
    DEEPEP_INCLUDE_DIRS=include:build/include DEEPEP_LIB_DIR=build python -m pytest tests/test_c_abi.py
"""

from __future__ import annotations

import ctypes
import os
import re
import shutil
import subprocess
import threading
from pathlib import Path

import pytest
from conftest import gpu_count, skip_missing

REPO = Path(__file__).resolve().parents[1]
EXAMPLE_C = REPO / "examples" / "c" / "dispatch_layout.c"
CUDA_HOME = Path(os.environ.get("CUDA_HOME", "/usr/local/cuda"))

# Result codes of deepep.h (fixed forever).
SUCCESS, INVALID_ARGUMENT, INVALID_USAGE, NO_DEVICE, NOT_SUPPORTED = 0, 1, 2, 7, 8
NUM_RESULT_CODES = 12
UNKNOWN_TEXT = "unknown deepep result code"
INT64 = 1
STRICT = ["-Wall", "-Wextra", "-Werror"]

EXPECTED_API = {
    "deepepGetErrorString",
    "deepepGetLastErrorMessage",
    "deepepGetVersion",
    "deepepConfigInit",
    "deepepGetUniqueId",
    "deepepCommInitRank",
    "deepepCommDestroy",
    "deepepCommRank",
    "deepepCommSize",
    "deepepCommRanksPerNvlDomain",
    "deepepCommDevice",
    "deepepCommBufferBytes",
    "deepepCommGetDispatchArea",
    "deepepCommGetStream",
    "deepepCommGetAsyncError",
    "deepepCommClearAsyncError",
    "deepepGetBufferSizeHint",
    "deepepGetDispatchLayout",
    "deepepHandleCreate",
    "deepepHandleDestroy",
    "deepepHandleGetNumRecvTokens",
    "deepepHandleGetRecvTokensPerExpert",
    "deepepHandleGetNumTokens",
    "deepepHandleWaitRecvCounts",
    "deepepDispatchArgsInit",
    "deepepDispatchNotify",
    "deepepDispatch",
    "deepepCombineArgsInit",
    "deepepCombine",
    "deepepRefuseCall",
    "deepepCommMeasurePushBandwidth",
    "deepepLowLatencyDispatchArgsInit",
    "deepepLowLatencyDispatch",
    "deepepLowLatencyCombineArgsInit",
    "deepepLowLatencyCombine",
    "deepepLowLatencyGetCombineBuffer",
    "deepepLowLatencyRefuseCall",
    "deepepCommLowLatencyMaxTokens",
    "deepepCommLowLatencyTimeline",
    "deepepCommLowLatencyMaskRank",
    "deepepCommLowLatencyMaskedRanks",
    "deepepCommMeasureFlagRound",
}


# ---------------------------------------------------------------------------------------------------------------------
# Where things are


def deepep_paths() -> tuple[list[str], str]:
    """(include dirs, lib dir): from an importable pydeepep, else from DEEPEP_INCLUDE_DIRS / DEEPEP_LIB_DIR."""
    try:
        import pydeepep

        return [pydeepep.get_include()], pydeepep.get_lib_dir()
    except ImportError as error:
        include = os.environ.get("DEEPEP_INCLUDE_DIRS", "")
        lib = os.environ.get("DEEPEP_LIB_DIR", "")
        if not include or not lib:
            # Fail, not skip: a source checkout's pydeepep/ shadowing the installed one (`python -m pytest` from the
            # repository root) would otherwise turn this whole file into silent skips.
            pytest.fail(f"pydeepep does not import ({error}) and DEEPEP_INCLUDE_DIRS / DEEPEP_LIB_DIR are not set")
        return [p for p in include.split(os.pathsep) if p], lib


def has_gpu() -> bool:
    gpus = Path("/proc/driver/nvidia/gpus")
    if gpus.is_dir() and any(gpus.iterdir()):
        return True
    if shutil.which("nvidia-smi"):
        try:
            listing = subprocess.run(["nvidia-smi", "-L"], check=False, capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            return False
        return listing.returncode == 0 and "GPU" in listing.stdout
    return False


HAS_GPU = has_gpu()
HAS_CUDA_RUNTIME_HEADER = (CUDA_HOME / "include" / "cuda_runtime.h").is_file()
needs_no_gpu = pytest.mark.skipif(HAS_GPU, reason="checks behaviour on a machine without GPUs")


@pytest.fixture(scope="session")
def paths() -> tuple[list[str], str]:
    return deepep_paths()


@pytest.fixture(scope="session")
def include_flags(paths) -> list[str]:
    include_dirs, _ = paths
    for name in ("deepep/deepep.h", "deepep/version.h"):
        assert any((Path(d) / name).is_file() for d in include_dirs), f"{name} is in none of {include_dirs}"
    return [f"-I{d}" for d in include_dirs]


@pytest.fixture(scope="session")
def header_text(paths) -> str:
    include_dirs, _ = paths
    for d in include_dirs:
        if (Path(d) / "deepep" / "deepep.h").is_file():
            return (Path(d) / "deepep" / "deepep.h").read_text()
    pytest.fail(f"deepep/deepep.h is in none of {include_dirs}")


@pytest.fixture(scope="session")
def header_version(paths) -> int:
    include_dirs, _ = paths
    for d in include_dirs:
        version_h = Path(d) / "deepep" / "version.h"
        if version_h.is_file():
            text = version_h.read_text()
            major, minor, patch = (
                int(re.search(rf"#define DEEPEP_VERSION_{part} (\d+)", text).group(1))
                for part in ("MAJOR", "MINOR", "PATCH")
            )
            return major * 10000 + minor * 100 + patch
    pytest.fail(f"deepep/version.h is in none of {include_dirs}")


@pytest.fixture(scope="session")
def lib_dir(paths) -> str:
    _, lib = paths
    assert (Path(lib) / "libdeepep.so").exists(), f"libdeepep.so is not in {lib}"
    return lib


@pytest.fixture(scope="session")
def link_flags(lib_dir) -> list[str]:
    return [f"-L{lib_dir}", f"-Wl,-rpath,{lib_dir}", "-ldeepep"]


def compiler(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        skip_missing(f"{name} is not installed")
    return path


def run_ok(command: list[str], **kwargs) -> subprocess.CompletedProcess:
    done = subprocess.run(command, check=False, capture_output=True, text=True, timeout=300, **kwargs)
    assert done.returncode == 0, f"{' '.join(command)} exited {done.returncode}:\n{done.stdout}\n{done.stderr}"
    return done


# ---------------------------------------------------------------------------------------------------------------------
# ctypes mirror of the header


class Config(ctypes.Structure):
    _fields_ = [
        ("struct_size", ctypes.c_size_t),
        ("device", ctypes.c_int),
        ("allow_nvlink_multicast", ctypes.c_int),
        ("timeout_seconds", ctypes.c_double),
        ("buffer_bytes", ctypes.c_size_t),
        ("max_tokens_per_rank", ctypes.c_int),
        ("hidden", ctypes.c_int),
        ("num_topk", ctypes.c_int),
        ("num_experts", ctypes.c_int),
        ("low_latency_max_tokens", ctypes.c_int),
        ("low_latency_transport", ctypes.c_int),
        ("zero_copy_dispatch", ctypes.c_int),
        ("reserved", ctypes.c_int),
    ]


class UniqueId(ctypes.Structure):
    _fields_ = [("internal", ctypes.c_char * 128)]


@pytest.fixture(scope="session")
def lib(lib_dir) -> ctypes.CDLL:
    lib = ctypes.CDLL(os.path.join(lib_dir, "libdeepep.so"))
    result = ctypes.c_int
    comm_t = ctypes.c_void_p
    signatures = {
        "deepepGetErrorString": (ctypes.c_char_p, [ctypes.c_int]),
        "deepepGetLastErrorMessage": (ctypes.c_char_p, []),
        "deepepGetVersion": (result, [ctypes.POINTER(ctypes.c_int)]),
        "deepepConfigInit": (result, [ctypes.POINTER(Config), ctypes.c_size_t]),
        "deepepGetUniqueId": (result, [ctypes.POINTER(UniqueId)]),
        "deepepCommInitRank": (
            result,
            [ctypes.POINTER(comm_t), ctypes.c_int, ctypes.POINTER(UniqueId), ctypes.c_int, ctypes.POINTER(Config)],
        ),
        "deepepCommDestroy": (result, [comm_t]),
        "deepepCommRank": (result, [comm_t, ctypes.POINTER(ctypes.c_int)]),
        "deepepCommSize": (result, [comm_t, ctypes.POINTER(ctypes.c_int)]),
        "deepepCommRanksPerNvlDomain": (result, [comm_t, ctypes.POINTER(ctypes.c_int)]),
        "deepepCommDevice": (result, [comm_t, ctypes.POINTER(ctypes.c_int)]),
        "deepepCommBufferBytes": (result, [comm_t, ctypes.POINTER(ctypes.c_size_t)]),
        "deepepCommGetStream": (result, [comm_t, ctypes.POINTER(ctypes.c_void_p)]),
        "deepepCommGetAsyncError": (result, [comm_t, ctypes.POINTER(ctypes.c_int)]),
        "deepepCommClearAsyncError": (result, [comm_t]),
        "deepepGetBufferSizeHint": (result, [ctypes.POINTER(Config), ctypes.c_int, ctypes.POINTER(ctypes.c_size_t)]),
        "deepepGetDispatchLayout": (
            result,
            [comm_t, ctypes.c_void_p, ctypes.c_int, ctypes.c_int64, ctypes.c_int, ctypes.c_int64, ctypes.c_int]
            + [ctypes.c_void_p] * 4,
        ),
    }
    for name, (restype, argtypes) in signatures.items():
        function = getattr(lib, name)
        function.restype = restype
        function.argtypes = argtypes
    return lib


def last_error(lib) -> str:
    return lib.deepepGetLastErrorMessage().decode()


def default_config(lib) -> Config:
    config = Config()
    assert lib.deepepConfigInit(ctypes.byref(config), ctypes.sizeof(config)) == SUCCESS
    return config


def size_hint(lib, config, nranks) -> tuple[int, int]:
    """(result code, bytes) of deepepGetBufferSizeHint."""
    out = ctypes.c_size_t(0)
    code = lib.deepepGetBufferSizeHint(None if config is None else ctypes.byref(config), nranks, ctypes.byref(out))
    return code, out.value


def names_argument(message: str, name: str) -> bool:
    return re.search(rf"\b{re.escape(name)}\b", message) is not None


# ---------------------------------------------------------------------------------------------------------------------
# The header as C and C++


HEADER_ONLY_C = """
#include <deepep/deepep.h>
#include <deepep/deepep.h> /* twice: the include guard holds */
static const deepepConfig default_config = DEEPEP_CONFIG_INIT;
int deepep_header_check(void);
int deepep_header_check(void) { return (int)default_config.struct_size + DEEPEP_VERSION; }
"""


def test_header_compiles_as_pedantic_c99_without_cuda_headers(tmp_path, include_flags):
    source = tmp_path / "header.c"
    source.write_text(HEADER_ONLY_C)
    run_ok(
        [
            compiler("gcc"),
            "-std=c99",
            *STRICT,
            "-pedantic",
            "-Wstrict-prototypes",
            "-fsyntax-only",
            *include_flags,
            str(source),
        ]
    )


def test_header_compiles_as_pedantic_cxx17(tmp_path, include_flags):
    source = tmp_path / "header.cpp"
    source.write_text(HEADER_ONLY_C + "\nint main() { deepepConfig c = DEEPEP_CONFIG_INIT; return c.device + 1; }\n")
    run_ok([compiler("g++"), "-std=c++17", *STRICT, "-pedantic", "-fsyntax-only", *include_flags, str(source)])


C_PROGRAM = r"""
#include <deepep/deepep.h>
#include <stddef.h>
#include <stdio.h>
#include <string.h>

int main(void) {
  deepepConfig braced = DEEPEP_CONFIG_INIT;
  deepepConfig filled;
  int version = 0;
  const char* unknown;
  if (deepepGetVersion(&version) != deepepSuccess) return 10;
  if (version != DEEPEP_VERSION) {
    fprintf(stderr, "library version %d, header version %d\n", version, DEEPEP_VERSION);
    return 11;
  }
  unknown = deepepGetErrorString((deepepResult_t)999);
  if (strcmp(unknown, "unknown deepep result code") != 0) {
    fprintf(stderr, "deepepGetErrorString(999) is '%s'\n", unknown);
    return 12;
  }
  memset(&filled, 0xff, sizeof(filled));
  if (deepepConfigInit(&filled, sizeof(filled)) != deepepSuccess) return 13;
  if (braced.struct_size != filled.struct_size || braced.device != filled.device ||
      braced.allow_nvlink_multicast != filled.allow_nvlink_multicast ||
      braced.timeout_seconds != filled.timeout_seconds || braced.buffer_bytes != filled.buffer_bytes ||
      braced.max_tokens_per_rank != filled.max_tokens_per_rank || braced.hidden != filled.hidden ||
      braced.num_topk != filled.num_topk || braced.num_experts != filled.num_experts ||
      braced.low_latency_max_tokens != filled.low_latency_max_tokens ||
      braced.low_latency_transport != filled.low_latency_transport ||
      braced.zero_copy_dispatch != filled.zero_copy_dispatch || braced.reserved != filled.reserved) {
    fprintf(stderr, "DEEPEP_CONFIG_INIT differs from deepepConfigInit\n");
    return 14;
  }
  printf("layout %zu %zu %zu %zu %zu %zu %zu %zu %zu %zu %zu %zu %zu %zu\n", sizeof(deepepConfig),
         offsetof(deepepConfig, struct_size), offsetof(deepepConfig, device),
         offsetof(deepepConfig, allow_nvlink_multicast), offsetof(deepepConfig, timeout_seconds),
         offsetof(deepepConfig, buffer_bytes), offsetof(deepepConfig, max_tokens_per_rank),
         offsetof(deepepConfig, hidden), offsetof(deepepConfig, num_topk), offsetof(deepepConfig, num_experts),
         offsetof(deepepConfig, low_latency_max_tokens), offsetof(deepepConfig, low_latency_transport),
         offsetof(deepepConfig, zero_copy_dispatch), offsetof(deepepConfig, reserved));
  printf("unique_id %zu\n", sizeof(deepepUniqueId));
  /* Each size-versioned struct: its size and where its fields end (before a trailing reserved field). */
  printf("init deepepConfigInit %zu %zu\n", sizeof(deepepConfig), offsetof(deepepConfig, reserved));
  printf("init deepepDispatchArgsInit %zu %zu\n", sizeof(deepepDispatchArgs), offsetof(deepepDispatchArgs, reserved));
  printf("init deepepCombineArgsInit %zu %zu\n", sizeof(deepepCombineArgs), sizeof(deepepCombineArgs));
  printf("init deepepLowLatencyDispatchArgsInit %zu %zu\n", sizeof(deepepLowLatencyDispatchArgs),
         sizeof(deepepLowLatencyDispatchArgs));
  printf("init deepepLowLatencyCombineArgsInit %zu %zu\n", sizeof(deepepLowLatencyCombineArgs),
         sizeof(deepepLowLatencyCombineArgs));
  {
    /* The argument structs' defaults are what the header says they are: zero but for the fields it names. Each Init
       fills a struct of 0xff bytes, compared byte for byte with one zeroed and given those fields. */
#define ZEROED(s) (memset(&(s), 0, sizeof(s)), (s).struct_size = sizeof(s))
#define INIT_GIVES(init, s, said) \
  (memset(&(s), 0xff, sizeof(s)), init(&(s), sizeof(s)) == deepepSuccess && memcmp(&(s), &(said), sizeof(s)) == 0)
    deepepDispatchArgs dispatch, dispatch_said;
    deepepCombineArgs combine, combine_said;
    deepepLowLatencyDispatchArgs ll_dispatch, ll_dispatch_said;
    deepepLowLatencyCombineArgs ll_combine, ll_combine_said;
    ZEROED(dispatch_said);
    dispatch_said.topk_type = deepepInt64;
    dispatch_said.x_type = deepepBFloat16;
    dispatch_said.scales_type = deepepFloat32;
    dispatch_said.expert_alignment = 1;
    ZEROED(combine_said);
    ZEROED(ll_dispatch_said);
    ll_dispatch_said.phase = deepepLowLatencySendRecv;
    ll_dispatch_said.topk_type = deepepInt64;
    ll_dispatch_said.stats_recv_count_type = deepepInt64;
    ll_dispatch_said.use_fp8 = 1;
    ZEROED(ll_combine_said);
    ll_combine_said.phase = deepepLowLatencySendRecv;
    ll_combine_said.topk_type = deepepInt64;
    printf("defaults %d %d %d %d\n", INIT_GIVES(deepepDispatchArgsInit, dispatch, dispatch_said),
           INIT_GIVES(deepepCombineArgsInit, combine, combine_said),
           INIT_GIVES(deepepLowLatencyDispatchArgsInit, ll_dispatch, ll_dispatch_said),
           INIT_GIVES(deepepLowLatencyCombineArgsInit, ll_combine, ll_combine_said));
  }
  return 0;
}
"""


@pytest.fixture(scope="session")
def c_program_output(tmp_path_factory, include_flags, link_flags) -> str:
    directory = tmp_path_factory.mktemp("c_program")
    source, binary = directory / "program.c", directory / "program"
    source.write_text(C_PROGRAM)
    run_ok(
        [compiler("gcc"), "-std=c99", *STRICT, "-pedantic", *include_flags, str(source), *link_flags, "-o", str(binary)]
    )
    return run_ok([str(binary)]).stdout


def test_c_program_links_and_agrees_with_the_header(c_program_output):
    # The program itself checks deepepGetVersion == DEEPEP_VERSION, the unknown-code text and that
    # DEEPEP_CONFIG_INIT equals deepepConfigInit; reaching its output means all held.
    assert c_program_output.startswith("layout ")


def test_ctypes_config_mirrors_the_c_layout(c_program_output):
    numbers = [int(n) for n in c_program_output.splitlines()[0].split()[1:]]
    offsets = [getattr(Config, name).offset for name, _ in Config._fields_]
    assert numbers == [ctypes.sizeof(Config), *offsets]
    assert c_program_output.splitlines()[1] == f"unique_id {ctypes.sizeof(UniqueId)}"


# ---------------------------------------------------------------------------------------------------------------------
# Exported symbols


def exported_symbols(lib_dir) -> set[str]:
    nm = shutil.which("nm")
    if nm is None:
        skip_missing("nm is not installed")
    listing = run_ok([nm, "-D", "--defined-only", os.path.join(lib_dir, "libdeepep.so")]).stdout
    symbols = set()
    for line in listing.splitlines():
        fields = line.split()
        if len(fields) >= 3 and fields[1] != "A":  # "A": version-node markers, not code or data
            symbols.add(fields[2].split("@")[0])
    return symbols


def test_only_deepep_symbols_are_exported(lib_dir):
    symbols = exported_symbols(lib_dir)
    assert symbols, "nm found no exported symbols"
    assert sorted(s for s in symbols if not s.startswith("deepep")) == []


def test_every_api_function_is_exported(lib_dir):
    assert sorted(EXPECTED_API - exported_symbols(lib_dir)) == []


def test_exports_are_exactly_the_functions_the_header_declares(lib_dir, header_text):
    declared = set(re.findall(r"DEEPEP_API\s+[^;(]*?\b(deepep\w+)\s*\(", header_text))
    assert declared == EXPECTED_API
    assert exported_symbols(lib_dir) == declared


# ---------------------------------------------------------------------------------------------------------------------
# Errors and version


def test_every_result_code_has_its_own_error_string(lib):
    texts = [lib.deepepGetErrorString(code).decode() for code in range(NUM_RESULT_CODES)]
    assert all(texts), texts
    assert UNKNOWN_TEXT not in texts
    assert len(set(texts)) == NUM_RESULT_CODES, texts


@pytest.mark.parametrize("code", [NUM_RESULT_CODES, 999, -1, 2**31 - 1])
def test_unknown_result_codes_give_the_unknown_text(lib, code):
    assert lib.deepepGetErrorString(code).decode() == UNKNOWN_TEXT


def test_version_matches_the_header(lib, header_version):
    version = ctypes.c_int(0)
    assert lib.deepepGetVersion(ctypes.byref(version)) == SUCCESS
    assert version.value > 0
    assert version.value == header_version


def test_get_version_rejects_null(lib):
    assert lib.deepepGetVersion(None) == INVALID_ARGUMENT
    assert names_argument(last_error(lib), "version")


def test_last_error_message_is_empty_on_a_thread_where_nothing_failed(lib):
    seen = []
    worker = threading.Thread(target=lambda: seen.append(last_error(lib)))
    worker.start()
    worker.join()
    assert seen == [""]


def test_last_error_message_survives_successful_calls(lib):
    assert size_hint(lib, None, 0)[0] == INVALID_ARGUMENT
    message = last_error(lib)
    version = ctypes.c_int(0)
    assert lib.deepepGetVersion(ctypes.byref(version)) == SUCCESS
    assert lib.deepepConfigInit(ctypes.byref(Config()), ctypes.sizeof(Config)) == SUCCESS
    assert last_error(lib) == message


def test_last_error_message_is_per_thread(lib):
    assert size_hint(lib, None, 0)[0] == INVALID_ARGUMENT
    main_message = last_error(lib)
    assert names_argument(main_message, "nranks")

    seen = {}

    def fail_differently():
        bad = default_config(lib)
        bad.struct_size = 0
        seen["code"] = size_hint(lib, bad, 1)[0]
        seen["message"] = last_error(lib)

    worker = threading.Thread(target=fail_differently)
    worker.start()
    worker.join()
    assert seen["code"] == INVALID_ARGUMENT
    assert "struct_size" in seen["message"]
    assert last_error(lib) == main_message


# ---------------------------------------------------------------------------------------------------------------------
# Configuration and buffer size


def test_config_init_fills_struct_size_and_defaults(lib):
    config = Config(struct_size=0, device=5, timeout_seconds=-3.0, num_topk=99)
    assert lib.deepepConfigInit(ctypes.byref(config), ctypes.sizeof(config)) == SUCCESS
    assert config.struct_size == ctypes.sizeof(Config)
    assert config.device == -1
    assert config.allow_nvlink_multicast == 0
    assert config.timeout_seconds == 100.0
    assert config.buffer_bytes == 0
    assert (config.max_tokens_per_rank, config.hidden, config.num_topk, config.num_experts) == (4096, 7168, 8, 256)


def test_argument_structs_start_with_the_defaults_the_header_names(c_program_output):
    # Dispatch, combine, low-latency dispatch, low-latency combine: field for field, padding included.
    assert "defaults 1 1 1 1" in c_program_output.splitlines(), c_program_output


def test_config_init_rejects_null(lib):
    assert lib.deepepConfigInit(None, ctypes.sizeof(Config)) == INVALID_ARGUMENT
    assert names_argument(last_error(lib), "config")


INIT_FUNCTIONS = [
    "deepepConfigInit",
    "deepepDispatchArgsInit",
    "deepepCombineArgsInit",
    "deepepLowLatencyDispatchArgsInit",
    "deepepLowLatencyCombineArgsInit",
]


def init_into(lib, function, buffer, size) -> int:
    """`function`(buffer, size) through a function object of its own (lib[...] is not cached), typed for raw bytes."""
    init = lib[function]
    init.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    return init(ctypes.addressof(buffer), size)


@pytest.fixture(scope="session")
def struct_sizes(c_program_output) -> dict:
    """Init function -> (sizeof its struct, where the struct's fields end), from the C header."""
    lines = [line.split() for line in c_program_output.splitlines() if line.startswith("init ")]
    return {name: (int(size), int(end)) for _, name, size, end in lines}


def test_every_init_function_has_its_struct_measured(struct_sizes):
    assert sorted(struct_sizes) == sorted(INIT_FUNCTIONS)


@pytest.mark.parametrize("function", INIT_FUNCTIONS)
def test_init_functions_write_only_the_callers_struct_size(lib, function, struct_sizes):
    """A program passes its header's sizeof: nothing past it is written (a newer library's larger struct would
    overrun the caller's), and the bytes after the fields (a reserved field) are zero."""
    size, fields_end = struct_sizes[function]
    buffer = (ctypes.c_ubyte * 4096)(*([0xAB] * 4096))
    assert init_into(lib, function, buffer, size) == SUCCESS
    assert ctypes.c_size_t.from_buffer(buffer).value == size
    assert bytes(buffer)[fields_end:size] == bytes(size - fields_end)
    assert bytes(buffer)[size:] == b"\xab" * (4096 - size)


@pytest.mark.parametrize("function", INIT_FUNCTIONS)
def test_init_functions_zero_the_fields_of_a_newer_header(lib, function, struct_sizes):
    """A newer header's struct is larger: the library writes its defaults and zeroes the rest, fields it does not
    know included."""
    size, fields_end = struct_sizes[function]
    ours = (ctypes.c_ubyte * size)()
    assert init_into(lib, function, ours, size) == SUCCESS
    newer = (ctypes.c_ubyte * 4096)(*([0xAB] * 4096))
    assert init_into(lib, function, newer, 4096) == SUCCESS
    assert bytes(newer)[8:fields_end] == bytes(ours)[8:fields_end]
    assert bytes(newer)[fields_end:] == bytes(4096 - fields_end)


@pytest.mark.parametrize("function", INIT_FUNCTIONS)
def test_init_functions_refuse_a_size_no_struct_has(lib, function, struct_sizes):
    _, fields_end = struct_sizes[function]
    for size in (0, 8, fields_end - 1, (1 << 16) + 1):
        buffer = (ctypes.c_ubyte * 4096)()
        assert init_into(lib, function, buffer, size) == INVALID_ARGUMENT, size
        assert "struct_size" in last_error(lib)
        assert bytes(buffer) == bytes(4096)


def test_buffer_size_hint_grows_with_nranks(lib):
    config = default_config(lib)
    sizes = []
    for nranks in (1, 2, 8, 64):
        code, size = size_hint(lib, config, nranks)
        assert code == SUCCESS, last_error(lib)
        sizes.append(size)
    assert sizes[0] > 0
    assert sizes == sorted(sizes) and len(set(sizes)) == len(sizes), sizes


def test_buffer_size_hint_grows_with_the_workload(lib):
    small = default_config(lib)
    large = default_config(lib)
    large.hidden *= 2
    large.max_tokens_per_rank *= 2
    assert size_hint(lib, large, 8)[1] > size_hint(lib, small, 8)[1]


def test_buffer_size_hint_of_null_config_is_that_of_the_defaults(lib):
    code, size = size_hint(lib, None, 4)
    assert code == SUCCESS
    assert size == size_hint(lib, default_config(lib), 4)[1]


@pytest.mark.parametrize("nranks", [0, -1, 1025])
def test_buffer_size_hint_rejects_nranks_out_of_range(lib, nranks):
    assert size_hint(lib, default_config(lib), nranks)[0] == INVALID_ARGUMENT
    assert names_argument(last_error(lib), "nranks")


def test_buffer_size_hint_accepts_the_largest_nranks(lib):
    assert size_hint(lib, default_config(lib), 1024)[0] == SUCCESS


def test_buffer_size_hint_rejects_a_config_without_struct_size(lib):
    config = default_config(lib)
    config.struct_size = 0
    assert size_hint(lib, config, 1)[0] == INVALID_ARGUMENT
    assert "struct_size" in last_error(lib)


class NewerConfig(ctypes.Structure):
    """deepepConfig as a later header might lay it out: a field this library does not know at its end."""

    _fields_ = [*Config._fields_, ("future_field", ctypes.c_int64)]


def test_a_config_of_a_newer_header_is_taken_while_its_new_fields_keep_their_zero(lib):
    config = NewerConfig()
    ctypes.memset(ctypes.byref(config), 0xAB, ctypes.sizeof(config))
    init = lib["deepepConfigInit"]
    init.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    assert init(ctypes.addressof(config), ctypes.sizeof(config)) == SUCCESS
    assert config.struct_size == ctypes.sizeof(NewerConfig) and config.future_field == 0
    assert config.num_experts == 256
    hint = lib["deepepGetBufferSizeHint"]
    hint.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.POINTER(ctypes.c_size_t)]
    out = ctypes.c_size_t(0)
    assert hint(ctypes.addressof(config), 2, ctypes.byref(out)) == SUCCESS
    assert out.value == size_hint(lib, default_config(lib), 2)[1]
    # A setting this library cannot honour is refused, not ignored.
    config.future_field = 1
    assert hint(ctypes.addressof(config), 2, ctypes.byref(out)) == NOT_SUPPORTED
    message = last_error(lib)
    assert "config sets a field this library" in message and "does not know" in message
    # A newer header's field in the reserved field's place (the same struct size) is refused the same way.
    config.future_field = 0
    config.reserved = 1
    assert hint(ctypes.addressof(config), 2, ctypes.byref(out)) == NOT_SUPPORTED
    assert "does not know" in last_error(lib)


@pytest.mark.parametrize("timeout", [0.0, -1.0, float("nan")])
def test_buffer_size_hint_rejects_a_non_positive_timeout(lib, timeout):
    config = default_config(lib)
    config.timeout_seconds = timeout
    assert size_hint(lib, config, 1)[0] == INVALID_ARGUMENT
    assert "timeout_seconds" in last_error(lib)


@pytest.mark.parametrize("transport", [-1, 2])
def test_buffer_size_hint_rejects_an_unknown_low_latency_transport(lib, transport):
    config = default_config(lib)
    assert config.low_latency_transport == 0  # DEEPEP_LL_TRANSPORT_AUTO
    config.low_latency_transport = transport
    assert size_hint(lib, config, 1)[0] == INVALID_ARGUMENT
    assert "low_latency_transport" in last_error(lib)
    config.low_latency_transport = 1  # DEEPEP_LL_TRANSPORT_NVSHMEM
    assert size_hint(lib, config, 1)[0] == 0


@pytest.mark.parametrize("value", [-1, 2])
def test_buffer_size_hint_rejects_a_zero_copy_dispatch_other_than_0_or_1(lib, value):
    config = default_config(lib)
    assert config.zero_copy_dispatch == 0
    config.zero_copy_dispatch = value
    assert size_hint(lib, config, 1)[0] == INVALID_ARGUMENT
    assert "zero_copy_dispatch" in last_error(lib)


@pytest.mark.parametrize("nranks", [1, 2, 8])
def test_a_zero_copy_dispatch_area_holds_every_token_of_every_rank_in_the_largest_row(lib, nranks):
    config = default_config(lib)
    status, plain = size_hint(lib, config, nranks)
    assert status == SUCCESS, last_error(lib)
    config.zero_copy_dispatch = 1
    status, zero_copy = size_hint(lib, config, nranks)
    assert status == SUCCESS, last_error(lib)
    # A BF16 row of H = 7168 with FP8 scales, K = 8 ids and weights and its source: 14336 + 224 + 96 + 16 bytes,
    # rounded up to 128 (14720); the area starts on a 4 KiB boundary after the rest and ends with 256 bytes of slack.
    area = nranks * config.max_tokens_per_rank * 14720 + 256
    assert zero_copy - area - plain in range(0, 4096)
    # It needs the workload even when buffer_bytes sizes the rest.
    config.buffer_bytes = 64 << 20
    config.hidden = 0
    assert size_hint(lib, config, nranks)[0] == INVALID_ARGUMENT
    assert "hidden" in last_error(lib)


@pytest.mark.parametrize("num_topk", [0, 33])
def test_buffer_size_hint_rejects_num_topk_out_of_range(lib, num_topk):
    config = default_config(lib)
    config.num_topk = num_topk
    assert size_hint(lib, config, 1)[0] == INVALID_ARGUMENT
    assert "num_topk" in last_error(lib)


@pytest.mark.parametrize("num_topk", [1, 32])
def test_buffer_size_hint_accepts_num_topk_at_the_limits(lib, num_topk):
    config = default_config(lib)
    config.num_topk = num_topk
    assert size_hint(lib, config, 1)[0] == SUCCESS, last_error(lib)


def test_buffer_size_hint_uses_buffer_bytes_when_given(lib):
    config = default_config(lib)
    config.buffer_bytes = 123 << 20
    for nranks in (1, 16):
        assert size_hint(lib, config, nranks) == (SUCCESS, 123 << 20)


def test_buffer_size_hint_never_wraps_around(lib):
    config = default_config(lib)
    config.hidden = 2**20  # DEEPEP_MAX_HIDDEN
    config.max_tokens_per_rank = 2**21 - 1  # 1024 ranks of it still fit the routing's int32 row counts
    # About 4.5e15 bytes: refused as more than any GPU holds, never a wrapped-around small size.
    assert size_hint(lib, config, 1024)[0] == INVALID_ARGUMENT
    assert "more than any GPU holds" in last_error(lib)


@pytest.mark.parametrize("buffer_bytes", [0, 8 << 20])
def test_buffer_size_hint_refuses_more_tokens_than_a_routing_counts(lib, buffer_bytes):
    # nranks * max_tokens_per_rank rows past int32: every dispatch's routing would refuse it, so the config is refused.
    config = default_config(lib)
    config.buffer_bytes = buffer_bytes
    config.hidden, config.num_topk = 128, 1
    config.max_tokens_per_rank = 2**28
    assert size_hint(lib, config, 7)[0] == SUCCESS
    assert size_hint(lib, config, 8)[0] == INVALID_ARGUMENT
    assert "nranks * config->max_tokens_per_rank = 2147483648" in last_error(lib)


def test_buffer_size_hint_refuses_an_explicit_buffer_larger_than_any_gpu(lib):
    config = default_config(lib)
    config.buffer_bytes = 2**64 - 1  # e.g. (size_t)-1 meant as "as much as it takes": would wrap with an LL area
    config.low_latency_max_tokens = 64
    config.hidden, config.num_experts = 1024, 16
    assert size_hint(lib, config, 2)[0] == INVALID_ARGUMENT
    assert "buffer_bytes" in last_error(lib) and "more than any GPU holds" in last_error(lib)


@pytest.mark.parametrize("max_tokens", [0, -5])
def test_buffer_size_hint_needs_max_tokens_per_rank_with_an_explicit_buffer_too(lib, max_tokens):
    config = default_config(lib)  # it bounds every dispatch and sizes every handle
    config.buffer_bytes = 8 << 20
    config.max_tokens_per_rank = max_tokens
    assert size_hint(lib, config, 2)[0] == INVALID_ARGUMENT
    assert "max_tokens_per_rank" in last_error(lib)


def test_buffer_size_hint_refuses_a_hidden_past_the_limit(lib):
    config = default_config(lib)
    config.hidden = 2**31 - 8  # rows the kernels' 32-bit row arithmetic cannot address
    assert size_hint(lib, config, 2)[0] == INVALID_ARGUMENT
    assert "at most 1048576" in last_error(lib)


def test_buffer_size_hint_rejects_a_null_out_pointer(lib):
    assert lib.deepepGetBufferSizeHint(ctypes.byref(default_config(lib)), 1, None) == INVALID_ARGUMENT
    assert names_argument(last_error(lib), "bytes")


# ---------------------------------------------------------------------------------------------------------------------
# Unique id and communicator creation


def test_unique_id_needs_no_gpu_and_is_not_blank(lib):
    unique_id = UniqueId()
    assert lib.deepepGetUniqueId(ctypes.byref(unique_id)) == SUCCESS, last_error(lib)
    raw = bytes(unique_id)
    assert len(raw) == 128
    assert raw != bytes(128)


def test_unique_id_rejects_null(lib):
    assert lib.deepepGetUniqueId(None) == INVALID_ARGUMENT
    assert names_argument(last_error(lib), "id")


@pytest.fixture
def unique_id(lib) -> UniqueId:
    unique_id = UniqueId()
    assert lib.deepepGetUniqueId(ctypes.byref(unique_id)) == SUCCESS, last_error(lib)
    return unique_id


def init_rank(lib, nranks, unique_id, rank, config=None, comm_out=True):
    comm = ctypes.c_void_p(None)
    code = lib.deepepCommInitRank(
        ctypes.byref(comm) if comm_out else None,
        nranks,
        None if unique_id is None else ctypes.byref(unique_id),
        rank,
        None if config is None else ctypes.byref(config),
    )
    return code, comm.value


@pytest.mark.parametrize("nranks", [0, -2, 1025])
def test_comm_init_rejects_nranks_out_of_range(lib, unique_id, nranks):
    code, comm = init_rank(lib, nranks, unique_id, 0)
    assert code == INVALID_ARGUMENT
    assert comm is None
    assert names_argument(last_error(lib), "nranks")


@pytest.mark.parametrize("rank", [-1, 2, 100])
def test_comm_init_rejects_rank_out_of_range(lib, unique_id, rank):
    code, comm = init_rank(lib, 2, unique_id, rank)
    assert code == INVALID_ARGUMENT
    assert comm is None
    assert names_argument(last_error(lib), "rank")


def test_comm_init_rejects_a_null_id(lib):
    code, comm = init_rank(lib, 1, None, 0)
    assert code == INVALID_ARGUMENT
    assert comm is None
    assert names_argument(last_error(lib), "id")


def test_comm_init_rejects_a_null_comm_pointer(lib, unique_id):
    code, _ = init_rank(lib, 1, unique_id, 0, comm_out=False)
    assert code == INVALID_ARGUMENT
    assert names_argument(last_error(lib), "comm")


def test_comm_init_rejects_a_config_without_struct_size(lib, unique_id):
    config = default_config(lib)
    config.struct_size = 0
    code, comm = init_rank(lib, 1, unique_id, 0, config)
    assert code == INVALID_ARGUMENT
    assert comm is None
    assert "struct_size" in last_error(lib)


@needs_no_gpu
@pytest.mark.parametrize("use_config", [False, True])
def test_comm_init_without_gpus_reports_no_device(lib, unique_id, use_config):
    config = default_config(lib) if use_config else None
    code, comm = init_rank(lib, 1, unique_id, 0, config)
    assert code == NO_DEVICE, last_error(lib)
    assert comm is None
    assert last_error(lib) != ""


# ---------------------------------------------------------------------------------------------------------------------
# Handles: NULL and bogus communicators


def comm_queries(lib):
    """(name, call) for every local query, each given a comm handle."""
    int_out, size_out, pointer_out = ctypes.c_int(), ctypes.c_size_t(), ctypes.c_void_p()
    return [
        ("deepepCommRank", lambda c: lib.deepepCommRank(c, ctypes.byref(int_out))),
        ("deepepCommSize", lambda c: lib.deepepCommSize(c, ctypes.byref(int_out))),
        ("deepepCommRanksPerNvlDomain", lambda c: lib.deepepCommRanksPerNvlDomain(c, ctypes.byref(int_out))),
        ("deepepCommDevice", lambda c: lib.deepepCommDevice(c, ctypes.byref(int_out))),
        ("deepepCommBufferBytes", lambda c: lib.deepepCommBufferBytes(c, ctypes.byref(size_out))),
        ("deepepCommGetStream", lambda c: lib.deepepCommGetStream(c, ctypes.byref(pointer_out))),
        ("deepepCommGetAsyncError", lambda c: lib.deepepCommGetAsyncError(c, ctypes.byref(int_out))),
        ("deepepCommClearAsyncError", lambda c: lib.deepepCommClearAsyncError(c)),
    ]


def dispatch_layout(lib, comm) -> int:
    return lib.deepepGetDispatchLayout(comm, None, INT64, 0, 8, 8, 256, None, None, None, None)


def test_comm_destroy_accepts_null(lib):
    assert lib.deepepCommDestroy(None) == SUCCESS


def test_queries_on_a_null_comm_are_invalid_arguments(lib):
    for name, query in comm_queries(lib):
        assert query(None) == INVALID_ARGUMENT, name
        assert names_argument(last_error(lib), "comm"), (name, last_error(lib))


def test_dispatch_layout_on_a_null_comm_is_an_invalid_argument(lib):
    assert dispatch_layout(lib, None) == INVALID_ARGUMENT
    assert names_argument(last_error(lib), "comm")


REFUSALS = {
    "deepepRefuseCall": lambda lib, comm: lib.deepepRefuseCall(comm, 0, None, 0, None),  # a notify, no handle
    # a low-latency dispatch on buffer set 0, both phases
    "deepepLowLatencyRefuseCall": lambda lib, comm: lib.deepepLowLatencyRefuseCall(comm, 0, 0, 0, None),
}


@pytest.mark.parametrize("refusal", sorted(REFUSALS))
def test_refusing_a_call_on_a_null_comm_is_an_invalid_argument(lib, refusal):
    assert REFUSALS[refusal](lib, None) == INVALID_ARGUMENT
    assert names_argument(last_error(lib), "comm")


@pytest.fixture
def bogus_comm():
    """A non-NULL pointer that is no communicator: readable memory, so a library that dereferences it misreads
    rather than crashes; the library must reject it without trusting its contents."""
    memory = ctypes.create_string_buffer(b"\xab" * 4096)
    yield ctypes.addressof(memory)
    del memory


def test_queries_on_a_bogus_comm_are_invalid_usage(lib, bogus_comm):
    for name, query in comm_queries(lib):
        assert query(bogus_comm) == INVALID_USAGE, name
        assert "not a live communicator" in last_error(lib), (name, last_error(lib))


def test_dispatch_layout_on_a_bogus_comm_is_invalid_usage(lib, bogus_comm):
    assert dispatch_layout(lib, bogus_comm) == INVALID_USAGE
    assert "not a live communicator" in last_error(lib)


@pytest.mark.parametrize("refusal", sorted(REFUSALS))
def test_refusing_a_call_on_a_bogus_comm_is_invalid_usage(lib, bogus_comm, refusal):
    assert REFUSALS[refusal](lib, bogus_comm) == INVALID_USAGE
    assert "not a live communicator" in last_error(lib)


def test_destroy_of_a_bogus_comm_is_invalid_usage(lib, bogus_comm):
    assert lib.deepepCommDestroy(bogus_comm) == INVALID_USAGE
    assert "not a live communicator" in last_error(lib)


# ---------------------------------------------------------------------------------------------------------------------
# The C example


@pytest.fixture(scope="session")
def example_binary(tmp_path_factory, include_flags, link_flags) -> Path:
    if not HAS_CUDA_RUNTIME_HEADER:
        skip_missing(f"no CUDA toolkit at {CUDA_HOME} (set CUDA_HOME)")
    binary = tmp_path_factory.mktemp("example") / "dispatch_layout"
    cuda_lib = CUDA_HOME / "lib64"
    cuda_flags = [f"-I{CUDA_HOME / 'include'}", f"-L{cuda_lib}", f"-Wl,-rpath,{cuda_lib}"]
    run_ok(
        [
            compiler("gcc"),
            "-std=c99",
            "-O2",
            *STRICT,
            str(EXAMPLE_C),
            *include_flags,
            *cuda_flags,
            *link_flags,
            "-lcudart",
            "-o",
            str(binary),
        ]
    )
    return binary


def run_example(binary: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    environment = {k: v for k, v in os.environ.items() if k != "DEEPEP_NUM_GPUS"}
    environment.update(env)
    return subprocess.run(
        [str(binary), *args], check=False, capture_output=True, text=True, timeout=240, env=environment
    )


def test_c_example_compiles_without_warnings(example_binary):
    assert example_binary.is_file()


@pytest.mark.parametrize("argument", ["0", "-1", "two", "65"])
def test_c_example_rejects_a_bad_gpu_count(example_binary, argument):
    done = run_example(example_binary, argument)
    assert done.returncode == 1
    assert "NUM_GPUS" in done.stderr


@needs_no_gpu
@pytest.mark.parametrize("args, env", [((), {}), (("2",), {}), ((), {"DEEPEP_NUM_GPUS": "3"})])
def test_c_example_fails_cleanly_without_gpus(example_binary, args, env):
    done = run_example(example_binary, *args, **env)
    assert done.returncode != 0
    assert "GPU" in done.stderr and "FAILED" in done.stderr, done.stderr
    assert "layout OK" not in done.stdout


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_GPU, reason="needs CUDA GPUs")
def test_c_example_passes_on_every_gpu(example_binary):
    done = run_example(example_binary)
    assert done.returncode == 0, done.stdout + done.stderr
    lines = sorted(
        (line for line in done.stdout.splitlines() if "layout OK" in line),
        key=lambda line: int(line.split()[1].split("/")[0]),
    )
    nranks = len(lines)
    assert nranks == gpu_count()  # the example runs a rank on every GPU it sees
    assert [line.split(":")[0] for line in lines] == [f"rank {r}/{nranks}" for r in range(nranks)]
    for line in lines:
        counts = [int(n) for n in re.search(r"tokens per rank:([\d ]+)\)", line).group(1).split()]
        assert len(counts) == nranks and all(0 <= c <= 64 for c in counts)
