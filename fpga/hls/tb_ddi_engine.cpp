// C-simulation test bench: runs every layer case written by `python -m ddi_hw.deploy.csim vectors DIR`
// (inputs, weights, masks and the expected output from the bit-exact numpy reference) through
// ddi_engine and checks the output bit for bit. Prints the compute-loop iteration count per case.
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "ddi_engine.h"

template <typename T>
static std::vector<T> read_bin(const std::string &path, size_t n) {
    std::vector<T> v(n ? n : 1, 0);
    if (n == 0) return v;
    FILE *f = fopen(path.c_str(), "rb");
    if (!f) { fprintf(stderr, "cannot open %s\n", path.c_str()); exit(2); }
    size_t got = fread(v.data(), sizeof(T), n, f);
    fclose(f);
    if (got != n) { fprintf(stderr, "%s: expected %zu values, got %zu\n", path.c_str(), n, got); exit(2); }
    return v;
}

int main(int argc, char **argv) {
    if (argc != 2) { fprintf(stderr, "usage: %s VECTOR_DIR\n", argv[0]); return 2; }
    const std::string dir = argv[1];
    FILE *cases = fopen((dir + "/cases.txt").c_str(), "r");
    if (!cases) { fprintf(stderr, "no %s/cases.txt (run make vectors)\n", dir.c_str()); return 2; }
    char name[256];
    unsigned in_ch, out_ch, in_h, in_w, out_h, out_w, flags, acc_shift, res_shift, pre_shift;
    int failures = 0, n_cases = 0;
    while (fscanf(cases, "%255s %u %u %u %u %u %u %u %u %u %u", name, &in_ch, &out_ch, &in_h, &in_w,
                  &out_h, &out_w, &flags, &acc_shift, &res_shift, &pre_shift) == 11) {
        const std::string base = dir + "/" + name + ".";
        const unsigned k = (flags & DDI_FLAG_KERNEL3) ? 3 : 1;
        const size_t n_in = (size_t)in_ch * in_h * in_w, n_out = (size_t)out_ch * out_h * out_w;
        auto x = read_bin<int16_t>(base + "input.bin", n_in);
        auto w = read_bin<int16_t>(base + "weights.bin", (size_t)out_ch * in_ch * k * k);
        auto b = read_bin<int32_t>(base + "bias.bin", out_ch);
        auto r = read_bin<int16_t>(base + "residual.bin", (flags & DDI_FLAG_RESIDUAL) ? n_out : 0);
        auto p = read_bin<int32_t>(base + "pre.bin", (flags & DDI_FLAG_PRE_AFFINE) ? 2 * in_ch : 0);
        auto om = read_bin<uint32_t>(base + "out_mask.bin", DDI_MASK_WORDS);
        auto im = read_bin<uint32_t>(base + "in_mask.bin", DDI_MASK_WORDS);
        auto expected = read_bin<int16_t>(base + "expected.bin", n_out);
        std::vector<int16_t> y(n_out, 0x5a5a);  // poison: every output word must be written
        uint32_t iters = 0;
        ddi_engine(x.data(), w.data(), b.data(), y.data(), r.data(), p.data(), in_ch, out_ch, in_h,
                   in_w, out_h, out_w, flags, acc_shift, res_shift, pre_shift, &iters, om.data(),
                   im.data());
        size_t bad = 0, first = 0;
        for (size_t i = 0; i < n_out; i++)
            if (y[i] != expected[i]) { if (!bad) first = i; bad++; }
        n_cases++;
        if (bad) {
            failures++;
            printf("FAIL %-28s %zu/%zu words differ (first at %zu: got %d want %d) iterations=%u\n",
                   name, bad, n_out, first, y[first], expected[first], iters);
        } else {
            printf("PASS %-28s bit-exact %zu words iterations=%u\n", name, n_out, iters);
        }
    }
    fclose(cases);
    printf("%d/%d cases bit-exact\n", n_cases - failures, n_cases);
    return (failures || n_cases == 0) ? 1 : 0;
}
