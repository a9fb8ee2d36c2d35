"""C++ source of the threaded kernel's buffer pool (part of
:data:`pimoe.moe.threaded_source.SOURCE`): ``pooled_empty`` (weight gradients), ``rows_empty``
(row buffers of training and inference), ``set_row_pool(on)``, ``release_pool()``,
``pool_kept_bytes()``."""

POOL_SOURCE = r"""
// Weight gradients come back to autograd as fresh tensors every backward (they become .grad,
// and an optimizer's zero_grad() drops them). Large ones are mmap'ed by malloc and unmapped
// when freed, so each backward faulted every page of them in again (at 64 experts of width 256
// on d_model 512, 96 MB: 23k page faults, ~50 ms of kernel time per step). Weight gradients of
// 1 MiB or more take their memory from this pool instead: a freed buffer's block is kept, pages
// mapped, for the next buffer of the same size class, up to kPoolMaxBytes kept (the least
// recently kept blocks freed first); the tensors hold no extra reference, so autograd still
// takes them as .grad without copying. Training's row buffers ([rows, features]: gathered
// inputs, hidden activations, expert outputs and their gradients; ~2k faults a step in the
// same layer, with glibc trimming its heap between steps) come from it too, unless
// set_row_pool(false), and so do inference's (the gathered rows and the experts' outputs: ~4k
// faults and ~5 ms a forward at 64 experts and 512 tokens), but of blocks last freed by
// inference at most kInferenceMaxBytes are kept: memory kept idle between a server's requests
// is memory the server lacks.
struct Block {
  size_t bytes;
  void* data;
  bool inference;  // last freed by an inference buffer
};
struct BlockPool {
  std::mutex mu;
  std::list<Block> free_blocks;  // least recently kept first
  size_t kept = 0, kept_inference = 0;
};
static constexpr size_t kPoolMinBytes = size_t(1) << 20;
static constexpr size_t kPoolMaxBytes = size_t(1) << 30;
static constexpr size_t kInferenceMaxBytes = size_t(64) << 20;
static std::atomic<bool> pool_rows{true};

static BlockPool& block_pool() {
  static auto* pool = new BlockPool();  // never destroyed: tensors may be freed at exit
  return *pool;
}

// A block's size for a request of bytes (>= kPoolMinBytes): rounded up to one of 8 classes per
// power of two (at most 12.5% more), so that sizes which move a little from step to step (the
// rows of a batch) find each other's blocks.
static size_t block_bytes(size_t bytes) {
  size_t power = kPoolMinBytes;
  while (power <= bytes / 2) power *= 2;
  const size_t step = power / 8;
  return (bytes + step - 1) / step * step;
}

// Drop the least recently kept block (of inference's blocks only, if inference_only) into evicted;
// false if there is none. Call with the pool's lock held.
static bool evict_one(BlockPool& pool, bool inference_only, std::vector<void*>& evicted) {
  for (auto it = pool.free_blocks.begin(); it != pool.free_blocks.end(); ++it) {
    if (inference_only && !it->inference) continue;
    evicted.push_back(it->data);
    pool.kept -= it->bytes;
    if (it->inference) pool.kept_inference -= it->bytes;
    pool.free_blocks.erase(it);
    return true;
  }
  return false;
}

// Keep a freed block for reuse; the least recently kept blocks are freed to stay within
// kPoolMaxBytes (and inference's within kInferenceMaxBytes).
static void keep_block(void* data, size_t bytes, bool inference) {
  std::vector<void*> evicted;
  {
    auto& pool = block_pool();
    std::lock_guard<std::mutex> lock(pool.mu);
    if (bytes > (inference ? kInferenceMaxBytes : kPoolMaxBytes)) {
      evicted.push_back(data);
    } else {
      while (inference && pool.kept_inference + bytes > kInferenceMaxBytes &&
             evict_one(pool, true, evicted)) {
      }
      while (pool.kept + bytes > kPoolMaxBytes && evict_one(pool, false, evicted)) {
      }
      pool.free_blocks.push_back(Block{bytes, data, inference});
      pool.kept += bytes;
      if (inference) pool.kept_inference += bytes;
    }
  }
  for (void* block : evicted) std::free(block);
}

// at::empty, from the pool for 1 MiB or more: weight gradients, and the [rows, features]
// buffers of training and (inference true) of inference (pool_rows)
static at::Tensor pooled_empty(at::IntArrayRef sizes, const at::TensorOptions& options,
                               bool inference = false) {
  const size_t need = (size_t)c10::multiply_integers(sizes) * options.dtype().itemsize();
  if (need < kPoolMinBytes) return at::empty(sizes, options);
  const size_t bytes = block_bytes(need);
  void* data = nullptr;
  {
    auto& pool = block_pool();
    std::lock_guard<std::mutex> lock(pool.mu);
    for (auto it = pool.free_blocks.rbegin(); it != pool.free_blocks.rend(); ++it) {
      if (it->bytes == bytes) {  // the most recently kept block of this size
        data = it->data;
        pool.kept -= bytes;
        if (it->inference) pool.kept_inference -= bytes;
        pool.free_blocks.erase(std::next(it).base());
        break;
      }
    }
  }
  if (data == nullptr) {
    data = std::aligned_alloc(64, bytes);  // bytes: a multiple of 128 KiB
    TORCH_CHECK(data != nullptr, "out of memory allocating ", bytes, " bytes");
  }
  return at::from_blob(
      data, sizes, [bytes, inference](void* p) { keep_block(p, bytes, inference); }, options);
}

// A buffer of rows (the gathered inputs, hidden activations and outputs of the experts, their
// gradients) of training or (inference true) of inference: from the pool unless
// set_row_pool(false).
static at::Tensor rows_empty(at::IntArrayRef sizes, const at::TensorOptions& options,
                             bool inference = false) {
  return pool_rows ? pooled_empty(sizes, options, inference) : at::empty(sizes, options);
}

void set_row_pool(bool on) { pool_rows = on; }

// Free the pool's kept blocks; returns the bytes freed.
int64_t release_pool() {
  auto& pool = block_pool();
  std::list<Block> blocks;
  {
    std::lock_guard<std::mutex> lock(pool.mu);
    blocks.swap(pool.free_blocks);
    pool.kept = pool.kept_inference = 0;
  }
  int64_t freed = 0;
  for (const auto& block : blocks) {
    std::free(block.data);
    freed += (int64_t)block.bytes;
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
