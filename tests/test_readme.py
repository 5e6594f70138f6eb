"""The README's commands that need no GPU and no weights run as written on a fresh clone.

Every line of the README's ```sh blocks is classified: walked here (a `--dry-run` without `--target`,
a `--help`), or not walked, with the reason (a usage template with placeholders, a job that needs
weights, data or GPUs, the make targets the suite itself is run by). A fresh clone is the working
tree with an empty Hugging Face cache, offline: the 12B configs name a Hub id, which --dry-run plans
without any weights. The 12B CPU plans take ~30-60 s each, so only the first is walked unless
NEMO_JAX_README_HEAVY=all.
"""

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
HEAVY = 1 if os.environ.get("NEMO_JAX_README_HEAVY") != "all" else 1 << 30


def readme_commands() -> list[tuple[int, str]]:
    """(line number, command) for every command line of the README's sh blocks."""
    out, in_sh = [], False
    for i, line in enumerate((ROOT / "README.md").read_text().splitlines(), 1):
        if line.startswith("```"):
            in_sh = line.strip() == "```sh" if not in_sh else False
            continue
        cmd = line.split("  #")[0].strip()  # a trailing comment
        if in_sh and cmd and not cmd.startswith("#"):
            out.append((i, cmd))
    return out


PLACEHOLDER = re.compile(r"\[|\.\.\.|(?<![-=\w])[A-Z][A-Z_]+(?![=\w])")  # [--opt], ..., PATH, CKPT, FILE


def why_not_walked(cmd: str) -> str | None:
    """None when the command runs here as written; else why it is not run."""
    words = shlex.split(cmd)
    while words and re.fullmatch(r"[A-Z_]+=.*", words[0]):  # VAR=value prefixes
        words = words[1:]
    if "--help" in words:
        return None
    if PLACEHOLDER.search(" ".join(words)):
        return "a usage template (placeholders)"
    if words[:1] == ["make"]:
        return "make targets: the demo (minutes) and this very suite"
    if words[:1] == ["srun"]:
        return "a SLURM job on GPUs"
    if words[:2] == ["python", "train.py"] and "--dry-run" in words:
        return "a GPU program plan: needs the aot extra (tests/test_gpu_programs.py)" if "--target" in words else None
    return "trains or converts real weights (needs a GPU, the 12B weights or data)"


def walked() -> list[tuple[int, str]]:
    return [(i, c) for i, c in readme_commands() if why_not_walked(c) is None]


def test_every_readme_command_is_classified():
    commands = readme_commands()
    assert len(commands) > 10
    reasons = {c: why_not_walked(c) for _, c in commands}
    # the fresh-clone command is walked; templates and jobs are not
    assert reasons["python train.py --config configs/lora.yaml --dry-run --device-memory 80GB"] is None
    assert reasons["python train.py --config configs/lora.yaml [--set key.path=value ...]"].startswith("a usage")
    assert reasons["python train.py --config configs/full.yaml"].startswith("trains")
    assert len(walked()) >= 2


def _params():
    heavy = 0
    for i, cmd in walked():
        is_heavy = "--dry-run" in cmd
        heavy += is_heavy
        marks = [pytest.mark.skip(reason="12B CPU plan; NEMO_JAX_README_HEAVY=all walks it")] \
            if is_heavy and heavy > HEAVY else []
        yield pytest.param(cmd, id=f"README.md:{i}", marks=marks)


@pytest.mark.parametrize("cmd", list(_params()))
def test_readme_command_runs_on_a_fresh_clone(cmd, tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(HF_HOME=str(tmp_path / "hf"), HF_HUB_OFFLINE="1")  # nothing cached, no network
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"  # `python`: this venv's
    r = subprocess.run(cmd, shell=True, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, f"{cmd}\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}"
    if "--dry-run" in cmd:
        assert "parameters            12,247,782,400" in r.stdout and "per device" in r.stdout
