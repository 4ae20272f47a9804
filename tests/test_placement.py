"""torch-device: names checked before a run, resolved per process, and Ray given a GPU share only for CUDA."""

import pytest
import torch

from msfusion_flwr import apps
from msfusion_flwr.apps import client_resources
from msfusion_flwr.config import ConfigError, RunConfig
from msfusion_flwr.models.placement import is_device_name, resolve_device


def run_with(device: str) -> RunConfig:
    return RunConfig.from_mapping({"torch-device": device})


@pytest.mark.parametrize("name", ["cpu", "auto", "cuda", "cuda:1", "mps"])
def test_device_names_pytorch_parses_are_accepted(name):
    assert is_device_name(name)


@pytest.mark.parametrize("name", ["gpu", "cuda:x", "", "CPU"])
def test_other_names_are_refused(name):
    assert not is_device_name(name)


def test_auto_takes_cuda_only_where_the_process_sees_it(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto") == torch.device("cuda")


def test_an_absent_cuda_device_is_a_one_line_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(RuntimeError, match="torch-device = 'cuda', but this process sees no CUDA device"):
        resolve_device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert resolve_device("cuda:0") == torch.device("cuda:0")
    with pytest.raises(RuntimeError, match="sees 1 CUDA device"):
        resolve_device("cuda:1")


def test_simulated_participants_ask_ray_for_a_gpu_share_only_on_cuda(monkeypatch):
    """On the CPU no GPU is asked for; on CUDA the participants that fit on the CPUs share one GPU."""
    assert client_resources(run_with("cpu"), 10, 1) == {"num_cpus": 1, "num_gpus": 0.0}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert client_resources(run_with("auto"), 10, 1)["num_gpus"] == 0.0
    with pytest.raises(ConfigError, match="^config key 'torch-device': .*no CUDA device") as info:
        client_resources(run_with("cuda"), 10, 1)
    assert "\n" not in str(info.value)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(apps.os, "cpu_count", lambda: 8)
    assert client_resources(run_with("auto"), 10, 2) == {"num_cpus": 2, "num_gpus": 0.25}
    assert client_resources(run_with("cuda"), 3, 1) == {"num_cpus": 1, "num_gpus": pytest.approx(1 / 3)}


def test_the_device_is_not_part_of_what_a_run_computes():
    """A checkpoint made on one device resumes on another: the fingerprint (state files' tag) ignores the key."""
    assert run_with("auto").fingerprint() == run_with("cpu").fingerprint()
    assert run_with("cpu").fingerprint() != RunConfig.from_mapping({"learning-rate": 0.5}).fingerprint()
