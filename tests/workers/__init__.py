"""Scripts the tests run in subprocesses on 8 fake CPU devices (XLA_FLAGS must be set before JAX starts)."""

import json
import os
import subprocess
import sys
from pathlib import Path


def run_on_8_devices(worker: str, out: Path) -> dict:
    """Runs tests/workers/<worker> with 8 host devices; it writes its results as JSON to `out`."""
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"}
    r = subprocess.run([sys.executable, str(Path(__file__).parent / worker), str(out)], env=env,
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(out.read_text())
