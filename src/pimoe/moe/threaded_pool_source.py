"""C++ source of the threaded kernel's buffer pool for weight gradients (part of
:data:`pimoe.moe.threaded_source.SOURCE`): ``pooled_empty``, ``release_pool()``,
``pool_kept_bytes()``."""

POOL_SOURCE = r"""
// Weight gradients come back to autograd as fresh tensors every backward (they become .grad,
// and an optimizer's zero_grad() drops them). Large ones are mmap'ed by malloc and unmapped
// when freed, so each backward faulted every page of them in again (at 64 experts of width 256
// on d_model 512, 96 MB: 23k page faults, ~50 ms of kernel time per step). Weight gradients of
// 1 MiB or more take their memory from this pool instead: a freed buffer's block is kept, pages
// mapped, for the next buffer of the same size, up to kPoolMaxBytes kept; the tensors hold no
// extra reference, so autograd still takes them as .grad without copying. Only weight
// gradients: their sizes are the same every step, while outputs change size with the number
// of tokens (a server's varying batches would fill the pool with sizes never asked for again).
struct BlockPool {
  std::mutex mu;
  std::multimap<size_t, void*> free_blocks;  // bytes -> block
  size_t kept = 0;
};
static constexpr size_t kPoolMinBytes = size_t(1) << 20;
static constexpr size_t kPoolMaxBytes = size_t(1) << 30;

static BlockPool& block_pool() {
  static auto* pool = new BlockPool();  // never destroyed: tensors may be freed at exit
  return *pool;
}

static void keep_block(void* data, size_t bytes) {
  auto& pool = block_pool();
  {
    std::lock_guard<std::mutex> lock(pool.mu);
    if (pool.kept + bytes <= kPoolMaxBytes) {
      pool.free_blocks.emplace(bytes, data);
      pool.kept += bytes;
      return;
    }
  }
  std::free(data);
}

// at::empty, from the pool for 1 MiB or more (weight gradients only)
static at::Tensor pooled_empty(at::IntArrayRef sizes, const at::TensorOptions& options) {
  const size_t bytes = (size_t)c10::multiply_integers(sizes) * options.dtype().itemsize();
  if (bytes < kPoolMinBytes) return at::empty(sizes, options);
  void* data = nullptr;
  {
    auto& pool = block_pool();
    std::lock_guard<std::mutex> lock(pool.mu);
    auto it = pool.free_blocks.find(bytes);
    if (it != pool.free_blocks.end()) {
      data = it->second;
      pool.free_blocks.erase(it);
      pool.kept -= bytes;
    }
  }
  if (data == nullptr) {
    data = std::aligned_alloc(64, (bytes + 63) / 64 * 64);
    TORCH_CHECK(data != nullptr, "out of memory allocating ", bytes, " bytes");
  }
  return at::from_blob(data, sizes, [bytes](void* p) { keep_block(p, bytes); }, options);
}

// Free the pool's kept blocks; returns the bytes freed.
int64_t release_pool() {
  auto& pool = block_pool();
  std::multimap<size_t, void*> blocks;
  {
    std::lock_guard<std::mutex> lock(pool.mu);
    blocks.swap(pool.free_blocks);
    pool.kept = 0;
  }
  int64_t freed = 0;
  for (auto& [bytes, data] : blocks) {
    std::free(data);
    freed += (int64_t)bytes;
  }
  return freed;
}

// Bytes the pool keeps for reuse now.
int64_t pool_kept_bytes() {
  auto& pool = block_pool();
  std::lock_guard<std::mutex> lock(pool.mu);
  return (int64_t)pool.kept;
}

"""
