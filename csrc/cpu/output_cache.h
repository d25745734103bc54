// Output memory of the CPU kernels: large blocks are kept after their tensors die and handed to the next output
// of the same rounded size, so that a repeated forward or training step writes into memory that is already mapped.
// Why: glibc serves every allocation above its mmap threshold (32 MiB at most) with fresh pages, and a GEMM into
// fresh pages ran at 146-190 GFLOP/s on the 2-core development VM against 320 into mapped ones (NOTES.md, cpu
// extension, fifth round): the first touch of each 4 KiB page faults and zeroes it, inside the kernel.
// Blocks below kMinCachedBytes go to torch's CPU allocator (glibc's heap reuses those without faults).
// Environment: CCT_KERNELS_CPU_CACHE_MB caps the free bytes kept (default 2048; 0 turns the cache off).
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <vector>

namespace cct {

// at::empty(size, options) (contiguous, or channels-last) whose storage comes from the cache when it is large.
at::Tensor cached_empty(at::IntArrayRef size, const at::TensorOptions& options,
                        at::MemoryFormat format = at::MemoryFormat::Contiguous);

// Large blocks (>= 1 MiB) only: {bytes held by live tensors, free bytes kept, requests served from the free list,
// requests that allocated}.
std::vector<int64_t> output_cache_stats();
// Returns every free block to the system (live tensors keep theirs until they die).
void output_cache_release();

}  // namespace cct
