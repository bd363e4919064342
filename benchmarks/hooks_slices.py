"""Methods of their own (methods/base.py) on one 4096x4096 bf16 tensor, 3 fine-tunes: the hooks on the whole
block at once, in row slices, and in row slices on 2 threads (what the engine does: passes.HooksBackend).

    python benchmarks/hooks_slices.py
"""
import time
from concurrent.futures import ThreadPoolExecutor

import torch

from streammerge.methods import Rows, TensorCtx, registry

torch.manual_seed(0)
R, C, n = 4096, 4096, 3
base = torch.randn(R, C).to(torch.bfloat16)
models = [(base.float() + 0.01*torch.randn(R, C)).to(torch.bfloat16) for _ in range(n)]
pool = ThreadPoolExecutor(2)
for name, params in [("ram", {"epsilon": 1e-5}), ("karcher", {}), ("sce", {"select_topk": 1.0}), ("ramplus_tl", {})]:
    m = registry.get(name)
    ctx = TensorCtx(name="model.layers.0.mlp.up_proj.weight", shape=(R, C), semantics="default", params=params,
                    dtype=torch.float32, out_dtype=torch.bfloat16, has_base=True)
    def run(step, par):
        spans = [(r, min(R, r + step)) for r in range(0, R, step)]
        blk = lambda a, b: Rows(a, b, base[a:b], [x[a:b] for x in models])
        state = None
        for p in range(m.passes(ctx)):
            parts = list((pool.map if par else map)(lambda s: m.stats(ctx, p, blk(*s), state), spans))
            state = m.reduce(ctx, p, parts, state)
        out = torch.empty(R * C, dtype=torch.bfloat16)
        def one(s):
            a, b = s
            out[a*C:b*C].copy_(m.merge(ctx, blk(a, b), state).reshape(-1))
        list((pool.map if par else map)(one, spans))
        return out
    for step, par in [(R, False), (16, False), (16, True)]:
        t = time.perf_counter(); o = run(step, par); dt = time.perf_counter() - t
        print(f"{name} rows/step {step} parallel {par}: {R*C/dt/1e6:.1f} M/s")
