"""Fixtures shared by the test modules (pytest loads this file itself)."""
import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module's tests: the models are tiny, and OpenMP threads that spin-wait for a
    core another process holds make a shared 2-core machine ~10x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def workdir(tmp_path, monkeypatch, one_thread):
    """A fresh working folder (the scripts write checkpoints/, results/ and data/ relative to it), one thread."""
    monkeypatch.chdir(tmp_path)
    return tmp_path
