// Per-query body of merge_patches, shared by the CPU loop
// (cpu/merge_patches.cpp) and the CUDA kernels (cuda/merge_patches.cu).
//
// A query's mask is the union of some patches' masks, all COCO RLEs of one
// size (column-major, zeros first, see ops/rle.h). The union is made run by
// run: each patch is read as its sorted runs of ones [b, e), a min-heap on b
// holds one cursor per patch, and the runs come out of the heap in pixel order
// and are merged while they overlap or touch. That is a k-way merge in
// O(R log k) for R input runs, with no full-resolution mask anywhere; the
// heap lives in caller-provided scratch (k cursors), so the body allocates
// nothing and runs as one CUDA thread per query.
//
// The output RLE is canonical, like pycocotools' encode and its merge of two
// or more RLEs: a leading run of zeros (0 when the mask starts with a one),
// then alternating non-empty runs; no trailing zero run unless the mask ends
// with zeros; an empty mask is the single count h * w.
#pragma once

#include <cstdint>

#include "common.h"

namespace samantic {
namespace merge_patches {

// One patch's position in its RLE.
struct RunCursor {
  int64_t next;  // index in `counts` of the next zeros count
  int64_t stop;  // one past this RLE's last count
  uint64_t pos;  // pixel index after the last run read
  uint64_t b;    // the current run of ones is [b, e)
  uint64_t e;
};

// Per-query results besides the RLE counts.
struct QueryStats {
  int64_t n_counts;  // length of the RLE written
  int64_t area;      // foreground pixels
  int64_t box[4];    // XYXY, inclusive max (batched_mask_to_box); zeros for an empty mask
};

// Counting writer (pass 1 of the CUDA backend): only the length is needed.
struct CountWriter {
  HOST_DEVICE_INLINE void push(uint32_t) {}
};

// Writes the counts to a preallocated array (pass 2 of the CUDA backend).
struct ArrayWriter {
  uint32_t* dst;
  int64_t n;
  HOST_DEVICE_INLINE void push(uint32_t v) { dst[n++] = v; }
};

// Moves the cursor to its next non-empty run of ones; false when none is left
// (empty runs in a non-canonical input are skipped, zero-length zero runs make
// two runs of ones touch, which the merge joins).
HOST_DEVICE_INLINE bool next_run(const uint32_t* counts, RunCursor& c) {
  while (c.next + 1 < c.stop) {
    const uint64_t b = c.pos + counts[c.next];
    const uint64_t e = b + counts[c.next + 1];
    c.next += 2;
    c.pos = e;
    if (e > b) {
      c.b = b;
      c.e = e;
      return true;
    }
  }
  return false;
}

// Restores the min-heap order on `b` below slot i.
HOST_DEVICE_INLINE void sift_down(RunCursor* heap, int64_t n, int64_t i) {
  const RunCursor item = heap[i];
  while (true) {
    int64_t child = 2 * i + 1;
    if (child >= n) break;
    if (child + 1 < n && heap[child + 1].b < heap[child].b) ++child;
    if (heap[child].b >= item.b) break;
    heap[i] = heap[child];
    i = child;
  }
  heap[i] = item;
}

// Turns merged runs of ones, in pixel order, into counts, area and box.
template <typename Writer>
struct RunEmitter {
  Writer& out;
  int64_t h;
  uint64_t prev;  // end of the last run of ones written
  QueryStats s;
  int64_t xmin, xmax, ymin, ymax;

  HOST_DEVICE_INLINE RunEmitter(Writer& w, int64_t rows)
      : out(w), h(rows), prev(0), s{0, 0, {0, 0, 0, 0}}, xmin(-1), xmax(-1), ymin(-1), ymax(-1) {}

  HOST_DEVICE_INLINE void run(uint64_t b, uint64_t e) {
    out.push(static_cast<uint32_t>(b - prev));
    out.push(static_cast<uint32_t>(e - b));
    s.n_counts += 2;
    s.area += static_cast<int64_t>(e - b);
    prev = e;
    const int64_t x0 = static_cast<int64_t>(b / h), x1 = static_cast<int64_t>((e - 1) / h);
    int64_t y0 = static_cast<int64_t>(b % h), y1 = static_cast<int64_t>((e - 1) % h);
    if (x1 > x0) {  // the run wraps into another column: it touches the top and bottom rows
      y0 = 0;
      y1 = h - 1;
    }
    if (xmin < 0) xmin = x0;  // runs come in pixel order: the first has the smallest column
    xmax = x1;
    ymin = (ymin < 0 || y0 < ymin) ? y0 : ymin;
    ymax = y1 > ymax ? y1 : ymax;
  }

  // Trailing zeros (the single count of an empty mask), then the box.
  HOST_DEVICE_INLINE QueryStats finish(uint64_t total) {
    if (prev < total || s.n_counts == 0) {
      out.push(static_cast<uint32_t>(total - prev));
      s.n_counts += 1;
    }
    if (xmin >= 0) {
      s.box[0] = xmin;
      s.box[1] = ymin;
      s.box[2] = xmax;
      s.box[3] = ymax;
    }
    return s;
  }
};

// Union of the k patches `members` (indices into the CSR batch counts/offsets)
// of masks with h rows and `total` = h * w pixels. `heap` is scratch for k
// cursors. Each count of the result goes to out.push, in order.
template <typename Writer>
HOST_DEVICE_INLINE QueryStats merge_query(const uint32_t* counts, const int64_t* offsets, const int64_t* members,
                                          int64_t k, int64_t h, uint64_t total, RunCursor* heap, Writer& out) {
  // step: one cursor per patch that has a run of ones, heapified on its start
  int64_t n = 0;
  for (int64_t i = 0; i < k; ++i) {
    const int64_t p = members[i];
    RunCursor c{offsets[p], offsets[p + 1], 0, 0, 0};
    if (next_run(counts, c)) heap[n++] = c;
  }
  for (int64_t i = n / 2 - 1; i >= 0; --i) sift_down(heap, n, i);

  // step: pop runs in order of their start, merging while they overlap or touch
  RunEmitter<Writer> emit(out, h);
  bool open = false;
  uint64_t run_b = 0, run_e = 0;
  while (n > 0) {
    RunCursor& top = heap[0];
    if (open && top.b <= run_e) {
      if (top.e > run_e) run_e = top.e;
    } else {
      if (open) emit.run(run_b, run_e);
      run_b = top.b;
      run_e = top.e;
      open = true;
    }
    if (!next_run(counts, top)) heap[0] = heap[--n];  // this patch is exhausted
    if (n > 0) sift_down(heap, n, 0);
  }
  if (open) emit.run(run_b, run_e);
  return emit.finish(total);
}

}  // namespace merge_patches
}  // namespace samantic
