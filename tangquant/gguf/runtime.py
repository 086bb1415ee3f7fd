"""llama.cpp through llama-cpp-python's low-level API: load a GGUF, decode batches, greedy tokens.

The low-level API (``llama_decode`` on explicit batches) is used rather than the
``Llama`` class because it exposes what a measurement must record: the weight
repacking path (``use_extra_bufts``: llama.cpp's CPU "extra buffer types" that
re-lay Q4_0 weights for its AVX2/AVX512/AMX kernels at load), the threads, and
exactly which tokens are decoded when.

``python -m tangquant.gguf.runtime SPEC_JSON`` is the export's smoke test in a
separate process (a crash in llama.cpp must fail the export, not kill it), or, with
``"probe": "amx"``, the bench's check that llama.cpp's AMX path computes what its
plain path does (:func:`amx_probe`); it prints one JSON line.
"""

from __future__ import annotations

import ctypes
import json
import sys

import llama_cpp as L
import numpy as np

from tangquant.gguf import amx

_LOG: list[str] = []  # llama.cpp's log lines since the last load: how it placed the weights
_COLLECT = L.llama_log_callback(lambda level, text, data: _LOG.append(text.decode("utf-8", "replace")))
# KV-cache element types llama.cpp's CPU backend takes (llama-bench -ctk/-ctv), as ggml type ids.
KV_TYPES = {"f32": L.GGML_TYPE_F32, "f16": L.GGML_TYPE_F16, "bf16": 30, "q8_0": L.GGML_TYPE_Q8_0,
            "q5_1": L.GGML_TYPE_Q5_1, "q5_0": L.GGML_TYPE_Q5_0, "q4_1": L.GGML_TYPE_Q4_1,
            "q4_0": L.GGML_TYPE_Q4_0, "iq4_nl": L.GGML_TYPE_IQ4_NL}
# -fa's values: llama.cpp's own on/off/auto, and llama-bench's 1/0.
FLASH_ATTN = {"auto": L.LLAMA_FLASH_ATTN_TYPE_AUTO, "on": L.LLAMA_FLASH_ATTN_TYPE_ENABLED,
              "off": L.LLAMA_FLASH_ATTN_TYPE_DISABLED, "1": L.LLAMA_FLASH_ATTN_TYPE_ENABLED,
              "0": L.LLAMA_FLASH_ATTN_TYPE_DISABLED}


class LlamaCppError(RuntimeError):
    """llama.cpp refused the model or a batch (its own return codes, as a Python error)."""


class Session:
    """One model and one context; ``decode`` appends tokens to the KV cache at ``pos``.

    ``type_k``/``type_v``: the KV cache's element types (:data:`KV_TYPES`, llama.cpp's -ctk/-ctv,
    default f16); ``flash_attn``: ``auto`` (llama.cpp's default), ``on``/``off`` (-fa, also 1/0);
    ``n_seq_max``: sequences sharing the context (the server's batch)."""

    def __init__(self, path, threads: int | None = None, n_ctx: int = 512, n_batch: int = 512,
                 repack: bool = True, type_k: str | None = None, type_v: str | None = None,
                 flash_attn: str | None = None, n_seq_max: int = 1):
        L.llama_log_set(_COLLECT, ctypes.c_void_p())  # kept off stderr, and read for the repack path
        _LOG.clear()
        L.llama_backend_init()
        mp = L.llama_model_default_params()
        mp.n_gpu_layers = 0
        mp.use_extra_bufts = bool(repack)
        self.model = L.llama_model_load_from_file(str(path).encode(), mp)
        if not self.model:
            raise LlamaCppError(f"llama.cpp could not load {path}: {_last_line()}")
        cp = L.llama_context_default_params()
        cp.n_ctx, cp.n_batch, cp.n_ubatch = n_ctx, n_batch, min(n_batch, 512)
        if threads:
            cp.n_threads = cp.n_threads_batch = threads
        # llama.cpp's own defaults (f16 KV, flash attention "auto") unless a caller sets them.
        if type_k:
            cp.type_k = KV_TYPES[type_k]
        if type_v:
            cp.type_v = KV_TYPES[type_v]
        if flash_attn:
            cp.flash_attn_type = FLASH_ATTN[flash_attn]
        cp.n_seq_max = n_seq_max  # each sequence gets n_ctx / n_seq_max cells (kv_unified off)
        cp.no_perf = True
        self.ctx = L.llama_init_from_model(self.model, cp)
        if not self.ctx:
            L.llama_model_free(self.model)
            off = str(flash_attn) in ("0", "off")
            why = (": a quantized V cache needs flash attention (fa=on or auto)"
                   if type_v not in (None, "f32", "f16", "bf16") and off else f": {_last_line()}")
            raise LlamaCppError(f"llama.cpp could not make a context of {n_ctx} tokens for {path} with "
                                f"K cache {type_k or 'f16'}, V cache {type_v or 'f16'}, flash attention "
                                f"{flash_attn or 'auto'}{why}")
        self.vocab = L.llama_model_get_vocab(self.model)
        self.n_vocab = L.llama_vocab_n_tokens(self.vocab)
        self.n_batch = n_batch
        self.batch = L.llama_batch_init(n_batch, 0, 1)
        self.load_log = "".join(_LOG)

    def repacked(self) -> dict[str, int]:
        """{layout: tensors} llama.cpp re-laid at load (e.g. {"q4_0_8x8": 168}, {"amx:q4_0": 168});
        {} when none."""
        return self.buffers()["repacked_tensors"]

    def buffers(self) -> dict:
        """The buffer types the weights went to (AMX, CPU_REPACK and its layouts, plain CPU)."""
        return amx.buffers(self.load_log)

    def tokenize(self, text: str, special: bool = True) -> list[int]:
        data = text.encode("utf-8")
        buf = (L.llama_token * (len(data) + 8))()
        n = L.llama_tokenize(self.vocab, data, len(data), buf, len(buf), False, special)
        if n < 0:
            raise LlamaCppError(f"llama.cpp could not tokenize {len(data)} bytes")
        return list(buf[:n])

    def eog(self, token: int) -> bool:
        return bool(L.llama_vocab_is_eog(self.vocab, token))

    def clear(self) -> None:
        L.llama_memory_clear(L.llama_get_memory(self.ctx), True)

    def decode(self, tokens: list[int], pos: int, all_logits: bool = False) -> np.ndarray:
        """Decode ``tokens`` at positions ``pos``...; logits [len, vocab] if ``all_logits``, else
        the last token's [vocab]. Prompts longer than the batch go in batch-sized chunks."""
        rows = []
        for start in range(0, len(tokens), self.n_batch):
            chunk = tokens[start:start + self.n_batch]
            last = start + len(chunk) == len(tokens)
            b = self.batch
            b.n_tokens = len(chunk)
            for i, t in enumerate(chunk):
                b.token[i], b.pos[i], b.n_seq_id[i] = t, pos + start + i, 1
                b.seq_id[i][0] = 0
                b.logits[i] = all_logits or (last and i == len(chunk) - 1)
            rc = L.llama_decode(self.ctx, b)
            if rc != 0:
                raise LlamaCppError(f"llama_decode returned {rc}")
            if all_logits:
                rows += [self._logits(i) for i in range(len(chunk))]
        return np.stack(rows) if all_logits else self._logits(len(chunk) - 1)

    def _logits(self, i: int) -> np.ndarray:
        ptr = L.llama_get_logits_ith(self.ctx, i)
        return np.ctypeslib.as_array(ptr, shape=(self.n_vocab,)).copy()

    def greedy(self, prompt: list[int], n: int, stop_at_eog: bool = False) -> list[int]:
        """``n`` greedy tokens after ``prompt`` in a fresh KV cache (EOS ignored unless ``stop_at_eog``)."""
        self.clear()
        logits = self.decode(prompt, 0)
        out = []
        for i in range(n):
            tok = int(np.argmax(logits))
            out.append(tok)
            if stop_at_eog and self.eog(tok):
                break
            if i + 1 < n:
                logits = self.decode([tok], len(prompt) + i)
        return out

    def close(self) -> None:
        L.llama_batch_free(self.batch)
        L.llama_free(self.ctx)
        L.llama_model_free(self.model)


def session_options(options: dict) -> dict:
    """The ``llamacpp`` engine's checked options (engines.ENGINES) as :class:`Session` keywords."""
    out = {}
    if "repack" in options:
        out["repack"] = str(options["repack"]).strip().lower() in ("1", "true", "yes", "on")
    for key, kwarg in (("ctk", "type_k"), ("ctv", "type_v"), ("fa", "flash_attn")):
        if options.get(key):
            out[kwarg] = str(options[key]).strip().lower()
    return out


def _last_line() -> str:
    lines = [l.strip() for l in "".join(_LOG).splitlines() if l.strip()]
    return lines[-1][:300] if lines else "no message"


def system_info() -> str:
    return L.llama_print_system_info().decode("utf-8", "replace").strip()


def smoke(spec: dict) -> dict:
    """Load, tokenize ``text`` with the GGUF's own tokenizer, greedy-generate ``n`` tokens."""
    s = Session(spec["path"], threads=spec.get("threads"), n_ctx=spec.get("n_ctx", 256),
                repack=spec.get("repack", True))
    try:
        ids = s.tokenize(spec["text"])
        tokens = s.greedy(ids, spec.get("n", 4))
        if not all(0 <= t < s.n_vocab for t in tokens):
            raise LlamaCppError(f"generated ids {tokens} outside the vocabulary")
        return {"ids": ids, "tokens": tokens, "n_vocab": s.n_vocab, "system_info": system_info()}
    finally:
        s.close()


def amx_probe(spec: dict, n: int = 64) -> dict:
    """Load ``path`` with repacking on (the AMX buffer where it is used) and off (the plain path);
    the logits of one ``n``-token batch (AMX tiles) and of one token after it (AMX's VNNI path)
    must agree: a build whose tile configuration was miscompiled (GCC 12.2's ``_tile_loadconfig``
    drops it) computes garbage or faults there. Run in a child: a fault is the parent's answer."""
    logits, placed = [], []
    for repack in (True, False):
        s = Session(spec["path"], threads=spec.get("threads"), n_ctx=2 * n, n_batch=n, repack=repack)
        try:
            ids = [(i * 7919 + 11) % s.n_vocab for i in range(n)]
            batch = s.decode(ids, 0, all_logits=True)
            logits.append(np.concatenate([batch, s.decode([ids[0]], n)[None]]))
            placed.append(s.buffers())
        finally:
            s.close()
    on, off = (x.astype(np.float64) for x in logits)
    corr = float(np.corrcoef(on.ravel(), off.ravel())[0, 1]) if np.isfinite(on).all() else float("nan")
    return {"correlation": corr, "same_top": float((on.argmax(-1) == off.argmax(-1)).mean()),
            "agree": bool(corr >= 0.99), "repack_on": placed[0], "repack_off": placed[1]}


if __name__ == "__main__":
    try:
        spec = json.loads(sys.argv[1])
        result = {"ok": True, **(amx_probe(spec) if spec.get("probe") == "amx" else smoke(spec))}
    except Exception as exc:  # the parent turns any failure into an ExportError
        result = {"ok": False, "error": f"{type(exc).__name__}: {exc}"[:500]}
    print("\n" + json.dumps(result), flush=True)
