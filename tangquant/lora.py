"""A peft LoRA adapter read, checked against its base and turned into per-tensor edits.

``plan`` checks every adapter tensor against the base's names and shapes (from
safetensors headers, nothing loaded) before anything is written, and returns
the edits; ``apply`` computes one merged tensor in fp32 with peft's exact
semantics (alpha/r or rsLoRA's alpha/sqrt(r), rank/alpha patterns, Conv1D
transposes, embeddings, DoRA magnitudes, LoRA biases, trainable tokens).
"""

from __future__ import annotations

import dataclasses
import math
import re
from pathlib import Path

from tangquant import checkpoint, files
from tangquant.errors import AdapterError, PickleRefusedError, ShapeMismatchError, first_line, short

ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
_PREFIX = "base_model.model."
# Adapter keys: module path + what the tensor is (peft's names with the adapter name removed).
_LORA_KEY = re.compile(r"(?P<module>.+)\.(?P<part>lora_A\.weight|lora_B\.weight|lora_B\.bias|"
                       r"lora_embedding_A|lora_embedding_B|lora_magnitude_vector|"
                       r"token_adapter\.trainable_tokens_delta)$")
# The only transformers models whose linear layers are Conv1D (weights stored [in, out]).
_CONV1D_MODELS = ("gpt2", "openai-gpt", "decision_transformer", "imagegpt")


def adapter_config(adir: Path):
    adir = checkpoint.open_dir(adir, "adapter directory")
    path = adir / "adapter_config.json"
    if not path.is_file():
        raise AdapterError(f"{adir} has no adapter_config.json; is it a peft adapter directory?")
    raw = files.read_json(path, "adapter config")
    if str(raw.get("peft_type", "")).upper() != "LORA":
        raise AdapterError(f"{adir} is a {short(raw.get('peft_type'))} adapter; only LoRA (peft_type "
                           "LORA) can be merged")
    check_numbers(raw, path)
    from peft import LoraConfig, PeftConfig

    try:
        lcfg = PeftConfig.from_pretrained(str(adir))
    except Exception as exc:  # peft raises ValueError/TypeError on bad configs
        raise AdapterError(f"{path} is not a valid LoRA config: {first_line(exc)}") from None
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


def check_numbers(raw: dict, path: Path) -> None:
    """The rank and alpha values peft would divide by or scale with, checked before any use."""
    ranks = {"r": raw.get("r", 8), **{f"rank_pattern[{k!r:.40}]": v
                                      for k, v in _mapping(raw, "rank_pattern", path).items()}}
    for key, r in ranks.items():
        if not isinstance(r, int) or isinstance(r, bool) or r < 1:
            raise AdapterError(f"{path}: {key} must be a positive integer rank, got {short(r)}")
    alphas = {"lora_alpha": raw.get("lora_alpha", 8), **{f"alpha_pattern[{k!r:.40}]": v
                                                         for k, v in _mapping(raw, "alpha_pattern", path).items()}}
    for key, a in alphas.items():
        if not isinstance(a, (int, float)) or isinstance(a, bool) or not math.isfinite(a):
            raise AdapterError(f"{path}: {key} must be a finite number, got {short(a)}")
    if alphas["lora_alpha"] == 0 and not raw.get("alpha_pattern"):
        raise AdapterError(f"{path}: lora_alpha is 0, so the adapter changes no weight; merging it would "
                           "only copy the base (is this the adapter you trained?)")


def _mapping(raw: dict, key: str, path: Path) -> dict:
    value = raw.get(key) or {}
    if not isinstance(value, dict):
        raise AdapterError(f"{path}: {key} must be a mapping, got {short(value)}")
    return value


def adapter_tensors(adir: Path, allow_pickle: bool):
    for name in ADAPTER_WEIGHTS:
        if not (adir / name).is_file():
            continue
        path = checkpoint.inside(adir, name, name)
        if path.suffix == ".bin" and not allow_pickle:
            raise PickleRefusedError(
                f"{adir} holds only pickle adapter weights ({name}); loading a pickle can run arbitrary "
                "code: convert it to safetensors, or pass --allow-pickle if you trust it")
        tensors = dict(checkpoint.iter_tensors(path))
        for key, t in tensors.items():
            checkpoint.require_finite(t, key, path, fix="the adapter is broken (a diverged training run?); "
                                      "nothing was written")
        return tensors, path
    raise AdapterError(f"{adir} has no adapter_model.safetensors")


def plan(config: dict, lcfg, tensors: dict, shapes: dict):
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
    edits = {name: edit for name, edit in edits.items() if edit}
    if not edits:
        raise AdapterError(f"the adapter changes no weight: every LoRA pair has a zero A or B (an "
                           f"untrained adapter?) or a zero alpha; merging it would only copy the base {where}")
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
    if r < 1:
        raise ShapeMismatchError(f"{module}: LoRA A {list(A.shape)} has rank 0 {where}")
    scale = alpha / (r_cfg ** 0.5) if lcfg.use_rslora else alpha / r_cfg
    delta = (A.shape[1], B.shape[0]) if embedding else (B.shape[0], A.shape[1])
    # peft transposes only for Conv1D layers (weights stored [in, out]); it resets fan_in_fan_out otherwise.
    transpose = not embedding and (shape != delta or (
        delta[0] == delta[1] and config.get("model_type") in _CONV1D_MODELS))
    if (shape[::-1] if transpose else shape) != delta:
        raise ShapeMismatchError(f"{wname}: the LoRA delta of the adapter is {list(delta)} but the base "
                                 f"tensor is {list(shape)} {where}")
    # A pair with a zero factor or scale changes nothing (DoRA's magnitudes still may).
    if (scale != 0 and bool(B.any()) and bool(A.any())) or "lora_magnitude_vector" in parts:
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


def apply(name: str, t, edit: dict, out_dtype):
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
