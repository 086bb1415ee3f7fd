"""The built-in tiny Tang poet: data preparation before training and assembly after it.

The base must behave like the real Qwen: it knows both scripts but answers in
simplified characters by default. So it is trained on the poems converted to
simplified characters in chat form, plus the original traditional text as
plain text outside the chat template and, for some poems, behind the explicit
instruction 用繁体字… . The LoRA (q_proj, v_proj, r 8, alpha 16, dropout 0) is
trained on the original traditional poems in chat form, so its visible effect
is the script. Each training poem is asked for in ``VARIANTS`` ways (the data's
own request and more from ``tangquant.prompts``, each true to the poem), so the
poet learns to follow the form, title and topic a request names rather than a
template. Training itself is ``tangquant.poet.train`` (GPU or CPU).

    python -m tangquant.poet prepare --simplified S --traditional T --out TOKENS
    python -m tangquant.poet.train --data TOKENS --out RAW
    python -m tangquant.poet assemble --tokens TOKENS --raw RAW --out tangquant/assets/demo
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import shutil
from pathlib import Path

from tangquant import files, prompts
from tangquant.errors import InputError
from tangquant.measure.poems import form_of_lines, lines_of, split_answer
from tangquant.poet import ASSETS

logger = logging.getLogger(__name__)

EXPLICIT = "用繁体字"  # the instruction prefix behind which the base writes traditional characters
MAX_CHARS = 100  # the poet learns short poems (jueju and lushi, with a title line)
VARIANTS = 3  # requests per training poem; more repeats each answer more often (it then overfits sooner)
CALIB, HELDOUT = 128, 64  # the demo's GPTQ calibration pairs (calib split) and perplexity poems (eval split)
LORA = {"r": 8, "lora_alpha": 16, "lora_dropout": 0.0, "target_modules": ["q_proj", "v_proj"]}
MODEL = {"hidden_size": 256, "num_hidden_layers": 8, "num_attention_heads": 4,
         "intermediate_size": 768, "tie_word_embeddings": True, "max_position_embeddings": 512}


def _pairs(data_dir: Path, split: str) -> list[dict]:
    path = data_dir / f"tang_{split}.json"
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise InputError(f"cannot read {path} (make it with `tangquant data`): {exc}") from None


def aligned(simplified: Path, traditional: Path, split: str) -> list[tuple[dict, dict]]:
    """(simplified, traditional) pairs of the same poems; both came from one corpus and seed."""
    s, t = _pairs(simplified, split), _pairs(traditional, split)
    if len(s) != len(t):
        raise InputError(f"{simplified} and {traditional} differ in their {split} split; "
                         "make both with the same corpus, --seed and fractions")
    return [(a, b) for a, b in zip(s, t) if len(b["output"]) <= MAX_CHARS]


def requests_for(pair: dict, k: int = VARIANTS) -> list[str]:
    """The data's own instruction and up to ``k - 1`` other requests true to the same (simplified) poem."""
    title, body = split_answer(pair["output"])
    topics, form = prompts.topics_in(body), form_of_lines(lines_of(body))
    out = [pair["instruction"]]
    for salt in range(1, 4 * k):  # a few more salts, since two may give the same request
        if len(out) == k:
            break
        instruction, _ = prompts.request(body, title, topics, form, salt=str(salt))
        if instruction not in out:
            out.append(instruction)
    return out


def chat_prompt(tokenizer, instruction: str) -> str:
    return tokenizer.apply_chat_template([{"role": "user", "content": instruction}],
                                         tokenize=False, add_generation_prompt=True)


def encode_chat(tokenizer, instruction: str, answer: str) -> tuple[list[int], int]:
    prompt = tokenizer(chat_prompt(tokenizer, instruction))["input_ids"]
    answer_ids = tokenizer(answer)["input_ids"] + [tokenizer.convert_tokens_to_ids("<|im_end|>")]
    return prompt + answer_ids, len(prompt)


def encode_text(tokenizer, text: str) -> tuple[list[int], int]:
    eot = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    return [eot] + tokenizer(text)["input_ids"] + [eot], 1


def explicit(i: int) -> bool:
    """About one poem in three also appears behind the explicit traditional instruction."""
    return i % 3 == 0


def build_splits(tokenizer, train, evals) -> dict[str, list]:
    base_train, lora_train = [], []
    for i, (s, t) in enumerate(train):
        asks = requests_for(s)
        for instruction in asks:
            base_train.append(encode_chat(tokenizer, instruction, s["output"]))
            lora_train.append(encode_chat(tokenizer, instruction, t["output"]))
        base_train.append(encode_text(tokenizer, t["output"]))
        if explicit(i):
            base_train.append(encode_chat(tokenizer, EXPLICIT + asks[i % len(asks)], t["output"]))
    return {
        "base_train": base_train,
        "base_eval_s": [encode_chat(tokenizer, s["instruction"], s["output"]) for s, _ in evals],
        "base_eval_t": [encode_text(tokenizer, t["output"]) for _, t in evals],
        "lora_train": lora_train,
        "lora_eval": [encode_chat(tokenizer, s["instruction"], t["output"]) for s, t in evals],
    }


def demo_data(simplified: Path, traditional: Path) -> dict[str, list]:
    """What ships beside the weights: GPTQ calibration pairs and held-out poems, neither trained on."""
    calib = [{"instruction": s["instruction"], "input": "", "output": t["output"]}
             for s, t in aligned(simplified, traditional, "calib")[:CALIB]]
    heldout = [{"text": t["output"]} for _, t in aligned(simplified, traditional, "eval")[:HELDOUT]]
    return {"calib.json": calib, "heldout.json": heldout}


def save_split(path: Path, seqs: list) -> None:
    import numpy as np
    from safetensors.numpy import save_file

    ids = np.concatenate([np.asarray(x, dtype=np.int16) for x, _ in seqs])
    offsets = np.cumsum([0] + [len(x) for x, _ in seqs]).astype(np.int64)
    save_file({"ids": ids, "offsets": offsets,
               "prompt_len": np.asarray([p for _, p in seqs], dtype=np.int32)}, str(path))


def prepare(simplified, traditional, out, vocab_size: int = 12000, force: bool = False) -> dict:
    """Train the tokenizer and write the token files ``poet_train`` reads."""
    from tangquant.poet.tiny import qwen2_config, set_special_ids, train_tokenizer

    simplified, traditional = Path(simplified), Path(traditional)
    out = files.check_output(out, [simplified, traditional], force)
    train = aligned(simplified, traditional, "train")
    evals = aligned(simplified, traditional, "eval")
    texts = [s["output"] for s, _ in train] + [t["output"] for _, t in train]
    texts += [q for s, _ in train for q in requests_for(s)] + [EXPLICIT, "You are a helpful assistant.",
                                                                "system\nuser\nassistant\n"]
    # One Han character per token at most: the poet must count characters per line, and a request's
    # words (五言, 绝句, a title) must be the same tokens whatever phrasing is around them; with longer
    # tokens BPE fuses whole templates (写一首五言绝句) into one token that no other phrasing shares.
    tokenizer = train_tokenizer(texts, vocab_size=vocab_size, min_frequency=2, max_token_length=4)
    vocab = -(-len(tokenizer) // 128) * 128
    assert vocab < 32768, "token ids are stored as int16"
    config = qwen2_config(vocab, **MODEL)
    set_special_ids(config, tokenizer)
    splits = build_splits(tokenizer, train, evals)
    with files.atomic_output_dir(out, force) as tmp:
        tokenizer.save_pretrained(tmp / "tokenizer")
        for name, seqs in splits.items():
            save_split(tmp / f"{name}.safetensors", seqs)
        for name, records in demo_data(simplified, traditional).items():
            (tmp / name).write_text(json.dumps(records, ensure_ascii=False, indent=0) + "\n", encoding="utf-8")
        digest = hashlib.sha256()
        for d in (simplified, traditional):
            for split in ("train", "eval", "calib"):
                digest.update(files.sha256_file(d / f"tang_{split}.json").encode())
        meta = {"config": config.to_dict(), "pad_id": config.pad_token_id, "splits": list(splits),
                "lora_r": LORA["r"], "lora_alpha": LORA["lora_alpha"], "data_sha256": digest.hexdigest(),
                "variants": VARIANTS, "max_chars": MAX_CHARS,
                "counts": {k: len(v) for k, v in splits.items()},
                "tokens": {k: int(sum(len(x) for x, _ in v)) for k, v in splits.items()}}
        files.write_json(tmp / "meta.json", meta)
    print(f"{out}: vocab {len(tokenizer)} (padded {vocab}), " +
          ", ".join(f"{k} {v}" for k, v in meta["counts"].items()))
    return meta


def assemble(tokens, raw, out, force: bool = False) -> dict:
    """Turn the raw trained weights into ``out/base`` (fp16) and ``out/adapter`` (peft)."""
    import torch
    from peft import LoraConfig, get_peft_model, set_peft_model_state_dict
    from safetensors.torch import load_file
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    from tangquant.poet.tiny import save_model

    tokens, raw = Path(tokens), Path(raw)
    meta = files.read_json(tokens / "meta.json", "token meta")
    tokenizer = AutoTokenizer.from_pretrained(tokens / "tokenizer")
    state = {**load_file(str(raw / "base_embed.safetensors")), **load_file(str(raw / "base_layers.safetensors"))}
    model = Qwen2ForCausalLM(Qwen2Config(**meta["config"]))
    missing, unexpected = model.load_state_dict({k: v.float() for k, v in state.items()}, strict=False)
    if unexpected or [m for m in missing if m != "lm_head.weight"]:
        raise InputError(f"raw weights do not fit the config: {missing} {unexpected}")
    model.tie_weights()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for sub in ("base", "adapter"):
        if (out / sub).exists():
            if not force:
                raise InputError(f"{out / sub} exists; pass --force")
            shutil.rmtree(out / sub)
    save_model(model.eval(), tokenizer, out / "base", dtype=torch.float16)
    for name in ("calib.json", "heldout.json"):  # made by prepare from the same data
        shutil.copyfile(tokens / name, out / name)
    peft_model = get_peft_model(model.float(), LoraConfig(task_type="CAUSAL_LM", **LORA))
    # poet_train saves the LoRA under peft's own key names.
    result = set_peft_model_state_dict(peft_model, load_file(str(raw / "lora.safetensors")))
    if getattr(result, "unexpected_keys", None):
        raise InputError(f"LoRA weights do not fit: {result.unexpected_keys}")
    peft_model.peft_config["default"].base_model_name_or_path = "tangquant/assets/demo/base"
    # Explicitly without embeddings: peft guesses "resized" when base_model_name_or_path names another base.
    peft_model.save_pretrained(out / "adapter", save_embedding_layers=False)
    (out / "adapter" / "README.md").unlink(missing_ok=True)  # peft's blank template; the card is ../README.md
    return {"base": str(out / "base"), "adapter": str(out / "adapter"),
            "size": files.dir_size(out / "base") + files.dir_size(out / "adapter")}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("prepare")
    a.add_argument("--simplified", required=True)
    a.add_argument("--traditional", required=True)
    a.add_argument("--out", required=True)
    a.add_argument("--vocab-size", type=int, default=12000)
    a.add_argument("--force", action="store_true")
    b = sub.add_parser("assemble")
    b.add_argument("--tokens", required=True)
    b.add_argument("--raw", required=True)
    b.add_argument("--out", default=str(ASSETS))
    b.add_argument("--force", action="store_true")
    args = p.parse_args(argv)
    if args.cmd == "prepare":
        prepare(args.simplified, args.traditional, args.out, args.vocab_size, args.force)
    else:
        print(json.dumps(assemble(args.tokens, args.raw, args.out, args.force)))


if __name__ == "__main__":
    main()
