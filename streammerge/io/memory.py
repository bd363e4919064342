"""Page-aligned memory for O_DIRECT reads and writes (the prefetch arena, the writer's stages)."""

from __future__ import annotations

import mmap


def direct_memory(size: int) -> mmap.mmap:
    """`size` bytes, page-aligned as O_DIRECT needs. Private, so it counts as the process's anonymous
    memory and may take huge pages: a direct request from huge pages is a few contiguous segments,
    not one per 4 KiB page, and a virtual disk serves it about twice as fast (2.3-2.6 GB/s against
    1.3 here; Python's default anonymous mapping is shared memory, which takes none)."""
    memory = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    try:
        memory.madvise(mmap.MADV_HUGEPAGE)
    except (AttributeError, OSError):  # only a hint
        pass
    return memory
