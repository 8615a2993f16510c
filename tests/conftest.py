import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

os.environ.setdefault("MUJOCO_GL", "egl")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parent.parent
ROBOPOLICY = str(Path(sys.executable).parent / "robopolicy")


def run_cli(*args: str, timeout: float = 600, check: bool = False, env: dict | None = None,
            cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Run the installed `robopolicy` console script as a user would."""
    proc = subprocess.run([ROBOPOLICY, *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})}, cwd=cwd)
    if check and proc.returncode != 0:
        raise AssertionError(f"robopolicy {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc


def last_json(proc: subprocess.CompletedProcess) -> dict:
    import json

    lines = [line for line in proc.stdout.strip().splitlines() if line.strip()]
    assert lines, f"no output; stderr:\n{proc.stderr[-3000:]}"
    return json.loads(lines[-1])


def wait_until(condition, timeout_s: float = 3.0) -> bool:
    """Whether `condition()` holds within `timeout_s` (polled): for state another thread or process reports a
    little later on a loaded machine, where a fixed sleep flakes."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def load_benchmark(name: str):
    """benchmarks/<name>.py as a module (the benchmarks are scripts, not a package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def cli():
    return run_cli
