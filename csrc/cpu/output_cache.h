// Output memory of the CPU kernels: blocks of 64 KiB and more are kept after their tensors die and handed to the
// next output of about the same size, so that a repeated forward or training step writes into memory that is
// already mapped. Why: glibc gives large allocations fresh pages (mmap above its threshold, and heap memory it
// trimmed back to the system), and the first touch of each 4 KiB page faults and zeroes it inside the kernel. A GEMM
// into fresh pages ran at 146-190 GFLOP/s on the 2-core development VM against 320 into mapped ones, and the fused
// encoder block at batch 1 took 2.1 ms with its intermediates on glibc against 1.2 ms with them mapped (NOTES.md,
// cpu extension, fifth round).
// Sizes: below 4 MiB rounded up to 64 KiB, above to 2 MiB (2 MiB aligned, advised for transparent huge pages); a
// request takes a free block up to 1/4 larger than it. Smaller outputs go to torch's CPU allocator.
// Environment: CCT_KERNELS_CPU_CACHE_MB caps the free bytes kept (default 2048; 0 turns the cache off).
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <vector>

namespace cct {

// at::empty(size, options) (contiguous, or channels-last) whose storage comes from the cache when it is 64 KiB or
// more.
at::Tensor cached_empty(at::IntArrayRef size, const at::TensorOptions& options,
                        at::MemoryFormat format = at::MemoryFormat::Contiguous);

// Cached blocks only: {bytes held by live tensors, free bytes kept, requests served from the free list, requests
// that allocated}.
std::vector<int64_t> output_cache_stats();
// Returns every free block to the system (live tensors keep theirs until they die).
void output_cache_release();

}  // namespace cct
