"""CPU tier: tests/time_variants.sh refuses variants it cannot build before it installs, builds or times anything, so
that a typo costs no GPU time; `--check` runs that check alone, on any machine. tests/compare_records.py, which prints
the variants' records side by side, on records written here."""

import json
import os
import pathlib
import shutil
import subprocess
import sys

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


def write_record(path, per_rank):
    path.write_text(json.dumps({"machine": "test", "commit": "x", "command": "test", "results": per_rank}))
    return path


def test_records_side_by_side(tmp_path):
    # Two ranks per record: a time is the slower rank's, the ceiling rank 0's; a case one record lacks shows '-'.
    base = write_record(
        tmp_path / "base.json",
        [
            [
                {"case": "ceiling_push", "num_tokens": 0, "sms": 24, "gbps": 330.0},
                {"case": "dispatch_cached_fp8", "num_tokens": 4096, "sms": 24, "us": 123.0, "gbps": 1.0},
                {"case": "ll_dispatch_fp8", "num_tokens": 128, "sms": 0, "us": 19.0},
            ],
            [
                {"case": "ceiling_push", "num_tokens": 0, "sms": 24, "gbps": 320.0},
                {"case": "dispatch_cached_fp8", "num_tokens": 4096, "sms": 24, "us": 125.5, "gbps": 1.0},
                {"case": "ll_dispatch_fp8", "num_tokens": 128, "sms": 0, "us": 18.5},
            ],
        ],
    )
    new = write_record(
        tmp_path / "new.json",
        [
            [{"case": "dispatch_cached_fp8", "num_tokens": 4096, "sms": 24, "us": 119.0}],
            [{"case": "dispatch_cached_fp8", "num_tokens": 4096, "sms": 24, "us": 119.3}],
        ],
    )
    out = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "compare_records.py"), str(base), f"tail6={new}"],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr
    lines = [line.split() for line in out.stdout.splitlines()]
    assert lines[0] == ["case", "N", "SMs", "base", "tail6"]
    assert lines[1] == ["ceiling_push", "0", "24", "330.0", "-", "GB/s"]
    assert lines[2] == ["dispatch_cached_fp8", "4096", "24", "125.5", "119.3"]
    assert lines[3] == ["ll_dispatch_fp8", "128", "19.0", "-"]


def test_compare_records_needs_a_record():
    out = subprocess.run([sys.executable, str(ROOT / "tests" / "compare_records.py")], capture_output=True, text=True)
    assert out.returncode == 2 and "Usage" in out.stderr
