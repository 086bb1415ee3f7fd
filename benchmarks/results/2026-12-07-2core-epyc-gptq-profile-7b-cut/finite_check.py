"""Three ways to check a 7B embedding-sized bf16 tensor for NaN/Inf; the second of two calls is timed."""
import math
import time

import torch

t = (torch.randn(151936, 4096) * 0.02).bfloat16()


def timed(f):
    f()
    s = time.perf_counter()
    r = f()
    return round(time.perf_counter() - s, 3), r


print("isfinite(t).all()", timed(lambda: bool(torch.isfinite(t).all())))
print("isfinite(amax), isfinite(amin)", timed(lambda: bool(torch.isfinite(t.amax())) and bool(torch.isfinite(t.amin()))))
print("isfinite(aminmax)", timed(lambda: all(bool(torch.isfinite(x)) for x in torch.aminmax(t))))
for bad in (math.nan, math.inf, -math.inf):
    u = t.clone()
    u[5, 7] = bad
    print(bad, "isfinite.all:", bool(torch.isfinite(u).all()), "aminmax:", all(bool(torch.isfinite(x)) for x in torch.aminmax(u)))
