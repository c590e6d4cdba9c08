#pragma once
#include <cstddef>
#include <string>

namespace gpuswap {

// "1.50 GiB": binary units with two decimals, exact bytes below 1 KiB. Every report and
// error message that shows a size to a person uses it, so figures read the same everywhere.
std::string human_bytes(std::size_t bytes);

}  // namespace gpuswap
