// Numerically safe forms that the activation formulas printed by kernels/activations.py call.
template <typename T> __device__ __forceinline__ T bp_sigmoid(const T z) {
    const T e = exp(-fabs(z));  // exp only sees -|z|: no overflow
    return z >= T(0) ? T(1) / (T(1) + e) : e / (T(1) + e);
}
template <typename T> __device__ __forceinline__ T bp_softplus(const T z) {
    return log1p(exp(-fabs(z))) + (z < T(0) ? T(0) : z);
}
template <typename T> __device__ __forceinline__ T bp_ndtr(const T z) {
    return T(0.5) * erfc(-z * T(INV_SQRT2));
}
template <typename T> __device__ __forceinline__ T bp_npdf(const T z) {
    return exp(T(-0.5) * z * z) * T(INV_SQRT_2PI);
}
