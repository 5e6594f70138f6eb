"""Test-session set-up: one XLA compilation cache for the whole session.

Many tests compile the same tiny-model programs again (every trainer run builds its own jitted
step, and the CLI tests run train.py / eval.py in subprocesses, which inherit the environment).
A cache in a fresh temporary directory, removed at exit, serves those repeats without changing
what any test computes; nothing carries over from one session to the next.
"""

import atexit
import os
import shutil
import tempfile

if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _cache = tempfile.mkdtemp(prefix="nemo_jax_tests_xla_cache_")
    atexit.register(shutil.rmtree, _cache, ignore_errors=True)
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")

# With the aot extra (the CUDA plugin) installed on a machine without a GPU, jax would try the
# plugin, fail and print a traceback into every subprocess's stderr; the suite then runs on the
# CPU backend explicitly. Deviceless GPU programs (tests/test_gpu_programs.py) need exactly this.
if "JAX_PLATFORMS" not in os.environ and not os.path.exists("/dev/nvidiactl"):
    os.environ["JAX_PLATFORMS"] = "cpu"
