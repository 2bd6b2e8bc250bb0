"""Launching the torchrun jobs of the distributed tests (imported by tests/test_parallel.py and
tests/test_muon_distributed.py).

A job that must succeed is retried once when a worker died by a signal with no Python error of its own. That
failure was seen twice in about a hundred CI and development runs (2026-11-29): a gloo rank aborted in C++
("terminate called without an active exception", SIGABRT) with no Python traceback, and 70+ reruns under load did
not reproduce it. A genuine bug in our code raises a Python error (tagged `[rank N] uncaught` by openk2.parallel's
exception hook) or fails again on the retry, so the retry hides neither. Workers run with PYTHONFAULTHANDLER=1, so
a signal death prints every thread's Python stack: the first attempt's output is kept in the warning.
"""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
_SIGNAL_DEATHS = ("Signal 6 (SIGABRT)", "Signal 11 (SIGSEGV)")


def worker_env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = "1"
    env["PYTHONFAULTHANDLER"] = "1"
    env.pop("RANK", None), env.pop("WORLD_SIZE", None)
    return env


def launch(target: Path | list[str], args: list[str], nproc: int, timeout: float) -> subprocess.CompletedProcess:
    """`target args` under torchrun with `nproc` workers (plain python for 1), output captured. `target` is a
    script path or an interpreter argument list such as ["-m", "openk2"]."""
    program = [str(target)] if isinstance(target, Path) else list(target)
    launcher = [] if nproc == 1 else ["-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--standalone"]
    return subprocess.run([sys.executable, *launcher, *program, *args], cwd=ROOT, env=worker_env(),
                          capture_output=True, text=True, timeout=timeout)


def died_by_signal_without_python_error(proc: subprocess.CompletedProcess) -> bool:
    """A worker killed by SIGABRT/SIGSEGV (torchrun's report) or the 1-process run itself, and no rank's Python
    error: after init_distributed, every uncaught exception is printed as `[rank N] uncaught ...`; an error before
    it exits with 1, not a signal."""
    if proc.returncode == 0 or "] uncaught " in proc.stderr:
        return False
    return proc.returncode < 0 or any(sig in proc.stderr for sig in _SIGNAL_DEATHS)


def launch_expecting_success(target: Path | list[str], args: list[str], nproc: int,
                             timeout: float) -> subprocess.CompletedProcess:
    """`launch`, retried once after a signal death without a Python error (see the module docstring)."""
    proc = launch(target, args, nproc, timeout)
    if died_by_signal_without_python_error(proc):
        warnings.warn(f"{target}: a worker died by a signal with no Python error; retrying once. First "
                      f"attempt (rc {proc.returncode}), stderr tail:\n{proc.stderr[-4000:]}")
        proc = launch(target, args, nproc, timeout)
    return proc
