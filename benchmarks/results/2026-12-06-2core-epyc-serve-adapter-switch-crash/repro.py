"""Drive BatchEngine directly (no HTTP): streams on base/tang/rs, half with a JSON schema."""
import asyncio, json, random, sys, time
from pathlib import Path
from tangquant.server.config import ServeConfig
from tangquant.server.runner import open_engine
from tangquant.generate import Sampling

ir, n, seed, mode = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
cfg = ServeConfig(max_num_seqs=8, queue_size=1024, timeout=300, adapter=(f"tang={sys.argv[5]}", f"rs={sys.argv[6]}"))
CHOICES = [None if c == "none" else c for c in (sys.argv[7] if len(sys.argv) > 7 else "none,tang,rs").split(",")]
SCHEMA = json.dumps({"type": "object", "properties": {"line": {"type": "string", "maxLength": 12}}, "required": ["line"]})

async def one(engine, i, rng):
    model = rng.choice(CHOICES)
    schema = SCHEMA if ("schema" in mode and i % 2 == 0) else None
    prompt = "<|im_start|>user\n寫一首詩<|im_end|>\n<|im_start|>assistant\n"
    gen, fut = await engine.start(prompt, Sampling(temperature=0.0), 64, time.monotonic() + 300,
                                  model=model, json_schema=schema)
    async for _ in gen.texts():
        pass
    return await fut

async def main():
    engine = open_engine(ir, cfg, "tiny")
    rng = random.Random(seed)
    t0 = time.time()
    res = await asyncio.gather(*(one(engine, i, rng) for i in range(n)))
    print("ok", len(res), round(time.time() - t0, 1), "rebuilds", engine.rebuilds, flush=True)
    engine.close()

asyncio.run(main())
