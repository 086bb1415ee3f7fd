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

import logging
import re
import sys
import time
from pathlib import Path

from tangquant import checkpoint, files
from tangquant.errors import AdapterError, InputError, NumericalError, ShapeMismatchError

logger = logging.getLogger(__name__)

HELP = "fold a LoRA adapter into its full-precision base (exact, streaming, low memory)"
DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
_PREFIX = "base_model.model."
# Adapter keys: module path + what the tensor is (peft's names with the adapter name removed).
_LORA_KEY = re.compile(r"(?P<module>.+)\.(?P<part>lora_A\.weight|lora_B\.weight|lora_B\.bias|"
                       r"lora_embedding_A|lora_embedding_B|lora_magnitude_vector|"
                       r"token_adapter\.trainable_tokens_delta)$")
# The only transformers models whose linear layers are Conv1D (weights stored [in, out]).
_CONV1D_MODELS = ("gpt2", "openai-gpt", "decision_transformer", "imagegpt")
QUANTIZED_FIX = ("merge into the full-precision base (e.g. Qwen/Qwen1.5-7B-Chat), then quantize "
                 "the merged model with `tangquant quantize`")
VERIFY_PROMPTS = ("寫一首唐詩", "寫一首關於明月的五言絕句", "以《春曉》為題寫一首詩", "寫一首思鄉的七言絕句",
                  "寫一首描寫江雪的詩", "寫一首送別友人的詩", "寫一首登高望遠的詩", "寫一首關於秋夜的詩")


def add_arguments(parser) -> None:
    parser.add_argument("--model", required=True, metavar="BASE_DIR", help="full-precision base model")
    parser.add_argument("--adapter", required=True, metavar="ADAPTER_DIR", help="peft LoRA adapter")
    parser.add_argument("--output", required=True, metavar="OUT_DIR", help="merged model to write")
    parser.add_argument("--dtype", default="auto", choices=("auto", *DTYPES),
                        help="output dtype (default: the base's torch_dtype)")
    parser.add_argument("--verify", type=int, default=0, metavar="N",
                        help="compare the logits of N Tang-poem prompts through peft base+adapter "
                             "and the merged model (fp32: needs 4 bytes of RAM per parameter)")
    parser.add_argument("--force", action="store_true", help="replace an existing OUT_DIR")
    parser.add_argument("--allow-pickle", action="store_true",
                        help="accept .bin (pickle) weights, loaded with torch.load(weights_only=True)")


def run(args) -> int:
    merge(args.model, args.adapter, args.output, dtype=args.dtype, verify=args.verify,
          force=args.force, allow_pickle=args.allow_pickle)
    return 0


def merge(model, adapter, output, dtype: str = "auto", verify: int = 0, force: bool = False,
          allow_pickle: bool = False) -> dict:
    """Merge ``adapter`` into ``model`` and write ``output``; return the summary metrics.

    Keys: output, tensors_merged, output_bytes, seconds, peak_rss_bytes and, with
    ``verify``, max_abs_logit_delta (peft base+adapter vs merged, fp32).
    """
    import torch

    start = time.time()
    base = files.existing_dir(model, "base model")
    adir = files.existing_dir(adapter, "adapter")
    out = files.check_output(output, [base, adir], force)
    if dtype != "auto" and dtype not in DTYPES:
        raise InputError(f"--dtype must be auto or one of {', '.join(DTYPES)}")
    if verify < 0:
        raise InputError("--verify must be 0 or a positive number of prompts")
    config = checkpoint.load_config(base)
    checkpoint.refuse_quantized(config, base, QUANTIZED_FIX)
    lcfg, raw_cfg = _adapter_config(adir)
    tensors, a_file = _adapter_tensors(adir, allow_pickle)
    shards = checkpoint.weight_files(base, allow_pickle)
    shapes = _base_shapes(shards)
    edits, vocab = _plan(config, lcfg, tensors, shapes)
    out_dtype = getattr(torch, DTYPES[dtype] if dtype != "auto" else _base_dtype(config))
    if vocab is not None and not (adir / "tokenizer.json").is_file():
        raise AdapterError(f"the adapter resizes the vocabulary to {vocab} but {adir} holds no "
                           "tokenizer; save the fine-tuning tokenizer beside the adapter")
    metrics = {}
    with files.atomic_output_dir(out) as tmp:
        merged = _write_all(shards, edits, out_dtype, tmp, shapes)
        _write_config(config, out_dtype, vocab, tmp)
        files.copy_aux_files(base, tmp)
        if vocab is not None:  # the adapter's tokenizer holds the added tokens
            files.copy_aux_files(adir, tmp)
        metrics = {"tensors_merged": merged, "output_bytes": files.dir_size(tmp)}
        if verify:
            metrics["max_abs_logit_delta"] = _verify(base, adir, tmp, verify, vocab)
        metrics["seconds"] = round(time.time() - start, 2)
        metrics["peak_rss_bytes"] = files.peak_rss_bytes()
        files.write_manifest(tmp, "merge", _parameters(lcfg, dtype, out_dtype, verify, allow_pickle),
                             _inputs(base, adir, a_file, raw_cfg), metrics)
    line = (f"merged {out} ({files.human_size(metrics['output_bytes'])}): {merged} tensors merged")
    if verify:
        line += f", max |Δlogit| {metrics['max_abs_logit_delta']:.2e} over {verify} prompts"
    print(f"{line}, {metrics['seconds']:.1f} s, peak RSS {files.human_size(metrics['peak_rss_bytes'])}")
    return {"output": str(out), **metrics}


def _adapter_config(adir: Path):
    path = adir / "adapter_config.json"
    if not path.is_file():
        raise AdapterError(f"{adir} has no adapter_config.json; is it a peft adapter directory?")
    raw = files.read_json(path, "adapter config")
    if str(raw.get("peft_type", "")).upper() != "LORA":
        raise AdapterError(f"{adir} is a {raw.get('peft_type')!r} adapter; only LoRA (peft_type LORA) "
                           "can be merged")
    import dataclasses

    from peft import LoraConfig, PeftConfig

    try:
        lcfg = PeftConfig.from_pretrained(str(adir))
    except Exception as exc:  # peft raises ValueError/TypeError on bad configs
        raise AdapterError(f"{path} is not a valid LoRA config: {exc}") from None
    # Variants whose forward is not W + s*B@A (and is not DoRA) have no exact merge here.
    for field in dataclasses.fields(LoraConfig):
        if field.metadata.get("is_lora_variant") and field.name != "use_dora" and getattr(lcfg, field.name):
            raise AdapterError(f"the adapter uses the LoRA variant {field.name}, which tangquant cannot "
                               "merge exactly")
    if str(lcfg.init_lora_weights).startswith("mica"):
        raise AdapterError("the adapter uses the MiCA LoRA variant, which tangquant cannot merge exactly")
    for name in ("layer_replication", "target_parameters"):
        if getattr(lcfg, name, None):
            raise AdapterError(f"the adapter sets {name}, which tangquant cannot merge")
    return lcfg, raw


def _adapter_tensors(adir: Path, allow_pickle: bool):
    for name in ADAPTER_WEIGHTS:
        path = adir / name
        if not path.is_file():
            continue
        if path.suffix == ".bin" and not allow_pickle:
            from tangquant.errors import PickleRefusedError

            raise PickleRefusedError(
                f"{adir} holds only pickle adapter weights ({name}); loading a pickle can run arbitrary "
                "code: convert it to safetensors, or pass --allow-pickle if you trust it")
        return {k: v for k, v in checkpoint.iter_tensors(path)}, path
    raise AdapterError(f"{adir} has no adapter_model.safetensors")


def _base_shapes(shards: list[Path]) -> dict:
    """name -> (shape, dtype, shard) from safetensors headers, without loading any tensor."""
    shapes = {}
    for path in shards:
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as f:
                for name in f.keys():
                    sl = f.get_slice(name)
                    shapes[name] = (tuple(sl.get_shape()), sl.get_dtype(), path)
        else:
            for name, t in checkpoint.iter_tensors(path):
                shapes[name] = (tuple(t.shape), t.dtype, path)
    return shapes


def _base_dtype(config: dict) -> str:
    name = str(config.get("torch_dtype") or config.get("dtype") or "float32").replace("torch.", "")
    return name if name in DTYPES.values() else "float32"


def _plan(config: dict, lcfg, tensors: dict, shapes: dict):
    """Check every adapter tensor against the base's names and shapes; return (edits, new vocab)."""
    where = f"(the adapter was made for {lcfg.base_model_name_or_path or 'an unnamed base'})"
    modules, full = {}, {}
    for key, t in tensors.items():
        name = key[len(_PREFIX):] if key.startswith(_PREFIX) else key
        m = _LORA_KEY.fullmatch(name)
        if m:
            modules.setdefault(m["module"], {})[m["part"]] = t
        elif ".original_module." in name:
            continue  # the pre-training copy kept beside a module_to_save; the trained copy wins
        elif "lora_" in name:
            raise AdapterError(f"the adapter holds {key}, a LoRA tensor tangquant does not know")
        else:  # modules_to_save and saved embedding layers replace the base tensor, as peft loads them
            full[name.replace(".base_layer.", ".").replace(".modules_to_save.", ".")] = t
    if not modules and not full:
        raise AdapterError(f"the adapter holds no LoRA weights {where}")
    # transformers re-ties at load time whenever the config says so, whatever the checkpoint holds.
    tied = config.get("tie_word_embeddings", "lm_head.weight" not in shapes)
    if tied and any(n.endswith(("embed_tokens", "lm_head", "embed_tokens.weight", "lm_head.weight"))
                    for n in [*modules, *full]):
        raise AdapterError("the base ties lm_head to embed_tokens, so changing either would also "
                           "change the other, unlike the adapter; this is not supported")
    missing = [m for m in modules if f"{m}.weight" not in shapes]
    if missing and len(missing) == len(modules):
        raise AdapterError(f"no LoRA key of the adapter matches the base: none of its {len(modules)} "
                           f"modules (e.g. {missing[0]}) exist in the base {where}")
    if missing:
        raise AdapterError(f"the adapter targets {missing[0]} but the base has no {missing[0]}.weight {where}")
    edits, vocab = {}, None
    for name, t in full.items():
        vocab = _check_full(name, t, shapes, vocab, where)
        edits[name] = {"replace": t}
    for module, parts in modules.items():
        _check_module(module, parts, lcfg, where)
        _plan_module(module, parts, lcfg, config, shapes, edits, where)
    return edits, vocab


def _check_full(name, t, shapes, vocab, where):
    if name not in shapes:
        raise AdapterError(f"the adapter holds {name}, which the base does not have {where}")
    base_shape = shapes[name][0]
    if tuple(t.shape) == base_shape:
        return vocab
    resized = (name.endswith(("embed_tokens.weight", "lm_head.weight")) and t.dim() == 2
               and tuple(t.shape[1:]) == base_shape[1:])
    if not resized or (vocab is not None and vocab != t.shape[0]):
        raise ShapeMismatchError(f"{name}: the adapter's tensor is {list(t.shape)} but the base's is "
                                 f"{list(base_shape)} {where}")
    return int(t.shape[0])


def _check_module(module, parts, lcfg, where):
    for a, b in (("lora_A.weight", "lora_B.weight"), ("lora_embedding_A", "lora_embedding_B")):
        if (a in parts) != (b in parts):
            have, lack = (a, b) if a in parts else (b, a)
            raise AdapterError(f"half a LoRA pair: the adapter has {module}.{have} but no {module}.{lack}")
    if "token_adapter.trainable_tokens_delta" in parts:
        return
    from peft.tuners.tuners_utils import check_target_module_exists

    tm = lcfg.target_modules
    targeted = (not module.endswith("lm_head")) if tm == "all-linear" else (
        tm is None or check_target_module_exists(lcfg, module))
    if not targeted or type(targeted).__name__ == "_ExcludedModule":
        raise AdapterError(f"the adapter holds LoRA weights for {module}, which its target_modules "
                           f"{tm} do not select (peft would silently ignore them) {where}")


def _plan_module(module, parts, lcfg, config, shapes, edits, where):
    import torch
    from peft.utils.other import get_pattern_key

    wname = f"{module}.weight"
    shape = tuple(edits[wname]["replace"].shape) if "replace" in edits.get(wname, {}) else shapes[wname][0]
    edit = edits.setdefault(wname, {})
    if "token_adapter.trainable_tokens_delta" in parts:
        idx = _token_indices(lcfg, module)
        rows = parts["token_adapter.trainable_tokens_delta"]
        if len(shape) != 2 or tuple(rows.shape) != (len(idx), shape[1]) or max(idx) >= shape[0]:
            raise ShapeMismatchError(f"{wname}: trainable token rows {list(rows.shape)} for indices "
                                     f"{idx} do not fit the base's {list(shape)} {where}")
        edit["rows"] = (torch.tensor(idx), rows)
    embedding = "lora_embedding_A" in parts
    if not embedding and "lora_A.weight" not in parts:
        if set(parts) - {"token_adapter.trainable_tokens_delta"}:
            raise AdapterError(f"the adapter has {module}.{sorted(parts)[0]} without its LoRA pair")
        return
    A, B = (parts["lora_embedding_A"], parts["lora_embedding_B"]) if embedding else (
        parts["lora_A.weight"], parts["lora_B.weight"])
    r = A.shape[0]
    r_cfg = lcfg.rank_pattern.get(get_pattern_key(lcfg.rank_pattern.keys(), module), lcfg.r)
    alpha = lcfg.alpha_pattern.get(get_pattern_key(lcfg.alpha_pattern.keys(), module), lcfg.lora_alpha)
    if A.dim() != 2 or B.dim() != 2 or B.shape[1] != r or r != r_cfg:
        raise ShapeMismatchError(f"{module}: LoRA A {list(A.shape)} and B {list(B.shape)} do not "
                                 f"make a rank-{r_cfg} pair as adapter_config.json says {where}")
    scale = alpha / (r_cfg ** 0.5) if lcfg.use_rslora else alpha / r_cfg
    delta = (A.shape[1], B.shape[0]) if embedding else (B.shape[0], A.shape[1])
    # peft transposes only for Conv1D layers (weights stored [in, out]); it resets fan_in_fan_out otherwise.
    transpose = not embedding and (shape != delta or (
        delta[0] == delta[1] and config.get("model_type") in _CONV1D_MODELS))
    if (shape[::-1] if transpose else shape) != delta:
        raise ShapeMismatchError(f"{wname}: the LoRA delta of the adapter is {list(delta)} but the base "
                                 f"tensor is {list(shape)} {where}")
    edit["delta"] = (B, A, scale, transpose or embedding)
    if "lora_magnitude_vector" in parts:
        m = parts["lora_magnitude_vector"]
        if embedding or transpose:
            raise AdapterError(f"{module}: DoRA on embedding or Conv1D layers is not supported")
        if tuple(m.shape) != (shape[0],):
            raise ShapeMismatchError(f"{module}.lora_magnitude_vector is {list(m.shape)}, expected "
                                     f"[{shape[0]}] {where}")
        edit["magnitude"] = m
    elif lcfg.use_dora:
        raise AdapterError(f"the adapter uses DoRA but has no {module}.lora_magnitude_vector")
    if "lora_B.bias" in parts:
        bname = f"{module}.bias"
        if bname not in shapes or shapes[bname][0] != tuple(parts["lora_B.bias"].shape):
            raise ShapeMismatchError(f"{module}: the adapter has a LoRA bias but the base has no "
                                     f"matching {bname} {where}")
        edits.setdefault(bname, {})["bias"] = (parts["lora_B.bias"], scale)


def _token_indices(lcfg, module: str) -> list[int]:
    spec = lcfg.trainable_token_indices
    if isinstance(spec, dict):
        for key, idx in spec.items():
            if module == key or module.endswith("." + key):
                return list(idx)
        raise AdapterError(f"trainable_token_indices names no indices for {module}")
    if not spec:
        raise AdapterError(f"the adapter has trainable token rows for {module} but no trainable_token_indices")
    return list(spec)


def _apply(name: str, t, edit: dict, out_dtype):
    """The merged tensor: base (or the adapter's replacement) + the LoRA delta, in fp32."""
    import torch

    w = edit.get("replace", t).to(torch.float32, copy=True)
    if "delta" in edit:
        B, A, scale, transpose = edit["delta"]
        d = B.to(torch.float32) @ A.to(torch.float32)
        w += (d.t() if transpose else d) * scale
        if "magnitude" in edit:  # DoRA: rescale each output row to the learned magnitude
            norm = torch.linalg.norm(w, dim=1)
            w = (edit["magnitude"].to(torch.float32) / norm).view(-1, 1) * w
    if "bias" in edit:
        bias, scale = edit["bias"]
        w += bias.to(torch.float32) * scale
    if "rows" in edit:
        idx, rows = edit["rows"]
        w.index_copy_(0, idx, rows.to(torch.float32))
    return w.to(out_dtype)


def _st_dtypes() -> dict:
    import torch

    return {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
            "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
            "U8": torch.uint8, "BOOL": torch.bool}


def _write_all(shards: list[Path], edits: dict, out_dtype, out_dir: Path, shapes: dict) -> int:
    """One output shard per input shard (same names, safetensors), plus the index; return #merged."""
    from tqdm import tqdm

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
    import json
    import struct

    import torch

    st = _st_dtypes()
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
        for (name, t), (pname, dtype, n) in zip(_read_tensors(src), plan):
            if name != pname:
                raise InputError(f"{src.name} changed while it was being read")
            edit = edits.get(name)
            t = _apply(name, t, edit, dtype) if edit else t.to(dtype)
            if (edit or dtype == torch.float16) and t.is_floating_point() and not torch.isfinite(t).all():
                raise NumericalError(f"the merged tensor {name} holds NaN or Inf; the adapter (or the "
                                     "cast to the output dtype) is broken; nothing was written")
            f.write(t.contiguous().reshape(-1).view(torch.uint8).numpy().data)
            written += n
            merged += bool(edit)
            bar.update(1)
    return written, merged


def _read_tensors(path: Path):
    """Yield (name, tensor) of one shard through plain reads, one tensor at a time.

    A memory map would leave every page of the shard resident (and counted in
    RSS) until the file is closed; reading each tensor into its own buffer keeps
    the merge's footprint near its largest tensor instead of its largest shard.
    """
    if path.suffix != ".safetensors":
        yield from checkpoint.iter_tensors(path)
        return
    import json
    import struct

    import torch

    st = _st_dtypes()
    with open(path, "rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(size))
        header.pop("__metadata__", None)
        for name in checkpoint.tensor_names(path):  # the order _base_shapes used
            info = header[name]
            start, end = info["data_offsets"]
            buf = torch.empty(end - start, dtype=torch.uint8)
            f.seek(8 + size + start)
            if f.readinto(buf.numpy()) != end - start:
                raise InputError(f"{path} is truncated at tensor {name}")
            yield name, buf.view(st[info["dtype"]]).reshape(info["shape"])


def _write_config(config: dict, out_dtype, vocab, out_dir: Path) -> None:
    config = dict(config)
    config["torch_dtype"] = str(out_dtype).replace("torch.", "")
    if "dtype" in config:  # transformers 5 writes this key instead
        config["dtype"] = config["torch_dtype"]
    if vocab is not None:
        config["vocab_size"] = vocab
    files.write_json(out_dir / "config.json", config)


def _render(tokenizer, prompt: str):
    if getattr(tokenizer, "chat_template", None):
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                               add_generation_prompt=True)
    return tokenizer(prompt, return_tensors="pt")["input_ids"]


def _verify(base: Path, adir: Path, merged_dir: Path, n: int, vocab) -> float:
    """max |Δlogit| between peft base+adapter and the merged model (both fp32) over n prompts."""
    import gc

    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(merged_dir)
    ids = [_render(tok, VERIFY_PROMPTS[i % len(VERIFY_PROMPTS)]) for i in range(n)]
    logger.info("verify: %d prompts through peft base+adapter and the merged model (fp32)", n)
    with torch.no_grad():
        model = AutoModelForCausalLM.from_pretrained(base, torch_dtype=torch.float32)
        if vocab is not None:
            model.resize_token_embeddings(vocab)
        model = PeftModel.from_pretrained(model, str(adir)).eval()
        ref = [model(x).logits for x in ids]
        del model
        gc.collect()
        merged = AutoModelForCausalLM.from_pretrained(merged_dir, torch_dtype=torch.float32).eval()
        return max(float((merged(x).logits - r).abs().max()) for x, r in zip(ids, ref))


def _parameters(lcfg, dtype: str, out_dtype, verify: int, allow_pickle: bool) -> dict:
    tm = lcfg.target_modules
    return {"dtype": dtype, "output_dtype": str(out_dtype).replace("torch.", ""), "verify": verify,
            "allow_pickle": allow_pickle,
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
