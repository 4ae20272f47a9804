"""Fixtures shared by several test files."""

from __future__ import annotations

import os
import tempfile

import datasets
import huggingface_hub
import pytest

from msfusion_flwr.data.cache import CACHE_ENV

# Partition indices cached by the tests (and the processes they start) go to a folder of this session,
# not to the user's ~/.cache.
os.environ[CACHE_ENV] = tempfile.mkdtemp(prefix="msfusion-test-cache-")


@pytest.fixture
def offline_hub(monkeypatch, tmp_path):
    """No Hugging Face Hub and an empty Hub cache: what this machine has, made certain for the test."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))
