"""Builds libdeepep with CMake, places it inside the package (with an $ORIGIN run path), then builds the Cython
extension against it. `pip install .` does everything; `python setup.py build_ext --inplace` builds in the tree.

Environment knobs: NVSHMEM_DIR (an NVSHMEM tree instead of the pip wheel), CUDA_ARCHITECTURES (default 90),
DEEPEP_BUILD_TYPE (default Release), DEEPEP_BUILD_JOBS.
"""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


def project_version() -> str:
    text = (ROOT / "CMakeLists.txt").read_text()
    return re.search(r"project\(deepep VERSION ([0-9.]+)", text).group(1)


def source_commit() -> str:
    """The commit this tree is, with "-dirty" where tracked files differ from it; "unknown" outside a git checkout of
    this project (a copy without .git, or a tree inside another project's repository)."""

    def git(*args):
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=30, check=True).stdout

    try:
        if Path(git("rev-parse", "--show-toplevel").strip()).resolve() != ROOT:
            return "unknown"
        head = git("rev-parse", "HEAD").strip()
        changed = git("status", "--porcelain", "--untracked-files=no").strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return head + ("-dirty" if changed else "")


def stale_cmake_cache(build_dir: Path, settings: dict) -> bool:
    """Whether the CMake cache in `build_dir` must go. It names a file or folder that is gone: pip builds in a
    temporary environment (CMake, ninja and the NVSHMEM wheel under /tmp/pip-build-env-*) that it deletes afterwards,
    so the next `pip install` of the same checkout would find a cache pointing nowhere. Or it holds another value of
    one of `settings` (cache name -> value this build gives, None for none): CMake keeps what the cache holds, such as
    the GPU architectures or the NVSHMEM tree found from NVSHMEM_DIR, when a later build gives another or none."""
    cache = build_dir / "CMakeCache.txt"
    if not cache.exists():
        return False
    held = {}
    for line in cache.read_text(errors="replace").splitlines():
        key, _, value = line.partition("=")
        if key.endswith((":FILEPATH", ":PATH")) and value.startswith("/") and not Path(value).exists():
            return True
        held[key.partition(":")[0]] = value
    return any(held.get(name) != value for name, value in settings.items())


def cmake_executable() -> str:
    try:
        import cmake  # the PyPI package puts a current CMake beside the interpreter

        return str(Path(cmake.CMAKE_BIN_DIR) / "cmake")
    except ImportError:
        return shutil.which("cmake") or "cmake"


class BuildWithCMake(build_ext):
    """Configures, builds and installs libdeepep into the package directory, then builds the extension."""

    def run(self):
        package_dir = Path(self.get_ext_fullpath("pydeepep._core")).resolve().parent
        build_dir = Path(self.build_temp).resolve() / "cmake"
        # Given every time, so that a cache of an earlier build with other settings is never reused (above).
        settings = {
            "CMAKE_CUDA_ARCHITECTURES": os.environ.get("CUDA_ARCHITECTURES") or os.environ.get("CUDAARCHS") or "90",
            "NVSHMEM_DIR": os.environ.get("NVSHMEM_DIR") or None,
        }
        if stale_cmake_cache(build_dir, settings):
            shutil.rmtree(build_dir)
        build_dir.mkdir(parents=True, exist_ok=True)
        cmake = cmake_executable()
        configure = [
            cmake,
            str(ROOT),
            f"-DCMAKE_BUILD_TYPE={os.environ.get('DEEPEP_BUILD_TYPE', 'Release')}",
            f"-DCMAKE_INSTALL_PREFIX={package_dir}",
            "-DCMAKE_INSTALL_LIBDIR=lib",
            "-DCMAKE_INSTALL_INCLUDEDIR=include",
            "-DDEEPEP_WHEEL=ON",
            f"-DPython3_EXECUTABLE={sys.executable}",
        ]
        configure += [f"-D{name}={value}" for name, value in settings.items() if value is not None]
        if shutil.which("ninja") or _has_ninja_module():
            configure += ["-G", "Ninja"]
        jobs = os.environ.get("DEEPEP_BUILD_JOBS", str(os.cpu_count() or 2))
        subprocess.check_call(configure, cwd=build_dir)
        subprocess.check_call([cmake, "--build", ".", "--parallel", jobs], cwd=build_dir)
        # What an earlier build installed goes first: a library of another version (libdeepep.so.0.2.0 beside
        # .so.0.2.1) would be packaged too.
        for installed in ("lib", "include"):
            shutil.rmtree(package_dir / installed, ignore_errors=True)
        subprocess.check_call([cmake, "--install", "."], cwd=build_dir)
        # What `python -m pydeepep.bench` records as the commit measured (pydeepep/_build_commit.txt).
        (package_dir / "_build_commit.txt").write_text(source_commit() + "\n")

        for ext in self.extensions:
            ext.include_dirs.append(str(package_dir / "include"))
            ext.library_dirs.append(str(package_dir / "lib"))
        super().run()


def _has_ninja_module() -> bool:
    try:
        import ninja  # noqa: F401

        os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
        return True
    except ImportError:
        return False


def extensions():
    import numpy  # noqa: F401  (build requirement; numpy is used at run time only)
    from Cython.Build import cythonize

    core = Extension(
        "pydeepep._core",
        sources=["pydeepep/_core.pyx"],
        include_dirs=[str(ROOT / "include")],
        libraries=["deepep"],
        runtime_library_dirs=["$ORIGIN/lib"],
    )
    return cythonize([core], compiler_directives={"language_level": "3"}, include_path=[str(ROOT)])


setup(
    version=project_version(),
    packages=["pydeepep"],
    package_data={"pydeepep": ["*.pyi", "py.typed", "*.pxd"]},
    ext_modules=extensions(),
    cmdclass={"build_ext": BuildWithCMake},
    zip_safe=False,
)
