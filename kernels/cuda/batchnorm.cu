// Column-strip kernels: block (32, LANES) owns 32 features and visits every row, so the
// per-feature statistics need no second launch. Sums are float64, in a fixed order.
__device__ double bp_lane_sum(double v, double (*lanes)[STRIP]) {
    lanes[threadIdx.y][threadIdx.x] = v;
    __syncthreads();
    double t = 0.0;
    for (int r = 0; r < LANES; ++r) t += lanes[r][threadIdx.x];
    __syncthreads();
    return t;  // every lane of the column gets the same bits
}

// mu = mean x, var = mean (x - mu)^2, r = 1/sqrt(var + eps), out = gamma (x - mu) r + beta
// (xhat = (x - mu) r is not stored: the backward kernel recomputes it from x)
template <typename T>
__global__ void bp_batchnorm_forward(const T* x, const T* gamma, const T* beta, const T eps,
                                     T* out, T* mean, T* var, T* invstd,
                                     const long long n, const long long m) {
    __shared__ double lanes[LANES][STRIP];
    const long long col = (long long)blockIdx.x * STRIP + threadIdx.x;
    const bool active = col < m;
    double s = 0.0;
    if (active) for (long long r = threadIdx.y; r < n; r += LANES) s += (double)x[r * m + col];
    const T mu = (T)(bp_lane_sum(s, lanes) / (double)n);
    double q = 0.0;
    if (active) for (long long r = threadIdx.y; r < n; r += LANES) {
        const double c = (double)(x[r * m + col] - mu);
        q += c * c;
    }
    const T v = (T)(bp_lane_sum(q, lanes) / (double)n);
    const T inv = T(1) / sqrt(v + eps);
    if (!active) return;
    const T g = gamma[col], b = beta[col];
    for (long long r = threadIdx.y; r < n; r += LANES) {
        const long long k = r * m + col;
        const T h = (x[k] - mu) * inv;
        out[k] = g * h + b;
    }
    if (threadIdx.y == 0) { mean[col] = mu; var[col] = v; invstd[col] = inv; }
}

// xhat = (x - mu) r as the forward kernel computed it, dbeta = sum dy,
// dgamma = sum dy xhat, dx = gamma r / n (n dy - dbeta - xhat dgamma); dx may alias dy.
template <typename T>
__global__ void bp_batchnorm_backward(const T* dy, const T* x, const T* gamma,
                                      const T* mean, const T* invstd, T* dx, T* dgamma,
                                      T* dbeta, const long long n, const long long m,
                                      const int accumulate) {
    __shared__ double lanes[LANES][STRIP];
    const long long col = (long long)blockIdx.x * STRIP + threadIdx.x;
    const bool active = col < m;
    const T mu = active ? mean[col] : T(0), inv = active ? invstd[col] : T(0);
    double sb = 0.0, sg = 0.0;
    if (active) for (long long r = threadIdx.y; r < n; r += LANES) {
        const long long k = r * m + col;
        const T h = (x[k] - mu) * inv;
        sb += (double)dy[k];
        sg += (double)dy[k] * (double)h;
    }
    const T db = (T)bp_lane_sum(sb, lanes);
    const T dg = (T)bp_lane_sum(sg, lanes);
    if (!active) return;
    const T nn = (T)n;
    const T k0 = gamma[col] * inv / nn;
    for (long long r = threadIdx.y; r < n; r += LANES) {
        const long long k = r * m + col;
        const T h = (x[k] - mu) * inv;
        dx[k] = k0 * (nn * dy[k] - db - h * dg);
    }
    if (threadIdx.y == 0) {
        dgamma[col] = accumulate ? T(dgamma[col] + dg) : dg;
        dbeta[col] = accumulate ? T(dbeta[col] + db) : db;
    }
}
