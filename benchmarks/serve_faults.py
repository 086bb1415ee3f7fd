"""A bounded fault storm against a running `tangquant serve`, and what the server looks like after.

The storm, all at once: ``streams`` streaming clients that read two events and
drop the connection mid-stream, ``slow`` clients that send their body a few
bytes at a time and read the reply slowly, ``big`` clients whose body is over
the 1 MiB limit, and ``idle`` TCP connections that never send a byte (open for
the whole storm, while ``/health`` is timed). Afterwards: the server is idle
again, ``/health`` answers 200, a normal request succeeds, and the RSS is
compared with its level before the storm.

``tests/test_serve_faults.py`` runs it on the tiny model; ``serve_load.py --faults``
on the 0.5B shape (``storm_server``). Usage::

    python benchmarks/serve_faults.py --ir DIR
"""

from __future__ import annotations

import argparse
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


def storm_server(ir: Path, serve_args: tuple = (), stream_tokens: int = 200, **kwargs) -> dict:
    """Start `tangquant serve` on ``ir`` (batch engine, 8 sequences, plus ``serve_args``),
    storm it twice, stop it."""
    import psutil

    proc = subprocess.Popen(
        [sys.executable, "-m", "tangquant", "-q", "serve", "--model", str(ir), "--port", "0",
         "--max-num-seqs", "8", "--queue-size", "64", "--max-tokens-limit", str(stream_tokens),
         "--timeout", "300", *serve_args], stdout=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        if "serving" not in line:
            raise RuntimeError(f"server did not start: {line!r}")
        port = int(line.split("http://127.0.0.1:")[1].split()[0])
        server = psutil.Process(proc.pid)

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
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ir", required=True)
    parser.add_argument("serve_args", nargs="*", help="more `tangquant serve` flags (after --)")
    args = parser.parse_args()
    out = storm_server(Path(args.ir), tuple(args.serve_args))
    out.update(ir=args.ir, serve_args=args.serve_args, command=" ".join(sys.argv),
               date=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
