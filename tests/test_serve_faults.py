"""A bounded fault storm on `tangquant serve` as a process: the server comes out of it healthy."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from _serve_fixtures import LONG_TOKENS, long_context_ir

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))


@pytest.fixture(scope="module")
def ir(tmp_path_factory, tiny_tokenizer):
    return long_context_ir(tmp_path_factory, tiny_tokenizer)


def test_fault_storm_leaves_the_server_healthy(ir):
    """50 streams dropped mid-stream, 10 slow clients, 10 bodies over the limit and 100 idle
    connections at once; afterwards every dropped stream was cancelled, /health is 200, a
    normal request succeeds and the RSS is back near its level before the storm."""
    import serve_faults

    out = serve_faults.storm_server(ir, stream_tokens=LONG_TOKENS)
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
