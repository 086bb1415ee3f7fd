"""The llama.cpp process behind ``chat`` and ``serve``: one model, several sequences, JSON lines.

``python -m tangquant.gguf.child SPEC_JSON`` loads the GGUF (:class:`~tangquant.gguf.runtime.Session`
with ``n_seq_max`` sequences, each its own slice of the KV cache), says ``{"ready": ...}``, then
reads requests from stdin and writes events to stdout, one JSON object a line:

- in: ``{"op": "start", "id", "prompt": [ids], "max_new", "sampling": {...}, "stop_ids": [...],
  "ignore_eos", "schema", "logprobs"}`` (``schema``: JSON-schema text the reply must follow;
  ``logprobs``: how many most likely alternatives to give with each token's log-probability, or null),
  ``{"op": "cancel", "id"}``; end of input ends the process;
- out: ``{"id", "queued": true}`` once its sampler is built (or ``{"id", "refused"}``: a schema
  llama.cpp's grammar cannot hold), ``{"id", "started": true}`` when a sequence takes it, ``{"id", "tokens": [...]}`` after each
  step (with ``"logprobs": [[logprob, [[id, logprob], ...]], ...]`` when asked: the model's own
  log-softmax, before penalties, temperature and filters, as vLLM reports it), and
  ``{"id", "done": "stop" | "length" | "cancelled", "error"}`` once.

Each step decodes one batch: the next token of every running sequence, then prompt chunks of new
ones in what room ``n_batch`` leaves (llama-server's continuous batching, so a long prompt does not
stall the others' decoding). Sampling is llama.cpp's own sampler chain per sequence, in the order
openvino-genai, vLLM and transformers apply the same settings, so a request samples alike on either engine.
Only the protocol goes to the real stdout: C code that prints writes to stderr instead.
"""

from __future__ import annotations

import collections
import json
import os
import re
import select
import sys
import time
from dataclasses import dataclass, field

import llama_cpp as L
import numpy as np
from llama_cpp.llama_grammar import json_schema_to_gbnf

from tangquant.gguf.runtime import Session, session_options, system_info

IDLE_WAIT_S = 0.5
# Bounds on a schema's grammar (see grammar_of): llama.cpp itself refuses repetitions past 2000
# ("exceeds sane defaults") but crashes on nesting far deeper than that before it can say so.
REPEATS = ("minLength", "maxLength", "minItems", "maxItems", "minProperties", "maxProperties")
MAX_REPEAT = 1000
MAX_DEPTH = 2000
MAX_GRAMMAR_BYTES = 1 << 20
_COUNT = re.compile(r"\{[\d\s,]+\}")  # a regex quantifier {m}, {m,}, {m,n}


@dataclass
class _Seq:
    id: int
    prompt: list[int]
    max_new: int
    sampler: object
    stop_ids: frozenset[int]
    ignore_eos: bool
    slot: int = -1
    fed: int = 0                     # prompt tokens decoded so far
    made: list[int] = field(default_factory=list)
    index: int = -1                  # this step's output row in the batch, -1 when none
    logprobs: int | None = None      # alternatives to report with each token's log-probability


def sampler_chain(s: Session, sampling: dict, grammar: str | None, max_new: int, prompt=()):
    """llama.cpp's sampler chain for one request, or None when llama.cpp refuses the grammar.

    The order is openvino-genai's and vLLM's (penalties, top_k, temperature, min_p, top_p), not
    llama.cpp's common/sampling.cpp (top_p and min_p before temperature), so that a request's
    settings mean the same on both of the server's engines."""
    chain = L.llama_sampler_chain_init(L.llama_sampler_chain_default_params())
    if grammar:
        g = L.llama_sampler_init_grammar(s.vocab, grammar.encode(), b"root")
        if not g:
            L.llama_sampler_free(chain)
            return None
        L.llama_sampler_chain_add(chain, g)
    _penalties(chain, s, sampling, max_new, prompt)
    temperature = float(sampling.get("temperature") or 0)
    if temperature <= 0:
        L.llama_sampler_chain_add(chain, L.llama_sampler_init_greedy())
        return chain
    if sampling.get("top_k"):
        L.llama_sampler_chain_add(chain, L.llama_sampler_init_top_k(int(sampling["top_k"])))
    L.llama_sampler_chain_add(chain, L.llama_sampler_init_temp(temperature))
    if sampling.get("min_p"):
        L.llama_sampler_chain_add(chain, L.llama_sampler_init_min_p(float(sampling["min_p"]), 1))
    if sampling.get("top_p") is not None and float(sampling["top_p"]) < 1:
        L.llama_sampler_chain_add(chain, L.llama_sampler_init_top_p(float(sampling["top_p"]), 1))
    seed = sampling.get("seed")
    L.llama_sampler_chain_add(chain, L.llama_sampler_init_dist(
        L.LLAMA_DEFAULT_SEED if seed is None else int(seed) % (1 << 32)))
    return chain


def grammar_of(schema: str) -> tuple[str | None, str | None]:
    """(llama.cpp's grammar for a JSON schema, None) or (None, why not), before llama.cpp sees it.

    llama-cpp-python's converter unrolls a repetition (``maxLength``, ``maxItems``, a pattern's
    ``{m,n}``) into nested optional groups, and llama.cpp parses nested groups recursively: a
    count of 10⁹ held the converter for minutes in 14 GB, 10⁵ crashed llama.cpp's parser (SIGSEGV,
    ending every request of this process). Counts and nesting are bounded before either runs."""
    stack = [json.loads(schema)]
    while stack:
        node = stack.pop()
        if isinstance(node, list):
            stack.extend(node)
        elif isinstance(node, dict):
            stack.extend(node.values())
            for key in REPEATS:  # bool is an int: "maxLength": true is the converter's to refuse
                if isinstance(node.get(key), (int, float)) and node[key] > MAX_REPEAT:
                    return None, f"{key} is more than llama.cpp's grammar takes ({MAX_REPEAT})"
            pattern = node.get("pattern")
            counts = re.findall(r"\d+", " ".join(_COUNT.findall(pattern))) if isinstance(pattern, str) else []
            if any(len(n) > 6 or int(n) > MAX_REPEAT for n in counts):
                return None, f"a pattern repeats more than llama.cpp's grammar takes ({MAX_REPEAT})"
    try:  # llama-cpp-python's converter
        grammar = json_schema_to_gbnf(schema)
    except Exception as exc:  # the converter's own errors: a request error, not the process's
        return None, f"cannot turn the schema into a grammar: {exc}"[:300]
    if len(grammar) > MAX_GRAMMAR_BYTES or _depth(grammar) > MAX_DEPTH:
        return None, "the schema's grammar is larger or nested deeper than llama.cpp's parser takes"
    return grammar, None


def _depth(grammar: str) -> int:
    """The deepest nesting of groups in a GBNF text (quoted strings and [classes] skipped)."""
    depth = deepest = 0
    quote = None
    chars = iter(grammar)
    for c in chars:
        if quote:
            if c == "\\":
                next(chars, None)
            elif c == quote:
                quote = None
        elif c in "\"[":
            quote = "]" if c == "[" else c
        elif c == "(":
            depth += 1
            deepest = max(deepest, depth)
        elif c == ")":
            depth -= 1
    return deepest


def _penalties(chain, s: Session, sampling: dict, max_new: int, prompt) -> None:
    """The repetition penalty over the prompt and the reply (Hugging Face's, genai's and vLLM's
    rule); presence and frequency penalties over the reply alone (OpenAI's): two of llama.cpp's
    penalty samplers, since one counts a single window for all three."""
    repeat = float(sampling.get("repetition_penalty") or 1.0)
    if repeat != 1.0:
        rep = L.llama_sampler_init_penalties(s.n_vocab, len(prompt) + max_new + 1, repeat, 0.0, 0.0)
        for token in prompt:
            L.llama_sampler_accept(rep, int(token))
        L.llama_sampler_chain_add(chain, rep)
    freq, present = float(sampling.get("frequency_penalty") or 0), float(sampling.get("presence_penalty") or 0)
    if freq or present:
        L.llama_sampler_chain_add(chain, L.llama_sampler_init_penalties(s.n_vocab, max_new + 1, 1.0, freq,
                                                                         present))


def token_logprobs(logits, token: int, top: int) -> list:
    """[the log-probability of ``token``, [[id, log-probability] of the ``top`` most likely]]
    from one row of raw logits (log-softmax in float64)."""
    row = np.asarray(logits, dtype=np.float64)
    peak = row.max()
    lse = peak + np.log(np.exp(row - peak).sum())
    top = min(top, len(row))
    best = np.argpartition(-row, top - 1)[:top] if top else np.empty(0, dtype=np.int64)
    best = best[np.argsort(-row[best], kind="stable")]
    return [float(row[token] - lse), [[int(i), float(row[i] - lse)] for i in best]]


class Loop:
    """The scheduler: waiting requests, sequences in slots, one ``llama_decode`` per step."""

    def __init__(self, s: Session, n_seqs: int, out):
        self.s, self.out = s, out
        self.free = list(range(n_seqs))
        self.waiting: collections.deque[_Seq] = collections.deque()
        self.running: list[_Seq] = []
        self.memory = L.llama_get_memory(s.ctx)
        self.buffer = b""

    def send(self, **event) -> None:
        self.out.write(json.dumps(event) + "\n")

    def command(self, msg: dict) -> None:
        if msg.get("op") == "start":
            if not msg.get("prompt") or int(msg["max_new"]) < 1:
                raise ValueError("a request needs a prompt and at least one new token")
            grammar, why = grammar_of(msg["schema"]) if msg.get("schema") else (None, None)
            if why:
                self.send(id=msg["id"], refused=why)
                return
            smpl = sampler_chain(self.s, msg.get("sampling") or {}, grammar, int(msg["max_new"]), msg["prompt"])
            if smpl is None:
                self.send(id=msg["id"], refused="llama.cpp cannot compile the grammar of this schema")
                return
            self.send(id=msg["id"], queued=True)
            self.waiting.append(_Seq(msg["id"], [int(t) for t in msg["prompt"]], int(msg["max_new"]), smpl,
                                     frozenset(msg.get("stop_ids") or ()), bool(msg.get("ignore_eos")),
                                     logprobs=None if msg.get("logprobs") is None else int(msg["logprobs"])))
        elif msg.get("op") == "cancel":
            for seq in [q for q in self.waiting if q.id == msg["id"]]:
                self.waiting.remove(seq)
                self.finish(seq, "cancelled")
            for seq in [q for q in self.running if q.id == msg["id"]]:
                self.finish(seq, "cancelled")

    def read_commands(self) -> bool:
        """Take what arrived on stdin (wait for it when idle); False at end of input."""
        idle = not (self.waiting or self.running)
        ready, _, _ = select.select([sys.stdin.fileno()], [], [], IDLE_WAIT_S if idle else 0)
        if not ready:
            return True
        data = os.read(sys.stdin.fileno(), 1 << 20)
        if not data:
            return False
        self.buffer += data
        *lines, self.buffer = self.buffer.split(b"\n")
        for line in lines:
            if line.strip():
                msg = json.loads(line)
                try:
                    self.command(msg)
                except Exception as exc:  # one bad request, never the process
                    self.send(id=msg.get("id"), refused=f"{type(exc).__name__}: {exc}"[:300])
        return True

    def step(self) -> None:
        while self.waiting and self.free:
            seq = self.waiting.popleft()
            seq.slot = self.free.pop(0)
            self.running.append(seq)
            self.send(id=seq.id, started=True)
        self.out.flush()  # "started" is timed before this step's prefill
        if not self.running:
            return
        b, n = self.s.batch, 0
        for seq in self.running:  # decoding sequences first, then prompt chunks in the room left
            seq.index = -1
            if seq.fed == len(seq.prompt):
                n = self._add(b, n, seq, [seq.made[-1]], len(seq.prompt) + len(seq.made) - 1, True)
        for seq in self.running:
            if seq.fed < len(seq.prompt) and n < self.s.n_batch:
                chunk = seq.prompt[seq.fed:seq.fed + self.s.n_batch - n]
                last = seq.fed + len(chunk) == len(seq.prompt)
                n = self._add(b, n, seq, chunk, seq.fed, last)
                seq.fed += len(chunk)
        b.n_tokens = n
        rc = L.llama_decode(self.s.ctx, b)
        if rc != 0:  # the batch's sequences fail; the process and the other requests go on
            for seq in list(self.running):
                self.finish(seq, "cancelled", error=f"llama_decode returned {rc}")
            return
        for seq in list(self.running):
            if seq.index >= 0:
                logits = self._logits(seq.index) if seq.logprobs is not None else None
                token = int(L.llama_sampler_sample(seq.sampler, self.s.ctx, seq.index))
                self._sampled(seq, token, None if logits is None else token_logprobs(logits, token, seq.logprobs))

    def _add(self, b, n: int, seq: _Seq, tokens: list[int], pos: int, logits: bool) -> int:
        for i, t in enumerate(tokens):
            b.token[n + i], b.pos[n + i], b.n_seq_id[n + i] = t, pos + i, 1
            b.seq_id[n + i][0] = seq.slot
            b.logits[n + i] = logits and i == len(tokens) - 1
        if logits:
            seq.index = n + len(tokens) - 1
        return n + len(tokens)

    def _logits(self, index: int) -> np.ndarray:
        """A copy of the batch row's raw logits, taken before the samplers run."""
        return np.ctypeslib.as_array(L.llama_get_logits_ith(self.s.ctx, index), shape=(self.s.n_vocab,)).copy()

    def _sampled(self, seq: _Seq, token: int, logprobs: list | None = None) -> None:
        seq.made.append(token)
        self.send(id=seq.id, tokens=[token], **({"logprobs": [logprobs]} if logprobs is not None else {}))
        if not seq.ignore_eos and (self.s.eog(token) or token in seq.stop_ids):
            self.finish(seq, "stop")
        elif len(seq.made) >= seq.max_new:
            self.finish(seq, "length")

    def finish(self, seq: _Seq, reason: str, error: str | None = None) -> None:
        if seq in self.running:
            self.running.remove(seq)
            L.llama_memory_seq_rm(self.memory, seq.slot, -1, -1)
            self.free.append(seq.slot)
        L.llama_sampler_free(seq.sampler)
        self.send(id=seq.id, done=reason, error=error)

    def run(self) -> None:
        while self.read_commands():
            self.step()
            self.out.flush()


def probe_finite(s: Session, text: str | None) -> bool:
    """Whether the logits of a probe prompt are all finite (True when there is no probe)."""
    ids = s.tokenize(text) if text else []
    if not ids:
        return True
    finite = bool(np.isfinite(s.decode(ids, 0)).all())
    s.clear()
    return finite


def main(spec: dict, out) -> None:
    n_seqs = int(spec.get("n_seqs", 1))
    start = time.perf_counter()
    s = Session(spec["path"], threads=spec.get("threads"), n_ctx=int(spec["n_ctx"]) * n_seqs,
                n_batch=int(spec.get("n_batch", 512)), n_seq_max=n_seqs, **session_options(spec.get("options") or {}))
    out.write(json.dumps({"ready": True, "n_ctx_seq": int(L.llama_n_ctx_seq(s.ctx)), "n_seqs": n_seqs,
                          "n_vocab": s.n_vocab, "load_s": time.perf_counter() - start,
                          "repacked_tensors": s.repacked(), "system_info": system_info(),
                          "finite": probe_finite(s, spec.get("probe"))}) + "\n")
    out.flush()
    Loop(s, n_seqs, out).run()


if __name__ == "__main__":
    # The protocol keeps the real stdout; anything C code prints goes to stderr.
    protocol = os.fdopen(os.dup(1), "w", encoding="utf-8")
    os.dup2(2, 1)
    try:
        main(json.loads(sys.argv[1]), protocol)
    except Exception as exc:  # the parent reports it as the engine's failure
        msg = str(exc).strip().splitlines()
        protocol.write(json.dumps({"fatal": f"{type(exc).__name__}: {msg[0] if msg else ''}"[:500]}) + "\n")
        protocol.flush()
        sys.exit(1)
