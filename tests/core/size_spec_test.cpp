#include "core/size_spec.hpp"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <cstdint>
#include <limits>
#include <string>
#include <vector>

#include "core/errors.hpp"

namespace gpuswap {
namespace {

using ::testing::HasSubstr;

constexpr std::uint64_t kib = std::uint64_t{1} << 10;
constexpr std::uint64_t mib = std::uint64_t{1} << 20;
constexpr std::uint64_t gib = std::uint64_t{1} << 30;
constexpr std::uint64_t tib = std::uint64_t{1} << 40;
constexpr std::uint64_t max64 = std::numeric_limits<std::uint64_t>::max();

struct bytes_case {
  std::string text;
  std::uint64_t bytes;
};

TEST(size_spec, parses_byte_counts_with_units_and_fractions) {
  const std::vector<bytes_case> cases{
      {"0", 0},
      {"0B", 0},
      {"0.0GiB", 0},
      {"1", 1},
      {"4096", 4096},
      {"1B", 1},
      {"2.9B", 2},  // fractions round down to whole bytes
      {"1KiB", kib},
      {"0.5KiB", 512},
      {"1.0001KiB", 1024},
      {"512MiB", 512 * mib},
      {"1.125MiB", mib + mib / 8},
      {"8GiB", 8 * gib},
      {"1.5GiB", gib + gib / 2},
      {"007GiB", 7 * gib},
      {"1TiB", tib},
      {"0.25TiB", tib / 4},
      {"18446744073709551615", max64},
      {"18446744073709551615B", max64},
      {"18446744073709551615.9B", max64},
      {"16777215TiB", 16777215 * tib},
      {"16777215.999999999999TiB", max64 - 1},
      {"16777215.9999999999999TiB", max64},
      {"17179869183GiB", 17179869183 * gib},
      {"1.000000000000000000000000000001GiB", gib},
  };
  for (const bytes_case& c : cases) {
    SCOPED_TRACE(c.text);
    const size_spec s = parse_size("device_limit", c.text, true, true);
    EXPECT_FALSE(s.is_percent());
    EXPECT_EQ(s.bytes(), c.bytes);
    EXPECT_EQ(s.resolve(123456), c.bytes);  // a byte count ignores the total
    EXPECT_EQ(s.is_zero(), c.bytes == 0);
  }
}

struct percent_case {
  std::string text;
  std::uint64_t total;
  std::uint64_t expected;
  std::string canonical;
};

TEST(size_spec, resolves_percentages_exactly) {
  const std::vector<percent_case> cases{
      {"50%", 1000, 500, "50%"},
      {"100%", max64, max64, "100%"},
      {"100.000%", 77, 77, "100%"},
      {"050%", 1000, 500, "50%"},
      {"12.50%", 1000, 125, "12.5%"},
      {"33.3%", 1000, 333, "33.3%"},  // 33.3 as a double would give 332
      {"0.5%", 1000, 5, "0.5%"},
      {"1%", 99, 0, "1%"},
      {"90%", 80 * gib, 72 * gib, "90%"},
      {"12.5%", max64, max64 >> 3, "12.5%"},
      {"33.3%", max64, 6142765776545280687ULL, "33.3%"},
      {"0.0000001%", max64, 18446744073ULL, "0.0000001%"},
      {"99.9999999999999999999%", max64, max64 - 1, "99.9999999999999999999%"},
      {"50%", 0, 0, "50%"},
  };
  for (const percent_case& c : cases) {
    SCOPED_TRACE(c.text);
    const size_spec s = parse_size("host_limit", c.text, true, false);
    EXPECT_TRUE(s.is_percent());
    EXPECT_FALSE(s.is_zero());
    EXPECT_EQ(s.resolve(c.total), c.expected);
    EXPECT_EQ(s.to_string(), c.canonical);
  }
  EXPECT_DOUBLE_EQ(parse_size("host_limit", "12.5%", true, false).percent(), 12.5);
}

TEST(size_spec, to_string_picks_the_largest_exact_unit) {
  const std::vector<bytes_case> cases{
      {"0", 0},
      {"1", 1},
      {"1000", 1000},
      {"4097", 4097},
      {"1KiB", kib},
      {"1.5KiB", 1536},
      {"1.125MiB", mib + mib / 8},
      {"1.5GiB", gib + gib / 2},
      {"1.5TiB", 1536 * gib},
      {"1537GiB", 1537 * gib},
      {"2TiB", 2 * tib},
      {"18446744073709551615", max64},
  };
  for (const bytes_case& c : cases) {
    SCOPED_TRACE(c.text);
    EXPECT_EQ(size_spec::from_bytes(c.bytes).to_string(), c.text);
  }
}

TEST(size_spec, to_string_round_trips_through_parse_size) {
  std::vector<std::uint64_t> values{0,           1,       7,       1023,          1024,      1025,
                                    3 * mib / 2, gib - 1, gib + 1, tib * 3 + gib, max64 - 1, max64};
  // A spread of awkward values: every power of two and its neighbours.
  for (int shift = 0; shift < 64; ++shift) {
    const std::uint64_t p = std::uint64_t{1} << shift;
    values.insert(values.end(), {p - 1, p, p + 1, p + p / 2, p * 5 / 4, p * 3 / 8});
  }
  for (const std::uint64_t v : values) {
    const std::string text = size_spec::from_bytes(v).to_string();
    SCOPED_TRACE(text);
    EXPECT_EQ(parse_size("max_split_size", text, false, true), size_spec::from_bytes(v));
  }
}

struct bad_case {
  std::string text;
  bool allow_percent;
  bool allow_zero;
  std::string problem;  // a substring of the message
};

TEST(size_spec, rejects_bad_sizes_naming_key_value_and_accepted_forms) {
  const std::vector<bad_case> cases{
      {"", true, true, "empty"},
      {"   ", true, true, "only whitespace"},
      {"\t", true, true, "only whitespace"},
      {" 1GiB", true, true, "whitespace"},
      {"1GiB ", true, true, "whitespace"},
      {"1 GiB", true, true, "whitespace"},
      {"1\tGiB", true, true, "whitespace"},
      {"abc", true, true, "not a number"},
      {"GiB", true, true, "not a number"},
      {"%", true, true, "not a number"},
      {"-1GiB", true, true, "negative"},
      {"-0", true, true, "negative"},
      {"+1GiB", true, true, "sign"},
      {"0", true, false, "above zero"},
      {"0GiB", true, false, "above zero"},
      {"0.000MiB", true, false, "above zero"},
      {"0.5B", true, true, "rounds down to 0 bytes"},
      {"0.0000000001KiB", true, true, "rounds down to 0 bytes"},
      {"16777216TiB", true, true, "too large"},
      {"16777216.0TiB", true, true, "too large"},
      {"17179869184GiB", true, true, "too large"},
      {"18446744073709551616", true, true, "too large"},
      {"99999999999999999999999", true, true, "too large"},
      {"1GB", true, true, "did you mean 'GiB'?"},
      {"1KB", true, true, "did you mean 'KiB'?"},
      {"1MB", true, true, "did you mean 'MiB'?"},
      {"1TB", true, true, "did you mean 'TiB'?"},
      {"1gib", true, true, "did you mean 'GiB'?"},
      {"1G", true, true, "did you mean 'GiB'?"},
      {"1b", true, true, "did you mean 'B'?"},
      {"1PiB", true, true, "unknown unit 'PiB'"},
      {"1GiBs", true, true, "unknown unit 'GiBs'"},
      {"50%", false, true, "percentage is not accepted"},
      {"50%GiB", true, true, "'%' must come last"},
      {"101%", true, true, "at most 100"},
      {"100.01%", true, true, "at most 100"},
      {"1000%", true, true, "at most 100"},
      {"0%", true, true, "above 0"},
      {"0.00%", true, true, "above 0"},
      {"1.2.3GiB", true, true, "more than one decimal point"},
      {"1..2", true, true, "more than one decimal point"},
      {"nan", true, true, "not a finite number"},
      {"NaN", true, true, "not a finite number"},
      {"inf", true, true, "not a finite number"},
      {"-inf", true, true, "not a finite number"},
      {"infinity", true, true, "not a finite number"},
      {"1e9", true, true, "exponent"},
      {".5GiB", true, true, "no digit before the decimal point"},
      {"5.GiB", true, true, "no digit after the decimal point"},
  };
  for (const bad_case& c : cases) {
    SCOPED_TRACE("'" + c.text + "'");
    try {
      parse_size("device_limit", c.text, c.allow_percent, c.allow_zero);
      ADD_FAILURE() << "accepted";
    } catch (const config_error& e) {
      EXPECT_EQ(e.key(), "device_limit");
      EXPECT_EQ(e.value(), c.text);
      const std::string message = e.what();
      EXPECT_THAT(message, HasSubstr("'device_limit'"));
      EXPECT_THAT(message, HasSubstr("'" + c.text + "'"));
      EXPECT_THAT(message, HasSubstr("B, KiB, MiB, GiB or TiB"));  // the accepted forms
      if (c.allow_percent) {
        EXPECT_THAT(message, HasSubstr("percentage"));
      }
      EXPECT_THAT(message, HasSubstr(c.problem));
    }
  }
}

TEST(size_spec, uses_the_callers_accepted_description) {
  try {
    parse_size("max_split_size", "huge", false, true, "a size of at least 1MiB");
    ADD_FAILURE() << "accepted";
  } catch (const config_error& e) {
    EXPECT_THAT(e.what(), HasSubstr("accepted: a size of at least 1MiB"));
  }
}

}  // namespace
}  // namespace gpuswap
