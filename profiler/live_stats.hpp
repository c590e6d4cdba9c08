#pragma once
// The live statistics segment: what one gpuswap process publishes for `gpuswap top`, laid out
// as a fixed-size POD in a per-process POSIX shared-memory object, and the seqlock that lets a
// reader in another process copy it without ever blocking the writer.
//
// Glossary
//   segment   /dev/shm/<prefix>.<euid>.<pid>, owner-only (0600), created by
//             live_stats_writer (profiler/live_stats_writer.hpp), read by
//             profiler/live_stats_reader.hpp.
//   figures   live_figures, the payload; every field a uint64 or a double (plus one fixed char
//             array), so the layout is the same in every process that shares the segment.
//   sequence  the seqlock word: odd while the writer is copying figures in, even otherwise.
//             A writer killed mid-copy leaves it odd for ever: readers report such a segment
//             as torn and never return its figures.
//
// Layout versioning: the header names a magic, a layout version and the segment size. A
// change to live_figures or live_stats_header must bump live_stats_layout_version; readers
// accept only their own version (a newer `gpuswap top` reads an older process as "invalid",
// never as wrong numbers).
#include <atomic>
#include <charconv>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <string>
#include <string_view>
#include <type_traits>

namespace gpuswap {

// "GPSWLIVE" in memory order on a little-endian machine.
inline constexpr std::uint64_t live_stats_magic = 0x4556494c57535047ULL;
inline constexpr std::uint64_t live_stats_layout_version = 1;
inline constexpr std::size_t live_stats_device_name_size = 64;
// The name prefix when neither the option nor $GPUSWAP_LIVE_STATS_PREFIX gives one.
inline constexpr std::string_view live_stats_default_prefix = "gpuswap";
// Where glibc's shm_open (and so Boost.Interprocess) puts POSIX shared-memory objects.
inline constexpr std::string_view live_stats_shm_dir = "/dev/shm";

// What one process publishes. Byte counts are current values unless named *_total.
// The writer stamps pid, start_time_ns, last_update_ns and heartbeat itself.
struct live_figures {
  std::uint64_t pid = 0;
  // CLOCK_REALTIME nanoseconds when the writer opened the segment.
  std::uint64_t start_time_ns = 0;
  // NUL-terminated; readers reject a segment whose name fills the array.
  char device_name[live_stats_device_name_size] = {};
  std::uint64_t device_index = 0;
  // device_limit in bytes; 0: no limit below the physical memory.
  std::uint64_t budget_bytes = 0;
  std::uint64_t allocated_bytes = 0;
  std::uint64_t reserved_bytes = 0;
  // Bytes whose only copy is on the host.
  std::uint64_t swapped_out_bytes = 0;
  // Bytes being copied either way right now.
  std::uint64_t in_flight_bytes = 0;
  std::uint64_t bytes_out_total = 0;  // device to host, since start
  std::uint64_t bytes_in_total = 0;   // host to device, since start
  std::uint64_t stall_ns_total = 0;   // compute streams waiting for swapped data
  std::uint64_t stall_count = 0;
  double bandwidth_out_bytes_per_s = 0.0;  // recent device-to-host rate
  double bandwidth_in_bytes_per_s = 0.0;   // recent host-to-device rate
  std::uint64_t pinned_host_used_bytes = 0;
  std::uint64_t pinned_host_limit_bytes = 0;  // 0: no limit
  // CLOCK_REALTIME nanoseconds of the last update.
  std::uint64_t last_update_ns = 0;
  // Incremented by every update: a reader that sees it move knows the process is alive.
  std::uint64_t heartbeat = 0;
};
static_assert(std::is_trivially_copyable_v<live_figures> &&
              std::is_standard_layout_v<live_figures>);
static_assert(sizeof(live_figures) % sizeof(std::uint64_t) == 0);
static_assert(sizeof(double) == sizeof(std::uint64_t));

inline constexpr std::size_t live_figures_words = sizeof(live_figures) / sizeof(std::uint64_t);

// Written once by the writer before it publishes `magic`; only `sequence` changes afterwards.
struct live_stats_header {
  std::uint64_t magic;
  std::uint64_t layout_version;
  std::uint64_t segment_size;  // sizeof(live_stats_segment)
  std::uint64_t writer_pid;
  // Start time of the writer process in clock ticks since boot (/proc/<pid>/stat field 22);
  // tells a dead writer from a new process that reuses its pid. 0: unknown.
  std::uint64_t writer_start_ticks;
  std::uint64_t sequence;
  std::uint64_t reserved[2];
};

// The whole shared object. The figures are held as words, not as a live_figures, so that every
// shared access is an 8-byte atomic access to a uint64 (see Note [Seqlock memory orders]).
struct live_stats_segment {
  live_stats_header header;
  std::uint64_t figures[live_figures_words];
};
static_assert(std::is_trivially_copyable_v<live_stats_segment> &&
              std::is_standard_layout_v<live_stats_segment>);
static_assert(alignof(live_stats_segment) == alignof(std::uint64_t));

// Note [Seqlock memory orders]
// One writer, any number of readers in other processes, nobody ever waits for anybody:
//
//   writer                                  reader
//   s = sequence (relaxed: only we write)   s1 = sequence.load(acquire); odd: retry
//   sequence = s+1 (relaxed)                words[i] = figures[i].load(acquire)  for each i
//   figures[i] = words[i] (release) each i  s2 = sequence.load(relaxed)
//   sequence = s+2 (release)                s1 == s2: the copy is consistent; else retry
//
// Each figure store is a release, so it carries the odd sequence store before it; each figure
// load is an acquire, so the second sequence load cannot move above it. If the reader saw a
// figure store of an update, it synchronised with it, so s2 reads that update's odd sequence
// (or later) and the reader retries. The final release store pairs with the reader's first
// acquire load: an even s1 means the figures of that update are visible. This is the
// per-access formulation in Boehm, "Can seqlocks get along with programming language memory
// models?" (MSPC 2012); it needs no standalone fence, which GCC's ThreadSanitizer rejects
// (-Wtsan: atomic_thread_fence is not supported), and on x86 an acquire load or release store
// of a uint64 is a plain mov, so it costs what relaxed accesses cost. Every shared access is a
// std::atomic_ref on a naturally aligned uint64, which is lock-free and therefore address-free
// (works between processes that map the same page at different addresses). The reader maps
// the segment read-only and loads through const_cast: an atomic load of a lock-free uint64 is
// a plain load instruction and never writes.
static_assert(std::atomic_ref<std::uint64_t>::is_always_lock_free);
static_assert(std::atomic_ref<std::uint64_t>::required_alignment <= alignof(std::uint64_t));

// Publishes `figures` into `segment`. Only one thread at a time may call it for a segment
// (live_stats_writer enforces that); it never blocks.
inline void live_stats_store(live_stats_segment& segment, const live_figures& figures) noexcept {
  std::uint64_t words[live_figures_words];
  std::memcpy(words, &figures, sizeof words);
  std::atomic_ref<std::uint64_t> sequence(segment.header.sequence);
  // A writer that was forked mid-update could inherit an odd value; round up to even first.
  const std::uint64_t s = (sequence.load(std::memory_order_relaxed) + 1) & ~std::uint64_t{1};
  sequence.store(s + 1, std::memory_order_relaxed);
  for (std::size_t i = 0; i < live_figures_words; ++i) {
    std::atomic_ref<std::uint64_t>(segment.figures[i]).store(words[i], std::memory_order_release);
  }
  sequence.store(s + 2, std::memory_order_release);
}

enum class live_load_result { ok, writing, changed };

// One read attempt. `ok`: `out` holds a consistent copy. `writing`: the sequence was odd (a
// write in progress, or a writer that died mid-write). `changed`: a write overlapped the copy.
// `out` is untouched unless the result is ok.
inline live_load_result live_stats_try_load(const live_stats_segment& segment,
                                            live_figures& out) noexcept {
  auto& shared = const_cast<live_stats_segment&>(segment);
  std::atomic_ref<std::uint64_t> sequence(shared.header.sequence);
  const std::uint64_t s1 = sequence.load(std::memory_order_acquire);
  if (s1 & 1U) return live_load_result::writing;
  std::uint64_t words[live_figures_words];
  for (std::size_t i = 0; i < live_figures_words; ++i) {
    words[i] = std::atomic_ref<std::uint64_t>(shared.figures[i]).load(std::memory_order_acquire);
  }
  const std::uint64_t s2 = sequence.load(std::memory_order_relaxed);
  if (s1 != s2) return live_load_result::changed;
  std::memcpy(&out, words, sizeof words);
  return live_load_result::ok;
}

// A header field read with the atomicity every shared access needs (the header may be read
// while a writer initialises it, or while a fuzz test rewrites the file).
inline std::uint64_t live_stats_load_header_word(
    const std::uint64_t& word, std::memory_order order = std::memory_order_relaxed) noexcept {
  return std::atomic_ref<std::uint64_t>(const_cast<std::uint64_t&>(word)).load(order);
}

// A prefix is 1 to 64 characters of [A-Za-z0-9_-]: no dot (it separates the name's fields),
// no slash (it would leave /dev/shm).
inline bool is_valid_live_stats_prefix(std::string_view prefix) noexcept {
  if (prefix.empty() || prefix.size() > 64) return false;
  for (const char c : prefix) {
    const bool ok = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
                    c == '_' || c == '-';
    if (!ok) return false;
  }
  return true;
}

// "<prefix>.<uid>.<pid>": the uid makes the name per user, the pid per process.
inline std::string live_stats_segment_name(std::string_view prefix, std::uint64_t uid,
                                           std::uint64_t pid) {
  std::string name(prefix);
  name += '.';
  name += std::to_string(uid);
  name += '.';
  name += std::to_string(pid);
  return name;
}

// The pid of "<prefix>.<uid>.<pid>", or 0 when `name` is not exactly that form for this
// prefix and uid (decimal digits only, no sign, no leading zero, pid in 1..2^31-1).
inline std::uint64_t parse_live_stats_segment_name(std::string_view name, std::string_view prefix,
                                                   std::uint64_t uid) noexcept {
  if (name.size() <= prefix.size() + 1 || name.substr(0, prefix.size()) != prefix ||
      name[prefix.size()] != '.') {
    return 0;
  }
  name.remove_prefix(prefix.size() + 1);
  const auto parse_number = [](std::string_view text, std::uint64_t& value) noexcept {
    if (text.empty() || text.size() > 19 || (text.size() > 1 && text[0] == '0')) return false;
    for (const char c : text) {
      if (c < '0' || c > '9') return false;
    }
    const auto [end, ec] = std::from_chars(text.data(), text.data() + text.size(), value);
    return ec == std::errc{} && end == text.data() + text.size();
  };
  const auto dot = name.find('.');
  if (dot == std::string_view::npos) return 0;
  std::uint64_t parsed_uid = 0;
  std::uint64_t parsed_pid = 0;
  if (!parse_number(name.substr(0, dot), parsed_uid) || parsed_uid != uid) return 0;
  if (!parse_number(name.substr(dot + 1), parsed_pid)) return 0;
  if (parsed_pid == 0 || parsed_pid > 0x7fffffffULL) return 0;
  return parsed_pid;
}

}  // namespace gpuswap
