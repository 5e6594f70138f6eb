"""Models by Hugging Face Hub id (nemo_jax/hub.py), from offline hub caches built here (HF_HUB_OFFLINE=1):
load / convert / training runs by id, revision pins, a local path winning over an id, the planner's
weightless architecture, and one-line errors for every Hub failure."""

import json
import shutil
from pathlib import Path

import httpx2
import jax
import numpy as np
import pytest
from huggingface_hub import errors as E
from huggingface_hub.utils import filter_repo_objects

import nemo_jax
from nemo_jax import hub
from nemo_jax.checkpoint import ParamsSource, export_checkpoint
from nemo_jax.config import from_hf_config, from_params_json, preset, read_json
from nemo_jax.convert import main as convert_main
from nemo_jax.errors import UserError
from nemo_jax.model import abstract_variables
from hubcache import add_repo, commit_for, offline_hub

ROOT = Path(__file__).resolve().parent.parent
REFERENCE = Path(__file__).parent / "reference" / "mistral-nemo-2407"
CONFIG = preset("tiny")


def tiny_params(seed):
    rng = np.random.default_rng(seed)  # random weights of the right shapes (flax init is seconds slower)
    return jax.tree.map(lambda x: rng.standard_normal(x.shape, np.float32), abstract_variables(CONFIG)["params"])


def assert_same(a, b):
    jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), a, b)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """org/tiny (HF layout; main and tag v2 with other weights) and org/tiny-mistral (consolidated)."""
    root = tmp_path_factory.mktemp("hub")
    params = {1: tiny_params(1), 2: tiny_params(2)}
    for seed, fmt in ((1, "hf"), (2, "hf"), (1, "mistral")):
        export_checkpoint(ParamsSource(CONFIG, params[seed], root), root / f"{fmt}{seed}", fmt)
    home = root / "home"
    add_repo(home, "org/tiny", root / "hf1")
    add_repo(home, "org/tiny", root / "hf2", revision="v2")
    add_repo(home, "org/tiny-mistral", root / "mistral1")
    add_repo(home, "org/config-only", {"config.json": (root / "hf1" / "config.json").read_text()})
    return home, params, root


@pytest.fixture
def offline(cache, monkeypatch):
    offline_hub(monkeypatch, cache[0])
    return cache


def test_load_by_hub_id_and_revision(offline):
    _, params, _ = offline
    for spec, seed in (("org/tiny", 1), ("org/tiny-mistral", 1), ("org/tiny@v2", 2),
                       (f"org/tiny@{commit_for('org/tiny@main')}", 1)):
        config, loaded = nemo_jax.load(spec)
        assert config.n_layers == CONFIG.n_layers, spec
        assert_same(loaded, params[seed])


def test_a_local_path_wins_over_a_hub_id(offline, tmp_path, monkeypatch):
    _, params, root = offline
    monkeypatch.chdir(tmp_path)
    shutil.copytree(root / "hf2", "org/tiny")
    assert_same(nemo_jax.load("org/tiny")[1], params[2])  # the local directory, not the cached main (seed 1)


def test_convert_import_and_export_by_hub_id(offline, tmp_path):
    _, params, _ = offline
    convert_main(["import", "org/tiny-mistral", str(tmp_path / "ours"), "--no-progress"])
    assert_same(nemo_jax.load(tmp_path / "ours")[1], params[1])
    convert_main(["export", "org/tiny@v2", str(tmp_path / "hf"), "--format", "hf", "--no-progress"])
    assert_same(nemo_jax.load(tmp_path / "hf")[1], params[2])


def test_runs_record_a_hub_base_pinned_to_its_commit(offline, monkeypatch):
    monkeypatch.setattr(hub, "_resolved", {})
    assert hub.model_reference("org/tiny@v2") == "org/tiny@v2"  # not resolved by this process yet
    hub.resolve_model("org/tiny@v2")
    # what train.py writes into run.json: a later push to the repo cannot change the run's base
    assert hub.model_reference("org/tiny@v2") == f"org/tiny@{commit_for('org/tiny@v2')}"
    assert hub.model_reference("configs") == str((ROOT / "configs").absolute())  # a local path


def test_planning_reads_config_json_only_or_the_builtin_architecture(offline, capsys):
    assert hub.model_config("org/config-only") == CONFIG  # that repo has no weights at all
    assert hub.model_config("mistralai/Mistral-Nemo-Base-2407") == preset("mistral-nemo-12b")  # not cached
    assert "built-in mistral-nemo-12b architecture" in capsys.readouterr().err
    assert hub.model_config(str(ROOT / "configs")) is None  # a local path: read by the checkpoint code
    with pytest.raises(UserError, match=r"^org/unknown: not found: .*HF_HUB_OFFLINE is set$"):
        hub.model_config("org/unknown")


def test_the_builtin_architecture_is_the_published_one():
    nemo = preset("mistral-nemo-12b")
    assert from_params_json(read_json(REFERENCE / "params.json")) == nemo
    # config.json differs only in max_position_embeddings (1024000: unchecked by transformers; 128k trained)
    assert from_hf_config(read_json(REFERENCE / "config.json")) == nemo.replace(max_seq_len=1024000)


NEMO_REPO_FILES = [".gitattributes", "README.md", "config.json", "consolidated.safetensors", "generation_config.json",
                   *[f"model-0000{i}-of-00005.safetensors" for i in range(1, 6)], "model.safetensors.index.json",
                   "params.json", "special_tokens_map.json", "tekken.json", "tokenizer.json", "tokenizer_config.json"]


def test_download_takes_one_layout_and_the_tokenizer():
    take = lambda files: sorted(filter_repo_objects(files, allow_patterns=hub.model_patterns(files)))
    assert take(NEMO_REPO_FILES) == sorted(["config.json", *NEMO_REPO_FILES[5:11], "special_tokens_map.json",
                                            "tekken.json", "tokenizer.json", "tokenizer_config.json"])
    mistral_only = ["params.json", "consolidated.safetensors", "tekken.json", "consolidated.00.pth"]
    assert take(mistral_only) == ["consolidated.safetensors", "params.json", "tekken.json"]
    with pytest.raises(UserError, match="no safetensors checkpoint in the repo"):
        hub.model_patterns(["pytorch_model.bin", "config.json"])


def http_error(cls, status):
    request = httpx2.Request("GET", "https://huggingface.co/api/models/org/x")
    return cls(f"{status} Client Error\nmore detail", response=httpx2.Response(status, request=request))


@pytest.mark.parametrize("error,message", [
    (lambda: http_error(E.GatedRepoError, 403), r"org/x is a gated repository .*HF_TOKEN"),
    (lambda: http_error(E.RepositoryNotFoundError, 404), "no such local path, and no model repository org/x on"),
    (lambda: http_error(E.RevisionNotFoundError, 404), "org/x has no revision 'nope'"),
    (lambda: E.LocalEntryNotFoundError("no cache"), r"not found: .* HF_HUB_OFFLINE is set"),
    (lambda: http_error(E.HfHubHTTPError, 500), "Hugging Face Hub error: 500 Client Error$"),
])
def test_hub_failures_are_one_line(offline, monkeypatch, error, message):
    def fail(*args, **kwargs):
        raise error()

    monkeypatch.setattr("huggingface_hub.snapshot_download", fail)
    with pytest.raises(UserError, match=message) as e:
        hub.resolve_model("org/x@nope")
    assert "\n" not in str(e.value) and str(e.value).startswith("org/x@nope: ")


def test_not_cached_offline_is_one_line(offline, capsys):
    with pytest.raises(SystemExit):
        convert_main(["import", "org/missing", "/nonexistent/out", "--no-progress"])
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "org/missing: not found" in err and "HF_HUB_OFFLINE is set" in err
