"""GGUF exports of the tiny model for the llama.cpp chat, serve, deployment and tune tests.

``tiny_gguf`` is the INC-GPTQ checkpoint (``_quantize_fixtures.gptq_dir``, the one ``ov_export``
exports too) as `tangquant export --format gguf` writes it, so the IR and the GGUF hold the same
integers. ``long_gguf`` has a 16k context, for generations that must still be running when a
test acts (as ``_serve_fixtures.long_context_ir`` for the OpenVINO server).
"""

from __future__ import annotations

from pathlib import Path

import pytest

NO_LLAMA = "llama-cpp-python is not installed (pip install 'tangquant[llamacpp]')"


@pytest.fixture(scope="session")
def tiny_gguf(tmp_path_factory, gptq_dir) -> Path:
    pytest.importorskip("llama_cpp", reason=NO_LLAMA)
    from tangquant.export import export

    out = tmp_path_factory.mktemp("llama") / "tiny-gguf"
    export(gptq_dir, out, format="gguf")
    return out


@pytest.fixture(scope="session")
def long_gguf(tmp_path_factory, tiny_tokenizer) -> Path:
    pytest.importorskip("llama_cpp", reason=NO_LLAMA)
    from _gptq_fixtures import make_rtn_gptq
    from conftest import save_tiny_model

    from tangquant.export import export

    root = tmp_path_factory.mktemp("llama16k")
    save_tiny_model(tiny_tokenizer, root / "hf", seed=7, max_position_embeddings=16384)
    out = root / "tiny-poet"
    export(make_rtn_gptq(root / "hf", root / "gptq"), out, format="gguf")
    return out
