// The CPU kernels' output cache (see output_cache.h): a c10::Allocator whose large blocks go back to a free list
// when their storage dies, and come out of it for the next request of the same rounded size (or up to 1/4 more).
#include "output_cache.h"

#include <ATen/EmptyTensor.h>
#include <c10/core/CPUAllocator.h>
#include <pthread.h>
#include <sys/mman.h>

#include <cstdlib>
#include <map>
#include <mutex>
#include <new>

namespace cct {
namespace {

constexpr size_t kMinCachedBytes = size_t(64) << 10;
constexpr size_t kSmallStep = size_t(64) << 10;  // blocks below kLarge: 64 KiB multiples, page aligned
constexpr size_t kLarge = size_t(4) << 20;
constexpr size_t kHugePage = size_t(2) << 20;  // larger blocks: 2 MiB aligned and sized, so THP can back them

size_t rounded(size_t n) {
  const size_t step = n < kLarge ? kSmallStep : kHugePage;
  return (n + step - 1) / step * step;
}

void* map_block(size_t bytes) {
  const bool large = bytes >= kLarge;
  void* ptr = std::aligned_alloc(large ? kHugePage : 4096, bytes);
  if (ptr != nullptr && large) madvise(ptr, bytes, MADV_HUGEPAGE);  // a hint: ignored where THP is off
  return ptr;
}

size_t cap_from_env() {
  const char* v = std::getenv("CCT_KERNELS_CPU_CACHE_MB");
  if (v == nullptr || *v == '\0') return size_t(2048) << 20;
  char* end = nullptr;
  const long long mb = std::strtoll(v, &end, 10);
  TORCH_CHECK(end != v && *end == '\0' && mb >= 0, "CCT_KERNELS_CPU_CACHE_MB must be a whole number of MiB >= 0, got '",
              v, "'");
  return size_t(mb) << 20;
}

struct Block {
  void* ptr;
  size_t bytes;      // the block's size
  size_t requested;  // what its current tensor asked for (reported to torch.profiler)
};

class OutputCache final : public c10::Allocator {
 public:
  OutputCache() : cap_(cap_from_env()) {}

  c10::DataPtr allocate(size_t n) override {
    if (n < kMinCachedBytes || cap_ == 0) return c10::GetCPUAllocator()->allocate(n);
    const size_t bytes = rounded(n);
    Block* block = nullptr;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      auto it = free_.lower_bound(bytes);
      if (it != free_.end() && it->first <= bytes + bytes / 4) {
        block = it->second;
        free_.erase(it);
        free_bytes_ -= block->bytes;
        live_bytes_ += block->bytes;
        ++hits_;
      } else {
        ++misses_;
      }
    }
    if (block == nullptr) {
      void* ptr = map_block(bytes);
      if (ptr == nullptr) {
        release();  // free blocks of other sizes may be what stands in the way
        ptr = map_block(bytes);
      }
      TORCH_CHECK(ptr != nullptr, "cct_kernels: out of memory allocating ", bytes, " bytes for a CPU kernel output");
      block = new Block{ptr, bytes, 0};
      std::lock_guard<std::mutex> lock(mutex_);
      live_bytes_ += bytes;
    }
    block->requested = n;
    report(block->ptr, (int64_t)n);
    return {block->ptr, block, &OutputCache::give_back, c10::Device(c10::DeviceType::CPU)};
  }

  void copy_data(void* dest, const void* src, size_t count) const override { default_copy_data(dest, src, count); }

  std::vector<int64_t> stats() {
    std::lock_guard<std::mutex> lock(mutex_);
    return {(int64_t)live_bytes_, (int64_t)free_bytes_, hits_, misses_};
  }

  void release() {
    std::multimap<size_t, Block*> blocks;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      blocks.swap(free_);
      free_bytes_ = 0;
    }
    for (auto& kv : blocks) destroy(kv.second);
  }

  static OutputCache& instance() {
    static OutputCache* cache = [] {
      auto* c = new OutputCache();  // never destroyed: tensors may die after static destructors
      // fork() (DataLoader workers, multiprocessing) while another thread holds the lock would leave the child a
      // locked mutex and a free list mid-update: hold it across the fork, as glibc's malloc does with its arenas.
      pthread_atfork([] { instance().mutex_.lock(); }, [] { instance().mutex_.unlock(); },
                     [] { instance().mutex_.unlock(); });
      return c;
    }();
    return *cache;
  }

 private:
  // torch.profiler's memory accounting (profile_memory=True) sees these tensors as it sees any CPU tensor's.
  void report(void* ptr, int64_t delta) {
    if (!c10::memoryProfilingEnabled()) return;
    size_t live, free;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      live = live_bytes_;
      free = free_bytes_;
    }
    c10::reportMemoryUsageToProfiler(ptr, delta, live, live + free, c10::Device(c10::DeviceType::CPU));
  }

  static void destroy(Block* block) {
    std::free(block->ptr);
    delete block;
  }

  static void give_back(void* ctx) {
    auto* block = static_cast<Block*>(ctx);
    OutputCache& cache = instance();
    cache.report(block->ptr, -(int64_t)block->requested);
    {
      std::lock_guard<std::mutex> lock(cache.mutex_);
      cache.live_bytes_ -= block->bytes;
      if (cache.free_bytes_ + block->bytes <= cache.cap_) {
        cache.free_.emplace(block->bytes, block);
        cache.free_bytes_ += block->bytes;
        return;
      }
    }
    destroy(block);
  }

  const size_t cap_;
  std::mutex mutex_;
  std::multimap<size_t, Block*> free_;
  size_t free_bytes_ = 0, live_bytes_ = 0;
  int64_t hits_ = 0, misses_ = 0;
};

}  // namespace

at::Tensor cached_empty(at::IntArrayRef size, const at::TensorOptions& options, at::MemoryFormat format) {
  TORCH_CHECK(options.device().is_cpu(), "cached_empty: CPU tensors only");
  return at::detail::empty_generic(size, &OutputCache::instance(), c10::DispatchKeySet(c10::DispatchKey::CPU),
                                   c10::typeMetaToScalarType(options.dtype()), format);
}

std::vector<int64_t> output_cache_stats() { return OutputCache::instance().stats(); }

void output_cache_release() { OutputCache::instance().release(); }

}  // namespace cct
