#include "profiler/nvtx_ranges.hpp"

#if defined(GPUSWAP_WITH_NVTX) && GPUSWAP_WITH_NVTX
#include <unistd.h>

#include <nvtx3/nvToolsExt.h>
#include <nvtx3/nvToolsExtPayload.h>

#include "profiler/nvtx_registry.hpp"

namespace gpuswap {

// Note [Extended payload]
// An NVTX event has one payload slot. The byte count goes there as a plain uint64, which every
// Nsight version shows and exports. A swap also has a buffer id and a layer; putting them in the
// message would make every swap a differently named range and break Nsight's per-name summary
// (nvtx_sum would list "swap_out b17" once per buffer). So when the caller gives a buffer or a
// layer and the attached tool implements NVTX's payload extension (it gave our
// nvtx_buffer_payload schema an id), the event carries that struct as an extended payload
// instead: bytes, buffer_id and layer as named fields, the name stays "swap_out". A tool without
// the extension (or none) gets the plain byte count. The struct and its descriptor live on the
// stack: a tool copies what it keeps before the push/mark call returns.

namespace detail {

namespace {

nvtxEventAttributes_t base_attributes(const nvtx_registry& r, nvtx_category category,
                                      nvtx_name name) noexcept {
  nvtxEventAttributes_t a{};
  a.version = NVTX_VERSION;
  a.size = NVTX_EVENT_ATTRIB_STRUCT_SIZE;
  a.category = nvtx_category_id(category);
  a.colorType = NVTX_COLOR_ARGB;
  a.color = nvtx_color(category);
  a.messageType = NVTX_MESSAGE_TYPE_REGISTERED;
  a.message.registered = r.name(name);
  return a;
}

// The payload of a buffer event; `ext` and `data` must outlive the NVTX call using `a`.
void set_buffer_payload(const nvtx_registry& r, nvtxEventAttributes_t& a, std::uint64_t bytes,
                        std::uint64_t buffer_id, std::int32_t layer, nvtx_buffer_payload& ext,
                        nvtxPayloadData_t& data) noexcept {
  const bool has_ids = buffer_id != nvtx_no_buffer || layer != nvtx_no_layer;
  if (has_ids && r.buffer_schema_id != 0) {
    ext = nvtx_buffer_payload{bytes, buffer_id, layer};
    data = nvtxPayloadData_t{r.buffer_schema_id, sizeof ext, &ext};
    a.payloadType = NVTX_PAYLOAD_TYPE_EXT;
    a.reserved0 = 1;  // number of nvtxPayloadData_t entries, by the extension's convention
    a.payload.ullValue = NVTX_POINTER_AS_PAYLOAD_ULLVALUE(&data);
  } else {
    a.payloadType = NVTX_PAYLOAD_TYPE_UNSIGNED_INT64;
    a.payload.ullValue = bytes;
  }
}

}  // namespace

void nvtx_push(nvtx_category category, nvtx_name name, std::uint64_t bytes,
               std::uint64_t buffer_id, std::int32_t layer) noexcept {
  const nvtx_registry& r = get_nvtx_registry();
  nvtxEventAttributes_t a = base_attributes(r, category, name);
  nvtx_buffer_payload ext;
  nvtxPayloadData_t data;
  set_buffer_payload(r, a, bytes, buffer_id, layer, ext, data);
  nvtxDomainRangePushEx(r.domain, &a);
}

void nvtx_push_layer(nvtx_phase phase, std::int32_t layer) noexcept {
  const nvtx_registry& r = get_nvtx_registry();
  nvtxEventAttributes_t a = base_attributes(r, nvtx_category::layer, phase_name(phase));
  a.payloadType = NVTX_PAYLOAD_TYPE_INT32;
  a.payload.iValue = layer;
  nvtxDomainRangePushEx(r.domain, &a);
}

void nvtx_push_iteration(std::uint64_t iteration) noexcept {
  const nvtx_registry& r = get_nvtx_registry();
  nvtxEventAttributes_t a = base_attributes(r, nvtx_category::iteration, nvtx_name::iteration);
  a.payloadType = NVTX_PAYLOAD_TYPE_UNSIGNED_INT64;
  a.payload.ullValue = iteration;
  nvtxDomainRangePushEx(r.domain, &a);
}

void nvtx_pop() noexcept { nvtxDomainRangePop(get_nvtx_registry().domain); }

void nvtx_mark(nvtx_category category, nvtx_name name, std::uint64_t bytes,
               std::uint64_t buffer_id, std::int32_t layer) noexcept {
  const nvtx_registry& r = get_nvtx_registry();
  nvtxEventAttributes_t a = base_attributes(r, category, name);
  nvtx_buffer_payload ext;
  nvtxPayloadData_t data;
  set_buffer_payload(r, a, bytes, buffer_id, layer, ext, data);
  nvtxDomainMarkEx(r.domain, &a);
}

void nvtx_mark_message(nvtx_category category, const char* message,
                       std::uint64_t bytes) noexcept {
  const nvtx_registry& r = get_nvtx_registry();
  nvtxEventAttributes_t a = base_attributes(r, category, nvtx_name::alloc);
  a.messageType = NVTX_MESSAGE_TYPE_ASCII;
  a.message.ascii = message != nullptr ? message : "";
  a.payloadType = NVTX_PAYLOAD_TYPE_UNSIGNED_INT64;
  a.payload.ullValue = bytes;
  nvtxDomainMarkEx(r.domain, &a);
}

void nvtx_name_thread(const char* name) noexcept {
  nvtxNameOsThreadA(static_cast<std::uint32_t>(::gettid()), name != nullptr ? name : "");
}

}  // namespace detail
}  // namespace gpuswap
#endif
