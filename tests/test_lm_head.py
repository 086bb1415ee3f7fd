"""`tangquant export --lm-head int4`: the head as group-wise INT4 RTN, fused by the CPU plugin."""

from __future__ import annotations

import pytest

import json

import numpy as np

from tangquant.cli import main


def test_lm_head_int4_export(tmp_path, gptq_dir, ov_export):
    import openvino as ov
    import openvino_genai

    from tangquant.measure.roofline import bytes_per_token

    out = tmp_path / "h4"
    assert main(["-q", "export", "--model", str(gptq_dir), "--output", str(out), "--lm-head", "int4",
                 "--lm-head-group-size", "64"]) == 0
    manifest = json.loads((out / "tangquant.json").read_text())
    assert manifest["parameters"]["lm_head"] == "int4" and manifest["metrics"]["lm_head_group_size"] == 64
    model = ov.Core().read_model(str(out / "openvino_model.xml"))
    consts = {op.get_friendly_name(): op for op in model.get_ops() if op.get_type_name() == "Constant"}
    q = consts["lm_head.weight_int4"]
    assert q.get_element_type().get_type_name() == "u4" and list(q.shape)[2] == 64
    # The CPU plugin fuses it into an INT4 fully connected, not a float MatMul.
    compiled = ov.Core().compile_model(model, "CPU")
    fcs = [op for op in compiled.get_runtime_model().get_ops() if "lm_head" in op.get_friendly_name()
           and op.get_rt_info()["layerType"].astype(str).startswith("FullyConnected")]
    assert fcs and fcs[0].get_rt_info()["runtimePrecision"].astype(str) == "u4"
    assert bytes_per_token("ov", out, {})["bytes_per_token"] < \
        bytes_per_token("ov", ov_export[0], {})["bytes_per_token"]
    assert openvino_genai.LLMPipeline(str(out), "CPU").generate("写一首唐诗", max_new_tokens=2)


@pytest.mark.fast
def test_rtn_int4_round_trip():
    from tangquant.ov.head import rtn_int4

    w = np.random.default_rng(0).normal(size=(16, 64)).astype(np.float32)
    q, zeros, scales = rtn_int4(w, 32)
    deq = ((q.astype(np.float32) - zeros) * scales.astype(np.float32)).reshape(w.shape)
    assert q.max() <= 15 and np.abs(deq - w).max() <= scales.astype(np.float32).max() / 2 + 1e-6
