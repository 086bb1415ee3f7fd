"""The continuous-batching engine: LoRA adapters by name, /metrics, structured output, sizing."""

from __future__ import annotations

import concurrent.futures
import json

import pytest
from _serve_fixtures import (API_KEY, LONG_TOKENS, long_context_ir, post_json, raw_request,
                             running_server, tiny_ir, wait_idle)

from tangquant.errors import AdapterError, ParameterError

CHAT = "/v1/chat/completions"
BASE = "tiny-poet"
EXACT = ("INFERENCE_PRECISION_HINT=f32", "DYNAMIC_QUANTIZATION_GROUP_SIZE=0")
PROMPT = [{"role": "user", "content": "写一首关于明月的诗"}]


@pytest.fixture(scope="module")
def ir(tmp_path_factory, tiny_model_dir):
    return tiny_ir(tmp_path_factory, tiny_model_dir)


@pytest.fixture(scope="module")
def second_adapter(tmp_path_factory, tiny_model_dir):
    from conftest import make_adapter

    return make_adapter(tiny_model_dir, tmp_path_factory.mktemp("adapters") / "rs", seed=7,
                        r=4, lora_alpha=6, use_rslora=True,
                        target_modules=["q_proj", "v_proj", "down_proj"])


@pytest.fixture(scope="module")
def server(ir, qv_adapter_dir, second_adapter):
    with running_server(ir, api_key=API_KEY, max_num_seqs=4, queue_size=8,
                        adapter=(f"tang={qv_adapter_dir}", f"rs={second_adapter}"),
                        ov_config=EXACT, max_tokens_limit=64, timeout=60) as srv:
        yield srv


def _reply(server, model, n=12, **extra):
    status, _, body = post_json(server, CHAT, {"model": model, "messages": PROMPT,
                                               "max_tokens": n, "temperature": 0, **extra})
    assert status == 200, body
    return body


def _peft_greedy(base_dir, adapter_dir, tokenizer, n=12):
    """Greedy tokens of transformers fp32 (+ peft), cut where the top two logits tie within
    1e-4 (there fp32 OpenVINO and PyTorch may rightly pick either)."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_dir, torch_dtype=torch.float32)
    if adapter_dir is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter_dir)
    ids = torch.tensor([tokenizer.apply_chat_template(PROMPT, add_generation_prompt=True)])
    out = []
    with torch.no_grad():
        for _ in range(n):
            logits = model(ids).logits[0, -1]
            top = torch.topk(logits, 2)
            if top.values[0] - top.values[1] < 1e-4:
                break
            token = int(top.indices[0])
            if token == tokenizer.eos_token_id:
                break
            out.append(token)
            ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
    return out


def test_adapters_by_name_match_peft_and_differ_from_the_base(server, tiny_model_dir,
                                                              qv_adapter_dir, second_adapter,
                                                              tiny_tokenizer):
    """The check the fixtures allow exactly: the base IR is the fp32 model exported without
    quantization and runs in f32, so its greedy tokens with an adapter must be peft's."""
    import openai

    client = openai.OpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0)
    models = {m.id: m for m in client.models.list().data}
    assert set(models) == {BASE, "tang", "rs"}
    assert models["tang"].model_extra["parent"] == BASE and models["tang"].model_extra["adapter"]
    with pytest.raises(openai.NotFoundError) as err:
        client.chat.completions.create(model="nope", messages=PROMPT, max_tokens=2)
    assert err.value.body["code"] == "model_not_found"

    texts = {}
    for name, adir in ((BASE, None), ("tang", qv_adapter_dir), ("rs", second_adapter)):
        want = _peft_greedy(tiny_model_dir, adir, tiny_tokenizer)
        assert len(want) >= 6, f"{name}: too many ties to compare"
        reply = _reply(server, name, n=len(want))
        assert reply["model"] == name
        texts[name] = reply["choices"][0]["message"]["content"]
        assert texts[name] == tiny_tokenizer.decode(want, skip_special_tokens=True), name
    assert len(set(texts.values())) == 3  # the base and each adapter differ


def test_every_adapter_config_holds_every_adapter_so_switches_keep_the_lora_shapes(
        qv_adapter_dir, second_adapter):
    """An adapter switch never changes the set of adapters (and so the LoRA ranks) the pipeline
    holds, only their alphas and order: a config with the chosen adapter alone made genai 2026.4
    reshape the LoRA states at each switch, and the CPU plugin's next step crashed now and then
    (docs/guarantees.md). The two orders make genai take each switch as new adapters and set every
    alpha (its check for a change of alphas alone reads only the last adapter's)."""
    import openvino_genai

    from tangquant.server.batch import adapter_configs

    loaded = {name: (openvino_genai.Adapter(str(d / "adapter_model.safetensors")), alpha)
              for name, d, alpha in (("tang", qv_adapter_dir, 2.0), ("rs", second_adapter, 3.0))}
    configs = adapter_configs(loaded)
    assert set(configs) == {None, "tang", "rs"}
    for chosen, pair in configs.items():
        first, second = ([alpha for _, alpha in c.get_adapters_and_alphas()] for c in pair)
        assert len(pair) == 2 and first == second[::-1]  # the same adapters, in two orders
        for config in pair:
            assert len(config.get_adapters()) == 2
            alphas = {name: config.get_alpha(a) for name, (a, _) in loaded.items()}
            assert alphas == {name: (alpha if name == chosen else 0.0)
                              for name, (_, alpha) in loaded.items()}, chosen


def test_mixed_adapter_traffic_gives_each_request_its_own_model(server):
    """Concurrent requests for the base and two adapters: each reply equals the one the same
    request gets alone (the engine switches adapters between batches, never inside one)."""
    alone = {m: _reply(server, m)["choices"][0]["message"]["content"] for m in (BASE, "tang", "rs")}
    order = [BASE, "tang", "rs", "tang", BASE, "rs", "rs", "tang", BASE] * 2
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        replies = list(pool.map(lambda m: _reply(server, m), order))
    for model, reply in zip(order, replies):
        assert reply["choices"][0]["message"]["content"] == alone[model], model
    assert wait_idle(server)["failed"] == 0


def _metrics(server, key=API_KEY):
    from prometheus_client.parser import text_string_to_metric_families

    headers = {"Authorization": f"Bearer {key}"} if key else {}
    status, hdrs, body = raw_request(server, "GET", "/metrics", headers=headers)
    assert status == 200 and hdrs["content-type"].startswith("text/plain")
    samples = {}
    for family in text_string_to_metric_families(body.decode()):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples


def _value(samples, name, **labels):
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def test_metrics_count_requests_tokens_and_latencies(server):
    assert raw_request(server, "GET", "/metrics")[0] == 401  # behind the key
    wait_idle(server)
    before = _metrics(server)
    usage = [_reply(server, m, n=5)["usage"] for m in (BASE, BASE, "tang")]
    assert post_json(server, CHAT, {"messages": []})[0] == 400
    after = _metrics(server)
    route = "/v1/chat/completions"
    assert _value(after, "tangquant_http_requests_total", route=route, status="200") - \
        _value(before, "tangquant_http_requests_total", route=route, status="200") == 3
    assert _value(after, "tangquant_http_requests_total", route=route, status="400") - \
        _value(before, "tangquant_http_requests_total", route=route, status="400") == 1
    generated = sum(_value(after, "tangquant_generation_tokens_total", model=m) -
                    _value(before, "tangquant_generation_tokens_total", model=m)
                    for m in (BASE, "tang"))
    assert generated == sum(u["completion_tokens"] for u in usage)
    prompt = _value(after, "tangquant_prompt_tokens_total", model=BASE) - \
        _value(before, "tangquant_prompt_tokens_total", model=BASE)
    assert prompt == usage[0]["prompt_tokens"] + usage[1]["prompt_tokens"]
    ttft = "tangquant_time_to_first_token_seconds_count"
    assert _value(after, ttft, model=BASE) - _value(before, ttft, model=BASE) == 2
    assert _value(after, "tangquant_time_per_output_token_seconds_count", model="tang") >= 1
    for gauge in ("tangquant_queue_depth", "tangquant_running_sequences",
                  "tangquant_kv_cache_usage_ratio", "tangquant_kv_cache_bytes"):
        assert (gauge, ()) in after
    assert 0 <= _value(after, "tangquant_kv_cache_usage_ratio") <= 1
    for counter in ("refused", "cancelled", "timed_out", "failed", "completed"):
        assert (f"tangquant_requests_{counter}_total", ()) in after


def test_metrics_public_flag_and_refused_count(tmp_path_factory, tiny_tokenizer):
    ir = long_context_ir(tmp_path_factory, tiny_tokenizer)
    with running_server(ir, api_key=API_KEY, metrics_public=True, max_num_seqs=1,
                        queue_size=0, max_tokens_limit=LONG_TOKENS) as srv:
        import http.client
        import socket

        conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=60)
        conn.request("POST", CHAT, json.dumps({"messages": PROMPT, "max_tokens": LONG_TOKENS,
                                               "ignore_eos": True, "stream": True}),
                     {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"})
        resp = conn.getresponse()
        resp.fp.readline()
        assert post_json(srv, CHAT, {"messages": PROMPT, "max_tokens": 2})[0] == 429
        samples = _metrics(srv, key=None)  # no key needed with --metrics-public
        assert _value(samples, "tangquant_requests_refused_total") == 1
        assert _value(samples, "tangquant_running_sequences") == 1
        conn.sock.shutdown(socket.SHUT_RDWR)
        conn.close()
        assert wait_idle(srv)["cancelled"] == 1
        assert _value(_metrics(srv, key=None), "tangquant_requests_cancelled_total") == 1


def _schema_request(server, schema, **extra):
    fmt = {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema}}
    return post_json(server, CHAT, {"model": BASE, "messages": PROMPT, "max_tokens": 64,
                                    "response_format": fmt, **extra})


def test_json_schema_and_json_object_replies_validate(server):
    import jsonschema

    enum = {"type": "string", "enum": ["李白", "杜甫", "王維"]}
    status, _, body = _schema_request(server, enum, temperature=0)
    assert status == 200, body
    jsonschema.validate(json.loads(body["choices"][0]["message"]["content"]), enum)
    obj = {"type": "object", "properties": {"poet": enum, "lines": {"type": "integer",
                                                                    "minimum": 2, "maximum": 8}},
           "required": ["poet", "lines"], "additionalProperties": False}
    for seed in (1, 2, 3):
        status, _, body = _schema_request(server, obj, temperature=0.7, seed=seed)
        assert status == 200, body
        reply = body["choices"][0]
        assert reply["finish_reason"] == "stop"
        jsonschema.validate(json.loads(reply["message"]["content"]), obj)
    status, _, body = post_json(server, CHAT, {"messages": PROMPT, "max_tokens": 48,
                                               "temperature": 0,
                                               "response_format": {"type": "json_object"}})
    assert status == 200 and isinstance(json.loads(body["choices"][0]["message"]["content"]), dict)


# Schemas XGrammar refuses inside step() (each would take the whole batch down), and schemas
# it compiles: the first must be 400s, the second must be served.
REFUSED = [{"type": "frobnicate"}, {"$ref": "#/$defs/nope"}, {"type": "string", "pattern": "\\p{L}+"},
           {"type": "string", "minLength": 3, "maxLength": 2}, {"type": "integer", "minimum": 5,
                                                               "maximum": 1},
           {"enum": []}, {"anyOf": []}, {"type": "string", "pattern": "(?=a)a"},
           {"type": "string", "pattern": "a{2,1}"}, {"type": "string", "pattern": "(a)\\1"},
           {"type": "array", "minItems": 2, "maxItems": 3}, {"type": "object", "minProperties": 1},
           {"type": "integer", "exclusiveMinimum": 1, "exclusiveMaximum": 2}, {"not": {}}]
SERVED = [{"type": "string", "pattern": "[a-z]+"}, {"type": "string", "format": "date-time"},
          {"type": ["string", "null"]}, {"$ref": "#/$defs/x", "$defs": {"x": {"type": "integer"}}},
          {"type": "array", "items": {"type": "integer"}, "minItems": 1, "maxItems": 3},
          {"type": "number", "minimum": 0.5, "maximum": 0.7}, {"const": {"a": [1, 2]}}, {}, True,
          {"type": "string", "pattern": "\\d+"},
          {"anyOf": [{"type": "boolean"}, {"type": "object", "properties": {"a": {"type": "null"}}}]}]


def test_bad_schemas_are_400s_and_never_break_the_batch(server):
    # A long generation runs the whole time: a schema that broke step() would fail it.
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        long = pool.submit(_reply, server, BASE, 64, ignore_eos=True)
        for schema in REFUSED:
            status, _, body = _schema_request(server, schema)
            assert status == 400, (schema, body)
            assert body["error"]["param"] == "response_format", body
        for schema in SERVED:
            status, _, body = _schema_request(server, schema, max_tokens=4)
            assert status == 200, (schema, body)
        assert long.result()["usage"]["completion_tokens"] == 64
    assert wait_idle(server)["failed"] == 0
    for payload, param in (({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
                           ({"tool_choice": "auto"}, "tool_choice"),
                           ({"response_format": {"type": "xml"}}, "response_format"),
                           ({"n": 3}, "n"), ({"logprobs": True, "top_logprobs": 2}, "top_logprobs")):
        status, _, body = post_json(server, CHAT, {"messages": PROMPT, **payload})
        assert status == 400 and body["error"]["param"] == param, body


def test_bad_adapters_and_settings_are_refused(ir, tmp_path, tiny_model_dir):
    from conftest import make_adapter

    from tangquant.serve import prepare

    dora = make_adapter(tiny_model_dir, tmp_path / "dora", use_dora=True)
    with pytest.raises(AdapterError, match="use_dora"):
        prepare(ir, port=0, adapter=(f"d={dora}",))
    with pytest.raises(AdapterError, match="adapter_config.json"):
        prepare(ir, port=0, adapter=(f"x={tmp_path}",))
    wide = make_adapter(tiny_model_dir, tmp_path / "wide", target_modules=["q_proj"])
    cfg = json.loads((wide / "adapter_config.json").read_text())
    (wide / "adapter_config.json").write_text(json.dumps({**cfg, "r": 16}))
    with pytest.raises(AdapterError, match="another model"):
        prepare(ir, port=0, adapter=(f"w={wide}",))
    for bad in ({"adapter": ("noequals",)}, {"adapter": ("a=x", "a=y")},
                {"adapter": (f"{BASE}x=/x",), "engine": "pipelines"},
                {"adapter": ("a=/x",), "enable_prefix_caching": True},
                {"ov_config": ("lower=1",)}, {"cache_size": -1}, {"replicas": 2},
                {"max_num_batched_tokens": 0}, {"engine": "vllm"}):
        with pytest.raises(ParameterError):
            prepare(ir, **{"port": 0, **bad})


@pytest.mark.fast
def test_kv_sizing_from_the_config(tmp_path):
    """0.5 MiB/token for Qwen1.5-7B in bf16, 0.25 MiB in u8; GQA counts KV heads."""
    from types import SimpleNamespace

    from tangquant.server import sizing

    cfg = {"num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 32,
           "hidden_size": 4096, "max_position_embeddings": 32768}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    shape = sizing.kv_shape(tmp_path)
    assert shape.bytes_per_token(2) == 0.5 * (1 << 20)
    assert shape.bytes_per_token(1) == 0.25 * (1 << 20)
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "num_key_value_heads": 8}))
    assert sizing.kv_shape(tmp_path).bytes_per_token(1) == 0.0625 * (1 << 20)
    flags = SimpleNamespace(max_num_seqs=8, enable_prefix_caching=False,
                            max_num_batched_tokens=None, cache_size=None)
    small = sizing.plan(sizing.KVShape(2, 4, 32, 1024), "u8", 1, flags, 0)
    assert small.scheduler.cache_size == 0 and small.scheduler.max_num_seqs == 8  # grows
    huge = sizing.plan(sizing.KVShape(4000, 64, 128, 1 << 20), "f16", 2, flags, 0)
    assert huge.scheduler.cache_size >= 1 and huge.cache_tokens  # fixed: half the free memory
    assert huge.scheduler.cache_size * (1 << 30) <= huge.free_bytes // 2 + (1 << 30)


def test_ir_runtime_options_are_read_and_applied(ir, tmp_path):
    """An IR's rt_info runtime_options (what `tangquant tune` writes) reach the pipeline."""
    import shutil

    from tangquant.server import sizing

    tuned = tmp_path / "tuned"
    shutil.copytree(ir, tuned)
    xml = tuned / "openvino_model.xml"
    text = xml.read_text(encoding="utf-8")
    text = text.replace("<runtime_options>", "<runtime_options>\n\t\t\t<INFERENCE_NUM_THREADS "
                        "value=\"2\" />\n\t\t\t<ATTENTION_BACKEND value=\"SDPA\" />", 1)
    xml.write_text(text, encoding="utf-8")
    assert sizing.runtime_options(tuned)["INFERENCE_NUM_THREADS"] == "2"
    props, skipped = sizing.plugin_properties(tuned, "CPU", {"KV_CACHE_PRECISION": "u8"})
    assert props["INFERENCE_NUM_THREADS"] == "2" and props["KV_CACHE_PRECISION"] == "u8"
    assert "ATTENTION_BACKEND" in skipped and "ATTENTION_BACKEND" not in props
    with running_server(tuned, max_num_seqs=2) as srv:
        assert srv.engine.properties["INFERENCE_NUM_THREADS"] == "2"
        assert srv.engine.plan_.kv_type == "f16"  # sized from the IR's own KV_CACHE_PRECISION
        assert post_json(srv, CHAT, {"messages": PROMPT, "max_tokens": 3}, key=None)[0] == 200


@pytest.mark.fast
def test_one_bf16_thread_on_amx_is_left_out():
    """OpenVINO 2026.4 dies (SIGFPE) running bf16 on one thread of an AMX CPU: a tuned IR from
    another machine must not take the server down there; f32, or any other CPU, keeps the setting."""
    from tangquant.server.sizing import single_thread_crash

    one = {"INFERENCE_NUM_THREADS": "1"}
    assert "AMX" in single_thread_crash(one, "CPU", {"avx512f", "amx_bf16"})
    assert single_thread_crash({**one, "INFERENCE_PRECISION_HINT": "f32"}, "CPU", {"amx_bf16"}) is None
    assert single_thread_crash(one, "CPU", {"avx512f", "avx512_bf16"}) is None
    assert single_thread_crash({"INFERENCE_NUM_THREADS": "2"}, "CPU", {"amx_bf16"}) is None


def test_a_one_thread_ir_serves_on_any_cpu(ir, tmp_path):
    """An IR tuned to one thread elsewhere still answers here (on an AMX CPU without that setting)."""
    import shutil

    from tangquant.host import cpu_flags

    tuned = tmp_path / "one-thread"
    shutil.copytree(ir, tuned)
    xml = tuned / "openvino_model.xml"
    xml.write_text(xml.read_text(encoding="utf-8").replace(
        "<runtime_options>", "<runtime_options>\n\t\t\t<INFERENCE_NUM_THREADS value=\"1\" />", 1), encoding="utf-8")
    with running_server(tuned, max_num_seqs=2) as srv:
        kept = srv.engine.properties.get("INFERENCE_NUM_THREADS")
        assert kept == (None if "amx_bf16" in cpu_flags() else "1")
        assert post_json(srv, CHAT, {"messages": PROMPT, "max_tokens": 3}, key=None)[0] == 200
