import torch, sys
from pathlib import Path
from tangquant.checkpoint import TensorReader
from tangquant.quant import layer_by_layer as lbl
print(lbl.__file__)
d = Path("/tmp/q7l2")
skeleton, rotary = lbl._skeleton(d)
ctx = lbl._Context(rotary)
block = lbl._one_layer_model(lbl._load_layer(skeleton, TensorReader(d), 0))
h = torch.randn(1, 512, skeleton.config.hidden_size)
from collections import Counter
c = Counter(str([len(g) for g in lbl.sequential_groups(block, h, ctx)]) for _ in range(30))
print(c)
