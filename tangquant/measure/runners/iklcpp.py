"""The ``iklcpp`` bench kind: a GGUF through ik_llama.cpp (the CPU-performance fork of llama.cpp),
timed exactly like the ``llamacpp`` kind: a new random prompt of ``-p`` ids in one ``llama_decode``
(TTFT), then ``-n − 1`` single tokens, greedy, EOS ignored.

ik-llama-cpp-python's ctypes binding of ik_llama.cpp's ``llama.h`` is used at its low level, with
the load-time options ik_llama.cpp's own tools take as candidate keys: ``rtr`` (``-rtr``, run-time
repacking of the weights into its row-interleaved layouts; it turns mmap off), ``mqkv``
(``-mqkv``, Q, K and V merged into one tensor), ``fa`` (flash attention, on by default), ``gr``
(``-gr``, graph reuse between decode steps, on by default) and ``threads_batch`` (``-tb``, the
prefill's threads; default ``-t``). Unset keys keep ik_llama.cpp's own defaults.

ik_llama.cpp is installed apart from site-packages (``sh .ci/install-iklcpp``: its wheel writes
``include/llama.h`` and ``lib/libllama.so`` where llama-cpp-python's lie), in ``<venv>/iklcpp`` or
the directory ``TANGQUANT_IKLCPP_PATH`` names; this module puts that directory first on
``sys.path``. It is imported only in a bench worker, a fresh process per measurement, which never
loads llama-cpp-python's libraries beside it. A build without the AVX-512 the CPU has (the PyPI
wheels are built for AVX2) fails the row: a peer is measured as its users build it, natively.
"""

from __future__ import annotations

import ctypes
import os
import re
import sys
import time
from pathlib import Path

import numpy as np

from tangquant import host
from tangquant.engines import is_true
from tangquant.measure.runners.logits import pick
from tangquant.measure.timing import greedy_run, prompt_ids, repeat, summary

INSTALL = "sh .ci/install-iklcpp (it compiles ik-llama-cpp-python 0.1.5 natively into {path})"
PATH = Path(os.environ.get("TANGQUANT_IKLCPP_PATH") or Path(sys.prefix) / "iklcpp")
if PATH.is_dir():
    sys.path.insert(0, str(PATH))
try:
    from ik_llama_cpp import _ctypes_api as K
except (ImportError, OSError) as exc:  # the bench worker reports this line as the failed row's reason
    raise ImportError(f"ik_llama.cpp is not installed in {PATH}: {INSTALL.format(path=PATH)}") from exc

_LOG: list[str] = []
_LOG_CALLBACK = ctypes.CFUNCTYPE(None, ctypes.c_int, ctypes.c_char_p, ctypes.c_void_p)
_COLLECT = _LOG_CALLBACK(lambda level, text, data: _LOG.append(text.decode("utf-8", "replace")))
_REPACKED = re.compile(r"Repacked (\d+) tensors")


def _library():
    """The loaded libllama, bound afresh for the calls the binding leaves out (log, system info)."""
    lib = ctypes.CDLL(K._lib._name)
    lib.llama_log_set.argtypes, lib.llama_log_set.restype = [_LOG_CALLBACK, ctypes.c_void_p], None
    lib.llama_print_system_info.argtypes, lib.llama_print_system_info.restype = [], ctypes.c_char_p
    return lib


class Session:
    """One model, one context, one batch; ``decode`` appends tokens to the KV cache at ``pos``."""

    def __init__(self, path, threads: int, n_ctx: int, n_batch: int, options: dict):
        self.lib = _library()
        self.lib.llama_log_set(_COLLECT, None)
        _LOG.clear()
        K.llama_backend_init()
        fa = is_true(options.get("fa", "1"))
        mp = K.llama_model_default_params()
        mp.n_gpu_layers = 0
        mp.flash_attn = fa
        if "rtr" in options:
            mp.repack_tensors = is_true(options["rtr"])
        if "mqkv" in options:
            mp.merge_qkv = is_true(options["mqkv"])
        self.model = K.llama_model_load_from_file(str(path).encode(), mp)
        if not self.model:
            raise RuntimeError(f"ik_llama.cpp could not load {path}: {_last_line()}")
        cp = K.llama_context_default_params()
        cp.n_ctx, cp.n_batch, cp.n_ubatch = n_ctx, n_batch, min(n_batch, 512)
        cp.n_threads = threads
        cp.n_threads_batch = int(options.get("threads_batch", threads))
        cp.flash_attn = fa
        if "gr" in options:
            cp.graph_reuse = is_true(options["gr"])
        self.settings = {"rtr": bool(mp.repack_tensors), "mqkv": bool(mp.merge_qkv), "fa": fa,
                         "gr": bool(cp.graph_reuse), "threads_batch": cp.n_threads_batch}
        self.ctx = K.llama_init_from_model(self.model, cp)
        if not self.ctx:
            raise RuntimeError(f"ik_llama.cpp could not make a context of {n_ctx} tokens: {_last_line()}")
        self.n_vocab = K.llama_vocab_n_tokens(K.llama_model_get_vocab(self.model))
        self.n_batch = n_batch
        self.batch = K.llama_batch_init(n_batch, 0, 1)
        self.load_log = "".join(_LOG)

    def repacked(self) -> int:
        found = _REPACKED.findall(self.load_log)
        return int(found[-1]) if found else 0

    def decode(self, tokens: list[int], pos: int) -> np.ndarray:
        """The last token's logits after decoding ``tokens`` at ``pos``... (batch-sized chunks)."""
        for start in range(0, len(tokens), self.n_batch):
            chunk = tokens[start:start + self.n_batch]
            b = self.batch
            b.n_tokens = len(chunk)
            for i, t in enumerate(chunk):
                b.token[i], b.pos[i], b.n_seq_id[i] = t, pos + start + i, 1
                b.seq_id[i][0] = 0
                b.logits[i] = start + i == len(tokens) - 1
            rc = K.llama_decode(self.ctx, b)
            if rc != 0:
                raise RuntimeError(f"llama_decode returned {rc}")
        ptr = K.llama_get_logits_ith(self.ctx, len(chunk) - 1)
        return np.ctypeslib.as_array(ptr, shape=(self.n_vocab,)).copy()

    def clear(self) -> None:
        K.llama_kv_cache_clear(self.ctx)

    def system_info(self) -> str:
        return self.lib.llama_print_system_info().decode("utf-8", "replace").strip()

    def close(self) -> None:
        K.llama_batch_free(self.batch)
        K.llama_free(self.ctx)
        K.llama_free_model(self.model)


def _last_line() -> str:
    lines = [l.strip() for l in "".join(_LOG).splitlines() if l.strip()]
    return lines[-1][:300] if lines else "no message"


def check_native(info: str) -> None:
    """Refuse a build without AVX-512 on a CPU that has it (ik_llama.cpp's AVX-512 kernels unused)."""
    if "avx512f" in host.cpu_flags() and "AVX512 = 1" not in info:
        raise RuntimeError("this ik_llama.cpp was built without AVX-512, which this CPU has (the PyPI wheels "
                           f"are AVX2-only); compile it natively: {INSTALL.format(path=PATH)}")


def run(spec: dict) -> dict:
    options, p, n = dict(spec.get("options") or {}), spec["prompt_tokens"], spec["gen_tokens"]
    start = time.perf_counter()
    s = Session(spec["path"], spec["threads"], p + n + 8, p, options)
    info = s.system_info()
    check_native(info)
    out = {"load_s": time.perf_counter() - start, "rss_loaded_bytes": host.peak_rss_bytes(), **s.settings,
           "repacked_tensors": s.repacked(), "ik_llama_cpp_system_info": info, "ik_llama_cpp_path": str(PATH)}

    def once(run: int, check: bool) -> dict:
        prompt = prompt_ids(spec["vocab"], p, run)
        s.clear()
        # the prefill's logits are always checked; a step's only in the warm-up
        return greedy_run(lambda: pick(s.decode(prompt, 0), True),
                          lambda token, i: pick(s.decode([token], p + i), check), n, check)

    runs, checked = repeat(once, spec)
    s.close()
    return {**out, "runs": runs, **summary(runs, p), "warmup_tokens": checked["tokens"]}
