/* Fused batch-1 gate kernels of the sparse (inference) path, built at install time.

   Why C: a gate is a few hundred to a few thousand FLOPs (pool, a 10-wide LSTM step, a small FC), but
   the same math as torch / numpy ops costs 5-10 us of dispatch per op, ~50 us per gate at batch 1 --
   more than the convolutions it decides to skip. Each function here is one call with no allocation:
   tensors are passed as data pointers (float32, explicit strides), outputs as writable buffers.
   Same math as the module (training) path; tests/test_sparse_equivalence.py compares the two. */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#include <immintrin.h>
#endif

#define MAXC 4096 /* channels of a gate input */
#define MAXG 512  /* LSTM gate rows (4 x hidden) / FC outputs */

#define RELU(v) ((v) > 0.0f ? (v) : 0.0f) /* not fmaxf: a libm call, not vectorised */

static inline float sigm(float v) { return 1.0f / (1.0f + expf(-v)); }

/* x86-64: also an AVX2 build of the hot loops, picked at load time (the baseline is SSE2). */
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define VECTORISED __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define VECTORISED
#endif

/* Spatial mean of one sample x (C channels, HW pixels, channel stride sc, pixel stride sp),
   optionally of relu(x). */
VECTORISED
static void spatial_mean(const float *restrict x, long C, long HW, long sc, long sp, int relu,
                         float *restrict out) {
    if (sp == 1) { /* NCHW: each channel contiguous */
        for (long c = 0; c < C; c++) {
            const float *restrict r = x + c * sc;
            float a[8] = {0, 0, 0, 0, 0, 0, 0, 0};
            long p = 0;
            if (relu)
                for (; p + 8 <= HW; p += 8)
                    for (int u = 0; u < 8; u++) a[u] += RELU(r[p + u]);
            else
                for (; p + 8 <= HW; p += 8)
                    for (int u = 0; u < 8; u++) a[u] += r[p + u];
            for (; p < HW; p++) a[0] += relu ? RELU(r[p]) : r[p];
            out[c] = (((a[0] + a[1]) + (a[2] + a[3])) + ((a[4] + a[5]) + (a[6] + a[7]))) / (float)HW;
        }
    } else if (sc == 1) { /* channels-last: each pixel contiguous */
        memset(out, 0, sizeof(float) * C);
        for (long p = 0; p < HW; p++) {
            const float *restrict r = x + p * sp;
            if (relu)
                for (long c = 0; c < C; c++) out[c] += RELU(r[c]);
            else
                for (long c = 0; c < C; c++) out[c] += r[c];
        }
        for (long c = 0; c < C; c++) out[c] /= (float)HW;
    } else {
        for (long c = 0; c < C; c++) {
            float a = 0;
            for (long p = 0; p < HW; p++) a += relu ? RELU(x[c * sc + p * sp]) : x[c * sc + p * sp];
            out[c] = a / (float)HW;
        }
    }
}

static int writable(PyObject *o, Py_buffer *b, Py_ssize_t need, const char *what) {
    if (PyObject_GetBuffer(o, b, PyBUF_WRITABLE | PyBUF_C_CONTIGUOUS) < 0) return -1;
    if (b->len < need * (Py_ssize_t)sizeof(float)) {
        PyBuffer_Release(b);
        PyErr_Format(PyExc_ValueError, "%s buffer too small", what);
        return -1;
    }
    return 0;
}

/* One sample's layer gate step (see lstm_gate): returns the logit, updates state = [h | c]. */
static float lstm_step(const float *x, long C, long HW, long sc, long sp, const float *w, const float *b,
                       const float *pw, float pb, long H, float *state) {
    float pooled[MAXC], z[MAXG];
    long G = 4 * H;
    spatial_mean(x, C, HW, sc, sp, 0, pooled);
    float *h = state, *c = h + H;
    memcpy(z, b, sizeof(float) * G);
    for (long i = 0; i < C; i++) {
        const float v = pooled[i], *wr = w + i * G;
        for (long k = 0; k < G; k++) z[k] += v * wr[k];
    }
    for (long i = 0; i < H; i++) {
        const float v = h[i], *wr = w + (C + i) * G;
        for (long k = 0; k < G; k++) z[k] += v * wr[k];
    }
    float logit = pb;
    for (long k = 0; k < H; k++) {
        float c2 = sigm(z[H + k]) * c[k] + sigm(z[k]) * tanhf(z[2 * H + k]);
        c[k] = c2;
        h[k] = sigm(z[3 * H + k]) * tanhf(c2);
        logit += h[k] * pw[k];
    }
    return logit;
}

/* lstm_gate(x, n, C, HW, s_n, s_c, s_p, w, b, pw, pb, H, state, out) -> number of logits > 0

   Layer gate G^L for n samples: mean pool -> [1x1 conv folded into the LSTM input weights] ->
   LSTMCell(hidden H) -> linear to one logit. w: (C + H, 4H) row-major = [W_ih @ W_conv ; W_hh]^T,
   b: 4H (all biases folded), pw: H, pb: float. state: float32 buffer (n, 2H) = [h | c], updated in
   place. out: float32 buffer (n,) of logits. Gate order i, f, g, o as torch.nn.LSTMCell. */
static PyObject *lstm_gate(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 14) {
        PyErr_SetString(PyExc_TypeError, "lstm_gate takes 14 arguments");
        return NULL;
    }
    const float *x = (const float *)PyLong_AsVoidPtr(args[0]);
    long n = PyLong_AsLong(args[1]), C = PyLong_AsLong(args[2]), HW = PyLong_AsLong(args[3]);
    long sn = PyLong_AsLong(args[4]), sc = PyLong_AsLong(args[5]), sp = PyLong_AsLong(args[6]);
    const float *w = (const float *)PyLong_AsVoidPtr(args[7]);
    const float *b = (const float *)PyLong_AsVoidPtr(args[8]);
    const float *pw = (const float *)PyLong_AsVoidPtr(args[9]);
    float pb = (float)PyFloat_AsDouble(args[10]);
    long H = PyLong_AsLong(args[11]);
    if (PyErr_Occurred()) return NULL;
    if (C > MAXC || 4 * H > MAXG || n < 0 || HW < 1) {
        PyErr_SetString(PyExc_ValueError, "lstm_gate: unsupported sizes");
        return NULL;
    }
    Py_buffer st, ob;
    if (writable(args[12], &st, n * 2 * H, "state") < 0) return NULL;
    if (writable(args[13], &ob, n, "out") < 0) {
        PyBuffer_Release(&st);
        return NULL;
    }
    float *state = (float *)st.buf, *out = (float *)ob.buf;
    long pos = 0;
    for (long s = 0; s < n; s++) {
        out[s] = lstm_step(x + s * sn, C, HW, sc, sp, w, b, pw, pb, H, state + s * 2 * H);
        pos += out[s] > 0;
    }
    PyBuffer_Release(&st);
    PyBuffer_Release(&ob);
    return PyLong_FromLong(pos);
}

/* pool_fc(y, n, C, HW, s_n, s_c, s_p, relu, fw, fb, K, out, mask) -> number of logits > 0

   Head of a CNN channel gate after its convolution: [ReLU] -> spatial mean -> linear C -> K.
   fw: (C, K) row-major (the FC weight transposed), fb: K. out: float32 buffer (n, K) of logits; mask: float32 buffer (n, K)
   receives the hard decisions (logit > 0 -> 1.0 else 0.0). */
static PyObject *pool_fc(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 13) {
        PyErr_SetString(PyExc_TypeError, "pool_fc takes 13 arguments");
        return NULL;
    }
    const float *y = (const float *)PyLong_AsVoidPtr(args[0]);
    long n = PyLong_AsLong(args[1]), C = PyLong_AsLong(args[2]), HW = PyLong_AsLong(args[3]);
    long sn = PyLong_AsLong(args[4]), sc = PyLong_AsLong(args[5]), sp = PyLong_AsLong(args[6]);
    int relu = PyObject_IsTrue(args[7]);
    const float *fw = (const float *)PyLong_AsVoidPtr(args[8]);
    const float *fb = (const float *)PyLong_AsVoidPtr(args[9]);
    long K = PyLong_AsLong(args[10]);
    if (PyErr_Occurred()) return NULL;
    if (C > MAXC || n < 0 || HW < 1 || K < 0) {
        PyErr_SetString(PyExc_ValueError, "pool_fc: unsupported sizes");
        return NULL;
    }
    Py_buffer ob, mb;
    if (writable(args[11], &ob, n * K, "out") < 0) return NULL;
    if (writable(args[12], &mb, n * K, "mask") < 0) {
        PyBuffer_Release(&ob);
        return NULL;
    }
    float *out = (float *)ob.buf, *mask = (float *)mb.buf;
    float pooled[MAXC];
    long pos = 0;
    for (long s = 0; s < n; s++) {
        spatial_mean(y + s * sn, C, HW, sc, sp, relu, pooled);
        float *o = out + s * K;
        memcpy(o, fb, sizeof(float) * K);
        for (long i = 0; i < C; i++) {
            const float v = pooled[i], *restrict wr = fw + i * K;
            for (long k = 0; k < K; k++) o[k] += v * wr[k];
        }
        for (long k = 0; k < K; k++) {
            mask[s * K + k] = o[k] > 0 ? 1.0f : 0.0f;
            pos += o[k] > 0;
        }
    }
    PyBuffer_Release(&ob);
    PyBuffer_Release(&mb);
    return PyLong_FromLong(pos);
}


/* ---- Direct 3x3 convolution, batch 1, channels-last, for the sparse path ----

   Why: at batch 1 the sparse path's convolutions are small (16-64 channels, 8x8-32x32 pixels) and
   oneDNN / im2col + GEMM do not shrink in proportion to the active channels (the 16-channel stage's
   im2col is fixed, oneDNN is slow on channel counts that are not multiples of 16) and the channel
   gate's stride-2 conv costs 2-4x its FLOP share. This kernel computes an output tile of P pixels x
   8V channels in registers (the 8-wide vectors are AVX2 / AVX-512VL registers in the x86-64-v3 / v4
   builds, SSE pairs in the baseline), reads only the channels it is given (the caller packs the
   weights of the active ones) and fuses bias, residual add, ReLU, or ReLU + global sum (gate). */
typedef float v8 __attribute__((vector_size(32), aligned(4)));
static const float zeros[MAXC]; /* the zero padding: taps outside the image read from here */

static inline __attribute__((always_inline)) void conv_tile(
    const float *restrict x, long H, long W, long Ci, long s, const float *restrict wp, long Cp, long tap,
    const long *restrict roff, const float *restrict bias, long oy, long ox, long co0, const int P, const int V,
    v8 acc[8][4]) {
    for (int p = 0; p < P; p++)
        for (int v = 0; v < V; v++) acc[p][v] = *(const v8 *)(bias + co0 + 8 * v);
    for (int ky = 0; ky < 3; ky++) {
        long iy = oy * s + ky - 1;
        if (iy < 0 || iy >= H) continue; /* a whole row of zero taps */
        for (int kx = 0; kx < 3; kx++) {
            const float *xq[8];
            for (int p = 0; p < P; p++) {
                long ix = (ox + p) * s + kx - 1;
                xq[p] = ix >= 0 && ix < W ? x + (iy * W + ix) * Ci : zeros;
            }
            const float *restrict wk = wp + (ky * 3 + kx) * tap + co0;
            for (long ci = 0; ci < Ci; ci++) {
                v8 wv[4];
#pragma GCC unroll 4
                for (int v = 0; v < V; v++) wv[v] = *(const v8 *)(wk + roff[ci] + 8 * v);
#pragma GCC unroll 8
                for (int p = 0; p < P; p++) {
                    const float xv = xq[p][ci];
#pragma GCC unroll 4
                    for (int v = 0; v < V; v++) acc[p][v] += xv * wv[v];
                }
            }
        }
    }
}

#define TILE(PP, VV) case PP: conv_tile(x, H, W, Ci, s, wp, Cp, tap, roff, bias, oy, ox, co0, PP, VV, acc); break;
#define TILES(VV) switch (P) { TILE(8, VV) TILE(7, VV) TILE(6, VV) TILE(5, VV) TILE(4, VV) TILE(3, VV) \
                               TILE(2, VV) TILE(1, VV) }

/* Per-thread scratch buffers that only grow (slot 0: a block's temporaries, slot 1: the network
   runner's activations, slot 2: the narrow conv's padded input): no allocation per call (freeing ~100 KB at the heap top can make glibc
   return the pages, and the next call fault fresh zeroed pages in). NULL when out of memory. */
static float *scratch(int slot, size_t n) {
    static __thread float *buf[3];
    static __thread size_t cap[3];
    if (n > cap[slot]) {
        float *p = realloc(buf[slot], sizeof(float) * n);
        if (!p) return NULL;
        buf[slot] = p, cap[slot] = n;
    }
    return buf[slot];
}

/* ---- Narrow convolutions (at most 8 output channels, stride 1), AVX-512 machines ----

   Why: with <= 8 active output channels (half of a 16-channel conv1) the tile kernel above keeps one
   8-wide vector per pixel and needs one broadcast load per FMA; it ran at ~23 GFMA/s against ~32
   for full convs, so half the channels cost ~0.7 of the time. Here the vectors run along a row of
   the output instead: 8 channels x 32 pixels (two 16-wide vectors each) in registers, one vector
   load per 16 FMAs' input and one broadcast weight per 32 pixels. The input is first copied into a
   zero-padded channel-major buffer (Ci, H+2, W rounded up to 32, +2), a few us; the result is
   written channels-last like every other conv here. Only built where GCC targets x86-64 (AVX-512
   code, called only when the CPU has it). */
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define NARROW 1
#ifndef ROWS_MAX_CO
#define ROWS_MAX_CO 16 /* output channels up to which the row kernel is used (measured) */
#endif
typedef float v16 __attribute__((vector_size(64), aligned(4)));

/* Zero the border of C padded planes (H+2, Wp) around an H x W interior. */
static void zero_border(float *xt, long C, long H, long W, long Wp) {
    long plane = (H + 2) * Wp;
    for (long c = 0; c < C; c++) {
        float *p = xt + c * plane;
        memset(p, 0, sizeof(float) * Wp);
        memset(p + (H + 1) * Wp, 0, sizeof(float) * Wp);
        for (long iy = 1; iy <= H; iy++) {
            p[iy * Wp] = 0.0f;
            memset(p + iy * Wp + W + 1, 0, sizeof(float) * (Wp - W - 1));
        }
    }
}

/* Copy x (H, W, Ci) channels-last into the zero-padded channel-major layout (Ci, H+2, Wp). */
__attribute__((target("arch=x86-64-v4")))
static void pad_planes(const float *restrict x, long H, long W, long Ci, long Wp, float *restrict xt) {
    long plane = (H + 2) * Wp;
    zero_border(xt, Ci, H, W, Wp); /* the interior is overwritten below */
    for (long iy = 0; iy < H; iy++)
        for (long ix = 0; ix < W; ix++) {
            const float *src = x + (iy * W + ix) * Ci;
            float *dst = xt + (iy + 1) * Wp + ix + 1;
            for (long ci = 0; ci < Ci; ci++) dst[ci * plane] = src[ci];
        }
}

/* Stride-1 conv on padded planes xt (Ci, H+2, Wp): tiles of 8 output channels x 32 pixels of a row.
   Weights as conv3x3_run's (9, Kw, Cp), input channel ci on row rows[ci] (rows NULL: ci, Kw = Ci).
   Output: channels-last (H, W, Co) [+ res] [ReLU], or (planes != NULL) ReLU'd into padded planes of
   the same geometry (their border must be zero), the next narrow conv's input. */
__attribute__((target("arch=x86-64-v4")))
static void conv3x3_rows_run(const float *restrict xt, long H, long W, long Ci, long Wp, const float *restrict wp,
                             const int *rows, long Kw, const float *restrict bias, long Co, float *restrict out,
                             const float *restrict res, int relu, float *restrict planes) {
    long plane = (H + 2) * Wp, Cp = (Co + 7) & ~7L, tap = (rows ? Kw : Ci) * Cp;
    for (long co0 = 0; co0 < Cp; co0 += 8)
        for (long oy = 0; oy < H; oy++)
            for (long ox = 0; ox < W; ox += 32) {
                v16 acc[8][2];
                for (int c = 0; c < 8; c++) acc[c][0] = acc[c][1] = (v16){0} + bias[co0 + c];
                for (long ci = 0; ci < Ci; ci++) {
                    const float *wci = wp + (rows ? rows[ci] : ci) * Cp + co0;
                    for (int ky = 0; ky < 3; ky++) {
                        const float *row = xt + ci * plane + (oy + ky) * Wp + ox;
                        for (int kx = 0; kx < 3; kx++) {
                            v16 a0 = *(const v16 *)(row + kx), a1 = *(const v16 *)(row + kx + 16);
                            const float *wk = wci + (ky * 3 + kx) * tap;
#pragma GCC unroll 8
                            for (int c = 0; c < 8; c++) {
                                acc[c][0] += a0 * wk[c];
                                acc[c][1] += a1 * wk[c];
                            }
                        }
                    }
                }
                long np = W - ox < 32 ? W - ox : 32, nc = Co - co0 < 8 ? Co - co0 : 8;
                if (planes) {
                    for (long c = 0; c < nc; c++) {
                        float *dst = planes + (co0 + c) * plane + (oy + 1) * Wp + ox + 1;
                        for (long p = 0; p < np; p++) dst[p] = RELU(acc[c][p >> 4][p & 15]);
                    }
                    continue;
                }
                for (long p = 0; p < np; p++) {
                    long o = (oy * W + ox + p) * Co + co0;
                    for (long c = 0; c < nc; c++) {
                        float v = acc[c][p >> 4][p & 15] + (res ? res[o + c] : 0.0f);
                        out[o + c] = relu ? RELU(v) : v;
                    }
                }
            }
}

/* w1s (R, kp) = the rows on[0..k) of w1t (K, R) transposed, zero columns k..kp: 16 channels per
   AVX-512 gather (~2x the scalar row-by-row loop at 32-64 channels). -1: no AVX-512, nothing done. */
__attribute__((target("arch=x86-64-v4")))
static int gather_rows_v4(const float *w1t, const int *on, long k, long kp, long R, float *w1s) {
    for (long j0 = 0; j0 < kp; j0 += 16) {
        int idx[16];
        for (int t = 0; t < 16; t++) idx[t] = j0 + t < k ? on[j0 + t] * (int)R : 0;
        __m512i vi = _mm512_loadu_si512(idx);
        long n = kp - j0 < 16 ? kp - j0 : 16, live = k - j0 < 0 ? 0 : (k - j0 < 16 ? k - j0 : 16);
        __mmask16 ms = (__mmask16)((1u << n) - 1), ml = (__mmask16)((1u << live) - 1);
        for (long r = 0; r < R; r++)
            _mm512_mask_storeu_ps(w1s + r * kp + j0, ms, _mm512_mask_i32gather_ps(_mm512_setzero_ps(), ml, vi, w1t + r, 4));
    }
    return 0;
}

static int gather_rows(const float *w1t, const int *on, long k, long kp, long R, float *w1s) {
    if (!__builtin_cpu_supports("avx512f") || R * MAXC > 0x7fffffffL) return -1;
    return gather_rows_v4(w1t, on, k, kp, R, w1s);
}

/* The row kernel applies: an AVX-512 CPU, stride 1, rows of at least 32 pixels (and, measured, at
   most ROWS_MAX_CO output and at least 8 input channels: the 3-channel stem is faster on tiles). */
static int rows_ok(long W, long s) {
    return s == 1 && W >= 32 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl");
}

/* conv3x3_run's job (no pool) through padded planes; -1 when out of memory. */
static int conv3x3_rows(const float *x, long H, long W, long Ci, const float *wp, const float *bias, long Co,
                        float *out, const float *res, int relu) {
    long Wp = ((W + 31) & ~31L) + 2;
    float *xt = scratch(2, Ci * (H + 2) * Wp);
    if (!xt) return -1;
    pad_planes(x, H, W, Ci, Wp, xt);
    conv3x3_rows_run(xt, H, W, Ci, Wp, wp, NULL, Ci, bias, Co, out, res, relu, NULL);
    return 0;
}
#else
#define NARROW 0
#endif

/* y = conv3x3(x, pad 1, stride s) + bias [+ res] [ReLU], or (pool != NULL) pool[c] = sum over pixels
   of ReLU(y[c]) with y not stored. x: (H, W, Ci) contiguous; wp: (9, Ci, Cp) with Cp = Co rounded up
   to 8 (zero columns), or (9, Kw, Cp) of which input channel ci uses row rows[ci] (rows != NULL: x
   holds a subset of the Kw channels); bias: Cp; out, res: (Ho, Wo, Co) contiguous. Tiles: 4 pixels x 32 channels
   when at least 32 channels are left, else 8 pixels x 8-24 channels (measured best here). */
VECTORISED
static void conv3x3_run(const float *restrict x, long H, long W, long Ci, long s, const float *restrict wp,
                        const float *restrict bias, long Co, float *restrict out, const float *restrict res,
                        int relu, float *restrict pool, const int *rows, long Kw) {
    long Ho = (H - 1) / s + 1, Wo = (W - 1) / s + 1, Cp = (Co + 7) & ~7L, tap = (rows ? Kw : Ci) * Cp;
#if NARROW
    if (Cp <= ROWS_MAX_CO && Ci >= 8 && !pool && !rows && rows_ok(W, s) && conv3x3_rows(x, H, W, Ci, wp, bias, Co, out, res, relu) == 0)
        return;
#endif
    long roff[MAXC]; /* weight row of each input channel (rows: a subset of the Kw rows per tap) */
    for (long ci = 0; ci < Ci; ci++) roff[ci] = (rows ? rows[ci] : ci) * Cp;
    if (pool) memset(pool, 0, sizeof(float) * Co);
    v8 acc[8][4];
    for (long oy = 0; oy < Ho; oy++)
        for (long co0 = 0; co0 < Cp;) {
            long left = (Cp - co0) / 8;
            int V = left >= 4 ? 4 : (int)left, PT = V == 4 ? 4 : 8;
            for (long ox = 0; ox < Wo; ox += PT) {
                int P = Wo - ox >= PT ? PT : (int)(Wo - ox);
                if (V == 4) { TILES(4) } else if (V == 3) { TILES(3) } else if (V == 2) { TILES(2) } else { TILES(1) }
                long nc = Co - co0 < 8 * V ? Co - co0 : 8 * V;
                for (int p = 0; p < P; p++) {
                    const float *a = (const float *)acc[p];
                    if (pool) {
                        for (long c = 0; c < nc; c++) pool[co0 + c] += RELU(a[c]);
                        continue;
                    }
                    long o = (oy * Wo + ox + p) * Co + co0;
                    float *restrict dst = out + o;
                    if (res) {
                        const float *restrict r = res + o;
                        if (relu) for (long c = 0; c < nc; c++) dst[c] = RELU(a[c] + r[c]);
                        else for (long c = 0; c < nc; c++) dst[c] = a[c] + r[c];
                    } else if (relu) {
                        for (long c = 0; c < nc; c++) dst[c] = RELU(a[c]);
                    } else {
                        for (long c = 0; c < nc; c++) dst[c] = a[c];
                    }
                }
            }
            co0 += 8 * V;
        }
}

/* conv3x3(x, H, W, Ci, s, wp, bias, Co, out, res, relu): pointers as ints (res may be None); see
   conv3x3_run. The caller keeps the tensors alive and shaped as described. */
static PyObject *conv3x3(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 11) {
        PyErr_SetString(PyExc_TypeError, "conv3x3 takes 11 arguments");
        return NULL;
    }
    const float *x = (const float *)PyLong_AsVoidPtr(args[0]);
    long H = PyLong_AsLong(args[1]), W = PyLong_AsLong(args[2]), Ci = PyLong_AsLong(args[3]);
    long s = PyLong_AsLong(args[4]);
    const float *wp = (const float *)PyLong_AsVoidPtr(args[5]), *b = (const float *)PyLong_AsVoidPtr(args[6]);
    long Co = PyLong_AsLong(args[7]);
    float *out = (float *)PyLong_AsVoidPtr(args[8]);
    const float *res = args[9] == Py_None ? NULL : (const float *)PyLong_AsVoidPtr(args[9]);
    int relu = PyObject_IsTrue(args[10]);
    if (PyErr_Occurred()) return NULL;
    if (Ci < 1 || Ci > MAXC || Co < 1 || H < 1 || W < 1 || s < 1 || !x || !wp || !b || !out) {
        PyErr_SetString(PyExc_ValueError, "conv3x3: unsupported sizes");
        return NULL;
    }
    Py_BEGIN_ALLOW_THREADS conv3x3_run(x, H, W, Ci, s, wp, b, Co, out, res, relu, NULL, NULL, 0);
    Py_END_ALLOW_THREADS Py_RETURN_NONE;
}

/* The CNN channel gate of one sample (see gate_conv): K logits into o, 0/1 into mask; returns
   the number of channels on. */
static long cnn_gate_run(const float *x, long H, long W, long Ci, const float *wp, const float *b, const float *fw,
                         const float *fb, long K, float *o, float *mask) {
    float pooled[MAXC], inv = 1.0f / (float)(((H - 1) / 2 + 1) * ((W - 1) / 2 + 1));
    long pos = 0;
    conv3x3_run(x, H, W, Ci, 2, wp, b, Ci, NULL, NULL, 1, pooled, NULL, 0);
    memcpy(o, fb, sizeof(float) * K);
    for (long i = 0; i < Ci; i++) {
        const float v = pooled[i] * inv, *restrict wr = fw + i * K;
        for (long k = 0; k < K; k++) o[k] += v * wr[k];
    }
    for (long k = 0; k < K; k++) {
        mask[k] = o[k] > 0 ? 1.0f : 0.0f;
        pos += o[k] > 0;
    }
    return pos;
}

/* gate_conv(x, H, W, Ci, wp, bias, fw, fb, K, out, mask) -> number of logits > 0

   The whole CNN channel gate at batch 1: conv3x3 stride 2 (Ci -> Ci) + bias, ReLU, global mean (the
   conv output is never stored), linear Ci -> K. x, wp, bias as in conv3x3 (Co = Ci); fw: (Ci, K)
   row-major; out / mask: float32 buffers of K logits / 0-1 decisions. */
static PyObject *gate_conv(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 11) {
        PyErr_SetString(PyExc_TypeError, "gate_conv takes 11 arguments");
        return NULL;
    }
    const float *x = (const float *)PyLong_AsVoidPtr(args[0]);
    long H = PyLong_AsLong(args[1]), W = PyLong_AsLong(args[2]), Ci = PyLong_AsLong(args[3]);
    const float *wp = (const float *)PyLong_AsVoidPtr(args[4]), *b = (const float *)PyLong_AsVoidPtr(args[5]);
    const float *fw = (const float *)PyLong_AsVoidPtr(args[6]), *fb = (const float *)PyLong_AsVoidPtr(args[7]);
    long K = PyLong_AsLong(args[8]);
    if (PyErr_Occurred()) return NULL;
    if (Ci < 1 || Ci > MAXC || K < 1 || H < 1 || W < 1 || !x || !wp || !b || !fw || !fb) {
        PyErr_SetString(PyExc_ValueError, "gate_conv: unsupported sizes");
        return NULL;
    }
    Py_buffer ob, mb;
    if (writable(args[9], &ob, K, "out") < 0) return NULL;
    if (writable(args[10], &mb, K, "mask") < 0) {
        PyBuffer_Release(&ob);
        return NULL;
    }
    long pos = cnn_gate_run(x, H, W, Ci, wp, b, fw, fb, K, (float *)ob.buf, (float *)mb.buf);
    PyBuffer_Release(&ob);
    PyBuffer_Release(&mb);
    return PyLong_FromLong(pos);
}

/* One basic block at batch 1 (see `block`): on = the k active conv1 channels (NULL: all K); w1t:
   conv1 as (K, 9 Ci) rows (one per output channel), the source of the gather.
   Returns 0, or -1 when out of memory. */
static int block_run(const float *x, long H, long W, long Ci, long s, const float *w1, const float *w1t,
                     const float *b1, long K, const float *w2, const float *b2, long Co, const int *on, long k,
                     const float *res, float *out) {
    long Ho = (H - 1) / s + 1, Wo = (W - 1) / s + 1, npx = Ho * Wo;
    if (k == 0) { /* conv2 sees zeros: its bias (folded BN shift) + residual, ReLU */
        for (long p = 0; p < npx; p++)
            for (long c = 0; c < Co; c++) out[p * Co + c] = RELU(b2[c] + res[p * Co + c]);
        return 0;
    }
    long kp = (k + 7) & ~7L;
    int gather = k < K;
    float *h = scratch(0, npx * k + (gather ? 9 * Ci * kp + kp : 0));
    if (!h) return -1;
    const float *c1w = w1, *c1b = b1;
    if (gather) { /* conv1's active output channels, packed (9 Ci, kp); conv2 reads its rows in place */
        float *w1s = h + npx * k, *b1s = w1s + 9 * Ci * kp;
        /* row by row of the packed weights: contiguous writes. Channel by channel (writes kp floats
           apart) was 4x slower at 64 channels: ~36 us of a ~80 us half block. */
        long R = 9 * Ci, src[MAXC];
        for (long j = 0; j < k; j++) src[j] = on[j] * R;
#if NARROW
        if (gather_rows(w1t, on, k, kp, R, w1s) == 0) {} else
#endif
        for (long r = 0; r < R; r++) {
            float *restrict dst = w1s + r * kp;
            for (long j = 0; j < k; j++) dst[j] = w1t[src[j] + r];
            for (long j = k; j < kp; j++) dst[j] = 0.0f;
        }
        for (long j = 0; j < kp; j++) b1s[j] = j < k ? b1[on[j]] : 0.0f;
        c1w = w1s, c1b = b1s;
    }
#if NARROW
    if (kp <= ROWS_MAX_CO && Co <= ROWS_MAX_CO && rows_ok(W, s)) { /* conv1 -> padded planes -> conv2 */
        long Wp = ((W + 31) & ~31L) + 2, plane = (H + 2) * Wp;
        float *xt = scratch(2, (Ci + k) * plane);
        if (!xt) return -1;
        pad_planes(x, H, W, Ci, Wp, xt);
        zero_border(xt + Ci * plane, k, H, W, Wp);
        conv3x3_rows_run(xt, H, W, Ci, Wp, c1w, NULL, Ci, c1b, k, NULL, NULL, 1, xt + Ci * plane);
        conv3x3_rows_run(xt + Ci * plane, H, W, k, Wp, w2, gather ? on : NULL, K, b2, Co, out, res, 1, NULL);
        return 0;
    }
#endif
    conv3x3_run(x, H, W, Ci, s, c1w, c1b, k, h, NULL, 1, NULL, NULL, 0);
    conv3x3_run(h, Ho, Wo, k, 1, w2, b2, Co, out, res, 1, NULL, gather ? on : NULL, K);
    return 0;
}

/* block(x, H, W, Ci, s, w1, w1t, b1, K, w2, b2, Co, mask, res, out) -> active channels

   One basic block at batch 1, channels-last: h = ReLU(conv1(x) + b1) over the active output
   channels of conv1 only, out = ReLU(conv2(h) + b2 + res) reading only those channels. w1: (9, Ci,
   K rounded up to 8), w1t: the same as (K, 9 Ci) rows (or 0: gather from w1) and w2: (9, K, Co
   rounded up to 8) packed (see conv3x3_run); mask: None (all K on) or a float32 buffer of K 0/1
   values. conv1's active output channels are gathered from w1t on every call (a few us), conv2 reads
   its active rows in place: no per-mask cache, so a mask never seen before costs the same. */
static PyObject *block(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 15) {
        PyErr_SetString(PyExc_TypeError, "block takes 15 arguments");
        return NULL;
    }
    const float *x = (const float *)PyLong_AsVoidPtr(args[0]);
    long H = PyLong_AsLong(args[1]), W = PyLong_AsLong(args[2]), Ci = PyLong_AsLong(args[3]);
    long s = PyLong_AsLong(args[4]);
    const float *w1 = (const float *)PyLong_AsVoidPtr(args[5]), *w1t = (const float *)PyLong_AsVoidPtr(args[6]);
    const float *b1 = (const float *)PyLong_AsVoidPtr(args[7]);
    long K = PyLong_AsLong(args[8]);
    const float *w2 = (const float *)PyLong_AsVoidPtr(args[9]), *b2 = (const float *)PyLong_AsVoidPtr(args[10]);
    long Co = PyLong_AsLong(args[11]);
    const float *res = (const float *)PyLong_AsVoidPtr(args[13]);
    float *out = (float *)PyLong_AsVoidPtr(args[14]);
    if (PyErr_Occurred()) return NULL;
    if (Ci < 1 || Ci > MAXC || K < 1 || K > MAXC || Co < 1 || H < 1 || W < 1 || s < 1 || !x || !w1 || !w1t || !b1 ||
        !w2 || !b2 || !res || !out) {
        PyErr_SetString(PyExc_ValueError, "block: unsupported sizes");
        return NULL;
    }
    int on[MAXC];
    long k = 0;
    Py_buffer mb;
    int have_mask = args[12] != Py_None;
    if (have_mask) {
        if (PyObject_GetBuffer(args[12], &mb, PyBUF_C_CONTIGUOUS) < 0) return NULL;
        if (mb.len < K * (Py_ssize_t)sizeof(float)) {
            PyBuffer_Release(&mb);
            PyErr_SetString(PyExc_ValueError, "block: mask buffer too small");
            return NULL;
        }
        const float *m = (const float *)mb.buf;
        for (long c = 0; c < K; c++)
            if (m[c] > 0.5f) on[k++] = c;
        PyBuffer_Release(&mb);
    } else {
        k = K;
    }
    int rc;
    Py_BEGIN_ALLOW_THREADS rc = block_run(x, H, W, Ci, s, w1, w1t, b1, K, w2, b2, Co, have_mask ? on : NULL, k, res, out);
    Py_END_ALLOW_THREADS if (rc < 0) return PyErr_NoMemory();
    return PyLong_FromLong(k);
    return PyLong_FromLong(k);
}

/* ---- A whole CIFAR ResNet at batch 1 (the sparse path's fast case) ----

   Why: with the convolutions in C, the Python around them (one gate call, one block call, their
   argument handling and decision records per block) cost ~1 ms of a ~5 ms forward at batch 1, more
   than the layer gates' whole FLOP share. Here the block loop itself is C: Python builds a program
   (one row of pointers and sizes per block, `RESNET_FIELDS`) once per weight version and makes
   one call per image. Same decisions and outputs as the Python loop (tests/test_sparse_equivalence.py). */
enum { F_CI, F_CO, F_H, F_W, F_S, F_SKIP, F_W1, F_B1, F_W2, F_B2, F_SCW, F_SCB, F_LGW, F_LGB, F_LGPW, F_LGPB,
       F_CGW, F_CGB, F_CGFW, F_CGFB, F_MOFF, F_JSKIP, F_W1T, RESNET_FIELDS };
enum { H_STEMW, H_STEMB, H_STEMC, H_H, H_W, H_FCW, H_FCB, H_CLASSES, H_BLOCKS, H_HIDDEN, RESNET_HEAD };

/* 1x1 conv, stride s, + bias (the projection shortcut): x (H, W, Ci), w (Ci, Cp), out (Ho, Wo, Co). */
VECTORISED
static void conv1x1_run(const float *restrict x, long H, long W, long Ci, long s, const float *restrict w,
                        const float *restrict b, long Co, float *restrict out) {
    long Ho = (H - 1) / s + 1, Wo = (W - 1) / s + 1, Cp = (Co + 7) & ~7L;
    float acc[MAXC];
    for (long oy = 0; oy < Ho; oy++)
        for (long ox = 0; ox < Wo; ox++) {
            const float *restrict xp = x + (oy * s * W + ox * s) * Ci;
            memcpy(acc, b, sizeof(float) * Co);
            for (long ci = 0; ci < Ci; ci++) {
                const float v = xp[ci], *restrict wr = w + ci * Cp;
                for (long c = 0; c < Co; c++) acc[c] += v * wr[c];
            }
            memcpy(out + (oy * Wo + ox) * Co, acc, sizeof(float) * Co);
        }
}

#define PTR(v) ((const float *)(intptr_t)(v))

/* resnet(head, prog, x, forced_layer, forced_mask, gates, L, gate_logits, masks, mask_logits, active, logits)

   head: int64 (RESNET_HEAD,), prog: int64 (blocks, RESNET_FIELDS) (0 = absent part); x: (H, W, 3)
   float32 pointer. forced_layer: None or float32 (skippable blocks,) of 0/1; forced_mask: None or
   float32 (sum K,) with NaN where a gate's mask is not forced; gates: run the gates (False: every
   decision is forced). Outputs (float32 buffers, filled where a decision is made): L, gate_logits,
   active (blocks,), masks, mask_logits (sum K,), logits (classes,). Returns None. */
static PyObject *resnet(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 12) {
        PyErr_SetString(PyExc_TypeError, "resnet takes 12 arguments");
        return NULL;
    }
    Py_buffer hb, pb, bufs[8];
    int nb = 0, ok = 0;
    const int roles[8] = {3, 4, 6, 7, 8, 9, 10, 11}; /* optional inputs 3, 4; outputs 6-11 */
    if (PyObject_GetBuffer(args[0], &hb, PyBUF_C_CONTIGUOUS) < 0) return NULL;
    if (PyObject_GetBuffer(args[1], &pb, PyBUF_C_CONTIGUOUS) < 0) {
        PyBuffer_Release(&hb);
        return NULL;
    }
    const float *ptr[12] = {0};
    for (; nb < 8; nb++) {
        PyObject *o = args[roles[nb]];
        if (o == Py_None && roles[nb] < 6) {
            bufs[nb].obj = NULL;
            continue;
        }
        if (PyObject_GetBuffer(o, &bufs[nb], roles[nb] < 6 ? PyBUF_C_CONTIGUOUS : PyBUF_WRITABLE | PyBUF_C_CONTIGUOUS) < 0)
            goto done;
        ptr[roles[nb]] = (const float *)bufs[nb].buf;
    }
    const int64_t *hd = (const int64_t *)hb.buf, *pg = (const int64_t *)pb.buf;
    const float *x = (const float *)PyLong_AsVoidPtr(args[2]);
    int gates = PyObject_IsTrue(args[5]);
    if (PyErr_Occurred()) goto done;
    if (hb.len < RESNET_HEAD * 8 || pb.len < hd[H_BLOCKS] * RESNET_FIELDS * 8 || hd[H_HIDDEN] * 4 > MAXG) {
        PyErr_SetString(PyExc_ValueError, "resnet: malformed program");
        goto done;
    }
    const float *Lf = ptr[3], *Mf = ptr[4];
    float *L = (float *)ptr[6], *gl = (float *)ptr[7], *masks = (float *)ptr[8], *mlog = (float *)ptr[9];
    float *act = (float *)ptr[10], *logits = (float *)ptr[11];
    long H = hd[H_H], W = hd[H_W], C = hd[H_STEMC], big = H * W * C, hid = hd[H_HIDDEN];
    for (long j = 0; j < hd[H_BLOCKS]; j++) {
        const int64_t *r = pg + j * RESNET_FIELDS;
        long sz = r[F_H] * r[F_W] * (r[F_CI] > r[F_CO] ? r[F_CI] : r[F_CO]);
        if (sz > big) big = sz;
    }
    float *cur = scratch(1, 3 * big), *nxt = cur + big, *scb = nxt + big;
    float state[2 * MAXG / 4] = {0};
    int on[MAXC];
    if (!cur) {
        PyErr_NoMemory();
        goto done;
    }
    Py_BEGIN_ALLOW_THREADS
    conv3x3_run(x, H, W, 3, 1, PTR(hd[H_STEMW]), PTR(hd[H_STEMB]), C, cur, NULL, 1, NULL, NULL, 0);
    for (long j = 0; j < hd[H_BLOCKS]; j++) {
        const int64_t *r = pg + j * RESNET_FIELDS;
        long Ci = r[F_CI], Co = r[F_CO], h = r[F_H], w = r[F_W], s = r[F_S];
        int d = -1; /* layer decision: -1 none, 0 skip, 1 run */
        if (r[F_SKIP]) {
            if (r[F_LGW] && gates) {
                float lg = lstm_step(cur, Ci, h * w, 1, Ci, PTR(r[F_LGW]), PTR(r[F_LGB]), PTR(r[F_LGPW]),
                                     *PTR(r[F_LGPB]), hid, state);
                gl[j] = lg;
                d = lg > 0;
            } else if (r[F_LGW]) {
                gl[j] = NAN; /* forced without running the gate */
            }
            if (Lf) d = Lf[r[F_JSKIP]] > 0.5f;
            if (d >= 0) L[j] = (float)d;
        }
        if (d == 0) continue; /* skipped: the output is the input */
        long k = Co;
        const int *onp = NULL;
        if (r[F_CGW]) {
            float *m = masks + r[F_MOFF], *ml = mlog + r[F_MOFF];
            if (gates) cnn_gate_run(cur, h, w, Ci, PTR(r[F_CGW]), PTR(r[F_CGB]), PTR(r[F_CGFW]), PTR(r[F_CGFB]), Co,
                                    ml, m);
            else for (long c = 0; c < Co; c++) ml[c] = NAN;
            if (Mf && Mf[r[F_MOFF]] == Mf[r[F_MOFF]]) memcpy(m, Mf + r[F_MOFF], sizeof(float) * Co); /* forced */
            k = 0;
            for (long c = 0; c < Co; c++)
                if (m[c] > 0.5f) on[k++] = (int)c;
            act[j] = (float)k;
            onp = on;
        }
        const float *res = cur;
        if (r[F_SCW]) {
            conv1x1_run(cur, h, w, Ci, s, PTR(r[F_SCW]), PTR(r[F_SCB]), Co, scb);
            res = scb;
        }
        if (block_run(cur, h, w, Ci, s, PTR(r[F_W1]), PTR(r[F_W1T]), PTR(r[F_B1]), Co, PTR(r[F_W2]), PTR(r[F_B2]), Co,
                      k < Co ? onp : NULL, k, res, nxt) < 0) {
            ok = -1;
            break;
        }
        float *t = cur;
        cur = nxt, nxt = t;
        H = (h - 1) / s + 1, W = (w - 1) / s + 1, C = Co;
    }
    if (ok == 0) { /* global average pool, classifier */
        float pooled[MAXC];
        spatial_mean(cur, C, H * W, 1, C, 0, pooled);
        const float *fw = PTR(hd[H_FCW]), *fb = PTR(hd[H_FCB]);
        for (long k = 0; k < hd[H_CLASSES]; k++) logits[k] = fb[k];
        for (long c = 0; c < C; c++)
            for (long k = 0; k < hd[H_CLASSES]; k++) logits[k] += pooled[c] * fw[c * hd[H_CLASSES] + k];
    }
    Py_END_ALLOW_THREADS
    if (ok < 0) PyErr_NoMemory();
    else ok = 1;
done:
    for (int i = 0; i < nb; i++)
        if (bufs[i].obj) PyBuffer_Release(&bufs[i]);
    PyBuffer_Release(&hb);
    PyBuffer_Release(&pb);
    if (ok != 1) return NULL;
    Py_RETURN_NONE;
}

/* add_relu(out, res, rows, n, m, pool, C, channels_last): the residual add and ReLU of n samples of
   m floats in one pass (batch > 1). rows None: out[i] = ReLU(out[i] + res[i]). rows (int64, n):
   res[rows[i]] = ReLU(out[i] + res[rows[i]]), i.e. the block's result written straight into the
   running samples' rows of the stage map whose rows were its input. pool (float32 (N, C), or None):
   row t of it (t = rows[i], or i) = the spatial mean of the result, computed while it is written
   (C channels of m / C pixels, channels-last or channel-major): the next layer gate's input without
   another pass over the map. Why: add_, relu_ and index_copy_ were three passes over the map, ~0.85
   ms of a ~6 ms stage-1 block at batch 32, and the gate's own pooling one more (~0.4 ms). Pointers
   as ints; the caller keeps the tensors alive and checks the layouts (same per-sample layout, dense). */
VECTORISED
static void add_relu_run(float *out, float *res, const int64_t *rows, long n, long m, float *pool, long C, int cl) {
    long HW = C > 0 ? m / C : 0;
    for (long i = 0; i < n; i++) {
        long t = rows ? rows[i] : i;
        float *restrict q = res + t * m;
        const float *restrict p = out + i * m;
        float *restrict d = rows ? q : out + i * m;
        if (rows)
            for (long j = 0; j < m; j++) q[j] = RELU(p[j] + q[j]);
        else
            for (long j = 0; j < m; j++) d[j] = RELU(p[j] + q[j]);
        if (pool) /* d is hot in cache: the mean costs no memory pass */
            spatial_mean(d, C, HW, cl ? 1 : HW, cl ? C : 1, 0, pool + t * C);
    }
}

static PyObject *add_relu(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 8) {
        PyErr_SetString(PyExc_TypeError, "add_relu takes 8 arguments");
        return NULL;
    }
    float *out = (float *)PyLong_AsVoidPtr(args[0]), *res = (float *)PyLong_AsVoidPtr(args[1]);
    const int64_t *rows = args[2] == Py_None ? NULL : (const int64_t *)PyLong_AsVoidPtr(args[2]);
    long n = PyLong_AsLong(args[3]), m = PyLong_AsLong(args[4]);
    float *pool = args[5] == Py_None ? NULL : (float *)PyLong_AsVoidPtr(args[5]);
    long C = PyLong_AsLong(args[6]);
    int cl = PyObject_IsTrue(args[7]);
    if (PyErr_Occurred()) return NULL;
    if (pool && (C < 1 || m % C)) {
        PyErr_SetString(PyExc_ValueError, "add_relu: m must be a multiple of C");
        return NULL;
    }
    Py_BEGIN_ALLOW_THREADS
    add_relu_run(out, res, rows, n, m, pool, C, cl);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"lstm_gate", (PyCFunction)(void (*)(void))lstm_gate, METH_FASTCALL, "fused LSTM layer-gate step"},
    {"pool_fc", (PyCFunction)(void (*)(void))pool_fc, METH_FASTCALL, "ReLU, spatial mean and linear"},
    {"conv3x3", (PyCFunction)(void (*)(void))conv3x3, METH_FASTCALL, "direct 3x3 conv, batch 1, channels-last"},
    {"gate_conv", (PyCFunction)(void (*)(void))gate_conv, METH_FASTCALL, "CNN channel gate, batch 1"},
    {"block", (PyCFunction)(void (*)(void))block, METH_FASTCALL, "basic block (conv-conv-add), batch 1"},
    {"add_relu", (PyCFunction)(void (*)(void))add_relu, METH_FASTCALL, "residual add + ReLU (+ row scatter), batch > 1"},
    {"resnet", (PyCFunction)(void (*)(void))resnet, METH_FASTCALL, "whole CIFAR ResNet, batch 1"},
    {NULL, NULL, 0, NULL}};

static struct PyModuleDef moddef = {PyModuleDef_HEAD_INIT, "_gatekernels",
                                    "Fused batch-1 gate kernels of the sparse path.", -1, methods};

PyMODINIT_FUNC PyInit__gatekernels(void) { return PyModule_Create(&moddef); }
