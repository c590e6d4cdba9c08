#pragma once
// block_pool: the free-block index of one caching_allocator pool (small or large).
//
// Glossary
//   segment   one allocation obtained from device::allocate_device; never split across pools
//             or streams: every block of a segment carries the segment's stream.
//   block     a piece of a segment, [address, address + size). The blocks of a segment tile it
//             exactly, linked in address order by prev/next.
//   state     allocated (handed to a caller), pending (freed, but another stream may still use
//             it: waits for events), free (in a block_pool, reusable on its stream).
//
// The index is an intrusive red-black tree ordered by (stream, size, address): best fit for a
// stream is one lower_bound, and insertion and removal allocate nothing, which keeps the hot
// path of caching_allocator to a hash lookup and a tree operation (see caching_allocator.cpp).
#include <boost/intrusive/set.hpp>
#include <cstddef>
#include <cstdint>
#include <vector>

#include "device/device.hpp"

namespace gpuswap {

enum class pool_kind : std::uint8_t { small, large };
enum class block_state : std::uint8_t { allocated, pending, free };

struct segment;

struct alignas(64) block {
  // Another stream that used the block (record_stream). At deallocate an event is recorded on
  // `stream` and the entry joins that stream's pending queue (an intrusive FIFO through `next`)
  // until the event completes.
  struct stream_use {
    stream_t stream{};
    event_t event{};
    bool recorded = false;
    stream_use* next = nullptr;
    block* owner = nullptr;
  };

  // First cache line: what the tree walk and the merge on free read (Note [Hot path] in
  // caching_allocator.cpp). The hook packs its colour into the parent pointer.
  boost::intrusive::set_member_hook<boost::intrusive::optimize_size<true>> free_hook;  // free only
  stream_t stream{};
  std::size_t size = 0;
  std::uintptr_t address = 0;
  block* prev = nullptr;  // neighbours in the segment, by address
  block* next = nullptr;

  // Second cache line.
  segment* seg = nullptr;
  block_state state = block_state::free;
  pool_kind pool = pool_kind::small;  // the segment's, kept here to spare a load on free
  // Events recorded at deallocate that have not completed yet.
  std::uint32_t pending_events = 0;
  // Bytes the caller asked for (before rounding) while allocated or pending; 0 when free.
  std::size_t requested = 0;
  // Non-zero when record_event failed for one of stream_uses: only a device-wide synchronize
  // begun after that proves the block idle (Note [Failed event records], caching_allocator.cpp).
  std::uint64_t needs_sync_epoch = 0;
  // Filled by record_stream while allocated; its entries stay put (no reallocation) while
  // the block is pending, because nothing appends to a block that is not allocated.
  std::vector<stream_use> stream_uses;

  bool is_split() const noexcept { return prev != nullptr || next != nullptr; }
  // Equivalent to state == free (caching_allocator::validate checks it), but read from the
  // first cache line: merging on free asks it of both neighbours.
  bool in_pool() const noexcept { return free_hook.is_linked(); }
  void* ptr() const noexcept { return reinterpret_cast<void*>(address); }
};

struct segment {
  std::uintptr_t base = 0;
  std::size_t size = 0;
  pool_kind pool = pool_kind::small;
  stream_t stream{};
  block* first = nullptr;  // the lowest-addressed block
};

class block_pool {
 public:
  explicit block_pool(pool_kind kind) noexcept : kind_(kind) {}
  block_pool(const block_pool&) = delete;
  block_pool& operator=(const block_pool&) = delete;
  ~block_pool();

  pool_kind kind() const noexcept { return kind_; }
  // Preconditions: b.state == free, b not in any pool, b.size > 0.
  void insert(block& b) noexcept;
  // Precondition: b is in this pool.
  void erase(block& b) noexcept;
  bool contains(const block& b) const noexcept;

  // The smallest free block of `stream` with size >= `size`, or nullptr. Follows PyTorch's
  // max_split_size rule: a request below max_split_size never takes a block of max_split_size
  // or more (those are kept whole for large requests), and a request of max_split_size or more
  // takes a block only if it wastes less than `oversize_slack` bytes.
  block* best_fit(stream_t stream, std::size_t size, std::size_t max_split_size,
                  std::size_t oversize_slack) noexcept;

  std::size_t size() const noexcept { return set_.size(); }
  bool empty() const noexcept { return set_.empty(); }

  template <typename F>
  void for_each(F&& f) const {
    for (const block& b : set_) f(b);
  }

 private:
  struct key {
    stream_t stream;
    std::size_t size;
  };
  struct order {
    bool operator()(const block& a, const block& b) const noexcept {
      if (a.stream != b.stream) return a.stream < b.stream;
      if (a.size != b.size) return a.size < b.size;
      return a.address < b.address;
    }
  };
  // Orders keys before every block of their stream and size (address 0 is below any block).
  struct key_order {
    bool operator()(const block& a, const key& k) const noexcept {
      if (a.stream != k.stream) return a.stream < k.stream;
      return a.size < k.size;
    }
    bool operator()(const key& k, const block& b) const noexcept {
      if (k.stream != b.stream) return k.stream < b.stream;
      return k.size <= b.size;
    }
  };
  using hook = boost::intrusive::member_hook<
      block, boost::intrusive::set_member_hook<boost::intrusive::optimize_size<true>>,
      &block::free_hook>;
  using set_type = boost::intrusive::set<block, hook, boost::intrusive::compare<order>,
                                         boost::intrusive::constant_time_size<true>>;

  pool_kind kind_;
  set_type set_;
};

}  // namespace gpuswap
