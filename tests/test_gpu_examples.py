"""GPU tier: the shipped examples run and report success."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import SHARE_GPU, gpu_count, import_or_skip, requires_gpus, skip_missing

import pydeepep

pytestmark = [pytest.mark.gpu, requires_gpus(1)]

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
CUDA_HOME = Path(os.environ.get("CUDA_HOME", "/usr/local/cuda"))


def run(cmd, **kwargs):
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, **kwargs)
    print(result.stdout, result.stderr)
    return result


def test_python_example_with_numpy_data():
    result = run([sys.executable, str(EXAMPLES / "python" / "dispatch_layout.py")])
    assert result.returncode == 0
    assert result.stdout.count("matches the reference") == gpu_count()


def test_python_example_with_cupy_arrays():
    import_or_skip("cupy")
    result = run([sys.executable, str(EXAMPLES / "python" / "dispatch_layout.py"), "--cupy"])
    assert result.returncode == 0
    assert result.stdout.count("matches the reference") == gpu_count()
    # Outputs allocated on a CuPy stream are freed cleanly (the stream outlives them, the right context is current).
    assert "Warning" not in result.stdout + result.stderr


@pytest.mark.parametrize("flags", [[], ["--zero-copy"]], ids=["caller_outputs", "zero_copy"])
def test_python_dispatch_combine_example(flags):
    result = run([sys.executable, str(EXAMPLES / "python" / "dispatch_combine.py"), *flags])
    assert result.returncode == 0
    assert result.stdout.count("combine matches the reference") == gpu_count()


@requires_gpus(2)
def test_launcher_example_from_environment_variables(tmp_path):
    procs = []
    for rank in range(2):
        env = dict(
            os.environ,
            RANK=str(rank),
            WORLD_SIZE="2",
            LOCAL_RANK=str(rank),
            DEEPEP_UNIQUE_ID_FILE=str(tmp_path / "job.id"),
        )
        procs.append(
            subprocess.Popen(
                [sys.executable, str(EXAMPLES / "python" / "launchers.py"), "--via", "env"],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    outs = [p.communicate(timeout=300) for p in procs]
    print(outs)
    assert [p.returncode for p in procs] == [0, 0]
    assert sum(o[0].count("layout OK") for o in outs) == 2


@requires_gpus(2)
def test_launcher_example_under_mpirun():
    if shutil.which("mpirun") is None:
        skip_missing("mpirun is not installed")
    import_or_skip("mpi4py")
    result = run(
        [
            "mpirun",
            "--allow-run-as-root",
            "--oversubscribe",
            "-np",
            "2",
            sys.executable,
            str(EXAMPLES / "python" / "launchers.py"),
            "--via",
            "mpi",
        ]
    )
    assert result.returncode == 0
    assert result.stdout.count("layout OK") == 2


@requires_gpus(2)
def test_launcher_example_under_torchrun():
    import_or_skip("torch.distributed")
    result = run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc-per-node",
            "2",
            str(EXAMPLES / "python" / "launchers.py"),
            "--via",
            "torch",
        ]
    )
    assert result.returncode == 0
    assert result.stdout.count("layout OK") == 2


def test_c_example_over_all_gpus(tmp_path):
    if shutil.which("cc") is None or not (CUDA_HOME / "include" / "cuda_runtime.h").exists():
        skip_missing("needs a C compiler and the CUDA toolkit headers")
    binary = tmp_path / "dispatch_layout"
    lib_dir = pydeepep.get_lib_dir()
    build = run(
        [
            "cc",
            "-std=c99",
            "-O2",
            "-Wall",
            "-Wextra",
            "-Werror",
            str(EXAMPLES / "c" / "dispatch_layout.c"),
            f"-I{pydeepep.get_include()}",
            f"-I{CUDA_HOME / 'include'}",
            f"-L{lib_dir}",
            f"-Wl,-rpath,{lib_dir}",
            "-ldeepep",
            f"-L{CUDA_HOME / 'lib64'}",
            f"-Wl,-rpath,{CUDA_HOME / 'lib64'}",
            "-lcudart",
            "-o",
            str(binary),
        ]
    )
    assert build.returncode == 0
    result = run([str(binary), str(gpu_count())])
    assert result.returncode == 0
    assert result.stdout.count("layout OK") == gpu_count()


@pytest.fixture(scope="module")
def moe_step(tmp_path_factory):
    """The C++ MoE step example, built through the installed CMake package."""
    from test_packaging import cmake

    if cmake() is None or shutil.which("c++") is None:
        skip_missing("needs cmake and a C++ compiler")
    build = tmp_path_factory.mktemp("cpp") / "build"
    configure = run(
        [cmake(), "-S", str(EXAMPLES / "cpp"), "-B", str(build), f"-Ddeepep_DIR={pydeepep.get_cmake_dir()}"]
    )
    assert configure.returncode == 0
    assert run([cmake(), "--build", str(build), "--target", "moe_step"]).returncode == 0
    return build / "moe_step"


# One rank per GPU; with one GPU shared under CUDA MPS (DEEPEP_TEST_SHARE_GPU=1) also two ranks on it.
@pytest.mark.parametrize("ranks", sorted({gpu_count(), 2} if SHARE_GPU else {gpu_count()}))
def test_cpp_moe_step_example(moe_step, ranks):
    result = run([str(moe_step), str(ranks)])
    assert result.returncode == 0
    assert result.stdout.count("high-throughput dispatch, combine and cached dispatch OK") == ranks
    assert result.stdout.count("low-latency step") == 2 * ranks
    assert "moe_step: every rank OK" in result.stdout
