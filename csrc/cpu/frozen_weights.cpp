// Frozen weights (see frozen_weights.h): a registry keyed by the weight's storage and offset.
#include "frozen_weights.h"

#include <algorithm>
#include <map>
#include <mutex>
#include <utility>
#include <vector>

// MKL's packed GEMM (Fortran interface), exported by torch's x86-64 wheels beside sgemm_. Weak, like sgemm_ in
// common.h: a torch without them still loads the extension, and linear weights are then not frozen.
extern "C" size_t sgemm_pack_get_size_(const char* identifier, const int* m, const int* n, const int* k)
    __attribute__((weak));
extern "C" void sgemm_pack_(const char* identifier, const char* trans, const int* m, const int* n, const int* k,
                            const float* alpha, const float* src, const int* ld, float* dest) __attribute__((weak));
extern "C" void sgemm_compute_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
                               const float* a, const int* lda, const float* b, const int* ldb, const float* beta,
                               float* c, const int* ldc) __attribute__((weak));

namespace cct {
namespace {

using Key = std::pair<const c10::StorageImpl*, int64_t>;  // the weight's storage and offset in it

// MKL's packed format depends on the row count it is packed for: a copy packed for 1 or 512 rows and used at 196 is
// up to 1.5x slower than sgemm itself (NOTES.md, cpu extension, ninth round). So a linear weight keeps one packed
// copy per row count, the latest kMaxRowCounts (inference runs a few batch sizes, each one row count).
constexpr size_t kMaxRowCounts = 4;
// Entries of freed weights are dropped at freeze_weight, frozen_weight_stats and every kLookupsPerSweep lookups.
constexpr uint32_t kLookupsPerSweep = 256;

struct Entry {
  // Keeps the StorageImpl object (not its memory) allocated, so that no later storage gets its address while the
  // entry exists; expired once the weight's storage is freed.
  c10::weak_intrusive_ptr<c10::StorageImpl> storage;
  std::vector<int64_t> sizes;
  int64_t version;
  at::Tensor channels_last;                            // a convolution weight's copy
  std::vector<std::pair<int64_t, at::Tensor>> packed;  // a linear weight's (rows, packed copy), latest first
};

std::mutex registry_mutex;
std::map<Key, Entry> registry;

Key key_of(const at::Tensor& weight) {
  return {weight.storage().unsafeGetStorageImpl(), weight.storage_offset()};
}

bool is_linear_weight(const at::Tensor& w) {
  return w.dim() == 2 && w.scalar_type() == at::kFloat && w.is_contiguous();
}

// weight (N, K) packed as sgemm_compute_'s A operand (transposed) for products of `rows` rows, into `reuse` when it
// is large enough and used nowhere else (an evicted copy: no fresh pages to fault in), else into new memory.
at::Tensor pack(const at::Tensor& weight, int64_t rows, at::Tensor reuse) {
  const int N = (int)weight.size(0), K = (int)weight.size(1), M = (int)rows;
  const float one = 1.f;
  const auto bytes = (int64_t)sgemm_pack_get_size_("A", &N, &M, &K);
  at::Tensor packed = reuse.defined() && reuse.use_count() == 1 && reuse.numel() >= bytes
                          ? std::move(reuse)
                          : at::empty({bytes}, weight.options().dtype(at::kByte));
  sgemm_pack_("A", "T", &N, &M, &K, &one, weight.data_ptr<float>(), &K,
              reinterpret_cast<float*>(packed.data_ptr<uint8_t>()));
  return packed;
}

void drop_dead_entries() {
  for (auto it = registry.begin(); it != registry.end();) it = it->second.storage.expired() ? registry.erase(it) : ++it;
}

// weight's entry, its copies dropped if the weight changed in place since they were made; nullptr when weight is not
// frozen. Called with registry_mutex held.
Entry* find_entry(const at::Tensor& weight, int64_t dim) {
  if (!weight.defined() || weight.dim() != dim || !weight.has_storage() || weight.is_inference() || registry.empty())
    return nullptr;
  static uint32_t lookups = 0;
  if (++lookups % kLookupsPerSweep == 0) drop_dead_entries();  // a freed model's copies go soon, not at the next freeze
  const auto it = registry.find(key_of(weight));
  // The key's StorageImpl is weight's, alive: the entry is this weight's unless it was frozen with other sizes
  // (another view of the same storage) or its layout changed.
  if (it == registry.end() || it->second.sizes != weight.sizes().vec() || !weight.is_contiguous()) return nullptr;
  Entry& entry = it->second;
  if (entry.version != weight._version()) {
    entry.version = weight._version();
    entry.packed.clear();
    if (dim == 4) entry.channels_last = weight.clone(at::MemoryFormat::ChannelsLast);
  }
  return &entry;
}

}  // namespace

bool cpu_has_packed_gemm() {
  return sgemm_pack_get_size_ != nullptr && sgemm_pack_ != nullptr && sgemm_compute_ != nullptr;
}

bool freeze_weight(const at::Tensor& weight) {
  TORCH_CHECK(weight.dim() == 2 || weight.dim() == 4, "freeze_weight: a linear (2-D) or convolution (4-D) weight "
              "expected, got ", weight.dim(), " dims");
  TORCH_CHECK(!weight.is_inference(), "freeze_weight: an inference tensor (made under torch.inference_mode) has no "
              "version counter to tell its updates; build the model outside inference_mode");
  const bool kept = weight.device().is_cpu() && weight.is_contiguous() &&
                    (weight.dim() == 4 || (is_linear_weight(weight) && cpu_has_packed_gemm()));
  std::lock_guard<std::mutex> lock(registry_mutex);
  drop_dead_entries();
  if (!kept) {
    registry.erase(key_of(weight));
    return false;
  }
  // Linear weights are packed at their first product (the packed copy depends on its row count).
  registry.insert_or_assign(key_of(weight), Entry{weight.storage().getWeakStorageImpl(), weight.sizes().vec(),
                                                  weight._version(),
                                                  weight.dim() == 4 ? weight.clone(at::MemoryFormat::ChannelsLast)
                                                                    : at::Tensor(),
                                                  {}});
  return true;
}

void unfreeze_weight(const at::Tensor& weight) {
  if (!weight.has_storage()) return;
  std::lock_guard<std::mutex> lock(registry_mutex);
  registry.erase(key_of(weight));
}

std::vector<int64_t> frozen_weight_stats() {
  std::lock_guard<std::mutex> lock(registry_mutex);
  drop_dead_entries();
  int64_t packed = 0;
  for (const auto& [key, entry] : registry) packed += (int64_t)entry.packed.size();
  return {(int64_t)registry.size(), packed};
}

at::Tensor frozen_packed_gemm_weight(const at::Tensor& weight, int64_t rows) {
  std::lock_guard<std::mutex> lock(registry_mutex);
  Entry* entry = find_entry(weight, 2);
  if (entry == nullptr || !is_linear_weight(weight)) return at::Tensor();
  auto& packed = entry->packed;
  auto it = std::find_if(packed.begin(), packed.end(), [&](const auto& p) { return p.first == rows; });
  if (it == packed.end()) {
    at::Tensor evicted;
    if (packed.size() == kMaxRowCounts) {
      evicted = std::move(packed.back().second);
      packed.pop_back();
    }
    packed.insert(packed.begin(), {rows, pack(weight, rows, std::move(evicted))});
  } else {
    std::rotate(packed.begin(), it, it + 1);  // latest first
  }
  return packed.front().second;
}

at::Tensor frozen_channels_last_weight(const at::Tensor& weight) {
  std::lock_guard<std::mutex> lock(registry_mutex);
  Entry* entry = find_entry(weight, 4);
  return entry == nullptr ? at::Tensor() : entry->channels_last;
}

void packed_gemm(const at::Tensor& packed, const float* x, float* c, int M, int N, int K) {
  const float zero = 0.f;
  sgemm_compute_("P", "N", &N, &M, &K, reinterpret_cast<const float*>(packed.data_ptr<uint8_t>()), &K, x, &K, &zero,
                 c, &N);
}

}  // namespace cct
