"""SCALE-Sim 3.0's SRAM bookkeeping in CALC bandwidth mode, replayed on counts instead of traces.

In CALC mode the ifmap/filter read buffers never stall, so the three memories are independent:
- `reads_per_pass` / `count_estimate_bw_reads`: DRAM reads of `ReadBufferEstimateBw` for an
  address stream (optionally repeated), one vectorised pass per epoch;
- `fresh_repeat_reads`: the same count in closed form for streams made of segments that are a
  permutation of new addresses repeated r times (the output-stationary filter stream, and the
  ifmap stream of a conv whose windows do not overlap);
- `serve_ofmap_writes`: compute cycles (with write stalls) and DRAM writes of the ofmap
  `write_buffer`, event by event (drains and stalls) instead of line by line.
tests/test_scalesim_memory.py checks each against SCALE-Sim's own buffer classes.
"""
from __future__ import annotations

import math

import numpy as np


def sram_words(kb: float) -> int:
    """Words of a SCALE-Sim SRAM of `kb` KB: its config reads sizes as whole KB (`int()`)."""
    return 1024 * int(kb)


def epoch_words(total_size_bytes: float, word_size: int = 1, active_buf_frac: float = 0.5) -> int:
    """New addresses per epoch of `ReadBufferEstimateBw`: its bookkeeping fills sets of total/100
    words; the active window moves (emptying itself, active fraction 0.5 as `single_layer_sim`
    uses) each time 50 more sets complete. So an address is a hit iff it was placed since the
    current epoch began, an epoch ends after 50 x set-size new addresses, and every placed address
    is fetched once."""
    assert round(active_buf_frac, 2) == 0.5, "single_layer_sim always uses active_buf_frac=0.5"
    per_set = math.floor(math.floor(total_size_bytes / word_size) / 100)
    if per_set == 0:
        raise ValueError("SCALE-Sim needs buffers of at least 100 words")
    return 50 * per_set


def reads_per_pass(stream, total_size_bytes: float, passes: int = 1) -> list[int]:
    """DRAM reads of `ReadBufferEstimateBw` after each of `passes` repetitions of `stream`
    (element i of the result: the count for the stream repeated i + 1 times).

    An element is a miss iff its previous occurrence lies before the current epoch's start; an
    epoch ends at its E-th miss. Previous occurrences come from one stable sort; each epoch is then
    one vectorised scan of a window that doubles until it holds E misses."""
    e = epoch_words(total_size_bytes)
    s = np.asarray(stream, dtype=np.int64).reshape(-1)
    n = s.size
    if n == 0:
        return [0] * passes
    order = np.argsort(s, kind="stable")
    sv = s[order]
    new_val = np.empty(n, bool)
    new_val[0] = True
    np.not_equal(sv[1:], sv[:-1], out=new_val[1:])
    prev = np.full(n, -1, np.int64)  # previous index of the same address in one pass, -1 if none
    prev[order[1:][~new_val[1:]]] = order[:-1][~new_val[1:]]
    group_last = np.empty(n, np.int64)  # last index of each element's address in one pass
    ends = np.flatnonzero(np.append(new_val[1:], True))
    group_last[order] = np.repeat(order[ends], np.diff(np.append(-1, ends)))

    total_n = n * passes

    def prev_global(a: int, b: int) -> np.ndarray:
        g = np.arange(a, b, dtype=np.int64)
        rep, i = np.divmod(g, n)
        p = prev[i]
        return np.where(p >= 0, rep * n + p, (rep - 1) * n + group_last[i])

    miss_at = np.zeros(passes, np.int64)  # misses before the end of each pass
    bounds = np.arange(1, passes + 1, dtype=np.int64) * n
    pos, done = 0, 0
    while pos < total_n:
        span = max(2 * e, 4096)
        while True:
            end = min(pos + span, total_n)
            miss = prev_global(pos, end) < pos
            cs = np.cumsum(miss)
            if cs[-1] >= e or end == total_n:
                break
            span *= 2
        stop = end if cs[-1] < e else pos + int(np.searchsorted(cs, e)) + 1
        inside = (bounds > pos) & (bounds <= stop)
        miss_at[inside] = done + cs[bounds[inside] - pos - 1]
        done += int(cs[stop - pos - 1])
        pos = stop
    return [int(x) for x in miss_at]


def count_estimate_bw_reads(stream, total_size_bytes: float, word_size: int = 1,
                            active_buf_frac: float = 0.5) -> int:
    """DRAM reads SCALE-Sim's `ReadBufferEstimateBw` makes for this address stream."""
    assert word_size == 1 and round(active_buf_frac, 2) == 0.5, "single_layer_sim's settings"
    return reads_per_pass(stream, total_size_bytes, 1)[0]


def fresh_repeat_reads(segments, total_size_bytes: float) -> int:
    """`count_estimate_bw_reads` of a stream of segments (u, r): a permutation of u addresses not
    seen before, repeated r times. With E new addresses per epoch and d misses into the current
    epoch, a segment's first pass misses everywhere until the epoch ends (at miss E - d); from an
    epoch start inside the segment any E consecutive elements are distinct when u >= E (all miss),
    while for u < E the next u elements miss and the rest hit."""
    e = epoch_words(total_size_bytes)
    d = count = 0
    for u, r in segments:
        if u <= 0 or r <= 0:
            continue
        if d + u < e:
            count += u
            d += u
            continue
        pos = e - d  # the epoch ends at this segment's (e - d)-th element
        count += pos
        rest = u * r - pos
        if u >= e:
            count += rest
            d = rest % e
        else:
            d = min(u, rest)
            count += d
    return count


def serve_ofmap_writes(line_counts, total_size_bytes: float, bandwidth: int) -> tuple[int, int]:
    """(compute cycles, DRAM writes) of SCALE-Sim's ofmap `write_buffer` for a demand matrix whose
    line i holds `line_counts[i]` outputs, served in the per-line loop of
    `double_buffered_scratchpad.service_memory_requests` (CALC mode: only this buffer stalls).

    The buffer's rules: outputs fill lines of `bandwidth` words; when the active half is full a
    drain of ceil(half/bandwidth) lines starts (a partial line is flushed first) and frees its
    words at once; a drain counts every word of its lines except the padding of its last line;
    an output with no free space stalls the array until the drain ends. Between two such events
    outputs only accumulate, so each event is found with one search in the cumulative counts."""
    counts = np.asarray(line_counts, dtype=np.int64).reshape(-1)
    n_l = counts.size
    cum = np.zeros(n_l + 1, np.int64)
    np.cumsum(counts, out=cum[1:])
    words = int(cum[-1])
    total = math.floor(total_size_bytes)
    drain_size = total - int(math.ceil(total * 0.5))
    threshold = total - drain_size
    lines_per_drain = int(math.ceil(drain_size / bandwidth))
    st = dict(free=total, n_lines=0, line_idx=0, dstart=0, acc=0)
    partial: dict[int, int] = {}

    def store(m):
        st["free"] -= m
        filled = st["line_idx"] + m
        st["n_lines"] += filled // bandwidth
        st["line_idx"] = filled % bandwidth

    def flush():
        if st["line_idx"]:
            partial[st["n_lines"]] = st["line_idx"]
            st["n_lines"] += 1
            st["line_idx"] = 0

    def drain(start):
        end = min(st["dstart"] + lines_per_drain, st["n_lines"])
        num = end - st["dstart"]
        data = (num - 1) * bandwidth + partial.get(end - 1, bandwidth)
        st["acc"] += data
        st["free"] += data
        st["dstart"] = end
        return start + num - 1

    def line_of(word):  # the line holding output number `word` (0-based)
        return int(np.searchsorted(cum, word, side="right")) - 1

    drain_end = offset = g = 0  # g: outputs stored so far; the array is at cycle line + offset
    while g < words:
        line = line_of(g)
        if line + offset < drain_end:  # a drain is running: store until it ends or space runs out
            until = min(drain_end - offset, n_l)
            avail = int(cum[until]) - g
            f = max(st["free"], 1)
            if avail < f:
                store(avail)
                g += avail
            else:  # the f-th output finds no space: the array waits for the drain's end
                store(f)
                g += f
                offset = drain_end - line_of(g - 1)
        else:  # store until the active half is full, then start a drain
            j = max(1, st["free"] - threshold + 1)
            if words - g < j:
                store(words - g)
                g = words
            else:
                store(j)
                g += j
                flush()
                drain_end = drain(line_of(g - 1) + offset)
    flush()
    while st["dstart"] < st["n_lines"]:
        drain(0)
    return max(n_l - 1, 0) + offset, st["acc"]
