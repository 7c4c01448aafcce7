// kernels/mlp.cu — the non-GEMM parts of an MLP layer, for the CUDA backend
// (src/backend/cuda/device.rs). Compiled at start-up by NVRTC for the
// device's compute capability; no #include, so it needs no CUDA headers.
//
// CPU twins (same formulas, same order of operations per element):
// - `to_f16`   : no arithmetic twin; the CPU kernels read f32 activations
//                directly (cpu/avx2.rs `dense`). Here activations are fed to
//                cuBLAS as FP16, either rounded (`split = 0`) or as a hi/lo
//                pair (`split = 1`, x = hi + lo, see docs/CUDA.md), which
//                keeps f32-level accuracy.
// - `epilogue` : `cpu::row_epilogue` (bias already added by the CPU GEMM
//                kernels `avx2::dense` / `portable::dense`), `cpu::layer_norm`
//                (two-pass mean / biased variance), `cpu::gelu_tanh`,
//                `cpu::sigmoid`, and for the last layer `cpu::output_transform`
//                (max-subtracted softmax, sigmoid).
//
// Precise math only (expf, tanhf, sqrtf): the module is compiled without
// --use_fast_math so results stay within the CPU backend's tolerance.

typedef unsigned short f16_bits;

__device__ __forceinline__ f16_bits f32_to_f16(float f) {
    f16_bits h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
    return h;
}

__device__ __forceinline__ float f16_to_f32(f16_bits h) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
}

// f32 [rows, k] row-major -> f16 [rows, ld] row-major, ld = split ? 2k : k.
// With split, columns [k, 2k) hold the rounding residue x - f16(x), so that
// W' = [W; W] (K doubled) times [hi | lo] equals W times x to ~2^-22.
extern "C" __global__ void to_f16(const float* __restrict__ x,
                                  f16_bits* __restrict__ out,
                                  int rows, int k, int split) {
    const long long total = (long long)rows * k;
    const long long ld = split ? 2LL * k : (long long)k;
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < total; i += stride) {
        const long long r = i / k;
        const long long c = i - r * k;
        const float v = x[i];
        const f16_bits hi = f32_to_f16(v);
        out[r * ld + c] = hi;
        if (split) {
            out[r * ld + k + c] = f32_to_f16(v - f16_to_f32(hi));
        }
    }
}

#define GELU_SQRT_2_OVER_PI 0.7978845608028654f
#define GELU_CUBIC 0.044715f

// Activation codes: must match `act_code` in src/backend/cuda/device.rs.
// 0 identity, 1 relu, 2 gelu (tanh form), 3 tanh, 4 sigmoid.
__device__ __forceinline__ float activate(float x, int act) {
    switch (act) {
    case 1: return fmaxf(x, 0.0f);
    case 2: return 0.5f * x * (1.0f + tanhf(GELU_SQRT_2_OVER_PI * (x + GELU_CUBIC * x * x * x)));
    case 3: return tanhf(x);
    case 4: return 1.0f / (1.0f + expf(-x));
    default: return x;
    }
}

// Sum / max over the block (blockDim.x a multiple of 32, at most 1024).
// Every thread gets the result; `sh` holds 32 floats.
__device__ float block_sum(float v, float* sh) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int nw = (blockDim.x + 31) >> 5;
    __syncthreads();  // `sh` may still be read by a previous reduction
    if (lane == 0) sh[warp] = v;
    __syncthreads();
    float t = 0.0f;
    for (int i = 0; i < nw; ++i) t += sh[i];
    return t;
}

__device__ float block_max(float v, float* sh) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int nw = (blockDim.x + 31) >> 5;
    __syncthreads();
    if (lane == 0) sh[warp] = v;
    __syncthreads();
    float t = __int_as_float(0xff800000);
    for (int i = 0; i < nw; ++i) t = fmaxf(t, sh[i]);
    return t;
}

// One block per row of y = x @ W (f32 [rows, n] from cuBLAS).
// v = act(LN(y + b)); then
//   final == 0: write v as f16 activations of the next layer into `next`
//               ([rows, ld], ld = split ? 2n : n, hi/lo as in `to_f16`);
//   final == 1: apply the output transform (0 identity, 1 softmax,
//               2 sigmoid) and write v back into y (f32).
// When has_ln == 0, gamma/beta are not read (any valid pointer is passed).
extern "C" __global__ void epilogue(float* __restrict__ y, int n,
                                    const float* __restrict__ bias,
                                    const float* __restrict__ gamma,
                                    const float* __restrict__ beta,
                                    float eps, int has_ln, int act,
                                    f16_bits* __restrict__ next, int split,
                                    int final_layer, int transform) {
    __shared__ float sh[32];
    float* row = y + (long long)blockIdx.x * n;

    // Bias; each thread owns columns j = tid, tid + blockDim, ... throughout,
    // so no barrier is needed between the passes over `row`.
    float s = 0.0f;
    for (int j = threadIdx.x; j < n; j += blockDim.x) {
        const float v = row[j] + bias[j];
        row[j] = v;
        s += v;
    }

    float mean = 0.0f, inv = 1.0f;
    if (has_ln) {
        mean = block_sum(s, sh) / (float)n;
        float ss = 0.0f;
        for (int j = threadIdx.x; j < n; j += blockDim.x) {
            const float d = row[j] - mean;
            ss += d * d;
        }
        const float var = block_sum(ss, sh) / (float)n;
        inv = 1.0f / sqrtf(var + eps);
    }

    if (!final_layer) {
        const long long ld = split ? 2LL * n : (long long)n;
        f16_bits* out = next + (long long)blockIdx.x * ld;
        for (int j = threadIdx.x; j < n; j += blockDim.x) {
            float v = row[j];
            if (has_ln) v = (v - mean) * inv * gamma[j] + beta[j];
            v = activate(v, act);
            const f16_bits hi = f32_to_f16(v);
            out[j] = hi;
            if (split) out[n + j] = f32_to_f16(v - f16_to_f32(hi));
        }
        return;
    }

    float m = __int_as_float(0xff800000);
    for (int j = threadIdx.x; j < n; j += blockDim.x) {
        float v = row[j];
        if (has_ln) v = (v - mean) * inv * gamma[j] + beta[j];
        v = activate(v, act);
        if (transform == 2) v = 1.0f / (1.0f + expf(-v));
        row[j] = v;
        m = fmaxf(m, v);
    }
    if (transform == 1) {
        m = block_max(m, sh);
        float sum = 0.0f;
        for (int j = threadIdx.x; j < n; j += blockDim.x) {
            const float e = expf(row[j] - m);
            row[j] = e;
            sum += e;
        }
        const float scale = 1.0f / block_sum(sum, sh);
        for (int j = threadIdx.x; j < n; j += blockDim.x) row[j] *= scale;
    }
}
