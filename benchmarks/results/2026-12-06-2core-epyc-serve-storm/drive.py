import subprocess, sys, json, psutil, time
sys.path.insert(0, "benchmarks")
import serve_faults as sf, os
if os.environ.get("NOSCHEMA"): sf.GOOD_SCHEMA = None
model, good, bad, hang = sys.argv[1], *map(int, sys.argv[2:5])
adapters = dict(a.split("=", 1) for a in sys.argv[5:])
flags = [f for n, p in adapters.items() for f in ("--adapter", f"{n}={p}")]
err = open(sys.argv[0] + ".server.err", "w")
proc = subprocess.Popen([sys.executable, "-X", "faulthandler", "-m", "tangquant", "-v", "serve", "--model", model, "--port", "0",
    "--max-num-seqs", "8", "--queue-size", "128", "--timeout", "300", *flags], stdout=subprocess.PIPE, stderr=err, text=True)
line = proc.stdout.readline()
port = int(line.split("http://127.0.0.1:")[1].split()[0])
name = line.split("serving ", 1)[1].split(",")[0].split(" at ")[0]
server = psutil.Process(proc.pid)
rss = lambda: sum(p.memory_info().rss for p in [server, *server.children(recursive=True)])
try:
    out = sf.mixed_storm(port, rss, [name, *adapters], good=good, bad=bad, hangups=hang)
    print(json.dumps(out))
finally:
    print("server poll", proc.poll(), file=sys.stderr)
    proc.terminate(); proc.wait(60)
