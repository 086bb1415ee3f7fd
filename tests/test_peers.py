"""The outside engines beside llama.cpp: the ``iklcpp`` and ``ortgenai`` bench kinds, and
`tangquant export --format ortgenai` (ONNX Runtime GenAI's own builder, its int4 read back)."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import os
import sys
from pathlib import Path

import pytest
from conftest import tree_digest

from tangquant import host
from tangquant.bench import bench, parse_candidate
from tangquant.cli import main
from tangquant.errors import BenchError

SMALL = {"prompt_tokens": 16, "gen_tokens": 8, "repetitions": 1, "threads": (1,), "bandwidth_mb": 16}
HAS_ORT = importlib.util.find_spec("onnxruntime_genai") is not None
NO_ORT = "onnxruntime-genai is not installed (pip install 'tangquant[ortgenai]')"
IK_PATH = Path(os.environ.get("TANGQUANT_IKLCPP_PATH") or Path(sys.prefix) / "iklcpp")
NO_IK = f"ik_llama.cpp is not installed in {IK_PATH} (sh .ci/install-iklcpp)"


def _export(src, out, *flags) -> tuple[int, str]:
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        rc = main(["export", "--model", str(src), "--output", str(out), *flags])
    return rc, stdout.getvalue()


@pytest.mark.fast
@pytest.mark.parametrize("text, message", [
    ("a=iklcpp:/x.gguf,rtr=maybe", "rtr"),
    ("a=iklcpp:/x.gguf,repack=1", "takes no option 'repack'"),       # llama.cpp's key, not ik's
    ("a=iklcpp:/x.gguf,threads_batch=0", "threads_batch"),
    ("a=ortgenai:/x,threads=2", "takes no option 'threads'"),          # threads are the bench's -t
])
def test_bad_options_are_refused_before_running(text, message):
    with pytest.raises(BenchError, match=message):
        parse_candidate(text)


def _handmade_ort_dir(out: Path, vocab: int = 64, hidden: int = 8) -> Path:
    """The smallest directory load.inspect takes for ONNX Runtime GenAI: genai_config.json and a
    decoder whose embedding table only a Gather on input_ids reads, and one matmul weight."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    out.mkdir(parents=True)
    table = numpy_helper.from_array(np.zeros((vocab, hidden), np.float32), "model.embed_tokens.weight")
    head = numpy_helper.from_array(np.zeros((hidden, vocab), np.float32), "lm_head.weight")
    nodes = [helper.make_node("Gather", ["model.embed_tokens.weight", "input_ids"], ["h"]),
             helper.make_node("MatMul", ["h", "lm_head.weight"], ["logits"])]
    graph = helper.make_graph(nodes, "decoder", [helper.make_tensor_value_info("input_ids", TensorProto.INT64, [1, None])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, None, vocab])],
                              [table, head])
    onnx.save(helper.make_model(graph), str(out / "model.onnx"))
    config = {"model": {"type": "qwen2", "vocab_size": vocab, "context_length": 64,
                        "decoder": {"filename": "model.onnx", "hidden_size": hidden, "num_hidden_layers": 1}}}
    (out / "genai_config.json").write_text(json.dumps(config), encoding="utf-8")
    return out


@pytest.mark.fast
def test_ortgenai_directory_is_told_and_reads_one_embedding_row(tmp_path):
    from tangquant import load
    from tangquant.errors import InputError
    from tangquant.ortgenai import model

    d = _handmade_ort_dir(tmp_path / "ort", vocab=64, hidden=8)
    md = load.inspect(d, kinds=("ortgenai",))
    assert md.kind == "ortgenai" and md.config["vocab_size"] == 64 and md.config["max_position_embeddings"] == 64
    with pytest.raises(InputError, match="ONNX Runtime GenAI model directory; this needs"):
        load.inspect(d)  # not a model the other stages read
    b = model.per_token(d, {})
    assert b["weights_bytes"] == 2 * 64 * 8 * 4 and b["bytes_per_token"] == 64 * 8 * 4 + 8 * 4
    (d / "model.onnx").unlink()
    with pytest.raises(InputError, match="lacks its decoder"):
        load.inspect(d, kinds=("ortgenai",))


@pytest.mark.skipif(HAS_ORT, reason="onnxruntime-genai is installed")
def test_ortgenai_without_the_package_is_a_failed_row_naming_the_extra(tmp_path):
    d = _handmade_ort_dir(tmp_path / "ort")
    (rec,) = bench([f"ort=ortgenai:{d}"], results_dir=str(tmp_path / "r.jsonl"), **SMALL)["records"]
    assert rec["status"] == "failed" and "pip install 'tangquant[ortgenai]'" in rec["error"], rec["error"]


@pytest.fixture(scope="module")
def ort_export(tmp_path_factory, gptq_dir):
    """The INC-GPTQ tiny checkpoint through ONNX Runtime GenAI's builder: (out, rc, stdout, digest)."""
    if not HAS_ORT:
        pytest.skip(NO_ORT)
    out = tmp_path_factory.mktemp("ort") / "tiny-ort"
    before = tree_digest(gptq_dir)
    rc, stdout = _export(gptq_dir, out, "--format", "ortgenai")
    return out, rc, stdout, before


def test_ortgenai_export_keeps_the_checkpoint_integers(ort_export, gptq_dir, tmp_path, capsys):
    """Every GPTQ layer is read back from the MatMulNBits nodes with its own integers, zero points
    and scales (q/k/v fused: 5 nodes a layer); the builder's int4 lm_head is reported, the input
    is untouched, and an existing output is not replaced without --force."""
    out, rc, stdout, before = ort_export
    assert rc == 0, stdout
    metrics = json.loads((out / "tangquant.json").read_text(encoding="utf-8"))["metrics"]
    assert metrics["int4_layers_exact"] == 2 * 5 and metrics["accuracy_levels"] == [4]
    head = metrics["requantized"]["lm_head"]  # fp16 in the checkpoint, int4 RTN in the builder's output
    assert head["from"] == "lm_head.weight (float16)" and 0 < head["relative_rms_error"] < 0.5
    assert metrics["embedding"].startswith("equal to the checkpoint's")
    assert len(metrics["ortgenai_tokens"]) == 4 and "10 int4 nodes equal" in stdout
    assert tree_digest(gptq_dir) == before
    assert _export(gptq_dir, out, "--format", "ortgenai")[0] == 2
    assert "already exists" in capsys.readouterr().err


def test_ortgenai_compare_names_what_differs(ort_export, gptq_dir, tmp_path):
    """A changed integer in one node's blocks is found and named, not passed."""
    import shutil

    import numpy as np

    from tangquant.gptq import GPTQCheckpoint
    from tangquant.ortgenai import compare, model

    bad = tmp_path / "bad"
    shutil.copytree(ort_export[0], bad)
    g = model.graph(bad)
    target = next(t for t in g.initializer if t.name.endswith("mlp.up_proj.MatMulNBits.qweight"))
    ext = {e.key: e.value for e in target.external_data}
    data = bad / ext["location"]
    raw = bytearray(data.read_bytes())
    raw[int(ext.get("offset", 0))] ^= 0x01  # one 4-bit value off by one
    data.write_bytes(bytes(raw))
    report = compare.compare(GPTQCheckpoint.open(gptq_dir), bad)
    assert report["differs"] == ["model.layers.0.mlp.up_proj"] and report["missing"] == []
    assert np.isfinite(report["requantized"]["lm_head"]["max_abs_diff"])


def test_bench_ortgenai_kind(ort_export, tmp_path):
    """A pp/tg row with ONNX Runtime's threads set to -t and bytes per token from the weight file;
    a truncated weight file is a failed row, never a speed."""
    import shutil

    out = ort_export[0]
    broken = tmp_path / "broken"
    shutil.copytree(out, broken)
    data = broken / "model.onnx.data"
    data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])
    res = bench([f"ort=ortgenai:{out}", f"broken=ortgenai:{broken}"], results_dir=str(tmp_path / "r.jsonl"),
                **SMALL)
    ok, bad = res["records"]
    assert ok["status"] == "ok", ok.get("error")
    assert ok["pp_tps"] > 0 and ok["tg_tps"] > 0 and len(ok["warmup_tokens"]) == 8
    assert ok["intra_op_threads"] == 1 and ok["worker_versions"]["onnxruntime-genai"]
    weights = (out / "model.onnx.data").stat().st_size
    assert ok["weights_bytes"] == weights and ok["bytes_per_token"] < weights  # one embedding row read
    assert bad["status"] == "failed" and "pp_tps" not in bad and res["exit_code"] == 1


@pytest.mark.skipif(HAS_ORT, reason="onnxruntime-genai is installed")
def test_ortgenai_export_without_the_package_names_the_extra(gptq_dir, tmp_path, capsys):
    assert _export(gptq_dir, tmp_path / "o", "--format", "ortgenai")[0] == 2
    assert "pip install 'tangquant[ortgenai]'" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory, tiny_model_dir) -> Path:
    """tangquant's GGUF of a round-to-nearest GPTQ checkpoint of the tiny model (seconds to build)."""
    from _gptq_fixtures import make_rtn_gptq

    root = tmp_path_factory.mktemp("ikgguf")
    make_rtn_gptq(tiny_model_dir, root / "gptq")
    out = root / "gguf"
    assert _export(root / "gptq", out, "--format", "gguf", "--no-llama-check")[0] == 0
    (path,) = out.glob("*.gguf")
    return path


def test_iklcpp_not_installed_is_a_failed_row_naming_the_install(tiny_gguf, tmp_path, monkeypatch):
    monkeypatch.setenv("TANGQUANT_IKLCPP_PATH", str(tmp_path / "nowhere"))
    if importlib.util.find_spec("ik_llama_cpp") is not None:
        pytest.skip("ik_llama_cpp is importable from site-packages")
    (rec,) = bench([f"ik=iklcpp:{tiny_gguf}"], results_dir=str(tmp_path / "r.jsonl"), **SMALL)["records"]
    assert rec["status"] == "failed" and "sh .ci/install-iklcpp" in rec["error"], rec["error"]


@pytest.mark.skipif(not (IK_PATH / "ik_llama_cpp").is_dir(), reason=NO_IK)
def test_bench_iklcpp_kind(tiny_gguf, tmp_path):
    """The same GGUF with ik_llama.cpp's defaults and with -rtr (its tensors repacked at load);
    a truncated GGUF is a failed row."""
    broken = tmp_path / "broken.gguf"
    data = tiny_gguf.read_bytes()
    broken.write_bytes(data[: len(data) // 2])
    res = bench([f"ik=iklcpp:{tiny_gguf}", f"rtr=iklcpp:{tiny_gguf},rtr=1,mqkv=1",
                 f"broken=iklcpp:{broken}"], results_dir=str(tmp_path / "r.jsonl"), **SMALL)
    ik, rtr, bad = res["records"]
    assert ik["status"] == rtr["status"] == "ok", (ik.get("error"), rtr.get("error"))
    assert ik["rtr"] is False and ik["repacked_tensors"] == 0 and ik["fa"] is True
    assert rtr["rtr"] is True and rtr["mqkv"] is True and rtr["repacked_tensors"] > 0
    assert "AVX512 = 1" in ik["ik_llama_cpp_system_info"] or "avx512f" not in host.cpu_flags()
    assert ik["pp_tps"] > 0 and ik["tg_tps"] > 0 and len(ik["warmup_tokens"]) == 8
    assert ik["bytes_per_token"] < ik["weights_bytes"] <= ik["size_bytes"]
    assert bad["status"] == "failed" and "pp_tps" not in bad
