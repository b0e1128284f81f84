// Block-level reductions shared by the raw modules (blockDim.x a multiple of 32, <= 1024).
__device__ __forceinline__ double bp_warp_sum(double v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;  // butterfly: every lane holds the same bits
}
__device__ __forceinline__ double bp_warp_max(double v) {
    for (int o = 16; o > 0; o >>= 1) {
        const double w = __shfl_xor_sync(0xffffffffu, v, o);
        v = w > v ? w : v;
    }
    return v;
}
// Sum / max over the threads of a 1-D block; every thread gets the result.
// scratch: 32 doubles of shared memory, free again on return.
__device__ double bp_block_sum(double v, double* scratch) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    v = bp_warp_sum(v);
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    v = bp_warp_sum(lane < warps ? scratch[lane] : 0.0);
    __syncthreads();
    return v;
}
__device__ double bp_block_max(double v, double* scratch) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    v = bp_warp_max(v);
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    v = bp_warp_max(scratch[lane < warps ? lane : 0]);
    __syncthreads();
    return v;
}
