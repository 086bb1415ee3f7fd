"""Peak RSS of the layer-wise fidelity phase alone (final norm + LM head) — random weights.

``tangquant quantize --layer-wise`` ends by applying the final norm and the LM
head to the held-out samples' last hidden states (``quant.fidelity.streamed_fidelity``).
This runs that phase alone on a model directory (e.g. the 7B shape from
``tangquant.poet.shapes``) with one random sample of ``--positions`` positions and
prints the peak RSS; run it at two commits to compare.

    python benchmarks/fidelity_memory.py /tmp/qcost/qwen1.5-7b
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path)
    parser.add_argument("--positions", type=int, default=512)
    args = parser.parse_args()

    import torch

    from tangquant.checkpoint import TensorReader
    from tangquant.quant.fidelity import streamed_fidelity
    from tangquant.quant.layer_by_layer import _skeleton

    source = TensorReader(args.model)
    skeleton, _ = _skeleton(args.model)
    torch.manual_seed(0)
    h = torch.randn(1, args.positions, skeleton.config.hidden_size)
    ids = torch.randint(0, skeleton.config.vocab_size, (args.positions,))
    t = time.perf_counter()
    f = streamed_fidelity(source, skeleton, [h], [h + 0.01 * torch.randn_like(h)], [ids])
    print(f"kld {f['kld']:.6g}  {time.perf_counter() - t:.1f} s  "
          f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9:.2f} GB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
