"""CPU tier: the installed package serves C and C++ builds: CMake's find_package(deepep) and pkg-config."""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import gpu_count

import pydeepep

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE_CPP = ROOT / "examples" / "cpp"


def cmake():
    try:
        import cmake as cmake_module

        return str(Path(cmake_module.CMAKE_BIN_DIR) / "cmake")
    except ImportError:
        return shutil.which("cmake")


@pytest.mark.skipif(cmake() is None or shutil.which("c++") is None, reason="needs cmake and a C++ compiler")
def test_cpp_example_builds_with_find_package_and_runs(tmp_path):
    build = tmp_path / "build"
    subprocess.run(
        [cmake(), "-S", str(EXAMPLE_CPP), "-B", str(build), f"-Ddeepep_DIR={pydeepep.get_cmake_dir()}"],
        check=True,
        capture_output=True,
        text=True,
    )
    subprocess.run([cmake(), "--build", str(build)], check=True, capture_output=True, text=True)
    out = subprocess.run([str(build / "layout_one_rank")], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith(f"libdeepep {pydeepep.__version__} (header ")
    # Without a GPU the example says so; with one it checks a layout.
    has_gpu = gpu_count() > 0
    assert ("layout on one rank: OK" if has_gpu else "no GPU here") in out.stdout, out.stdout
    # The MoE step example (its GPU runs: tests/test_gpu_examples.py).
    out = subprocess.run([str(build / "moe_step")], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    assert ("moe_step: every rank OK" if has_gpu else "no GPU here") in out.stdout, out.stdout


@pytest.mark.skipif(shutil.which("pkg-config") is None or shutil.which("cc") is None, reason="needs pkg-config, cc")
def test_pkg_config_describes_the_installed_library(tmp_path):
    env = dict(os.environ, PKG_CONFIG_PATH=str(Path(pydeepep.get_lib_dir()) / "pkgconfig"))
    flags = subprocess.run(
        ["pkg-config", "--cflags", "--libs", "deepep"], env=env, check=True, capture_output=True, text=True
    ).stdout.split()
    assert "-ldeepep" in flags
    source = tmp_path / "main.c"
    source.write_text(
        "#include <deepep/deepep.h>\nint main(void){int v=0;"
        "return deepepGetVersion(&v) == deepepSuccess && v == DEEPEP_VERSION ? 0 : 1;}\n"
    )
    subprocess.run(["cc", "-std=c99", str(source), *flags, "-o", str(tmp_path / "main")], check=True)
    assert subprocess.run([str(tmp_path / "main")]).returncode == 0


def test_version_of_package_and_library_agree():
    out = subprocess.run(
        [sys.executable, "-c", "import pydeepep; print(pydeepep.__version__)"],
        capture_output=True,
        text=True,
        check=True,
        cwd="/",
    )
    assert out.stdout.strip() == "{}.{}.{}".format(*pydeepep.version())


def test_the_package_holds_the_library_of_its_own_version_only_and_once_per_name_it_needs():
    # An earlier build's install (libdeepep.so.0.2.0 beside .so.0.2.1) used to be packaged too, and a wheel, which
    # holds no symbolic links, had a full copy for each of the three names.
    major, minor, _ = pydeepep.version()
    libraries = sorted(path.name for path in Path(pydeepep.get_lib_dir()).glob("libdeepep.so*"))
    soname = f"libdeepep.so.{major}" if major else f"libdeepep.so.0.{minor}"
    assert libraries == ["libdeepep.so", soname], libraries


def test_the_library_names_its_source_files_relative_to_the_project():
    # Error messages carry __FILE__: the folder the library was built in (a user's home, a CI runner's) stays out.
    library = (Path(pydeepep.get_lib_dir()) / "libdeepep.so").read_bytes()
    assert b"libdeepep/api_ht.cpp" in library
    # Relative names start with "libdeepep/"; only an absolute one (any folder, not only this checkout) has a "/" first.
    assert re.findall(rb"/libdeepep/[a-z_]+\.(?:cpp|cu|hpp|cuh)", library) == []


@pytest.mark.skipif(
    cmake() is None or shutil.which("nvcc") is None and not Path("/usr/local/cuda/bin/nvcc").exists(),
    reason="needs cmake and nvcc (configuring the library)",
)
def test_pkg_config_file_finds_the_prefix_from_any_library_folder(tmp_path):
    # A Debian-style install puts the library two folders deep: the .pc file's prefix must still lead to the prefix.
    root = Path(__file__).resolve().parent.parent
    env = dict(os.environ)
    if shutil.which("nvcc") is None:
        env["CUDACXX"] = "/usr/local/cuda/bin/nvcc"
    subprocess.run(
        [
            cmake(),
            "-S",
            str(root),
            "-B",
            str(tmp_path / "build"),
            "-DCMAKE_INSTALL_PREFIX=/opt/deepep",
            "-DCMAKE_INSTALL_LIBDIR=lib/x86_64-linux-gnu",
            f"-DPython3_EXECUTABLE={sys.executable}",
        ],
        check=True,
        capture_output=True,
        text=True,
        env=env,
    )
    fields = dict(
        line.split("=", 1) for line in (tmp_path / "build" / "deepep.pc").read_text().splitlines() if "=" in line
    )
    prefix = fields["prefix"].replace("${pcfiledir}", "/opt/deepep/lib/x86_64-linux-gnu/pkgconfig")
    assert os.path.normpath(prefix) == "/opt/deepep", fields["prefix"]
    assert fields["libdir"] == "${prefix}/lib/x86_64-linux-gnu" and fields["includedir"] == "${prefix}/include"


def _env_putting_cwd_first():
    # As a user's shell runs `python -m`: the current directory first on sys.path, so a checkout there shadows the
    # installed package (the GPU tier sets PYTHONSAFEPATH for itself, which would hide what these tests check).
    return {name: value for name, value in os.environ.items() if name != "PYTHONSAFEPATH"}


def test_the_readme_commands_work_from_the_repository_root():
    # `pip install . && python -m pydeepep.bench` runs in the checkout, whose pydeepep/ (no compiled extension) comes
    # first on sys.path there: the installed copy serves the commands all the same.
    root = EXAMPLE_CPP.parent.parent
    if any((root / "pydeepep").glob("_core*.so")):
        pytest.skip("the checkout holds a built extension (an in-place or editable build): nothing is shadowed")

    def run(*args):
        return subprocess.run(
            [sys.executable, "-m", *args],
            cwd=root,
            env=_env_putting_cwd_first(),
            capture_output=True,
            text=True,
            timeout=120,
        )

    lib_dir = run("pydeepep", "--lib-dir")
    assert lib_dir.returncode == 0, lib_dir.stderr
    assert lib_dir.stdout.strip() == pydeepep.get_lib_dir() and Path(lib_dir.stdout.strip(), "libdeepep.so").exists()
    bench = run("pydeepep.bench", "--help")
    assert bench.returncode == 0 and "usage: python -m pydeepep.bench" in bench.stdout, bench.stderr


def test_a_checkout_that_differs_from_the_installed_copy_says_so(tmp_path):
    # A checkout whose Python modules are not those installed is not mixed with the installed copy's.
    source = EXAMPLE_CPP.parent.parent / "pydeepep"
    if any(source.glob("_core*.so")):
        pytest.skip("the checkout holds a built extension (an in-place or editable build): nothing is shadowed")
    checkout = tmp_path / "pydeepep"
    checkout.mkdir()
    for module in source.glob("*.py"):
        shutil.copy(module, checkout / module.name)
    with open(checkout / "launch.py", "a") as edited:
        edited.write("\nEDITED = True\n")
    found = subprocess.run(
        [sys.executable, "-m", "pydeepep", "--lib-dir"],
        cwd=tmp_path,
        env=_env_putting_cwd_first(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert found.returncode != 0 and "differs from it (launch.py): reinstall" in found.stderr, found.stderr


@pytest.mark.skipif(
    cmake() is None
    or shutil.which("c++") is None
    or shutil.which("nvcc") is None
    and not Path("/usr/local/cuda/bin/nvcc").exists(),
    reason="needs cmake, nvcc and a C++ compiler (building the library)",
)
@pytest.mark.skipif(
    os.environ.get("DEEPEP_TEST_GPU_TIER") == "1",
    reason="a CPU-tier check that builds the library again: the GPU tier's time limit goes to the GPU suites",
)
def test_a_cmake_install_links_after_nvshmem_moved(tmp_path):
    """The library built and installed by CMake alone, against an NVSHMEM tree that then moves away: a consumer's
    find_package(deepep) finds NVSHMEM again (NVSHMEM_DIR) and links; the library's run path names the old tree."""
    import importlib.util

    root = Path(__file__).resolve().parent.parent
    spec = importlib.util.find_spec("nvidia.nvshmem")
    if spec is None:
        pytest.skip("needs the nvidia-nvshmem-cu13 wheel")
    built_with, moved = tmp_path / "nvshmem", tmp_path / "nvshmem-moved"
    wheel = Path(list(spec.submodule_search_locations)[0])
    shutil.copytree(wheel / "include", built_with / "include")  # what the build reads of NVSHMEM, not the whole wheel
    (built_with / "lib").mkdir()
    for library in ("libnvshmem_host.so.3", "libnvshmem_device.a"):
        shutil.copy2(wheel / "lib" / library, built_with / "lib" / library)
    env = {key: value for key, value in os.environ.items() if key not in ("LD_LIBRARY_PATH", "LIBRARY_PATH")}
    if shutil.which("nvcc") is None:
        env["CUDACXX"] = "/usr/local/cuda/bin/nvcc"
    prefix = tmp_path / "prefix"

    def run(*args, **kwargs):
        done = subprocess.run(list(args), capture_output=True, text=True, env=env, **kwargs)
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]

    run(cmake(), "-S", str(root), "-B", str(tmp_path / "build"), f"-DCMAKE_INSTALL_PREFIX={prefix}",
        f"-DNVSHMEM_DIR={built_with}", f"-DPython3_EXECUTABLE={sys.executable}")  # fmt: skip
    run(cmake(), "--build", str(tmp_path / "build"), "--parallel", str(os.cpu_count() or 2))
    run(cmake(), "--install", str(tmp_path / "build"))
    built_with.rename(moved)
    consumer = tmp_path / "consumer"
    consumer.mkdir()
    (consumer / "main.cpp").write_text(
        "#include <deepep/deepep.h>\nint main() { int v = 0; return deepepGetVersion(&v) == deepepSuccess ? 0 : 1; }\n"
    )
    (consumer / "CMakeLists.txt").write_text(
        "cmake_minimum_required(VERSION 3.24)\nproject(consumer LANGUAGES CXX)\n"
        "find_package(deepep 0.2 CONFIG REQUIRED)\nadd_executable(main main.cpp)\n"
        "target_link_libraries(main PRIVATE deepep::deepep)\n"
    )
    env["NVSHMEM_DIR"] = str(moved)
    run(cmake(), "-S", str(consumer), "-B", str(consumer / "build"), f"-Ddeepep_DIR={prefix}/lib/cmake/deepep")
    run(cmake(), "--build", str(consumer / "build"))
    env["LD_LIBRARY_PATH"] = str(moved / "lib")  # the library's own run path names the tree that moved away
    run(str(consumer / "build" / "main"))


@pytest.mark.skipif(shutil.which("git") is None or not (ROOT / ".git").exists(), reason="needs a git checkout")
def test_the_source_distribution_holds_what_its_build_needs(tmp_path):
    """`setup.py sdist` of the tracked files (as pip and `python -m build` make it) holds every tracked source the
    build reads: CMakeLists.txt, cmake/, include/, libdeepep/ and the Cython sources (MANIFEST.in)."""
    import tarfile

    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    tree = tmp_path / "tree"
    for name in tracked:
        (tree / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, tree / name)
    made = subprocess.run(
        [sys.executable, "setup.py", "-q", "sdist", "-d", str(tmp_path / "dist")],
        cwd=tree,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert made.returncode == 0, made.stdout + made.stderr
    (archive,) = (tmp_path / "dist").glob("pydeepep-*.tar.gz")
    with tarfile.open(archive) as sdist:
        held = {name.split("/", 1)[1] for name in sdist.getnames() if "/" in name}
    needed = [
        name
        for name in tracked
        if name == "CMakeLists.txt"
        or name.startswith(("cmake/", "include/", "libdeepep/"))
        or re.fullmatch(r"pydeepep/[^/]+\.(pyx|pxi|pxd|py)", name)
    ]
    assert len(needed) > 30 and not [name for name in needed if name not in held], sorted(set(needed) - held)


def setup_function_named(name):
    """A function of setup.py, without running setup.py (which builds)."""
    import ast

    tree = ast.parse((ROOT / "setup.py").read_text())
    (node,) = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == name]
    namespace = {"Path": Path}
    exec(compile(ast.Module([node], []), "setup.py", "exec"), namespace)
    return namespace[name]


def test_a_cmake_cache_of_other_settings_or_gone_paths_is_not_reused(tmp_path):
    stale = setup_function_named("stale_cmake_cache")
    assert not stale(tmp_path, {"CMAKE_CUDA_ARCHITECTURES": "90"})  # no cache yet
    cache = tmp_path / "CMakeCache.txt"
    cache.write_text(f"CMAKE_CUDA_ARCHITECTURES:STRING=90\nCMAKE_INSTALL_PREFIX:PATH={tmp_path}\n")
    assert not stale(tmp_path, {"CMAKE_CUDA_ARCHITECTURES": "90", "NVSHMEM_DIR": None})
    # CMake would keep the cached list (no sm_90 code in a "default" build after one for sm_100), or the NVSHMEM tree.
    assert stale(tmp_path, {"CMAKE_CUDA_ARCHITECTURES": "100", "NVSHMEM_DIR": None})
    cache.write_text(f"CMAKE_CUDA_ARCHITECTURES:STRING=90\nNVSHMEM_DIR:PATH={tmp_path}\n")
    assert stale(tmp_path, {"CMAKE_CUDA_ARCHITECTURES": "90", "NVSHMEM_DIR": None})
    assert not stale(tmp_path, {"CMAKE_CUDA_ARCHITECTURES": "90", "NVSHMEM_DIR": str(tmp_path)})
    # A path that is gone (pip's temporary build environment).
    cache.write_text(f"CMAKE_CUDA_ARCHITECTURES:STRING=90\nCMAKE_MAKE_PROGRAM:FILEPATH={tmp_path / 'gone' / 'ninja'}\n")
    assert stale(tmp_path, {"CMAKE_CUDA_ARCHITECTURES": "90"})
