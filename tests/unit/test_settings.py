"""Settings read from the environment: values that would start fine and misbehave later are normalised."""

from __future__ import annotations

import pytest

from service.settings import DEFAULT_EXAMPLES_DIR, Settings


@pytest.mark.parametrize("raw,want", [("s3cret\n", "s3cret"), ("  s3cret ", "s3cret"), ("", None), ("\n", None)])
def test_admin_token_from_a_secret_file_is_stripped_and_empty_means_none(monkeypatch, raw, want):
    monkeypatch.setenv("SUPERMASK_ADMIN_TOKEN", raw)
    token = Settings().admin_token
    assert (token.get_secret_value() if token is not None else None) == want


@pytest.mark.parametrize("raw", ["", "none", "None"])
def test_empty_examples_dir_turns_preloading_off(monkeypatch, raw):
    monkeypatch.setenv("SUPERMASK_EXAMPLES_DIR", raw)
    assert Settings().examples_dir is None


def test_examples_dir_default_and_explicit(monkeypatch, tmp_path):
    monkeypatch.delenv("SUPERMASK_EXAMPLES_DIR", raising=False)
    assert Settings().examples_dir == DEFAULT_EXAMPLES_DIR
    monkeypatch.setenv("SUPERMASK_EXAMPLES_DIR", str(tmp_path))
    assert Settings().examples_dir == tmp_path


def test_onednn_caches_bounded_unless_the_environment_says_otherwise(monkeypatch):
    from service.kernels.cpu_features import ONEDNN_CACHE_ENV, bound_onednn_caches

    for name in ONEDNN_CACHE_ENV:
        monkeypatch.delenv(name, raising=False)
    assert bound_onednn_caches(64) == {name: "64" for name in ONEDNN_CACHE_ENV}
    monkeypatch.setenv("LRU_CACHE_CAPACITY", "16")  # an operator's own choice wins
    assert bound_onednn_caches(32)["LRU_CACHE_CAPACITY"] == "16"
