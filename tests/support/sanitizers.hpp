#pragma once
// GPUSWAP_TSAN is defined in ThreadSanitizer builds. Ordering tests run their negative controls
// (the same scenario with the guarding wait removed, to show the check catches the corruption)
// only outside TSan: those runs are data races by construction, which TSan would report.
#if defined(__SANITIZE_THREAD__)
#define GPUSWAP_TSAN 1
#elif defined(__has_feature)
#if __has_feature(thread_sanitizer)
#define GPUSWAP_TSAN 1
#endif
#endif
