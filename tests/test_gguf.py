"""`tangquant export --format gguf`: the GPTQ checkpoint's integers, exactly, in a GGUF llama.cpp runs."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import numpy as np
import pytest
from _gptq_fixtures import make_rtn_gptq
from conftest import tree_digest

from tangquant.cli import main


N_LINEARS = 2 * 7  # tiny model: 2 decoder layers of 7 linears
NO_LLAMA = "llama-cpp-python is not installed (pip install 'tangquant[llamacpp]')"


def _export(src, out, *flags) -> tuple[int, str]:
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        rc = main(["export", "--model", str(src), "--output", str(out), "--format", "gguf", *flags])
    return rc, stdout.getvalue()


@pytest.fixture(scope="session")
def gguf_export(tmp_path_factory, gptq_dir):
    """The INC-GPTQ tiny checkpoint exported with default settings: (out dir, rc, stdout, digest)."""
    out = tmp_path_factory.mktemp("gguf") / "tiny-gguf"
    before = tree_digest(gptq_dir)
    rc, stdout = _export(gptq_dir, out)
    return out, rc, stdout, before


def _file(out: Path) -> Path:
    (path,) = out.glob("*.gguf")
    return path


@pytest.mark.fast
def test_q4_0_blocks_follow_llama_cpp_layout():
    """block_q4_0: fp16 d, then 16 bytes, element j in the low nibble of byte j, j+16 in the high."""
    import torch

    from tangquant.gguf import q4
    from tangquant.gptq import QuantizedLinear

    q = torch.randint(0, 16, (3, 64), dtype=torch.uint8)
    scales = torch.tensor([[0.5, -0.25, 2.0]], dtype=torch.float16)  # per channel: one group
    layer = QuantizedLinear(q, torch.full((1, 3), 8), scales, torch.zeros(64, dtype=torch.int32), 4)
    blocks = q4.pack("x", layer).reshape(3, 2, 18)
    assert blocks[1, 1, :2].view(np.float16)[0] == np.float16(-0.25)
    qs = blocks[2, 0, 2:]
    assert list(qs & 0xF) == q[2, :16].tolist() and list(qs >> 4) == q[2, 16:32].tolist()


def test_export_reads_back_bit_exact_and_keeps_input(gguf_export, gptq_dir):
    """Read with gguf's own reader: every Q4_0 tensor dequantises to exactly the checkpoint's weights."""
    import gguf

    from tangquant.gguf.reader import dequantized
    from tangquant.gptq import GPTQCheckpoint

    out, rc, stdout, before = gguf_export
    assert rc == 0 and stdout.count("\n") == 1 and f"{N_LINEARS} Q4_0 tensors" in stdout
    for name in ("README.md", "Modelfile", "tangquant.json", "tokenizer.json"):
        assert (out / name).is_file(), name
    reader = gguf.GGUFReader(str(_file(out)))
    tensors = {t.name: t for t in reader.tensors}
    ckpt = GPTQCheckpoint.open(gptq_dir)
    checked = 0
    for module, layer, _ in ckpt.layers():
        i, kind = module.split(".")[2], module.rpartition(".")[2]
        name = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
                "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down"}[kind]
        t = tensors[f"blk.{i}.{name}.weight"]
        assert t.tensor_type == gguf.GGMLQuantizationType.Q4_0
        assert np.array_equal(dequantized(t), layer.dequantize().numpy())
        checked += 1
    assert checked == N_LINEARS
    assert tensors["token_embd.weight"].tensor_type == gguf.GGMLQuantizationType.Q8_0
    assert tensors["blk.0.attn_q.bias"].tensor_type == gguf.GGMLQuantizationType.F32
    assert tree_digest(gptq_dir) == before


def test_metadata_and_tokenizer(gguf_export, gptq_dir, tiny_tokenizer):
    from tangquant.gguf.reader import field, open_reader

    reader = open_reader(_file(gguf_export[0]))
    config = json.loads((gptq_dir / "config.json").read_text())
    assert field(reader, "general.architecture") == "qwen2"
    assert field(reader, "qwen2.block_count") == config["num_hidden_layers"]
    assert field(reader, "qwen2.attention.head_count_kv") == config["num_key_value_heads"]
    assert field(reader, "qwen2.rope.freq_base") == config["rope_theta"]
    im_end = tiny_tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert field(reader, "tokenizer.ggml.eos_token_id") == im_end
    assert field(reader, "tokenizer.ggml.add_bos_token") is False
    assert field(reader, "tokenizer.ggml.pre") == "gpt-2"  # the tiny tokenizer's ByteLevel regex
    assert "<|im_start|>" in field(reader, "tokenizer.chat_template")
    assert len(field(reader, "tokenizer.ggml.tokens")) == config["vocab_size"]
    manifest = json.loads((gguf_export[0] / "tangquant.json").read_text())
    assert manifest["parameters"]["format"] == "gguf"
    assert "llama-server" in (gguf_export[0] / "README.md").read_text()
    assert "<|im_end|>" in (gguf_export[0] / "Modelfile").read_text()


def test_llama_cpp_logits_correlate_with_fp32_reference(gguf_export, gptq_dir, tiny_tokenizer):
    """llama.cpp quantizes activations for Q4_0 dot products: close to the reference, not equal."""
    pytest.importorskip("llama_cpp", reason=NO_LLAMA)
    import torch

    from tangquant import load
    from tangquant.gguf.runtime import Session

    text = "<|im_start|>user\n写一首关于明月的诗<|im_end|>\n<|im_start|>assistant\n床前明月光，疑是地上霜。"
    ids = tiny_tokenizer(text)["input_ids"]
    s = Session(_file(gguf_export[0]), threads=2, n_ctx=128)
    try:
        assert s.tokenize(text) == ids  # the GGUF's tokenizer is the model's
        got = s.decode(ids, 0, all_logits=True)
    finally:
        s.close()
    with torch.no_grad():
        ref = load.torch_model(gptq_dir)(input_ids=torch.tensor([ids])).logits[0].numpy()
    corr = [np.corrcoef(a, b)[0, 1] for a, b in zip(got, ref)]
    assert min(corr) >= 0.99, corr
    # Where the reference's top two are further apart than twice llama.cpp's largest logit error, the
    # error cannot swap them: the same token there. (The tiny random model has near-ties elsewhere,
    # and the GPTQ fixture's integers vary a little from run to run with two threads.)
    top2 = np.sort(ref, axis=-1)[:, -2:]
    decisive = top2[:, 1] - top2[:, 0] > 2 * np.abs(got - ref).max(-1)
    assert decisive.sum() >= 5, "too few decisive positions for the check to mean anything"
    assert (got.argmax(-1) == ref.argmax(-1))[decisive].all()
    assert float(np.mean(got.argmax(-1) == ref.argmax(-1))) >= 0.75


@pytest.mark.parametrize("fault", ["asym", "act-order"])
def test_refuses_what_q4_0_cannot_hold(tmp_path, capsys, tiny_model_dir, fault):
    """One line naming the fix; nothing written (not even a temporary directory left behind)."""
    src = make_rtn_gptq(tiny_model_dir, tmp_path / "src" / fault, sym=fault != "asym", group_size=64)
    if fault == "act-order":
        import torch
        from safetensors.torch import load_file, save_file

        for shard in src.glob("*.safetensors"):  # permuted groups, config still saying desc_act false
            tensors = load_file(shard)
            for name in [n for n in tensors if n.endswith(".g_idx")]:
                tensors[name] = torch.flip(tensors[name], dims=[0]).contiguous()
            save_file(tensors, shard, metadata={"format": "pt"})
    out = tmp_path / "outputs" / "gguf"
    out.parent.mkdir()
    rc, _ = _export(src, out)
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1
    assert ("--sym" if fault == "asym" else "without --act-order") in err
    assert list(out.parent.iterdir()) == []


def test_refuses_desc_act_config_up_front(tmp_path, tiny_model_dir):
    from tangquant.export import export
    from tangquant.gguf.q4 import NotQ4_0Error

    src = make_rtn_gptq(tiny_model_dir, tmp_path / "act")
    config = json.loads((src / "config.json").read_text())
    config["quantization_config"]["desc_act"] = True
    (src / "config.json").write_text(json.dumps(config))
    with pytest.raises(NotQ4_0Error, match="--act-order"):
        export(src, tmp_path / "out", format="gguf")
    assert not (tmp_path / "out").exists()


def test_per_channel_and_f16_embeddings(tmp_path, tiny_model_dir):
    """Group size -1 is one Q4_0 scale per row; --gguf-embeddings f16 keeps the table exact."""
    import gguf

    from tangquant.gguf.reader import dequantized, open_reader
    from tangquant.gptq import GPTQCheckpoint

    src = make_rtn_gptq(tiny_model_dir, tmp_path / "pc", group_size=128)
    rc, _ = _export(src, tmp_path / "out", "--gguf-embeddings", "f16")
    assert rc == 0
    tensors = {t.name: t for t in open_reader(_file(tmp_path / "out")).tensors}
    emb = tensors["token_embd.weight"]
    assert emb.tensor_type == gguf.GGMLQuantizationType.F16
    want = dict(GPTQCheckpoint.open(src).tensors())["model.embed_tokens.weight"]
    assert np.array_equal(dequantized(emb), want.half().float().numpy())


@pytest.fixture(scope="session")
def demo_poet(tmp_path_factory):
    """The shipped poet as `tangquant demo` builds it: merge → GPTQ g128 → IR and GGUF."""
    from tangquant.export import export
    from tangquant.merge import merge
    from tangquant.poet import ASSETS, demo_paths
    from tangquant.quantize import quantize

    paths, tmp = demo_paths(ASSETS), tmp_path_factory.mktemp("poet")
    merge(paths["base"], paths["adapter"], tmp / "merged", dtype="fp32")
    q = quantize(tmp / "merged", tmp / "gptq", ASSETS / "int4-gptq-g128.yaml", calib=str(ASSETS / "calib.json"))
    export(q["checkpoint"], tmp / "ir")
    export(q["checkpoint"], tmp / "gguf", format="gguf")
    return tmp


@pytest.mark.slow  # building the poet's GPTQ checkpoint, IR and GGUF: 136 s on 2 busy cores
def test_demo_poet_gguf_greedy_matches_its_ir(demo_poet):
    """The same first 8 greedy tokens as the IR (exact mode) on most held-out prompts."""
    pytest.importorskip("llama_cpp", reason=NO_LLAMA)
    import openvino as ov
    import openvino_genai as genai

    from tangquant import load
    from tangquant.gguf.runtime import Session
    from tangquant.measure import poems
    from tangquant.ov.ir import EXACT_CONFIG
    from tangquant.poet import ASSETS

    prompts = [p["prompt"] for p in poems.load_prompts(ASSETS / "prompts.json")][:6]
    tok = load.tokenizer(demo_poet / "gguf")
    pipe = load.genai_pipeline(demo_poet / "ir", **EXACT_CONFIG)
    cfg = genai.GenerationConfig()
    cfg.max_new_tokens, cfg.do_sample, cfg.ignore_eos = 8, False, True
    s = Session(_file(demo_poet / "gguf"), threads=2, n_ctx=256)
    matches = []
    try:
        for prompt in prompts:
            ids = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True)
            ids = list(ids["input_ids"] if isinstance(ids, dict) else ids)
            arr = np.array([ids], dtype=np.int64)
            ir = list(pipe.generate(genai.TokenizedInputs(ov.Tensor(arr), ov.Tensor(np.ones_like(arr))),
                                    cfg).tokens[0])
            matches.append(s.greedy(ids, 8) == ir)
    finally:
        s.close()
    print(f"demo poet: GGUF = IR on the first 8 greedy tokens for {sum(matches)} of {len(matches)} prompts")
    assert sum(matches) > len(matches) / 2, matches


def test_eval_reads_a_gguf_as_its_exact_weights(tmp_path, gptq_dir, heldout_file):
    """With an f16 table and head every GGUF tensor is the checkpoint's: eval finds KLD 0 against it."""
    from tangquant.evaluate import evaluate

    out = tmp_path / "f16-emb"
    assert _export(gptq_dir, out, "--gguf-embeddings", "f16", "--gguf-head", "f16")[0] == 0
    exact = evaluate(_file(out), gptq_dir, heldout_file, num_samples=2, seq_len=48)
    assert exact["kld_max"] < 1e-9 and exact["same_top"] == 1.0


def test_lm_eval_on_a_lone_gguf(tmp_path, gptq_dir, tiny_tokenizer):
    """lm_eval runs a GGUF that has no tokenizer files beside it (as llama-quantize writes them):
    its vocabulary comes from the file, and its exact weights score as the checkpoint does."""
    pytest.importorskip("lm_eval")
    from tangquant import load
    from tangquant.evaluate import evaluate

    out = tmp_path / "f16-emb"
    assert _export(gptq_dir, out, "--gguf-embeddings", "f16", "--gguf-head", "f16")[0] == 0
    for f in out.iterdir():
        if f.suffix != ".gguf":
            f.unlink()
    text = "床前明月光，疑是地上霜。<|im_end|>"
    assert load.tokenizer(load.inspect(_file(out), kinds=("gguf",)))(text)["input_ids"] == tiny_tokenizer(text)["input_ids"]
    res = evaluate(_file(out), gptq_dir, tasks=("tang_couplet",), limit=3)
    rows = res["lm_eval"]["rows"]
    assert rows and all(r["n"] == 3 and r["delta"] == 0 for r in rows), rows


def test_bench_llamacpp_kind(tmp_path, gguf_export):
    """pp/tg rows with the repack path recorded; a truncated GGUF is a failed row, never a speed."""
    pytest.importorskip("llama_cpp", reason=NO_LLAMA)
    from tangquant.bench import bench

    broken = tmp_path / "broken.gguf"
    data = _file(gguf_export[0]).read_bytes()
    broken.write_bytes(data[: len(data) // 2])
    res = bench([f"on=llamacpp:{gguf_export[0]}", f"off=llamacpp:{_file(gguf_export[0])},repack=0",
                 f"broken=llamacpp:{broken}"], prompt_tokens=16, gen_tokens=8, repetitions=1,
                threads=(1,), bandwidth_mb=16, results_dir=str(tmp_path / "r.jsonl"))
    on, off, bad = res["records"]
    assert on["status"] == off["status"] == "ok" and bad["status"] == "failed" and "pp_tps" not in bad
    assert on["repack"] is True and off["repack"] is False and off["repacked_tensors"] == {}
    assert on["pp_tps"] > 0 and on["tg_tps"] > 0 and len(on["warmup_tokens"]) == 8
    assert on["bytes_per_token"] < on["weights_bytes"] <= on["size_bytes"]  # one row of token_embd
    assert res["exit_code"] == 1


def test_a_repack_crash_falls_back_to_the_plain_path(tmp_path, gptq_dir, monkeypatch, caplog):
    """llama.cpp's default repacking segfaulted on an AMX Xeon: the export then runs the plain path,
    says so, and records it; a crash on both paths publishes nothing."""
    pytest.importorskip("llama_cpp", reason=NO_LLAMA)
    import subprocess

    from tangquant.errors import ExportError
    from tangquant.export import export
    from tangquant.gguf import build

    real = build._run_smoke
    crash = {"ok": False, "crashed": True, "error": build._died(subprocess.CompletedProcess([], -11))}
    assert crash["error"] == "crashed (signal 11)"
    calls = []

    def repack_crashes(path, text, n, repack):  # stands in for this CPU's llama.cpp, repack on
        calls.append(repack)
        return crash if repack else real(path, text, n, repack)

    monkeypatch.setattr(build, "_run_smoke", repack_crashes)
    res = export(gptq_dir, tmp_path / "out", format="gguf")
    assert calls == [True, False]
    assert res["llama_cpp_repack_crashed"] is True and "repacking off" in res["llama_cpp_check"]
    assert "--no-repack" in caplog.text
    monkeypatch.setattr(build, "_run_smoke", lambda *a, **k: crash)
    with pytest.raises(ExportError, match="cannot run .*crashed .*--no-llama-check"):
        export(gptq_dir, tmp_path / "never", format="gguf")
    assert not (tmp_path / "never").exists()
    # A machine whose llama.cpp crashes on every file: the exact file can still be published, and says so.
    res = export(gptq_dir, tmp_path / "unchecked", format="gguf", llama_check=False)
    assert res["llama_cpp_check"] == "skipped (--no-llama-check)" and res["q4_0_tensors_exact"] > 0
    assert "--no-llama-check" in (tmp_path / "unchecked" / "README.md").read_text(encoding="utf-8")


def test_a_crash_names_a_static_libstdcxx(tmp_path, monkeypatch):
    """The lent Xeon's toolchain linked libstdc++ statically into libggml.so, and every load from Python
    segfaulted: the crash message says so when the installed library shows it, and only then."""
    pytest.importorskip("llama_cpp", reason=NO_LLAMA)
    import shutil
    import subprocess
    from importlib.machinery import ModuleSpec

    import _ctypes

    from tangquant.gguf import build

    if shutil.which("ldd") is None or not getattr(_ctypes, "__file__", None):
        pytest.skip("no ldd, or _ctypes is built into this Python")
    assert build.installed_libggml() is not None
    assert build._libstdcxx_hint() == ""  # this installation links the shared libstdc++
    (tmp_path / "llama_cpp" / "lib").mkdir(parents=True)
    c_only = tmp_path / "llama_cpp" / "lib" / "libggml.so"
    shutil.copy(_ctypes.__file__, c_only)  # a real shared object that needs no libstdc++
    assert "libstdc++" not in subprocess.run(["ldd", str(c_only)], capture_output=True, text=True).stdout
    spec = ModuleSpec("llama_cpp", None, is_package=True)
    spec.submodule_search_locations = [str(tmp_path / "llama_cpp")]
    monkeypatch.setattr(build, "find_spec", lambda name: spec)
    assert "links no libstdc++" in build._libstdcxx_hint() and "CXX=g++" in build._libstdcxx_hint()


def _rtn_q4_0(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(fp16 scales, 4-bit integers) of llama.cpp's reference Q4_0 (quantize_row_q4_0_ref), written
    out here: per 32 weights, d = the largest-magnitude weight / -8, q = trunc(w / d + 8.5) in 0..15."""
    blocks = w.astype(np.float16).astype(np.float32).reshape(-1, 32)
    peak = np.take_along_axis(blocks, np.abs(blocks).argmax(-1)[:, None], -1)
    d = peak / -8
    inv = np.where(d == 0, 0, 1 / np.where(d == 0, 1, d))
    q = np.clip(np.trunc(blocks * inv + np.float32(8.5)), 0, 15).astype(np.uint8)
    return d.astype(np.float16)[:, 0], q


def test_gguf_head_types_export_and_read_back(tmp_path, gptq_dir, gguf_export):
    """--gguf-head q4_0: the head's integers are RTN of its fp16 weights, llama.cpp loads the file, and
    it reads fewer bytes per token than the default (q5_0) head, whose type the default export has."""
    import gguf

    from tangquant.export import export
    from tangquant.gguf.reader import bytes_per_token, open_reader, origin
    from tangquant.gptq import GPTQCheckpoint

    res = export(gptq_dir, tmp_path / "h4", format="gguf", gguf_head="q4_0")
    path = tmp_path / "h4" / res["file"]
    assert res["head"] == "q4_0" and (res["llama_cpp_check"].startswith("loaded")
                                      or "not installed" in res["llama_cpp_check"])
    out = next(t for t in open_reader(path).tensors if t.name == "output.weight")
    assert out.tensor_type == gguf.GGMLQuantizationType.Q4_0
    head = dict(GPTQCheckpoint.open(gptq_dir).tensors())["lm_head.weight"].float().numpy()
    d, q = _rtn_q4_0(head)
    raw = np.asarray(out.data).reshape(-1, 18)
    assert np.array_equal(raw[:, :2].copy().view(np.float16)[:, 0], d)
    assert np.array_equal(np.concatenate([raw[:, 2:] & 0xF, raw[:, 2:] >> 4], axis=1), q)
    (default,) = gguf_export[0].glob("*.gguf")
    assert next(t for t in open_reader(default).tensors if t.name == "output.weight").tensor_type == \
        gguf.GGMLQuantizationType.Q5_0
    assert bytes_per_token(path)["bytes_per_token"] < bytes_per_token(default)["bytes_per_token"]
    assert origin(path)["origin"] == "tangquant"
    res8 = export(gptq_dir, tmp_path / "h8", format="gguf", gguf_head="q8_0", llama_check=False)
    out8 = next(t for t in open_reader(tmp_path / "h8" / res8["file"]).tensors if t.name == "output.weight")
    assert out8.tensor_type == gguf.GGMLQuantizationType.Q8_0


def test_llamacpp_rows_record_buffers_origin_and_kv_options(tmp_path, gguf_export):
    """Every llamacpp row says where the weights went (buffer types, repacked layouts), llama.cpp's
    system info, the AMX verdict and who made the file; KV-cache types and flash attention reach
    llama.cpp, and a quantized V cache without flash attention is a failed row saying so."""
    pytest.importorskip("llama_cpp", reason=NO_LLAMA)
    from tangquant.bench import bench
    from tangquant.gguf import amx as _amx
    from tangquant.measure.anchor import quantize

    (ours,) = gguf_export[0].glob("*.gguf")
    theirs = tmp_path / "requant-Q4_0.gguf"  # llama-quantize of tangquant's file, as the anchor makes
    quantize(ours, theirs, "q4_0", threads=1, requantize=True)
    res = bench([f"tq=llamacpp:{ours}", f"lq=llamacpp:{theirs},ctk=q8_0,ctv=q8_0,fa=1",
                 f"nofa=llamacpp:{ours},ctv=q4_0,fa=0"], prompt_tokens=16, gen_tokens=4, repetitions=1,
                threads=(1,), bandwidth_mb=16, results_dir=str(tmp_path / "r.jsonl"))
    tq, lq, nofa = res["records"]
    assert tq["status"] == lq["status"] == "ok", (tq.get("error"), lq.get("error"))
    assert tq["origin"] == "tangquant" and lq["origin"] == "llama-quantize" and nofa["origin"] == "tangquant"
    for row in (tq, lq):
        assert row["weights_path"] in ("AMX", "CPU_REPACK", "plain CPU") and row["buffer_types"]
        assert "AVX" in row["llama_cpp_system_info"] and row["amx"]["expected"]
    assert (tq["weights_path"] == "plain CPU") == (not tq["repacked_tensors"])
    assert (lq["cache_k"], lq["cache_v"], lq["flash_attn"]) == ("q8_0", "q8_0", "1")
    assert nofa["status"] == "failed" and "flash attention" in nofa["error"]
    if _amx.verdict(_amx.cpu_flags(), {"granted": False}, False)["reason"] == "this CPU has no AMX":
        assert "amx_fallback" not in tq and tq["amx"]["expected"] != "AMX"


def test_the_amx_probe_compares_the_repacked_path_with_the_plain_one(gguf_export):
    """The probe that guards an AMX row runs here on the paths this CPU has (CPU_REPACK against plain):
    a child process answers, the two paths agree, and each one's buffers are recorded."""
    pytest.importorskip("llama_cpp", reason=NO_LLAMA)
    from tangquant.measure.runners.llamacpp import amx_probe

    (path,) = gguf_export[0].glob("*.gguf")
    res = amx_probe(str(path), 1)
    assert res["ok"] and res["agree"] and res["correlation"] > 0.99, res
    assert res["repack_off"]["weights_path"] == "plain CPU" and res["repack_off"]["repacked_tensors"] == {}
    assert res["repack_on"]["weights_path"] in ("CPU_REPACK", "plain CPU", "AMX")
