"""Fixtures shared by several test files."""

from __future__ import annotations

import datasets
import huggingface_hub
import pytest


@pytest.fixture
def offline_hub(monkeypatch, tmp_path):
    """No Hugging Face Hub and an empty Hub cache: what this machine has, made certain for the test."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))
