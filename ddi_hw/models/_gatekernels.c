/* Fused batch-1 gate kernels of the sparse (inference) path, built at install time.

   Why C: a gate is a few hundred to a few thousand FLOPs (pool, a 10-wide LSTM step, a small FC), but
   the same math as torch / numpy ops costs 5-10 us of dispatch per op, ~50 us per gate at batch 1 --
   more than the convolutions it decides to skip. Each function here is one call with no allocation:
   tensors are passed as data pointers (float32, explicit strides), outputs as writable buffers.
   Same math as the module (training) path; tests/test_sparse_equivalence.py compares the two. */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <string.h>

#define MAXC 4096 /* channels of a gate input */
#define MAXG 512  /* LSTM gate rows (4 x hidden) / FC outputs */

#define RELU(v) ((v) > 0.0f ? (v) : 0.0f) /* not fmaxf: a libm call, not vectorised */

static inline float sigm(float v) { return 1.0f / (1.0f + expf(-v)); }

/* x86-64: also an AVX2 build of the hot loops, picked at load time (the baseline is SSE2). */
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define VECTORISED __attribute__((target_clones("avx2", "default")))
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
    float pooled[MAXC], z[MAXG];
    long G = 4 * H, pos = 0;
    for (long s = 0; s < n; s++) {
        spatial_mean(x + s * sn, C, HW, sc, sp, 0, pooled);
        float *h = state + s * 2 * H, *c = h + H;
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
        out[s] = logit;
        pos += logit > 0;
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


static PyMethodDef methods[] = {
    {"lstm_gate", (PyCFunction)(void (*)(void))lstm_gate, METH_FASTCALL, "fused LSTM layer-gate step"},
    {"pool_fc", (PyCFunction)(void (*)(void))pool_fc, METH_FASTCALL, "ReLU, spatial mean and linear"},
    {NULL, NULL, 0, NULL}};

static struct PyModuleDef moddef = {PyModuleDef_HEAD_INIT, "_gatekernels",
                                    "Fused batch-1 gate kernels of the sparse path.", -1, methods};

PyMODINIT_FUNC PyInit__gatekernels(void) { return PyModule_Create(&moddef); }
