#pragma once
// A memory size as GPUSWAP_CONF spells it: a byte count (512MiB, 1.5GiB, 4096) or a percentage
// of some total that is only known later (90% of device memory, 50% of host RAM).
#include <cstdint>
#include <string>
#include <string_view>

namespace gpuswap {

struct size_spec {
  // A byte count; 0 is what "no limit" keys use for "unset".
  static size_spec from_bytes(std::uint64_t bytes) noexcept;

  bool is_percent() const noexcept { return !percent_.empty(); }
  // Bytes, or the percentage of `total` rounded down to whole bytes. Exact for every total.
  std::uint64_t resolve(std::uint64_t total) const noexcept;
  // A byte count of zero (a percentage is never zero).
  bool is_zero() const noexcept { return !is_percent() && bytes_ == 0; }
  // The byte count; meaningful only when !is_percent().
  std::uint64_t bytes() const noexcept { return bytes_; }
  // The percentage, for display; meaningful only when is_percent().
  double percent() const noexcept;
  // Canonical text that parse_size reads back to an equal value: "1.5GiB", "4097", "12.5%".
  std::string to_string() const;

  bool operator==(const size_spec&) const = default;

 private:
  friend size_spec parse_size(std::string_view, std::string_view, bool, bool, std::string_view);

  std::uint64_t bytes_ = 0;
  // Canonical decimal text of the percentage ("12.5", "100"), kept as digits rather than a
  // double so that resolve() is exact; empty for a byte count.
  std::string percent_;
};

// Parses `text` as the value of `key`. Accepted: a non-negative decimal number (fractions
// allowed, rounded down to whole bytes) with an optional unit B, KiB, MiB, GiB or TiB (case
// as written; a bare number is bytes), or, when allow_percent, a percentage 0 < p <= 100
// followed by '%'. Zero is accepted only when allow_zero. Every error is a config_error
// naming the key, the text and `accepted` (a generic description when empty).
size_spec parse_size(std::string_view key, std::string_view text, bool allow_percent,
                     bool allow_zero, std::string_view accepted = {});

}  // namespace gpuswap
