"""The hostile-input suite (issue 18): one test per class of fault, several variants each.

Every corrupted input is built at run time from the tiny fixtures. A refusal must exit 2 with
one ``tangquant: error:`` line that names the offending file or value, leave nothing behind
(no output, no temporary) and leave every input byte-identical. The server's class (idle and
half-sent connections) is in ``test_hostile_serve.py``.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from _gptq_fixtures import make_rtn_gptq
from _hostile_fixtures import (copy, corrupt_shard, edit_json, leftovers, refused, set_tensor,
                               shard_of)
from conftest import tree_digest

from tangquant.cli import main

ROOT = Path(__file__).resolve().parent.parent
DOWN_SCALES = "model.layers.1.mlp.down_proj.scales"


@pytest.fixture(scope="module")
def rtn_gptq(tmp_path_factory, tiny_model_dir) -> Path:
    """A GPTQ checkpoint of the tiny model (round-to-nearest in torch: no INC run needed)."""
    return make_rtn_gptq(tiny_model_dir, tmp_path_factory.mktemp("hostile") / "gptq")


def merge_argv(base, adapter, out, *extra):
    return [str(a) for a in ("merge", "--model", base, "--adapter", adapter, "--output", out, *extra)]


def run(argv) -> int:
    return main([str(a) for a in argv])


# 1. Paths inside a model escape it ----------------------------------------------------------------

def test_paths_that_escape_a_model_are_refused(tmp_path, capsys, tiny_model_dir, qv_adapter_dir,
                                               rtn_gptq):
    out = tmp_path / "out"
    outside = qv_adapter_dir / "adapter_model.safetensors"

    def index_entry(base, _, name):
        index = base / "model.safetensors.index.json"
        edit_json(index, weight_map={**json.loads(index.read_text())["weight_map"], "model.norm.weight": name})

    variants = {  # name: damage(base copy, adapter copy)
        # the probe's case: the index sends a weight to another directory's file
        "index entry ../": lambda b, a: index_entry(b, a, os.path.relpath(outside, b)),
        "index entry absolute": lambda b, a: index_entry(b, a, str(outside)),
        "shard is a symlink out": lambda b, a: _relink(sorted(b.glob("*.safetensors"))[0], outside),
        "tokenizer.json is a symlink out": lambda b, a: _relink(b / "tokenizer.json", Path("/etc/hostname")),
        "chat_template.jinja is a symlink out": lambda b, a: _relink(b / "chat_template.jinja",
                                                                     qv_adapter_dir / "README.md"),
        "config.json is a symlink out": lambda b, a: _relink(b / "config.json", tiny_model_dir / "config.json"),
        "a directory symlink out": lambda b, a: os.symlink(tmp_path.parent, b / "extra"),
        "adapter weights are a symlink out": lambda b, a: _relink(a / "adapter_model.safetensors", outside),
        "adapter config is a symlink out": lambda b, a: _relink(a / "adapter_config.json",
                                                               qv_adapter_dir / "adapter_config.json"),
    }
    for i, (name, damage) in enumerate(variants.items()):
        base, adapter = copy(tiny_model_dir, tmp_path / f"base{i}"), copy(qv_adapter_dir, tmp_path / f"adapter{i}")
        damage(base, adapter)
        line = refused(capsys, merge_argv(base, adapter, out), "outside", inputs=[base, adapter],
                       outputs=[out])
        assert str(base) in line or str(adapter) in line, (name, line)
    # The same resolver guards every reader: a GPTQ export, eval, chat.
    gptq = copy(rtn_gptq, tmp_path / "gptq")
    _relink(gptq / "tokenizer.json", Path("/etc/hostname"))
    refused(capsys, ["export", "--model", gptq, "--output", out], "outside", inputs=[gptq], outputs=[out])
    refused(capsys, ["eval", "--model", gptq, "--reference", tiny_model_dir, "--data", "/dev/null"],
            "outside", inputs=[gptq])
    refused(capsys, ["chat", "--model", tmp_path / "base3", "--prompt", "x"], "tokenizer.json", "outside")
    # A Hugging Face cache snapshot links into ../../blobs of its own repository: that is inside.
    repo = tmp_path / "hub" / "models--Qwen--tiny"
    snap = repo / "snapshots" / "0123abcd"
    snap.mkdir(parents=True)
    (repo / "blobs").mkdir()
    for f in tiny_model_dir.iterdir():
        blob = repo / "blobs" / hashlib.sha256(f.read_bytes()).hexdigest()  # as huggingface_hub names them
        blob.write_bytes(f.read_bytes())
        os.symlink(os.path.relpath(blob, snap), snap / f.name)
    assert main(merge_argv(snap, qv_adapter_dir, out, "--dtype", "fp32")) == 0, capsys.readouterr().err
    assert sorted(p.name for p in out.glob("*.safetensors")) == sorted(p.name for p in snap.glob("*.safetensors"))


def _relink(path: Path, target: Path) -> None:
    if path.exists() or path.is_symlink():
        path.unlink()
    os.symlink(target, path)


# 2. Non-finite values -------------------------------------------------------------------------------

def test_nan_and_inf_are_never_published(tmp_path, capsys, tiny_model_dir, qv_adapter_dir, rtn_gptq):
    import torch

    out = tmp_path / "out"
    data = tmp_path / "data.txt"
    data.write_text("床前明月光，疑是地上霜。\n\n舉頭望明月，低頭思故鄉。\n" * 20, encoding="utf-8")
    # The probe's case: one NaN in a down_proj.scales exported "verified".
    for i, (tensor, value) in enumerate(((DOWN_SCALES, math.nan), ("model.embed_tokens.weight", math.inf),
                                         ("model.norm.weight", -math.inf))):
        bad = copy(rtn_gptq, tmp_path / f"gptq{i}")
        set_tensor(bad, tensor, lambda t, v=value: t.view(-1).index_fill_(0, torch.tensor([3]), v).view(t.shape))
        refused(capsys, ["export", "--model", bad, "--output", out], tensor, "NaN or Inf",
                inputs=[bad], outputs=[out])
        refused(capsys, ["eval", "--model", bad, "--reference", tiny_model_dir, "--data", data,
                         "--seq-len", "32", "--num-samples", "1"], tensor, inputs=[bad])
    # A base with a NaN norm, an adapter with a NaN B, a delta that overflows fp16.
    base = copy(tiny_model_dir, tmp_path / "base")
    set_tensor(base, "model.norm.weight", lambda t: t.fill_(math.nan))
    refused(capsys, merge_argv(base, qv_adapter_dir, out), "model.norm.weight", inputs=[base], outputs=[out])
    adapter = copy(qv_adapter_dir, tmp_path / "adapter")
    lora_b = next(k for k in _names(adapter / "adapter_model.safetensors") if "lora_B" in k)
    set_tensor(adapter, lora_b, lambda t: t.fill_(math.nan))
    refused(capsys, merge_argv(tiny_model_dir, adapter, out), lora_b, inputs=[adapter], outputs=[out])
    huge = copy(qv_adapter_dir, tmp_path / "huge")
    set_tensor(huge, lora_b, lambda t: t.fill_(1e30))
    refused(capsys, merge_argv(tiny_model_dir, huge, out, "--dtype", "fp16"), "merged tensor",
            inputs=[huge], outputs=[out])
    # A model that reads fine but computes NaN: eval reports no metric rather than "KL nan".
    nan_hf = copy(tiny_model_dir, tmp_path / "nan-hf")
    set_tensor(nan_hf, "model.layers.0.input_layernorm.weight", lambda t: t.fill_(math.nan))
    json_out = tmp_path / "m.json"
    refused(capsys, ["eval", "--model", nan_hf, "--reference", tiny_model_dir, "--data", data,
                     "--seq-len", "32", "--num-samples", "2", "--json", json_out],
            "logits", inputs=[nan_hf, data], outputs=[json_out])
    from tangquant.errors import NumericalError
    from tangquant.measure.kl import compare

    lp = torch.log_softmax(torch.randn(4, 8), dim=-1)
    with pytest.raises(NumericalError, match="kld"):
        compare([lp.clone().fill_(math.nan)], [lp], [torch.arange(5)])


def _names(path: Path) -> list[str]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return list(f.keys())


# 3. Inputs overwritten by a file an option writes ---------------------------------------------------

def test_option_files_never_replace_an_input_or_an_existing_file(tmp_path, capsys, tiny_model_dir):
    data = tmp_path / "calib.json"
    data.write_text(json.dumps([{"text": "床前明月光，疑是地上霜。" * 8}] * 8, ensure_ascii=False))
    linked = tmp_path / "linked.json"
    os.link(data, linked)
    existing = tmp_path / "old.json"
    existing.write_text("{}")
    adir = tmp_path / "a-dir"
    adir.mkdir()
    evaluate = ["eval", "--model", tiny_model_dir, "--reference", tiny_model_dir, "--data", data,
                "--seq-len", "16", "--num-samples", "1", "--json"]
    refused(capsys, evaluate + [data], "same as or inside the input", inputs=[data, tiny_model_dir])
    refused(capsys, evaluate + [linked], "same as or inside the input", inputs=[data])
    refused(capsys, evaluate + [tiny_model_dir / "metrics.json"], "inside the input",
            inputs=[tiny_model_dir], outputs=[tiny_model_dir / "metrics.json"])
    refused(capsys, evaluate + [existing], "--force", inputs=[existing])
    refused(capsys, evaluate + [adir], "is a directory", inputs=[adir])
    assert run(evaluate + [existing, "--force"]) == 0
    assert "kld" in json.loads(existing.read_text()) and not leftovers(tmp_path)
    capsys.readouterr()
    # bench: the JSONL is appended to (by design) but never inside an input; the plot is guarded
    # like any output; all of it is checked before the first measurement.
    cand = ["bench", "--candidate", f"m=torch:{tiny_model_dir}", "-p", "8", "-n", "4", "-r", "1"]
    refused(capsys, cand + ["--results", tiny_model_dir], "inside the input", inputs=[tiny_model_dir])
    refused(capsys, cand + ["--results", tiny_model_dir / "config.json"], "same as or inside",
            inputs=[tiny_model_dir])
    old_plot = tmp_path / "old.png"
    old_plot.write_bytes(b"\x89PNG")
    refused(capsys, cand + ["--results", tmp_path, "--plot", old_plot], "--force", inputs=[old_plot])
    refused(capsys, cand + ["--results", tmp_path, "--plot", tiny_model_dir / "plot.png"], "inside the input",
            inputs=[tiny_model_dir])
    refused(capsys, cand + ["--results", tmp_path, "--plot", tmp_path / "plot.exe"], "must end in")
    assert not (tmp_path / "bench.jsonl").exists()


# 4. Two runs race for one output ------------------------------------------------------------------------

HOLD = ("import sys, time\nfrom pathlib import Path\nfrom tangquant import files\n"
        "with files.atomic_output_dir(Path(sys.argv[1])) as tmp:\n"
        "    (tmp / 'partial').write_text('x'); print('ready', flush=True); time.sleep(120)\n")


def _holder(out: Path) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(out)], stdout=subprocess.PIPE, text=True,
                            env=env)
    assert proc.stdout.readline().strip() == "ready"
    return proc


def test_a_second_run_to_the_same_output_is_refused(tmp_path, capsys, tiny_model_dir, qv_adapter_dir):
    from tangquant import files
    from tangquant.errors import OutputExistsError

    out = tmp_path / "merged"
    holder = _holder(out)  # another run is building `merged`
    try:
        line = refused(capsys, merge_argv(tiny_model_dir, qv_adapter_dir, out), "is writing",
                       str(holder.pid), inputs=[tiny_model_dir, qv_adapter_dir])
        assert not out.exists() and "right now" in line
        assert main(["clean", str(tmp_path)]) == 0  # never removes what a live run builds
        assert len([p for p in tmp_path.iterdir() if ".tmp-" in p.name]) == 1
    finally:
        holder.kill()
        holder.wait()
    capsys.readouterr()
    # The run that checked before the other finished still does not replace its output.
    files.check_output(out, [], force=False)
    out.mkdir()
    (out / "first").write_text("the first run's model")
    with pytest.raises(OutputExistsError, match="meanwhile"):
        with files.atomic_output_dir(out):
            pass
    assert (out / "first").read_text() == "the first run's model"
    # And a file option (eval --json) is claimed the same way.
    report = tmp_path / "report.json"
    holder = _holder(report)
    try:
        with pytest.raises(OutputExistsError, match="is writing"):
            with files.atomic_output_file(report):
                pass
    finally:
        holder.kill()
        holder.wait()


# 5. Resource bombs ------------------------------------------------------------------------------------

def test_resource_bombs_are_bounded(tmp_path, capsys, tiny_model_dir, qv_adapter_dir, tiny_tokenizer):
    out = tmp_path / "out"
    # The probe's 394-byte alias bomb inside a known key, a recipe over 1 MiB, deep nesting.
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text("a: &a [x,x,x,x,x,x,x,x,x]\nb: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a]\n"
                    "c: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b]\nd: &d [*c,*c,*c,*c,*c,*c,*c,*c,*c]\n"
                    "dtype: [*d,*d,*d,*d,*d,*d,*d,*d,*d]\n")
    big = tmp_path / "big.yaml"
    big.write_text("dtype: fp32\n" + "#" * (1 << 20) + "\n")
    deep = tmp_path / "deep.yaml"
    deep.write_text("dtype: " + "[" * 50_000 + "]" * 50_000 + "\n")
    merge = merge_argv(tiny_model_dir, qv_adapter_dir, out)
    refused(capsys, merge + ["--recipe", bomb], "aliases", str(bomb), outputs=[out])
    refused(capsys, merge + ["--recipe", big], "larger than", outputs=[out])
    refused(capsys, merge + ["--recipe", deep], "nested too deeply", outputs=[out])
    # Deep or oversized JSON where a model keeps its config.
    base = copy(tiny_model_dir, tmp_path / "base")
    (base / "config.json").write_text("[" * 100_000 + "]" * 100_000)
    refused(capsys, ["merge", "--model", base, "--adapter", qv_adapter_dir, "--output", out],
            "config.json", "nested too deeply", inputs=[base], outputs=[out])
    with open(base / "config.json", "wb") as f:
        f.truncate(65 << 20)  # sparse: 65 MiB of zeros, no disk written
    refused(capsys, ["merge", "--model", base, "--adapter", qv_adapter_dir, "--output", out],
            "config.json", "larger than", outputs=[out])
    deep_data = tmp_path / "deep.json"
    deep_data.write_text("[" * 100_000 + "]" * 100_000)
    refused(capsys, ["eval", "--model", tiny_model_dir, "--reference", tiny_model_dir, "--data", deep_data],
            str(deep_data), "nested too deeply", inputs=[deep_data])
    # The probe's 20 MB one-line calibration file: only what 4 × 64 tokens need is tokenized.
    from tangquant.calib import MIN_CUT_CHARS, load_documents, pack

    line = tmp_path / "one-line.txt"
    line.write_text("床前明月光疑是地上霜舉頭望明月低頭思故鄉" * (20_000_000 // 60), encoding="utf-8")
    seen = []

    class Counting:  # the real tokenizer, with the length of every text it is given recorded
        chat_template = None

        def __call__(self, text, **kwargs):
            seen.append(len(text))
            return tiny_tokenizer(text, **kwargs)

    packed = pack(load_documents(line), Counting(), seq_len=64, num_samples=4, seed=0)
    assert packed.tokens == 256 and max(seen) <= MIN_CUT_CHARS < line.stat().st_size // 100


# 7. Running past the model's context, and sampling values no backend takes -------------------------

def test_generation_never_runs_past_the_context(tmp_path, capsys, tiny_model_dir):
    from tangquant.generate import Sampling, open_generator

    short = copy(tiny_model_dir, tmp_path / "short")
    edit_json(short / "config.json", max_position_embeddings=96)
    chat = ["chat", "--model", short, "--prompt", "写一首唐诗", "--temperature", "0"]
    assert run(chat + ["--max-new-tokens", "100000000"]) == 0
    captured = capsys.readouterr()
    assert "capped at the model's context of 96 tokens" in captured.err
    generator = open_generator(short)
    msgs = [{"role": "user", "content": "写一首唐诗"}]
    n_prompt = len(generator.tokenizer.apply_chat_template(msgs, add_generation_prompt=True))
    assert generator._cap(n_prompt, Sampling(max_new_tokens=100_000_000)) == 96 - n_prompt
    refused(capsys, ["chat", "--model", short, "--prompt", "寫" * 200], "context is 96", inputs=[short])
    for flag, value in (("--temperature", "nan"), ("--temperature", "inf"), ("--top-p", "nan"),
                        ("--temperature", "-1"), ("--max-new-tokens", "0")):
        refused(capsys, ["chat", "--model", short, "--prompt", "x", flag, value], flag.strip("-").replace("-", "_"))
    nan_recipe = tmp_path / "chat.yaml"
    nan_recipe.write_text("temperature: .nan\n")
    refused(capsys, ["chat", "--model", short, "--prompt", "x", "--recipe", nan_recipe], "temperature")
    data = tmp_path / "d.txt"
    data.write_text("床前明月光\n" * 50, encoding="utf-8")
    refused(capsys, ["eval", "--model", short, "--reference", tiny_model_dir, "--data", data,
                     "--seq-len", "128"], "--seq-len 128", "96")
    refused(capsys, ["quantize", "--model", short, "--output", tmp_path / "q", "--algo", "rtn",
                     "--seq-len", "128"], "context", outputs=[tmp_path / "q"])
    refused(capsys, ["bench", "--candidate", f"s=torch:{short}", "-p", "80", "-n", "32",
                     "--results", tmp_path], "context of 96")


# 8. Checked too late ---------------------------------------------------------------------------------

def test_every_parameter_is_checked_before_the_first_write(tmp_path, capsys, tiny_model_dir,
                                                         qv_adapter_dir):
    import yaml

    work = tmp_path / "demo"
    refused(capsys, ["demo", "--workdir", work, "--max-new-tokens", "0"], "max_new_tokens", outputs=[work])
    refused(capsys, ["demo", "--workdir", work, "--max-new-tokens", "5000", "--no-bench"], "context",
            outputs=[work])
    q = tmp_path / "q"
    quantize = ["quantize", "--model", tiny_model_dir, "--output", q, "--export", "openvino"]
    refused(capsys, quantize + ["--algo", "rtn", "--bits", "8"], "4-bit", outputs=[q])
    refused(capsys, quantize + ["--act-order"], "act-order", outputs=[q])
    refused(capsys, quantize + ["--calib", tmp_path / "missing.json"], "missing.json", outputs=[q])
    # A pipeline recipe: whatever a later stage would refuse is refused before merge writes.
    base = {"base": str(tiny_model_dir), "adapter": str(qv_adapter_dir), "workdir": str(tmp_path / "w"),
            "quant_recipe": str(ROOT / "recipes" / "int4-rtn-g128.yaml"), "bench": False}
    for bad, needle in (({"quant_group_size": 96}, "does not divide"), ({"quant_bits": 8}, "4-bit"),
                        ({"quant_calib": str(tmp_path / "none.json")}, "none.json"),
                        ({"quant_percdamp": 2.0}, "percdamp"), ({"merge_dtype": "fp64"}, "dtype"),
                        ({"bench": True, "bench_prompt_tokens": 2000}, "context"),
                        ({"quant_seq_len": 4096}, "context")):
        path = tmp_path / "pipe.yaml"
        path.write_text(yaml.safe_dump({**base, **bad}))
        refused(capsys, ["run", path], needle, inputs=[tiny_model_dir, qv_adapter_dir],
                outputs=[tmp_path / "w"])


# 9. Tracebacks instead of one line ---------------------------------------------------------------------

@pytest.mark.parametrize("how", ["truncated", "bad-header-json", "header-length-beyond-file",
                                 "overlapping-offsets", "unknown-dtype", "empty"])
def test_corrupted_shards_are_one_line(how, tmp_path, capsys, tiny_model_dir, qv_adapter_dir, rtn_gptq):
    base = copy(tiny_model_dir, tmp_path / "base")
    shard = shard_of(base, "model.norm.weight")
    corrupt_shard(shard, how)
    out = tmp_path / "out"
    refused(capsys, merge_argv(base, qv_adapter_dir, out), shard.name, "corrupt or truncated",
            inputs=[base], outputs=[out])
    gptq = copy(rtn_gptq, tmp_path / "gptq")
    gshard = shard_of(gptq, DOWN_SCALES)
    corrupt_shard(gshard, how)
    refused(capsys, ["export", "--model", gptq, "--output", out], gshard.name, inputs=[gptq], outputs=[out])


def test_malformed_inputs_are_one_line(tmp_path, capsys, tiny_model_dir, qv_adapter_dir, rtn_gptq):
    import torch
    from safetensors.torch import load_file, save_file

    out = tmp_path / "out"
    # A rank-0 adapter (was ZeroDivisionError), lora_alpha 0 ("21 tensors merged" of nothing), B = 0.
    rank0 = copy(qv_adapter_dir, tmp_path / "rank0")
    edit_json(rank0 / "adapter_config.json", r=0)
    tensors = load_file(rank0 / "adapter_model.safetensors")
    save_file({k: v[:0] if "lora_A" in k else v[:, :0] for k, v in tensors.items()},
              rank0 / "adapter_model.safetensors")
    refused(capsys, merge_argv(tiny_model_dir, rank0, out), "r must be a positive integer", inputs=[rank0],
            outputs=[out])
    alpha0 = copy(qv_adapter_dir, tmp_path / "alpha0")
    edit_json(alpha0 / "adapter_config.json", lora_alpha=0)
    refused(capsys, merge_argv(tiny_model_dir, alpha0, out), "lora_alpha is 0", outputs=[out])
    untrained = copy(qv_adapter_dir, tmp_path / "untrained")
    save_file({k: torch.zeros_like(v) if "lora_B" in k else v for k, v in tensors.items()},
              untrained / "adapter_model.safetensors")
    refused(capsys, merge_argv(tiny_model_dir, untrained, out), "changes no weight", outputs=[out])
    # Malformed quantization_config values (bool("false") would be True).
    for change, needle in (({"bits": "4"}, "bits"), ({"group_size": 128.5}, "group_size"),
                           ({"sym": "false"}, "sym"), ({"desc_act": 1}, "desc_act"),
                           ({"checkpoint_format": 7}, "checkpoint_format")):
        gptq = copy(rtn_gptq, tmp_path / f"g-{next(iter(change))}")
        qc = json.loads((gptq / "config.json").read_text())["quantization_config"]
        edit_json(gptq / "config.json", quantization_config={**qc, **change})
        refused(capsys, ["export", "--model", gptq, "--output", out], needle, "config.json", outputs=[out])
    bad_scales = copy(rtn_gptq, tmp_path / "g-shape")
    set_tensor(bad_scales, DOWN_SCALES, lambda t: t[:1].contiguous())
    refused(capsys, ["export", "--model", bad_scales, "--output", out], "do not fit together", outputs=[out])
    # Invalid UTF-8 on the command line and in a tokenizer; an output under a regular file.
    refused(capsys, ["chat", "--model", tiny_model_dir, "--prompt", "詩\udcff"], "not valid UTF-8")
    broken_tok = copy(tiny_model_dir, tmp_path / "broken-tok")
    (broken_tok / "tokenizer.json").write_text('{"model": {"type": "BPE", "vocab": 7}}')
    refused(capsys, ["chat", "--model", broken_tok, "--prompt", "x"], "tokenizer", str(broken_tok))
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    refused(capsys, merge_argv(tiny_model_dir, qv_adapter_dir, blocker / "out"), "is a file",
            outputs=[blocker / "out"])
    # A pickle torch refuses even under --allow-pickle; an IR's .bin is not "pickle weights".
    pickled = copy(tiny_model_dir, tmp_path / "pickled")
    for f in pickled.glob("model*.safetensors*"):
        f.unlink()
    torch.save({"model.norm.weight": torch.ones(128), "evil": _NotATensor()}, pickled / "pytorch_model.bin")
    refused(capsys, merge_argv(pickled, qv_adapter_dir, out, "--allow-pickle"), "pytorch_model.bin",
            "weights_only", outputs=[out])
    ir_bin = copy(tiny_model_dir, tmp_path / "half-ir")
    for f in ir_bin.glob("model*.safetensors*"):
        f.unlink()
    (ir_bin / "openvino_model.bin").write_bytes(b"\0" * 64)
    line = refused(capsys, ["chat", "--model", ir_bin, "--prompt", "x"], "incomplete OpenVINO IR")
    assert "pickle" not in line


class _NotATensor:
    pass


def test_an_ir_cut_in_half_is_one_line(tmp_path_factory, tmp_path, capsys, tiny_model_dir):
    from _serve_fixtures import tiny_ir

    ir = copy(tiny_ir(tmp_path_factory, tiny_model_dir), tmp_path / "ir")
    xml = ir / "openvino_model.xml"
    xml.write_bytes(xml.read_bytes()[: xml.stat().st_size // 2])
    refused(capsys, ["eval", "--model", ir, "--reference", tiny_model_dir, "--data", "/dev/null"],
            "openvino_model.xml", "not a complete XML file", inputs=[ir])
    refused(capsys, ["chat", "--model", ir, "--prompt", "x"], "openvino_model.xml")


@pytest.mark.fast
def test_an_unexpected_error_is_one_line_and_its_traceback_needs_v(capsys, monkeypatch):
    import tangquant.clean

    def boom(args):
        raise ValueError("a bug\nover two lines")

    monkeypatch.setattr(tangquant.clean, "run", boom)
    assert main(["clean"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unexpected ValueError: a bug" in err and "rerun with -v" in err
    assert main(["-v", "clean"]) == 1
    assert "Traceback" in capsys.readouterr().err


# What torch, torchao and triton print at import on a CPU-only install, and must not before an error.
NOISE = ("Traceback", "torchao", "triton", "register_constant", "Failed to load")
FAULTS = r"""
import contextlib, io, json, sys
from tangquant.cli import main
results = {}
for name, argv in json.loads(sys.argv[1]).items():
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        rc = main(argv)
    results[name] = [rc, err.getvalue()]
print(json.dumps(results))
"""


def test_full_disk_read_only_and_import_noise(tmp_path_factory, tmp_path, tiny_model_dir, qv_adapter_dir,
                                              rtn_gptq):
    """A real full disk and a real read-only file system (tmpfs in a private mount namespace), in
    a fresh process, so torch/torchao's import-time warnings would show if they were not filtered.
    A full disk is "no space left on DEVICE (PATH)" from every writer: safetensors, and OpenVINO's
    serializer behind optimum-intel, which says only "basic_ios::clear: iostream error"."""
    from _serve_fixtures import tiny_ir

    if subprocess.run(["unshare", "-m", "true"], capture_output=True).returncode != 0:
        pytest.skip("needs unshare -m (root with CAP_SYS_ADMIN) for a private tmpfs")
    ir = tiny_ir(tmp_path_factory, tiny_model_dir)
    full, roomy, ro, ro_ir = (tmp_path / n for n in ("full", "roomy", "ro", "ro-ir"))
    for d in (full, roomy, ro, ro_ir):
        d.mkdir()
    cases = {"full-merge": merge_argv(tiny_model_dir, qv_adapter_dir, full / "merged", "--dtype", "fp32"),
             "full-rtn": ["quantize", "--model", tiny_model_dir, "--output", full / "rtn", "--algo", "rtn",
                          "--eval-samples", "0"],
             # room for the staging fp16 model, not for the IR optimum-intel serializes from it
             "full-export": ["export", "--model", rtn_gptq, "--output", roomy / "ir"],
             "read-only": merge_argv(tiny_model_dir, qv_adapter_dir, ro / "merged"),
             # refused before the search, not after it (issue 30)
             "read-only-tune": ["tune", "--model", ro_ir, "--apply", "--axes", "kv",
                                "--results", tmp_path / "tune.jsonl"]}
    cases = {k: [str(a) for a in v] for k, v in cases.items()}
    script = (f"mount --make-rprivate / && mount -t tmpfs -o size=200k tmpfs {full} && "
              f"mount -t tmpfs -o size=1200k tmpfs {roomy} && "
              f"mount -t tmpfs -o ro,size=64k tmpfs {ro} && "
              f"mount --bind {ir} {ro_ir} && mount -o remount,ro,bind {ro_ir} && "
              f"exec {sys.executable} -c \"$FAULTS\" \"$CASES\"")
    env = dict(os.environ, PYTHONPATH=str(ROOT), FAULTS=FAULTS, CASES=json.dumps(cases))
    before = tree_digest(tiny_model_dir), tree_digest(qv_adapter_dir), tree_digest(ir)
    proc = subprocess.run(["unshare", "-m", "sh", "-c", script], capture_output=True, text=True, env=env,
                          timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    for name, (rc, err) in results.items():
        lines = [line for line in err.splitlines() if line.startswith("tangquant:")]
        assert rc == 2 and len(lines) == 1 and lines[0].startswith("tangquant: error: "), (name, err)
        where = roomy if name == "full-export" else full
        expected = f"no space left on tmpfs at {where} (" if name.startswith("full") else "read-only file system"
        assert expected in lines[0], (name, lines[0])
        assert not any(noise in err for noise in NOISE), (name, err)
    assert (tree_digest(tiny_model_dir), tree_digest(qv_adapter_dir), tree_digest(ir)) == before
    assert not (tmp_path / "tune.jsonl").exists()
    for d in (full, roomy, ro, ro_ir):
        assert list(d.iterdir()) == []  # the mounts are gone: nothing leaked under them


# 10. Left behind -------------------------------------------------------------------------------------

def test_what_a_killed_run_leaves_is_cleaned(tmp_path, capsys, tiny_model_dir, qv_adapter_dir):
    out = tmp_path / "merged"
    holder = _holder(out)
    holder.send_signal(signal.SIGKILL)  # no cleanup can run
    holder.wait()
    stale = leftovers(tmp_path)
    assert any(".tmp-" in n for n in stale) and any(n.endswith(".lock") for n in stale)
    # The next run to the same output removes them itself...
    assert main(merge_argv(tiny_model_dir, qv_adapter_dir, out, "--dtype", "fp32")) == 0
    assert leftovers(tmp_path) == [] and (out / "config.json").is_file()
    # ...`tangquant clean` removes those of outputs nobody writes again, never a live run's...
    other, live = tmp_path / "other", tmp_path / "live"
    dead = _holder(other)
    dead.kill(), dead.wait()
    running = _holder(live)
    try:
        assert main(["clean", str(tmp_path), "--dry-run"]) == 0
        assert "would remove 2 leftover(s)" in capsys.readouterr().out
        assert main(["clean", str(tmp_path)]) == 0
        assert sorted(n.split(".tmp-")[0].split(".lock")[0] for n in leftovers(tmp_path)) == [".live", ".live"]
    finally:
        running.kill(), running.wait()
    # ...and an output moved aside by a run killed in the middle of replacing it comes back.
    from tangquant import claim

    aside = claim.temporary_name(out, "old", "0123abcd")
    os.replace(out, aside)
    assert main(["clean", str(tmp_path)]) == 0
    assert (out / "config.json").is_file() and leftovers(tmp_path) == []
