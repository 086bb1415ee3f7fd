"""GPTQ checkpoints and OpenVINO exports of the tiny fixture model, for the export and chat tests.

The main checkpoint is the real INC-GPTQ one (``_quantize_fixtures.gptq_dir``), so the
tests prove INC's integers reach the IR. ``make_rtn_gptq`` builds variants INC's defaults
do not give (asymmetric zero points, act-order groups) with round-to-nearest in pure torch,
packed by ``gptq.pack_layer`` in exactly the layout ``tangquant quantize`` writes.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _rtn(weight, bits: int, group_size: int, sym: bool):
    """Round-to-nearest per group; returns q [out, in], zeros and scales [groups, out]."""
    import torch

    out_f, in_f = weight.shape
    maxq = 2**bits - 1
    w = weight.float().reshape(out_f, in_f // group_size, group_size)
    if sym:
        amax = w.abs().amax(dim=-1).clamp(min=1e-8)
        scales = 2 * amax / maxq
        zeros = torch.full_like(scales, (maxq + 1) // 2)
    else:
        lo, hi = w.amin(dim=-1).clamp(max=0), w.amax(dim=-1).clamp(min=0)
        scales = ((hi - lo) / maxq).clamp(min=1e-8)
        zeros = torch.round(-lo / scales).clamp(0, maxq)
    scales = scales.half().float()  # the checkpoint keeps fp16 scales: round before use
    q = torch.clamp(torch.round(w / scales[..., None]) + zeros[..., None], 0, maxq)
    return q.reshape(out_f, in_f).to(torch.uint8), zeros.t().contiguous(), scales.t().contiguous()


def make_rtn_gptq(src: Path, out: Path, bits: int = 4, group_size: int = 128,
                  sym: bool = True) -> Path:
    import torch

    from tangquant import gptq as gptq_format
    from tangquant.checkpoint import ShardWriter, iter_tensors, weight_files
    from tangquant.files import copy_aux_files

    out = Path(out)
    out.mkdir(parents=True)
    writer = ShardWriter(out, max_shard_bytes=300_000)
    tensors = {}
    for path in weight_files(Path(src)):
        tensors.update(dict(iter_tensors(path)))
    for name, tensor in tensors.items():
        module, _, leaf = name.rpartition(".")
        if module.rpartition(".")[2] not in LINEARS:
            writer.add(name, tensor.to(torch.float16))
            continue
        if leaf == "bias":
            continue
        q, zeros, scales = _rtn(tensor, bits, group_size, sym)
        g_idx = torch.arange(tensor.shape[1]) // group_size
        packed = gptq_format.pack_layer(q, zeros, scales, g_idx, bits,
                                        bias=tensors.get(f"{module}.bias"))
        for leaf_name, value in packed.items():
            writer.add(f"{module}.{leaf_name}", value)
    writer.close()
    config = json.loads((Path(src) / "config.json").read_text())
    config["torch_dtype"] = "float16"
    config["quantization_config"] = gptq_format.quantization_config(
        bits, group_size, sym=sym, desc_act=False, damp_percent=0.01)
    (out / "config.json").write_text(json.dumps(config, indent=2))
    copy_aux_files(Path(src), out)
    return out


# Shared by test_export.py and test_chat.py (conftest registers this module with `pytest_plugins`)
# (with ``_quantize_fixtures``, whose ``gptq_dir`` is the INC-GPTQ checkpoint), so it runs once.

@pytest.fixture(scope="session")
def ov_export(tmp_path_factory, gptq_dir):
    """`tangquant export` of the INC-GPTQ ``gptq_dir``, default settings: (ir_dir, rc, stdout, digest)."""
    import contextlib
    import io

    from conftest import tree_digest

    from tangquant.cli import main

    out = tmp_path_factory.mktemp("ov") / "tiny-ov"
    before = tree_digest(gptq_dir)
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        rc = main(["export", "--model", str(gptq_dir), "--output", str(out), "--format", "openvino"])
    return out, rc, stdout.getvalue(), before
