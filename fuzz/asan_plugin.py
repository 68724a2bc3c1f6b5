"""pytest plugin for ``make test-asan``: the tests run against the sanitizer build.

Loaded with ``-p asan_plugin`` (fuzz/ on PYTHONPATH) and ``SAMANTIC_C_PATH`` set
to the ASan/UBSan ``_C`` module (fuzz/asan_build.sh); the session aborts unless
``samantic._C`` really is that file and the sanitizer runtimes are loaded.
"""

from __future__ import annotations

import os

import c_override

_PATH = os.environ.get("SAMANTIC_C_PATH")
if not _PATH:
    raise RuntimeError("asan_plugin needs SAMANTIC_C_PATH (the sanitizer build of samantic._C)")
_C = c_override.install(_PATH)


def _loaded_runtimes():
    with open("/proc/self/maps") as f:
        maps = f.read()
    return [lib for lib in ("libasan", "libubsan") if lib in maps]


def pytest_report_header(config):
    return [f"samantic._C: {_C.__file__} ({', '.join(_loaded_runtimes())})"]


def pytest_sessionstart(session):
    from samantic import _C as imported

    assert os.path.samefile(imported.__file__, _PATH), (imported.__file__, _PATH)
    missing = {"libasan", "libubsan"} - set(_loaded_runtimes())
    assert not missing, f"sanitizer runtimes not loaded: {missing}"
