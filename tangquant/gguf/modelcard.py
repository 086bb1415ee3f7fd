"""The GGUF export's model card and ollama ``Modelfile``: how to run the file in llama.cpp and ollama."""

from __future__ import annotations

from pathlib import Path

from tangquant import card, files
from tangquant.chatforms import sources

# ollama's own ChatML template (its template/chatml.gotmpl), which renders every turn of a chat from
# .Messages: an old-style template (.System/.Prompt/.Response) is re-rendered by ollama once per
# earlier turn, and one with nothing after {{ .Response }} leaves each earlier reply without its
# <|im_end|>. SYSTEM is the default system prompt of the model's own template, when it has one
# (ollama puts it first when a chat brings none, as the template does).
MODELFILE = '''FROM ./{file}
TEMPLATE """{{{{- range .Messages }}}}<|im_start|>{{{{ .Role }}}}
{{{{ .Content }}}}<|im_end|>
{{{{ end }}}}<|im_start|>assistant
"""
{system}PARAMETER stop "<|im_end|>"
PARAMETER stop "<|endoftext|>"
'''


EVAL_API = """from tangquant import evaluate
print(evaluate("THIS_DIR/FILE", "SOURCE_DIR", "heldout.json")["kld"])   # the KL statistics of these weights"""


def write_modelfile(out_dir: Path, gguf_file: str, system: str | None = None) -> Path:
    """The Modelfile beside the GGUF; ``system`` defaults to the default system prompt of the chat
    template among the tokenizer files in ``out_dir``."""
    if system is None:
        system = _default_system(Path(out_dir))
    line = f'SYSTEM """{system}"""\n' if system else ""
    path = Path(out_dir) / "Modelfile"
    path.write_text(MODELFILE.format(file=gguf_file, system=line), encoding="utf-8")
    return path


def _default_system(out_dir: Path) -> str | None:
    if not sources.has_tokenizer(out_dir):
        return None
    from transformers import AutoTokenizer

    return sources.default_system(AutoTokenizer.from_pretrained(str(out_dir), trust_remote_code=False))


def write_card(out_dir: Path, source: Path, metrics: dict, lineage: dict) -> None:
    name, f = files.final_name(source), metrics["file"]
    group = "per output channel" if metrics["group_size"] == -1 else f"group size {metrics['group_size']}"
    meta = card.front_matter(lineage, "quantized", card.LIBRARY["gguf"],
                             tags=("gguf", "llama.cpp", "q4_0", "gptq", "int4"))
    text = f"""# {name} — GGUF Q4_0 (exact GPTQ integers)

Exported by `tangquant export --format gguf` from the GPTQ checkpoint `{name}`.

- Linear layers: Q4_0, the checkpoint's own 4-bit integers and fp16 scales ({group}, symmetric,
  zero point 8), not re-quantized: read back on export, all {metrics['q4_0_tensors_exact']} Q4_0
  tensors dequantise to exactly the checkpoint's weights (max |Δ| = 0).
- Embeddings and output head: {metrics['embeddings']}; biases and norms f32.
- Tokenizer: byte-level BPE (pre-tokenizer `{metrics['tokenizer']['pre_tokenizer']}`), ChatML chat
  template; generation stops at `<|im_end|>`.
- llama.cpp check on export: {metrics.get('llama_cpp_check', 'not run')}.

## Use

llama.cpp's server (OpenAI-compatible API; `--jinja` applies the chat template stored in the file):

```sh
llama-server -m {f} --jinja -c 2048 --port 8080
curl http://localhost:8080/v1/chat/completions -d '{{"messages":[{{"role":"user","content":"写一首唐诗"}}]}}'
```

ollama, with the `Modelfile` beside the file:

```sh
ollama create {name.lower()} -f Modelfile
ollama run {name.lower()} 写一首唐诗
```

Python (llama-cpp-python):

```python
from llama_cpp import Llama
llm = Llama("{f}", n_ctx=2048)
print(llm.create_chat_completion([{{"role": "user", "content": "写一首唐诗"}}])["choices"][0]["message"]["content"])
```

{card.use_section(EVAL_API.replace("FILE", f), heading=False)}
## Exactness

llama.cpp quantizes activations to 8 bits for its Q4_0 dot products, so its logits are close to,
not equal to, the fp32 dequantised reference; the weights themselves are exact.
"""
    card.write(out_dir, meta, text)
