// bp_bias_act_backward that also writes delta_lp[k] = bp_lowp_bits(delta[k]), the bits of
// the low-precision copy (bf16, or float16 as uint16 bits) of exactly the float32 value
// stored; bp_lowp_bits comes from the module's preamble (kernels/cupy_kernels.py), one
// module per format. Launched with float32 only (the double instantiation is never used).
struct bp_lowp_copy {
    unsigned short* bits;
    __device__ __forceinline__ void operator()(long long k, float x) const {
        bits[k] = bp_lowp_bits(x);
    }
};

template <typename T>
__global__ void bp_bias_act_backward_lowp(const T* da, const T* s, const T alpha, T* delta,
                                          unsigned short* delta_lp, double* partial, T* db,
                                          const long long n, const long long m,
                                          const int want_db, const int accumulate) {
    __shared__ double lanes[LANES][STRIP];
    bp_bias_act_backward_body(lanes, da, s, alpha, delta, bp_lowp_copy{delta_lp}, partial, db,
                              n, m, want_db, accumulate);
}
