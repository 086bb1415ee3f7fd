"""`tangquant chat`: streaming chat with an OpenVINO IR or a Hugging Face directory."""

from __future__ import annotations

import io

import pytest

from tangquant.chat import chat_loop
from tangquant.cli import main
from tangquant.errors import ParameterError
from tangquant.generate import Sampling, open_generator

# Plugins, not imported names: the session fixtures are then built once per run.

GREEDY = Sampling(max_new_tokens=6, temperature=0.0)


def test_prompt_prints_an_answer_from_the_ir(capsys, ov_export):
    rc = main(["chat", "--model", str(ov_export[0]), "--prompt", "写一首唐诗", "--temperature", "0",
               "--max-new-tokens", "8"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert captured.out.endswith("\n") and captured.out.strip()


def test_prompt_on_hf_model_with_adapter(capsys, tiny_model_dir, qv_adapter_dir):
    rc = main(["chat", "--model", str(tiny_model_dir), "--adapter", str(qv_adapter_dir),
               "--prompt", "写一首唐诗", "--max-new-tokens", "6", "--seed", "1"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert captured.out.strip()


def test_prompt_on_gptq_checkpoint(capsys, gptq_dir):
    """A GPTQ directory is dequantised exactly (no gptqmodel/auto-gptq needed)."""
    rc = main(["chat", "--model", str(gptq_dir), "--prompt", "写一首唐诗", "--temperature", "0",
               "--max-new-tokens", "6"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert captured.out.strip()


class Spy:
    """Records what the chat loop sends to a real generator."""

    def __init__(self, generator):
        self.generator, self.calls, self.replies = generator, [], []

    def stream(self, messages, sampling):
        self.calls.append([dict(m) for m in messages])
        self.replies.append("")
        for piece in self.generator.stream(messages, sampling):
            self.replies[-1] += piece
            yield piece


def test_loop_keeps_history_clears_and_exits(tiny_model_dir):
    spy = Spy(open_generator(tiny_model_dir))
    stdin = io.StringIO("床前明月光\n舉頭望明月\n\nclear\n春眠不覺曉\nexit\n不會讀到\n")
    stdout = io.StringIO()
    history = chat_loop(spy, GREEDY, system="你是詩人。", stdin=stdin, stdout=stdout)
    assert [len(c) for c in spy.calls] == [2, 4, 2]  # system + turns; reset by `clear`
    assert spy.calls[1][1:] == [{"role": "user", "content": "床前明月光"},
                                {"role": "assistant", "content": spy.replies[0]},
                                {"role": "user", "content": "舉頭望明月"}]
    assert all(c[0] == {"role": "system", "content": "你是詩人。"} for c in spy.calls)
    assert history == [{"role": "user", "content": "春眠不覺曉"},
                       {"role": "assistant", "content": spy.replies[2]}]
    text = stdout.getvalue()
    assert all(reply in text for reply in spy.replies)
    assert "History has been removed." in text and text.count("Assistant: ") == 3


def test_loop_ends_at_end_of_input(tiny_model_dir):
    stdout = io.StringIO()
    assert chat_loop(open_generator(tiny_model_dir), GREEDY, stdin=io.StringIO(""), stdout=stdout) == []


def test_stream_can_stop_early_and_seed_repeats(ov_export):
    generator = open_generator(ov_export[0])
    messages = [{"role": "user", "content": "写一首五言绝句"}]
    stream = generator.stream(messages, Sampling(max_new_tokens=64, temperature=0.0))
    next(stream, None)
    stream.close()  # stops the worker thread; the pipeline stays usable
    sampled = Sampling(max_new_tokens=8, temperature=1.0, top_p=0.95, seed=3)
    assert generator.generate(messages, sampled) == generator.generate(messages, sampled)


def test_bad_settings_and_adapter_on_ir_are_refused(capsys, ov_export, qv_adapter_dir, tmp_path):
    with pytest.raises(ParameterError):
        Sampling(temperature=-1.0)
    assert main(["chat", "--model", str(ov_export[0]), "--prompt", "x", "--top-p", "0"]) == 2
    assert main(["chat", "--model", str(ov_export[0]), "--adapter", str(qv_adapter_dir),
                 "--prompt", "x"]) == 2
    assert main(["chat", "--model", str(tmp_path / "missing"), "--prompt", "x"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 3 and all(line.startswith("tangquant: error: ") for line in err)
