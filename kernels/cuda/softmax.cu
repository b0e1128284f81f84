// One block per row of a C-contiguous (N, C) array; the output may alias the input.
template <typename T>
__global__ void bp_softmax_forward(const T* x, T* y, const long long c) {
    __shared__ double scratch[32];
    const T* xr = x + (long long)blockIdx.x * c;
    T* yr = y + (long long)blockIdx.x * c;
    double mx = (double)xr[0];
    for (long long j = threadIdx.x; j < c; j += blockDim.x) mx = fmax(mx, (double)xr[j]);
    const T m = (T)bp_block_max(mx, scratch);
    double sum = 0.0;
    for (long long j = threadIdx.x; j < c; j += blockDim.x) {
        const T e = exp(xr[j] - m);
        yr[j] = e;
        sum += (double)e;
    }
    const T s = (T)bp_block_sum(sum, scratch);
    for (long long j = threadIdx.x; j < c; j += blockDim.x) yr[j] = yr[j] / s;
}

// dx = y * (dy - sum_k dy_k y_k) per row; dx may alias dy.
template <typename T>
__global__ void bp_softmax_backward(const T* dy, const T* y, T* dx, const long long c) {
    __shared__ double scratch[32];
    const long long off = (long long)blockIdx.x * c;
    double dot = 0.0;
    for (long long j = threadIdx.x; j < c; j += blockDim.x)
        dot += (double)dy[off + j] * (double)y[off + j];
    const T d = (T)bp_block_sum(dot, scratch);
    for (long long j = threadIdx.x; j < c; j += blockDim.x)
        dx[off + j] = y[off + j] * (dy[off + j] - d);
}

// loss_i = (1 - eps)(lse - z_label) - eps/C (sum_k z_k - C lse), grad = scale (softmax(z) - y)
// with y = off + on at the label, off elsewhere (off = eps/C, on = 1 - eps); grad may alias z.
// A label outside [0, C) gives a NaN loss and gradient row, as in the numba backends.
template <typename T>
__global__ void bp_softmax_xent(const T* z, const long long* labels, const T off, const T on,
                                const T scale, const double smoothing, T* grad, T* loss,
                                const long long c) {
    __shared__ double scratch[32];
    const long long row = blockIdx.x;
    const T* zr = z + row * c;
    T* gr = grad + row * c;
    const long long label = labels[row];
    if (label < 0 || label >= c) {  // the caller validates labels: never read past the row
        for (long long j = threadIdx.x; j < c; j += blockDim.x) gr[j] = (T)nan("");
        if (threadIdx.x == 0) loss[row] = (T)nan("");
        return;  // the whole block: one row per block
    }
    const double z_label = (double)zr[label];  // read before any thread overwrites the row
    double mx = (double)zr[0];
    for (long long j = threadIdx.x; j < c; j += blockDim.x) mx = fmax(mx, (double)zr[j]);
    const T m = (T)bp_block_max(mx, scratch);
    double sum = 0.0, zsum = 0.0;
    for (long long j = threadIdx.x; j < c; j += blockDim.x) {
        sum += (double)exp(zr[j] - m);
        zsum += (double)zr[j];
    }
    sum = bp_block_sum(sum, scratch);
    zsum = bp_block_sum(zsum, scratch);
    if (threadIdx.x == 0) {
        const double lse = (double)m + log(sum);
        double l = (1.0 - smoothing) * (lse - z_label);
        if (smoothing != 0.0) l -= smoothing / (double)c * (zsum - (double)c * lse);
        loss[row] = (T)l;
    }
    const T s = (T)sum;
    for (long long j = threadIdx.x; j < c; j += blockDim.x) {
        const T p = exp(zr[j] - m) / s;
        gr[j] = (p - (j == label ? off + on : off)) * scale;
    }
}
