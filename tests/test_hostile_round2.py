"""The hostile-input suite, round two (issue 30): what came after the first probe — GGUF files,
tune, bench options, ovms-repo, lm_eval task folders, signals, full disks — tried as an attacker
would. Every corrupted input is built at run time from the tiny fixtures; a refusal exits 2 with
one ``tangquant: error:`` line naming the culprit, leaves nothing behind and every input
byte-identical (``_hostile_fixtures.refused``). The server's classes are in
``test_hostile_serve.py``; the walk of every command's error paths is ``test_hostile_walk.py``.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
from _gptq_fixtures import make_rtn_gptq
from _hostile_fixtures import (copy, edit_json, fill_gguf_tensor, gguf_value_offset, leftovers, nan_in_ir,
                               refused, rewrite_gguf, set_tensor)

from tangquant.cli import main

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def rtn_gptq(tmp_path_factory, tiny_model_dir) -> Path:
    return make_rtn_gptq(tiny_model_dir, tmp_path_factory.mktemp("hostile2") / "gptq")


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory, rtn_gptq) -> Path:
    """The tiny GPTQ checkpoint as a Q4_0 GGUF (its tensors checked exact; llama.cpp not run)."""
    out = tmp_path_factory.mktemp("hostile2-gguf") / "gguf"
    assert main(["-q", "export", "--model", str(rtn_gptq), "--output", str(out), "--format", "gguf",
                 "--no-llama-check"]) == 0
    return next(out.glob("*.gguf"))


@pytest.fixture(scope="module")
def ir(tmp_path_factory, tiny_model_dir) -> Path:
    from _serve_fixtures import tiny_ir

    return tiny_ir(tmp_path_factory, tiny_model_dir)


def _data(tmp_path: Path) -> Path:
    data = tmp_path / "data.txt"
    data.write_text("床前明月光，疑是地上霜。\n舉頭望明月，低頭思故鄉。\n" * 20, encoding="utf-8")
    return data


def _child(argv, **env) -> subprocess.Popen:
    """`tangquant ARGV` in its own session (a kill -9 of its group takes its workers too), with
    Ctrl-C's default action: pytest started in the background of a script inherits SIGINT ignored
    (POSIX), and tangquant rightly keeps an ignored signal ignored."""
    return subprocess.Popen([sys.executable, "-m", "tangquant", *map(str, argv)], cwd=ROOT,
                            env={**os.environ, "PYTHONPATH": str(ROOT), **env}, start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for(predicate, proc: subprocess.Popen, timeout: float = 120) -> None:
    end = time.monotonic() + timeout
    while not predicate():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < end, "timed out"
        time.sleep(0.1)


# 3. NaN at run time ---------------------------------------------------------------------------------

def test_non_finite_logits_are_refused_at_the_first_step(tmp_path, capsys, ir, tiny_model_dir, tiny_gguf):
    # chat on an IR with a NaN weight answered empty text with exit 0; on a merged model, noise.
    bad_ir = copy(ir, tmp_path / "ir")
    nan_in_ir(bad_ir, "layers.0.mlp.down_proj")
    refused(capsys, ["chat", "--model", bad_ir, "--prompt", "写一首唐诗", "--temperature", "0"],
            str(bad_ir), "NaN or Inf logits", inputs=[bad_ir])
    bad_hf = copy(tiny_model_dir, tmp_path / "hf")
    set_tensor(bad_hf, "model.layers.0.input_layernorm.weight", lambda t: t.fill_(math.nan))
    refused(capsys, ["chat", "--model", bad_hf, "--prompt", "写一首唐诗"], str(bad_hf), "NaN or Inf logits")
    # The probe's case: one NaN in a norm, and llama.cpp's 8-bit activations hide it from the logits
    # (bench reported it "ok" with speeds); the warm-up now reads the weights too.
    gdir = tmp_path / "g"
    gdir.mkdir()
    bad_gguf = Path(shutil.copy(tiny_gguf, gdir / tiny_gguf.name))
    fill_gguf_tensor(bad_gguf, "blk.0.attn_norm.weight", math.nan)
    results = tmp_path / "results"
    rc = main(["bench", "--candidate", f"g=llamacpp:{bad_gguf}", "--candidate", f"ir=ov:{bad_ir}",
               "-p", "8", "-n", "4", "-r", "1", "--bandwidth-mb", "8", "--results", str(results)])
    gguf_row, ir_row = [json.loads(line) for line in (results / "bench.jsonl").read_text().splitlines()]
    assert rc == 1 and gguf_row["status"] == ir_row["status"] == "failed", (gguf_row, ir_row)
    assert "blk.0.attn_norm.weight" in gguf_row["error"] and "NaN or Inf" in gguf_row["error"]
    assert str(bad_ir) in ir_row["error"] and "NaN or Inf logits" in ir_row["error"], ir_row["error"]
    assert "tg_tps" not in gguf_row and "tg_tps" not in ir_row and not leftovers(results)


# 4 and 5. Sizes trusted; GGUF metadata not checked against its tensors ---------------------------------

def test_counts_read_from_a_file_are_capped_by_its_tensors(tmp_path, capsys, tiny_model_dir, rtn_gptq, tiny_gguf):
    out = tmp_path / "out"
    # A config claiming 10⁹ layers hung `export --format gguf` (gguf-py's name map of 10⁹ blocks).
    gptq = copy(rtn_gptq, tmp_path / "gptq")
    edit_json(gptq / "config.json", num_hidden_layers=10**9)
    for fmt in ("gguf", "openvino"):
        refused(capsys, ["export", "--model", gptq, "--output", out, "--format", fmt],
                "1000000000 layers", inputs=[gptq], outputs=[out])
    hf = copy(tiny_model_dir, tmp_path / "hf")
    for change, needle in (({"num_hidden_layers": 10**9}, "1000000000 layers"),
                           ({"vocab_size": 10**9}, "embed_tokens"), ({"hidden_size": 64}, "embed_tokens"),
                           ({"num_attention_heads": 3}, "attention heads"),
                           ({"num_key_value_heads": 2, "num_attention_heads": 8}, "k_proj"),
                           ({"intermediate_size": 10**6}, "up_proj"),
                           ({"max_position_embeddings": 10**12}, "context"),
                           ({"num_hidden_layers": "2"}, "positive integer")):
        edit_json(hf / "config.json", **{**json.loads((tiny_model_dir / "config.json").read_text()), **change})
        refused(capsys, ["quantize", "--model", hf, "--output", out, "--algo", "rtn"], needle, str(hf),
                inputs=[hf], outputs=[out])
    # A GGUF claiming block_count 10⁹ ran eval out of memory under a 3 GB cap; here it is refused
    # in a child held to 6 GB of address space, so a regression cannot take the machine down.
    huge = rewrite_gguf(tiny_gguf, tmp_path / "blocks.gguf", {"qwen2.block_count": 10**9})
    code = ("import resource, sys\nresource.setrlimit(resource.RLIMIT_AS, (6 << 30, 6 << 30))\n"
            "from tangquant.cli import main\nsys.exit(main(sys.argv[1:]))\n")
    proc = subprocess.run([sys.executable, "-c", code, "eval", "--model", huge, "--reference",
                           tiny_model_dir, "--data", _data(tmp_path)], cwd=ROOT, capture_output=True,
                          text=True, env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=300)
    assert proc.returncode == 2 and "1000000000 layers" in proc.stderr, proc.stderr[-2000:]
    # An array length in the header that the file cannot hold: gguf-py would make 10⁹ objects.
    long_array = Path(shutil.copy(tiny_gguf, tmp_path / "array.gguf"))
    with open(long_array, "r+b") as f:
        f.seek(gguf_value_offset(long_array, "tokenizer.ggml.token_type") + 4)
        f.write(struct.pack("<Q", 10**9))
    refused(capsys, ["eval", "--model", long_array, "--reference", tiny_model_dir, "--data", "/dev/null"],
            "array length", str(long_array), inputs=[long_array])


def test_gguf_metadata_is_checked_against_its_tensors(tmp_path, capsys, tiny_model_dir, tiny_gguf):
    import gguf

    tokens = gguf.GGUFReader(str(tiny_gguf)).get_field("tokenizer.ggml.tokens").contents()
    variants = {"no head count": ({}, ("qwen2.attention.head_count",), "head_count"),
                "wrong embedding size": ({"qwen2.embedding_length": 256}, (), "token_embd"),
                "short token list": ({"tokenizer.ggml.tokens": tokens[:100]}, (), "token_embd"),
                "no token list": ({}, ("tokenizer.ggml.tokens",), "tokenizer.ggml.tokens"),
                "KV heads that do not divide": ({"qwen2.attention.head_count_kv": 3}, (), "KV heads"),
                "feed-forward size": ({"qwen2.feed_forward_length": 512}, (), "up_proj"),
                "context beyond any model": ({"qwen2.context_length": 2**31}, (), "context"),
                "no context length": ({}, ("qwen2.context_length",), "context_length")}
    data = _data(tmp_path)
    for i, (name, (changes, drop, needle)) in enumerate(variants.items()):
        bad = rewrite_gguf(tiny_gguf, tmp_path / f"v{i}.gguf", changes, drop)
        line = refused(capsys, ["eval", "--model", bad, "--reference", tiny_model_dir, "--data", data],
                       str(bad), inputs=[bad])
        assert needle.replace("token_embd", "embed_tokens") in line or needle in line, (name, line)
    # The unchanged copy still reads (the checks refuse only what disagrees).
    from tangquant import load

    same = rewrite_gguf(tiny_gguf, tmp_path / "same.gguf")
    assert load.inspect(same, kinds=("gguf",)).config["num_hidden_layers"] == 2


# 6. tune --apply claims nothing and checks nothing first -------------------------------------------

def test_tune_apply_claims_the_ir_and_leaves_nothing(tmp_path, capsys, ir):
    from tangquant import claim
    from tangquant.measure.search import SCRATCH

    work = copy(ir, tmp_path / "ir")
    tune = ["tune", "--model", work, "--axes", "kv", "-p", "8", "-n", "4", "-r", "1", "--confirm", "0",
            "--results", tmp_path / "r.jsonl"]
    # Two runs on one IR both "succeeded": the second is refused at once, naming the first.
    with claim.claim(work):
        refused(capsys, tune + ["--apply"], "is writing", str(os.getpid()), inputs=[work])
    assert not (tmp_path / "r.jsonl").exists()
    # kill -9 in the middle of the search left /tmp/tangquant-tune-* for good: its directory is
    # now claimed like an output, so `tangquant clean` (or the next tune) removes it.
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    proc = _child(tune + ["--apply"], TMPDIR=str(scratch))
    _wait_for(lambda: any(".tmp-" in p.name for p in scratch.iterdir()), proc)
    os.killpg(proc.pid, signal.SIGKILL)  # the tune and its worker: no cleanup can run
    proc.wait()
    assert any(SCRATCH in n for n in leftovers(scratch))
    assert main(["clean", str(scratch)]) == 0 and leftovers(scratch) == []
    # SIGTERM in the middle of the search: 143, the scratch directory and the claim gone, IR untouched.
    before = (work / "openvino_model.xml").read_bytes()
    proc = _child(tune + ["--apply"], TMPDIR=str(scratch))
    _wait_for(lambda: any(".tmp-" in p.name for p in scratch.iterdir()), proc)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 143, proc.communicate()
    assert leftovers(scratch) == [] and leftovers(tmp_path) == []
    assert (work / "openvino_model.xml").read_bytes() == before


# 7. --tasks-dir runs the folder's code -------------------------------------------------------------

def test_a_task_folders_code_runs_only_when_trusted(tmp_path, capsys, tiny_model_dir):
    from tangquant import lmtasks

    ours = copy(lmtasks.ASSET_DIR, tmp_path / "ours")
    assert lmtasks.foreign_code(ours) == []  # what tangquant (data --lm-eval-items) writes runs as is
    evil = copy(lmtasks.ASSET_DIR, tmp_path / "evil")
    marker = tmp_path / "ran"
    with open(evil / "utils.py", "a", encoding="utf-8") as f:
        f.write(f"\nopen({str(marker)!r}, 'w').write('code from a data folder ran')\n")
    jinja = copy(lmtasks.ASSET_DIR, tmp_path / "jinja")
    yaml = jinja / "tang_couplet_traditional.yaml"
    yaml.write_text(yaml.read_text().replace("doc_to_text: context",
                                             "doc_to_text: \"{{ cycler.__init__.__globals__.os }}\""))
    evaluate = ["eval", "--model", tiny_model_dir, "--reference", copy(tiny_model_dir, tmp_path / "ref"),
                "--tasks", "tang_couplet", "--limit", "1"]
    refused(capsys, evaluate + ["--tasks-dir", evil], "utils.py", "--trust-tasks-code", inputs=[evil])
    refused(capsys, evaluate + ["--tasks-dir", jinja], "tang_couplet_traditional.yaml", "--trust-tasks-code")
    assert not marker.exists()
    # Behind the flag it runs: the folder's own loader, and the hook with it.
    assert main([str(a) for a in evaluate + ["--tasks-dir", evil, "--trust-tasks-code"]]) == 0, \
        capsys.readouterr().err
    assert marker.read_text() == "code from a data folder ran"


# 8. bench, signals, full disks ---------------------------------------------------------------------

def test_bench_refuses_before_it_runs_and_keeps_no_partial(tmp_path, capsys, ir, tiny_gguf):
    results = tmp_path / "results"
    for candidate, needle in ((f"x=ov:{ir},cache_size=abc", "cache_size"),
                              (f"x=llamacpp:{tiny_gguf},repack=banana", "repack"),
                              (f"x=ov:{ir},lora_mode=static_rank", "lora_mode"),  # ov+lora's, not ov's
                              (f"x=ov:{ir},INFERENCE_NUM_THREADS=", "INFERENCE_NUM_THREADS")):
        refused(capsys, ["bench", "--candidate", candidate, "--results", results], needle, inputs=[ir])
        assert not results.exists()
    # Stopped before its first measurement (in the bandwidth run): 130 and no `.partial`.
    proc = _child(["bench", "--candidate", f"x=llamacpp:{tiny_gguf}", "-p", "8", "-n", "4", "-r", "1",
                   "--bandwidth-mb", "256", "--results", results])
    _wait_for(lambda: results.is_dir() and any(p.suffix == ".partial" for p in results.iterdir()), proc)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=60) == 130
    assert list(results.iterdir()) == []


@pytest.mark.fast
def test_a_signal_inside_a_converting_library_is_raised_back_in_tangquant():
    """A stop signal raised inside a Python callback that OpenVINO's or optimum-intel's C++ runs
    became their RuntimeError (exit 2) or aborted the process: it is held until control is back
    in tangquant's own code, and raised there; a second signal is raised at once."""
    from tangquant import interrupt

    done = []
    library = {"__name__": "optimum.exporters.fake"}  # a frame of a converting library
    exec("def convert(stop, sig, frame_of, done):\n    stop(sig, frame_of())\n    done.append('converted')\n"
         "    return 'ir'\n", library)
    ours = {"__name__": "tangquant.fake"}
    exec("def export(convert, *args):\n    ir = convert(*args)\n    args[-1].append('published')\n"
         "    return ir\n", ours)
    stop = interrupt.Stop()
    try:
        with pytest.raises(KeyboardInterrupt):
            ours["export"](library["convert"], stop, signal.SIGTERM, sys._getframe, done)
    finally:
        stop.restore()
    assert done == ["converted"] and stop.signum == signal.SIGTERM and stop.exit_code == 143
    assert sys.gettrace() is None
    exec("def twice(stop, sig, frame_of):\n    stop(sig, frame_of())\n    stop(sig, frame_of())\n", library)
    stop = interrupt.Stop()
    try:
        with pytest.raises(KeyboardInterrupt):  # Ctrl-C pressed twice: raised inside the library
            library["twice"](stop, signal.SIGINT, sys._getframe)
    finally:
        stop.restore()
    assert stop.exit_code == 130 and sys.gettrace() is None


@pytest.mark.slow
def test_sigterm_in_the_openvino_conversion_is_an_interrupt(tmp_path, rtn_gptq):
    """optimum-intel's trace calls back into Python: the KeyboardInterrupt SIGTERM raises came back
    as a RuntimeError, then "export failed" with exit 2. It is an interrupt: 143, nothing left."""
    out = tmp_path / "ir"
    proc = _child(["export", "--model", rtn_gptq, "--output", out])

    def staging() -> Path | None:  # the fp16 model optimum-intel converts lives here until it is done
        found = list(tmp_path.glob(".ir.tmp-*/.staging/hf/config.json"))
        return found[0].parent if found else None

    _wait_for(lambda: staging() is not None, proc)
    time.sleep(2)  # inside the conversion (about 14 s on 2 cores)
    assert staging() is not None and not list(tmp_path.glob(".ir.tmp-*/.staging/ir/*.xml"))
    proc.send_signal(signal.SIGTERM)
    err = proc.communicate(timeout=120)[1]
    assert proc.returncode == 143 and "interrupted (SIGTERM)" in err and "error" not in err, err
    assert not out.exists() and leftovers(tmp_path) == []


# 9. ovms-repo ----------------------------------------------------------------------------------------

def test_ovms_repo_refuses_junk_options_and_reserved_names(tmp_path, capsys, ir):
    from tangquant.ov import runtime

    out = tmp_path / "repo"
    junk = copy(ir, tmp_path / "junk")
    runtime.write(junk, {**runtime.read(junk), "KV_CACHE_PRECISION": "banana"})
    refused(capsys, ["ovms-repo", "--model", junk, "--output", out], "KV_CACHE_PRECISION", "banana",
            inputs=[junk], outputs=[out])
    refused(capsys, ["ovms-repo", "--model", ir, "--ov-config", "INFERENCE_NUM_THREADS=-5", "--output", out],
            "INFERENCE_NUM_THREADS", outputs=[out])
    for name in ("config.json", "tangquant.json"):  # was "writing … failed (Is a directory)"
        line = refused(capsys, ["ovms-repo", "--model", f"{name}={ir}", "--output", out], name,
                       outputs=[out])
        assert "disk" not in line and "failed" not in line


# 10. Left from the first probe ------------------------------------------------------------------------

def test_what_the_first_probe_left_is_exit_2(tmp_path, capsys, tiny_model_dir, qv_adapter_dir):
    huge = str(10**30)
    refused(capsys, ["chat", "--model", tiny_model_dir, "--prompt", "x", "--seed", huge], "seed")
    refused(capsys, ["quantize", "--model", tiny_model_dir, "--output", tmp_path / "q", "--seed", "-1"],
            "seed", outputs=[tmp_path / "q"])
    refused(capsys, ["eval", "--model", tiny_model_dir, "--reference", tiny_model_dir, "--data", "/dev/null",
                     "--num-samples", huge], "num_samples")
    # An adapter made for another shape: peft's state-dict error was "probably a bug".
    other = copy(qv_adapter_dir, tmp_path / "other")
    lora_a = next(k for k in json.loads(_header(other / "adapter_model.safetensors")) if "lora_A" in k)
    set_tensor(other, lora_a, lambda t: t[:, :64].contiguous())
    refused(capsys, ["chat", "--model", tiny_model_dir, "--adapter", other, "--prompt", "x"], "q_proj",
            "[128, 64]", inputs=[other])
    # A corpus file whose poem has `paragraphs: 5`.
    corpus = tmp_path / "poetry" / "全唐诗"
    corpus.mkdir(parents=True)
    (corpus / "poet.tang.0.json").write_text(json.dumps([{"title": "x", "author": "y", "paragraphs": 5}]))
    refused(capsys, ["data", "--poetry", corpus.parent, "--output", tmp_path / "d"], "poet.tang.0.json",
            "paragraphs", outputs=[tmp_path / "d"])


def _header(path: Path) -> str:
    raw = path.read_bytes()
    return raw[8:8 + struct.unpack("<Q", raw[:8])[0]].decode()
