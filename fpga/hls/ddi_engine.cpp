// ddi_engine: tiled int16 conv engine with output/input channel skipping, for Vitis HLS (xc7z020).
//
// One launch = one conv layer on one image: 3x3 (pad 1) or 1x1 (pad 0), stride 1 or 2, bias (BN
// folded), optional input affine+ReLU (folded pre-activation BN), residual add, ReLU, rounding
// shift, int16 saturation. Arithmetic contract: ddi_hw/deploy/regmap.yaml and ddi_hw/deploy/fixedpoint.py.
//
// Skipping: the active channels are compacted into index lists first, so the loops over output-
// and input-channel tiles run ceil(active / TILE) times: masked channels cost no compute cycles
// (masked outputs are only zero-filled, and not even that with FLAG_NO_ZERO: the exporter sets it
// when the only consumer reads the same channels through its input mask). Layer skipping happens on the processor, which simply
// does not launch the engine. Gates (pooling, 1x1/3x3 gate convs, LSTM, FC) and the exit/final
// classifiers run on the ARM processor.
//
// Parallelism: TILE_OUT x TILE_IN = 16 x 8 = 128 int16 MACs per cycle (128 of 220 DSP48E1) in the
// pipelined inner loop; buffers (sizes in ddi_engine.h, read by energy_models through
// energy_models/engines/ddi_engine.yaml): input tile 8 x 17 x 66, weights 16 x 8 x 9, accumulators
// 16 x 8 x 64 (about 20 BRAM36 in total). HLS pragmas are ignored by g++ (C-simulation).
//
// Fusion (the dataflow energy_models/engines/ddi_engine.yaml describes and the cost table costs):
// the residual add happens in STORE (no separate add pass); with FLAG_POOL the per-channel sums of
// the stored outputs are accumulated in STORE and written after the ofmap (the pooled vector the
// gates on the ARM read: no DRAM re-read of the ofmap); FLAG_NO_STORE drops the ofmap itself
// (a gate conv whose only consumer is its global pool).
//
// C-simulation only (#ifndef __SYNTHESIS__): `ddi_csim_counters` counts the DRAM words (16-bit)
// moved per port and the pipelined-loop iterations (one per cycle at II=1, a cycle proxy that
// includes the load and store phases, which are not overlapped with the MACs).
#include "ddi_engine.h"

#define TO DDI_TILE_OUT
#define TI DDI_TILE_IN
#define TR DDI_TILE_ROWS

#ifndef __SYNTHESIS__
ddi_counters ddi_csim_counters;
#define COUNT(field, n) (ddi_csim_counters.field += (uint64_t)(n))
#else
#define COUNT(field, n) ((void)0)
#endif

static inline bool mask_bit(const uint32_t m[DDI_MASK_WORDS], uint32_t c) {
    return (m[c >> 5] >> (c & 31)) & 1u;
}

static inline acc_t round_shift(acc_t a, uint32_t shift) {
    if (shift == 0) return a;
    acc_t half = acc_t(1) << (shift - 1);
    return (a + half) >> shift;  // arithmetic shift = floor: round half up
}

static inline data_t sat16(acc_t a) {
    if (a > 32767) return 32767;
    if (a < -32768) return -32768;
    return (data_t)a.to_int();
}

void ddi_engine(const data_t *input, const data_t *weights, const int32_t *bias, data_t *output,
                const data_t *residual, const int32_t *pre,
                uint32_t in_ch, uint32_t out_ch, uint32_t in_h, uint32_t in_w,
                uint32_t out_h, uint32_t out_w, uint32_t flags,
                uint32_t acc_shift, uint32_t res_shift, uint32_t pre_shift,
                uint32_t *iterations,
                const uint32_t out_mask[DDI_MASK_WORDS], const uint32_t in_mask[DDI_MASK_WORDS]) {
#pragma HLS INTERFACE mode=m_axi port=input offset=slave bundle=gmem0 depth=65536 max_read_burst_length=64
#pragma HLS INTERFACE mode=m_axi port=residual offset=slave bundle=gmem0 depth=65536
#pragma HLS INTERFACE mode=m_axi port=weights offset=slave bundle=gmem1 depth=65536 max_read_burst_length=64
#pragma HLS INTERFACE mode=m_axi port=bias offset=slave bundle=gmem1 depth=1024
#pragma HLS INTERFACE mode=m_axi port=pre offset=slave bundle=gmem1 depth=2048
#pragma HLS INTERFACE mode=m_axi port=output offset=slave bundle=gmem2 depth=65536 max_write_burst_length=64
#pragma HLS INTERFACE mode=s_axilite port=input offset=0x10
#pragma HLS INTERFACE mode=s_axilite port=weights offset=0x18
#pragma HLS INTERFACE mode=s_axilite port=bias offset=0x20
#pragma HLS INTERFACE mode=s_axilite port=output offset=0x28
#pragma HLS INTERFACE mode=s_axilite port=residual offset=0x30
#pragma HLS INTERFACE mode=s_axilite port=pre offset=0x38
#pragma HLS INTERFACE mode=s_axilite port=in_ch offset=0x40
#pragma HLS INTERFACE mode=s_axilite port=out_ch offset=0x48
#pragma HLS INTERFACE mode=s_axilite port=in_h offset=0x50
#pragma HLS INTERFACE mode=s_axilite port=in_w offset=0x58
#pragma HLS INTERFACE mode=s_axilite port=out_h offset=0x60
#pragma HLS INTERFACE mode=s_axilite port=out_w offset=0x68
#pragma HLS INTERFACE mode=s_axilite port=flags offset=0x70
#pragma HLS INTERFACE mode=s_axilite port=acc_shift offset=0x78
#pragma HLS INTERFACE mode=s_axilite port=res_shift offset=0x80
#pragma HLS INTERFACE mode=s_axilite port=pre_shift offset=0x88
#pragma HLS INTERFACE mode=s_axilite port=iterations offset=0x90
#pragma HLS INTERFACE mode=s_axilite port=out_mask offset=0x100
#pragma HLS INTERFACE mode=s_axilite port=in_mask offset=0x180
#pragma HLS INTERFACE mode=s_axilite port=return

    static uint16_t oidx[DDI_MAX_CH];
    static uint16_t iidx[DDI_MAX_CH];
    static data_t ibuf[TI][DDI_IBUF_ROWS][DDI_IBUF_COLS];
    static data_t wbuf[TO][TI][9];
    static acc_t acc[TO][TR][DDI_MAX_W];
    static int32_t bbuf[TO];
    static int32_t pbuf[TI][2];
    static int32_t psum[DDI_MAX_CH];
#pragma HLS ARRAY_PARTITION variable=ibuf dim=1 type=complete
#pragma HLS ARRAY_PARTITION variable=wbuf dim=1 type=complete
#pragma HLS ARRAY_PARTITION variable=wbuf dim=2 type=complete
#pragma HLS ARRAY_PARTITION variable=acc dim=1 type=complete

    const uint32_t k = (flags & DDI_FLAG_KERNEL3) ? 3 : 1;
    const uint32_t s = (flags & DDI_FLAG_STRIDE2) ? 2 : 1;
    const uint32_t pad = k / 2;
    const uint32_t kk = k * k;
    const uint32_t step = (k == 1) ? s : 1;
    const uint32_t in_plane = in_h * in_w;
    const uint32_t out_plane = out_h * out_w;
    uint32_t iters = 0;
    const bool store = !(flags & DDI_FLAG_NO_STORE);
    const bool pool = (flags & DDI_FLAG_POOL) != 0;
#ifndef __SYNTHESIS__
    ddi_csim_counters = ddi_counters();
#endif

    // Compact the masks into lists of active channels: this is what shortens the tile loops.
    uint32_t n_o = 0, n_i = 0;
COMPACT_OUT:
    for (uint32_t c = 0; c < out_ch; c++) {
#pragma HLS PIPELINE II=1
        if (mask_bit(out_mask, c)) oidx[n_o++] = c;
        psum[c] = 0;
        COUNT(cycles, 1);
    }
COMPACT_IN:
    for (uint32_t c = 0; c < in_ch; c++) {
#pragma HLS PIPELINE II=1
        if (mask_bit(in_mask, c)) iidx[n_i++] = c;
        COUNT(cycles, 1);
    }

    // Masked output channels are not computed; they are written as 0 for the next layer.
ZERO_MASKED:
    for (uint32_t c = 0; c < out_ch; c++) {
        if (!store || (flags & DDI_FLAG_NO_ZERO) || mask_bit(out_mask, c)) continue;
        for (uint32_t p = 0; p < out_plane; p++) {
#pragma HLS PIPELINE II=1
            output[c * out_plane + p] = 0;
            COUNT(cycles, 1);
            COUNT(dram_output, 1);
        }
    }

ROW_TILES:
    for (uint32_t r0 = 0; r0 < out_h; r0 += TR) {
        const uint32_t rows = (out_h - r0 < TR) ? out_h - r0 : TR;
        const uint32_t in_rows = (rows - 1) * s + k;
        const uint32_t cols = in_w + 2 * pad;
    OUT_TILES:
        for (uint32_t ot = 0; ot < n_o; ot += TO) {
        LOAD_B:
            for (uint32_t o = 0; o < TO; o++) {
#pragma HLS PIPELINE II=1
                const bool valid = ot + o < n_o;
                bbuf[o] = valid ? bias[oidx[ot + o]] : 0;
                COUNT(cycles, 1);
                if (valid) COUNT(dram_bias, 2);  // int32 = two 16-bit words
            }
        INIT_ACC:
            for (uint32_t y = 0; y < rows; y++)
                for (uint32_t x = 0; x < out_w; x++) {
#pragma HLS PIPELINE II=1
                    for (uint32_t o = 0; o < TO; o++) {
                        acc[o][y][x] = acc_t(bbuf[o]);
                    }
                    COUNT(cycles, 1);
                }
        IN_TILES:
            for (uint32_t it = 0; it < n_i; it += TI) {
            LOAD_PRE:
                for (uint32_t i = 0; i < TI; i++) {
#pragma HLS PIPELINE II=1
                    const bool valid = (flags & DDI_FLAG_PRE_AFFINE) && it + i < n_i;
                    pbuf[i][0] = valid ? pre[2 * iidx[it + i]] : 0;
                    pbuf[i][1] = valid ? pre[2 * iidx[it + i] + 1] : 0;
                    if (flags & DDI_FLAG_PRE_AFFINE) COUNT(cycles, 1);
                    if (valid) COUNT(dram_pre, 4);  // two int32
                }
            LOAD_W:
                for (uint32_t o = 0; o < TO; o++)
                    for (uint32_t i = 0; i < TI; i++)
                        for (uint32_t q = 0; q < kk; q++) {
#pragma HLS PIPELINE II=1
                            const bool valid = (ot + o < n_o) && (it + i < n_i);
                            wbuf[o][i][q] = valid
                                ? weights[((uint32_t)oidx[ot + o] * in_ch + iidx[it + i]) * kk + q]
                                : data_t(0);
                            COUNT(cycles, 1);
                            if (valid) COUNT(dram_weights, 1);
                        }
            LOAD_X:  // a strided 1x1 conv reads only the pixels it uses (every step-th row and column)
                for (uint32_t i = 0; i < TI; i++)
                    for (uint32_t yy = 0; yy < in_rows; yy += step)
                        for (uint32_t xx = 0; xx < cols; xx += step) {
#pragma HLS PIPELINE II=1
                            const int iy = (int)(r0 * s + yy) - (int)pad;
                            const int ix = (int)xx - (int)pad;
                            data_t v = 0;
                            if (it + i < n_i && iy >= 0 && iy < (int)in_h && ix >= 0 && ix < (int)in_w) {
                                const uint32_t c = iidx[it + i];
                                v = input[c * in_plane + (uint32_t)iy * in_w + (uint32_t)ix];
                                COUNT(dram_input, 1);
                                if (flags & DDI_FLAG_PRE_AFFINE) {
                                    acc_t a = (int64_t)v * pbuf[i][0] + (int64_t)pbuf[i][1];
                                    v = sat16(round_shift(a, pre_shift));
                                    if (v < 0) v = 0;
                                }
                            }
                            ibuf[i][yy][xx] = v;
                            COUNT(cycles, 1);
                        }
            MAC_K:
                for (uint32_t q = 0; q < kk; q++) {
                    const uint32_t ky = q / k, kx = q % k;
                MAC_PIXELS:
                    for (uint32_t y = 0; y < rows; y++)
                        for (uint32_t x = 0; x < out_w; x++) {
#pragma HLS PIPELINE II=1
#pragma HLS LOOP_TRIPCOUNT min=1 max=64
// each (y, x) is touched once per tap q, so consecutive iterations never hit the same accumulator
#pragma HLS DEPENDENCE variable=acc type=inter dependent=false
                            for (uint32_t o = 0; o < TO; o++) {
#pragma HLS UNROLL
                                acc_t sum = 0;
                                for (uint32_t i = 0; i < TI; i++) {
#pragma HLS UNROLL
                                    sum += (int32_t)ibuf[i][y * s + ky][x * s + kx] * (int32_t)wbuf[o][i][q];  // 16x16 -> 1 DSP
                                }
                                acc[o][y][x] += sum;
                            }
                            iters++;
                            COUNT(cycles, 1);
                        }
                }
            }
        STORE:
            for (uint32_t o = 0; o < TO; o++) {
                if (ot + o >= n_o) continue;
                const uint32_t oc = oidx[ot + o];
                for (uint32_t y = 0; y < rows; y++)
                    for (uint32_t x = 0; x < out_w; x++) {
#pragma HLS PIPELINE II=1
                        const uint32_t idx = oc * out_plane + (r0 + y) * out_w + x;
                        acc_t a = acc[o][y][x];
                        if (flags & DDI_FLAG_RESIDUAL) {
                            a += acc_t(residual[idx]) << res_shift;  // residual add fused here
                            COUNT(dram_residual, 1);
                        }
                        if ((flags & DDI_FLAG_RELU) && a < 0) a = 0;
                        const data_t yv = sat16(round_shift(a, acc_shift));
                        if (store) {
                            output[idx] = yv;
                            COUNT(dram_output, 1);
                        }
                        if (pool) psum[oc] += yv;  // global pool fused here
                        COUNT(cycles, 1);
                    }
            }
        }
    }
    if (pool) {
        // pooled sums (int32 per output channel, as two little-endian 16-bit words) after the ofmap
        const uint32_t base = store ? out_ch * out_plane : 0;
    WRITE_POOL:
        for (uint32_t c = 0; c < out_ch; c++) {
#pragma HLS PIPELINE II=2
            output[base + 2 * c] = (data_t)(uint16_t)((uint32_t)psum[c] & 0xffffu);
            output[base + 2 * c + 1] = (data_t)(uint16_t)((uint32_t)psum[c] >> 16);
            COUNT(cycles, 2);
            COUNT(dram_pooled, 2);
        }
    }
    *iterations = iters;
}
