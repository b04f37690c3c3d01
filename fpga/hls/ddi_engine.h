// ddi_engine: one reusable int16 convolution engine for the Zynq-7020 (see ddi_hw/deploy/regmap.yaml).
#ifndef DDI_ENGINE_H
#define DDI_ENGINE_H

#include <stdint.h>

#include "ap_int.h"
#include "regmap.h"

typedef int16_t data_t;     // activations and weights in DDR (Q formats chosen per tensor)
typedef ap_int<DDI_ACC_BITS> acc_t;  // one DSP48E1 accumulator

// On-chip input tile: TILE_IN channels x the input rows TILE_ROWS output rows need at stride 2,
// k = 3 x the padded width. energy_models/engines/ddi_engine.yaml derives the same sizes (tested).
#define DDI_IBUF_ROWS ((DDI_TILE_ROWS - 1) * 2 + 3)
#define DDI_IBUF_COLS (DDI_MAX_W + 2)

#ifndef __SYNTHESIS__
// C-simulation instrumentation (not synthesised): DRAM words (16-bit) per port and pipelined-loop
// iterations of the last ddi_engine call.
struct ddi_counters {
    uint64_t cycles, dram_input, dram_weights, dram_bias, dram_pre, dram_residual, dram_output,
        dram_pooled;
};
extern ddi_counters ddi_csim_counters;
#endif

// Argument order = register order in regmap.yaml (checked by tests/test_fpga_regmap.py).
void ddi_engine(const data_t *input, const data_t *weights, const int32_t *bias, data_t *output,
                const data_t *residual, const int32_t *pre,
                uint32_t in_ch, uint32_t out_ch, uint32_t in_h, uint32_t in_w,
                uint32_t out_h, uint32_t out_w, uint32_t flags,
                uint32_t acc_shift, uint32_t res_shift, uint32_t pre_shift,
                uint32_t *iterations,
                const uint32_t out_mask[DDI_MASK_WORDS], const uint32_t in_mask[DDI_MASK_WORDS]);

#endif  // DDI_ENGINE_H
