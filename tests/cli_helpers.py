"""The installed ``samantic`` command, run in a subprocess as a user runs it (shared by the CLI tests)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest


def samantic_exe() -> str:
    """The console script beside this interpreter (the test is skipped when it is not installed)."""
    exe = Path(sys.executable).parent / "samantic"
    if not exe.exists():
        pytest.skip("the samantic console script is not installed")
    return str(exe)


def cli_env() -> dict:
    """This environment without RAY_ADDRESS: a run with --engine ray starts (and stops) its own local Ray."""
    env = dict(os.environ)
    env.pop("RAY_ADDRESS", None)
    return env


def run_segment(args, **kw) -> subprocess.CompletedProcess:
    """``samantic segment ARGS`` to completion, output captured as text."""
    kw.setdefault("env", cli_env())
    return subprocess.run([samantic_exe(), "segment", *args], capture_output=True, text=True, timeout=600, **kw)
