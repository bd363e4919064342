"""Benchmark: streammerge per method against the I/O floor and mergekit, in one run.

    python benchmarks/run.py --shape tinyllama --data /data/bench-tl                # generates models if missing
    python benchmarks/run.py --shape tinyllama --data /data/bench-tl --mergekit benchmarks/mergekit/.venv

For each method (base + 2 fine-tunes, 1 where the method takes one: methods.py's config; weights
0.5, density 0.5, bf16), each merge its own command, run as users run it (the CLI merges in a forked
child) into an empty folder (the previous output removed, untimed), wall time and peak anonymous
memory (RssAnon of its largest process, sampled from /proc every 10 ms) recorded:
- first run: inputs in the page cache, the method's first merge with streammerge's bytecode caches
  removed (the C kernel is built at install: nothing else compiles at run time), as on a fresh
  clone or CI container;
- warm: the same again: the repeat run;
- cold: the page cache emptied of the inputs first (posix_fadvise DONTNEED: no root needed).
The floor (one per number of fine-tunes merged) is the time to read every input once from a cold
cache (the fastest of one file after another and the models' files side by side, both buffered, and
O_DIRECT into huge pages with 8 requests in flight, as the merge reads) plus to write the output's
size (O_DIRECT from huge pages where the disk takes it, as the shards are written) with fsync. Also
recorded: the same reads and write at once, as a streaming merge does them with no compute
(`read_and_write_s`). mergekit runs warm and cold in the same run when given. Prints a table, saves
it as JSON and, with matplotlib installed, as a PNG.
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from methods import config as method_config, finetunes  # noqa: E402  (benchmarks/methods.py: one config per method)
from streammerge.io.memory import direct_memory

HERE = Path(__file__).resolve().parent
PACKAGE = Path(importlib.util.find_spec("streammerge").origin).parent  # the streammerge that runs
CONFIG = """\
merge_method: {method}
base_model: {data}/base
models:
  - model: {data}/ft1
    parameters: {{weight: 0.5, density: 0.5}}
  - model: {data}/ft2
    parameters: {{weight: 0.5, density: 0.5}}
dtype: bfloat16
"""


def input_files(data: Path, finetunes: int = 2) -> list[Path]:
    return sorted(p for m in ("base", "ft1", "ft2")[: finetunes + 1] for p in (data / m).glob("*.safetensors"))


def evict(files: list[Path]) -> None:
    """Drops the files' pages from the page cache, so the next read comes from disk."""
    os.sync()
    for f in files:
        fd = os.open(f, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def read_all(files: list[Path]) -> int:
    buf, total = bytearray(16 << 20), 0
    for f in files:
        with open(f, "rb", buffering=0) as fh:
            while n := fh.readinto(buf):
                total += n
    return total


def read_side_by_side(files: list[Path]) -> int:
    """Each model's files read buffered on a thread of its own."""
    by_model = [[f for f in files if f.parent.name == m] for m in ("base", "ft1", "ft2")]
    with ThreadPoolExecutor(len(by_model)) as pool:
        return sum(pool.map(read_all, by_model))


def read_direct(files: list[Path], chunk: int = 8 << 20, threads: int = 8) -> int:
    """Every file read with O_DIRECT into huge-page memory, `threads` requests of `chunk` in flight,
    the models side by side (as the merge's prefetch reads: io/prefetch.py)."""
    pieces = [(f, o) for f in files for o in range(0, f.stat().st_size, chunk)]
    by_model: dict[str, list] = {}
    for f, o in pieces:
        by_model.setdefault(f.parent.name, []).append((f, o))
    order = [p for group in itertools.zip_longest(*by_model.values()) for p in group if p is not None]
    fds = {f: os.open(f, os.O_RDONLY | os.O_DIRECT) for f in files}
    local = threading.local()

    def read(piece) -> int:
        if not hasattr(local, "buf"):
            local.buf = direct_memory(chunk)
        return os.preadv(fds[piece[0]], [local.buf], piece[1])

    try:
        with ThreadPoolExecutor(threads) as pool:
            return sum(pool.map(read, order))
    finally:
        for fd in fds.values():
            os.close(fd)


def write_direct(scratch: Path, out_bytes: int, depth: int = 4, chunk: int = 16 << 20) -> None:
    """`out_bytes` (rounded up to 4 KiB) written O_DIRECT from huge-page memory, `depth` writes of
    `chunk` in flight (as streammerge writes shards; buffered where the disk refuses O_DIRECT), then fsync."""
    try:
        fd = os.open(scratch, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_DIRECT)
    except OSError:
        fd = os.open(scratch, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    aligned = direct_memory(chunk)
    aligned.write(b"\1" * len(aligned))
    size = -(-out_bytes // 4096) * 4096

    def write(at: int) -> None:
        with memoryview(aligned) as view:
            os.pwrite(fd, view[: min(chunk, size - at)], at)

    try:
        with ThreadPoolExecutor(depth) as pool:
            list(pool.map(write, range(0, size, chunk)))
        os.fsync(fd)
    finally:
        os.close(fd)
        aligned.close()


def io_floor(files: list[Path], out_bytes: int, scratch: Path) -> dict:
    """The time to read every input once from a cold cache and to write the output's size, each the
    fastest way this machine allows, one after the other."""
    # reads: the fastest of one file after another, each model's files on a thread of its own (a
    # virtual disk often gives several streams more than one), both buffered, and O_DIRECT into huge
    # pages, 8 requests in flight (how the merge reads a cold input)
    times = {}
    for how, read in (("sequential", read_all), ("concurrent", read_side_by_side), ("direct", read_direct)):
        evict(files)
        t = time.perf_counter()
        total = read(files)
        times[how] = time.perf_counter() - t
    read_s = min(times.values())
    # the output's size written the fastest way (as streammerge writes shards)
    t = time.perf_counter()
    write_direct(scratch, out_bytes)
    write_s = time.perf_counter() - t
    # both at once, as a streaming merge does them: the I/O of the merge with no compute (on a
    # virtual disk this can take longer than the two one after the other)
    evict(files)
    t = time.perf_counter()
    with ThreadPoolExecutor(1) as pool:
        writing = pool.submit(write_direct, scratch, out_bytes)
        read_direct(files)
        writing.result()
    together_s = time.perf_counter() - t
    scratch.unlink()
    return {"read_s": read_s, "read_sequential_s": times["sequential"], "read_concurrent_s": times["concurrent"],
            "read_direct_s": times["direct"], "write_s": write_s, "floor_s": read_s + write_s,
            "read_and_write_s": together_s, "input_bytes": total}


def _tree(pid: int) -> list[int]:
    """pid and its descendants (the CLI runs its merge in a forked child)."""
    pids = [pid]
    for p in pids:
        try:
            pids += [int(c) for c in Path(f"/proc/{p}/task/{p}/children").read_text().split()]
        except OSError:
            pass
    return pids


def _rss_anon(pid: int) -> int:
    try:
        m = re.search(r"RssAnon:\s+(\d+) kB", Path(f"/proc/{pid}/status").read_text())
    except OSError:
        return 0
    return int(m.group(1)) * 1024 if m else 0


def run_measured(cmd: list[str], env: dict | None = None) -> dict:
    """Runs a command, sampling the peak RssAnon of its busiest process (the merge: streammerge's CLI
    runs it in a forked child, as every user runs it); raises if it fails."""
    t = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    peak = 0
    while proc.poll() is None:
        peak = max([peak, *(_rss_anon(p) for p in _tree(proc.pid))])
        time.sleep(0.01)
    wall = time.perf_counter() - t
    out, err = proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}): {err.decode()[-2000:]}")
    return {"wall_s": wall, "peak_anon_bytes": peak}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="tinyllama", choices=["tiny", "tinyllama", "llama2-7b", "llama2-7b-12l"])
    ap.add_argument("--data", type=Path, required=True, help="folder with base/, ft1/, ft2/ (generated if missing)")
    ap.add_argument("--methods", nargs="+", default=["dare_ties", "ties", "task_arithmetic", "dare_linear"])
    ap.add_argument("--mergekit", type=Path, help="venv with mergekit 0.1.5 (benchmarks/mergekit/install.sh)")
    ap.add_argument("--mergekit-methods", nargs="+", default=["dare_ties", "ties"])
    ap.add_argument("--max-memory", default="1GiB")
    ap.add_argument("--compile", default="auto", choices=["auto", "on", "off"])
    ap.add_argument("--device", default="cpu", help="passed to streammerge merge: cpu, cuda, auto")
    ap.add_argument("--out", type=Path, default=HERE / "results")
    ap.add_argument("--name", help="results file name (default: the shape)")
    args = ap.parse_args()

    if not (args.data / "ft2").exists():
        subprocess.run([sys.executable, str(HERE / "make_models.py"), args.shape, str(args.data), "--finetunes", "2"], check=True)
    out_bytes = sum(f.stat().st_size for f in (args.data / "base").glob("*.safetensors"))
    work = Path(tempfile.mkdtemp(prefix="streammerge-bench-", dir=args.data))
    rows, floors = [], {}

    def floor_of(finetunes: int) -> dict:
        """The I/O floor of a merge of the base and that many fine-tunes (measured once each)."""
        if finetunes not in floors:
            floors[finetunes] = f = io_floor(input_files(args.data, finetunes), out_bytes, work / "floor.bin")
            print(f"I/O floor, base + {finetunes} fine-tune(s): read {f['input_bytes'] / 1e9:.2f} GB in {f['read_s']:.1f} s "
                  f"(one file after another {f['read_sequential_s']:.1f} s, the models side by side {f['read_concurrent_s']:.1f} s), "
                  f"write {out_bytes / 1e9:.2f} GB in {f['write_s']:.1f} s -> {f['floor_s']:.1f} s; "
                  f"reading and writing at once {f['read_and_write_s']:.1f} s", flush=True)
        return floors[finetunes]

    floor, files = floor_of(2), input_files(args.data)
    for method in args.methods:
        cfg = work / f"{method}.yaml"
        cfg.write_text(method_config(method, f"{args.data}/") + "dtype: bfloat16\n")  # one fine-tune where it takes one
        method_files, method_floor = input_files(args.data, finetunes(method)), floor_of(finetunes(method))
        # as users run it (the merge in the CLI's forked child); the previous output removed untimed
        cmd = [sys.executable, "-m", "streammerge", "merge", str(cfg), str(work / "out"), "-q",
               "--max-memory", args.max_memory, "--compile", args.compile, "--device", args.device]
        timings = {}
        for run in ("first run", "warm", "cold"):
            if run == "first run":  # as a fresh clone: streammerge's own bytecode not compiled yet
                for cache in PACKAGE.rglob("__pycache__"):
                    shutil.rmtree(cache)
            shutil.rmtree(work / "out", ignore_errors=True)
            evict(method_files) if run == "cold" else read_all(method_files)
            timings[run] = r = run_measured(cmd)
            print(f"streammerge {method} {run}: {r['wall_s']:.1f} s, peak anon {r['peak_anon_bytes'] / 2**20:.0f} MiB", flush=True)
        rows.append({"tool": "streammerge", "method": method, **timings["cold"], "warm_s": timings["warm"]["wall_s"],
                     "first_run_s": timings["first run"]["wall_s"], "floor_s": method_floor["floor_s"],
                     "input_bytes": method_floor["input_bytes"]})
    if args.mergekit:
        for method in args.mergekit_methods:
            cfg = work / f"{method}.yaml"
            cfg.write_text(CONFIG.format(method=method, data=args.data))
            out = work / "mk-out"
            cmd = [str(args.mergekit / "bin" / "mergekit-yaml"), str(cfg), str(out), "--random-seed", "0",
                   "--no-copy-tokenizer", "--no-write-model-card", "--allow-crimes"]
            read_all(files)
            warm = run_measured(cmd)
            shutil.rmtree(out)
            evict(files)
            r = run_measured(cmd)
            rows.append({"tool": "mergekit 0.1.5", "method": method, **r, "warm_s": warm["wall_s"], "first_run_s": None,
                         "floor_s": floor["floor_s"], "input_bytes": floor["input_bytes"]})
            print(f"mergekit {method}: cold {r['wall_s']:.1f} s, warm {warm['wall_s']:.1f} s, peak anon {r['peak_anon_bytes'] / 2**20:.0f} MiB", flush=True)

    mk = {r["method"]: r["wall_s"] for r in rows if r["tool"].startswith("mergekit")}
    mk_warm = {r["method"]: r["warm_s"] for r in rows if r["tool"].startswith("mergekit")}
    print("\n| tool | method | cold (s) | peak anon (MiB) | GB/s in | x floor | x mergekit | warm (s) | x mergekit warm | first run (s) |\n"
          "|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        r["gb_per_s"] = r["input_bytes"] / r["wall_s"] / 1e9
        r["x_floor"] = r["wall_s"] / r["floor_s"]
        r["x_mergekit"] = r["wall_s"] / mk[r["method"]] if r["method"] in mk else None
        r["x_mergekit_warm"] = r["warm_s"] / mk_warm[r["method"]] if r["method"] in mk_warm else None
        xm = f"{r['x_mergekit']:.2f}" if r["x_mergekit"] is not None else "-"
        xw = f"{r['x_mergekit_warm']:.2f}" if r["x_mergekit_warm"] is not None else "-"
        first = f"{r['first_run_s']:.1f}" if r["first_run_s"] is not None else "-"
        print(f"| {r['tool']} | {r['method']} | {r['wall_s']:.1f} | {r['peak_anon_bytes'] / 2**20:.0f} | {r['gb_per_s']:.2f} | "
              f"{r['x_floor']:.2f} | {xm} | {r['warm_s']:.1f} | {xw} | {first} |")

    args.out.mkdir(parents=True, exist_ok=True)
    result = {"shape": args.shape, "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
              "max_memory": args.max_memory, "compile": args.compile, "device": args.device, "floor": floor,
              "floors": {f"base + {n}": f for n, f in floors.items()}, "rows": rows}
    name = args.name or args.shape
    (args.out / f"{name}.json").write_text(json.dumps(result, indent=2))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
        labels = [f"{r['tool'].split()[0]}\n{r['method']}" for r in rows]
        ax1.bar(labels, [r["wall_s"] for r in rows], color=["C0" if r["tool"] == "streammerge" else "C1" for r in rows])
        ax1.axhline(floor["floor_s"], color="k", ls="--", label="I/O floor")
        ax1.set_ylabel("wall time (s)")
        ax1.legend()
        ax2.bar(labels, [r["peak_anon_bytes"] / 2**30 for r in rows], color=["C0" if r["tool"] == "streammerge" else "C1" for r in rows])
        ax2.set_ylabel("peak anonymous memory (GiB)")
        for ax in (ax1, ax2):
            ax.tick_params(axis="x", labelsize=7)
        fig.suptitle(f"{args.shape}: base + 2 fine-tunes, bf16, density 0.5, --max-memory {args.max_memory}")
        fig.tight_layout()
        fig.savefig(args.out / f"{name}.png", dpi=110)
    except ImportError:
        print("(matplotlib not installed: no plot)")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
