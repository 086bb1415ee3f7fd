"""The server honours what it accepts, on both engines (the IR through openvino-genai's batch
pipeline, the GGUF through llama.cpp): top_k, min_p and repetition_penalty change the reply as
they mean to, the model's generation_config.json fills what a request leaves out, logprobs are
the model's and agree with its greedy choice, /tokenize and /detokenize are the model's tokenizer,
and /metrics carries vLLM's and llama-server's names."""

from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path

import pytest
from _serve_fixtures import API_KEY, post_json, raw_request, running_server, tiny_ir

CHAT = "/v1/chat/completions"
MESSAGES = [{"role": "user", "content": "写一首关于明月的诗"}]
EXACT = ("INFERENCE_PRECISION_HINT=f32", "DYNAMIC_QUANTIZATION_GROUP_SIZE=0")
N = 24


def _start(model: Path):
    options = {"ov_config": EXACT} if not any(model.glob("*.gguf")) else {}
    return running_server(model, api_key=API_KEY, max_num_seqs=2, queue_size=4, max_tokens_limit=64,
                          timeout=60, **options)


@pytest.fixture(scope="module")
def ir(tmp_path_factory, tiny_model_dir):
    return tiny_ir(tmp_path_factory, tiny_model_dir)


@pytest.fixture(scope="module")
def ir_server(ir):
    with _start(ir) as srv:
        yield srv


@pytest.fixture(scope="module")
def gguf_server(tiny_gguf):
    with _start(tiny_gguf) as srv:
        yield srv


@pytest.fixture(params=["ir", "gguf"])
def server(request):
    return request.getfixturevalue(f"{request.param}_server")


def _chat(server, **fields) -> dict:
    status, _, body = post_json(server, CHAT, {"messages": MESSAGES, "max_tokens": N, **fields})
    assert status == 200, body
    return body


def _text(server, **fields) -> str:
    return _chat(server, **fields)["choices"][0]["message"]["content"]


def _repeats(text: str) -> int:
    return len(text) - len(set(text))


def test_top_k_one_samples_greedily(server):
    greedy = _text(server, temperature=0)
    sampled = [_text(server, temperature=1.5, seed=seed) for seed in (1, 2, 3)]
    assert any(s != greedy for s in sampled)  # so sampling at 1.5 is not greedy by itself
    for seed in (1, 2, 3):
        assert _text(server, temperature=1.5, seed=seed, top_k=1) == greedy
        # vLLM's -1 (and 0) mean no limit: the same reply as no top_k
        assert _text(server, temperature=1.5, seed=seed, top_k=-1) == sampled[seed - 1]


def _gaps_to_the_best(kind: str, entries, request) -> list[float]:
    """Each sampled token's log-probability minus the step's largest: from the GGUF's own
    top_logprobs, or (openvino-genai gives none) from transformers fp32 on the IR's weights."""
    if kind == "gguf":
        return [e["logprob"] - e["top_logprobs"][0]["logprob"] for e in entries]
    tokenizer = request.getfixturevalue("tiny_tokenizer")
    made = _ids(entries, tokenizer)
    ref = _hf_logprobs(request.getfixturevalue("tiny_model_dir"), tokenizer, made)
    # the model's own log-softmax, before temperature (as vLLM reports it), sampling or not
    assert [e["logprob"] for e in entries] == pytest.approx([ref[i, t].item() for i, t in enumerate(made)],
                                                             abs=2e-3)
    return [e["logprob"] - ref[i].max().item() for i, e in enumerate(entries)]


def _hf_logprobs(model_dir, tokenizer, made: list[int]):
    """transformers' fp32 log-softmax at each generated position of the chat prompt + ``made``."""
    import torch
    from transformers import AutoModelForCausalLM

    prompt = tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True)
    model = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32)
    with torch.no_grad():
        logits = model(torch.tensor([prompt + made])).logits[0, len(prompt) - 1:-1].double()
    return torch.log_softmax(logits, -1)


@pytest.mark.parametrize("kind", ["ir", "gguf"])
def test_min_p_keeps_only_tokens_near_the_most_likely(kind, request):
    """min_p 0.9 at temperature T keeps a token only if p >= 0.9 p_max after temperature, that
    is if its log-probability is within T ln 0.9 of the largest; without min_p some are not."""
    server = request.getfixturevalue(f"{kind}_server")
    fields = {"temperature": 1.5, "ignore_eos": True, "logprobs": True,
              **({"top_logprobs": 1} if kind == "gguf" else {})}
    window = 1.5 * math.log(0.9) - 2e-3
    for seed in (1, 2):
        kept = _gaps_to_the_best(kind, _chat(server, seed=seed, min_p=0.9, **fields)[
            "choices"][0]["logprobs"]["content"], request)
        assert min(kept) >= window, kept
    free = [gap for seed in (1, 2) for gap in _gaps_to_the_best(kind, _chat(server, seed=seed, **fields)[
        "choices"][0]["logprobs"]["content"], request)]
    assert min(free) < window


def test_repetition_penalty_changes_a_repetitive_greedy_reply(server):
    plain = _text(server, temperature=0, ignore_eos=True)
    assert _repeats(plain) > N // 3, plain  # the random model repeats itself
    penalised = _text(server, temperature=0, ignore_eos=True, repetition_penalty=3.0)
    assert penalised != plain
    assert _repeats(penalised) < _repeats(plain), (plain, penalised)
    assert _text(server, temperature=0, ignore_eos=True, repetition_penalty=1.0) == plain


@pytest.mark.parametrize("fields, param", [
    ({"top_k": 1.5}, "top_k"), ({"top_k": -2}, "top_k"), ({"min_p": 1.5}, "min_p"),
    ({"min_p": "0.1"}, "min_p"), ({"min_p": 1.0}, "min_p"), ({"repetition_penalty": 0}, "repetition_penalty"),
    ({"repetition_penalty": float("nan")}, "repetition_penalty"),
    ({"top_logprobs": 2}, "top_logprobs"), ({"logprobs": 1}, "logprobs"),
    ({"logprobs": True, "top_logprobs": 21}, "top_logprobs")])
def test_bad_sampling_fields_are_400s_naming_them(ir_server, fields, param):
    raw = json.dumps({"messages": MESSAGES, **fields}).encode()  # NaN as Python writes it
    status, _, body = post_json(ir_server, CHAT, None, raw=raw)
    assert status == 400 and body["error"]["param"] == param, body


def _copy_with_defaults(src: Path, dst: Path, **defaults) -> Path:
    shutil.copytree(src, dst)
    path = dst / "generation_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **defaults}))
    return dst


@pytest.mark.parametrize("kind", ["ir", "gguf"])
def test_generation_config_fills_what_a_request_leaves_out(kind, request, tmp_path):
    """A model whose generation_config.json samples at 1.5 with top_k 1 and a repetition penalty:
    a bare request is that penalised greedy reply, and a request's own fields win."""
    src = request.getfixturevalue("ir" if kind == "ir" else "tiny_gguf")
    base = request.getfixturevalue(f"{kind}_server")
    penalised = _text(base, temperature=0, ignore_eos=True, repetition_penalty=2.0)
    model = _copy_with_defaults(src, tmp_path / src.name, do_sample=True, temperature=1.5, top_k=1,
                                repetition_penalty=2.0)
    with _start(model) as srv:
        assert _text(srv, ignore_eos=True) == penalised
        assert _text(srv, ignore_eos=True, repetition_penalty=1.0) == \
            _text(base, temperature=0, ignore_eos=True)
        unlimited = [_text(srv, ignore_eos=True, top_k=0, seed=s) for s in (1, 2, 3)]
        assert any(t != penalised for t in unlimited)
        defaults = _models(srv)
        assert defaults["top_k"] == 1 and defaults["repetition_penalty"] == 2.0


def _card(server) -> dict:
    status, _, body = raw_request(server, "GET", "/v1/models",
                                  headers={"Authorization": f"Bearer {API_KEY}"})
    assert status == 200, body
    return body["data"][0]


def _models(server) -> dict:
    return _card(server)["defaults"]


def _ids(entries, tokenizer) -> list[int]:
    """Token ids from the entries' bytes (each token of a byte-level BPE has bytes of its own)."""
    from tangquant.gguf.text import token_bytes

    every = range(len(tokenizer))
    by_bytes = dict(zip(token_bytes(tokenizer, every), every))
    return [by_bytes[bytes(e["bytes"])] for e in entries]


def _stream(server, path, payload) -> tuple[str, list]:
    """(text, logprobs entries) of a streamed reply."""
    status, _, body = post_json(server, path, {**payload, "stream": True})
    assert status == 200
    text, entries = "", []
    for line in body.decode().splitlines():
        if not line.startswith("data: {"):
            continue
        choice = json.loads(line[6:])["choices"][0]
        text += choice.get("delta", {}).get("content") or choice.get("text") or ""
        lp = choice["logprobs"]
        if lp:
            entries += lp["content"] if "content" in lp else [lp]
    return text, entries


GREEDY = {"messages": MESSAGES, "max_tokens": N, "temperature": 0, "ignore_eos": True}


def _logprob_reply(server, **fields) -> tuple[str, list]:
    body = _chat(server, **{**GREEDY, **fields})
    entries = body["choices"][0]["logprobs"]["content"]
    assert len(entries) == body["usage"]["completion_tokens"] == N
    text = body["choices"][0]["message"]["content"]
    assert b"".join(bytes(e["bytes"]) for e in entries).decode("utf-8", "replace") == text
    assert all(e["token"] == bytes(e["bytes"]).decode("utf-8", "replace") and e["logprob"] <= 0
               for e in entries)
    streamed_text, streamed = _stream(server, CHAT, {**GREEDY, **fields})
    assert streamed_text == text and [e["token"] for e in streamed] == [e["token"] for e in entries]
    assert [e["logprob"] for e in streamed] == pytest.approx([e["logprob"] for e in entries], abs=1e-5)
    return text, entries


def test_ir_logprobs_are_the_models_own_and_greedy_takes_the_largest(ir_server, tiny_model_dir,
                                                                     tiny_tokenizer):
    """openvino-genai gives the chosen token's log-probability alone: transformers' fp32
    log-softmax of the same weights, the largest of the step when greedy."""
    _, entries = _logprob_reply(ir_server, logprobs=True)
    assert all(e["top_logprobs"] == [] for e in entries)
    made = _ids(entries, tiny_tokenizer)
    ref = _hf_logprobs(tiny_model_dir, tiny_tokenizer, made)
    for i, entry in enumerate(entries):
        assert entry["logprob"] == pytest.approx(ref[i, made[i]].item(), abs=2e-3), i
        assert entry["logprob"] == pytest.approx(ref[i].max().item(), abs=2e-3), i
    status, _, body = post_json(ir_server, CHAT, {**GREEDY, "logprobs": True, "top_logprobs": 1})
    assert status == 400 and body["error"]["param"] == "top_logprobs", body


def test_gguf_logprobs_and_top_logprobs_agree_with_greedy(gguf_server, tiny_gguf, tiny_tokenizer):
    """llama.cpp's logits give both: the chosen token heads its own top list when greedy, and the
    figures are llama.cpp's own log-softmax of the same prompt."""
    import numpy as np

    from tangquant.gguf.runtime import Session

    _, entries = _logprob_reply(gguf_server, logprobs=True, top_logprobs=5)
    for entry in entries:
        top = entry["top_logprobs"]
        assert len(top) == 5 and [t["logprob"] for t in top] == sorted((t["logprob"] for t in top),
                                                                       reverse=True)
        assert top[0]["token"] == entry["token"] and top[0]["logprob"] == entry["logprob"]
        assert sum(math.exp(t["logprob"]) for t in top) <= 1 + 1e-6
    prompt = tiny_tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True)
    made = _ids(entries, tiny_tokenizer)
    (gguf,) = tiny_gguf.glob("*.gguf")
    s = Session(gguf, threads=2, n_ctx=256)
    try:
        logits = s.decode(list(prompt) + made, 0, all_logits=True)[len(prompt) - 1:-1]
    finally:
        s.close()
    ref = logits.astype(np.float64) - logits.max(-1, keepdims=True)
    ref -= np.log(np.exp(ref).sum(-1, keepdims=True))
    # One batch of all tokens here, one token a step there: llama.cpp's kernels quantize the
    # activations per batch, which moves a logit by ~1e-3 on the tiny model.
    for i, entry in enumerate(entries):
        assert entry["logprob"] == pytest.approx(float(ref[i, made[i]]), abs=1e-2), i


def test_completion_logprobs_form(server):
    payload = {"prompt": "床前明月光", "max_tokens": 8, "temperature": 0, "ignore_eos": True,
               "logprobs": 0}
    status, _, body = post_json(server, "/v1/completions", payload)
    assert status == 200, body
    choice = body["choices"][0]
    lp = choice["logprobs"]
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["text_offset"]) == 8
    assert lp["text_offset"][0] == 0 and lp["text_offset"] == sorted(lp["text_offset"])
    assert all(top == {tok: value} for tok, value, top in
               zip(lp["tokens"], lp["token_logprobs"], lp["top_logprobs"]))
    text, streamed = _stream(server, "/v1/completions", payload)
    assert text == choice["text"]
    assert sum((chunk["tokens"] for chunk in streamed), []) == lp["tokens"]
    assert sum((chunk["text_offset"] for chunk in streamed), []) == lp["text_offset"]


def test_tokenize_and_detokenize_are_the_models_tokenizer(server, tiny_tokenizer):
    text = "床前明月光，疑是地上霜。 hello\n"

    def call(path, payload, key=API_KEY):
        return post_json(server, path, payload, key=key)

    status, _, body = call("/tokenize", {"prompt": text})
    assert status == 200, body
    ids = tiny_tokenizer(text)["input_ids"]
    assert body["tokens"] == ids and body["count"] == len(ids) and body["max_model_len"] == 1024
    assert call("/detokenize", {"tokens": ids})[2] == {"prompt": text, "content": text}
    assert call("/tokenize", {"content": text, "model": _card(server)["id"]})[2]["tokens"] == ids  # llama-server's
    pieces = call("/tokenize", {"prompt": text, "with_pieces": True})[2]["tokens"]
    assert [p["id"] for p in pieces] == ids
    assert b"".join(p["piece"].encode() if isinstance(p["piece"], str) else bytes(p["piece"])
                    for p in pieces) == text.encode()
    chat = call("/tokenize", {"messages": MESSAGES})[2]
    assert chat["tokens"] == tiny_tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True)
    bare = call("/tokenize", {"messages": MESSAGES, "add_generation_prompt": False})[2]
    assert bare["tokens"] == tiny_tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=False)
    special = tiny_tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert call("/detokenize", {"tokens": [special]})[2]["prompt"] == "<|im_end|>"
    for path, payload, param in (("/detokenize", {"tokens": [len(tiny_tokenizer)]}, "tokens"),
                                 ("/detokenize", {"tokens": [1.5]}, "tokens"),
                                 ("/detokenize", {"tokens": [True]}, "tokens"),
                                 ("/tokenize", {"prompt": 5}, "prompt"), ("/tokenize", {}, "prompt"),
                                 ("/tokenize", {"prompt": "x", "return_token_strs": True},
                                  "return_token_strs"),
                                 ("/tokenize", {"messages": [{"role": "x"}]}, "messages[0].role")):
        status, _, body = call(path, payload)
        assert status == 400 and body["error"]["param"] == param, (payload, body)
    assert call("/tokenize", {"prompt": "x"}, key=None)[0] == 401
    assert call("/tokenize", {"prompt": "x", "model": "nope"})[0] == 404
    assert post_json(server, "/tokenize", None, raw=b"[" * (2 << 20))[0] == 413


def _samples(server) -> dict:
    from prometheus_client.parser import text_string_to_metric_families

    body = raw_request(server, "GET", "/metrics", headers={"Authorization": f"Bearer {API_KEY}"})[2]
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(body.decode()) for s in family.samples}


def _families(server) -> set[str]:
    body = raw_request(server, "GET", "/metrics", headers={"Authorization": f"Bearer {API_KEY}"})[2]
    return set(re.findall(r"^# TYPE (\S+) ", body.decode(), re.M))


def test_metrics_under_vllm_and_llama_server_names(server):
    """Every vLLM and llama-server name docs/commands.md maps is exposed, and counts the same
    tokens as tangquant's own."""
    doc = (Path(__file__).parents[1] / "docs" / "commands.md").read_text(encoding="utf-8")
    table = "\n".join(line for line in doc.splitlines() if line.startswith("| `tangquant_") or
                      line.startswith("| — |"))
    names = set(re.findall(r"`((?:vllm|llamacpp):[a-z_]+)`", table))
    assert len(names) > 15
    before = _samples(server)
    usage = _chat(server, temperature=0, ignore_eos=True)["usage"]
    after = _samples(server)
    exposed = {name for name, _ in after} | _families(server)  # histograms by their family's name
    assert names <= exposed, names - exposed
    name = _card(server)["id"]
    model = (("model_name", name),)
    for ours, theirs, labels in (("tangquant_generation_tokens_total", "vllm:generation_tokens_total", model),
                                 ("tangquant_generation_tokens_total", "llamacpp:tokens_predicted_total", ()),
                                 ("tangquant_prompt_tokens_total", "vllm:prompt_tokens_total", model)):
        ours_delta = after[(ours, (("model", name),))] - before.get((ours, (("model", name),)), 0)
        assert after[(theirs, labels)] - before.get((theirs, labels), 0) == ours_delta
    assert after[("vllm:generation_tokens_total", model)] - \
        before.get(("vllm:generation_tokens_total", model), 0) == usage["completion_tokens"]
    gaps = ("vllm:inter_token_latency_seconds_count", model)
    assert 1 <= after[gaps] - before.get(gaps, 0) <= N - 1
    done = ("vllm:request_success_total", (("finished_reason", "length"), ("model_name", name)))
    assert after[done] - before.get(done, 0) == 1


def test_chat_flags_reach_the_sampler(ir, capsys):
    from tangquant.cli import main

    def reply(*flags) -> str:
        assert main(["chat", "--model", str(ir), "--prompt", "写一首唐诗", "--max-new-tokens", "16",
                     *flags]) in (0, None)
        return capsys.readouterr().out

    greedy = reply("--temperature", "0")
    assert reply("--temperature", "1.5", "--seed", "3", "--top-k", "1") == greedy
    assert reply("--temperature", "0", "--repetition-penalty", "3") != greedy


# -- the pieces, without a model --------------------------------------------------------------------
BYTES = {1: b"\xe6", 2: b"\x98", 3: b"\x8e", 4: b"a", 5: b"<|im_end|>"}  # 明 in three tokens


def _bytes_of(ids):
    return [BYTES[i] for i in ids]


@pytest.mark.fast
def test_logprob_forms_keep_partial_characters_and_offsets():
    from tangquant.server import logprobs

    entries = [(1, -0.5, ((1, -0.5), (4, -1.0))), (2, -0.1, ()), (3, float("-inf"), ()),
               (4, -2.0, ((5, -0.25),)), (5, -0.3, ())]
    chat = logprobs.chat(entries, _bytes_of)
    assert chat["refusal"] is None
    first = chat["content"][0]
    assert first == {"token": "\ufffd", "logprob": -0.5, "bytes": [0xE6],
                     "top_logprobs": [{"token": "\ufffd", "logprob": -0.5, "bytes": [0xE6]},
                                      {"token": "a", "logprob": -1.0, "bytes": [97]}]}
    assert chat["content"][2]["logprob"] == logprobs.FLOOR  # JSON has no -inf
    assert b"".join(bytes(e["bytes"]) for e in chat["content"]).decode() == "明a<|im_end|>"
    form = logprobs.formatter(False, _bytes_of)
    head, tail = form(entries[:2]), form(entries[2:])  # two chunks of one stream
    assert head["text_offset"] + tail["text_offset"] == [0, 0, 0, 1, 2]
    assert tail["tokens"] == ["\ufffd", "a", "<|im_end|>"]
    assert tail["top_logprobs"][1] == {"a": -2.0, "<|im_end|>": -0.25}  # the chosen one too


@pytest.mark.fast
def test_requests_parse_sampling_and_logprob_fields():
    from types import SimpleNamespace

    from tangquant.server.engine import Engine
    from tangquant.server.schema import ApiError, chat_request, completion_request

    req = chat_request({"messages": MESSAGES, "top_k": -1, "min_p": 0.05, "repetition_penalty": 1.05,
                        "logprobs": True}, 64)
    assert (req.sampling.top_k, req.sampling.min_p, req.sampling.repetition_penalty) == (0, 0.05, 1.05)
    assert req.logprobs == 0
    assert chat_request({"messages": MESSAGES, "logprobs": True, "top_logprobs": 20}, 64).logprobs == 20
    assert chat_request({"messages": MESSAGES, "logprobs": False}, 64).logprobs is None
    assert completion_request({"prompt": "x", "logprobs": 3}, 64).logprobs == 3
    with pytest.raises(ApiError, match="logprobs"):
        completion_request({"prompt": "x", "logprobs": True}, 64)
    pool = SimpleNamespace(max_top_logprobs=None, cfg=SimpleNamespace(engine="pipelines"))
    with pytest.raises(ApiError) as refused:
        Engine.check_logprobs(pool, 0, "top_logprobs")
    assert refused.value.param == "logprobs" and refused.value.status == 400
    Engine.check_logprobs(pool, None, "logprobs")  # not asked: nothing to refuse


@pytest.mark.fast
def test_llama_settings_take_the_request_over_the_generation_config():
    from tangquant.generate import Sampling
    from tangquant.gguf.text import sampler_settings

    defaults = {"do_sample": True, "temperature": 0.7, "top_p": 0.8, "top_k": 20, "min_p": 0.1,
                "repetition_penalty": 1.05}
    got = sampler_settings(Sampling(min_p=0.2, top_k=0), defaults)
    assert (got["temperature"], got["top_p"], got["top_k"], got["min_p"], got["repetition_penalty"]) == \
        (0.7, 0.8, 0, 0.2, 1.05)
    assert sampler_settings(Sampling(repetition_penalty=1.0), {})["repetition_penalty"] == 1.0


@pytest.mark.fast
def test_child_logprobs_are_a_log_softmax_with_sorted_alternatives():
    import numpy as np

    pytest.importorskip("llama_cpp")
    from tangquant.gguf.child import token_logprobs

    logits = np.array([1.0, 3.0, 2.0, 3.0, -1.0], dtype=np.float32)
    ref = logits - np.log(np.exp(logits.astype(np.float64)).sum())
    chosen, top = token_logprobs(logits, 2, 3)
    assert chosen == pytest.approx(ref[2])
    assert [i for i, _ in top] == [1, 3, 2] and [lp for _, lp in top] == pytest.approx(ref[[1, 3, 2]])
    assert len(token_logprobs(logits, 0, 50)[1]) == 5 and token_logprobs(logits, 0, 0)[1] == []
