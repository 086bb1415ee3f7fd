"""A bounded fault storm against a running `tangquant serve`, and what the server looks like after.

The storm, all at once: ``streams`` streaming clients that read two events and
drop the connection mid-stream, ``slow`` clients that send their body a few
bytes at a time and read the reply slowly, ``big`` clients whose body is over
the 1 MiB limit, and ``idle`` TCP connections that never send a byte (open for
the whole storm, while ``/health`` is timed). Afterwards: the server is idle
again, ``/health`` answers 200, a normal request succeeds, and the RSS is
compared with its level before the storm.

``tests/test_serve_faults.py`` runs it on the tiny model; ``serve_load.py --faults``
on the 0.5B shape (``storm_server``).

The mixed storm (``mixed_storm_server``, issue 30): good streams spread over the base and
every ``--adapter``, half of them with a ``response_format`` schema, beside clients that send
schemas the engine cannot compile and clients that hang up mid-stream. Every good stream must
end complete (200, a finish reason, ``[DONE]``, no error event), every bad schema get its 400,
the pipeline never be rebuilt, and the RSS come back to where it stood before the storm (after
one small round of the same mix: KV cache, grammar compiler and adapters warmed). Usage::

    python benchmarks/serve_faults.py --ir DIR
    python benchmarks/serve_faults.py --ir DIR --mixed --adapter a=DIR --adapter b=DIR
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

CHAT = "/v1/chat/completions"
HEADERS = {"Content-Type": "application/json"}


def _payload(max_tokens: int, stream: bool) -> bytes:
    return json.dumps({"messages": [{"role": "user", "content": "寫一首詩"}],
                       "max_tokens": max_tokens, "stream": stream, "ignore_eos": True,
                       "temperature": 0}).encode()


def _abandon(port: int, out: list, max_tokens: int) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    conn.request("POST", CHAT, _payload(max_tokens, True), HEADERS)
    resp = conn.getresponse()
    out.append(resp.status)
    if resp.status == 200:
        resp.fp.readline()
        resp.fp.readline()
    conn.sock.shutdown(socket.SHUT_RDWR)
    conn.close()


def _slow(port: int, out: list) -> None:
    body = _payload(16, True)
    sock = socket.create_connection(("127.0.0.1", port), timeout=120)
    head = (f"POST {CHAT} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode()
    sock.sendall(head)
    for i in range(0, len(body), 8):  # about two seconds for the body
        sock.sendall(body[i:i + 8])
        time.sleep(0.15)
    data = b""
    while chunk := sock.recv(64):  # and read the reply slowly
        data += chunk
        time.sleep(0.01)
    sock.close()
    out.append(int(data.split(b" ", 2)[1]) if data.startswith(b"HTTP/1.1") else 0)
    if b"data: [DONE]\n\n" not in data:
        out.append("slow stream without [DONE]")


def _big(port: int, out: list) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    try:
        conn.request("POST", CHAT, b'{"messages": "' + b"x" * (2 << 20) + b'"}', HEADERS)
        out.append(conn.getresponse().status)
    except OSError:  # refused from its Content-Length and closed while the body was going out
        out.append("reset")
    finally:
        conn.close()


def _get(port: int, path: str, timeout: float = 30) -> tuple[int, dict]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    conn.request("GET", path)
    resp = conn.getresponse()
    body = json.loads(resp.read() or b"null")
    conn.close()
    return resp.status, body


def _wait_idle(port: int, timeout: float = 120) -> dict:
    end = time.monotonic() + timeout
    while True:
        status, body = _get(port, "/health")
        if status == 200 and body["running"] == 0 and body["queued"] == 0:
            return body
        if time.monotonic() > end:
            raise RuntimeError(f"server still busy after the storm: {body}")
        time.sleep(0.1)


def storm(port: int, rss, streams: int = 50, slow: int = 10, big: int = 10,
          idle: int = 100, stream_tokens: int = 200) -> dict:
    """Run the storm against ``port``; ``rss()`` gives the server's RSS in bytes."""
    normal = _payload(8, False)

    def ok_request() -> int:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        conn.request("POST", CHAT, normal, HEADERS)
        status = conn.getresponse().status
        conn.close()
        return status

    for _ in range(3):
        ok_request()
    rss_before = rss()
    before = _wait_idle(port)
    idle_socks = [socket.create_connection(("127.0.0.1", port)) for _ in range(idle)]
    results = {"abandon": [], "slow": [], "big": []}
    threads = ([threading.Thread(target=_abandon, args=(port, results["abandon"], stream_tokens))
                for _ in range(streams)] +
               [threading.Thread(target=_slow, args=(port, results["slow"])) for _ in range(slow)] +
               [threading.Thread(target=_big, args=(port, results["big"])) for _ in range(big)])
    t0 = time.monotonic()
    for t in threads:
        t.start()
    health_s = []
    while any(t.is_alive() for t in threads):
        h0 = time.monotonic()
        try:
            status, _ = _get(port, "/health", timeout=120)
        except OSError:
            status = None
        health_s.append(time.monotonic() - h0 if status == 200 else float("inf"))
        time.sleep(0.2)
    for t in threads:
        t.join()
    storm_s = time.monotonic() - t0
    for s in idle_socks:
        s.close()
    after = _wait_idle(port)
    rss_after = rss()
    return {
        "streams_abandoned": streams, "slow_clients": slow, "bodies_over_limit": big,
        "idle_connections": idle, "storm_s": round(storm_s, 1),
        "statuses": {k: sorted(set(map(str, v))) for k, v in results.items()},
        "cancelled": after["cancelled"] - before["cancelled"],
        "health_during_storm_max_s": round(max(health_s), 3) if health_s else None,
        "health_during_storm_p50_s": round(sorted(health_s)[len(health_s) // 2], 3)
        if health_s else None, "health_probes": len(health_s),
        "health_after": _get(port, "/health")[0], "normal_request_after": ok_request(),
        "rss_before_mib": rss_before >> 20, "rss_after_mib": rss_after >> 20,
        "loadavg": os.getloadavg(),
    }


@contextlib.contextmanager
def _serving(model: Path, flags: list[str]):
    """`tangquant serve` on ``model`` with ``flags`` on a free port: (port, its psutil process, the
    "serving …" line); stopped on the way out."""
    import psutil

    proc = subprocess.Popen([sys.executable, "-m", "tangquant", "-q", "serve", "--model", str(model),
                             "--port", "0", *flags], stdout=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        if "serving" not in line:
            raise RuntimeError(f"server did not start: {line!r}")
        yield int(line.split("http://127.0.0.1:")[1].split()[0]), psutil.Process(proc.pid), line
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def storm_server(ir: Path, serve_args: tuple = (), stream_tokens: int = 200, **kwargs) -> dict:
    """Start `tangquant serve` on ``ir`` (batch engine, 8 sequences, plus ``serve_args``),
    storm it twice, stop it."""
    flags = ["--max-num-seqs", "8", "--queue-size", "64", "--max-tokens-limit", str(stream_tokens),
             "--timeout", "300", *serve_args]
    with _serving(ir, flags) as (port, server, _):
        def run() -> dict:
            return storm(port, lambda: server.memory_info().rss, stream_tokens=stream_tokens,
                         **kwargs)

        first = run()
        # A second storm on the same server: what the first grew (the KV cache, which
        # openvino-genai keeps once grown) is reused, not grown again.
        second = run()
        return {**first, "second_storm": {k: second[k] for k in (
            "cancelled", "health_during_storm_max_s", "health_after", "normal_request_after",
            "rss_before_mib", "rss_after_mib")}}


# Schemas each engine refuses with a 400 before the request is queued (issue 30's probe cases).
BAD_SCHEMAS = [False, {"type": "integer", "minimum": -10**20, "maximum": 10**20},
               {"type": "integer", "minimum": 1.5}, {"type": "object", "properties": {"a": False},
                                                     "required": ["a"]},
               {"type": "string", "pattern": "(?=a)a"}]
BAD_RAW = [b'{"type": "number", "minimum": NaN}', b'{"type": "integer", "maximum": Infinity}']
GOOD_SCHEMA = {"type": "object", "properties": {"line": {"type": "string", "maxLength": 12}},
               "required": ["line"]}


def _chat(model: str | None, tokens: int, schema=None, stream: bool = True) -> dict:
    body = {"messages": [{"role": "user", "content": "寫一首詩"}], "max_tokens": tokens,
            "stream": stream, "temperature": 0}
    if model is not None:
        body["model"] = model
    if schema is not None:
        body["response_format"] = {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}
    return body


def _good(port: int, out: list, body: dict) -> None:
    """A stream read to its end: ok when 200, a finish reason, [DONE] and no error event."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
    conn.request("POST", CHAT, json.dumps(body).encode(), HEADERS)
    resp = conn.getresponse()
    data = resp.read().decode("utf-8", "replace")
    conn.close()
    events = [json.loads(e[6:]) for e in data.split("\n\n") if e.startswith("data: {")]
    finished = any(c.get("finish_reason") for e in events for c in e.get("choices", []))
    errors = [e["error"]["message"] for e in events if "error" in e]
    out.append("ok" if resp.status == 200 and finished and data.rstrip().endswith("data: [DONE]")
               and not errors else f"{resp.status} {errors[:1] or data[-200:]}")


def _bad_schema(port: int, out: list, i: int) -> None:
    """A schema no engine compiles; NaN and Infinity sent as the bytes a client would send."""
    if i % 2:
        raw = BAD_RAW[i // 2 % len(BAD_RAW)].decode()
        body = json.dumps(_chat(None, 8, "SCHEMA")).replace('"SCHEMA"', raw).encode()
    else:
        body = json.dumps(_chat(None, 8, BAD_SCHEMAS[i // 2 % len(BAD_SCHEMAS)])).encode()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
    conn.request("POST", CHAT, body, HEADERS)
    resp = conn.getresponse()
    reply = json.loads(resp.read() or b"null")
    conn.close()
    out.append(resp.status if resp.status != 400 or reply["error"]["param"] == "response_format"
               else f"400 on {reply['error']['param']}")


def mixed_storm(port: int, rss, models: list[str], good: int = 24, bad: int = 12, hangups: int = 12,
                tokens: int = 64, schemas: bool = True) -> dict:
    """The mixed storm against ``port``, after one small round of the same mix; see the module.
    ``schemas``: every second good stream asks for a JSON schema."""
    def round_(n_good: int, n_bad: int, n_hang: int, health: list) -> dict:
        results = {"good": [], "bad": [], "hangup": []}
        threads = [threading.Thread(target=_good, args=(port, results["good"], _chat(
            models[i % len(models)], tokens, GOOD_SCHEMA if schemas and i % 2 else None))) for i in range(n_good)]
        threads += [threading.Thread(target=_bad_schema, args=(port, results["bad"], i)) for i in range(n_bad)]
        threads += [threading.Thread(target=_abandon, args=(port, results["hangup"], 4 * tokens))
                    for _ in range(n_hang)]
        for t in threads:
            t.start()
        while any(t.is_alive() for t in threads):
            h0 = time.monotonic()
            try:
                ok = _get(port, "/health", timeout=60)[0] == 200
            except OSError:
                ok = False
            health.append(time.monotonic() - h0 if ok else float("inf"))
            time.sleep(0.1)
        for t in threads:
            t.join()
        return results

    rss_fresh = rss()
    round_(len(models) * 2, 2, 2, [])  # every adapter, a schema compiled, a hang-up: warmed
    before = _wait_idle(port)
    rss_before = rss()
    health: list = []
    t0 = time.monotonic()
    results = round_(good, bad, hangups, health)
    storm_s = time.monotonic() - t0
    after = _wait_idle(port)
    rss_after = rss()
    return {
        "models": models, "good_streams": good, "good_schemas": schemas, "bad_schemas": bad, "hangups": hangups,
        "tokens": tokens, "storm_s": round(storm_s, 1),
        "good_complete": results["good"].count("ok"), "good_failures": [r for r in results["good"] if r != "ok"],
        "bad_statuses": sorted(set(map(str, results["bad"]))),
        "hangup_statuses": sorted(set(map(str, results["hangup"]))),
        "failed": after["failed"] - before["failed"], "cancelled": after["cancelled"] - before["cancelled"],
        "pipeline_rebuilds": after.get("pipeline_rebuilds"),
        "health_during_storm_max_s": round(max(health), 3) if health else None, "health_probes": len(health),
        "rss_fresh_mib": round(rss_fresh / 2**20, 1), "rss_before_mib": round(rss_before / 2**20, 1),
        "rss_after_mib": round(rss_after / 2**20, 1),
        "rss_change": round(rss_after / rss_before - 1, 4), "loadavg": os.getloadavg(),
    }


def mixed_storm_server(model: Path, adapters: dict[str, Path] | None = None, serve_args: tuple = (),
                       **kwargs) -> dict:
    """Start `tangquant serve` on ``model`` with ``adapters`` (name -> folder), run the mixed
    storm on the base and every adapter, stop it."""
    flags = [f for name, path in (adapters or {}).items() for f in ("--adapter", f"{name}={path}")]
    with _serving(model, ["--max-num-seqs", "8", "--queue-size", "128", "--timeout", "300", *flags,
                          *serve_args]) as (port, server, line):
        name = line.split("serving ", 1)[1].split(",")[0].split(" at ")[0]

        def rss() -> int:  # the server and its children (llama.cpp's process)
            return sum(p.memory_info().rss for p in [server, *server.children(recursive=True)])

        return mixed_storm(port, rss, [name, *(adapters or {})], **kwargs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ir", required=True)
    parser.add_argument("--mixed", action="store_true", help="the mixed storm (issue 30)")
    parser.add_argument("--adapter", action="append", default=[], metavar="NAME=DIR")
    parser.add_argument("--good", type=int, default=24)
    parser.add_argument("--bad", type=int, default=12)
    parser.add_argument("--hangups", type=int, default=12)
    parser.add_argument("serve_args", nargs="*", help="more `tangquant serve` flags (after --)")
    args = parser.parse_args()
    if args.mixed:
        adapters = dict(a.split("=", 1) for a in args.adapter)
        out = mixed_storm_server(Path(args.ir), adapters, tuple(args.serve_args), good=args.good,
                                 bad=args.bad, hangups=args.hangups)
    else:
        out = storm_server(Path(args.ir), tuple(args.serve_args))
    out.update(ir=args.ir, serve_args=args.serve_args, command=" ".join(sys.argv),
               date=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
