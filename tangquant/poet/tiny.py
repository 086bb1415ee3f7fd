"""Tiny Qwen2-architecture models and tokenizers built from scratch.

Used by the test fixtures, the demo poet's training and the shape-true
benchmark models. Everything here is offline: the tokenizer is trained on the
given texts and the model is randomly initialised from a ``Qwen2Config``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

# Qwen1.5-Chat's ChatML template, verbatim in behaviour.
CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")


def train_tokenizer(texts: Iterable[str], vocab_size: int, min_frequency: int = 2,
                    max_token_length: int | None = None):
    """A byte-level BPE tokenizer that loads as ``Qwen2TokenizerFast`` with ChatML.

    ``max_token_length`` bounds a token's length (4, as the demo poet uses it: at most one Han character).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import Qwen2TokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
        max_token_length=max_token_length)
    tok.train_from_iterator(list(texts), trainer)
    hf = Qwen2TokenizerFast(
        tokenizer_object=tok, unk_token=None, bos_token=None, eos_token="<|im_end|>",
        pad_token="<|endoftext|>", errors="replace", model_max_length=32768)
    hf.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    hf.chat_template = CHAT_TEMPLATE
    hf.model_input_names = ["input_ids", "attention_mask"]
    return hf


def qwen2_config(vocab_size: int, hidden_size: int = 128, num_hidden_layers: int = 2,
                 num_attention_heads: int = 4, num_key_value_heads: int | None = None,
                 intermediate_size: int = 256, tie_word_embeddings: bool = False,
                 max_position_embeddings: int = 1024, **kwargs):
    from transformers import Qwen2Config

    return Qwen2Config(
        vocab_size=vocab_size, hidden_size=hidden_size, num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads,
        num_key_value_heads=num_key_value_heads or num_attention_heads,
        intermediate_size=intermediate_size, tie_word_embeddings=tie_word_embeddings,
        max_position_embeddings=max_position_embeddings, rope_theta=1000000.0,
        rms_norm_eps=1e-6, hidden_act="silu", bos_token_id=None, eos_token_id=None,
        **kwargs)


def set_special_ids(config, tokenizer) -> None:
    """Point the config at the tokenizer's ChatML ids, as Qwen1.5-Chat's config does."""
    config.eos_token_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
    config.pad_token_id = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    config.bos_token_id = tokenizer.convert_tokens_to_ids("<|endoftext|>")


def generation_config(tokenizer, **sampling):
    from transformers import GenerationConfig

    eos = [tokenizer.convert_tokens_to_ids("<|im_end|>"), tokenizer.convert_tokens_to_ids("<|endoftext|>")]
    return GenerationConfig(
        bos_token_id=eos[1], pad_token_id=eos[1], eos_token_id=eos, do_sample=False,
        max_new_tokens=64, **sampling)


def build_model(config, seed: int = 0, std: float = 0.02):
    """A randomly initialised ``Qwen2ForCausalLM``; biases are made non-zero like a trained model's."""
    import torch
    from transformers import Qwen2ForCausalLM

    torch.manual_seed(seed)
    config.initializer_range = std
    model = Qwen2ForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.normal_(0.0, std)
    return model


def save_model(model, tokenizer, out_dir: Path, max_shard_size: str = "5GB", dtype=None) -> Path:
    out_dir = Path(out_dir)
    if dtype is not None:
        model = model.to(dtype)
    model.config.torch_dtype = model.dtype
    model.save_pretrained(out_dir, max_shard_size=max_shard_size, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    generation_config(tokenizer).save_pretrained(out_dir)
    return out_dir
