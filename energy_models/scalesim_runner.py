"""SCALE-Sim runner: access counts of one conv/linear layer for every number of active channels.

SCALE-Sim 3.x is driven through its Python classes, in memory, with no trace files. Two paths give
the same numbers (tests/test_scalesim_runner.py and tests/test_scalesim_os.py check this on
sampled layers, channel counts, array and buffer sizes and all three dataflows):

- `simulate_direct`: SCALE-Sim's own `single_layer_sim.run()` for one layer, as its CLI would.
- `simulate_fast` (used by `run_sweeps`): the three memories are served separately, because in
  CALC bandwidth mode (the only mode we use) the ifmap/filter read buffers never stall, so they
  cannot influence each other or the ofmap buffer; the buffers' bookkeeping is replayed on
  counts (energy_models/scalesim_memory.py).
  * output stationary (both shipped presets): every count is derived from the layer's fold
    structure (energy_models/scalesim_os.py); only layers with overlapping windows read
    SCALE-Sim's ifmap operand matrix, once per layer, whatever the number of filters;
  * weight and input stationary: SCALE-Sim's own compute classes build the demand matrices
    (the prefetch matrices, unused in CALC mode, are not built) and the ifmap counts are kept
    between the filter counts of one sweep.
- numpy >= 2.4 no longer converts 1-element arrays to int, which breaks SCALE-Sim 3.0.0's
  `int(max(ofmap_serviced_cycles))`; `_CompatWriteBuffer` returns the same cycles as a flat array.

Input sizes handed to SCALE-Sim are padded (it does not pad); see `LayerSpec.sim_input_hw`.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import math
import os
from dataclasses import asdict, dataclass
from importlib.metadata import version as _version
from pathlib import Path

import numpy as np

from energy_models.atomic import atomic_write_text
from energy_models.errors import UserError
from energy_models.scalesim_memory import count_estimate_bw_reads, serve_ofmap_writes, sram_words
from energy_models.scalesim_os import os_counts
from energy_models.scalesim_os import supports as os_supports

__all__ = ["count_estimate_bw_reads", "serve_ofmap_writes"]  # re-exported: the buffer replays

RUNNER_VERSION = 2  # bump when the meaning of cached counts changes (2: SRAM sizes in whole KB)
# macs: SCALE-Sim's compute count (ofmap pixels x window); cycles: its compute cycles including
# stalls (`total_cycles`); SRAM and DRAM counts are in words, per operand, as SCALE-Sim reports.
COUNT_COLUMNS = ("macs", "cycles", "sram_reads_ifmap", "sram_reads_filter", "sram_writes_ofmap",
                 "dram_reads_ifmap", "dram_reads_filter", "dram_writes_ofmap")
_SIM_KEYS = ("array_rows", "array_cols", "ifmap_sram_kb", "filter_sram_kb", "ofmap_sram_kb",
             "dataflow")


def scalesim_version() -> str:
    return _version("scalesim")


@dataclass(frozen=True)
class SimLayer:
    """One layer exactly as SCALE-Sim sees it (input already padded, no groups)."""
    ifmap_h: int
    ifmap_w: int
    kernel_h: int
    kernel_w: int
    channels: int
    filters: int
    stride: int

    def with_active(self, axis: str, active: int) -> "SimLayer":
        d = asdict(self)
        d["filters" if axis == "out" else "channels"] = active
        return SimLayer(**d)


# --------------------------------------------------------------------------- SCALE-Sim plumbing
def _scalesim_objects(layer: SimLayer, sim: dict):
    from scalesim.layout_utils import layouts
    from scalesim.scale_config import scale_config
    from scalesim.topology_utils import topologies

    cfg = scale_config()
    cfg.update_from_list(["ddi", sim["array_rows"], sim["array_cols"], sim["ifmap_sram_kb"],
                          sim["filter_sram_kb"], sim["ofmap_sram_kb"], 0, 10000000, 20000000,
                          sim["dataflow"], "CALC", None])
    topo = topologies()
    topo.load_layer_params_from_list("L", [
        "L", layer.ifmap_h, layer.ifmap_w, layer.kernel_h, layer.kernel_w, layer.channels,
        layer.filters, layer.stride, layer.stride, 1, 1])
    return cfg, topo, layouts()


def _compat_write_buffer():
    from scalesim.memory.write_buffer import write_buffer

    class _CompatWriteBuffer(write_buffer):
        """SCALE-Sim's write buffer, returning its per-line cycles flat (numpy >= 2.4 fix)."""

        def service_writes(self, incoming_requests_arr_np, incoming_cycles_arr_np):
            return super().service_writes(incoming_requests_arr_np,
                                          incoming_cycles_arr_np).reshape(-1)

    return _CompatWriteBuffer()


def simulate_direct(layer: SimLayer, sim: dict) -> dict:
    """One full SCALE-Sim `single_layer_sim` run (the reference the fast path must equal)."""
    from scalesim.single_layer_sim import single_layer_sim

    if layer.filters == 0 or layer.channels == 0:
        return dict.fromkeys(COUNT_COLUMNS, 0)
    cfg, topo, lay = _scalesim_objects(layer, sim)
    s = single_layer_sim()
    with contextlib.redirect_stdout(io.StringIO()):
        s.set_params(layer_id=0, config_obj=cfg, topology_obj=topo, layout_obj=lay, verbose=False)
        s.memory_system.ofmap_buf = _compat_write_buffer()
        s.run()
        s.calc_report_data()
    return dict(macs=int(s.num_compute), cycles=int(s.total_cycles),
                sram_reads_ifmap=int(s.ifmap_sram_reads), sram_reads_filter=int(s.filter_sram_reads),
                sram_writes_ofmap=int(s.ofmap_sram_writes), dram_reads_ifmap=int(s.ifmap_dram_reads),
                dram_reads_filter=int(s.filter_dram_reads),
                dram_writes_ofmap=int(s.ofmap_dram_writes))


def _stream(demand) -> np.ndarray:
    flat = np.asarray(demand).reshape(-1)
    return flat[flat != -1].astype(np.int64)


def simulate_fast(layer: SimLayer, sim: dict, memo: dict | None = None) -> dict:
    """Same counts as `simulate_direct` (see the module docstring). `memo` carries what does not
    depend on the number of filters between calls of one sweep: the ifmap operand matrix and, for
    os/ws (whose ifmap demand depends on the filters only through the number of column folds), the
    ifmap counts."""
    from scalesim.compute.operand_matrix import operand_matrix
    from scalesim.compute.systolic_compute_is import systolic_compute_is
    from scalesim.compute.systolic_compute_os import systolic_compute_os
    from scalesim.compute.systolic_compute_ws import systolic_compute_ws

    if layer.filters == 0 or layer.channels == 0:
        return dict.fromkeys(COUNT_COLUMNS, 0)
    memo = {} if memo is None else memo
    if sim["dataflow"] == "os" and os_supports(layer):
        return os_counts(layer, sim, memo)
    cfg, topo, lay = _scalesim_objects(layer, sim)
    op = operand_matrix()
    op.set_params(config_obj=cfg, topoutil_obj=topo, layoututil_obj=lay, layer_id=0)
    ikey = ("ifmap", layer.ifmap_h, layer.ifmap_w, layer.kernel_h, layer.kernel_w,
            layer.channels, layer.stride)
    if ikey in memo:
        op.ifmap_addr_matrix = op.ifmap_addr_matrix_original = memo[ikey]
        op.create_filter_matrix()
        op.create_ofmap_matrix()
        op.matrices_ready_flag = True
    else:
        op.create_operand_matrices()
        memo[ikey] = op.ifmap_addr_matrix
    _, ifm = op.get_ifmap_matrix()
    _, fil = op.get_filter_matrix()
    _, ofm = op.get_ofmap_matrix()
    df = sim["dataflow"]
    comp = {"os": systolic_compute_os, "ws": systolic_compute_ws, "is": systolic_compute_is}[df]()
    if df == "ws":
        comp.set_params(config_obj=cfg, ifmap_op_mat=ifm, filter_op_mat=fil, ofmap_op_mat=ofm,
                        ifmap_op_mat_original=op.ifmap_addr_matrix_original,
                        sparsity_filter_array=op.sparse_filter_array)
    else:
        comp.set_params(config_obj=cfg, ifmap_op_mat=ifm, filter_op_mat=fil, ofmap_op_mat=ofm)
    comp.create_filter_demand_mat()
    comp.create_ofmap_demand_mat()
    dkey = (ikey, "demand", comp.col_fold, tuple(sorted(sim.items()))) if df != "is" else None
    if dkey is not None and dkey in memo:
        ifmap_sram, ifmap_dram = memo[dkey]
    else:
        comp.create_ifmap_demand_mat()
        ifmap_sram = int(comp.ifmap_reads)
        ifmap_dram = count_estimate_bw_reads(_stream(comp.ifmap_demand_matrix),
                                             sram_words(sim["ifmap_sram_kb"]))
        if dkey is not None:
            memo[dkey] = (ifmap_sram, ifmap_dram)
    ofd = comp.ofmap_demand_matrix
    cycles, dram_writes = serve_ofmap_writes(
        np.count_nonzero(ofd != -1, axis=1).tolist(), sram_words(sim["ofmap_sram_kb"]),
        sim["array_cols"])
    return dict(
        macs=int(topo.get_layer_num_ofmap_px(0) * topo.get_layer_window_size(0)), cycles=cycles,
        sram_reads_ifmap=ifmap_sram, sram_reads_filter=int(comp.filter_reads),
        sram_writes_ofmap=int(comp.ofmap_writes), dram_reads_ifmap=ifmap_dram,
        dram_reads_filter=count_estimate_bw_reads(_stream(comp.filter_demand_matrix),
                                                  sram_words(sim["filter_sram_kb"])),
        dram_writes_ofmap=dram_writes)


# --------------------------------------------------------------------------- sweeps, cache, pool
def sim_fields(preset, dataflow: str | None = None) -> dict:
    d = preset.simulator_fields(dataflow)
    return {k: d[k] for k in _SIM_KEYS}


def _sweep_job(layer: SimLayer, axis: str, actives: list[int], sim: dict, groups: int) -> dict:
    """Counts for each active count of one layer and axis (one process; shares a stream memo).

    A grouped conv runs as `groups` independent convs one after another: `active` channels are
    whole groups plus one partial group."""
    memo: dict = {}
    per_group = (layer.filters if axis == "out" else layer.channels)
    out = {}
    for a in actives:
        full, rest = divmod(a, per_group) if groups > 1 else (0, a)
        tot = dict.fromkeys(COUNT_COLUMNS, 0)
        for n, act in ((full, per_group), (1, rest)):
            if n and act:
                r = simulate_fast(layer.with_active(axis, act), sim, memo)
                for c in COUNT_COLUMNS:
                    tot[c] += n * r[c]
        out[a] = tot
    return out


def _cache_key(layer: SimLayer, axis: str, actives: list[int], sim: dict, groups: int) -> dict:
    return dict(layer=asdict(layer), axis=axis, actives=list(actives), groups=groups, sim=sim,
                scalesim=scalesim_version(), runner=RUNNER_VERSION)


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


def _entry_checksum(key: dict, counts: dict) -> str:
    """Covers the key and the counts together: an entry moved to another key's file, or with
    edited counts, fails it."""
    return _digest({"key": key, "counts": counts})


def _cache_load(path: Path, key: dict) -> dict | None:
    """Counts from a cache entry, or None if missing, corrupt, or for another key (stale)."""
    try:
        entry = json.loads(path.read_text())
        counts = entry["counts"]
        if entry["key"] != key or entry["checksum"] != _entry_checksum(key, counts):
            return None
        out = {int(a): {c: int(v[c]) for c in COUNT_COLUMNS} for a, v in counts.items()}
        if set(out) != set(key["actives"]) or any(n < 0 for v in out.values() for n in v.values()):
            return None
        return out
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def _cache_store(path: Path, key: dict, counts: dict) -> None:
    """Best effort: an entry that cannot be written (read-only cache, a directory in the way)
    only costs a recomputation next time; no temp file is left behind."""
    counts = {str(a): v for a, v in counts.items()}
    try:  # best effort: a directory in the way or a read-only cache only costs a recomputation
        atomic_write_text(path, json.dumps(dict(key=key, counts=counts, checksum=_entry_checksum(key, counts))))
    except OSError:
        pass


def default_cache_dir() -> Path:
    return Path(os.environ.get("DDI_HW_CACHE") or Path.home() / ".cache" / "ddi-hw" / "scalesim")


def _chunks(actives: list[int], width: int) -> list[list[int]]:
    """Split active counts at array-fold boundaries: k in one fold share the ifmap stream."""
    groups: dict[int, list[int]] = {}
    for a in actives:
        groups.setdefault(math.ceil(a / width), []).append(a)
    return list(groups.values())


def run_sweeps(requests, sim: dict, cache_dir=None, jobs: int | None = None,
               progress=None) -> dict:
    """Counts for many (layer, axis, actives, groups) requests: identical requests are simulated
    once, cached on disk, and the rest run in parallel processes.

    `requests`: iterable of (SimLayer, axis, list of actives, groups).
    Returns {(SimLayer, axis, groups): {active: counts}}. `progress(done, total)` is called as
    chunks finish."""
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor, as_completed

    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    try:
        (cache / scalesim_version()).mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(f"cannot use SCALE-Sim cache folder {cache} ({err.strerror}); choose "
                        "another with --cache-dir or DDI_HW_CACHE") from None
    todo, results = [], {}
    for layer, axis, actives, groups in requests:
        rkey = (layer, axis, groups)
        results.setdefault(rkey, {})
        for chunk in _chunks(sorted(set(actives)), sim["array_cols"]):
            todo.append((rkey, chunk))
    todo = list({(r, tuple(c)): (r, c) for r, c in todo}.values())
    pending = []
    for rkey, chunk in todo:
        key = _cache_key(rkey[0], rkey[1], chunk, sim, rkey[2])
        path = cache / key["scalesim"] / f"{_digest(key)[:40]}.json"
        hit = _cache_load(path, key)
        if hit is not None:
            results[rkey].update(hit)
        else:
            pending.append((rkey, chunk, key, path))
    total, done = len(todo), len(todo) - len(pending)
    if progress:
        progress(done, total)
    jobs = max(1, jobs or os.cpu_count() or 1)
    # biggest first so the pool ends together
    pending.sort(key=lambda p: -(p[0][0].ifmap_h * p[0][0].ifmap_w * p[0][0].channels
                                 * p[0][0].kernel_h * p[0][0].kernel_w * max(p[1])))

    def finish(item, counts):
        nonlocal done
        rkey, chunk, key, path = item
        _cache_store(path, key, counts)
        results[rkey].update(counts)
        done += 1
        if progress:
            progress(done, total)

    if jobs == 1 or len(pending) <= 1:
        for item in pending:
            rkey, chunk = item[0], item[1]
            finish(item, _sweep_job(rkey[0], rkey[1], chunk, sim, rkey[2]))
    else:
        ctx = mp.get_context("fork" if os.name == "posix" else "spawn")
        with ProcessPoolExecutor(max_workers=min(jobs, len(pending)), mp_context=ctx) as pool:
            futs = {pool.submit(_sweep_job, it[0][0], it[0][1], it[1], sim, it[0][2]): it
                    for it in pending}
            for fut in as_completed(futs):
                finish(futs[fut], fut.result())
    return results
