"""CPU tier: tests/time_variants.sh refuses variants it cannot build before it installs, builds or times anything, so
that a typo costs no GPU time; `--check` runs that check alone, on any machine."""

import os
import pathlib
import shutil
import subprocess

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "tests" / "time_variants.sh"

pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")


def run(tmp_path, *specs):
    env = dict(os.environ, OUT=str(tmp_path), PYTHON="python-that-does-not-exist")
    return subprocess.run(["bash", str(SCRIPT), *specs], cwd=ROOT, env=env, capture_output=True, text=True)


def test_good_variants_check_out(tmp_path):
    out = run(
        tmp_path,
        "--check",
        "base=",
        "twelve=s/kCombinePushWarps = 8/kCombinePushWarps = 12/",
        "semicolon=s/kCombinePushWarps = 8./kCombinePushWarps = 12\\x3b/",
        "tree=@libdeepep",
        # the second expression matches only what the first wrote, as the build applies them in order
        "chained=s/kCombinePushWarps = 8/kCombinePushWarpsX = 8/;s/kCombinePushWarpsX = 8/kCombinePushWarps = 6/",
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "all 5 variants check out" in out.stdout
    assert not (tmp_path / "variants").exists()


@pytest.mark.parametrize(
    "spec, message",
    [
        # The ';' ends the expression early: the variant would have failed to build on the GPU machine.
        ("split=s/kCombinePushWarps = 8;/kCombinePushWarps = 12;/", "is not a whole s/old/new/ expression"),
        ("nothing=s/kNoSuchConstant = 8/kNoSuchConstant = 9/", "matches nothing in libdeepep/*.cu"),
        ("folder=@no/such/folder", "no folder"),
    ],
)
def test_a_bad_variant_stops_the_run_before_anything_is_installed(tmp_path, spec, message):
    # Without --check: the PYTHON given cannot install anything, so reaching the install would fail otherwise.
    out = run(tmp_path, "base=", spec)
    assert out.returncode == 2, out.stdout + out.stderr
    name = spec.split("=", 1)[0]
    assert f"variant {name}: " in out.stdout and message in out.stdout
    assert not (tmp_path / "variants").exists()
