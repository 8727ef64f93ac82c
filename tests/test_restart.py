"""The supervisor's restart policy: back-off and crash loops (aimesh/restart.py)."""

from __future__ import annotations

from aimesh.restart import RestartPolicy


def test_restart_backoff_doubles_and_detects_a_crash_loop() -> None:
    policy = RestartPolicy(backoff_s=0.5, backoff_max_s=4, loop_restarts=4, loop_window_s=60)
    delays = [policy.on_crash(float(t)) for t in range(6)]
    assert [d for d, _ in delays] == [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]
    assert [loop for _, loop in delays] == [False, False, False, True, True, True]
    # Crashes outside the window are forgotten: an occasional crash restarts quickly.
    assert policy.on_crash(1000.0) == (0.5, False)
