"""Commands run the way a user runs them from a README: in a folder, each in its own session, with
the console scripts installed beside this Python."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from pathlib import Path

from tests.integration.harness import wait_until

BIN = Path(sys.executable).parent  # where `metabridge` is installed


class Processes:
    """Long-running commands started in ``folder``, each logging to ``folder/<name>.log``."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.procs: dict[str, subprocess.Popen] = {}

    def start(self, name: str, args: list[str]) -> subprocess.Popen:
        with open(self.folder / f"{name}.log", "wb") as log:
            proc = subprocess.Popen(args, cwd=self.folder, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.procs[name] = proc
        return proc

    def wait(self, check, timeout: float, what: str, proc: subprocess.Popen) -> None:
        """harness.wait_until, with every log in the error when it fails."""
        try:
            wait_until(check, timeout, what, proc)
        except (TimeoutError, RuntimeError) as exc:
            raise AssertionError(f"{exc}\n{self.logs()}") from None

    def logs(self) -> str:
        """The end of every log, for assertion messages."""
        return "\n".join(f"--- {name}.log\n{(self.folder / f'{name}.log').read_text(errors='replace')[-4000:]}" for name in self.procs)

    def stop(self) -> None:
        # SIGTERM to the process only: `metabridge run` stops its Envoy itself.
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs.values():
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=15)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)  # whatever is left of its session (Envoy)
            proc.wait()
