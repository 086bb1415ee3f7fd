"""The built-in tiny Tang poet and `tangquant demo`.

The fast tests check the shipped model itself: base answers in simplified
characters, base + LoRA in traditional ones, and both write the form and title
a held-out prompt asks for. The slow test runs the whole demo (merge → GPTQ →
OpenVINO → bench → table) and asserts the LoRA's effect survives merge + INT4.
"""

from __future__ import annotations

import json

import pytest

from tangquant.measure.poems import script_counts, traditional_ratio
from tangquant.poet import ASSETS, demo_paths

PROMPTS = ("写一首唐诗", "写一首关于明月的诗", "写一首五言绝句")


@pytest.mark.fast
def test_traditional_ratio():
    # T: 舉 頭 頭 鄉 (t2s changes them); S: 床 (s2t writes 牀), by OpenCC's own tables.
    assert script_counts("床前明月光，疑是地上霜。舉頭望明月，低頭思故鄉。") == (4, 1)
    assert script_counts("举头望明月，低头思故乡。") == (0, 4)
    assert traditional_ratio(["舉頭望明月", "举头望明月"]) == 0.5
    assert traditional_ratio(["明月光", "hello"]) is None  # no character with a script


@pytest.mark.fast
def test_shipped_assets():
    paths = demo_paths()
    sizes = {p.name: p.stat().st_size for p in ASSETS.rglob("*") if p.is_file()}
    # 20 MB for the poet, 9.1 MB for its draft (assets/demo/draft, the same tokenizer files)
    assert max(sizes.values()) < 25 * 10**6 and sum(sizes.values()) <= 29.1 * 10**6, sizes
    weights = [str(p.relative_to(ASSETS)) for p in ASSETS.rglob("*")
               if p.suffix in (".bin", ".pt", ".pth", ".safetensors")]
    assert sorted(weights) == ["adapter/adapter_model.safetensors", "base/model.safetensors",
                               "draft/model.safetensors"]
    from tangquant.draft import check

    check(paths["base"], paths["draft"])  # the draft poet speaks the poet's tokens and template
    config = json.loads((paths["base"] / "config.json").read_text())
    assert config["architectures"] == ["Qwen2ForCausalLM"] and config["hidden_size"] % 128 == 0
    adapter = json.loads((paths["adapter"] / "adapter_config.json").read_text())
    assert (adapter["r"], adapter["lora_alpha"], adapter["lora_dropout"]) == (8, 16, 0.0)
    assert sorted(adapter["target_modules"]) == ["q_proj", "v_proj"]
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(paths["base"])
    assert type(tok).__name__ == "Qwen2TokenizerFast"
    text = tok.apply_chat_template([{"role": "user", "content": "写一首唐诗"}], tokenize=False,
                                   add_generation_prompt=True)
    assert text.endswith("<|im_start|>assistant\n") and "<|im_start|>system" in text


def test_lora_changes_the_script():
    """The seed's before/after, on the shipped weights: simplified by default, traditional with the LoRA."""
    from tangquant.generate import Sampling, open_generator

    paths = demo_paths()
    greedy = Sampling(max_new_tokens=32, temperature=0.0, top_p=1.0, seed=0)
    answers = {}
    for name, adapter in (("base", None), ("lora", paths["adapter"])):
        gen = open_generator(paths["base"], adapter=adapter)
        answers[name] = [gen.generate([{"role": "user", "content": p}], greedy) for p in PROMPTS]
    assert traditional_ratio(answers["base"]) <= 0.10, answers["base"]
    assert traditional_ratio(answers["lora"]) >= 0.80, answers["lora"]
    # The base knows the traditional characters too: behind an explicit instruction it writes them.
    base = open_generator(paths["base"])
    explicit = base.generate([{"role": "user", "content": "用繁体字写一首唐诗"}], greedy)
    assert traditional_ratio([explicit]) >= 0.8, explicit


def test_poet_follows_the_prompt():
    """Held-out phrasings (prompts.json): the asked form and title, greedy, with and without the LoRA."""
    from tangquant.generate import Sampling, open_generator
    from tangquant.measure import poems

    paths = demo_paths()
    asked = [{"prompt": "来一首七言律诗吧", "form": "七言律诗"},
             {"prompt": "作一首七言律诗，题为《秋兴》", "title": "秋兴", "form": "七言律诗"},
             {"prompt": "请以《送别》为题写一首五言绝句", "title": "送别", "form": "五言绝句"}]
    greedy = Sampling(max_new_tokens=100, temperature=0.0, top_p=1.0, seed=0)
    for adapter in (None, paths["adapter"]):
        gen = open_generator(paths["base"], adapter=adapter)
        answers = [gen.generate([{"role": "user", "content": p["prompt"]}], greedy) for p in asked]
        got = poems.follow(asked, answers)
        assert got["form"]["rate"] == 1.0 and got["title"]["rate"] == 1.0, answers


@pytest.mark.slow
def test_demo_end_to_end(tmp_path):
    from tangquant.cli import main

    work = tmp_path / "demo"
    assert main(["demo", "--workdir", str(work), "--samples", "2"]) == 0
    report = json.loads((work / "demo.json").read_text(encoding="utf-8"))
    r = report["results"]
    assert set(r) == {"base", "base + LoRA", "merged INT4"}
    assert r["base"]["ratio_greedy"] <= 0.10
    assert r["base + LoRA"]["ratio_greedy"] >= 0.80
    for mode in ("ratio_greedy", "ratio_sampled"):
        assert r["merged INT4"][mode] >= 0.9 * r["base + LoRA"][mode], (mode, r)
    follow = r["base + LoRA"]["follow"]["greedy"]
    assert follow["form"]["rate"] >= 0.8 and follow["title"]["rate"] >= 0.8, follow
    assert all(v is None or v >= 0.9 for k, v in report["int4_vs_lora_follow"].items()
               if k.endswith("greedy") and not k.startswith("topic")), report["int4_vs_lora_follow"]
    for row in r.values():
        assert all(v > 1 for v in row["ppl"].values())
    assert (work / "int4-openvino" / "openvino_model.xml").is_file()
    assert (work / "int4-gptq" / "config.json").is_file() and (work / "demo.md").is_file()
    draft = report["draft"]  # the shipped draft poet as the IR's draft: the same answers, fewer target steps
    assert draft["identical"] == draft["prompts"] and draft["accepted"] > 0 and draft["tokens_per_step"] > 1
    assert main(["demo", "--workdir", str(work)]) == 2  # kept without --force
