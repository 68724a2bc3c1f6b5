// CPU implementation of the RLE utilities declared in ops/rle.h.
#include "ops/rle.h"

#include <algorithm>
#include <limits>

#include "common.h"

namespace samantic {
namespace rle {

Batch encode(const uint8_t* masks, int64_t n, int64_t h, int64_t w) {
  std::vector<std::vector<uint32_t>> per(n);
  parallel_for(n, 1, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      const uint8_t* m = masks + i * h * w;
      std::vector<uint32_t>& c = per[i];
      uint8_t current = 0;
      uint32_t run = 0;
      for (int64_t x = 0; x < w; ++x) {
        for (int64_t y = 0; y < h; ++y) {
          uint8_t v = m[y * w + x] ? 1 : 0;
          if (v != current) {
            c.push_back(run);
            run = 0;
            current = v;
          }
          ++run;
        }
      }
      c.push_back(run);
    }
  });
  Batch out;
  for (auto& c : per) out.push(c);
  return out;
}

void decode(const uint32_t* counts, const int64_t* offsets, int64_t n, int64_t h, int64_t w, uint8_t* out) {
  const uint64_t hw = static_cast<uint64_t>(h) * static_cast<uint64_t>(w);
  parallel_for(n, 1, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      uint8_t* m = out + i * h * w;
      uint64_t pos = 0;
      uint8_t v = 0;
      for (int64_t j = offsets[i]; j < offsets[i + 1]; ++j) {
        uint64_t end = std::min<uint64_t>(hw, pos + counts[j]);
        for (; pos < end; ++pos) {
          const uint64_t x = pos / h, y = pos % h;
          m[y * w + x] = v;
        }
        v ^= 1;
      }
      for (; pos < hw; ++pos) m[(pos % h) * w + pos / h] = 0;
    }
  });
}

uint64_t area(View r) {
  uint64_t a = 0;
  for (int64_t j = 1; j < r.m; j += 2) a += r.cnts[j];
  return a;
}

uint64_t total(View r) {
  uint64_t t = 0;
  for (int64_t j = 0; j < r.m; ++j) t += r.cnts[j];
  return t;
}

void bbox(View r, int64_t h, double* out) {
  uint64_t pos = 0;
  int64_t xmin = std::numeric_limits<int64_t>::max(), ymin = xmin, xmax = -1, ymax = -1;
  for (int64_t j = 0; j < r.m; ++j) {
    const uint64_t len = r.cnts[j];
    if ((j & 1) && len > 0) {
      const uint64_t first = pos, last = pos + len - 1;
      const int64_t x0 = static_cast<int64_t>(first / h), y0 = static_cast<int64_t>(first % h);
      const int64_t x1 = static_cast<int64_t>(last / h), y1 = static_cast<int64_t>(last % h);
      xmin = std::min(xmin, x0);
      xmax = std::max(xmax, x1);
      if (x1 > x0) {  // the run wraps into another column: it touches both the top and bottom rows
        ymin = 0;
        ymax = h - 1;
      } else {
        ymin = std::min(ymin, y0);
        ymax = std::max(ymax, y1);
      }
    }
    pos += len;
  }
  if (xmax < 0) {
    out[0] = out[1] = out[2] = out[3] = 0.0;
    return;
  }
  out[0] = static_cast<double>(xmin);
  out[1] = static_cast<double>(ymin);
  out[2] = static_cast<double>(xmax - xmin + 1);
  out[3] = static_cast<double>(ymax - ymin + 1);
}

namespace {

// Walks an RLE as (value, remaining) pairs.
struct Cursor {
  View r;
  int64_t j = 0;
  uint64_t left = 0;
  explicit Cursor(View v) : r(v) { advance(); }
  // Skips empty runs so `left` > 0 unless the RLE is exhausted.
  void advance() {
    while (left == 0 && j < r.m) left = r.cnts[j++];
  }
  bool done() const { return left == 0 && j >= r.m; }
  uint8_t value() const { return static_cast<uint8_t>((j - 1) & 1); }
  void consume(uint64_t k) {
    left -= k;
    if (left == 0) advance();
  }
};

}  // namespace

uint64_t intersection(View a, View b) {
  Cursor ca(a), cb(b);
  uint64_t inter = 0;
  while (!ca.done() && !cb.done()) {
    const uint64_t k = std::min(ca.left, cb.left);
    if (ca.value() && cb.value()) inter += k;
    ca.consume(k);
    cb.consume(k);
  }
  return inter;
}

std::vector<uint32_t> merge(const std::vector<View>& rles, bool intersect) {
  std::vector<uint32_t> out;
  if (rles.empty()) return out;
  std::vector<Cursor> cur;
  cur.reserve(rles.size());
  for (const View& v : rles) cur.emplace_back(v);
  uint8_t current = 0;
  uint64_t run = 0;
  while (true) {
    uint64_t k = std::numeric_limits<uint64_t>::max();
    bool any_done = false;
    for (auto& c : cur) {
      if (c.done()) {
        any_done = true;
        break;
      }
      k = std::min(k, c.left);
    }
    if (any_done) break;
    uint8_t v = intersect ? 1 : 0;
    for (auto& c : cur) v = intersect ? (v & c.value()) : (v | c.value());
    if (v != current) {
      out.push_back(static_cast<uint32_t>(run));
      run = 0;
      current = v;
    }
    run += k;
    for (auto& c : cur) c.consume(k);
  }
  out.push_back(static_cast<uint32_t>(run));
  return out;
}

std::string to_string(View r) {
  std::string s;
  s.reserve(static_cast<size_t>(r.m) * 2);
  for (int64_t i = 0; i < r.m; ++i) {
    int64_t x = static_cast<int64_t>(r.cnts[i]);
    if (i > 2) x -= static_cast<int64_t>(r.cnts[i - 2]);
    // 5 payload bits per character, bit 0x20 = more follows, bit 0x10 of the
    // last character = sign; characters offset by 48 to stay printable.
    while (true) {
      int64_t c = x & 0x1f;
      x >>= 5;  // arithmetic shift keeps the sign
      const bool more = (c & 0x10) ? (x != -1) : (x != 0);
      if (more) c |= 0x20;
      s.push_back(static_cast<char>(c + 48));
      if (!more) break;
    }
  }
  return s;
}

std::vector<uint32_t> from_string(const std::string& s) {
  std::vector<uint32_t> cnts;
  size_t p = 0;
  while (p < s.size()) {
    int64_t x = 0;
    int k = 0;
    bool more = true;
    while (more) {
      SAMANTIC_CHECK(p < s.size(), "compressed RLE string ends in the middle of a number: ", s);
      // before the shift: a 13th character would shift by 60 bits, past int64 (UB)
      SAMANTIC_CHECK(k < 12, "compressed RLE string has a number longer than 12 characters at position ", p + 1);
      const int64_t c = static_cast<int64_t>(static_cast<unsigned char>(s[p])) - 48;
      SAMANTIC_CHECK(c >= 0 && c < 64, "compressed RLE string has an invalid character ",
                     static_cast<int>(static_cast<unsigned char>(s[p])), " at position ", p);
      x |= (c & 0x1f) << (5 * k);
      more = (c & 0x20) != 0;
      ++p;
      ++k;
      if (!more && (c & 0x10)) x |= -(int64_t{1} << (5 * k));
    }
    if (cnts.size() > 2) x += static_cast<int64_t>(cnts[cnts.size() - 2]);
    SAMANTIC_CHECK(x >= 0 && x <= static_cast<int64_t>(std::numeric_limits<uint32_t>::max()),
                   "compressed RLE string decodes to an invalid run length ", x, " (run ", cnts.size(), ")");
    cnts.push_back(static_cast<uint32_t>(x));
  }
  return cnts;
}

}  // namespace rle
}  // namespace samantic
