// A tiny CPU emulator of the CUDA features the kernels use, to run kernels/*.cu without a GPU:
// every block runs its threads as std::threads (reused across the blocks of a launch), __syncthreads is a
// std::barrier, warp shuffles go through a per-warp barrier, WMMA fragments are 16x16 float
// arrays that every lane of a warp computes in full. Dynamic shared memory is filled with 0xFF
// bytes (NaN), so reading a value no thread wrote shows up as NaN in the results; with
// -fsanitize=address every out-of-bounds global or shared access is reported.
//
// Asynchronous copies (cp.async through the __pipeline_* primitives of cuda_pipeline.h) land in
// shared memory only when the issuing thread waits for their group (__pipeline_wait_prior), so a
// tile read before its wait (or, under ThreadSanitizer, before the __syncthreads after it) shows
// up as stale data / a race; copies never waited for by the end of a block abort the run.
//
// This checks indexing, masking, synchronization and the math of the kernels, not their speed,
// nor anything the real hardware does differently (memory model, real mma rounding).
#pragma once

#include <barrier>
#include <cassert>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <memory>
#include <thread>
#include <vector>

#define SAGAN_FAST_EMULATED 1
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __align__(n) alignas(n)
#define __shared__ static
#define SAGAN_DYNAMIC_SMEM(name) unsigned char* name = ::emu::dynamic_smem()

using std::max;
using std::min;

struct dim3 {
  unsigned x, y, z;
  dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
inline thread_local dim3 threadIdx, blockIdx, blockDim, gridDim;

struct uint4 {
  unsigned x, y, z, w;
};
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return uint4{x, y, z, w}; }

typedef void* cudaStream_t;
enum cudaError_t {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorInvalidConfiguration = 9,
  cudaErrorInvalidDevice = 101,
};
enum cudaDeviceAttr { cudaDevAttrMaxSharedMemoryPerBlockOptin = 97, cudaDevAttrComputeCapabilityMajor = 75 };
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };
enum cudaMemcpyKind { cudaMemcpyHostToDevice = 1, cudaMemcpyDeviceToHost = 2, cudaMemcpyDeviceToDevice = 3 };

inline const char* cudaGetErrorString(cudaError_t e) {
  switch (e) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidValue: return "invalid argument";
    case cudaErrorInvalidConfiguration: return "invalid configuration argument";
    case cudaErrorInvalidDevice: return "invalid device ordinal";
  }
  return "unknown error";
}
inline cudaError_t cudaGetLastError() { return cudaSuccess; }
inline cudaError_t cudaGetDevice(int* d) { *d = 0; return cudaSuccess; }
inline cudaError_t cudaGetDeviceCount(int* n) { *n = 1; return cudaSuccess; }
inline cudaError_t cudaDeviceSynchronize() { return cudaSuccess; }
inline cudaError_t cudaDeviceGetAttribute(int* v, cudaDeviceAttr a, int) {
  *v = a == cudaDevAttrComputeCapabilityMajor ? 9 : 227 * 1024;  // an H100
  return cudaSuccess;
}
template <typename F>
cudaError_t cudaFuncSetAttribute(F, cudaFuncAttribute, int bytes) {
  return bytes <= 227 * 1024 ? cudaSuccess : cudaErrorInvalidValue;
}
inline cudaError_t cudaMalloc(void** p, size_t n) { *p = std::malloc(n); return *p ? cudaSuccess : cudaErrorInvalidValue; }
inline cudaError_t cudaFree(void* p) { std::free(p); return cudaSuccess; }
inline cudaError_t cudaMemcpy(void* d, const void* s, size_t n, cudaMemcpyKind) { std::memcpy(d, s, n); return cudaSuccess; }

// ---------------------------------------------------------------- 16-bit types
struct __half { uint16_t bits; };
struct __nv_bfloat16 { uint16_t bits; };
inline float __half2float(__half h) { _Float16 f; std::memcpy(&f, &h.bits, 2); return float(f); }
inline __half __float2half_rn(float x) { _Float16 f = static_cast<_Float16>(x); __half h; std::memcpy(&h.bits, &f, 2); return h; }
inline __half __double2half(double x) { _Float16 f = static_cast<_Float16>(x); __half h; std::memcpy(&h.bits, &f, 2); return h; }
inline float __bfloat162float(__nv_bfloat16 b) { uint32_t u = uint32_t(b.bits) << 16; float f; std::memcpy(&f, &u, 4); return f; }
inline __nv_bfloat16 __float2bfloat16_rn(float x) {
  uint32_t u;
  std::memcpy(&u, &x, 4);
  if (std::isnan(x)) return __nv_bfloat16{uint16_t(0x7fc0)};
  u += 0x7fffu + ((u >> 16) & 1u);  // round to nearest even
  return __nv_bfloat16{uint16_t(u >> 16)};
}
inline __nv_bfloat16 __double2bfloat16(double x) { return __float2bfloat16_rn(float(x)); }  // (double rounding: fine for tests)
inline float emu_to_float(__half h) { return __half2float(h); }
inline float emu_to_float(__nv_bfloat16 b) { return __bfloat162float(b); }
inline float emu_to_float(float f) { return f; }

inline void __trap() { std::abort(); }

// ---------------------------------------------------------------- block execution
namespace emu {

struct Block {
  explicit Block(int threads, size_t smem_bytes)
      : bar(threads), smem(smem_bytes ? smem_bytes : 1, 0xFF) {
    for (int w = 0; w < (threads + 31) / 32; ++w) warps.emplace_back(new Warp(std::min(32, threads - 32 * w)));
  }
  struct Warp {
    explicit Warp(int n) : bar(n) {}
    std::barrier<> bar;
    unsigned char slots[32][8];
  };
  std::barrier<> bar;
  std::vector<std::unique_ptr<Warp>> warps;
  std::vector<unsigned char> smem;
};
inline thread_local Block* current = nullptr;

// cp.async state of the current CUDA thread: copies of the open group, then committed groups.
struct AsyncCopy {
  void* dst;
  const void* src;
  size_t bytes, zfill;
};
inline thread_local std::vector<AsyncCopy> open_copies;
inline thread_local std::deque<std::vector<AsyncCopy>> committed_copies;

inline void check_no_pending_copies() {
  if (!open_copies.empty() || !committed_copies.empty()) {
    std::fprintf(stderr, "emulated cp.async: thread %u of block (%u, %u, %u) ended with copies it never waited for\n",
                 threadIdx.x, blockIdx.x, blockIdx.y, blockIdx.z);
    std::abort();
  }
}

inline unsigned char* dynamic_smem() {
  assert(reinterpret_cast<uintptr_t>(current->smem.data()) % 16 == 0);
  return current->smem.data();
}

template <typename F, typename... Args>
void launch(F kernel, dim3 grid, dim3 block, size_t smem, cudaStream_t, Args... args) {
  const int threads = int(block.x * block.y * block.z);
  const unsigned blocks = grid.x * grid.y * grid.z;
  // One std::thread per CUDA thread of a block; they walk through the blocks of the grid together,
  // one block at a time (static __shared__ arrays are plain statics here, one copy for all blocks).
  std::barrier<> next_block(threads);
  std::vector<std::unique_ptr<Block>> states;
  for (unsigned i = 0; i < blocks; ++i) states.emplace_back(new Block(threads, smem));
  std::vector<std::thread> pool;
  for (int t = 0; t < threads; ++t) {
    pool.emplace_back([&, t] {
      threadIdx = dim3(unsigned(t) % block.x, (unsigned(t) / block.x) % block.y, unsigned(t) / (block.x * block.y));
      blockDim = block;
      gridDim = grid;
      for (unsigned i = 0; i < blocks; ++i) {
        Block& state = *states[i];
        current = &state;
        blockIdx = dim3(i % grid.x, (i / grid.x) % grid.y, i / (grid.x * grid.y));
        kernel(args...);
        check_no_pending_copies();
        // An exited thread no longer takes part in barriers (as on the GPU).
        state.warps[t / 32]->bar.arrive_and_drop();
        state.bar.arrive_and_drop();
        next_block.arrive_and_wait();
      }
    });
  }
  for (auto& th : pool) th.join();
}

}  // namespace emu

inline void __syncthreads() { emu::current->bar.arrive_and_wait(); }

template <typename U>
U __shfl_xor_sync(unsigned, U x, int offset) {
  static_assert(sizeof(U) <= 8, "shuffle of at most 8 bytes");
  const int lane = int(threadIdx.x) & 31;
  auto& w = *emu::current->warps[threadIdx.x / 32];
  std::memcpy(w.slots[lane], &x, sizeof(U));
  w.bar.arrive_and_wait();
  U y;
  std::memcpy(&y, w.slots[lane ^ offset], sizeof(U));
  w.bar.arrive_and_wait();
  return y;
}

// ---------------------------------------------------------------- cp.async (cuda_pipeline.h)
inline void __pipeline_memcpy_async(void* dst, const void* src, size_t bytes, size_t zfill = 0) {
  // The hardware's rules: 4, 8 or 16 bytes, both addresses aligned to the size.
  if ((bytes != 4 && bytes != 8 && bytes != 16) || zfill > bytes || reinterpret_cast<uintptr_t>(dst) % bytes ||
      reinterpret_cast<uintptr_t>(src) % bytes) {
    std::fprintf(stderr, "emulated cp.async: bad copy of %zu bytes (zfill %zu) from %p to %p\n", bytes, zfill, src,
                 dst);
    std::abort();
  }
  emu::open_copies.push_back({dst, src, bytes, zfill});
}
inline void __pipeline_commit() {
  emu::committed_copies.push_back(std::move(emu::open_copies));
  emu::open_copies.clear();
}
// Completes every committed group but the `allowed` newest ones (copies land now).
inline void __pipeline_wait_prior(size_t allowed) {
  while (emu::committed_copies.size() > allowed) {
    for (const emu::AsyncCopy& c : emu::committed_copies.front()) {
      std::memcpy(c.dst, c.src, c.bytes - c.zfill);
      std::memset(static_cast<unsigned char*>(c.dst) + (c.bytes - c.zfill), 0, c.zfill);
    }
    emu::committed_copies.pop_front();
  }
}

// ---------------------------------------------------------------- WMMA
namespace nvcuda {
namespace wmma {
struct row_major {};
struct col_major {};
struct matrix_a {};
struct matrix_b {};
struct accumulator {};
enum layout_t { mem_row_major, mem_col_major };

template <typename Use, int M, int N, int K, typename T, typename Layout = void>
struct fragment {
  float v[16][16];
};

// The *_sync operations are warp-collective: no lane proceeds before all lanes arrived.
inline void warp_sync() { emu::current->warps[threadIdx.x / 32]->bar.arrive_and_wait(); }

inline void check_tile_pointer(const void* p, unsigned ldm, size_t elem) {
  // Real WMMA: 256-bit aligned pointers, ldm a multiple of 16 bytes.
  if (reinterpret_cast<uintptr_t>(p) % 32 != 0 || (ldm * elem) % 16 != 0) {
    std::fprintf(stderr, "emulated wmma: misaligned tile pointer %p or ldm %u\n", p, ldm);
    std::abort();
  }
}

template <typename T, typename L>
void load_matrix_sync(fragment<matrix_a, 16, 16, 16, T, L>& f, const T* p, unsigned ldm) {
  check_tile_pointer(p, ldm, sizeof(T));
  for (int i = 0; i < 16; ++i)
    for (int k = 0; k < 16; ++k)
      f.v[i][k] = emu_to_float(std::is_same<L, row_major>::value ? p[i * ldm + k] : p[k * ldm + i]);
}
template <typename T, typename L>
void load_matrix_sync(fragment<matrix_b, 16, 16, 16, T, L>& f, const T* p, unsigned ldm) {
  check_tile_pointer(p, ldm, sizeof(T));
  for (int k = 0; k < 16; ++k)
    for (int j = 0; j < 16; ++j)
      f.v[k][j] = emu_to_float(std::is_same<L, row_major>::value ? p[k * ldm + j] : p[j * ldm + k]);
}
inline void load_matrix_sync(fragment<accumulator, 16, 16, 16, float>& f, const float* p, unsigned ldm, layout_t l) {
  check_tile_pointer(p, ldm, sizeof(float));
  for (int i = 0; i < 16; ++i)
    for (int j = 0; j < 16; ++j) f.v[i][j] = l == mem_row_major ? p[i * ldm + j] : p[j * ldm + i];
}
inline void fill_fragment(fragment<accumulator, 16, 16, 16, float>& f, float x) {
  for (auto& row : f.v)
    for (float& e : row) e = x;
}
template <typename A, typename B>
void mma_sync(fragment<accumulator, 16, 16, 16, float>& d, const A& a, const B& b,
              const fragment<accumulator, 16, 16, 16, float>& c) {
  float out[16][16];
  for (int i = 0; i < 16; ++i)
    for (int j = 0; j < 16; ++j) {
      float s = c.v[i][j];
      for (int k = 0; k < 16; ++k) s += a.v[i][k] * b.v[k][j];
      out[i][j] = s;
    }
  std::memcpy(d.v, out, sizeof out);
}
inline void store_matrix_sync(float* p, const fragment<accumulator, 16, 16, 16, float>& f, unsigned ldm, layout_t l) {
  check_tile_pointer(p, ldm, sizeof(float));
  // Every lane holds the whole tile here; the warp's lane 0 writes it (no benign races), after
  // every lane is done with its loads and before any lane goes on.
  warp_sync();
  if ((threadIdx.x & 31) == 0)
    for (int i = 0; i < 16; ++i)
      for (int j = 0; j < 16; ++j) (l == mem_row_major ? p[i * ldm + j] : p[j * ldm + i]) = f.v[i][j];
  warp_sync();
}
}  // namespace wmma
}  // namespace nvcuda
