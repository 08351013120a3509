"""Test setup. Triton's interpreter must be switched on before triton is first imported."""

import os
import shutil

if shutil.which("nvidia-smi") is None:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

# Two xdist workers on two cores: one intra-op thread each, or they fight over the cores and tiny
# matmuls/SVDs get 10-50x slower.
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture
def poison(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every float tensor torch.empty allocates starts as NaN: a kernel output (or split-K
    partial) left unwritten fails the test that reads it."""
    empty = torch.empty

    def nan_empty(*args, **kwargs):
        t = empty(*args, **kwargs)
        if t.is_floating_point():
            t.fill_(float("nan"))
        return t

    monkeypatch.setattr(torch, "empty", nan_empty)


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    """One ffnsplit cache for the whole test session (GGUF conversions are done once)."""
    path = os.environ.get("FFNSPLIT_TEST_CACHE")
    if not path:
        # Shared by the xdist workers of this run (their base temp folders have one parent), so
        # each packaged model is converted once per run; conversion is locked and atomic.
        base = tmp_path_factory.getbasetemp()
        root = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
        path = str(root / "ffnsplit-cache")
        os.makedirs(path, exist_ok=True)
    os.environ["FFNSPLIT_CACHE"] = path
    return path
