// Block-level reductions shared by the raw modules (blockDim.x a multiple of 32, <= 1024).
struct bp_plus {
    __device__ __forceinline__ double operator()(double a, double b) const { return a + b; }
};
struct bp_larger {
    __device__ __forceinline__ double operator()(double a, double b) const { return b > a ? b : a; }
};
// Butterfly over a warp: every lane ends with the same bits.
template <typename Op> __device__ __forceinline__ double bp_warp_reduce(double v, Op op) {
    for (int o = 16; o > 0; o >>= 1) v = op(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}
// Over the threads of a 1-D block; every thread gets the result. scratch: 32 doubles of
// shared memory, free again on return. In the second round the lanes past the number of
// warps contribute 0 (zero_unused: a sum) or warp 0's value (a max).
template <typename Op> __device__ double bp_block_reduce(double v, double* scratch, Op op,
                                                         bool zero_unused) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    v = bp_warp_reduce(v, op);
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    v = bp_warp_reduce(lane < warps ? scratch[lane] : (zero_unused ? 0.0 : scratch[0]), op);
    __syncthreads();
    return v;
}
__device__ __forceinline__ double bp_warp_sum(double v) { return bp_warp_reduce(v, bp_plus()); }
__device__ __forceinline__ double bp_warp_max(double v) { return bp_warp_reduce(v, bp_larger()); }
__device__ double bp_block_sum(double v, double* scratch) {
    return bp_block_reduce(v, scratch, bp_plus(), true);
}
__device__ double bp_block_max(double v, double* scratch) {
    return bp_block_reduce(v, scratch, bp_larger(), false);
}
