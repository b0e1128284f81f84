// delta = da * act'(s) over a C-contiguous (n, m) batch, and the column sums of delta.
// Block (32, LANES) covers 32 columns; block row blockIdx.y visits rows
// blockIdx.y * LANES + ty, stepping LANES * gridDim.y. With one block row the sums go
// to db (T, added when accumulating); otherwise each block row writes float64
// partials[blockIdx.y, col].
// delta may alias da.
//
// The body is shared by the kernels: `copy(k, d)` receives each delta as it is stored.
// bp_bias_act_backward passes bp_no_copy (nothing), the low-precision variant
// (bias_act_backward_lowp.cu) a store of delta's bf16 or float16 bits: separate kernels,
// so that the float32-only one does no extra work.
struct bp_no_copy {
    template <typename V> __device__ __forceinline__ void operator()(long long, V) const {}
};

template <typename T, typename Copy>
__device__ __forceinline__ void bp_bias_act_backward_body(
        double (&lanes)[LANES][STRIP], const T* da, const T* s, const T alpha, T* delta,
        const Copy copy, double* partial, T* db, const long long n, const long long m,
        const int want_db, const int accumulate) {
    const long long col = (long long)blockIdx.x * STRIP + threadIdx.x;
    double sum = 0.0;
    if (col < m) {
        const long long step = (long long)blockDim.y * gridDim.y;
        for (long long row = (long long)blockIdx.y * blockDim.y + threadIdx.y; row < n;
             row += step) {
            const long long k = row * m + col;
            const T d = da[k] * bp_derivative<T>(s[k], alpha);
            delta[k] = d;
            copy(k, d);
            sum += (double)d;
        }
    }
    if (!want_db) return;  // uniform over the block
    lanes[threadIdx.y][threadIdx.x] = sum;
    __syncthreads();
    if (threadIdx.y == 0 && col < m) {
        double total = 0.0;
        for (int r = 0; r < LANES; ++r) total += lanes[r][threadIdx.x];
        if (gridDim.y == 1) db[col] = accumulate ? T(db[col] + T(total)) : T(total);
        else partial[(long long)blockIdx.y * m + col] = total;
    }
}

template <typename T>
__global__ void bp_bias_act_backward(const T* da, const T* s, const T alpha, T* delta,
                                     double* partial, T* db, const long long n,
                                     const long long m, const int want_db,
                                     const int accumulate) {
    __shared__ double lanes[LANES][STRIP];
    bp_bias_act_backward_body(lanes, da, s, alpha, delta, bp_no_copy(), partial, db, n, m,
                              want_db, accumulate);
}
