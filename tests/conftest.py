"""Shared fixtures: a tiny random Qwen2-architecture model, its tokenizer and a LoRA adapter.

Dimensions are multiples of 128 so quantization tests can use group size 128.
The poems below are typed for the tests (public-domain Tang poems, both
scripts); nothing is read from the chinese-poetry corpus.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

# The fixture modules shared by several test files, registered once for the session.
pytest_plugins = ("_quantize_fixtures", "_gptq_fixtures", "_llama_fixtures")

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

POEMS = [
    ("靜夜思", "李白", ["床前明月光，疑是地上霜。", "舉頭望明月，低頭思故鄉。"]),
    ("登鸛雀樓", "王之渙", ["白日依山盡，黃河入海流。", "欲窮千里目，更上一層樓。"]),
    ("春曉", "孟浩然", ["春眠不覺曉，處處聞啼鳥。", "夜來風雨聲，花落知多少。"]),
    ("相思", "王維", ["紅豆生南國，春來發幾枝。", "願君多采擷，此物最相思。"]),
    ("江雪", "柳宗元", ["千山鳥飛絕，萬徑人蹤滅。", "孤舟蓑笠翁，獨釣寒江雪。"]),
    ("登樂遊原", "李商隱", ["向晚意不適，驅車登古原。", "夕陽無限好，只是近黃昏。"]),
    ("鹿柴", "王維", ["空山不見人，但聞人語響。", "返景入深林，復照青苔上。"]),
    ("早發白帝城", "李白", ["朝辭白帝彩雲間，千里江陵一日還。", "兩岸猿聲啼不住，輕舟已過萬重山。"]),
    ("静夜思", "李白", ["床前明月光，疑是地上霜。", "举头望明月，低头思故乡。"]),
    ("登鹳雀楼", "王之涣", ["白日依山尽，黄河入海流。", "欲穷千里目，更上一层楼。"]),
    ("春晓", "孟浩然", ["春眠不觉晓，处处闻啼鸟。", "夜来风雨声，花落知多少。"]),
    ("江雪", "柳宗元", ["千山鸟飞绝，万径人踪灭。", "孤舟蓑笠翁，独钓寒江雪。"]),
]
PROMPTS = ["写一首唐诗", "写一首关于明月的诗", "以《春晓》为题写一首诗", "写一首五言绝句"]


def poem_texts() -> list[str]:
    texts = []
    for title, author, lines in POEMS:
        texts.append(f"《{title}》{author}\n" + "\n".join(lines))
    return texts + PROMPTS + ["You are a helpful assistant.", "system user assistant"]


def tree_digest(path: Path) -> str:
    """A digest of every file's name and bytes under ``path`` (to prove inputs are untouched)."""
    h = hashlib.sha256()
    for p in sorted(Path(path).rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(path)).encode())
            h.update(p.read_bytes())
    return h.hexdigest()


@pytest.fixture(scope="session")
def tiny_tokenizer():
    from tangquant.poet.tiny import train_tokenizer

    return train_tokenizer(poem_texts() * 4, vocab_size=384, min_frequency=1)


def save_tiny_model(tokenizer, out: Path, seed: int = 1234, max_shard_size: str = "5GB",
                    **config) -> Path:
    """Save a fp32 Qwen2 model (hidden 128, 2 layers, untied unless ``config`` says) for ``tokenizer``."""
    import torch

    from tangquant.poet.tiny import build_model, qwen2_config, save_model, set_special_ids

    vocab = -(-len(tokenizer) // 64) * 64  # padded, like Qwen's 151936
    cfg = qwen2_config(vocab, hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
                       intermediate_size=256, **config)
    set_special_ids(cfg, tokenizer)
    return save_model(build_model(cfg, seed=seed), tokenizer, out, max_shard_size=max_shard_size,
                      dtype=torch.float32)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tiny_tokenizer) -> Path:
    """The tiny model, saved in several shards."""
    out = tmp_path_factory.mktemp("tiny") / "base"
    save_tiny_model(tiny_tokenizer, out, max_shard_size="400KB")
    assert len(list(out.glob("*.safetensors"))) >= 2
    return out


def make_adapter(base_dir: Path, out_dir: Path, seed: int = 0, **lora_kwargs) -> Path:
    """Save a peft LoRA adapter with random non-zero A and B for ``base_dir``."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base_dir, torch_dtype=torch.float32)
    kwargs = {"r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"],
              "lora_dropout": 0.0, "init_lora_weights": False, "task_type": "CAUSAL_LM"}
    kwargs.update(lora_kwargs)
    peft_model = get_peft_model(model, LoraConfig(**kwargs))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                # Large enough that a wrong scale or a missed layer shows in the logits.
                p.normal_(0.0, 0.05)
    peft_model.save_pretrained(out_dir)
    return Path(out_dir)


@pytest.fixture(scope="session")
def qv_adapter_dir(tmp_path_factory, tiny_model_dir) -> Path:
    """The seed's LoRA settings: q_proj and v_proj, r 8, alpha 16, B != 0."""
    return make_adapter(tiny_model_dir, tmp_path_factory.mktemp("adapters") / "qv")
