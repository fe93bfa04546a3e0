import random
import subprocess
import sys

import numpy as np
import pytest
import torch

import natlib
from natlib.runtime import DEVICE_VARIABLE


@pytest.fixture(autouse=True)
def restore_default_dtype():
    dtype = torch.get_default_dtype()
    yield
    torch.set_default_dtype(dtype)


def draws() -> tuple[float, float, float]:
    return random.random(), float(np.random.rand()), torch.rand(()).item()


def test_setup_seeds_every_generator():
    natlib.setup(seed=3)
    first = draws()
    natlib.setup(seed=3)
    assert draws() == first
    natlib.setup(seed=4)
    assert draws() != first


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_setup_sets_default_dtype(dtype):
    natlib.setup(seed=0, dtype=dtype)
    assert torch.get_default_dtype() is dtype
    assert torch.zeros(1).dtype is dtype


def test_setup_returns_device(monkeypatch):
    monkeypatch.delenv(DEVICE_VARIABLE, raising=False)
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert natlib.setup(seed=0).type == expected
    assert torch.are_deterministic_algorithms_enabled()


def test_setup_loads_no_matplotlib_and_plotting_installs_the_style():
    code = (
        "import sys, natlib\n"
        "natlib.setup(seed=0)\n"
        "assert 'matplotlib' not in sys.modules, 'setup imported matplotlib'\n"
        "import matplotlib as mpl\n"
        "from natlib.plotting import STYLE\n"
        "assert all(mpl.rcParams[k] == mpl.rcParams.validate[k](v) for k, v in STYLE.items())\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


@pytest.mark.parametrize("seed", [1.5, "0", None, True])
def test_setup_rejects_non_integer_seed(seed):
    with pytest.raises(TypeError, match="seed must be an integer"):
        natlib.setup(seed=seed)


@pytest.mark.parametrize("seed", [-1, 2**32])
def test_setup_rejects_out_of_range_seed(seed):
    with pytest.raises(ValueError, match=r"\[0, 4294967295\]"):
        natlib.setup(seed=seed)


@pytest.mark.parametrize("dtype", [torch.float16, torch.int64, "float64"])
def test_setup_rejects_unsupported_dtype(dtype):
    with pytest.raises(ValueError, match="torch.float32 or torch.float64"):
        natlib.setup(seed=0, dtype=dtype)


def test_device_override_to_cpu(monkeypatch):
    monkeypatch.setenv(DEVICE_VARIABLE, "cpu")
    assert natlib.device() == torch.device("cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
@pytest.mark.parametrize("name", ["cuda", "cuda:0"])
def test_device_cuda_without_gpu_is_an_error(monkeypatch, name):
    monkeypatch.setenv(DEVICE_VARIABLE, name)
    with pytest.raises(RuntimeError, match="no CUDA device"):
        natlib.device()


def test_device_unknown_name_is_an_error(monkeypatch):
    monkeypatch.setenv(DEVICE_VARIABLE, "tpu")
    with pytest.raises(ValueError, match="'cpu', 'cuda' or 'cuda:N'"):
        natlib.device()


def test_threads_sets_the_count_inside_the_block_and_restores_it_after():
    before = torch.get_num_threads()
    with natlib.runtime.threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
    with pytest.raises(RuntimeError, match="boom"), natlib.runtime.threads(1):
        raise RuntimeError("boom")
    assert torch.get_num_threads() == before
    with pytest.raises(ValueError, match="threads must be a positive integer"):
        with natlib.runtime.threads(0):
            pass
    assert torch.get_num_threads() == before


def test_default_dtype_sets_it_inside_the_block_and_restores_it_after():
    before = torch.get_default_dtype()
    for dtype in (torch.float32, torch.float64):
        with natlib.runtime.default_dtype(dtype):
            assert torch.get_default_dtype() == dtype
        assert torch.get_default_dtype() == before
    with pytest.raises(RuntimeError, match="boom"), natlib.runtime.default_dtype(torch.float32):
        raise RuntimeError("boom")
    assert torch.get_default_dtype() == before
    with pytest.raises(ValueError, match="not supported"):
        with natlib.runtime.default_dtype(torch.float16):
            pass
