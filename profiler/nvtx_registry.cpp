#include "profiler/nvtx_registry.hpp"

#if defined(GPUSWAP_WITH_NVTX) && GPUSWAP_WITH_NVTX
#include <cstddef>
#include <string>

#include <nvtx3/nvToolsExtPayload.h>
#include <nvtx3/nvtx3.hpp>

namespace gpuswap {

namespace {

nvtx_registry make_registry() noexcept {
  nvtx_registry r;
  // Through nvtx3 so that code annotating with nvtx3::scoped_range_in<nvtx_domain_tag> shares
  // the one domain handle.
  r.domain = nvtx3::domain::get<nvtx_domain_tag>();

  for (std::uint32_t id = 1; id <= nvtx_category_count; ++id) {
    const auto c = static_cast<nvtx_category>(id);
    // to_string's views are literals, hence NUL-terminated.
    nvtxDomainNameCategoryA(r.domain, id, to_string(c).data());
  }
  for (std::size_t i = 0; i < nvtx_name_count; ++i) {
    r.names[i] = nvtxDomainRegisterStringA(r.domain, to_string(static_cast<nvtx_name>(i)).data());
  }

  static constexpr nvtxPayloadSchemaEntry_t entries[] = {
      {0, NVTX_PAYLOAD_ENTRY_TYPE_UINT64, "bytes", "bytes moved or allocated", 0,
       offsetof(nvtx_buffer_payload, bytes), nullptr, nullptr},
      {0, NVTX_PAYLOAD_ENTRY_TYPE_UINT64, "buffer_id", "virtual buffer id (all ones: none)", 0,
       offsetof(nvtx_buffer_payload, buffer_id), nullptr, nullptr},
      {0, NVTX_PAYLOAD_ENTRY_TYPE_INT32, "layer", "layer index (-1: none)", 0,
       offsetof(nvtx_buffer_payload, layer), nullptr, nullptr},
  };
  nvtxPayloadSchemaAttr_t schema{};
  schema.fieldMask = NVTX_PAYLOAD_SCHEMA_ATTR_FIELD_NAME | NVTX_PAYLOAD_SCHEMA_ATTR_FIELD_TYPE |
                     NVTX_PAYLOAD_SCHEMA_ATTR_FIELD_ENTRIES |
                     NVTX_PAYLOAD_SCHEMA_ATTR_FIELD_NUM_ENTRIES |
                     NVTX_PAYLOAD_SCHEMA_ATTR_FIELD_STATIC_SIZE;
  schema.name = "gpuswap_buffer";
  schema.type = NVTX_PAYLOAD_SCHEMA_TYPE_STATIC;
  schema.entries = entries;
  schema.numEntries = std::size(entries);
  schema.payloadStaticSize = sizeof(nvtx_buffer_payload);
  r.buffer_schema_id = nvtxPayloadSchemaRegister(r.domain, &schema);
  return r;
}

}  // namespace

const nvtx_registry& get_nvtx_registry() noexcept {
  static const nvtx_registry registry = make_registry();
  return registry;
}

}  // namespace gpuswap
#endif
