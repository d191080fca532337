"""CPU tier: tests/time_variants.sh refuses variants it cannot build before it installs, builds or times anything, so
that a typo costs no GPU time; `--check` runs that check alone, on any machine. tests/compare_records.py, which prints
the variants' records side by side, on records written here. tests/run_sanitizer.sh's count of each rank's errors and
exit codes, on one rank or two, with a stand-in for compute-sanitizer."""

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


# tests/run_sanitizer.sh's bookkeeping, with a stand-in for compute-sanitizer: it runs nothing, notes the rank and
# rank count it was given in the rank's output, writes the error summary that FAKE_ERRORS (rank=count,...) says, and
# exits with the sanitizer's error code (9) where it counted errors or where FAKE_EXIT9 names the rank.
FAKE_SANITIZER = """#!/usr/bin/env bash
log= rank= nranks=
while [ $# -gt 0 ]; do
  case $1 in
    --version) echo "fake compute-sanitizer"; exit 0 ;;
    --log-file) log=$2; shift ;;
    --rank) rank=$2; shift ;;
    --nranks) nranks=$2; shift ;;
  esac
  shift
done
errors=0
for pair in ${FAKE_ERRORS//,/ }; do [ "${pair%%=*}" = "$rank" ] && errors=${pair#*=}; done
echo "rank $rank of $nranks"
echo "========= ERROR SUMMARY: $errors errors" > "$log"
[ "$errors" = 0 ] && [ "${FAKE_EXIT9:-}" != "$rank" ] || exit 9
"""


def run_sanitizer(tmp_path, ranks, fake_errors="", fake_exit9=""):
    fake = tmp_path / "compute-sanitizer"
    fake.write_text(FAKE_SANITIZER)
    fake.chmod(0o755)
    env = dict(
        os.environ,
        OUT=str(tmp_path),
        PYTHON=sys.executable,
        COMPUTE_SANITIZER=str(fake),
        DEEPEP_SANITIZER_INSTALLED="1",
        SANITIZER_TOOLS="memcheck",
        SANITIZER_WORKLOADS="layout",
        SANITIZER_RANKS=ranks,
        FAKE_ERRORS=fake_errors,
        FAKE_EXIT9=fake_exit9,
    )
    return subprocess.run(
        ["bash", str(ROOT / "tests" / "run_sanitizer.sh")], cwd=ROOT, env=env, capture_output=True, text=True
    )


@pytest.mark.parametrize(
    "ranks, fake_errors, fake_exit9, code, line",
    [
        ("1", "", "", 0, "errors 0     ranks exit 0 "),
        ("2", "", "", 0, "errors 0     ranks exit 0,0 "),
        ("2", "1=2", "", 1, "errors 2     ranks exit 0,9 "),
        # the sanitizer's error exit alone, with no error in its summary, still fails the job
        ("2", "", "0", 1, "errors 0     ranks exit 9,0 "),
    ],
)
def test_the_sanitizer_script_counts_each_rank(tmp_path, ranks, fake_errors, fake_exit9, code, line):
    pytest.importorskip("pydeepep._core", reason="the script imports the installed pydeepep")
    out = run_sanitizer(tmp_path, ranks, fake_errors, fake_exit9)
    assert out.returncode == code, out.stdout + out.stderr
    (row,) = [r for r in out.stdout.splitlines() if r.startswith("memcheck   layout")][-1:]
    assert line in row and row.endswith("ERRORS" if code else "ok"), row
    outs = sorted((tmp_path / "sanitizer" / "memcheck-layout").glob("rank*.out"))
    assert [o.read_text().strip() for o in outs] == [f"rank {r} of {ranks}" for r in range(int(ranks))]


def test_the_sanitizer_script_refuses_other_rank_counts(tmp_path):
    out = run_sanitizer(tmp_path, "3")
    assert out.returncode == 2 and "SANITIZER_RANKS is 3: 1 or 2" in out.stderr, out.stdout + out.stderr
    assert not (tmp_path / "sanitizer").exists()
