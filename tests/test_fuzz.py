"""The atheris harnesses in fuzz/ (see fuzz/README.md) keep working and stay clean.

Fast: every harness runs its seed corpus once (no fuzzing), so a harness cannot rot when the
ops change. Slow (``-m slow``): every harness fuzzes for FUZZ_TEST_SECONDS (default 20 s) with a
fixed libFuzzer seed; a finding fails the test with the harness output (the crashing input is
left in the test's tmp folder; reproduce with ``.venv/bin/python fuzz/fuzz_<name>.py <file>``).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("atheris")

ROOT = Path(__file__).resolve().parent.parent
HARNESSES = sorted(p.stem[len("fuzz_"):] for p in (ROOT / "fuzz").glob("fuzz_*.py"))


def _env():
    env = dict(os.environ)
    env.pop("SAMANTIC_C_PATH", None)  # the installed build, not a sanitizer one
    env.setdefault("SAMANTIC_NUM_THREADS", "2")
    return env


def _run(args, timeout):
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, env=_env(), capture_output=True, text=True,
                          timeout=timeout)
    return proc.returncode, proc.stdout + proc.stderr


def test_every_target_has_a_harness():
    assert {"rle_string", "rle_dict", "postprocess", "nms", "merge", "fusion"} <= set(HARNESSES)


@pytest.mark.parametrize("name", HARNESSES)
def test_harness_passes_its_seeds(name, tmp_path):
    script = f"fuzz/fuzz_{name}.py"
    rc, out = _run([script, "--write-seeds", str(tmp_path)], timeout=120)
    assert rc == 0, out
    seeds = sorted(str(p) for p in tmp_path.iterdir())
    assert len(seeds) >= 8
    rc, out = _run([script, *seeds], timeout=300)
    assert rc == 0, out[-4000:]
    assert f"Running {len(seeds)} inputs" in out


@pytest.mark.slow
@pytest.mark.parametrize("name", HARNESSES)
def test_harness_fuzzes_clean(name, tmp_path):
    seconds = int(os.environ.get("FUZZ_TEST_SECONDS", "20"))
    corpus, artifacts = tmp_path / "corpus", tmp_path / "artifacts"
    artifacts.mkdir()
    script = f"fuzz/fuzz_{name}.py"
    rc, out = _run([script, "--write-seeds", str(corpus)], timeout=120)
    assert rc == 0, out
    rc, out = _run([script, str(corpus), f"-max_total_time={seconds}", "-seed=1", "-timeout=60",
                    "-rss_limit_mb=4096", f"-artifact_prefix={artifacts}/"], timeout=seconds + 300)
    assert rc == 0, f"fuzz_{name} found something (inputs in {artifacts}):\n{out[-6000:]}"
    assert "Done " in out
