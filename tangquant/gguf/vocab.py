"""The tokenizer as GGUF metadata, the way llama.cpp's ``convert_hf_to_gguf.py`` writes a Qwen2 one.

Byte-level BPE (``tokenizer.ggml.model = gpt2``): the token strings of the Hugging
Face vocabulary padded to the model's ``vocab_size`` with ``[PADi]`` (type
UNUSED), added special tokens CONTROL, other added tokens USER_DEFINED; merges,
special ids and the chat template through gguf's own ``SpecialVocab``. EOS is
``<|im_end|>`` (a ChatML chat model stops there) and EOT too; ``<|endoftext|>``
pads. The pre-tokenizer name is read from ``tokenizer.json`` rather than
assumed: Qwen's split regex is ``qwen2``, a plain ByteLevel with its GPT-2 regex
(the tiny test and demo tokenizers) is ``gpt-2`` — llama.cpp applies that regex
before BPE, so the wrong name would change tokenization silently.
"""

from __future__ import annotations

import logging
from pathlib import Path

import gguf

from tangquant.errors import InputError
from tangquant.files import read_json

logger = logging.getLogger(__name__)

IM_END, END_OF_TEXT = "<|im_end|>", "<|endoftext|>"
# The distinctive parts of each split regex llama.cpp implements under that name.
QWEN2_REGEX = r"[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"


def pre_tokenizer(tokenizer_json: dict, where) -> str:
    """llama.cpp's name for the pre-tokenizer in ``tokenizer.json``, or one line saying why not."""
    pre = tokenizer_json.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    for step in steps:
        regex = (step.get("pattern") or {}).get("Regex", "") if step.get("type") == "Split" else ""
        if QWEN2_REGEX in regex:
            return "qwen2"
    if len(steps) == 1 and steps[0].get("type") == "ByteLevel" and steps[0].get("use_regex", True):
        return "gpt-2"
    raise InputError(f"{where}: the tokenizer's pre-tokenizer ({pre.get('type')}) is neither Qwen2's split "
                     "regex nor byte-level GPT-2; llama.cpp would tokenize it differently")


def add_tokenizer(writer: gguf.GGUFWriter, tok, model_dir: Path, vocab_size: int) -> dict:
    """Write the tokenizer keys of ``tok`` (the Hugging Face tokenizer whose files are in ``model_dir``,
    which gguf-py's SpecialVocab reads); returns {tokens, pre, eos} for the export's metrics."""
    tj = read_json(Path(model_dir) / "tokenizer.json", "tokenizer")
    pre = pre_tokenizer(tj, model_dir)
    vocab = tok.get_vocab()
    if max(vocab.values()) >= vocab_size:
        raise InputError(f"{model_dir}: the tokenizer has ids up to {max(vocab.values())}, past the "
                         f"model's vocab_size {vocab_size}")
    reverse = {i: t for t, i in vocab.items()}
    added, decoder = tok.get_added_vocab(), tok.added_tokens_decoder
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in reverse:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif reverse[i] in added:
            tokens.append(reverse[i])
            types.append(gguf.TokenType.CONTROL if decoder[i].special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(reverse[i])
            types.append(gguf.TokenType.NORMAL)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    special = gguf.SpecialVocab(model_dir, load_merges=True, n_vocab=vocab_size)
    if not special.merges:
        raise InputError(f"{model_dir}: the tokenizer has no BPE merges (tokenizer.json or merges.txt)")
    if not special.chat_template:
        raise InputError(f"the tokenizer of {model_dir} has no chat template")
    ids = _special_ids(tok, vocab, model_dir)
    special.special_token_ids.update(ids)
    # Qwen's tokenizer adds no BOS: say so, or llama.cpp's BPE default would prepend one.
    special.add_special_token["bos"] = bool(tok("x")["input_ids"][:1] == [tok.bos_token_id]
                                            if tok.bos_token_id is not None else False)
    special.add_to_gguf(writer, quiet=True)
    writer.add_eot_token_id(ids["eos"])
    return {"tokens": vocab_size, "merges": len(special.merges), "pre_tokenizer": pre, **{
        f"{k}_token_id": v for k, v in ids.items()}}


def _special_ids(tok, vocab: dict, where) -> dict:
    """EOS = <|im_end|> (the end of a chat turn), PAD and BOS = <|endoftext|> as in Qwen's GGUFs."""
    if IM_END not in vocab:
        raise InputError(f"the tokenizer in {where} has no {IM_END} token (not a ChatML chat model)")
    ids = {"eos": vocab[IM_END]}
    eot = vocab.get(END_OF_TEXT, tok.pad_token_id)
    if eot is not None:
        ids.update(pad=tok.pad_token_id if tok.pad_token_id is not None else eot,
                   bos=tok.bos_token_id if tok.bos_token_id is not None else eot)
    return ids
