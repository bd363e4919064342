"""Which elements does mergekit 0.1.5's TIES trim keep among equal magnitudes?

Run with the mergekit venv's python.  Calls mergekit.sparsify.magnitude()
directly on bf16 tensors whose |values| take only a few levels (so the
threshold falls inside a large group of equal magnitudes) and compares the
kept set with three candidate rules:

  index   keep the k largest |x|; among ties the lowest flat indices first
  argsort keep torch.argsort(|x|.float().flatten(), descending=True)[:k]
          (CPU, stable=False), i.e. what our implementation would call
  model   the same order computed by tie_order.std_sort_perm (a pure-Python
          model of libstdc++ std::sort); only for n <= MODEL_MAX
"""

import sys
from pathlib import Path

import torch
from mergekit.sparsify import magnitude

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tie_order import std_sort_perm  # noqa: E402

MODEL_MAX = 300_000


def kept_mask(order: torch.Tensor, n: int, k: int) -> torch.Tensor:
    m = torch.zeros(n, dtype=torch.bool)
    m[order[:k]] = True
    return m


def main():
    rows = []
    for n in (6, 12, 16, 17, 64, 256, 1000, 4096, 65536, 100_003, 262_144, 1_000_000):
        for levels in (2, 3, 5):
            for density in (0.1, 0.5, 0.9):
                g = torch.Generator().manual_seed(n * 31 + levels * 7 + int(density * 10))
                lv = torch.tensor([0.0078125 * (i + 1) for i in range(levels)])
                x = lv[torch.randint(0, levels, (n,), generator=g)]
                x = x * (torch.randint(0, 2, (n,), generator=g) * 2 - 1)
                x = x.to(torch.bfloat16)
                out = magnitude(x, density)
                k = max(1, int(density * n))
                # every element is non-zero, so the kept set is exactly out != 0
                got = out.reshape(-1) != 0
                a = x.abs().reshape(-1).float()
                idx_rule = kept_mask(torch.sort(a, descending=True, stable=True).indices, n, k)
                arg_rule = kept_mask(torch.argsort(a, descending=True), n, k)
                model = None
                if n <= MODEL_MAX:
                    model = bool(torch.equal(got, kept_mask(torch.tensor(std_sort_perm(a.tolist())), n, k)))
                rows.append((n, levels, density, bool(torch.equal(got, idx_rule)),
                             bool(torch.equal(got, arg_rule)), model))
    print(f"{'n':>9} {'lev':>3} {'dens':>4}  index  argsort  model")
    for n, lev, d, i, a, m in rows:
        print(f"{n:>9} {lev:>3} {d:>4}  {str(i):5}  {str(a):7}  {m}")
    print("index-order rule matches:", sum(r[3] for r in rows), "/", len(rows))
    print("argsort rule matches:    ", sum(r[4] for r in rows), "/", len(rows))
    ms = [r[5] for r in rows if r[5] is not None]
    print("libstdc++ model matches: ", sum(ms), "/", len(ms))


if __name__ == "__main__":
    main()
