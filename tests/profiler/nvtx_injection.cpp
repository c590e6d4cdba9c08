// gpuswap_nvtx_injection: a minimal NVTX tool for tests, loaded the way Nsight Systems is: NVTX
// dlopen()s the library named by NVTX_INJECTION64_PATH at the process's first NVTX call and calls
// InitializeInjectionNvtx2 (core API) and InitializeInjectionNvtxExtension (once per extension
// module: memory, payload). The tool fills NVTX's function slots with recorders that append one
// JSON object per call to an in-process log, and keeps a model of the memory heaps and regions
// so that unbalanced or out-of-bounds memory annotations show up as "error" entries.
//
// The test reads the log back through the C functions at the bottom (it dlopen()s this same
// library with RTLD_NOLOAD, which also proves NVTX loaded it).
//
// Environment: GPUSWAP_NVTX_INJECTION_CORE_ONLY=1 makes the tool decline every extension
// module, like a tool that predates them (read at core initialisation).
#define NVTX_NO_IMPL
#include <nvtx3/nvToolsExt.h>
#include <nvtx3/nvToolsExtMem.h>
#include <nvtx3/nvToolsExtPayload.h>
#include <unistd.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <map>
#include <mutex>
#include <string>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>

#define GPUSWAP_NVTX_EXPORT extern "C" __attribute__((visibility("default")))

namespace {

using json = nlohmann::json;

struct domain_rec {
  std::string name;
};
struct string_rec {
  std::string text;
};
struct schema_entry {
  std::string name;
  std::uint64_t type = 0;
  std::uint64_t offset = 0;
};
struct schema_rec {
  std::string name;
  std::vector<schema_entry> entries;
  std::size_t static_size = 0;
};
struct heap_rec {
  std::uint64_t id = 0;
  std::uintptr_t base = 0;
  std::size_t size = 0;
  bool live = true;
  std::map<std::uintptr_t, std::size_t> regions;  // start -> size
};

// Guards every global below. The tool never calls back into NVTX while holding it.
std::mutex g_mutex;
std::vector<json> g_log;
std::deque<domain_rec> g_domains;  // deque: stable addresses, which are the handles we return
std::deque<string_rec> g_strings;
std::map<std::pair<const domain_rec*, std::uint32_t>, std::string> g_categories;
std::map<std::uint64_t, schema_rec> g_schemas;
std::uint64_t g_next_schema_id = NVTX_PAYLOAD_SCHEMA_ID_DYNAMIC_START;
std::deque<heap_rec> g_heaps;
bool g_core_only = false;

// The messages of this thread's open push/pop ranges, per domain (nullptr: the global domain).
thread_local std::map<const domain_rec*, std::vector<std::string>> t_stacks;

const domain_rec* as_domain(nvtxDomainHandle_t h) {
  return reinterpret_cast<const domain_rec*>(h);
}
std::string domain_name(const domain_rec* d) { return d != nullptr ? d->name : std::string{}; }
std::uintptr_t addr(const void* p) { return reinterpret_cast<std::uintptr_t>(p); }

void log(json entry) {
  entry["thread"] = static_cast<std::int64_t>(::gettid());
  g_log.push_back(std::move(entry));
}
void log_error(std::string what) { log(json{{"call", "error"}, {"what", std::move(what)}}); }

std::string message_of(int32_t type, const nvtxMessageValue_t& m) {
  switch (type) {
    case NVTX_MESSAGE_TYPE_ASCII: return m.ascii != nullptr ? m.ascii : "";
    case NVTX_MESSAGE_TYPE_REGISTERED:
      return m.registered != nullptr ? reinterpret_cast<const string_rec*>(m.registered)->text
                                     : "";
    case NVTX_MESSAGE_UNKNOWN: return "";
    default: return "<unsupported message type>";
  }
}

json read_field(const unsigned char* base, const schema_entry& e) {
  switch (e.type) {
    case NVTX_PAYLOAD_ENTRY_TYPE_UINT64: {
      std::uint64_t v;
      std::memcpy(&v, base + e.offset, sizeof v);
      return v;
    }
    case NVTX_PAYLOAD_ENTRY_TYPE_INT64: {
      std::int64_t v;
      std::memcpy(&v, base + e.offset, sizeof v);
      return v;
    }
    case NVTX_PAYLOAD_ENTRY_TYPE_UINT32: {
      std::uint32_t v;
      std::memcpy(&v, base + e.offset, sizeof v);
      return v;
    }
    case NVTX_PAYLOAD_ENTRY_TYPE_INT32: {
      std::int32_t v;
      std::memcpy(&v, base + e.offset, sizeof v);
      return v;
    }
    default: return "<unsupported entry type>";
  }
}

// Decodes an event's attributes into `out`. Caller holds g_mutex.
void describe(const domain_rec* d, const nvtxEventAttributes_t* a, json& out) {
  out["domain"] = domain_name(d);
  if (a == nullptr) {
    log_error("null event attributes");
    return;
  }
  if (a->version != NVTX_VERSION || a->size != NVTX_EVENT_ATTRIB_STRUCT_SIZE) {
    log_error("event attributes with a wrong version or size");
  }
  out["message"] = message_of(a->messageType, a->message);
  out["message_type"] = a->messageType == NVTX_MESSAGE_TYPE_REGISTERED ? "registered"
                        : a->messageType == NVTX_MESSAGE_TYPE_ASCII    ? "ascii"
                                                                       : "other";
  out["category"] = a->category;
  auto cat = g_categories.find({d, a->category});
  out["category_name"] = cat != g_categories.end() ? cat->second : std::string{};
  out["color_type"] = a->colorType == NVTX_COLOR_ARGB ? "argb" : "none";
  out["color"] = a->color;
  switch (a->payloadType) {
    case NVTX_PAYLOAD_UNKNOWN: out["payload_type"] = "none"; break;
    case NVTX_PAYLOAD_TYPE_UNSIGNED_INT64:
      out["payload_type"] = "uint64";
      out["payload"] = a->payload.ullValue;
      break;
    case NVTX_PAYLOAD_TYPE_INT64:
      out["payload_type"] = "int64";
      out["payload"] = a->payload.llValue;
      break;
    case NVTX_PAYLOAD_TYPE_UNSIGNED_INT32:
      out["payload_type"] = "uint32";
      out["payload"] = a->payload.uiValue;
      break;
    case NVTX_PAYLOAD_TYPE_INT32:
      out["payload_type"] = "int32";
      out["payload"] = a->payload.iValue;
      break;
    case NVTX_PAYLOAD_TYPE_EXT: {
      out["payload_type"] = "ext";
      const auto* data = reinterpret_cast<const nvtxPayloadData_t*>(
          static_cast<std::uintptr_t>(a->payload.ullValue));
      if (data == nullptr || a->reserved0 != 1) {
        log_error("extended payload without exactly one nvtxPayloadData_t");
        break;
      }
      auto schema = g_schemas.find(data->schemaId);
      if (schema == g_schemas.end()) {
        log_error("extended payload with an unregistered schema");
        break;
      }
      if (data->payload == nullptr || data->size != schema->second.static_size) {
        log_error("extended payload whose size does not match its schema");
        break;
      }
      out["schema"] = schema->second.name;
      json fields = json::object();
      for (const auto& e : schema->second.entries) {
        fields[e.name] = read_field(static_cast<const unsigned char*>(data->payload), e);
      }
      out["payload"] = std::move(fields);
      break;
    }
    default: out["payload_type"] = "other"; break;
  }
}

// ---- core API (domain calls, and the global-domain calls a stray annotation might make) ----

nvtxDomainHandle_t NVTX_API domain_create_a(const char* name) {
  std::lock_guard lock(g_mutex);
  g_domains.push_back(domain_rec{name != nullptr ? name : ""});
  log(json{{"call", "domain_create"}, {"domain", g_domains.back().name}});
  return reinterpret_cast<nvtxDomainHandle_t>(&g_domains.back());
}

void NVTX_API domain_destroy(nvtxDomainHandle_t h) {
  std::lock_guard lock(g_mutex);
  log(json{{"call", "domain_destroy"}, {"domain", domain_name(as_domain(h))}});
}

void NVTX_API domain_name_category_a(nvtxDomainHandle_t h, uint32_t id, const char* name) {
  std::lock_guard lock(g_mutex);
  g_categories[{as_domain(h), id}] = name != nullptr ? name : "";
  log(json{{"call", "name_category"},
           {"domain", domain_name(as_domain(h))},
           {"category", id},
           {"name", name != nullptr ? name : ""}});
}

nvtxStringHandle_t NVTX_API domain_register_string_a(nvtxDomainHandle_t h, const char* s) {
  std::lock_guard lock(g_mutex);
  g_strings.push_back(string_rec{s != nullptr ? s : ""});
  log(json{{"call", "register_string"},
           {"domain", domain_name(as_domain(h))},
           {"string", g_strings.back().text}});
  return reinterpret_cast<nvtxStringHandle_t>(&g_strings.back());
}

int push(const domain_rec* d, const nvtxEventAttributes_t* a) {
  std::lock_guard lock(g_mutex);
  json e{{"call", "push"}};
  describe(d, a, e);
  auto& stack = t_stacks[d];
  stack.push_back(e.value("message", std::string{}));
  e["depth"] = stack.size();
  log(std::move(e));
  return static_cast<int>(stack.size()) - 1;  // NVTX: the 0-based level of the new range
}

int pop(const domain_rec* d) {
  std::lock_guard lock(g_mutex);
  auto& stack = t_stacks[d];
  if (stack.empty()) {
    log_error("pop without a matching push in domain '" + domain_name(d) + "'");
    return -1;
  }
  json e{{"call", "pop"}, {"domain", domain_name(d)}, {"message", stack.back()},
         {"depth", stack.size()}};
  stack.pop_back();
  log(std::move(e));
  return static_cast<int>(stack.size());
}

void mark(const domain_rec* d, const nvtxEventAttributes_t* a) {
  std::lock_guard lock(g_mutex);
  json e{{"call", "mark"}};
  describe(d, a, e);
  e["depth"] = t_stacks[d].size();
  log(std::move(e));
}

int NVTX_API domain_range_push_ex(nvtxDomainHandle_t h, const nvtxEventAttributes_t* a) {
  return push(as_domain(h), a);
}
int NVTX_API domain_range_pop(nvtxDomainHandle_t h) { return pop(as_domain(h)); }
void NVTX_API domain_mark_ex(nvtxDomainHandle_t h, const nvtxEventAttributes_t* a) {
  mark(as_domain(h), a);
}
int NVTX_API range_push_ex(const nvtxEventAttributes_t* a) { return push(nullptr, a); }
int NVTX_API range_pop() { return pop(nullptr); }
void NVTX_API mark_ex(const nvtxEventAttributes_t* a) { mark(nullptr, a); }

int NVTX_API range_push_a(const char* message) {
  nvtxEventAttributes_t a{};
  a.version = NVTX_VERSION;
  a.size = NVTX_EVENT_ATTRIB_STRUCT_SIZE;
  a.messageType = NVTX_MESSAGE_TYPE_ASCII;
  a.message.ascii = message;
  return push(nullptr, &a);
}

void NVTX_API name_os_thread_a(uint32_t tid, const char* name) {
  std::lock_guard lock(g_mutex);
  log(json{{"call", "name_thread"}, {"os_thread", tid}, {"name", name != nullptr ? name : ""}});
}

// ---- memory extension ----

heap_rec* as_heap(nvtxMemHeapHandle_t h) { return reinterpret_cast<heap_rec*>(h); }

nvtxMemHeapHandle_t NVTX_API mem_heap_register(nvtxDomainHandle_t h,
                                               const nvtxMemHeapDesc_t* desc) {
  std::lock_guard lock(g_mutex);
  if (desc == nullptr || desc->extCompatID != NVTX_EXT_COMPATID_MEM ||
      desc->structSize != sizeof(nvtxMemHeapDesc_t) ||
      desc->type != NVTX_MEM_TYPE_VIRTUAL_ADDRESS ||
      desc->typeSpecificDescSize != sizeof(nvtxMemVirtualRangeDesc_t) ||
      desc->typeSpecificDesc == nullptr) {
    log_error("malformed nvtxMemHeapDesc_t");
    return nullptr;
  }
  const auto* range = static_cast<const nvtxMemVirtualRangeDesc_t*>(desc->typeSpecificDesc);
  for (const heap_rec& other : g_heaps) {
    if (other.live && addr(range->ptr) < other.base + other.size &&
        other.base < addr(range->ptr) + range->size) {
      log_error("heap overlaps a live heap");
    }
  }
  g_heaps.push_back(heap_rec{g_heaps.size() + 1, addr(range->ptr), range->size, true, {}});
  heap_rec& heap = g_heaps.back();
  log(json{{"call", "heap_register"},
           {"domain", domain_name(as_domain(h))},
           {"heap", heap.id},
           {"ptr", heap.base},
           {"size", heap.size},
           {"usage", desc->usage},
           {"category", desc->category},
           {"name", message_of(static_cast<int32_t>(desc->messageType), desc->message)}});
  return reinterpret_cast<nvtxMemHeapHandle_t>(&heap);
}

void NVTX_API mem_heap_unregister(nvtxDomainHandle_t, nvtxMemHeapHandle_t h) {
  std::lock_guard lock(g_mutex);
  heap_rec* heap = as_heap(h);
  if (heap == nullptr || !heap->live) {
    log_error("unregister of an unknown or dead heap");
    return;
  }
  heap->live = false;
  log(json{{"call", "heap_unregister"}, {"heap", heap->id}, {"regions_dropped", heap->regions.size()}});
  heap->regions.clear();
}

void NVTX_API mem_heap_reset(nvtxDomainHandle_t, nvtxMemHeapHandle_t h) {
  std::lock_guard lock(g_mutex);
  heap_rec* heap = as_heap(h);
  if (heap == nullptr || !heap->live) {
    log_error("reset of an unknown or dead heap");
    return;
  }
  log(json{{"call", "heap_reset"}, {"heap", heap->id}, {"regions_dropped", heap->regions.size()}});
  heap->regions.clear();
}

void NVTX_API mem_regions_register(nvtxDomainHandle_t, const nvtxMemRegionsRegisterBatch_t* b) {
  std::lock_guard lock(g_mutex);
  if (b == nullptr || b->extCompatID != NVTX_EXT_COMPATID_MEM ||
      b->structSize != sizeof(nvtxMemRegionsRegisterBatch_t) ||
      b->regionType != NVTX_MEM_TYPE_VIRTUAL_ADDRESS ||
      b->regionDescElementSize != sizeof(nvtxMemVirtualRangeDesc_t)) {
    log_error("malformed nvtxMemRegionsRegisterBatch_t");
    return;
  }
  heap_rec* heap = as_heap(b->heap);
  if (heap == nullptr || !heap->live) {
    log_error("regions registered in an unknown or dead heap");
    return;
  }
  const auto* ranges = static_cast<const nvtxMemVirtualRangeDesc_t*>(b->regionDescElements);
  for (std::size_t i = 0; i < b->regionCount; ++i) {
    const std::uintptr_t p = addr(ranges[i].ptr);
    const std::size_t n = ranges[i].size;
    if (p < heap->base || p + n > heap->base + heap->size) {
      log_error("region outside its heap");
    }
    auto next = heap->regions.lower_bound(p);
    if ((next != heap->regions.end() && next->first < p + n) ||
        (next != heap->regions.begin() && std::prev(next)->first + std::prev(next)->second > p)) {
      log_error("region overlaps a live region");
    }
    heap->regions[p] = n;
    if (b->regionHandleElementsOut != nullptr) {
      b->regionHandleElementsOut[i] = reinterpret_cast<nvtxMemRegionHandle_t>(p);
    }
    log(json{{"call", "region_register"}, {"heap", heap->id}, {"ptr", p}, {"size", n}});
  }
}

void NVTX_API mem_regions_unregister(nvtxDomainHandle_t,
                                     const nvtxMemRegionsUnregisterBatch_t* b) {
  std::lock_guard lock(g_mutex);
  if (b == nullptr || b->extCompatID != NVTX_EXT_COMPATID_MEM ||
      b->structSize != sizeof(nvtxMemRegionsUnregisterBatch_t) ||
      b->refElementSize != sizeof(nvtxMemRegionRef_t)) {
    log_error("malformed nvtxMemRegionsUnregisterBatch_t");
    return;
  }
  for (std::size_t i = 0; i < b->refCount; ++i) {
    const std::uintptr_t p = b->refType == NVTX_MEM_REGION_REF_TYPE_POINTER
                                 ? addr(b->refElements[i].pointer)
                                 : addr(b->refElements[i].handle);
    heap_rec* owner = nullptr;
    for (heap_rec& heap : g_heaps) {
      if (heap.live && heap.regions.erase(p) == 1) owner = &heap;
    }
    if (owner == nullptr) {
      log_error("unregister of an unknown region");
      continue;
    }
    log(json{{"call", "region_unregister"}, {"heap", owner->id}, {"ptr", p}});
  }
}

// ---- payload extension ----

uint64_t NVTX_API payload_schema_register(nvtxDomainHandle_t h,
                                          const nvtxPayloadSchemaAttr_t* attr) {
  std::lock_guard lock(g_mutex);
  constexpr uint64_t needed = NVTX_PAYLOAD_SCHEMA_ATTR_FIELD_TYPE |
                              NVTX_PAYLOAD_SCHEMA_ATTR_FIELD_ENTRIES |
                              NVTX_PAYLOAD_SCHEMA_ATTR_FIELD_NUM_ENTRIES;
  if (attr == nullptr || (attr->fieldMask & needed) != needed ||
      attr->type != NVTX_PAYLOAD_SCHEMA_TYPE_STATIC || attr->entries == nullptr) {
    log_error("unsupported payload schema");
    return 0;
  }
  schema_rec s;
  if ((attr->fieldMask & NVTX_PAYLOAD_SCHEMA_ATTR_FIELD_NAME) != 0 && attr->name != nullptr) {
    s.name = attr->name;
  }
  if ((attr->fieldMask & NVTX_PAYLOAD_SCHEMA_ATTR_FIELD_STATIC_SIZE) != 0) {
    s.static_size = attr->payloadStaticSize;
  }
  json entries = json::array();
  for (std::size_t i = 0; i < attr->numEntries; ++i) {
    const nvtxPayloadSchemaEntry_t& e = attr->entries[i];
    s.entries.push_back(schema_entry{e.name != nullptr ? e.name : "", e.type, e.offset});
    entries.push_back(json{{"name", s.entries.back().name}, {"type", e.type}, {"offset", e.offset}});
  }
  const uint64_t id = g_next_schema_id++;
  log(json{{"call", "schema_register"},
           {"domain", domain_name(as_domain(h))},
           {"schema_id", id},
           {"name", s.name},
           {"static_size", s.static_size},
           {"entries", std::move(entries)}});
  g_schemas.emplace(id, std::move(s));
  return id;
}

uint8_t NVTX_API payload_domain_is_enabled(nvtxDomainHandle_t) { return 1; }

template <typename F>
void set_slot(NvtxFunctionTable table, unsigned size, unsigned id, F* fn) {
  if (id <= size && table[id] != nullptr) *table[id] = reinterpret_cast<NvtxFunctionPointer>(fn);
}

template <typename F>
void set_ext_slot(nvtxExtModuleSegment_t& segment, std::size_t id, F* fn) {
  if (id < segment.slotCount) segment.functionSlots[id] = reinterpret_cast<intptr_t>(fn);
}

}  // namespace

GPUSWAP_NVTX_EXPORT int InitializeInjectionNvtx2(NvtxGetExportTableFunc_t get_export_table) {
  const char* core_only = std::getenv("GPUSWAP_NVTX_INJECTION_CORE_ONLY");
  {
    std::lock_guard lock(g_mutex);
    g_core_only = core_only != nullptr && std::strcmp(core_only, "1") == 0;
    log(json{{"call", "initialize"}, {"core_only", g_core_only}});
  }
  const auto* callbacks =
      static_cast<const NvtxExportTableCallbacks*>(get_export_table(NVTX_ETID_CALLBACKS));
  if (callbacks == nullptr || callbacks->struct_size < sizeof(NvtxExportTableCallbacks)) return 0;
  const auto* version =
      static_cast<const NvtxExportTableVersionInfo*>(get_export_table(NVTX_ETID_VERSIONINFO));
  if (version != nullptr && version->SetInjectionNvtxVersion != nullptr) {
    version->SetInjectionNvtxVersion(NVTX_VERSION);
  }

  NvtxFunctionTable table = nullptr;
  unsigned size = 0;
  if (callbacks->GetModuleFunctionTable(NVTX_CB_MODULE_CORE2, &table, &size) == 0) return 0;
  set_slot(table, size, NVTX_CBID_CORE2_DomainCreateA, &domain_create_a);
  set_slot(table, size, NVTX_CBID_CORE2_DomainDestroy, &domain_destroy);
  set_slot(table, size, NVTX_CBID_CORE2_DomainNameCategoryA, &domain_name_category_a);
  set_slot(table, size, NVTX_CBID_CORE2_DomainRegisterStringA, &domain_register_string_a);
  set_slot(table, size, NVTX_CBID_CORE2_DomainRangePushEx, &domain_range_push_ex);
  set_slot(table, size, NVTX_CBID_CORE2_DomainRangePop, &domain_range_pop);
  set_slot(table, size, NVTX_CBID_CORE2_DomainMarkEx, &domain_mark_ex);

  if (callbacks->GetModuleFunctionTable(NVTX_CB_MODULE_CORE, &table, &size) == 0) return 0;
  set_slot(table, size, NVTX_CBID_CORE_RangePushEx, &range_push_ex);
  set_slot(table, size, NVTX_CBID_CORE_RangePushA, &range_push_a);
  set_slot(table, size, NVTX_CBID_CORE_RangePop, &range_pop);
  set_slot(table, size, NVTX_CBID_CORE_MarkEx, &mark_ex);
  set_slot(table, size, NVTX_CBID_CORE_NameOsThreadA, &name_os_thread_a);
  return 1;
}

GPUSWAP_NVTX_EXPORT int InitializeInjectionNvtxExtension(nvtxExtModuleInfo_t* info) {
  if (info == nullptr || info->segmentsCount < 1 || info->segments == nullptr) return 0;
  std::string module_name;
  {
    std::lock_guard lock(g_mutex);
    module_name = info->moduleId == NVTX_EXT_MODULEID_MEM       ? "mem"
             : info->moduleId == NVTX_EXT_PAYLOAD_MODULEID ? "payload"
                                                           : std::to_string(info->moduleId);
    log(json{{"call", "initialize_extension"},
             {"module", module_name},
             {"compat_id", info->compatId},
             {"accepted", !g_core_only}});
    // Declining = leaving the slots empty: NVTX turns those functions into no-ops.
    if (g_core_only) return 1;
  }
  nvtxExtModuleSegment_t& segment = info->segments[0];
  if (info->moduleId == NVTX_EXT_MODULEID_MEM && info->compatId == NVTX_EXT_COMPATID_MEM) {
    set_ext_slot(segment, NVTX3EXT_CBID_nvtxMemHeapRegister, &mem_heap_register);
    set_ext_slot(segment, NVTX3EXT_CBID_nvtxMemHeapUnregister, &mem_heap_unregister);
    set_ext_slot(segment, NVTX3EXT_CBID_nvtxMemHeapReset, &mem_heap_reset);
    set_ext_slot(segment, NVTX3EXT_CBID_nvtxMemRegionsRegister, &mem_regions_register);
    set_ext_slot(segment, NVTX3EXT_CBID_nvtxMemRegionsUnregister, &mem_regions_unregister);
  } else if (info->moduleId == NVTX_EXT_PAYLOAD_MODULEID &&
             info->compatId == NVTX_EXT_PAYLOAD_COMPATID) {
    set_ext_slot(segment, NVTX3EXT_CBID_nvtxPayloadSchemaRegister, &payload_schema_register);
    set_ext_slot(segment, NVTX3EXT_CBID_nvtxDomainIsEnabled, &payload_domain_is_enabled);
  }
  return 1;
}

// ---- read-back API for the test ----

// The log as a JSON array, malloc()ed: the caller free()s it.
GPUSWAP_NVTX_EXPORT char* gpuswap_nvtx_log_json() {
  std::string text;
  {
    std::lock_guard lock(g_mutex);
    text = json(g_log).dump();
  }
  char* out = static_cast<char*>(std::malloc(text.size() + 1));
  if (out != nullptr) std::memcpy(out, text.c_str(), text.size() + 1);
  return out;
}

// Forgets the log; registrations (domains, strings, categories, schemas, heaps) stay.
GPUSWAP_NVTX_EXPORT void gpuswap_nvtx_log_clear() {
  std::lock_guard lock(g_mutex);
  g_log.clear();
}

// What the tool's memory model holds now.
GPUSWAP_NVTX_EXPORT std::size_t gpuswap_nvtx_live_heaps() {
  std::lock_guard lock(g_mutex);
  std::size_t n = 0;
  for (const heap_rec& h : g_heaps) n += h.live ? 1 : 0;
  return n;
}
GPUSWAP_NVTX_EXPORT std::size_t gpuswap_nvtx_live_regions() {
  std::lock_guard lock(g_mutex);
  std::size_t n = 0;
  for (const heap_rec& h : g_heaps) n += h.live ? h.regions.size() : 0;
  return n;
}
