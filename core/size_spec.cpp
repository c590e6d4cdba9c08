#include "core/size_spec.hpp"

#include <fmt/format.h>

#include <algorithm>
#include <array>
#include <cctype>
#include <charconv>
#include <string>

#include "core/errors.hpp"

namespace gpuswap {

// Note [Exact size arithmetic]
// Sizes are parsed digit by digit into integers, never through a double: "18446744073709551615"
// must fit and "18446744073709551616" must not, and 33.3% of 1000 bytes must be 333 bytes, not
// the 332 that 33.3 (stored as 33.29999...) would give. A fraction 0.d1d2...dn times an integer
// T is computed from the last digit to the first as t = floor((d_i * T + t) / 10), which equals
// floor(T * 0.d1...dn) exactly (floor((a + x) / 10) == floor((a + floor(x)) / 10) for integer
// a), and each step is split so that no intermediate exceeds T: no 128-bit type is needed.

namespace {

struct unit {
  std::string_view name;
  std::uint64_t factor;
};

// Largest first, which is the order to_string tries them in.
constexpr std::array<unit, 5> units{{{"TiB", std::uint64_t{1} << 40},
                                     {"GiB", std::uint64_t{1} << 30},
                                     {"MiB", std::uint64_t{1} << 20},
                                     {"KiB", std::uint64_t{1} << 10},
                                     {"B", 1}}};

bool is_digit(char c) noexcept { return c >= '0' && c <= '9'; }

std::string lower(std::string_view s) {
  std::string out(s);
  for (char& c : out) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  return out;
}

// floor(total * 0.<digits>), exactly, for any number of digits (Note [Exact size arithmetic]).
std::uint64_t scale_by_fraction(std::uint64_t total, std::string_view digits) noexcept {
  const std::uint64_t a = total / 10;
  const std::uint64_t b = total % 10;
  std::uint64_t t = 0;
  for (auto it = digits.rbegin(); it != digits.rend(); ++it) {
    const auto d = static_cast<std::uint64_t>(*it - '0');
    t = d * a + t / 10 + (d * b + t % 10) / 10;
  }
  return t;
}

// The unit someone probably meant by a suffix we do not accept ("GB", "g", "gib").
std::string_view suggest_unit(std::string_view suffix) {
  const std::string s = lower(suffix);
  if (s == "b" || s == "byte" || s == "bytes") return "B";
  if (s == "k" || s == "kb" || s == "kib") return "KiB";
  if (s == "m" || s == "mb" || s == "mib") return "MiB";
  if (s == "g" || s == "gb" || s == "gib") return "GiB";
  if (s == "t" || s == "tb" || s == "tib") return "TiB";
  return {};
}

std::string generic_accepted(bool allow_percent, bool allow_zero) {
  std::string out =
      "a number with an optional unit B, KiB, MiB, GiB or TiB (1024-based, case as written; "
      "a bare number is bytes; fractions such as 1.5GiB round down to whole bytes)";
  if (allow_percent) out += ", or a percentage above 0 and at most 100 such as 50%";
  out += allow_zero ? "; 0 is accepted" : "; it must be above zero";
  return out;
}

}  // namespace

size_spec size_spec::from_bytes(std::uint64_t bytes) noexcept {
  size_spec s;
  s.bytes_ = bytes;
  return s;
}

std::uint64_t size_spec::resolve(std::uint64_t total) const noexcept {
  if (!is_percent()) return bytes_;
  // percent_ is canonical: an integer part 0..100 and a fraction without trailing zeros;
  // p/100 is then the fraction 0.<two-digit integer part><fraction digits>.
  const auto dot = percent_.find('.');
  const std::string_view whole = std::string_view(percent_).substr(0, dot);
  if (whole == "100") return total;
  std::string digits = whole.size() == 1 ? "0" + std::string(whole) : std::string(whole);
  if (dot != std::string::npos) digits += percent_.substr(dot + 1);
  return scale_by_fraction(total, digits);
}

double size_spec::percent() const noexcept {
  if (!is_percent()) return 0.0;
  // from_chars, unlike stod, ignores the C locale's decimal separator.
  double value = 0.0;
  std::from_chars(percent_.data(), percent_.data() + percent_.size(), value);
  return value;
}

std::string size_spec::to_string() const {
  if (is_percent()) return percent_ + "%";
  if (bytes_ == 0) return "0";
  // The largest unit that shows the value as at least 1 with at most three exact decimals
  // (1.5GiB, 1.125MiB); otherwise plain bytes. Either way parse_size reads back the same bytes.
  for (const unit& u : units) {
    if (u.factor == 1 || bytes_ < u.factor) continue;
    const std::uint64_t whole = bytes_ / u.factor;
    const std::uint64_t rest = bytes_ % u.factor;  // < 2^40, so rest * 1000 cannot overflow
    if ((rest * 1000) % u.factor != 0) continue;
    std::string out = fmt::format("{}", whole);
    if (rest != 0) {
      std::string frac = fmt::format("{:03}", rest * 1000 / u.factor);
      while (frac.back() == '0') frac.pop_back();
      out += "." + frac;
    }
    return out + std::string(u.name);
  }
  return fmt::format("{}", bytes_);
}

size_spec parse_size(std::string_view key, std::string_view text, bool allow_percent,
                     bool allow_zero, std::string_view accepted) {
  const std::string generic = generic_accepted(allow_percent, allow_zero);
  if (accepted.empty()) accepted = generic;
  auto fail = [&](std::string_view problem) { throw_config_error(key, text, accepted, problem); };

  if (text.empty()) fail("empty value");
  const bool all_space = std::all_of(text.begin(), text.end(), [](char c) {
    return std::isspace(static_cast<unsigned char>(c)) != 0;
  });
  if (all_space) fail("only whitespace");
  if (std::any_of(text.begin(), text.end(),
                  [](char c) { return std::isspace(static_cast<unsigned char>(c)) != 0; })) {
    fail("whitespace is not accepted anywhere in a size");
  }
  {
    std::string_view unsigned_text = text;
    if (unsigned_text.front() == '+' || unsigned_text.front() == '-')
      unsigned_text.remove_prefix(1);
    const std::string l = lower(unsigned_text);
    if (l.starts_with("nan") || l.starts_with("inf")) fail("not a finite number");
  }
  if (text.front() == '-') fail("negative sizes are not accepted");
  if (text.front() == '+') fail("a sign is not accepted");
  if (std::count(text.begin(), text.end(), '.') > 1) fail("more than one decimal point");

  std::size_t i = 0;
  while (i < text.size() && is_digit(text[i])) ++i;
  const std::string_view whole = text.substr(0, i);
  std::string_view frac;
  if (whole.empty()) {
    if (text.front() == '.') fail("no digit before the decimal point (write 0.5, not .5)");
    fail("not a number");
  }
  if (i < text.size() && text[i] == '.') {
    const std::size_t start = ++i;
    while (i < text.size() && is_digit(text[i])) ++i;
    frac = text.substr(start, i - start);
    if (frac.empty()) fail("no digit after the decimal point");
  }
  const std::string_view suffix = text.substr(i);
  const bool nonzero_digits =
      std::any_of(whole.begin(), whole.end(), [](char c) { return c != '0'; }) ||
      std::any_of(frac.begin(), frac.end(), [](char c) { return c != '0'; });

  size_spec result;
  if (suffix == "%") {
    if (!allow_percent) fail("a percentage is not accepted for this key");
    // Canonical form: no leading zeros in the integer part, no trailing zeros in the fraction.
    std::string_view w = whole;
    while (w.size() > 1 && w.front() == '0') w.remove_prefix(1);
    std::string_view f = frac;
    while (!f.empty() && f.back() == '0') f.remove_suffix(1);
    if (!nonzero_digits) fail("a percentage must be above 0");
    if (w.size() > 3 || (w.size() == 3 && (w > "100" || !f.empty()))) {
      fail("a percentage must be at most 100");
    }
    result.percent_ = std::string(w);
    if (!f.empty()) result.percent_ += "." + std::string(f);
    return result;
  }

  const auto u =
      std::find_if(units.begin(), units.end(), [&](const unit& x) { return x.name == suffix; });
  if (suffix.empty()) {
    // a bare number is bytes
  } else if (u == units.end()) {
    if ((suffix.front() == 'e' || suffix.front() == 'E') && suffix.size() > 1 &&
        (is_digit(suffix[1]) || suffix[1] == '+' || suffix[1] == '-')) {
      fail("exponent notation is not accepted");
    }
    if (suffix.find('%') != std::string_view::npos) {
      fail(allow_percent ? "'%' must come last, right after the number"
                         : "a percentage is not accepted for this key");
    }
    const std::string_view meant = suggest_unit(suffix);
    if (!meant.empty()) {
      fail(
          fmt::format("unknown unit '{}'; did you mean '{}'? Units are 1024-based: B, KiB, "
                      "MiB, GiB, TiB",
                      suffix, meant));
    }
    fail(fmt::format("unknown unit '{}'", suffix));
  }
  const std::uint64_t factor = suffix.empty() ? 1 : u->factor;

  constexpr std::string_view too_large = "too large: above 2^64-1 bytes";
  std::uint64_t value = 0;
  for (const char c : whole) {
    if (__builtin_mul_overflow(value, std::uint64_t{10}, &value) ||
        __builtin_add_overflow(value, static_cast<std::uint64_t>(c - '0'), &value)) {
      fail(too_large);
    }
  }
  if (__builtin_mul_overflow(value, factor, &value) ||
      __builtin_add_overflow(value, scale_by_fraction(factor, frac), &value)) {
    fail(too_large);
  }
  // 0 means "no limit" to the keys that allow it, so a nonzero size that rounds down to zero
  // bytes must not silently become that.
  if (value == 0 && nonzero_digits) fail("rounds down to 0 bytes");
  if (value == 0 && !allow_zero) fail("must be above zero");
  result.bytes_ = value;
  return result;
}

}  // namespace gpuswap
