// delta = da * act'(s) over a C-contiguous (n, m) batch, and the column sums of delta.
// Block (32, LANES) covers 32 columns; block row blockIdx.y visits rows
// blockIdx.y * LANES + ty, stepping LANES * gridDim.y. With one block row the sums go
// to db (T, added when accumulating); otherwise each block row writes float64
// partials[blockIdx.y, col].
// delta may alias da.
template <typename T>
__global__ void bp_bias_act_backward(const T* da, const T* s, const T alpha, T* delta,
                                     double* partial, T* db, const long long n,
                                     const long long m, const int want_db,
                                     const int accumulate) {
    __shared__ double lanes[LANES][STRIP];
    const long long col = (long long)blockIdx.x * STRIP + threadIdx.x;
    double sum = 0.0;
    if (col < m) {
        const long long step = (long long)blockDim.y * gridDim.y;
        for (long long row = (long long)blockIdx.y * blockDim.y + threadIdx.y; row < n;
             row += step) {
            const long long k = row * m + col;
            const T d = da[k] * bp_derivative<T>(s[k], alpha);
            delta[k] = d;
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
