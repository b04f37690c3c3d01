// C ABI around the engine for the C-simulation shared library (ddi_hw/deploy/csim.py loads it with ctypes).
// Not part of the synthesised IP.
#include "ddi_engine.h"

extern "C" {

int ddi_regmap_version(void) { return DDI_REGMAP_VERSION; }

// Returns 0 on success, or a negative code for arguments outside the engine's compile-time limits.
int ddi_engine_run(const int16_t *input, const int16_t *weights, const int32_t *bias, int16_t *output,
                   const int16_t *residual, const int32_t *pre,
                   uint32_t in_ch, uint32_t out_ch, uint32_t in_h, uint32_t in_w,
                   uint32_t out_h, uint32_t out_w, uint32_t flags,
                   uint32_t acc_shift, uint32_t res_shift, uint32_t pre_shift,
                   uint32_t *iterations, const uint32_t *out_mask, const uint32_t *in_mask) {
    if (in_ch > DDI_MAX_CH || out_ch > DDI_MAX_CH) return -1;
    if (in_w > DDI_MAX_W || out_w > DDI_MAX_W) return -2;
    ddi_engine(input, weights, bias, output, residual, pre, in_ch, out_ch, in_h, in_w, out_h, out_w,
               flags, acc_shift, res_shift, pre_shift, iterations, out_mask, in_mask);
    return 0;
}

// The C-sim counters of the last ddi_engine_run (see ddi_engine.h), in declaration order.
void ddi_engine_counters(uint64_t out[8]) {
    const ddi_counters &c = ddi_csim_counters;
    const uint64_t v[8] = {c.cycles, c.dram_input, c.dram_weights, c.dram_bias, c.dram_pre,
                           c.dram_residual, c.dram_output, c.dram_pooled};
    for (int i = 0; i < 8; i++) out[i] = v[i];
}

// Engine buffer sizes (words), checked against energy_models/engines/ddi_engine.yaml.
int ddi_engine_size(int which) {
    switch (which) {
        case 0: return DDI_TILE_IN * DDI_IBUF_ROWS * DDI_IBUF_COLS;  // input tile
        case 1: return DDI_TILE_OUT * DDI_TILE_IN * 9;                 // weight tile
        case 2: return DDI_TILE_OUT * DDI_TILE_ROWS * DDI_MAX_W;       // accumulators
        default: return -1;
    }
}
}
