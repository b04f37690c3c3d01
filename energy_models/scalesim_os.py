"""SCALE-Sim 3.0's output-stationary (OS) counts of one layer, derived without its demand matrices.

SCALE-Sim's OS compute maps Sr = ofmap pixels onto the array rows and Sc = filters onto its columns,
streams the T = kh*kw*C window elements through, and visits the folds column-fold-major:
for each of `col_fold` filter folds, each of `row_fold` pixel folds. Each fold's demand matrices
are its operand slices skewed by one line per array row or column. From that structure:
- MACs and SRAM counts are products of the fold sizes (each fold reads T x its rows ifmap words
  and T x its columns filter words, and writes its outputs plus rows + cols bookkeeping writes);
- the filter stream is, per filter fold, a permutation of that fold's T x width weights repeated
  `row_fold` times (`fresh_repeat_reads`);
- the ifmap stream is one pass over all pixel folds repeated `col_fold` times: a permutation of
  new addresses when windows do not overlap (kernel <= stride), else SCALE-Sim's own ifmap
  operand matrix read in the skewed order, counted with `reads_per_pass`;
- the ofmap stream's outputs per demand line form a trapezoid per fold, served by
  `serve_ofmap_writes`.
tests/test_scalesim_os.py compares every count with SCALE-Sim's `single_layer_sim` run directly.
"""
from __future__ import annotations

import contextlib
import io
import math

import numpy as np

from energy_models.scalesim_memory import fresh_repeat_reads, reads_per_pass, serve_ofmap_writes, sram_words


def ofmap_dims(layer) -> tuple[int, int]:
    """SCALE-Sim's `topo_calc_hyperparams` (valid windows only; the input is padded already)."""
    return (int(math.ceil((layer.ifmap_h - layer.kernel_h + layer.stride) / layer.stride)),
            int(math.ceil((layer.ifmap_w - layer.kernel_w + layer.stride) / layer.stride)))


def supports(layer) -> bool:
    return min(ofmap_dims(layer)) >= 1


def _folds(size: int, width: int) -> list[int]:
    n = math.ceil(size / width)
    return [width] * (n - 1) + [size - (n - 1) * width]


def _fold_line_counts(t: int, rows: int, cols: int, h: int, w: int) -> np.ndarray:
    """Outputs per ofmap demand line of one fold with h pixels x w filters: T - 1 empty lines, then
    the fold's h x w outputs (rows flipped, padded to rows x cols) skewed by one line per column."""
    lines = np.arange(t - 1 + rows + cols - 1)
    lo = lines - (t - 1 + rows) + 1  # column j of line i is valid iff lo <= j <= i - (t-1+rows-h)
    hi = lines - (t - 1 + rows - h)
    return np.maximum(np.minimum(hi, w - 1) - np.maximum(lo, 0) + 1, 0)


def ofmap_line_counts(t: int, rows: int, cols: int, heights: list[int], widths: list[int]) -> np.ndarray:
    profiles = {}
    parts = []
    for w in widths:
        for h in heights:
            if (h, w) not in profiles:
                profiles[(h, w)] = _fold_line_counts(t, rows, cols, h, w)
            parts.append(profiles[(h, w)])
    return np.concatenate(parts)


def ifmap_stream(layer, rows: int) -> np.ndarray:
    """One pass of the OS ifmap demand (all pixel folds of one filter fold), as SCALE-Sim orders
    it: fold by fold, skewed line t holds window element t - j of the fold's pixel j."""
    from scalesim.compute.operand_matrix import operand_matrix
    from scalesim.layout_utils import layouts
    from scalesim.scale_config import scale_config
    from scalesim.topology_utils import topologies

    cfg = scale_config()
    cfg.update_from_list(["ddi", rows, 1, 64, 64, 64, 0, 10000000, 20000000, "os", "CALC", None])
    topo = topologies()
    topo.load_layer_params_from_list("L", ["L", layer.ifmap_h, layer.ifmap_w, layer.kernel_h,
                                           layer.kernel_w, layer.channels, 1, layer.stride,
                                           layer.stride, 1, 1])
    op = operand_matrix()
    with contextlib.redirect_stdout(io.StringIO()):
        op.set_params(config_obj=cfg, topoutil_obj=topo, layoututil_obj=layouts(), layer_id=0)
        op.create_ifmap_matrix()
    mat = np.asarray(op.ifmap_addr_matrix, dtype=np.int64)
    sr, t = mat.shape
    flat = mat.reshape(-1)
    parts = []
    for r0 in range(0, sr, rows):
        h = min(rows, sr - r0)
        j, c = np.divmod(np.arange(h * t), t)
        order = np.lexsort((j, j + c))  # by skewed line j + c, then by array row j
        parts.append(flat[r0 * t + order])
    s = np.concatenate(parts)
    return s[s != -1]


def _valid(n_out: int, k: int, stride: int, n_in: int) -> int:
    """Window positions inside the input along one axis: SCALE-Sim rounds the ofmap size up, so
    the last window may stick out (its outside elements are -1, never fetched)."""
    return sum(min(k, max(0, n_in - o * stride)) for o in range(n_out))


def ifmap_dram_reads(layer, sim: dict, col_fold: int, memo: dict) -> int:
    ho, wo = ofmap_dims(layer)
    size = sram_words(sim["ifmap_sram_kb"])
    if layer.kernel_h <= layer.stride and layer.kernel_w <= layer.stride:  # every window word is new
        return fresh_repeat_reads([(_valid(ho, layer.kernel_h, layer.stride, layer.ifmap_h)
                                    * _valid(wo, layer.kernel_w, layer.stride, layer.ifmap_w)
                                    * layer.channels, col_fold)], size)
    key = ("os-ifmap", layer.ifmap_h, layer.ifmap_w, layer.kernel_h, layer.kernel_w,
           layer.channels, layer.stride, sim["array_rows"], size)
    have = memo.get(key, [])
    if len(have) < col_fold:
        have = reads_per_pass(ifmap_stream(layer, sim["array_rows"]), size, col_fold)
        memo[key] = have
    return have[col_fold - 1]


def os_counts(layer, sim: dict, memo: dict | None = None) -> dict:
    """SCALE-Sim's counts of `layer` (a `SimLayer`, filters and channels >= 1) with the OS
    dataflow, the same numbers `single_layer_sim` reports. `memo` keeps the per-pass ifmap reads
    of overlapping-window layers between calls (they do not depend on the number of filters)."""
    memo = {} if memo is None else memo
    rows, cols = sim["array_rows"], sim["array_cols"]
    ho, wo = ofmap_dims(layer)
    sr, sc = ho * wo, layer.filters
    t = layer.kernel_h * layer.kernel_w * layer.channels
    heights, widths = _folds(sr, rows), _folds(sc, cols)
    rf, cf = len(heights), len(widths)
    cycles, dram_writes = serve_ofmap_writes(ofmap_line_counts(t, rows, cols, heights, widths),
                                             sram_words(sim["ofmap_sram_kb"]), cols)
    return dict(
        macs=sr * sc * t, cycles=cycles,
        sram_reads_ifmap=cf * t * sr, sram_reads_filter=rf * t * sc,
        sram_writes_ofmap=sr * sc + rf * cf * (rows + cols),
        dram_reads_ifmap=ifmap_dram_reads(layer, sim, cf, memo),
        dram_reads_filter=fresh_repeat_reads([(t * w, rf) for w in widths],
                                             sram_words(sim["filter_sram_kb"])),
        dram_writes_ofmap=dram_writes)
