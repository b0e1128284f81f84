// The CUDA C++ that backprop's CuPy kernels use, on the host: enough to run the kernel
// sources of kernels/cupy_kernels.py on a CPU, unchanged but for their pointer declarations
// (tests/cuda_host.py compiles them with this header and launches them on NumPy arrays).
// It proves the kernels' logic and math (indexing, reductions, barriers, warp shuffles, the
// bit-level conversions of the low-precision copies) without a GPU; the GPU's own rounding
// of exp, tanh or erf is left to ci/gpu.sh.
//
// Execution: the blocks of a grid run one after another; the threads of a block are
// coroutines (one stack each) run in turn by a scheduler until each exits or waits (in
// index order, or from the last to the first in odd-numbered blocks, so that a race
// between threads shows as blocks that disagree):
//   __syncthreads()      waits until every thread of the block is there
//   __shfl_xor_sync()    publishes the lane's value, waits for every lane of its warp,
//                        reads the partner's value, waits again (so no slot is reused early)
// A wait that can never be released (threads of a block waiting at different barriers, or
// at one that others exited without reaching) stops the launch with an error instead of
// hanging, and so does a partial shuffle mask. __shared__ variables are function statics:
// one copy, shared by the threads of the block that runs, as shared memory is.
//
// Memory: every pointer of a kernel is a bp_ptr (below) that checks each index against the
// size of the array it came from: an array argument, or a __shared__ array passed to a
// function (a __shared__ array indexed where it is declared is a plain C array, unchecked).
//
// A coroutine starts through ucontext (makecontext/swapcontext) and then switches with
// _setjmp/_longjmp, which do not save the signal mask (swapcontext makes a system call per
// switch: a block reduction switches dozens of times per thread).
#pragma once
#include <algorithm>
#include <cmath>
#include <csetjmp>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <functional>
#include <vector>
#include <ucontext.h>

using std::erf;
using std::exp;
using std::fabs;
using std::fmax;
using std::log;
using std::log1p;
using std::nan;
using std::sqrt;
using std::tanh;

#define __global__
#define __device__
#define __forceinline__ inline
#define __shared__ static

struct dim3 {
    unsigned x = 1, y = 1, z = 1;
};

namespace cuda_host {

enum State { RUNNABLE, AT_BARRIER, AT_SHUFFLE, EXITED };

struct Thread {
    dim3 index;
    State state = RUNNABLE;
    bool started = false;
    std::uint64_t slot = 0;  // the value this lane offers to a shuffle
    jmp_buf resume;
    ucontext_t start;
};

constexpr std::size_t STACK_BYTES = 64 * 1024;
constexpr unsigned ONE[3] = {1, 1, 1};  // the grid and block of an elementwise kernel's loop
constexpr unsigned WARP = 32;

inline dim3 block_index, block_dim, grid_dim;
inline std::vector<Thread> threads;
inline std::vector<char> stacks;
inline Thread* current = nullptr;
inline jmp_buf scheduler;
inline std::function<void()> body;
inline char error[512];

[[noreturn]] inline void fail(const char* what) {
    if (!error[0]) {
        std::snprintf(error, sizeof error, "block (%u, %u, %u) thread (%u, %u, %u): %s",
                      block_index.x, block_index.y, block_index.z, current->index.x,
                      current->index.y, current->index.z, what);
    }
    current->state = EXITED;
    _longjmp(scheduler, 1);
}

inline void wait(State state) {
    current->state = state;
    if (!_setjmp(current->resume)) _longjmp(scheduler, 1);
}

inline void entry() {
    body();
    current->state = EXITED;
    _longjmp(scheduler, 1);  // never returns through the ucontext link
}

// Release the waits that can be released: a warp whose 32 lanes are all at a shuffle, or
// the block when every thread is at the barrier (CUDA requires a __syncthreads that every
// thread of the block reaches, and a full-mask shuffle that every lane of the warp reaches).
// False if none can.
inline bool release() {
    bool released = false;
    for (std::size_t w = 0; w < threads.size(); w += WARP) {
        const std::size_t end = std::min(threads.size(), w + WARP);
        bool shuffle = false, all = true;
        for (std::size_t k = w; k < end; ++k) {
            shuffle |= threads[k].state == AT_SHUFFLE;
            all &= threads[k].state == AT_SHUFFLE;
        }
        if (shuffle && all) {
            for (std::size_t k = w; k < end; ++k) threads[k].state = RUNNABLE;
            released = true;
        }
    }
    if (released) return true;
    bool barrier = true;
    for (const Thread& t : threads) barrier &= t.state == AT_BARRIER;
    if (barrier)
        for (Thread& t : threads) t.state = RUNNABLE;
    return barrier;
}

// Run one block to completion; false with `error` set if it cannot finish.
inline bool run_block() {
    const unsigned n = block_dim.x * block_dim.y * block_dim.z;
    for (unsigned k = 0; k < n; ++k) {
        Thread& t = threads[k];
        t.index = {k % block_dim.x, k / block_dim.x % block_dim.y,
                   k / (block_dim.x * block_dim.y)};
        t.state = RUNNABLE;
        t.started = false;
    }
    // odd blocks run their threads last to first: a kernel whose result depends on the
    // order of threads between two barriers (a race) gives different blocks different
    // results, which the comparison with the reference catches
    const bool reversed = (block_index.x + grid_dim.x * (block_index.y + grid_dim.y *
                                                         block_index.z)) % 2;
    for (;;) {
        for (unsigned step = 0; step < n; ++step) {
            Thread& t = threads[reversed ? n - 1 - step : step];
            if (t.state != RUNNABLE) continue;
            current = &t;
            if (!_setjmp(scheduler)) {
                if (t.started) _longjmp(t.resume, 1);
                t.started = true;
                getcontext(&t.start);
                t.start.uc_stack.ss_sp = stacks.data() + (&t - threads.data()) * STACK_BYTES;
                t.start.uc_stack.ss_size = STACK_BYTES;
                t.start.uc_link = nullptr;
                makecontext(&t.start, entry, 0);
                ucontext_t here;
                swapcontext(&here, &t.start);
            }
            if (error[0]) return false;
        }
        bool done = true;
        for (const Thread& t : threads) done &= t.state == EXITED;
        if (done) return true;
        if (!release()) {
            std::snprintf(error, sizeof error,
                          "block (%u, %u, %u): threads wait at different barriers, or at "
                          "one that other threads exited without reaching (a __syncthreads "
                          "or __shfl_xor_sync not reached by every thread of the block or "
                          "warp)",
                          block_index.x, block_index.y, block_index.z);
            return false;
        }
    }
}

// Launch `kernel` (a call of the __global__ function with its arguments bound) on a grid.
inline int launch(const unsigned* grid, const unsigned* block, std::function<void()> kernel) {
    grid_dim = {grid[0], grid[1], grid[2]};
    block_dim = {block[0], block[1], block[2]};
    const unsigned n = block_dim.x * block_dim.y * block_dim.z;
    error[0] = 0;
    if (n == 0 || n > 1024) {
        std::snprintf(error, sizeof error, "a block of %u threads (CUDA allows 1 to 1024)", n);
        return 1;
    }
    threads.assign(n, Thread{});
    if (stacks.size() < n * STACK_BYTES) stacks.resize(n * STACK_BYTES);
    body = std::move(kernel);
    for (unsigned z = 0; z < grid_dim.z; ++z)
        for (unsigned y = 0; y < grid_dim.y; ++y)
            for (unsigned x = 0; x < grid_dim.x; ++x) {
                block_index = {x, y, z};
                if (!run_block()) return 1;
            }
    return 0;
}

[[noreturn]] inline void out_of_bounds(const char* name, long long at, long long size) {
    char what[256];
    std::snprintf(what, sizeof what, "%s[%lld] is outside the %lld elements of %s", name, at,
                  size, name);
    fail(what);
}

}  // namespace cuda_host

// A pointer that knows the array it points into: tests/cuda_host.py declares every pointer
// of a kernel (parameters, and pointers computed from them) as one, so that an index outside
// the array stops the launch with an error where a GPU would read or write stray memory.
template <typename T>
struct bp_ptr {
    T* base;
    long long size;
    const char* name;
    long long offset = 0;

    bp_ptr(T* base_, long long size_, const char* name_, long long offset_ = 0)
        : base(base_), size(size_), name(name_), offset(offset_) {}
    template <std::size_t N>
    bp_ptr(T (&array)[N]) : base(array), size(N), name("a __shared__ array") {}

    T& operator[](long long k) const {
        const long long at = offset + k;
        if (at < 0 || at >= size) cuda_host::out_of_bounds(name, at, size);
        return base[at];
    }
    bp_ptr operator+(long long k) const { return bp_ptr(base, size, name, offset + k); }
    operator bp_ptr<const T>() const { return bp_ptr<const T>(base, size, name, offset); }
};

#define threadIdx (cuda_host::current->index)
#define blockIdx (cuda_host::block_index)
#define blockDim (cuda_host::block_dim)
#define gridDim (cuda_host::grid_dim)

inline void __syncthreads() { cuda_host::wait(cuda_host::AT_BARRIER); }

template <typename V>
V __shfl_xor_sync(unsigned mask, V value, int lane_mask) {
    static_assert(sizeof(V) <= sizeof(std::uint64_t), "a shuffle moves at most 8 bytes");
    using namespace cuda_host;
    if (mask != 0xffffffffu) fail("__shfl_xor_sync with a partial mask (not emulated)");
    const std::size_t me = current - threads.data();
    const std::size_t partner = me - me % WARP + ((me % WARP) ^ (unsigned(lane_mask) % WARP));
    if (partner >= threads.size()) fail("__shfl_xor_sync reads a lane past the block");
    std::memcpy(&current->slot, &value, sizeof value);
    wait(AT_SHUFFLE);
    V result;
    std::memcpy(&result, &threads[partner].slot, sizeof result);
    wait(AT_SHUFFLE);
    return result;
}

// Conversions of the low-precision kernels (kernels/lowp.py), as CUDA defines them.
inline unsigned int __float_as_uint(float x) {
    unsigned int u;
    std::memcpy(&u, &x, sizeof u);
    return u;
}

struct __half {
    unsigned short x;
};

inline unsigned short __half_as_ushort(__half h) { return h.x; }

// float -> IEEE binary16, round to nearest, ties to even (cvt.rn.f16.f32): overflow to
// ±inf, subnormal halves rounded, float32 subnormals to ±0; a NaN gives 0x7FFF (a GPU's
// canonical half NaN: the tests ask only for a NaN).
inline __half __float2half_rn(float f) {
    const unsigned int u = __float_as_uint(f);
    const unsigned short sign = (unsigned short)((u >> 16) & 0x8000u);
    const unsigned int a = u & 0x7FFFFFFFu;
    if (a > 0x7F800000u) return {0x7FFF};
    if (a >= 0x477FF000u) return {(unsigned short)(sign | 0x7C00u)};  // ≥ 65520: ±inf
    if (a >= 0x38800000u) {  // a normal half (≥ 2^-14): drop 13 bits, rebias 127 -> 15
        const unsigned int r = a + 0xFFFu + ((a >> 13) & 1u);
        return {(unsigned short)(sign | ((r - (112u << 23)) >> 13))};
    }
    // a subnormal half: units of 2^-24; float = mant * 2^(e - 150), so mant >> (126 - e)
    const unsigned int e = a >> 23;
    if (e < 102) return {sign};  // below 2^-25 (a tie with 0 at 2^-25 itself: e = 102)
    const unsigned int mant = (a & 0x7FFFFFu) | 0x800000u;
    const unsigned int shift = 126 - e;  // 14 ... 24
    const unsigned int q = mant >> shift, rest = mant & ((1u << shift) - 1);
    const unsigned int tie = 1u << (shift - 1);
    const unsigned int rounded = q + (rest > tie || (rest == tie && (q & 1u)));
    return {(unsigned short)(sign | rounded)};  // 0x400 when it rounds up to 2^-14
}

extern "C" const char* cuda_host_error() { return cuda_host::error; }
