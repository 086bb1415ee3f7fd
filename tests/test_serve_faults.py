"""A bounded fault storm on `tangquant serve` as a process: the server comes out of it healthy."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from _serve_fixtures import build_ir

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

# Long enough that no dropped stream can finish before its client is scheduled again: the tiny
# model decodes ~1 ms a step, and a client thread on a loaded 2-core runner can wait a second.
STREAM_TOKENS = 12000


@pytest.fixture(scope="module")
def ir(tmp_path_factory, tiny_tokenizer):
    """The tiny model's shape with a 16k context, exported to an IR."""
    import torch

    from tangquant.poet.tiny import build_model, qwen2_config, save_model, set_special_ids

    config = qwen2_config(-(-len(tiny_tokenizer) // 64) * 64, max_position_embeddings=16384)
    set_special_ids(config, tiny_tokenizer)
    root = tmp_path_factory.mktemp("storm")
    save_model(build_model(config, seed=7), tiny_tokenizer, root / "hf", dtype=torch.float32)
    return build_ir(root / "hf", root / "ir")


def test_fault_storm_leaves_the_server_healthy(ir):
    """50 streams dropped mid-stream, 10 slow clients, 10 bodies over the limit and 100 idle
    connections at once; afterwards every dropped stream was cancelled, /health is 200, a
    normal request succeeds and the RSS is back near its level before the storm."""
    import serve_faults

    out = serve_faults.storm_server(ir, stream_tokens=STREAM_TOKENS)
    assert out["statuses"]["abandon"] == ["200"], out
    assert out["statuses"]["slow"] == ["200"], out  # slow but complete: served, with [DONE]
    assert set(out["statuses"]["big"]) <= {"413", "reset"}, out
    assert out["cancelled"] == 50, out
    assert out["health_after"] == 200 and out["normal_request_after"] == 200, out
    # /health stays responsive with 100 idle sockets open and 60 requests in flight.
    assert out["health_during_storm_max_s"] < 5, out
    assert out["rss_after_mib"] - out["rss_before_mib"] < 64, out
    again = out["second_storm"]  # the same storm again: nothing accumulates
    assert again["cancelled"] == 50 and again["normal_request_after"] == 200, again
    assert again["rss_after_mib"] - out["rss_after_mib"] < 32, out
