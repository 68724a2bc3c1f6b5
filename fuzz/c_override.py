"""Loads another build of ``samantic._C`` (e.g. the ASan build) in place of the installed one.

``install(path)`` imports the extension module at ``path`` under the name
``samantic._C`` and registers it in ``sys.modules`` before anything imports
samantic's wrappers, so ``from samantic import _C`` (samantic/ops/_common.py)
gets it; the editable install's finder is never asked. It raises when
``samantic._C`` was already imported from somewhere else.

``from_env()`` does that for ``$SAMANTIC_C_PATH`` when set and returns the path.
"""

from __future__ import annotations

import importlib.util
import os
import sys


def install(path: str):
    path = os.path.abspath(path)
    loaded = sys.modules.get("samantic._C")
    if loaded is not None:
        if os.path.abspath(loaded.__file__) != path:
            raise RuntimeError(f"samantic._C is already imported from {loaded.__file__}, not {path}")
        return loaded
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no compiled module at {path} (build it first: bash fuzz/asan_build.sh)")
    import samantic  # the package itself; its __init__ does not import _C

    spec = importlib.util.spec_from_file_location("samantic._C", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["samantic._C"] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules["samantic._C"]
        raise
    samantic._C = module
    return module


def from_env():
    path = os.environ.get("SAMANTIC_C_PATH")
    if path:
        install(path)
    return path
