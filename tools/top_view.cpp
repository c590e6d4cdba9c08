#include "tools/top_view.hpp"

#include <time.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstddef>
#include <cstring>
#include <string_view>

#include <fmt/format.h>

#include "core/human_bytes.hpp"

namespace gpuswap {

namespace {

std::uint64_t realtime_now_ns() noexcept {
  timespec now{};
  ::clock_gettime(CLOCK_REALTIME, &now);
  return static_cast<std::uint64_t>(now.tv_sec) * 1'000'000'000ULL +
         static_cast<std::uint64_t>(now.tv_nsec);
}

std::string human_rate(double bytes_per_s) {
  if (!std::isfinite(bytes_per_s) || bytes_per_s <= 0.0) return "0 B/s";
  // Clamped below 2^63 so the conversion cannot overflow; no link comes near.
  return human_bytes(static_cast<std::size_t>(std::llround(std::min(bytes_per_s, 9.2e18)))) + "/s";
}

// Printable ASCII only: the name goes to a terminal, and nlohmann::json refuses to dump a
// string that is not UTF-8. The reader sanitises already; this covers snapshots made elsewhere.
std::string printable(std::string_view text) {
  std::string out(text);
  for (char& c : out) {
    if (static_cast<unsigned char>(c) < 0x20 || static_cast<unsigned char>(c) >= 0x7f) c = '?';
  }
  return out;
}

std::string human_duration_ns(std::uint64_t ns) {
  const double value = static_cast<double>(ns);
  if (ns == 0) return "0 s";
  if (ns < 1'000) return fmt::format("{} ns", ns);
  if (ns < 1'000'000) return fmt::format("{:.1f} us", value / 1e3);
  if (ns < 1'000'000'000) return fmt::format("{:.1f} ms", value / 1e6);
  if (ns < 3'600'000'000'000ULL) return fmt::format("{:.2f} s", value / 1e9);
  const std::uint64_t minutes = ns / 60'000'000'000ULL;
  return fmt::format("{}h{:02}m", minutes / 60, minutes % 60);
}

// Time since the last update; a clock that went back reads as "now".
double age_seconds(const live_figures& f, std::uint64_t now_ns) {
  if (f.last_update_ns == 0 || now_ns <= f.last_update_ns) return 0.0;
  return static_cast<double>(now_ns - f.last_update_ns) / 1e9;
}

std::string human_age(double seconds) {
  if (seconds < 60.0) return fmt::format("{:.1f}s", seconds);
  if (seconds < 3600.0) return fmt::format("{:.0f}m", std::floor(seconds / 60.0));
  return fmt::format("{:.0f}h", std::floor(seconds / 3600.0));
}

constexpr std::size_t column_count = 13;
using row = std::array<std::string, column_count>;
constexpr std::array<std::string_view, column_count> headers = {
    "PID",   "DEVICE", "BUDGET", "ALLOCATED", "RESERVED", "SWAPPED", "IN FLIGHT",
    "STALL", "D2H",    "H2D",    "PINNED",    "UPDATED",  "STATE"};
// Text columns are left-aligned, figures right-aligned.
constexpr std::array<bool, column_count> left_aligned = {
    false, true, false, false, false, false, false, false, false, false, false, false, true};

row make_row(const live_snapshot& s, std::uint64_t now_ns) {
  row r;
  r.fill("-");
  r[0] = std::to_string(s.pid);
  r[12] = std::string(to_string(s.status));
  if (!s.has_figures()) return r;
  const live_figures& f = s.figures;
  const std::string_view device(f.device_name, strnlen(f.device_name, sizeof f.device_name));
  r[1] = device.empty() ? fmt::format("#{}", f.device_index) : printable(device.substr(0, 24));
  r[2] = f.budget_bytes == 0 ? "none" : human_bytes(f.budget_bytes);
  r[3] = human_bytes(f.allocated_bytes);
  r[4] = human_bytes(f.reserved_bytes);
  r[5] = human_bytes(f.swapped_out_bytes);
  r[6] = human_bytes(f.in_flight_bytes);
  r[7] = fmt::format("{} ({})", human_duration_ns(f.stall_ns_total), f.stall_count);
  r[8] = human_rate(f.bandwidth_out_bytes_per_s);
  r[9] = human_rate(f.bandwidth_in_bytes_per_s);
  r[10] = fmt::format("{} / {}", human_bytes(f.pinned_host_used_bytes),
                      f.pinned_host_limit_bytes == 0 ? std::string("none")
                                                     : human_bytes(f.pinned_host_limit_bytes));
  r[11] = human_age(age_seconds(f, now_ns));
  return r;
}

}  // namespace

std::string format_top_table(const std::vector<live_snapshot>& snapshots,
                             std::uint64_t now_realtime_ns) {
  if (snapshots.empty()) {
    return "no gpuswap process of this user is publishing live statistics\n";
  }
  const std::uint64_t now_ns = now_realtime_ns != 0 ? now_realtime_ns : realtime_now_ns();
  std::vector<row> rows;
  rows.reserve(snapshots.size());
  for (const auto& s : snapshots) rows.push_back(make_row(s, now_ns));

  std::array<std::size_t, column_count> widths{};
  for (std::size_t c = 0; c < column_count; ++c) {
    widths[c] = headers[c].size();
    for (const auto& r : rows) widths[c] = std::max(widths[c], r[c].size());
  }
  std::string out;
  const auto append_row = [&](const auto& cells) {
    std::string line;
    for (std::size_t c = 0; c < column_count; ++c) {
      if (c > 0) line += "  ";
      const std::string_view cell(cells[c]);
      const std::string padding(widths[c] - cell.size(), ' ');
      if (left_aligned[c]) {
        line += cell;
        if (c + 1 < column_count) line += padding;
      } else {
        line += padding;
        line += cell;
      }
    }
    out += line;
    out += '\n';
  };
  append_row(headers);
  for (const auto& r : rows) append_row(r);

  for (const auto& s : snapshots) {
    if (!s.problem.empty())
      out += fmt::format("pid {}: {}: {}\n", s.pid, to_string(s.status), s.problem);
  }
  return out;
}

nlohmann::json top_json(const std::vector<live_snapshot>& snapshots,
                        std::uint64_t now_realtime_ns) {
  const std::uint64_t now_ns = now_realtime_ns != 0 ? now_realtime_ns : realtime_now_ns();
  nlohmann::json processes = nlohmann::json::array();
  for (const auto& s : snapshots) {
    nlohmann::json p = {
        {"pid", s.pid},
        {"segment", s.segment_name},
        {"status", std::string(to_string(s.status))},
    };
    if (!s.problem.empty()) p["problem"] = s.problem;
    if (s.has_figures()) {
      const live_figures& f = s.figures;
      p["device"] =
          printable(std::string_view(f.device_name, strnlen(f.device_name, sizeof f.device_name)));
      p["device_index"] = f.device_index;
      p["budget_bytes"] = f.budget_bytes;
      p["allocated_bytes"] = f.allocated_bytes;
      p["reserved_bytes"] = f.reserved_bytes;
      p["swapped_out_bytes"] = f.swapped_out_bytes;
      p["in_flight_bytes"] = f.in_flight_bytes;
      p["bytes_out_total"] = f.bytes_out_total;
      p["bytes_in_total"] = f.bytes_in_total;
      p["stall_ns"] = f.stall_ns_total;
      p["stall_count"] = f.stall_count;
      p["bandwidth_out_bytes_per_s"] = f.bandwidth_out_bytes_per_s;
      p["bandwidth_in_bytes_per_s"] = f.bandwidth_in_bytes_per_s;
      p["pinned_host_used_bytes"] = f.pinned_host_used_bytes;
      p["pinned_host_limit_bytes"] = f.pinned_host_limit_bytes;
      p["start_time_ns"] = f.start_time_ns;
      p["last_update_ns"] = f.last_update_ns;
      p["heartbeat"] = f.heartbeat;
      p["age_s"] = age_seconds(f, now_ns);
    }
    processes.push_back(std::move(p));
  }
  return {
      {"time_ns", now_ns},
      {"count", snapshots.size()},
      {"processes", std::move(processes)},
  };
}

}  // namespace gpuswap
