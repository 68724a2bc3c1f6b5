"""Helpers shared by the benchmark scripts: peak-memory probes and report writing."""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Tuple


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def reset_peak_rss() -> None:
    """Resets the kernel's peak-RSS counter (VmHWM) of this process (Linux)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def measure(fn: Callable[[], Any], repeats: int = 1) -> Tuple[Any, float, float]:
    """Runs ``fn`` ``repeats`` times; returns (last result, best seconds, peak RSS increase in MiB).

    The peak is the high-water mark of resident memory during the runs minus
    the resident memory right before them.
    """
    import gc

    gc.collect()
    reset_peak_rss()
    base = _status_kb("VmRSS")
    best = float("inf")
    result = None
    for _ in range(repeats):
        result = None
        t0 = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - t0)
    peak = _status_kb("VmHWM")
    return result, best, (peak - base) / 1024.0


def machine() -> Dict[str, Any]:
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
    }


def write_report(out_dir: Path, name: str, payload: Dict[str, Any], table: List[List[str]], header: List[str],
                 preamble: str = "") -> Tuple[Path, Path]:
    """Writes ``<name>.json`` and ``<name>.md`` (a markdown table) into ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    jp = out_dir / f"{name}.json"
    mp = out_dir / f"{name}.md"
    jp.write_text(json.dumps(payload, indent=2) + "\n")
    lines = [preamble.rstrip(), ""] if preamble else []
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "|".join("---" for _ in header) + "|")
    for row in table:
        lines.append("| " + " | ".join(row) + " |")
    mp.write_text("\n".join(lines) + "\n")
    return jp, mp


def rss_mib() -> float:
    """Resident memory of this process now, in MiB (Linux)."""
    return _status_kb("VmRSS") / 1024.0
