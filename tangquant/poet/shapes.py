"""Random-weight models with the real Qwen1.5-Chat shapes — random weights, speed only.

Builds a Hugging Face model directory whose ``config.json``, tensor names,
shapes, dtype (bf16) and shard sizes are those of Qwen1.5-0.5B/1.8B/7B-Chat,
with normal(0, 0.02) weights, plus a small trained ChatML tokenizer, a
generation config and optionally a random r=8 q/v LoRA adapter in peft's
layout. Used to measure speed and memory; the text such a model writes is
noise. Every output carries a ``README.md`` and a ``config.json`` key saying
"random weights — speed only".

The configurations below are those of Qwen's ``config.json`` files for the
Chat releases (transformers 4.37 era): ``Qwen2ForCausalLM``, silu, q/k/v
biases, no GQA in Qwen1.5 (kv heads = heads), rope_theta 1e6,
max_position_embeddings 32768, rms_norm_eps 1e-6, vocab 151936, bf16;
0.5B ties its embeddings (so no ``lm_head.weight`` is written; the Hub's
0.5B file, 1.24 GB, seems to hold an untied copy too), 1.8B and 7B do not.
Sizes in bf16: 0.5B 0.93 GB, 1.8B 3.67 GB (one file), 7B 15.4 GB (4 shards).

Weights are generated tensor by tensor and streamed straight into the
safetensors files (the header is computed from the shapes first), so the
builder never holds more than one tensor, let alone a full fp32 model.

Usage (``from tangquant.poet import shapes`` in scripts and tests)::

    python -m tangquant.poet.shapes --shape 1.8b --output /tmp/q18 [--adapter /tmp/q18-lora] [--gptq /tmp/q18-gptq]

Needs torch and safetensors (imported by the builders); the tokenizer needs
``tangquant.poet.tiny`` and tokenizers/transformers 4.57 or 5.x.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import struct
import sys
from pathlib import Path

from tangquant.card import RANDOM_WEIGHTS as MARKER

logger = logging.getLogger(__name__)
_COMMON = {
    "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_act": "silu",
    "attention_dropout": 0.0, "initializer_range": 0.02, "max_position_embeddings": 32768,
    "rms_norm_eps": 1e-06, "rope_theta": 1000000.0, "sliding_window": 32768,
    "use_sliding_window": False, "use_cache": True, "vocab_size": 151936,
    "torch_dtype": "bfloat16",
}
# name -> (hidden, intermediate, layers, heads, kv heads, tied embeddings, max_window_layers)
_DIMS = {
    "0.5b": (1024, 2816, 24, 16, 16, True, 21),
    "1.8b": (2048, 5504, 24, 16, 16, False, 21),
    "7b": (4096, 11008, 32, 32, 32, False, 28),
}
SHAPES = tuple(_DIMS)
# Qwen's real checkpoints: 0.5B and 1.8B are single files, 7B is 4 shards of ~4 GB.
MAX_SHARD_BYTES = 4 * 10**9
_DTYPES = {"bf16": ("bfloat16", "BF16", 2), "fp16": ("float16", "F16", 2), "fp32": ("float32", "F32", 4)}
_TEXTS = [
    "床前明月光，疑是地上霜。舉頭望明月，低頭思故鄉。",
    "白日依山盡，黃河入海流。欲窮千里目，更上一層樓。",
    "春眠不覺曉，處處聞啼鳥。夜來風雨聲，花落知多少。",
    "千山鳥飛絕，萬徑人蹤滅。孤舟蓑笠翁，獨釣寒江雪。",
    "朝辭白帝彩雲間，千里江陵一日還。兩岸猿聲啼不住，輕舟已過萬重山。",
    "写一首唐诗。写一首关于明月的诗。以《春晓》为题写一首诗。写一首五言绝句。",
    "You are a helpful assistant. Write a Tang poem about the moon, the river and spring.",
    "system user assistant 0123456789 the quick brown fox jumps over the lazy dog",
]


def qwen_config(shape: str) -> dict:
    """The ``config.json`` of Qwen1.5-{shape}-Chat (special token ids set later)."""
    key = shape.lower().removesuffix("-chat")
    if key not in _DIMS:
        raise ValueError(f"unknown shape {shape!r}; choose one of {', '.join(SHAPES)}")
    hidden, inter, layers, heads, kv, tied, mwl = _DIMS[key]
    return {**_COMMON, "hidden_size": hidden, "intermediate_size": inter,
            "num_hidden_layers": layers, "num_attention_heads": heads,
            "num_key_value_heads": kv, "tie_word_embeddings": tied, "max_window_layers": mwl,
            "bos_token_id": 151643, "eos_token_id": 151645}


def tensor_shapes(config: dict) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every tensor of a Qwen2ForCausalLM checkpoint, in checkpoint order."""
    h, inter = config["hidden_size"], config["intermediate_size"]
    head_dim = h // config["num_attention_heads"]
    kv = config["num_key_value_heads"] * head_dim
    out = [("model.embed_tokens.weight", (config["vocab_size"], h))]
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        out += [
            (p + "input_layernorm.weight", (h,)),
            (p + "self_attn.q_proj.weight", (h, h)), (p + "self_attn.q_proj.bias", (h,)),
            (p + "self_attn.k_proj.weight", (kv, h)), (p + "self_attn.k_proj.bias", (kv,)),
            (p + "self_attn.v_proj.weight", (kv, h)), (p + "self_attn.v_proj.bias", (kv,)),
            (p + "self_attn.o_proj.weight", (h, h)),
            (p + "post_attention_layernorm.weight", (h,)),
            (p + "mlp.gate_proj.weight", (inter, h)), (p + "mlp.up_proj.weight", (inter, h)),
            (p + "mlp.down_proj.weight", (h, inter)),
        ]
    out.append(("model.norm.weight", (h,)))
    if not config.get("tie_word_embeddings"):
        out.append(("lm_head.weight", (config["vocab_size"], h)))
    return out


def _split_shards(shapes, itemsize: int, max_bytes: int) -> list[list[tuple[str, tuple]]]:
    shards, cur, cur_bytes = [], [], 0
    for name, shape in shapes:
        n = math.prod(shape) * itemsize
        if cur and cur_bytes + n > max_bytes:
            shards.append(cur)
            cur, cur_bytes = [], 0
        cur.append((name, shape))
        cur_bytes += n
    return shards + [cur] if cur else shards


def _fill(name: str, shape: tuple, gen, torch_dtype, std: float, out_file) -> None:
    """Write one tensor's bytes in row chunks (bounded memory even for the embeddings)."""
    import torch

    if name.endswith("norm.weight"):
        # RMSNorm weights near 1, as in a trained model.
        t = 1.0 + 0.02 * torch.randn(shape, generator=gen)
        out_file.write(t.to(torch_dtype).view(torch.uint8).numpy().tobytes())
        return
    rows = shape[0]
    per_row = math.prod(shape[1:]) if len(shape) > 1 else 1
    step = max(1, (32 * 2**20) // per_row)
    for start in range(0, rows, step):
        n = min(step, rows - start)
        chunk = torch.randn((n, per_row), generator=gen).mul_(std).to(torch_dtype)
        out_file.write(chunk.view(torch.uint8).numpy().tobytes())


def _write_safetensors(path: Path, entries, dtype: str, seed: int, std: float) -> int:
    """Stream one safetensors file: header from the shapes, then each tensor's bytes."""
    import torch

    torch_name, st_name, itemsize = _DTYPES[dtype]
    torch_dtype = getattr(torch, torch_name)
    header, offset = {"__metadata__": {"format": "pt", "tangquant_shapes": MARKER}}, 0
    for name, shape in entries:
        n = math.prod(shape) * itemsize
        header[name] = {"dtype": st_name, "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":"), ensure_ascii=True).encode()
    raw += b" " * (-len(raw) % 8)  # safetensors aligns the data start to 8 bytes
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for name, shape in entries:
            # A per-tensor seed keeps every tensor reproducible whatever the sharding.
            gen = torch.Generator().manual_seed(seed * 1_000_003 + _stable_hash(name))
            _fill(name, shape, gen, torch_dtype, std, f)
    return offset


def _stable_hash(name: str) -> int:
    import zlib

    return zlib.crc32(name.encode())


def _save_tokenizer(out_dir: Path, config: dict) -> None:
    from transformers import GenerationConfig

    from tangquant.poet.tiny import train_tokenizer

    tok = train_tokenizer(_TEXTS * 8, vocab_size=1024, min_frequency=1)
    tok.save_pretrained(out_dir)
    end, im_end = tok.convert_tokens_to_ids("<|endoftext|>"), tok.convert_tokens_to_ids("<|im_end|>")
    config.update(bos_token_id=end, eos_token_id=im_end)
    # Qwen1.5-Chat's own sampling settings, so speed runs sample like the real model.
    GenerationConfig(
        bos_token_id=end, pad_token_id=end, eos_token_id=[im_end, end], do_sample=True,
        repetition_penalty=1.05, temperature=0.7, top_p=0.8, top_k=20, max_new_tokens=512,
    ).save_pretrained(out_dir)


def _readme(out_dir: Path, what: str) -> None:
    (out_dir / "README.md").write_text(
        f"# {what}\n\n**{MARKER}.** Built by `python -m tangquant.poet.shapes` with "
        "normal(0, 0.02) weights: the shapes, dtype and shard sizes are the real ones, "
        "the text it writes is noise. Use it to measure speed and memory only.\n",
        encoding="utf-8")


def build_shape(shape: str, out_dir, seed: int = 0, dtype: str = "bf16",
                max_shard_bytes: int = MAX_SHARD_BYTES, std: float = 0.02, layers: int | None = None) -> Path:
    """Write a random-weight Qwen1.5-{shape}-Chat model directory; return its path. ``layers``: only
    that many decoder layers (a cut of the shape: every width true, for per-layer measurements)."""
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(_DTYPES)}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    config = qwen_config(shape)
    if layers is not None:
        config.update(num_hidden_layers=layers, max_window_layers=min(layers, config["max_window_layers"]))
    config["torch_dtype"] = _DTYPES[dtype][0]
    config["tangquant_random_weights"] = MARKER
    _save_tokenizer(out_dir, config)
    shards = _split_shards(tensor_shapes(config), _DTYPES[dtype][2], max_shard_bytes)
    names = ["model.safetensors"] if len(shards) == 1 else [
        f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)]
    total, weight_map = 0, {}
    for fname, entries in zip(names, shards):
        logger.info("writing %s (%d tensors)", fname, len(entries))
        total += _write_safetensors(out_dir / fname, entries, dtype, seed, std)
        weight_map.update({name: fname for name, _ in entries})
    if len(shards) > 1:
        _dump(out_dir / "model.safetensors.index.json",
              {"metadata": {"total_size": total}, "weight_map": weight_map})
    _dump(out_dir / "config.json", config)
    _readme(out_dir, f"Qwen1.5-{shape.upper()}-Chat shape")
    return out_dir


def _dump(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def build_gptq(shape, out_dir, seed: int = 0, group_size: int = 128,
               max_shard_bytes: int = MAX_SHARD_BYTES) -> Path:
    """A random symmetric INT4 GPTQ checkpoint of Qwen1.5-{shape}-Chat (or of a config dict's
    shape); return its path.

    The layout and bytes of ``tangquant quantize --bits 4 --sym --group-size G`` (GPTQ v1:
    qweight/qzeros/scales/g_idx, fp16 biases, embeddings, norms and head), with uniformly random
    integers: what a speed run needs, without the minutes RTN or GPTQ spend at 7B."""
    import torch

    from tangquant import checkpoint, gptq

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    config = dict(shape) if isinstance(shape, dict) else qwen_config(shape)
    config["tangquant_random_weights"] = MARKER
    _save_tokenizer(out_dir, config)
    writer = checkpoint.ShardWriter(out_dir, max_shard_bytes, metadata={"tangquant_shapes": MARKER})
    zero_word = 0x77777777  # v1 stores zero - 1 = 7 in each nibble
    for name, shape_ in tensor_shapes(config):
        gen = torch.Generator().manual_seed(seed * 1_000_003 + _stable_hash(name))
        module, _, leaf = name.rpartition(".")
        if leaf == "weight" and module.endswith("_proj"):
            out_f, in_f = shape_
            groups = in_f // group_size
            # Random int32 words hold uniformly random nibbles: random INT4 integers.
            words = torch.randint(0, 256, (in_f // 8 * out_f * 4,), generator=gen, dtype=torch.uint8)
            writer.add(f"{module}.qweight", words.view(torch.int32).reshape(in_f // 8, out_f))
            writer.add(f"{module}.qzeros", torch.full((groups, out_f // 8), zero_word, dtype=torch.int32))
            scales = 0.004 * (0.5 + torch.rand((groups, out_f), generator=gen))
            writer.add(f"{module}.scales", scales.to(torch.float16))
            writer.add(f"{module}.g_idx", (torch.arange(in_f) // group_size).to(torch.int32))
        elif name.endswith("norm.weight"):
            writer.add(name, (1.0 + 0.02 * torch.randn(shape_, generator=gen)).to(torch.float16))
        else:  # embeddings, head, q/k/v biases
            writer.add(name, (0.02 * torch.randn(shape_, generator=gen)).to(torch.float16))
    writer.close()
    checkpoint.write_config(out_dir, config, "float16", gptq.quantization_config(
        bits=4, group_size=group_size, sym=True, desc_act=False, damp_percent=0.01))
    what = "a test" if isinstance(shape, dict) else f"Qwen1.5-{shape.upper()}-Chat"
    _readme(out_dir, f"{what} shape, random symmetric INT4 GPTQ g{group_size}")
    return out_dir


def build_adapter(shape_or_config_dir, out_dir, r: int = 8, alpha: int = 16,
                  targets=("q_proj", "v_proj"), seed: int = 0) -> Path:
    """A random LoRA adapter (A and B non-zero) in peft's on-disk layout; return its path."""
    import torch
    from safetensors.torch import save_file

    src = Path(str(shape_or_config_dir))
    if (src / "config.json").is_file():
        config = json.loads((src / "config.json").read_text(encoding="utf-8"))
        base_name = str(src.resolve())
    else:
        config = qwen_config(str(shape_or_config_dir))
        base_name = f"Qwen/Qwen1.5-{str(shape_or_config_dir).upper()}-Chat"
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, shape in tensor_shapes(config):
        module = name.rsplit(".", 1)[0]
        if not name.endswith(".weight") or module.rsplit(".", 1)[-1] not in targets:
            continue
        out_f, in_f = shape
        prefix = f"base_model.model.{module}"
        # A like peft's kaiming init, B non-zero so the merge really changes the weights.
        tensors[prefix + ".lora_A.weight"] = torch.randn((r, in_f), generator=gen) / math.sqrt(in_f)
        tensors[prefix + ".lora_B.weight"] = torch.randn((out_f, r), generator=gen) * 0.01
    if not tensors:
        raise ValueError(f"no module of this model is named like {targets}")
    save_file(tensors, str(out_dir / "adapter_model.safetensors"), metadata={"format": "pt"})
    _dump(out_dir / "adapter_config.json", {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_name,
        "r": r, "lora_alpha": alpha, "lora_dropout": 0.0, "target_modules": list(targets),
        "bias": "none", "fan_in_fan_out": False, "inference_mode": True,
        "init_lora_weights": True, "modules_to_save": None, "rank_pattern": {},
        "alpha_pattern": {}, "use_rslora": False, "use_dora": False,
        "layers_to_transform": None, "layers_pattern": None, "revision": None,
    })
    _readme(out_dir, f"Random r={r} alpha={alpha} LoRA on {', '.join(targets)}")
    return out_dir


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", required=True, choices=SHAPES)
    parser.add_argument("--output", help="model directory to write")
    parser.add_argument("--adapter", help="also write a random r=8 alpha=16 q/v LoRA here")
    parser.add_argument("--gptq", help="also write a random symmetric INT4 g128 GPTQ checkpoint here")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", default="bf16", choices=tuple(_DTYPES))
    parser.add_argument("--layers", type=int, help="--output with only this many decoder layers (a cut)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    if not (args.output or args.adapter or args.gptq):
        parser.error("nothing to write: give --output, --adapter or --gptq")
    for d in filter(None, (args.output, args.adapter, args.gptq)):
        if Path(d).exists() and any(Path(d).iterdir()):
            parser.error(f"{d} exists and is not empty")
    if args.output:
        build_shape(args.shape, args.output, seed=args.seed, dtype=args.dtype, layers=args.layers)
        print(f"model: {args.output} ({MARKER})")
    if args.adapter:
        build_adapter(args.output or args.shape, args.adapter, seed=args.seed)
        print(f"adapter: {args.adapter} ({MARKER})")
    if args.gptq:
        build_gptq(args.shape, args.gptq, seed=args.seed)
        print(f"gptq: {args.gptq} ({MARKER})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
