#pragma once
// block and segment: the caching allocator's bookkeeping for the memory it holds.
//
// Glossary
//   segment   one allocation obtained from device::allocate_device, or (expandable) a range of
//             address space from device::reserve_address_range whose pages are mapped on
//             demand; never split across pools or streams: every block of a segment carries
//             the segment's stream.
//   block     a piece of a segment, [address, address + size). The blocks of a segment tile it
//             exactly, linked in address order by prev/next.
//   state     allocated (handed to a caller), pending (freed, but another stream may still use
//             it: waits for events), free (in a block_pool, reusable on its stream), deferred
//             (freed into a fast bin, not yet merged with its neighbours: reusable on its
//             stream for a request of exactly its size; Note [Deferred coalescing]),
//             unmapped (address space of an expandable segment with no memory behind it; its
//             ends are on page boundaries), unmapping (free memory whose pages are being
//             unmapped: waits for its stream's work; Note [Expandable segments]).
#include <boost/intrusive/list_hook.hpp>
#include <boost/intrusive/set_hook.hpp>
#include <cstddef>
#include <cstdint>
#include <vector>

#include "device/device.hpp"

namespace gpuswap {

enum class pool_kind : std::uint8_t { small, large };
enum class block_state : std::uint8_t { allocated, pending, free, deferred, unmapped, unmapping };

struct segment;

// Note [Block layout]
// The fields are grouped by cache line by how hot they are (Note [Hot path],
// caching_allocator.cpp). The first line is all that the steady-state hot path touches: a
// small-pool allocation served from a fast bin and a free into one (Note [Deferred
// coalescing]) need where the block is and how big, its stream, the requested bytes, its
// state and whether record_stream named another stream; the fast bins keep their blocks'
// addresses themselves (Note [Fast bins as arrays]), so that an allocation popping one writes
// to its line without waiting for it. The second line holds what splits, merges and the
// pools' free indexes need (address-order links, list and tree hooks); the third only the
// rare paths.
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

  // --- first cache line
  stream_t stream{};
  std::size_t size = 0;
  std::uintptr_t address = 0;
  // Bytes the caller asked for (before rounding) while allocated or pending; 0 otherwise.
  std::size_t requested = 0;
  block_state state = block_state::free;
  pool_kind pool = pool_kind::small;  // the segment's, kept here to spare a load on free
  bool has_stream_uses = false;       // !stream_uses.empty(), read without its line

  // --- second cache line
  alignas(64) block* prev = nullptr;  // neighbours in the segment, by address
  block* next = nullptr;
  boost::intrusive::list_member_hook<> bin_hook;  // free small-pool blocks (size_class_bins)
  // Free large-pool blocks (block_pool's tree); the colour is packed into the parent pointer.
  boost::intrusive::set_member_hook<boost::intrusive::optimize_size<true>> tree_hook;

  // --- third cache line
  alignas(64) segment* seg = nullptr;
  // Events recorded at deallocate that have not completed yet.
  std::uint32_t pending_events = 0;
  // Non-zero when record_event failed for one of stream_uses: only a device-wide synchronize
  // begun after that proves the block idle (Note [Failed event records], caching_allocator.cpp).
  std::uint64_t needs_sync_epoch = 0;
  // Filled by record_stream while allocated; its entries stay put (no reallocation) while
  // the block is pending, because nothing appends to a block that is not allocated.
  std::vector<stream_use> stream_uses;

  bool is_split() const noexcept { return prev != nullptr || next != nullptr; }
  // Merged and in a pool. A deferred block (in a fast bin) is free memory too, but is not
  // merged with its neighbours until consolidation (Note [Deferred coalescing]).
  bool is_free() const noexcept { return state == block_state::free; }
  // Linked into a pool's free index; equivalent to is_free() (caching_allocator::validate
  // checks it).
  bool in_pool() const noexcept { return bin_hook.is_linked() || tree_hook.is_linked(); }
  void* ptr() const noexcept { return reinterpret_cast<void*>(address); }
};
static_assert(sizeof(block) == 192, "Note [Block layout]: three cache lines");

struct segment {
  std::uintptr_t base = 0;
  std::size_t size = 0;
  pool_kind pool = pool_kind::small;
  stream_t stream{};
  block* first = nullptr;  // the lowest-addressed block
  // Being returned to the device: out of the pools and the figures, waiting for its stream's
  // work (caching_allocator::release_unused_segments).
  bool releasing = false;
  // Note [Expandable segments] (caching_allocator_expandable.cpp): `size` is the reserved
  // address space, `mapped` the bytes of it counted in reserved_bytes: all but its unmapped
  // and unmapping blocks, which are whole pages.
  bool expandable = false;
  std::size_t mapped = 0;
};

}  // namespace gpuswap
