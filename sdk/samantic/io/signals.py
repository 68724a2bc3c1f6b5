"""Holding signals back over work that must finish whole (a set of writes, an optimizer step)."""

from __future__ import annotations

import signal
import threading
from typing import Any, Dict, List


class HeldSignals:
    """Holds the named signals (default Ctrl-C) while the block runs and delivers them when it has finished.

    Delivered means raised again on exit, once per signal, to whatever handled it before: with Python's
    Ctrl-C handler a KeyboardInterrupt, ignored when it was ignored, and with SIG_DFL the process ends as
    the signal would have ended it. Only in the main thread (the only one Python runs signal handlers in);
    a signal whose handler was installed outside Python (``getsignal`` None: it could not be put back) is
    left alone. When the block itself raises, that error goes on and the signals held meanwhile are
    dropped (the error ends the work anyway).

    >>> with HeldSignals("SIGINT", "SIGTERM"):
    ...     pass
    """

    def __init__(self, *names: str) -> None:
        self.names = names or ("SIGINT",)
        unknown = [n for n in self.names if not hasattr(signal, n)]
        if unknown:
            raise ValueError(f"no such signal on this platform: {', '.join(unknown)}")

    def __enter__(self) -> "HeldSignals":
        self._old: Dict[int, Any] = {}
        self._held: List[int] = []
        if threading.current_thread() is not threading.main_thread():
            return self
        for name in self.names:
            num = getattr(signal, name)
            if signal.getsignal(num) is not None:
                self._old[num] = signal.signal(num, self._hold)
        return self

    def _hold(self, signum: int, frame: Any) -> None:
        self._held.append(signum)

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> bool:
        for num, old in self._old.items():
            signal.signal(num, old)
        if exc_type is None:
            for num in dict.fromkeys(self._held):  # each held signal once, as if it came now
                signal.raise_signal(num)
        return False
