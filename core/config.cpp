#include "core/config.hpp"

#include <fmt/format.h>

#include <algorithm>
#include <array>
#include <cctype>
#include <cstdlib>
#include <utility>

#include "core/errors.hpp"

namespace gpuswap {

// Note [One table of keys]
// Every key is one row of key_table(): its name, the description of what it accepts (which
// every error for it quotes), a setter that parses and validates the text form, and a getter
// that writes it back. parse_config, config::set, config::get, config::validate, to_string
// and config_keys all walk that table, so adding a key is adding one row (and the field).

namespace {

template <typename T>
using name_list = std::vector<std::pair<std::string_view, T>>;

const name_list<offload_policy>& policy_names() {
  static const name_list<offload_policy> names{{"none", offload_policy::none},
                                               {"all", offload_policy::all},
                                               {"conv", offload_policy::conv},
                                               {"auto", offload_policy::auto_}};
  return names;
}
const name_list<prefetch_policy>& prefetch_names() {
  static const name_list<prefetch_policy> names{{"lookahead", prefetch_policy::lookahead},
                                                {"one_layer", prefetch_policy::one_layer},
                                                {"none", prefetch_policy::none}};
  return names;
}
const name_list<backend_kind>& backend_names() {
  static const name_list<backend_kind> names{
      {"auto", backend_kind::auto_}, {"cuda", backend_kind::cuda}, {"sim", backend_kind::sim}};
  return names;
}
const name_list<sim_backing_kind>& sim_backing_names() {
  static const name_list<sim_backing_kind> names{{"real", sim_backing_kind::real},
                                                 {"phantom", sim_backing_kind::phantom}};
  return names;
}
const name_list<log_level>& log_names() {
  static const name_list<log_level> names{{"debug", log_level::debug},
                                          {"info", log_level::info},
                                          {"warn", log_level::warn},
                                          {"error", log_level::error},
                                          {"off", log_level::off}};
  return names;
}
// The first spelling of each value is the one to_string writes.
const name_list<bool>& bool_names() {
  static const name_list<bool> names{{"true", true}, {"false", false}, {"1", true},
                                     {"0", false},   {"yes", true},    {"no", false},
                                     {"on", true},   {"off", false}};
  return names;
}
// Hardware the simulator models (REFERENCE.md, "Hardware presets for the simulator").
const name_list<int>& sim_preset_list() {
  static const name_list<int> names{
      {"titan-x-pcie3", 0}, {"a100-pcie4", 1}, {"h100-pcie5", 2}, {"gh200-c2c", 3}};
  return names;
}

template <typename T>
std::string_view name_of(const name_list<T>& names, T value) noexcept {
  for (const auto& [name, v] : names) {
    if (v == value) return name;
  }
  return "?";
}

template <typename T>
std::string join_names(const name_list<T>& names, std::string_view last_sep = " or ") {
  std::string out;
  for (std::size_t i = 0; i < names.size(); ++i) {
    if (i > 0) out += i + 1 == names.size() ? last_sep : ", ";
    out += names[i].first;
  }
  return out;
}

bool is_space(char c) noexcept { return std::isspace(static_cast<unsigned char>(c)) != 0; }

std::string lower(std::string_view s) {
  std::string out(s);
  for (char& c : out) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  return out;
}

// Optimal string alignment distance, case-insensitive: insertions, deletions, substitutions
// and transpositions of neighbours ("plociy" is one from "policy").
std::size_t edit_distance(std::string_view a_in, std::string_view b_in) {
  const std::string a = lower(a_in);
  const std::string b = lower(b_in);
  std::vector<std::vector<std::size_t>> d(a.size() + 1, std::vector<std::size_t>(b.size() + 1));
  for (std::size_t i = 0; i <= a.size(); ++i) d[i][0] = i;
  for (std::size_t j = 0; j <= b.size(); ++j) d[0][j] = j;
  for (std::size_t i = 1; i <= a.size(); ++i) {
    for (std::size_t j = 1; j <= b.size(); ++j) {
      const std::size_t cost = a[i - 1] == b[j - 1] ? 0 : 1;
      d[i][j] = std::min({d[i - 1][j] + 1, d[i][j - 1] + 1, d[i - 1][j - 1] + cost});
      if (i > 1 && j > 1 && a[i - 1] == b[j - 2] && a[i - 2] == b[j - 1]) {
        d[i][j] = std::min(d[i][j], d[i - 2][j - 2] + 1);
      }
    }
  }
  return d[a.size()][b.size()];
}

// The closest candidate within max_distance edits (the first of equals), or empty.
template <typename Range>
std::string_view closest(std::string_view word, const Range& candidates, std::size_t max_distance) {
  std::string_view best;
  std::size_t best_distance = max_distance + 1;
  for (const auto& candidate : candidates) {
    const std::string_view c = candidate;
    const std::size_t dist = edit_distance(word, c);
    // Replacing the whole word is no suggestion ("2" is one edit from "1").
    if (dist < best_distance && dist < word.size()) {
      best = c;
      best_distance = dist;
    }
  }
  return best;
}

struct key_row {
  std::string_view name;
  std::string accepted;
  void (*set)(config& c, const key_row& row, std::string_view value);
  std::string (*get)(const config& c);
};

template <typename T>
T parse_name(const key_row& row, std::string_view value, const name_list<T>& names) {
  for (const auto& [name, v] : names) {
    if (name == value) return v;
  }
  std::vector<std::string_view> spellings;
  for (const auto& entry : names) spellings.push_back(entry.first);
  const std::string_view meant = closest(value, spellings, 2);
  std::string problem = "not one of the accepted values";
  if (!meant.empty()) {
    problem = lower(value) == meant
                  ? fmt::format("values are lower case; did you mean '{}'?", meant)
                  : fmt::format("{}; did you mean '{}'?", problem, meant);
  }
  throw_config_error(row.name, value, row.accepted, problem);
}

constexpr std::string_view size_units =
    "units B, KiB, MiB, GiB, TiB, 1024-based and case as written; a bare number is bytes";

constexpr std::uint64_t min_split_size = std::uint64_t{1} << 20;

const std::vector<key_row>& key_table() {
  static const std::vector<key_row> table{
      {"device_limit",
       fmt::format("a size such as 8GiB, 1.5GiB or 4096 ({}), a percentage of device memory "
                   "above 0 and at most 100 such as 90%, or 0 for no limit below the physical "
                   "memory",
                   size_units),
       [](config& c, const key_row& row, std::string_view v) {
         c.device_limit = parse_size(row.name, v, true, true, row.accepted);
       },
       [](const config& c) { return c.device_limit.to_string(); }},
      {"host_limit",
       fmt::format("a size such as 64GiB, 1.5GiB or 4096 ({}), a percentage of host memory "
                   "above 0 and at most 100 such as 50%, or 0 for no limit",
                   size_units),
       [](config& c, const key_row& row, std::string_view v) {
         c.host_limit = parse_size(row.name, v, true, true, row.accepted);
       },
       [](const config& c) { return c.host_limit.to_string(); }},
      {"policy", join_names(policy_names()),
       [](config& c, const key_row& row, std::string_view v) {
         c.policy = parse_name(row, v, policy_names());
       },
       [](const config& c) { return std::string(to_string(c.policy)); }},
      {"prefetch", join_names(prefetch_names()),
       [](config& c, const key_row& row, std::string_view v) {
         c.prefetch = parse_name(row, v, prefetch_names());
       },
       [](const config& c) { return std::string(to_string(c.prefetch)); }},
      {"backend", join_names(backend_names()),
       [](config& c, const key_row& row, std::string_view v) {
         c.backend = parse_name(row, v, backend_names());
       },
       [](const config& c) { return std::string(to_string(c.backend)); }},
      {"sim_preset", join_names(sim_preset_list()),
       [](config& c, const key_row& row, std::string_view v) {
         parse_name(row, v, sim_preset_list());
         c.sim_preset = std::string(v);
       },
       [](const config& c) { return c.sim_preset; }},
      {"sim_backing", join_names(sim_backing_names()),
       [](config& c, const key_row& row, std::string_view v) {
         c.sim_backing = parse_name(row, v, sim_backing_names());
       },
       [](const config& c) { return std::string(to_string(c.sim_backing)); }},
      {"trace",
       "a file path for the Chrome trace JSON, without control characters or ',' (leave the "
       "key out for no trace)",
       [](config& c, const key_row& row, std::string_view v) {
         const auto control = std::find_if(v.begin(), v.end(), [](char ch) {
           return static_cast<unsigned char>(ch) < 0x20 || ch == 0x7f;
         });
         if (control != v.end()) {
           throw_config_error(row.name, v, row.accepted,
                              fmt::format("contains the control character 0x{:02x}",
                                          static_cast<unsigned char>(*control)));
         }
         // A ',' could not be read back from to_string's output.
         if (v.find(',') != std::string_view::npos) {
           throw_config_error(row.name, v, row.accepted, "contains ',', which separates items");
         }
         c.trace = std::string(v);
       },
       [](const config& c) { return c.trace; }},
      {"log", join_names(log_names()),
       [](config& c, const key_row& row, std::string_view v) {
         c.log = parse_name(row, v, log_names());
       },
       [](const config& c) { return std::string(to_string(c.log)); }},
      {"nvtx", join_names(bool_names()),
       [](config& c, const key_row& row, std::string_view v) {
         c.nvtx = parse_name(row, v, bool_names());
       },
       [](const config& c) { return std::string(name_of(bool_names(), c.nvtx)); }},
      {"stats", join_names(bool_names()),
       [](config& c, const key_row& row, std::string_view v) {
         c.stats = parse_name(row, v, bool_names());
       },
       [](const config& c) { return std::string(name_of(bool_names(), c.stats)); }},
      {"max_split_size",
       fmt::format("a size of at least 1MiB such as 256MiB or 1.5GiB ({}), or 0 for no limit; "
                   "not a percentage",
                   size_units),
       [](config& c, const key_row& row, std::string_view v) {
         const size_spec s = parse_size(row.name, v, false, true, row.accepted);
         if (!s.is_zero() && s.bytes() < min_split_size) {
           throw_config_error(row.name, v, row.accepted, "below the 1MiB minimum");
         }
         c.max_split_size = s;
       },
       [](const config& c) { return c.max_split_size.to_string(); }},
      {"expandable_segments", join_names(bool_names()),
       [](config& c, const key_row& row, std::string_view v) {
         c.expandable_segments = parse_name(row, v, bool_names());
       },
       [](const config& c) {
         return std::string(name_of(bool_names(), c.expandable_segments));
       }},
  };
  return table;
}

std::string keys_accepted() {
  std::string out = "one of the keys ";
  for (const key_row& row : key_table()) {
    if (&row != &key_table().front()) out += ", ";
    out += row.name;
  }
  return out;
}

std::string items_accepted() {
  return "items of the form key:value separated by ',', without spaces, where the key is " +
         keys_accepted();
}

// The row for `key`; an empty, unknown or space-padded key is an error that names `value`.
const key_row& find_row(std::string_view key, std::string_view value) {
  for (const key_row& row : key_table()) {
    if (row.name == key) return row;
  }
  if (key.empty()) throw_config_error(key, value, keys_accepted(), "empty key");
  std::string_view trimmed = key;
  while (!trimmed.empty() && is_space(trimmed.front())) trimmed.remove_prefix(1);
  while (!trimmed.empty() && is_space(trimmed.back())) trimmed.remove_suffix(1);
  for (const key_row& row : key_table()) {
    if (row.name == trimmed) {
      throw_config_error(key, value, keys_accepted(),
                         fmt::format("whitespace around the key '{}' is not accepted", trimmed));
    }
  }
  std::vector<std::string_view> names;
  for (const key_row& row : key_table()) names.push_back(row.name);
  const std::string_view meant = closest(key, names, 3);
  throw_config_error(key, value, keys_accepted(),
                     meant.empty() ? std::string("unknown key")
                                   : fmt::format("unknown key; did you mean '{}'?", meant));
}

}  // namespace

std::string_view to_string(offload_policy value) noexcept { return name_of(policy_names(), value); }
std::string_view to_string(prefetch_policy value) noexcept {
  return name_of(prefetch_names(), value);
}
std::string_view to_string(backend_kind value) noexcept { return name_of(backend_names(), value); }
std::string_view to_string(sim_backing_kind value) noexcept {
  return name_of(sim_backing_names(), value);
}
std::string_view to_string(log_level value) noexcept { return name_of(log_names(), value); }

void config::set(std::string_view key, std::string_view value) {
  const key_row& row = find_row(key, value);
  if (value.empty()) throw_config_error(key, value, row.accepted, "empty value");
  if (is_space(value.front()) || is_space(value.back())) {
    throw_config_error(key, value, row.accepted, "leading or trailing whitespace is not accepted");
  }
  row.set(*this, row, value);
}

std::string config::get(std::string_view key) const { return find_row(key, {}).get(*this); }

void config::validate() const {
  config scratch;
  for (const key_row& row : key_table()) {
    const std::string value = row.get(*this);
    if (row.name == "trace" && value.empty()) continue;  // empty trace is "off"
    scratch.set(row.name, value);
  }
}

std::string config::to_string() const {
  std::string out;
  for (const key_row& row : key_table()) {
    const std::string value = row.get(*this);
    if (value.empty()) continue;
    if (!out.empty()) out += ',';
    out += fmt::format("{}:{}", row.name, value);
  }
  return out;
}

config parse_config(std::string_view text) {
  config c;
  if (text.empty()) return c;
  // key -> the value first given for it, to report duplicates.
  std::vector<std::pair<std::string_view, std::string_view>> seen;
  std::size_t index = 0;
  std::size_t start = 0;
  while (start <= text.size()) {
    ++index;
    std::size_t end = text.find(',', start);
    if (end == std::string_view::npos) end = text.size();
    const std::string_view item = text.substr(start, end - start);
    start = end + 1;

    if (item.empty()) {
      throw_config_error("", "", items_accepted(),
                         fmt::format("item {} of '{}' is empty (two ',' in a row, or a ',' at "
                                     "either end)",
                                     index, text));
    }
    const std::size_t colon = item.find(':');
    if (colon == std::string_view::npos) {
      const bool blank = std::all_of(item.begin(), item.end(), is_space);
      throw_config_error(item, "", items_accepted(),
                         blank ? fmt::format("item {} is only whitespace", index)
                               : fmt::format("item {} has no ':' between key and value", index));
    }
    const std::string_view key = item.substr(0, colon);
    const std::string_view value = item.substr(colon + 1);
    const key_row& row = find_row(key, value);
    const auto first = std::find_if(seen.begin(), seen.end(),
                                    [&](const auto& entry) { return entry.first == key; });
    if (first != seen.end()) {
      throw_config_error(
          key, value, row.accepted,
          fmt::format("duplicate key: already given as '{}' in the same string", first->second));
    }
    c.set(key, value);
    seen.emplace_back(key, value);
  }
  return c;
}

config config_from_env() {
  // getenv is not synchronised with setenv; gpuswap reads the variable, never writes it.
  const char* text = std::getenv("GPUSWAP_CONF");
  if (text == nullptr) return config{};
  const std::string_view view(text);
  if (std::all_of(view.begin(), view.end(), is_space)) return config{};
  return parse_config(view);
}

std::vector<std::string> config_keys() {
  std::vector<std::string> keys;
  for (const key_row& row : key_table()) keys.emplace_back(row.name);
  return keys;
}

std::vector<std::string> sim_preset_names() {
  std::vector<std::string> names;
  for (const auto& entry : sim_preset_list()) names.emplace_back(entry.first);
  return names;
}

}  // namespace gpuswap
