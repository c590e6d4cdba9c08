#include "core/config.hpp"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <cstdlib>
#include <functional>
#include <optional>
#include <string>
#include <vector>

#include "core/errors.hpp"

namespace gpuswap {
namespace {

using ::testing::ElementsAre;
using ::testing::HasSubstr;

constexpr std::uint64_t mib = std::uint64_t{1} << 20;
constexpr std::uint64_t gib = std::uint64_t{1} << 30;

const std::string all_keys =
    "device_limit, host_limit, policy, prefetch, backend, sim_preset, sim_backing, trace, log, "
    "nvtx, stats, max_split_size, expandable_segments";

TEST(config, defaults) {
  const config c;
  EXPECT_TRUE(c.device_limit.is_zero());
  EXPECT_TRUE(c.host_limit.is_zero());
  EXPECT_EQ(c.policy, offload_policy::auto_);
  EXPECT_EQ(c.prefetch, prefetch_policy::lookahead);
  EXPECT_EQ(c.backend, backend_kind::auto_);
  EXPECT_EQ(c.sim_preset, "h100-pcie5");
  EXPECT_EQ(c.sim_backing, sim_backing_kind::real);
  EXPECT_EQ(c.trace, "");
  EXPECT_EQ(c.log, log_level::warn);
  EXPECT_TRUE(c.nvtx);
  EXPECT_TRUE(c.stats);
  EXPECT_TRUE(c.max_split_size.is_zero());
  EXPECT_TRUE(c.expandable_segments);
  EXPECT_EQ(parse_config(""), c);
  EXPECT_NO_THROW(c.validate());
}

TEST(config, keys_are_listed_in_table_order) {
  EXPECT_THAT(config_keys(), ElementsAre("device_limit", "host_limit", "policy", "prefetch",
                                         "backend", "sim_preset", "sim_backing", "trace", "log",
                                         "nvtx", "stats", "max_split_size",
                                         "expandable_segments"));
  EXPECT_THAT(sim_preset_names(),
              ElementsAre("titan-x-pcie3", "a100-pcie4", "h100-pcie5", "gh200-c2c"));
}

TEST(config, enum_text_forms) {
  EXPECT_EQ(to_string(offload_policy::none), "none");
  EXPECT_EQ(to_string(offload_policy::all), "all");
  EXPECT_EQ(to_string(offload_policy::conv), "conv");
  EXPECT_EQ(to_string(offload_policy::auto_), "auto");
  EXPECT_EQ(to_string(prefetch_policy::lookahead), "lookahead");
  EXPECT_EQ(to_string(prefetch_policy::one_layer), "one_layer");
  EXPECT_EQ(to_string(prefetch_policy::none), "none");
  EXPECT_EQ(to_string(backend_kind::auto_), "auto");
  EXPECT_EQ(to_string(backend_kind::cuda), "cuda");
  EXPECT_EQ(to_string(backend_kind::sim), "sim");
  EXPECT_EQ(to_string(sim_backing_kind::real), "real");
  EXPECT_EQ(to_string(sim_backing_kind::phantom), "phantom");
  EXPECT_EQ(to_string(log_level::debug), "debug");
  EXPECT_EQ(to_string(log_level::info), "info");
  EXPECT_EQ(to_string(log_level::warn), "warn");
  EXPECT_EQ(to_string(log_level::error), "error");
  EXPECT_EQ(to_string(log_level::off), "off");
  EXPECT_EQ(to_string(static_cast<log_level>(42)), "?");
}

struct good_case {
  std::string text;
  std::function<void(config&)> expect;  // turns the defaults into the expected config
};

TEST(config, parses_every_key_and_value_form) {
  const std::vector<good_case> cases{
      {"device_limit:8GiB", [](config& c) { c.device_limit = size_spec::from_bytes(8 * gib); }},
      {"device_limit:1.5GiB",
       [](config& c) { c.device_limit = size_spec::from_bytes(gib + gib / 2); }},
      {"device_limit:0", [](config&) {}},
      {"device_limit:90%",
       [](config& c) { c.device_limit = parse_size("device_limit", "90%", true, true); }},
      {"host_limit:64GiB", [](config& c) { c.host_limit = size_spec::from_bytes(64 * gib); }},
      {"host_limit:12.5%",
       [](config& c) { c.host_limit = parse_size("host_limit", "12.5%", true, true); }},
      {"policy:none", [](config& c) { c.policy = offload_policy::none; }},
      {"policy:all", [](config& c) { c.policy = offload_policy::all; }},
      {"policy:conv", [](config& c) { c.policy = offload_policy::conv; }},
      {"policy:auto", [](config& c) { c.policy = offload_policy::auto_; }},
      {"prefetch:lookahead", [](config& c) { c.prefetch = prefetch_policy::lookahead; }},
      {"prefetch:one_layer", [](config& c) { c.prefetch = prefetch_policy::one_layer; }},
      {"prefetch:none", [](config& c) { c.prefetch = prefetch_policy::none; }},
      {"backend:auto", [](config& c) { c.backend = backend_kind::auto_; }},
      {"backend:cuda", [](config& c) { c.backend = backend_kind::cuda; }},
      {"backend:sim", [](config& c) { c.backend = backend_kind::sim; }},
      {"sim_preset:titan-x-pcie3", [](config& c) { c.sim_preset = "titan-x-pcie3"; }},
      {"sim_preset:a100-pcie4", [](config& c) { c.sim_preset = "a100-pcie4"; }},
      {"sim_preset:h100-pcie5", [](config& c) { c.sim_preset = "h100-pcie5"; }},
      {"sim_preset:gh200-c2c", [](config& c) { c.sim_preset = "gh200-c2c"; }},
      {"sim_backing:real", [](config& c) { c.sim_backing = sim_backing_kind::real; }},
      {"sim_backing:phantom", [](config& c) { c.sim_backing = sim_backing_kind::phantom; }},
      {"trace:run.json", [](config& c) { c.trace = "run.json"; }},
      {"trace:/tmp/my run.json", [](config& c) { c.trace = "/tmp/my run.json"; }},
      {"trace:a:b.json", [](config& c) { c.trace = "a:b.json"; }},  // split at the first ':'
      {"log:debug", [](config& c) { c.log = log_level::debug; }},
      {"log:info", [](config& c) { c.log = log_level::info; }},
      {"log:warn", [](config& c) { c.log = log_level::warn; }},
      {"log:error", [](config& c) { c.log = log_level::error; }},
      {"log:off", [](config& c) { c.log = log_level::off; }},
      {"nvtx:true", [](config& c) { c.nvtx = true; }},
      {"nvtx:false", [](config& c) { c.nvtx = false; }},
      {"nvtx:1", [](config& c) { c.nvtx = true; }},
      {"nvtx:0", [](config& c) { c.nvtx = false; }},
      {"nvtx:yes", [](config& c) { c.nvtx = true; }},
      {"nvtx:no", [](config& c) { c.nvtx = false; }},
      {"nvtx:on", [](config& c) { c.nvtx = true; }},
      {"nvtx:off", [](config& c) { c.nvtx = false; }},
      {"stats:off", [](config& c) { c.stats = false; }},
      {"stats:yes", [](config& c) { c.stats = true; }},
      {"expandable_segments:true", [](config&) {}},
      {"expandable_segments:off", [](config& c) { c.expandable_segments = false; }},
      {"max_split_size:0", [](config&) {}},
      {"max_split_size:1MiB", [](config& c) { c.max_split_size = size_spec::from_bytes(mib); }},
      {"max_split_size:1048576", [](config& c) { c.max_split_size = size_spec::from_bytes(mib); }},
      {"max_split_size:256MiB",
       [](config& c) { c.max_split_size = size_spec::from_bytes(256 * mib); }},
      {"device_limit:8GiB,host_limit:64GiB,policy:auto,trace:run.json,log:info",
       [](config& c) {
         c.device_limit = size_spec::from_bytes(8 * gib);
         c.host_limit = size_spec::from_bytes(64 * gib);
         c.trace = "run.json";
         c.log = log_level::info;
       }},
  };
  for (const good_case& gc : cases) {
    SCOPED_TRACE(gc.text);
    config expected;
    gc.expect(expected);
    const config parsed = parse_config(gc.text);
    EXPECT_EQ(parsed, expected);
    EXPECT_NO_THROW(parsed.validate());
    // The C++ API path: config::set gives the same result for single items.
    if (gc.text.find(',') == std::string::npos) {
      config set_by_api;
      const auto colon = gc.text.find(':');
      set_by_api.set(gc.text.substr(0, colon), gc.text.substr(colon + 1));
      EXPECT_EQ(set_by_api, expected);
    }
  }
}

TEST(config, to_string_round_trips) {
  std::vector<config> configs(3);
  configs[1] = parse_config(
      "device_limit:90%,host_limit:1.5GiB,policy:conv,prefetch:one_layer,"
      "backend:sim,sim_preset:gh200-c2c,sim_backing:phantom,"
      "trace:/tmp/x y.json,log:off,nvtx:no,stats:0,max_split_size:3MiB,"
      "expandable_segments:false");
  configs[2].device_limit = size_spec::from_bytes(4097);
  configs[2].host_limit = parse_size("host_limit", "33.3%", true, true);
  configs[2].max_split_size = size_spec::from_bytes(mib + 1);
  configs[2].trace = "a:b";
  for (const config& c : configs) {
    const std::string text = c.to_string();
    SCOPED_TRACE(text);
    EXPECT_EQ(parse_config(text), c);
  }
  EXPECT_EQ(config{}.to_string(),
            "device_limit:0,host_limit:0,policy:auto,prefetch:lookahead,backend:auto,"
            "sim_preset:h100-pcie5,sim_backing:real,log:warn,nvtx:true,stats:true,"
            "max_split_size:0,expandable_segments:true");
  EXPECT_EQ(configs[1].get("host_limit"), "1.5GiB");
  EXPECT_EQ(configs[1].get("trace"), "/tmp/x y.json");
  EXPECT_EQ(configs[1].get("nvtx"), "false");
}

TEST(config, set_overrides_but_a_string_may_not_repeat_a_key) {
  config c;
  c.set("policy", "all");
  c.set("policy", "none");
  EXPECT_EQ(c.policy, offload_policy::none);
  EXPECT_THROW(parse_config("policy:all,policy:all"), config_error);
}

struct bad_case {
  std::string text;
  std::string key;       // as the error reports it
  std::string value;     // as the error reports it
  std::string accepted;  // a substring of the accepted forms
  std::string problem;   // a substring of the problem
};

std::vector<bad_case> bad_cases() {
  return {
      // keys
      {"device_limt:8GiB", "device_limt", "8GiB", all_keys, "did you mean 'device_limit'?"},
      {"polcy:all", "polcy", "all", all_keys, "did you mean 'policy'?"},
      {"plociy:all", "plociy", "all", all_keys, "did you mean 'policy'?"},
      {"Policy:all", "Policy", "all", all_keys, "did you mean 'policy'?"},
      {"max-split-size:1GiB", "max-split-size", "1GiB", all_keys, "did you mean 'max_split_size'?"},
      {"nvtxx:on", "nvtxx", "on", all_keys, "did you mean 'nvtx'?"},
      {"xyzzyplugh:1", "xyzzyplugh", "1", all_keys, "unknown key"},
      {":all", "", "all", all_keys, "empty key"},
      // items
      {"policyall", "policyall", "", all_keys, "no ':'"},
      {"policy:all,log", "log", "", all_keys, "item 2 has no ':'"},
      {"policy:all,,log:info", "", "", all_keys, "item 2 of 'policy:all,,log:info' is empty"},
      {"policy:all,", "", "", all_keys, "is empty"},
      {",policy:all", "", "", all_keys, "item 1"},
      {",", "", "", all_keys, "is empty"},
      {" ", " ", "", all_keys, "only whitespace"},
      {"policy:all, ,log:info", " ", "", all_keys, "only whitespace"},
      {"policy:all,policy:none", "policy", "none", "none, all, conv or auto",
       "duplicate key: already given as 'all'"},
      {"log:info,nvtx:on,log:info", "log", "info", "debug, info, warn, error or off",
       "duplicate key"},
      // whitespace
      {" policy:all", " policy", "all", all_keys, "whitespace around the key 'policy'"},
      {"policy :all", "policy ", "all", all_keys, "whitespace around the key 'policy'"},
      {"policy:all, log:info", " log", "info", all_keys, "whitespace around the key 'log'"},
      {"policy: all", "policy", " all", "none, all, conv or auto", "leading or trailing"},
      {"policy:all ", "policy", "all ", "none, all, conv or auto", "leading or trailing"},
      {"trace: run.json", "trace", " run.json", "file path", "leading or trailing"},
      {"device_limit:8 GiB", "device_limit", "8 GiB", "KiB, MiB, GiB, TiB", "whitespace"},
      // empty values
      {"policy:", "policy", "", "none, all, conv or auto", "empty value"},
      {"trace:", "trace", "", "file path", "empty value"},
      {"device_limit:", "device_limit", "", "percentage of device memory", "empty value"},
      // enums and booleans
      {"policy:fast", "policy", "fast", "none, all, conv or auto", "not one of"},
      {"policy:Auto", "policy", "Auto", "none, all, conv or auto", "lower case"},
      {"policy:AUTO", "policy", "AUTO", "none, all, conv or auto", "did you mean 'auto'?"},
      {"prefetch:one-layer", "prefetch", "one-layer", "lookahead, one_layer or none",
       "did you mean 'one_layer'?"},
      {"backend:gpu", "backend", "gpu", "auto, cuda or sim", "not one of"},
      {"sim_preset:h100", "sim_preset", "h100",
       "titan-x-pcie3, a100-pcie4, h100-pcie5 or gh200-c2c", "not one of"},
      {"sim_preset:h100-pcie", "sim_preset", "h100-pcie", "gh200-c2c",
       "did you mean 'h100-pcie5'?"},
      {"sim_backing:fake", "sim_backing", "fake", "real or phantom", "not one of"},
      {"log:verbose", "log", "verbose", "debug, info, warn, error or off", "not one of"},
      {"log:WARN", "log", "WARN", "debug, info, warn, error or off", "lower case"},
      {"nvtx:True", "nvtx", "True", "true, false, 1, 0, yes, no, on or off", "lower case"},
      {"nvtx:2", "nvtx", "2", "true, false, 1, 0, yes, no, on or off", "not one of"},
      {"stats:enabled", "stats", "enabled", "true, false, 1, 0, yes, no, on or off", "not one of"},
      // trace
      {"trace:run\x01.json", "trace", "run\x01.json", "without control characters",
       "control character 0x01"},
      {"trace:a\tb", "trace", "a\tb", "without control characters", "control character 0x09"},
      {"trace:a\x7f", "trace", "a\x7f", "without control characters", "control character 0x7f"},
      // sizes
      {"device_limit:8GB", "device_limit", "8GB", "percentage of device memory",
       "did you mean 'GiB'?"},
      {"device_limit:101%", "device_limit", "101%", "or 0 for no limit", "at most 100"},
      {"device_limit:0%", "device_limit", "0%", "percentage", "above 0"},
      {"host_limit:-1GiB", "host_limit", "-1GiB", "percentage of host memory", "negative"},
      {"host_limit:16777216TiB", "host_limit", "16777216TiB", "host memory", "too large"},
      {"host_limit:lots", "host_limit", "lots", "host memory", "not a number"},
      {"max_split_size:512KiB", "max_split_size", "512KiB", "at least 1MiB",
       "below the 1MiB minimum"},
      {"max_split_size:1048575", "max_split_size", "1048575", "at least 1MiB", "minimum"},
      {"max_split_size:50%", "max_split_size", "50%", "at least 1MiB",
       "percentage is not accepted"},
      {"max_split_size:0.5B", "max_split_size", "0.5B", "at least 1MiB", "rounds down"},
  };
}

void expect_config_error(const std::function<void()>& action, const bad_case& c) {
  try {
    action();
    ADD_FAILURE() << "accepted";
  } catch (const config_error& e) {
    EXPECT_EQ(e.key(), c.key);
    EXPECT_EQ(e.value(), c.value);
    const std::string message = e.what();
    EXPECT_THAT(message, HasSubstr("key '" + c.key + "'"));
    EXPECT_THAT(message, HasSubstr("value '" + c.value + "'"));
    EXPECT_THAT(message, HasSubstr("accepted: "));
    EXPECT_THAT(message, HasSubstr(c.accepted));
    EXPECT_THAT(message, HasSubstr(c.problem));
  }
}

TEST(config, rejects_bad_strings_naming_key_value_and_accepted_forms) {
  for (const bad_case& c : bad_cases()) {
    SCOPED_TRACE("'" + c.text + "'");
    expect_config_error([&] { parse_config(c.text); }, c);
  }
}

TEST(config, set_rejects_what_parse_config_rejects) {
  for (const bad_case& c : bad_cases()) {
    // Structural errors (items, duplicates) belong to the string form only.
    const auto colon = c.text.find(':');
    if (colon == std::string::npos || c.text.find(',') != std::string::npos) continue;
    SCOPED_TRACE("'" + c.text + "'");
    config target;
    expect_config_error([&] { target.set(c.text.substr(0, colon), c.text.substr(colon + 1)); }, c);
    EXPECT_EQ(target, config{});  // a rejected value changes nothing
  }
}

TEST(config, set_rejects_a_comma_in_a_trace_path) {
  config c;
  expect_config_error([&] { c.set("trace", "a,b.json"); },
                      {"", "trace", "a,b.json", "file path", "contains ','"});
}

TEST(config, no_suggestion_beyond_three_edits) {
  try {
    parse_config("zzzzzzzzzzz:1");
    ADD_FAILURE() << "accepted";
  } catch (const config_error& e) {
    EXPECT_THAT(e.what(), ::testing::Not(HasSubstr("did you mean")));
  }
}

TEST(config, validate_checks_fields_assigned_directly) {
  const std::vector<std::pair<std::string, std::function<void(config&)>>> cases{
      {"max_split_size", [](config& c) { c.max_split_size = size_spec::from_bytes(1000); }},
      {"max_split_size",
       [](config& c) { c.max_split_size = parse_size("max_split_size", "50%", true, true); }},
      {"sim_preset", [](config& c) { c.sim_preset = "rtx-4090"; }},
      {"trace", [](config& c) { c.trace = "a\nb"; }},
      {"trace", [](config& c) { c.trace = " run.json"; }},
      {"policy", [](config& c) { c.policy = static_cast<offload_policy>(42); }},
      {"log", [](config& c) { c.log = static_cast<log_level>(-1); }},
  };
  for (const auto& [key, mutate] : cases) {
    SCOPED_TRACE(key);
    config c;
    mutate(c);
    try {
      c.validate();
      ADD_FAILURE() << "accepted";
    } catch (const config_error& e) {
      EXPECT_EQ(e.key(), key);
    }
  }
  config good;
  good.max_split_size = size_spec::from_bytes(mib);
  good.trace = "ok.json";
  EXPECT_NO_THROW(good.validate());
}

TEST(config, get_rejects_unknown_keys) {
  EXPECT_THROW(static_cast<void>(config{}.get("polcy")), config_error);
}

// Sets GPUSWAP_CONF for one scope and puts back what was there.
class env_guard {
 public:
  explicit env_guard(const char* value) {
    if (const char* old = std::getenv("GPUSWAP_CONF")) old_ = old;
    if (value == nullptr) {
      ::unsetenv("GPUSWAP_CONF");
    } else {
      ::setenv("GPUSWAP_CONF", value, 1);
    }
  }
  ~env_guard() {
    if (old_) {
      ::setenv("GPUSWAP_CONF", old_->c_str(), 1);
    } else {
      ::unsetenv("GPUSWAP_CONF");
    }
  }
  env_guard(const env_guard&) = delete;
  env_guard& operator=(const env_guard&) = delete;

 private:
  std::optional<std::string> old_;
};

TEST(config, from_env) {
  for (const char* blank : {static_cast<const char*>(nullptr), "", " ", " \t\n "}) {
    SCOPED_TRACE(blank == nullptr ? "unset" : "blank");
    const env_guard guard(blank);
    EXPECT_EQ(config_from_env(), config{});
  }
  {
    const env_guard guard("policy:all,device_limit:50%,log:debug");
    const config c = config_from_env();
    EXPECT_EQ(c.policy, offload_policy::all);
    EXPECT_EQ(c.device_limit.resolve(1000), 500u);
    EXPECT_EQ(c.log, log_level::debug);
  }
  {
    const env_guard guard(" policy:all");  // whitespace is only forgiven when it is all there is
    EXPECT_THROW(config_from_env(), config_error);
  }
  {
    const env_guard guard("device_limt:1GiB");
    try {
      config_from_env();
      ADD_FAILURE() << "accepted";
    } catch (const config_error& e) {
      EXPECT_THAT(e.what(), HasSubstr("did you mean 'device_limit'?"));
    }
  }
}

}  // namespace
}  // namespace gpuswap
