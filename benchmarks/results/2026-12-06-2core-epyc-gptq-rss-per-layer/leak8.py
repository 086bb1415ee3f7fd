import gc, sys, torch, collections
from pathlib import Path
from tangquant.quant import layer_by_layer as lbl
from tangquant.quant.recipe import QuantRecipe
from tangquant import calib
from transformers import AutoTokenizer
d = Path(sys.argv[2])
orig = lbl._load_layer
def anon():
    for l in open("/proc/self/status"):
        if l.startswith("RssAnon"): return int(l.split()[1]) / 2**20
def load(skeleton, source, i):
    a = anon()
    gc.set_debug(gc.DEBUG_SAVEALL)
    n = gc.collect()
    ts = [o for o in gc.garbage if isinstance(o, torch.Tensor)]
    kinds = collections.Counter(type(o).__name__ for o in gc.garbage).most_common(6)
    frames = [f"{o.f_code.co_name}:{o.f_lineno}" for o in gc.garbage if type(o).__name__ == "frame"][:8]
    gb = sum(t.numel() * t.element_size() for t in ts if not t.is_meta) / 2**30
    gc.garbage.clear(); gc.set_debug(0); gc.collect()
    print(f"before layer {i}: RssAnon {a:.2f} -> {anon():.2f} GiB after gc; cyclic garbage {n} objects, {len(ts)} tensors {gb:.2f} GiB; {kinds}; frames {frames}", flush=True)
    return orig(skeleton, source, i)
lbl._load_layer = load
tok = AutoTokenizer.from_pretrained(d)
docs = calib.load_documents("/work/main/.carry/calib/tang_calib.json")
samples = calib.pack(docs, tok, 512 if "q7" in str(d) else 128, int(sys.argv[1]), 0).samples
out = Path("/tmp/leak8-out"); import shutil; shutil.rmtree(out, ignore_errors=True); out.mkdir()
lbl.run_layer_wise(d, out, QuantRecipe(group_size=128 if "q7" in str(d) else 32), samples, samples[:1], 1)
