"""What the disk and the cores do while a command runs, every 100 ms.

    python benchmarks/timeline.py python -m streammerge merge CONFIG OUT -q --max-memory 1GiB
    python benchmarks/timeline.py --disk nvme0n1 streammerge merge ...

Samples /proc/diskstats (MB/s read and written on one block device) and /proc/stat (the share of
all cores busy, and in iowait) and prints one line per sample, then the totals. Drop the page cache
of the inputs first for a cold merge (run.py's `evict`).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import time


def disk_bytes(device: str) -> tuple[int, int]:
    for line in open("/proc/diskstats"):
        f = line.split()
        if f[2] == device:
            return int(f[5]) * 512, int(f[9]) * 512  # sectors read, written: 512 bytes each, whatever the disk
    raise SystemExit(f"{device}: not in /proc/diskstats; pass --disk (one of: lsblk -d -o NAME)")


def cpu_ticks() -> tuple[int, int, int]:
    v = list(map(int, open("/proc/stat").readline().split()[1:]))
    return sum(v), v[3] + v[4], v[4]  # all, idle + iowait, iowait


def root_disk() -> str:
    dev = os.stat("/").st_dev
    name = os.path.basename(os.path.realpath(f"/sys/dev/block/{os.major(dev)}:{os.minor(dev)}"))
    parent = os.path.realpath(f"/sys/class/block/{name}/..")  # a partition's whole disk
    return os.path.basename(parent) if os.path.exists(os.path.join(parent, "stat")) else name


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--disk", help="block device name (default: the one holding /)")
    ap.add_argument("command", nargs=argparse.REMAINDER)
    args = ap.parse_args()
    device = args.disk or root_disk()
    proc = subprocess.Popen(args.command)
    t0 = time.perf_counter()
    d0, c0 = disk_bytes(device), cpu_ticks()
    read = written = 0
    while proc.poll() is None:
        time.sleep(0.1)
        d, c, t = disk_bytes(device), cpu_ticks(), time.perf_counter()
        ticks = (c[0] - c0[0]) or 1
        read, written = read + d[0] - d0[0], written + d[1] - d0[1]
        print(f"{t - t0:5.1f} s  read {(d[0] - d0[0]) / 1e6 / 0.1:6.0f} MB/s  write {(d[1] - d0[1]) / 1e6 / 0.1:6.0f} MB/s  "
              f"cpu {100 * (1 - (c[1] - c0[1]) / ticks):3.0f} %  iowait {100 * (c[2] - c0[2]) / ticks:3.0f} %")
        d0, c0 = d, c
    print(f"{time.perf_counter() - t0:.1f} s, read {read / 1e9:.2f} GB, wrote {written / 1e9:.2f} GB, exit {proc.returncode}")


if __name__ == "__main__":
    main()
