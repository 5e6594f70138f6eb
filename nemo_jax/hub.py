"""Models and datasets by Hugging Face Hub id, resolved to local snapshot directories.

    model.checkpoint: mistralai/Mistral-Nemo-Base-2407            # the repo's main branch
    model.checkpoint: mistralai/Mistral-Nemo-Base-2407@<revision> # a branch, tag or commit
    data.train: [hf:HuggingFaceH4/ultrachat_200k:train_sft]       # a dataset repo (records.py)

Everything downstream reads directories, so a Hub id is turned into one here, once, by
huggingface_hub itself (`snapshot_download`): its cache ($HF_HOME/hub), token (HF_TOKEN or `hf auth
login`), offline mode (HF_HUB_OFFLINE=1) and progress bars are the user's usual ones. The existing
checkpoint readers then detect the layout from the files, as for any local directory.

A path that exists on disk always wins: only something that is not a local path and reads as
`namespace/name[@revision]` is looked up on the Hub. A model download takes one layout (HF's
config.json + model*.safetensors, else Mistral's params.json + consolidated.safetensors; NeMo's repos
carry both, 24 GB each) and the tokenizer files, never .pth/.bin/gguf duplicates.

`model_config` is what `--dry-run` needs: the architecture, from config.json alone when the repo is
cached, else (for the published NeMo repos) the built-in `mistral-nemo-12b` preset, so planning a
fresh clone downloads nothing. Every Hub failure (unknown or gated repo, unknown revision, offline
and not cached) is one UserError line.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
from pathlib import Path

from nemo_jax.errors import UserError

# Hub repo ids: namespace/name of [A-Za-z0-9_.-], at most 96 characters, no "--" or "..".
_REPO_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9_.-]+")

# The published NeMo 12B repos: architecture = config.py's "mistral-nemo-12b" preset
# (tests/test_hub.py checks it against their config.json and params.json).
NEMO_REPOS = ("mistralai/Mistral-Nemo-Base-2407", "mistralai/Mistral-Nemo-Instruct-2407")
NEMO_PRESET = "mistral-nemo-12b"

TOKENIZER_FILES = ["tekken.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "tokenizer.model*"]
HF_FILES = ["config.json", "model.safetensors", "model.safetensors.index.json", "model-*.safetensors"]
MISTRAL_FILES = ["params.json", "consolidated.safetensors"]

_resolved: dict[str, tuple[str, str]] = {}  # spec -> (repo id, commit) of the snapshots this process used


def parse_repo_id(spec) -> tuple[str, str | None] | None:
    """(repo id, revision or None) if `spec` names a Hub repo rather than an existing local path."""
    s = os.fspath(spec)
    if os.path.exists(s):
        return None
    repo, _, revision = s.partition("@")
    if not _REPO_ID.fullmatch(repo) or len(repo) > 96 or "--" in repo or ".." in repo or repo.endswith("."):
        return None
    return repo, revision or None


def is_offline() -> bool:
    from huggingface_hub import constants

    return constants.is_offline_mode()


def cache_dir() -> str:
    from huggingface_hub import constants

    return constants.HF_HUB_CACHE


@contextlib.contextmanager
def hub_errors(spec: str, repo: str, revision: str | None, kind: str = "model"):
    """huggingface_hub's exceptions -> one UserError line naming `spec` and what to do."""
    from huggingface_hub import errors as E

    where = f"https://huggingface.co/{'datasets/' if kind == 'dataset' else ''}{repo}"
    try:
        yield
    except E.GatedRepoError:
        raise UserError(f"{spec}: {repo} is a gated repository on the Hugging Face Hub: accept its terms at {where} "
                        "and give a token (HF_TOKEN=... or `hf auth login`)") from None
    except E.RepositoryNotFoundError:
        raise UserError(f"{spec}: no such local path, and no {kind} repository {repo} on the Hugging Face Hub "
                        "(a private one needs HF_TOKEN)") from None
    except E.RevisionNotFoundError:
        raise UserError(f"{spec}: {repo} has no revision {revision!r} on the Hugging Face Hub") from None
    except E.LocalEntryNotFoundError:  # also IncompleteSnapshotError
        why = "HF_HUB_OFFLINE is set" if is_offline() else "the Hugging Face Hub cannot be reached"
        raise UserError(f"{spec}: not found: no such local path, and {repo}"
                        f"{'@' + revision if revision else ''} is not (completely) in the Hugging Face cache "
                        f"{cache_dir()}; {why}") from None
    except E.EntryNotFoundError as e:
        raise UserError(f"{spec}: {repo}: file not found on the Hugging Face Hub ({_first_line(e)})") from None
    except E.HFValidationError as e:
        raise UserError(f"{spec}: not a valid Hugging Face repo id ({_first_line(e)})") from None
    except E.HfHubHTTPError as e:
        raise UserError(f"{spec}: Hugging Face Hub error: {_first_line(e)}") from None


def _first_line(e: Exception) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def repo_files(repo: str, revision: str | None, repo_type: str | None = None) -> list[str] | None:
    """The repo's file list: from the Hub when online, else from the cached listing; None if unknown."""
    import huggingface_hub as hh
    from huggingface_hub import errors as E

    if not is_offline():
        try:
            return hh.HfApi().list_repo_files(repo, revision=revision, repo_type=repo_type)
        except Exception as e:  # no connection (huggingface_hub's http client errors): the cache decides
            if isinstance(e, E.HfHubHTTPError) and not _is_connection_error(e):
                raise  # not found, gated, no such revision: the caller's one-line error
    try:
        return [f.path for f in hh.get_cached_repo_tree(repo, revision=revision, repo_type=repo_type)]
    except (E.CachedRepoTreeNotFoundError, OSError, ValueError):
        return None


def _is_connection_error(e: Exception) -> bool:
    status = getattr(getattr(e, "response", None), "status_code", None)
    return status is None or status >= 500


def model_patterns(files: list[str] | None) -> list[str]:
    """What to download of a model repo: one checkpoint layout and the tokenizer files."""
    names = set(files or ())
    if files is None:  # unknown (offline, no cached listing): whatever of either layout is cached
        return HF_FILES + MISTRAL_FILES + TOKENIZER_FILES
    if "config.json" in names and ("model.safetensors" in names or "model.safetensors.index.json" in names):
        return HF_FILES + TOKENIZER_FILES
    if "params.json" in names and "consolidated.safetensors" in names:
        return MISTRAL_FILES + TOKENIZER_FILES
    raise UserError(f"no safetensors checkpoint in the repo (need config.json + model*.safetensors or "
                    f"params.json + consolidated.safetensors; it has {', '.join(sorted(names)[:12]) or 'no files'})")


def resolve_model(spec) -> Path:
    """A local directory for `spec`: the path itself if it exists or is not a Hub id, else the Hub snapshot
    (downloaded if needed, with huggingface_hub's progress bars)."""
    parsed = parse_repo_id(spec)
    if parsed is None:
        return Path(spec)
    repo, revision = parsed
    import huggingface_hub as hh

    with hub_errors(str(spec), repo, revision):
        try:
            patterns = model_patterns(repo_files(repo, revision))
        except UserError as e:
            raise UserError(f"{spec}: {e}") from None
        path = hh.snapshot_download(repo, revision=revision, allow_patterns=patterns)
    _resolved[str(spec)] = (repo, Path(path).name)
    return Path(path)


def model_reference(spec) -> str:
    """How a run records its base: an absolute path, or `repo@commit` for a Hub snapshot (pinned, so
    the run's adapters always load onto the weights they were trained on)."""
    if str(spec) in _resolved:
        repo, commit = _resolved[str(spec)]
        return f"{repo}@{commit}"
    return str(Path(spec).absolute()) if parse_repo_id(spec) is None else str(spec)


def model_config(spec):
    """The ModelConfig of a Hub id without downloading weights (None for a local path: read it instead).

    Offline-first: config.json (or params.json) from the cache; else, for the published NeMo repos, the
    built-in architecture; else config.json alone is downloaded.
    """
    parsed = parse_repo_id(spec)
    if parsed is None:
        return None
    repo, revision = parsed
    import huggingface_hub as hh
    from huggingface_hub import errors as E

    from nemo_jax.config import from_hf_config, from_params_json, preset, read_json

    parsers = {"config.json": from_hf_config, "params.json": from_params_json}
    for name, parse in parsers.items():
        try:
            path = hh.hf_hub_download(repo, name, revision=revision, local_files_only=True)
        except (E.LocalEntryNotFoundError, E.EntryNotFoundError, OSError, ValueError):
            continue
        return parse(read_json(Path(path)), source=f"{spec} ({path})")
    if repo in NEMO_REPOS:
        print(f"{spec}: not in the Hugging Face cache; using the built-in {NEMO_PRESET} architecture of the "
              "published NeMo repos (no download)", file=sys.stderr)
        return preset(NEMO_PRESET)
    with hub_errors(str(spec), repo, revision):
        files = repo_files(repo, revision)
        name = "params.json" if files is not None and "config.json" not in files and "params.json" in files \
            else "config.json"
        path = hh.hf_hub_download(repo, name, revision=revision)
    return parsers[name](read_json(Path(path)), source=f"{spec} ({path})")


def download_dataset(spec: str, repo: str, revision: str | None, allow_patterns: list[str] | None) -> Path:
    """A dataset repo's snapshot directory (only `allow_patterns` of its files)."""
    import huggingface_hub as hh

    with hub_errors(spec, repo, revision, kind="dataset"):
        return Path(hh.snapshot_download(repo, repo_type="dataset", revision=revision, allow_patterns=allow_patterns))


def dataset_file(spec: str, repo: str, revision: str | None, filename: str) -> Path | None:
    """One file of a dataset repo (e.g. README.md), or None if the repo has no such file."""
    import huggingface_hub as hh
    from huggingface_hub import errors as E

    with hub_errors(spec, repo, revision, kind="dataset"):
        try:
            return Path(hh.hf_hub_download(repo, filename, repo_type="dataset", revision=revision))
        except (E.RemoteEntryNotFoundError, E.LocalEntryNotFoundError):
            return None  # not in the repo, or offline and not cached: the snapshot download decides
