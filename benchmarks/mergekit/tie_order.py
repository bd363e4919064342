"""Pure-Python model of the order produced by torch.argsort(x, descending=True)
(stable=False) on CPU for float32 input (torch 2.13 wheels).

torch's CPU sort kernel sorts (value, index) pairs with GCC libstdc++'s
std::sort, i.e. introsort: median-of-three pivot (first+1, middle, last-1)
moved to the front, Hoare-style unguarded partition, recursion on the right
part, loop on the left part while more than 16 elements remain, heapsort once
the depth budget 2*floor(log2(n)) is used up, and a final insertion sort
(guarded on the first 16 elements, unguarded after that).  The comparator for
descending order is ``a.value > b.value`` (NaN first); equal values are never
swapped on purpose, so the order among ties is whatever this sequence of
swaps produces -- NOT index order once n > 16.

This module exists to document/verify that rule (reimpl_check.py and
tie_experiment.py compare it with torch.argsort).  It is O(n log n) Python,
fine up to ~1e6 elements.  It models the algorithm, it is not library code.
"""
def std_sort_perm(keys, desc=True):
    """Return the permutation (list of indices) std::sort would produce."""
    a = [(k, i) for i, k in enumerate(keys)]
    if desc:
        comp = lambda x, y: x[0] > y[0]
    else:
        comp = lambda x, y: x[0] < y[0]
    n = len(a)
    def push_heap(first, hole, top, value):
        parent = (hole - 1) // 2
        while hole > top and comp(a[first + parent], value):
            a[first + hole] = a[first + parent]; hole = parent; parent = (hole - 1) // 2
        a[first + hole] = value
    def adjust_heap(first, hole, ln, value):
        top = hole; child = hole
        while child < (ln - 1) // 2:
            child = 2 * (child + 1)
            if comp(a[first + child], a[first + child - 1]): child -= 1
            a[first + hole] = a[first + child]; hole = child
        if (ln & 1) == 0 and child == (ln - 2) // 2:
            child = 2 * (child + 1)
            a[first + hole] = a[first + child - 1]; hole = child - 1
        push_heap(first, hole, top, value)
    def make_heap(first, last):
        ln = last - first
        if ln < 2: return
        parent = (ln - 2) // 2
        while True:
            adjust_heap(first, parent, ln, a[first + parent])
            if parent == 0: return
            parent -= 1
    def pop_heap(first, last, result):
        value = a[result]; a[result] = a[first]
        adjust_heap(first, 0, last - first, value)
    def heap_sort(first, last):
        make_heap(first, last)
        while last - first > 1:
            last -= 1; pop_heap(first, last, last)
    def move_median_to_first(result, x, y, z):
        def sw(j): a[result], a[j] = a[j], a[result]
        if comp(a[x], a[y]):
            if comp(a[y], a[z]): sw(y)
            elif comp(a[x], a[z]): sw(z)
            else: sw(x)
        elif comp(a[x], a[z]): sw(x)
        elif comp(a[y], a[z]): sw(z)
        else: sw(y)
    def unguarded_partition(first, last, pivot):
        while True:
            while comp(a[first], a[pivot]): first += 1
            last -= 1
            while comp(a[pivot], a[last]): last -= 1
            if not first < last: return first
            a[first], a[last] = a[last], a[first]
            first += 1
    def introsort_loop(first, last, depth):
        while last - first > 16:
            if depth == 0:
                heap_sort(first, last); return
            depth -= 1
            mid = first + (last - first) // 2
            move_median_to_first(first, first + 1, mid, last - 1)
            cut = unguarded_partition(first + 1, last, first)
            introsort_loop(cut, last, depth)
            last = cut
    def unguarded_linear_insert(last):
        val = a[last]; nxt = last - 1
        while comp(val, a[nxt]):
            a[last] = a[nxt]; last = nxt; nxt -= 1
        a[last] = val
    def insertion_sort(first, last):
        if first == last: return
        for i in range(first + 1, last):
            if comp(a[i], a[first]):
                val = a[i]; a[first + 1:i + 1] = a[first:i]; a[first] = val
            else:
                unguarded_linear_insert(i)
    if n > 1:
        introsort_loop(0, n, 2 * (n.bit_length() - 1))
        if n > 16:
            insertion_sort(0, 16)
            for i in range(16, n): unguarded_linear_insert(i)
        else:
            insertion_sort(0, n)
    return [i for _, i in a]
