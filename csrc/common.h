// Shared helpers for every samantic kernel: error checks, host/device inline,
// and a small thread pool loop for the CPU backends.
#pragma once

#include <algorithm>
#include <atomic>
#include <exception>
#include <cstdint>
#include <cstdlib>
#include <sstream>
#include <stdexcept>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#if defined(__CUDACC__)
#define HOST_DEVICE_INLINE __host__ __device__ __forceinline__
#else
#define HOST_DEVICE_INLINE inline
#endif

namespace samantic {

namespace detail {
inline void append_all(std::ostringstream&) {}
template <typename T, typename... Rest>
inline void append_all(std::ostringstream& os, const T& value, const Rest&... rest) {
  os << value;
  append_all(os, rest...);
}
}  // namespace detail

template <typename... Args>
inline std::string str_cat(const Args&... args) {
  std::ostringstream os;
  detail::append_all(os, args...);
  return os.str();
}

// User-facing input errors: pybind11 turns std::invalid_argument into ValueError.
#define SAMANTIC_CHECK(cond, ...)                                      \
  do {                                                                 \
    if (!(cond)) {                                                     \
      throw std::invalid_argument(::samantic::str_cat(__VA_ARGS__));   \
    }                                                                  \
  } while (0)

// Number of CPU worker threads: SAMANTIC_NUM_THREADS, else the hardware count.
inline int num_threads() {
  if (const char* env = std::getenv("SAMANTIC_NUM_THREADS")) {
    int n = std::atoi(env);
    if (n > 0) return n;
  }
  unsigned hw = std::thread::hardware_concurrency();
  return hw == 0 ? 1 : static_cast<int>(hw);
}

// Runs fn(begin, end) over [0, n) split into contiguous chunks, one per thread.
// Work items are independent; fn must not throw across threads (errors are
// collected and the first one rethrown on the calling thread).
template <typename Fn>
void parallel_for(int64_t n, int64_t grain, Fn&& fn) {
  if (n <= 0) return;
  int64_t threads = std::min<int64_t>(num_threads(), (n + grain - 1) / std::max<int64_t>(grain, 1));
  if (threads <= 1) {
    fn(int64_t{0}, n);
    return;
  }
  // Dynamic scheduling in small blocks: per-item cost varies a lot (masks differ in size).
  const int64_t block = std::max<int64_t>(1, std::min<int64_t>(grain, n / (threads * 4) + 1));
  std::atomic<int64_t> next{0};
  std::vector<std::thread> pool;
  std::vector<std::exception_ptr> errors(threads);
  pool.reserve(threads);
  for (int64_t t = 0; t < threads; ++t) {
    pool.emplace_back([&, t]() {
      try {
        while (true) {
          int64_t b = next.fetch_add(block);
          if (b >= n) break;
          fn(b, std::min(n, b + block));
        }
      } catch (...) {
        errors[t] = std::current_exception();
      }
    });
  }
  for (auto& th : pool) th.join();
  for (auto& e : errors)
    if (e) std::rethrow_exception(e);
}

}  // namespace samantic
