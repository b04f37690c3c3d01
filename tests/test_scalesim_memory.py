"""The buffer replays of energy_models/scalesim_memory.py against SCALE-Sim's own buffer classes,
driven with the same streams (random, repeated, and built from fresh permutations)."""
import numpy as np
import pytest

from energy_models.scalesim_memory import (
    count_estimate_bw_reads,
    fresh_repeat_reads,
    reads_per_pass,
    serve_ofmap_writes,
)


def scalesim_reads(stream, size):
    """DRAM reads of SCALE-Sim's ReadBufferEstimateBw for `stream`, served in lines."""
    from scalesim.memory.read_buffer_estimate_bw import ReadBufferEstimateBw
    from scalesim.memory.read_port import read_port

    stream = np.asarray(stream)
    buf = ReadBufferEstimateBw()
    buf.set_params(backing_buf_obj=read_port(), total_size_bytes=size, word_size=1,
                   active_buf_frac=0.5, backing_buf_default_bw=10)
    lines = stream.reshape(-1, 4) if stream.size % 4 == 0 else stream.reshape(-1, 1)
    buf.service_reads(lines, np.arange(lines.shape[0]).reshape(-1, 1))
    buf.complete_all_prefetches()
    return buf.get_num_accesses()


def scalesim_writes(line_counts, size, bandwidth):
    """(cycles, DRAM writes) of SCALE-Sim's write_buffer fed line by line as
    `double_buffered_scratchpad.service_memory_requests` does (CALC mode: only it stalls)."""
    from scalesim.memory.write_buffer import write_buffer
    from scalesim.memory.write_port import write_port

    buf = write_buffer()
    buf.set_params(backing_buf_obj=write_port(), total_size_bytes=size, word_size=1,
                   active_buf_frac=0.5, backing_buf_bw=bandwidth)
    stall, served, addr = 0, [], 0
    for n in line_counts:
        line = -np.ones((1, bandwidth))
        line[0, :n] = np.arange(addr, addr + n)
        addr += n
        cycle = np.zeros((1, 1)) + len(served) + stall
        out = np.asarray(buf.service_writes(line, cycle)).reshape(-1)
        served.append(int(out[0]))
        stall += int(out[0] - cycle[0, 0])
    buf.empty_all_buffers(served[-1])
    return max(served), buf.get_num_accesses()


@pytest.mark.parametrize("seed", range(16))
def test_ofmap_replay_equals_scalesim_write_buffer(seed):
    rng = np.random.default_rng(seed)
    bandwidth = int(rng.choice([1, 3, 4, 8, 16]))
    size = int(rng.choice([2, 7, 16, 33, 64, 100, 256, 1024]))
    n = int(rng.integers(1, 400))
    kind = seed % 3  # dense lines, sparse lines, or a skewed-fold-like ramp
    if kind == 0:
        counts = rng.integers(0, bandwidth + 1, n)
    elif kind == 1:
        counts = rng.integers(0, bandwidth + 1, n) * (rng.random(n) < 0.2)
    else:
        ramp = np.minimum(np.arange(1, bandwidth + 1), np.arange(bandwidth, 0, -1))
        counts = np.tile(np.concatenate([np.zeros(int(rng.integers(0, 9)), int), ramp]), 1 + n // 20)
    assert serve_ofmap_writes(counts, size, bandwidth) == scalesim_writes(counts, size, bandwidth)


@pytest.mark.parametrize("seed", range(12))
def test_repeated_stream_reads_equal_scalesim_read_buffer(seed):
    rng = np.random.default_rng(100 + seed)
    size = [100, 300, 1000, 1024, 4000][seed % 5]
    stream = rng.integers(0, int(rng.integers(1, 3000)), int(rng.integers(1, 5000)))
    passes = int(rng.integers(1, 4))
    got = reads_per_pass(stream, size, passes)
    assert got == [scalesim_reads(np.tile(stream, p), size) for p in range(1, passes + 1)]
    assert count_estimate_bw_reads(stream, size) == got[0]


@pytest.mark.parametrize("seed", range(12))
def test_fresh_permutation_segments_closed_form_equals_scalesim_read_buffer(seed):
    """Segments as the output-stationary filter stream makes them: each a permutation of new
    addresses, repeated; sizes around the epoch (E = 50 x size/100 words) on both sides."""
    rng = np.random.default_rng(200 + seed)
    size = [100, 200, 1000, 1100][seed % 4]
    e = 50 * (size // 100)
    segments, stream, base = [], [], 0
    for _ in range(int(rng.integers(1, 6))):
        u = int(rng.choice([1, e - 1, e, e + 1, int(rng.integers(1, 3 * e))]))
        r = int(rng.integers(1, 5))
        perm = base + rng.permutation(u)
        base += u
        segments.append((u, r))
        stream += [perm] * r
    assert fresh_repeat_reads(segments, size) == scalesim_reads(np.concatenate(stream), size)
