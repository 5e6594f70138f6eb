"""Offline Hugging Face Hub caches for tests: the layout huggingface_hub itself reads.

    $HF_HOME/hub/models--org--name/snapshots/<commit>/<files>   (datasets--org--name for datasets)
    $HF_HOME/hub/models--org--name/refs/main                    (the commit main points at)

Tests point huggingface_hub at such a cache and set it offline (`offline_hub`), or run a CLI with
HF_HOME and HF_HUB_OFFLINE=1 in its environment (`hub_env`).
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path


def commit_for(name: str) -> str:
    return hashlib.sha1(name.encode()).hexdigest()  # 40 hex digits, like a git commit


def add_repo(hf_home: Path, repo: str, files: Path | dict, repo_type: str = "model", revision: str = "main",
             commit: str | None = None) -> Path:
    """Put a snapshot of `files` (a directory to copy, or {relative path: text}) into the cache; -> its path."""
    commit = commit or commit_for(f"{repo}@{revision}")
    root = Path(hf_home) / "hub" / f"{repo_type}s--{repo.replace('/', '--')}"
    snap = root / "snapshots" / commit
    if isinstance(files, dict):
        for rel, text in files.items():
            (snap / rel).parent.mkdir(parents=True, exist_ok=True)
            (snap / rel).write_text(text) if isinstance(text, str) else (snap / rel).write_bytes(text)
    else:
        shutil.copytree(files, snap, dirs_exist_ok=True)
    (root / "refs").mkdir(parents=True, exist_ok=True)
    (root / "refs" / revision).write_text(commit)
    return snap


def offline_hub(monkeypatch, hf_home: Path) -> None:
    """Point this process's huggingface_hub at `hf_home`'s cache, offline (as HF_HOME=... HF_HUB_OFFLINE=1)."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(Path(hf_home) / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HOME", str(hf_home))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def hub_env(hf_home: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_CACHE", "HF_TOKEN")}
    return {**env, "HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1"}
