"""bridge/runner.py: how a supervisor restarts a child that died (Envoy, a bridge worker): the
back-off, when it gives up, and the signal named in its log event."""

from __future__ import annotations

import signal

import pytest

from metabridge import runner


def test_a_crashing_child_is_restarted_with_growing_back_off_then_given_up(monkeypatch):
    now = [1000.0]
    monkeypatch.setattr(runner.time, "monotonic", lambda: now[0])
    budget = runner._RestartBudget("Envoy")
    delays = [budget.spend(-11) for _ in range(runner._MAX_RESTARTS)]
    assert delays == sorted(delays) and delays[0] == 0.2 and delays[-1] <= 5.0
    with pytest.raises(RuntimeError, match=r"Envoy exited 6 times within 60s \(last exit code -11\)"):
        budget.spend(-11)


def test_crashes_older_than_the_window_do_not_count(monkeypatch):
    now = [1000.0]
    monkeypatch.setattr(runner.time, "monotonic", lambda: now[0])
    budget = runner._RestartBudget("a bridge worker")
    for _ in range(runner._MAX_RESTARTS):
        budget.spend(1)
    now[0] += runner._RESTART_WINDOW + 1
    assert budget.spend(1) == 0.2, "the window moved on: a first crash again"


def test_exit_cause_names_the_signal_that_ended_a_child():
    assert runner.exit_cause(-signal.SIGSEGV) == {"signal": "SIGSEGV"}
    assert runner.exit_cause(-signal.SIGKILL) == {"signal": "SIGKILL"}
    assert runner.exit_cause(1) == {} and runner.exit_cause(None) == {}
    assert runner.exit_cause(-200) == {}, "not a signal this platform knows: nothing to name"
