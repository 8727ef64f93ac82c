"""When to restart a crashed process, and when to call it a crash loop (pure logic)."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field


@dataclass
class RestartPolicy:
    backoff_s: float = 0.5
    backoff_max_s: float = 30.0
    loop_restarts: int = 5
    loop_window_s: float = 60.0
    crashes: deque[float] = field(default_factory=deque)

    def on_crash(self, now: float) -> tuple[float, bool]:
        """Record a crash at ``now``; returns (seconds to wait before restarting, crash loop?).

        The delay doubles with each crash still inside the window, so a process that crashes
        once in a while restarts at once-ish, and one that keeps crashing backs off to the cap.
        """
        self.crashes.append(now)
        while self.crashes and now - self.crashes[0] > self.loop_window_s:
            self.crashes.popleft()
        recent = len(self.crashes)
        delay = min(self.backoff_s * 2 ** (recent - 1), self.backoff_max_s)
        return delay, recent >= self.loop_restarts
