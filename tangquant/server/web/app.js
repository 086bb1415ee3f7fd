// tangquant chat page. Model output is only ever put into the page with textContent,
// never parsed as HTML; the server's Content-Security-Policy forbids inline script too.
"use strict";

const $ = (id) => document.getElementById(id);
const history = [];
let controller = null;
let modelId = null;

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("api-key").value.trim();
  if (key) h["Authorization"] = "Bearer " + key;
  return h;
}

function bubble(role, text) {
  const div = document.createElement("div");
  div.className = "msg " + role;
  div.textContent = text;
  $("log").appendChild(div);
  $("log").scrollTop = $("log").scrollHeight;
  return div;
}

function showInfo(card) {
  $("model-name").textContent = card.id;
  const info = $("model-info");
  info.replaceChildren();
  const rows = [["context", card.context_length], ["max_tokens limit", card.max_tokens_limit],
    ["weights", card.weights], ["quantization", card.quantization],
    ["workers", card.max_concurrency], ["queue", card.queue_size], ["timeout", card.timeout_s + " s"]];
  for (const [k, v] of rows) {
    if (v === null || v === undefined) continue;
    const d = document.createElement("div");
    const dt = document.createElement("dt"); dt.textContent = k;
    const dd = document.createElement("dd"); dd.textContent = String(v);
    d.append(dt, dd); info.appendChild(d);
  }
  const def = card.defaults || {};
  if (!$("temperature").value && def.temperature !== undefined) $("temperature").value = def.temperature;
  if (!$("top_p").value && def.top_p !== undefined) $("top_p").value = def.top_p;
  if (!$("max_tokens").value && def.max_tokens !== undefined) $("max_tokens").value = def.max_tokens;
  $("max_tokens").max = card.max_tokens_limit;
}

async function loadModel() {
  try {
    const r = await fetch("/v1/models", { headers: headers() });
    const body = await r.json();
    if (!r.ok) { $("status").textContent = (body.error && body.error.message) || r.statusText; return; }
    modelId = body.data[0].id;
    showInfo(body.data[0]);
    $("status").textContent = "ready";
  } catch (e) { $("status").textContent = "cannot reach the server: " + e; }
}

function numberOf(id) {
  const v = $(id).value;
  return v === "" ? undefined : Number(v);
}

async function send(ev) {
  ev.preventDefault();
  const text = $("prompt").value;
  if (!text.trim() || controller) return;
  if (!modelId) await loadModel();
  $("prompt").value = "";
  bubble("user", text);
  const messages = [];
  if ($("system").value.trim()) messages.push({ role: "system", content: $("system").value });
  messages.push(...history, { role: "user", content: text });
  const out = bubble("assistant", "");
  const body = { model: modelId || undefined, messages, stream: true,
    stream_options: { include_usage: true }, temperature: numberOf("temperature"),
    top_p: numberOf("top_p"), max_tokens: numberOf("max_tokens") };
  controller = new AbortController();
  $("send").disabled = true; $("stop").disabled = false;
  $("stats").textContent = "…";
  const t0 = performance.now();
  let tFirst = null, tLast = null, reply = "", usage = null, finish = null, timings = null;
  try {
    const r = await fetch("/v1/chat/completions", { method: "POST", headers: headers(),
      body: JSON.stringify(body), signal: controller.signal });
    if (!r.ok) {
      const err = await r.json().catch(() => ({}));
      throw new Error((err.error && err.error.message) || (r.status + " " + r.statusText));
    }
    const reader = r.body.getReader();
    const decoder = new TextDecoder();
    let buf = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buf += decoder.decode(value, { stream: true });
      let cut;
      while ((cut = buf.indexOf("\n\n")) >= 0) {
        const event = buf.slice(0, cut); buf = buf.slice(cut + 2);
        if (!event.startsWith("data: ")) continue;
        const data = event.slice(6);
        if (data === "[DONE]") continue;
        const chunk = JSON.parse(data);
        if (chunk.error) throw new Error(chunk.error.message);
        if (chunk.usage) usage = chunk.usage;
        if (chunk.timings) timings = chunk.timings;
        for (const c of chunk.choices || []) {
          if (c.delta && c.delta.content) {
            if (tFirst === null) tFirst = performance.now();
            tLast = performance.now();
            reply += c.delta.content;
            out.textContent = reply;
            $("log").scrollTop = $("log").scrollHeight;
          }
          if (c.finish_reason) finish = c.finish_reason;
        }
      }
    }
    history.push({ role: "user", content: text }, { role: "assistant", content: reply });
    showStats(t0, tFirst, tLast, usage, finish, timings);
  } catch (e) {
    if (e.name === "AbortError") {
      $("stats").textContent = "stopped";
      if (reply) history.push({ role: "user", content: text }, { role: "assistant", content: reply });
    } else {
      bubble("error", String(e.message || e));
      $("stats").textContent = "";
    }
  } finally {
    controller = null;
    $("send").disabled = false; $("stop").disabled = true;
  }
}

// Speeds come from the server's own timings when it sends them (they count every token,
// also those that decode to no visible text); otherwise from when the chunks arrived.
function showStats(t0, tFirst, tLast, usage, finish, timings) {
  const parts = [];
  if (tFirst !== null) parts.push("first token " + ((tFirst - t0) / 1000).toFixed(2) + " s");
  else if (timings) parts.push("first token " + ((timings.queue_ms + timings.ttft_ms) / 1000).toFixed(2) + " s");
  if (usage) {
    parts.push(usage.completion_tokens + " tokens");
    let decode = timings ? timings.decode_tokens_per_s : null;
    const secs = tFirst !== null ? (tLast - tFirst) / 1000 : 0;
    if (decode === null && usage.completion_tokens > 1 && secs > 0) decode = (usage.completion_tokens - 1) / secs;
    if (decode !== null && decode !== undefined) parts.push(decode.toFixed(1) + " tokens/s");
  }
  if (finish) parts.push(finish);
  $("stats").textContent = parts.join(" · ");
}

$("chat-form").addEventListener("submit", send);
$("stop").addEventListener("click", () => controller && controller.abort());
$("clear").addEventListener("click", () => { history.length = 0; $("log").replaceChildren(); $("stats").textContent = ""; });
$("api-key").addEventListener("change", loadModel);
$("prompt").addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey) { e.preventDefault(); $("chat-form").requestSubmit(); }
});
loadModel();
