"""Fold a LoRA adapter (PEFT format, as LLaMA-Factory writes it) into its full-precision base.

The base is streamed one shard at a time: every targeted weight gets its LoRA
delta added in fp32 (scale = lora_alpha/r, or alpha/sqrt(r) with rsLoRA, with
peft's own rank_pattern/alpha_pattern matching), DoRA magnitudes applied,
modules_to_save and saved embedding layers copied over, and each output shard
(same names as the input's) is written tensor by tensor, so peak memory stays
near the largest tensor plus the adapter, never the whole model. Everything is
checked before anything is written; the output appears only when complete.

example:
  tangquant merge --model Qwen1.5-7B-Chat --adapter tang-lora --output tang-7b --verify 4
"""

from __future__ import annotations

import dataclasses
import gc
import json
import logging
import re
import struct
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from tangquant import card, checkpoint, counts, files, host, lora, recipe
from tangquant.chatforms import sources
from tangquant.card import check_base_model_id
from tangquant.errors import AdapterError, InputError
from tangquant.recipe import param, require

logger = logging.getLogger(__name__)

HELP = "fold a LoRA adapter into its full-precision base (exact, streaming, low memory)"
DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
TOKENIZERS = ("auto", "base", "adapter")
QUANTIZE_API = """from tangquant import quantize
q = quantize("THIS_DIR", "OUT", "recipes/int4-gptq-g128.yaml", calib="data/tang/tang_calib.json")"""
QUANTIZED_FIX = ("merge into the full-precision base (e.g. Qwen/Qwen1.5-7B-Chat), then quantize "
                 "the merged model with `tangquant quantize`")
VERIFY_PROMPTS = ("寫一首唐詩", "寫一首關於明月的五言絕句", "以《春曉》為題寫一首詩", "寫一首思鄉的七言絕句",
                  "寫一首描寫江雪的詩", "寫一首送別友人的詩", "寫一首登高望遠的詩", "寫一首關於秋夜的詩")


@dataclass(frozen=True)
class MergeParams:
    dtype: str = param("auto", "output dtype; auto keeps the base's torch_dtype",
                       choices=("auto", *DTYPES))
    verify: int = param(0, "compare the logits of N Tang-poem prompts through peft base+adapter and "
                        "the merged model (fp32: needs 4 bytes of RAM per parameter)", metavar="N")
    allow_pickle: bool = param(False, "accept .bin (pickle) weights, loaded with "
                               "torch.load(weights_only=True)")
    base_model_id: str | None = param(None, "Hub id of the base for the model card's base_model (e.g. "
                                      "Qwen/Qwen1.5-7B-Chat); default: the adapter's "
                                      "base_model_name_or_path when it is one", metavar="ORG/NAME")
    tokenizer: str = param("auto", "whose tokenizer and chat template the output gets: auto (the one "
                           "saved beside the adapter when it differs from the base's, as LLaMA-Factory "
                           "saves the training tokenizer; else the base's), base or adapter",
                           choices=TOKENIZERS)

    def __post_init__(self):
        require(self.tokenizer in TOKENIZERS, f"tokenizer must be one of {', '.join(TOKENIZERS)}, got "
                f"{self.tokenizer!r}")
        require(self.dtype == "auto" or self.dtype in DTYPES,
                f"dtype must be auto or one of {', '.join(DTYPES)}, got {self.dtype!r}")
        require(self.verify >= 0, f"verify must be 0 or a positive number of prompts, got {self.verify}")
        check_base_model_id(self.base_model_id)


PARAMS = MergeParams


def add_arguments(parser) -> None:
    parser.add_argument("--model", required=True, metavar="BASE_DIR", help="full-precision base model")
    parser.add_argument("--adapter", required=True, metavar="ADAPTER_DIR", help="peft LoRA adapter")
    parser.add_argument("--output", required=True, metavar="OUT_DIR", help="merged model to write")
    parser.add_argument("--force", action="store_true", help="replace an existing OUT_DIR")


def run(args) -> dict:
    return merge(args.model, args.adapter, args.output, recipe.from_args(MergeParams, args),
                 force=args.force)


def merge(model, adapter, output, params: MergeParams | None = None, force: bool = False,
          **overrides) -> dict:
    """Merge ``adapter`` into ``model`` and write ``output``; return the summary metrics.

    ``params`` (or keyword ``overrides`` of its fields) set the merge. Keys: output,
    tensors_merged, output_bytes, seconds, peak_rss_bytes, summary and, with ``verify``,
    max_abs_logit_delta (peft base+adapter vs merged, fp32).
    """
    import torch

    p = recipe.resolve(MergeParams, params, overrides)
    start = time.time()
    base = files.existing_dir(checkpoint.resolve_model(model, "base model"), "base model")
    adir = files.existing_dir(checkpoint.resolve_model(adapter, "adapter"), "adapter")
    if p.base_model_id is None and card.hub_id_of(base):  # a Hub id found in the local cache
        p = dataclasses.replace(p, base_model_id=card.hub_id_of(base))
    out = files.check_output(output, [base, adir], force)
    config = checkpoint.load_config(base)
    checkpoint.refuse_quantized(config, base, QUANTIZED_FIX)
    lcfg, raw_cfg = lora.adapter_config(adir)
    tensors, a_file = lora.adapter_tensors(adir, p.allow_pickle)
    shards = checkpoint.weight_files(base, p.allow_pickle)
    shapes = checkpoint.tensor_shapes(shards)
    counts.check_counts(config, {n: s for n, (s, _, _) in shapes.items()}, base)
    edits, vocab = lora.plan(config, lcfg, tensors, shapes)
    out_dtype = getattr(torch, DTYPES[p.dtype] if p.dtype != "auto" else _base_dtype(config))
    if vocab is not None and not (adir / "tokenizer.json").is_file():
        raise AdapterError(f"the adapter resizes the vocabulary to {vocab} but {adir} holds no "
                           "tokenizer; save the fine-tuning tokenizer beside the adapter")
    whose, why = choose_tokenizer(base, adir, p.tokenizer, vocab)
    metrics = {}
    with files.atomic_output_dir(out, force) as tmp:
        merged = _write_all(shards, edits, out_dtype, tmp, shapes)
        changes = {"vocab_size": vocab} if vocab is not None else {}
        checkpoint.write_config(tmp, config, str(out_dtype).replace("torch.", ""), **changes)
        files.copy_aux_files(base, tmp)
        if whose == "adapter":  # the tokenizer the fine-tune was trained with (added tokens, template)
            sources.take_tokenizer(adir, tmp)
        metrics = {"tensors_merged": merged, "output_bytes": files.dir_size(tmp),
                   "tokenizer": {"kept": whose, "why": why}}
        if p.verify:
            metrics["max_abs_logit_delta"] = _verify(base, adir, tmp, p.verify, vocab)
        metrics["seconds"] = round(time.time() - start, 2)
        metrics["peak_rss_bytes"] = host.peak_rss_bytes()
        files.write_manifest(tmp, "merge", _parameters(lcfg, p, out_dtype),
                             _inputs(base, adir, a_file, raw_cfg), metrics)
        _write_card(tmp, base, adir, raw_cfg, lcfg, p, config, metrics)
    line = f"merged {out} ({files.human_size(metrics['output_bytes'])}): {merged} tensors merged"
    if p.verify:
        line += f", max |Δlogit| {metrics['max_abs_logit_delta']:.2e} over {p.verify} prompts"
    summary = (f"{line}, {metrics['seconds']:.1f} s, peak RSS {files.human_size(metrics['peak_rss_bytes'])}; "
               f"tokenizer and chat template: the {whose}'s")
    return {"output": str(out), **metrics, "summary": summary}


def choose_tokenizer(base: Path, adir: Path, wanted: str, vocab) -> tuple[str, str]:
    """("base" | "adapter", why): the adapter's saved tokenizer compared with the base's."""
    diff = sources.compare_dirs(base, adir)
    if diff is None:
        if wanted == "adapter":
            raise AdapterError(f"--tokenizer adapter: {adir} holds no tokenizer")
        return "base", "the adapter holds no tokenizer"
    changed = "; ".join(f"{k.replace('_', ' ')}: {v}" for k, v in diff.items() if v)
    if not changed and vocab is None:
        return ("adapter" if wanted == "adapter" else "base"), "the adapter's renders as the base's"
    if wanted == "base":
        if diff["vocabulary"] or vocab is not None:
            raise AdapterError(f"--tokenizer base: the adapter was trained with another vocabulary "
                               f"({diff['vocabulary'] or f'resized to {vocab}'}); the merged weights need it")
        logger.warning("tokenizer: keeping the base's (--tokenizer base); the adapter's differs: %s", changed)
        return "base", f"--tokenizer base; the adapter's differs: {changed}"
    if changed:
        logger.warning("tokenizer: the adapter's saved tokenizer differs from the base's (%s); the output "
                       "gets the adapter's, which the fine-tune was trained with (--tokenizer base keeps "
                       "the base's)", changed)
    return "adapter", "the fine-tune's own" + (f"; it differs from the base's: {changed}" if changed else "")


def _base_dtype(config: dict) -> str:
    name = str(config.get("torch_dtype") or config.get("dtype") or "float32").replace("torch.", "")
    return name if name in DTYPES.values() else "float32"


def _write_all(shards: list[Path], edits: dict, out_dtype, out_dir: Path, shapes: dict) -> int:
    """One output shard per input shard (same names, safetensors), plus the index; return #merged."""
    weight_map, total, merged = {}, 0, 0
    for i, src in enumerate(shards, 1):
        dst = out_dir / re.sub(r"^pytorch_model", "model", src.name).replace(src.suffix, ".safetensors")
        names = [n for n, s in shapes.items() if s[2] == src]
        with tqdm(total=len(names), desc=f"merge {i}/{len(shards)}", unit="tensor", file=sys.stderr,
                  leave=False) as bar:
            n_bytes, n_merged = _write_shard(src, dst, names, shapes, edits, out_dtype, bar)
        total += n_bytes
        merged += n_merged
        weight_map.update({n: dst.name for n in names})
    if len(shards) > 1 or (shards[0].parent / checkpoint.SAFE_INDEX).is_file():
        files.write_json(out_dir / checkpoint.SAFE_INDEX,
                         {"metadata": {"total_size": total}, "weight_map": weight_map})
    return merged


def _write_shard(src, dst, names, shapes, edits, out_dtype, bar) -> tuple[int, int]:
    """Stream a safetensors file: the header from the planned shapes, then each tensor's bytes."""
    import torch

    st = checkpoint.safetensors_dtypes()
    code = {v: k for k, v in st.items()}
    header, offset, plan = {"__metadata__": {"format": "pt"}}, 0, []
    for name in names:
        shape, dtype = shapes[name][0], shapes[name][1]
        dtype = st.get(dtype, dtype) if isinstance(dtype, str) else dtype
        if not isinstance(dtype, torch.dtype):
            raise InputError(f"{src.name}: tensor {name} has dtype {dtype}, which tangquant cannot read")
        edit = edits.get(name)
        if edit and "replace" in edit:
            shape = tuple(edit["replace"].shape)
        dtype = out_dtype if dtype.is_floating_point else dtype
        n = dtype.itemsize * int(torch.Size(shape).numel())
        header[name] = {"dtype": code[dtype], "shape": list(shape), "data_offsets": [offset, offset + n]}
        plan.append((name, dtype, n))
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    written, merged = 0, 0
    with open(dst, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for (name, t), (pname, dtype, n) in zip(checkpoint.read_tensors_unmapped(src), plan):
            if name != pname:
                raise InputError(f"{src.name} changed while it was being read")
            edit = edits.get(name)
            checkpoint.require_finite(t, name, src, fix="the base model is corrupt; nothing was written")
            t = lora.apply(name, t, edit, dtype) if edit else t.to(dtype)
            checkpoint.require_finite(t, f"the merged tensor {name}", f"{dst.name}", fix="the adapter (or "
                                      "the cast to the output dtype) is broken; nothing was written")
            f.write(t.contiguous().reshape(-1).view(torch.uint8).numpy().data)
            written += n
            merged += bool(edit)
            bar.update(1)
    return written, merged


def _render(tokenizer, prompt: str):
    if getattr(tokenizer, "chat_template", None):
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                               add_generation_prompt=True)
    return tokenizer(prompt, return_tensors="pt")["input_ids"]


def _verify(base: Path, adir: Path, merged_dir: Path, n: int, vocab) -> float:
    """max |Δlogit| between peft base+adapter and the merged model (both fp32) over n prompts."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(merged_dir)
    ids = [_render(tok, VERIFY_PROMPTS[i % len(VERIFY_PROMPTS)]) for i in range(n)]
    logger.info("verify: %d prompts through peft base+adapter and the merged model (fp32)", n)
    with torch.no_grad():
        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
        if vocab is not None:
            model.resize_token_embeddings(vocab)
        model = PeftModel.from_pretrained(model, str(adir)).eval()
        ref = [model(x).logits for x in ids]
        del model
        gc.collect()
        merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32).eval()
        return max(float((merged(x).logits - r).abs().max()) for x, r in zip(ids, ref))


def _write_card(tmp: Path, base: Path, adir: Path, raw_cfg: dict, lcfg, p: MergeParams, config: dict,
                metrics: dict) -> None:
    lin = card.lineage(base, p.base_model_id, adapter_base=raw_cfg.get("base_model_name_or_path"))
    tags = ["lora", "merged", "peft"] + ([config["model_type"]] if config.get("model_type") else [])
    name = lin.get("base_model") or base.name
    targets = lcfg.target_modules
    targets = ", ".join(sorted(targets)) if isinstance(targets, (set, list)) else str(targets)
    verify = (f"\nChecked: the logits of {p.verify} prompts through peft base + adapter and through the "
              f"merged model (fp32) differ by at most {metrics['max_abs_logit_delta']:.2e}.\n"
              if "max_abs_logit_delta" in metrics else "")
    body = f"""# {files.final_name(tmp)} — {name} with its LoRA merged

Full-precision weights: the LoRA adapter `{adir.name}` (r {lcfg.r}, alpha {lcfg.lora_alpha},
targets {targets}) folded into `{name}` by `tangquant merge`, exactly as peft merges it (deltas
added in fp32), shard by shard; {metrics['tensors_merged']} tensors changed. It loads like its base
(`AutoModelForCausalLM.from_pretrained`), with the base's tokenizer and chat template.
{verify}
Quantize it with `tangquant quantize --model THIS_DIR --output OUT --recipe recipes/int4-gptq-g128.yaml`.

{card.use_section(QUANTIZE_API)}"""
    card.write(tmp, card.front_matter(lin, "finetune", card.LIBRARY["hf"], tags), body)


def _parameters(lcfg, p: MergeParams, out_dtype) -> dict:
    tm = lcfg.target_modules
    return {**dataclasses.asdict(p), "output_dtype": str(out_dtype).replace("torch.", ""),
            "lora": {"r": lcfg.r, "lora_alpha": lcfg.lora_alpha, "use_rslora": lcfg.use_rslora,
                     "use_dora": lcfg.use_dora, "target_modules": sorted(tm) if isinstance(tm, (set, list)) else tm,
                     "rank_pattern": dict(lcfg.rank_pattern), "alpha_pattern": dict(lcfg.alpha_pattern),
                     "modules_to_save": list(lcfg.modules_to_save or [])}}


def _inputs(base: Path, adir: Path, a_file: Path, raw_cfg: dict) -> dict:
    hashed = {"adapter/" + a_file.name: a_file, "adapter/adapter_config.json": adir / "adapter_config.json",
              "model/config.json": base / "config.json",
              "model/" + checkpoint.SAFE_INDEX: base / checkpoint.SAFE_INDEX}
    return {"model": str(base), "adapter": str(adir),
            "base_model_name_or_path": raw_cfg.get("base_model_name_or_path"),
            "sha256": {k: files.sha256_file(p) for k, p in hashed.items() if p.is_file()}}
