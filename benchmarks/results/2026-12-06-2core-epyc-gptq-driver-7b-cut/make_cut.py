import sys
from tangquant.poet import shapes
shapes._DIMS["7b"] = (4096, 11008, 2, 32, 32, False, 2)
shapes.build_shape("7b", sys.argv[1], dtype="bf16")
