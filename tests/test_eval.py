"""Calibration/evaluation text handling and `tangquant eval`: llama.cpp's KL block on models and checkpoints."""

from __future__ import annotations

import json

import pytest

pytest.register_assert_rewrite("_quantize_fixtures")
from _quantize_fixtures import alpaca_records, poem_records
from tangquant.cli import main


def test_every_calibration_format_is_read_and_rendered_with_the_chat_template(tmp_path, tiny_tokenizer):
    from tangquant.calib import load_documents, render

    files = {
        "alpaca.json": json.dumps(alpaca_records(3, 0), ensure_ascii=False),
        "poems.json": json.dumps(poem_records(3, 0), ensure_ascii=False),
        "sharegpt.json": json.dumps([{"conversations": [{"from": "human", "value": "写一首唐诗"},
                                                        {"from": "gpt", "value": "床前明月光"}]}] * 3),
        "messages.jsonl": "\n".join(json.dumps({"messages": [{"role": "user", "content": "写诗"},
                                                             {"role": "assistant", "content": "春眠"}]})
                                    for _ in range(3)),
        "text.jsonl": "\n".join(json.dumps({"text": "白日依山盡"}) for _ in range(3)),
        "plain.txt": "床前明月光\n\n疑是地上霜\n\n舉頭望明月\n",
    }
    for name, text in files.items():
        (tmp_path / name).write_text(text, encoding="utf-8")
        docs = load_documents(tmp_path / name)
        assert len(docs) == 3, name
        rendered = render(docs[0], tiny_tokenizer)
        if name.startswith(("text", "plain")):
            assert "<|im_start|>" not in rendered
        else:
            assert rendered.count("<|im_start|>user\n") == 1 and "<|im_start|>assistant\n" in rendered
    poem = render(load_documents(tmp_path / "poems.json")[0], tiny_tokenizer)
    assert f"以《{poem_records(1, 0)[0]['title']}》为题写一首诗" in poem
    alpaca = render(load_documents(tmp_path / "alpaca.json")[0], tiny_tokenizer)
    assert alpaca.endswith(alpaca_records(1, 0)[0]["output"] + "<|im_end|>\n")


def test_packing_is_seeded_exact_length_and_split_is_disjoint(calib_file, tiny_tokenizer):
    from tangquant.calib import load_documents, pack, split_documents
    from tangquant.errors import CalibrationError

    docs = load_documents(calib_file)
    a = pack(docs, tiny_tokenizer, 64, 8, seed=1)
    b = pack(docs, tiny_tokenizer, 64, 8, seed=1)
    c = pack(docs, tiny_tokenizer, 64, 8, seed=2)
    assert len(a.samples) == 8 and all(len(s) == 64 for s in a.samples) and a.tokens == 512
    assert all((x == y).all() for x, y in zip(a.samples, b.samples))
    assert not all((x == y).all() for x, y in zip(a.samples, c.samples))
    calib, held = split_documents(docs, seed=1)
    assert len(held) == len(docs) // 10 and len(calib) + len(held) == len(docs)
    assert not set(map(id, calib)) & set(map(id, held))
    with pytest.raises(CalibrationError, match="too short"):
        pack(docs[:1], tiny_tokenizer, 4096, 1, seed=1)


def test_a_model_against_itself_has_zero_kld_and_full_agreement(capsys, tmp_path, tiny_model_dir,
                                                                  heldout_file):
    out = tmp_path / "self.json"
    assert main(["eval", "--model", str(tiny_model_dir), "--reference", str(tiny_model_dir), "--data",
                 str(heldout_file), "--num-samples", "2", "--seq-len", "48", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    m = json.loads(out.read_text())
    assert m["samples"] == 2 and m["tokens"] == 2 * 47
    assert m["kld"] < 1e-6 and m["kld_max"] < 1e-6 and m["same_top"] == 1.0 and m["same_top_err"] == 0
    assert m["ppl_ratio"] == pytest.approx(1.0, abs=1e-6) and m["dp_rms"] < 1e-6
    assert 1 < m["ppl_model"] < 2 * 384  # a random model over a 384-token vocabulary
    # The block as llama-perplexity prints it, on stdout.
    assert "Same top p: 100.000 ± 0.000 %" in printed and "====== KL divergence statistics ======" in printed


def test_eval_cli_reproduces_the_quantize_fidelity_report(capsys, tmp_path, gptq_dir, tiny_model_dir,
                                                          heldout_file):
    """The layer pass's streamed block equals eval's on the written checkpoint, number by number."""
    report = json.loads((gptq_dir / "tangquant.json").read_text())["metrics"]["fidelity"]
    out = tmp_path / "m.json"
    rc = main(["eval", "--model", str(gptq_dir), "--reference", str(tiny_model_dir), "--data",
               str(heldout_file), "--num-samples", "8", "--seq-len", "64", "--seed", "42",
               "--json", str(out)])
    printed = capsys.readouterr().out
    assert rc == 0 and "Mean    KLD:" in printed and "Mean PPL(Q)/PPL(base)" in printed
    m = json.loads(out.read_text())
    assert m["tokens"] == report["tokens"]
    keys = [k for k, v in m.items() if isinstance(v, float)]
    assert {"kld_err", "kld_p99_9", "kld_median", "ppl_ratio_err", "ln_ppl_ratio_err", "dp_rms_err",
            "same_top_err"} <= set(keys)
    for key in keys:
        assert m[key] == pytest.approx(report[key], rel=1e-4, abs=1e-7), key
    assert m["kld"] > 0 and m["same_top"] < 1.0
    # quantize's model card shows the same block.
    card = (gptq_dir / "README.md").read_text(encoding="utf-8")
    assert f"Mean    KLD: {m['kld']:10.6f}" in card and "Same top p:" in card


def test_eval_refuses_bad_inputs(capsys, tmp_path, tiny_model_dir, qv_adapter_dir, heldout_file):
    cases = [(["--model", str(qv_adapter_dir), "--reference", str(tiny_model_dir),
               "--data", str(heldout_file)], "adapter"),
             (["--model", str(tiny_model_dir), "--reference", str(tiny_model_dir),
               "--data", str(tmp_path / "none.json")], "does not exist"),
             (["--model", str(tiny_model_dir), "--reference", str(tiny_model_dir)], "nothing to evaluate"),
             (["--model", str(tiny_model_dir), "--reference", str(tiny_model_dir), "--tasks", "tang_couplet",
               "--reference-adapter", str(tmp_path / "no-adapter")], "does not exist")]
    for argv, why in cases:
        assert main(["eval", *argv]) == 2
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert err.startswith("tangquant: error: ") and why in err


@pytest.mark.slow
def test_eval_reads_an_openvino_ir(tmp_path, gptq_dir, tiny_model_dir, heldout_file):
    from tangquant.evaluate import evaluate

    from tangquant.export import export

    export(gptq_dir, tmp_path / "ir", embeddings="int8")
    gptq = evaluate(gptq_dir, tiny_model_dir, heldout_file, num_samples=4, seq_len=64)
    ov = evaluate(tmp_path / "ir", tiny_model_dir, heldout_file, num_samples=4, seq_len=64)
    assert ov["tokens"] == gptq["tokens"]
    # int8 embeddings add a little error on top of the exact INT4 layers.
    assert ov["kld"] < 3 * gptq["kld"] + 1e-3
