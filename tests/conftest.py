"""Shared fixtures: tiny random models (HF dirs and their GGUF conversions), built once a session.

Use ``tiny_models`` directly (``tiny_models.gguf("qwen2")``), or the single-model fixtures with
indirect parametrization::

    @pytest.mark.parametrize("tiny_gguf", ["llama", "qwen2", "qwen3"], indirect=True)
    def test_x(tiny_gguf): ...

Unparametrized, ``tiny_hf`` / ``tiny_gguf`` give the llama model.  The ``slow`` marker is
declared in pyproject.toml.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tiny_models import ARCHS, convert_hf_dir, make_tiny_hf


class TinyModels:
    """Builds each tiny model at most once per session (conversion costs seconds)."""

    def __init__(self, root: Path):
        self.root = root
        self._hf: dict[str, Path] = {}
        self._gguf: dict[tuple[str, str], Path] = {}

    def hf(self, arch: str) -> Path:
        if arch not in self._hf:
            self._hf[arch] = make_tiny_hf(arch, self.root / arch / "hf")
        return self._hf[arch]

    def gguf(self, arch: str, outtype: str = "f32") -> Path:
        key = (arch, outtype)
        if key not in self._gguf:
            self._gguf[key] = convert_hf_dir(self.hf(arch),
                                             self.root / arch / f"tiny-{arch}-{outtype}.gguf",
                                             outtype)
        return self._gguf[key]


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> TinyModels:
    return TinyModels(tmp_path_factory.mktemp("tiny-models"))


@pytest.fixture(scope="session", params=ARCHS)
def tiny_arch(request) -> str:
    """Parametrizes a test over every supported architecture."""
    return request.param


@pytest.fixture(scope="session")
def tiny_hf(request, tiny_models) -> Path:
    return tiny_models.hf(getattr(request, "param", "llama"))


@pytest.fixture(scope="session")
def tiny_gguf(request, tiny_models) -> Path:
    return tiny_models.gguf(getattr(request, "param", "llama"))


@pytest.fixture(scope="module")
def torch_one_thread():
    """torch spins on a busy 2-core machine with 2 threads; one is several times faster."""
    import torch
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
