"""The counts a model's config claims (layers, vocabulary, width, heads, feed-forward size,
context), checked against the tensors present before any loader believes them.

A config is a few hundred bytes anyone can edit; what a loader builds from it is not: a
``num_hidden_layers`` of 10⁹ made ``export --format gguf`` build a name map of 10⁹ blocks and a
GGUF's ``block_count`` made ``eval`` allocate 10⁹ layers (issue 30). Every reader of a config
calls :func:`check_counts` with the tensors' shapes (from safetensors headers or a GGUF's tensor
infos, nothing loaded). Standard library only.
"""

from __future__ import annotations

import re

from tangquant.errors import InputError, short

# A numbered layer in any of the usual layouts (model.layers.N, transformer.h.N, encoder.block.N).
_LAYER = re.compile(r"(?:^|\.)(?:layers|h|blocks?)\.(\d+)\.")
MAX_CONTEXT = 1 << 24  # the longest context a config may claim (Qwen2.5's 1M is well inside)
COUNTS_FIX = "the config does not describe these weights: copy config.json again from their model"


def check_counts(config: dict, shapes: dict[str, tuple[int, ...]], where,
                 source: str = "config.json", fix: str = COUNTS_FIX) -> None:
    """The counts a config claims against the tensors present (``shapes``: Hugging Face names,
    [out, in]; a GPTQ layer's qweight stands for its weight): layers, vocabulary, width, heads,
    feed-forward size and context. A claim no tensor backs (10⁹ layers) would make a loader
    build it; every reader of a config calls this first (the GGUF reader too, by these names)."""
    def count(key, default=None):
        value = config.get(key, default)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise InputError(f"{where}: {source}'s {key} must be a positive integer, got "
                             f"{short(value)}")
        return value

    def out_features(module):
        if f"{module}.weight" in shapes:
            return shapes[f"{module}.weight"][0]
        return shapes[f"{module}.qweight"][1] if f"{module}.qweight" in shapes else None

    layers = {int(m[1]) for name in shapes if (m := _LAYER.search(name))}
    n = count("num_hidden_layers", config.get("n_layer"))
    if n is not None and (len(layers) != n or layers != set(range(n))):  # the length first: 10⁹
        raise InputError(f"{where}: {source} claims {n} layers but the weights hold "
                         f"{len(layers)}; {fix}")
    hidden, vocab, heads = count("hidden_size"), count("vocab_size"), count("num_attention_heads")
    kv = count("num_key_value_heads", heads)
    head_dim = count("head_dim") or (hidden // heads if hidden and heads else None)
    want = {"model.embed_tokens.weight": (vocab, hidden), "lm_head.weight": (vocab, hidden)}
    if heads and hidden and not config.get("head_dim") and hidden % heads:
        raise InputError(f"{where}: {heads} attention heads do not divide hidden_size {hidden}; {fix}")
    if heads and kv and heads % kv:
        raise InputError(f"{where}: {heads} attention heads are not a multiple of {kv} KV heads; {fix}")
    sizes = {"self_attn.q_proj": heads and head_dim and heads * head_dim,
             "self_attn.k_proj": kv and head_dim and kv * head_dim,
             "mlp.up_proj": count("intermediate_size")}
    for name, shape in want.items():
        if name in shapes and None not in shape and tuple(shapes[name]) != shape:
            raise InputError(f"{where}: {name} is {list(shapes[name])} but {source} makes it "
                             f"{list(shape)} (vocab_size, hidden_size); {fix}")
    for module, size in sizes.items():
        have = out_features(f"model.layers.0.{module}")
        if size and have is not None and have != size:
            raise InputError(f"{where}: {module} has {have} outputs but {source}'s heads and sizes "
                             f"make it {size}; {fix}")
    context = count("max_position_embeddings")
    if context is not None and context > MAX_CONTEXT:
        raise InputError(f"{where}: {source} claims a context of {context} tokens, beyond "
                         f"{MAX_CONTEXT}; {fix}")
