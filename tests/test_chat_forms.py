"""A chat template checked across the forms tangquant ships: ollama's rendering reproduced from its
own goldens, a wrong Modelfile and a differing adapter template caught."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tangquant.chatforms import ollama
from tangquant.cli import main

GOLDEN = Path(__file__).parent / "golden" / "ollama" / "templates.json"
HELLO = [{"role": "user", "content": "Hello, how are you?"},
         {"role": "assistant", "content": "I'm doing great. How can I help you today?"},
         {"role": "user", "content": "I'd like to show off how chat templating works!"}]
CASES = {"user": HELLO[:1], "user-assistant-user": HELLO,
         "system-user-assistant-user": [{"role": "system", "content": "You are a helpful assistant."}, *HELLO]}
# ollama's test trims one trailing space from these templates' output before comparing.
TRAILING_SPACE = ("chatqa.gotmpl", "llama2-chat.gotmpl", "mistral-instruct.gotmpl", "openchat.gotmpl",
                  "vicuna.gotmpl")
# The Modelfile tangquant wrote before: an old-style template with nothing after {{ .Response }}.
OLD_MODELFILE = '''FROM ./model.gguf
TEMPLATE """{{ if .System }}<|im_start|>system
{{ .System }}<|im_end|>
{{ end }}{{ if .Prompt }}<|im_start|>user
{{ .Prompt }}<|im_end|>
{{ end }}<|im_start|>assistant
{{ .Response }}"""
SYSTEM """You are a helpful assistant."""
PARAMETER stop "<|im_end|>"
'''
CHATML_JINJA = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
                "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}"
                "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}"
                "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


@pytest.mark.fast
@pytest.mark.parametrize("name", sorted(json.loads(GOLDEN.read_text(encoding="utf-8"))))
def test_ollama_templates_render_as_ollama_renders_them(name):
    """Each of ollama's named templates gives, for ollama's three test chats, the prompt ollama's own
    test expects, byte for byte (range, if/else if, with, break/continue, slice, len, printf…)."""
    entry = json.loads(GOLDEN.read_text(encoding="utf-8"))[name]
    for case, expected in entry["expected"].items():
        got = ollama.render({"template": entry["template"]}, CASES[case])
        if name in TRAILING_SPACE and got.endswith(" "):
            got = got[:-1]
        assert got == expected, case


@pytest.mark.fast
def test_old_style_templates_are_rendered_once_per_turn():
    """ollama's TestExecuteWithMessages: an old-style template, with or without .Response, renders
    a multi-turn chat like the .Messages form of the same format."""
    msgs = [{"role": "system", "content": "You are a helpful assistant!"},
            {"role": "user", "content": "Hello friend!"}, {"role": "assistant", "content": "Hello human!"},
            {"role": "user", "content": "What is your name?"}]
    want = ("[INST] You are a helpful assistant!\n\nHello friend![/INST] Hello human![INST] What is "
            "your name?[/INST] ")
    for template in ("[INST] {{ if .System }}{{ .System }}\n\n{{ end }}{{ .Prompt }}[/INST] ",
                     "[INST] {{ if .System }}{{ .System }}\n\n{{ end }}{{ .Prompt }}[/INST] {{ .Response }}"):
        assert ollama.render({"template": template}, msgs) == want
    chatml = ("{{ if .System }}<|im_start|>system\n{{ .System }}<|im_end|>\n{{ end }}{{ if .Prompt }}"
              "<|im_start|>user\n{{ .Prompt }}<|im_end|>\n{{ end }}<|im_start|>assistant\n"
              "{{ .Response }}<|im_end|>\n")
    assert ollama.render({"template": chatml}, msgs).endswith(
        "Hello human!<|im_end|>\n<|im_start|>user\nWhat is your name?<|im_end|>\n<|im_start|>assistant\n")


@pytest.mark.fast
def test_the_old_modelfile_loses_im_end_and_the_new_one_matches_the_hf_template(tmp_path):
    """The issue's bug: ollama re-renders the old template per earlier turn, so each earlier reply
    lost its <|im_end|>; the Modelfile written now renders what the HF template does."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    from tangquant.chatforms.sources import CONVERSATIONS
    from tangquant.gguf.modelcard import write_modelfile

    hf = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True).from_string(CHATML_JINJA)
    old = ollama.read_modelfile(OLD_MODELFILE)
    new = ollama.read_modelfile(write_modelfile(tmp_path, "m.gguf", system="You are a helpful assistant.")
                                .read_text(encoding="utf-8"))
    for msgs in CONVERSATIONS.values():
        want = hf.render(messages=msgs, add_generation_prompt=True)
        assert ollama.render(new, msgs) == want
    reply = CONVERSATIONS["system + two turns"][2]["content"]
    assert f"{reply}<|im_start|>user" in ollama.render(old, CONVERSATIONS["system + two turns"])


@pytest.fixture(scope="module")
def gguf_dir(tmp_path_factory, gptq_dir):
    out = tmp_path_factory.mktemp("forms") / "gguf"
    assert main(["-q", "export", "--model", str(gptq_dir), "--output", str(out), "--format", "gguf",
                 "--no-llama-check"]) == 0
    return out


def test_export_checks_every_form_and_check_template_catches_a_wrong_modelfile(gguf_dir, tmp_path,
                                                                               capsys):
    manifest = json.loads((gguf_dir / "tangquant.json").read_text(encoding="utf-8"))
    verdicts = manifest["metrics"]["chat_template"]
    assert verdicts["ollama"] == "same"
    assert verdicts["llama.cpp"] == "same" or verdicts["llama.cpp"].startswith("skipped")
    broken = tmp_path / "broken"
    shutil.copytree(gguf_dir, broken)
    (broken / "Modelfile").write_text(OLD_MODELFILE, encoding="utf-8")
    capsys.readouterr()
    assert main(["check-template", str(broken)]) == 2
    err = capsys.readouterr().err
    assert "ollama differs (system + two turns)" in err and "<|im_start|>user" in err
    assert main(["check-template", str(gguf_dir), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["forms"]["ollama"] == "same"


def test_export_refuses_a_template_ollama_would_render_otherwise(gptq_dir, tmp_path, capsys):
    """A model whose HF template is not ChatML: the ChatML Modelfile would differ, so nothing is
    published."""
    src = tmp_path / "gptq"
    shutil.copytree(gptq_dir, src)
    config = json.loads((src / "tokenizer_config.json").read_text(encoding="utf-8"))
    config["chat_template"] = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
    (src / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    (src / "chat_template.jinja").unlink(missing_ok=True)
    out = tmp_path / "gguf"
    assert main(["export", "--model", str(src), "--output", str(out), "--format", "gguf",
                 "--no-llama-check"]) == 2
    assert "ollama differs" in capsys.readouterr().err and not out.exists()


def test_merge_compares_the_adapters_tokenizer_and_says_which_it_keeps(tiny_model_dir, qv_adapter_dir,
                                                                        tmp_path, capsys):
    from tangquant.merge import merge

    adapter = tmp_path / "adapter"
    shutil.copytree(qv_adapter_dir, adapter)
    from tangquant.chatforms.sources import TOKENIZER_FILES

    for name in TOKENIZER_FILES:  # LLaMA-Factory saves the training tokenizer beside the adapter
        if (tiny_model_dir / name).is_file():
            shutil.copy(tiny_model_dir / name, adapter / name)
    same = merge(tiny_model_dir, adapter, tmp_path / "same")
    assert same["tokenizer"]["kept"] == "base" and "renders as the base's" in same["tokenizer"]["why"]

    config = json.loads((adapter / "tokenizer_config.json").read_text(encoding="utf-8"))
    config["chat_template"] = CHATML_JINJA.replace("You are a helpful assistant.", "你是一位唐代詩人。")
    (adapter / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    (adapter / "chat_template.jinja").unlink(missing_ok=True)
    res = merge(tiny_model_dir, adapter, tmp_path / "merged")
    assert res["tokenizer"]["kept"] == "adapter" and "chat template" in res["tokenizer"]["why"]
    assert "the adapter's" in res["summary"]
    from transformers import AutoTokenizer

    assert "唐代詩人" in AutoTokenizer.from_pretrained(tmp_path / "merged").chat_template
    kept = merge(tiny_model_dir, adapter, tmp_path / "base-kept", tokenizer="base")
    assert kept["tokenizer"]["kept"] == "base"
    capsys.readouterr()
    assert main(["check-template", str(tiny_model_dir), "--adapter", str(adapter)]) == 2
    assert "the adapter's chat template differs" in capsys.readouterr().err
