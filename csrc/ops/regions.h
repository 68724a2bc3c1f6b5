// Small-region removal on one binary mask, segment-anything's
// `remove_small_regions` (its min_mask_region_area post-processing) without
// OpenCV: 8-connected components of the working set (the mask's background
// for "holes", its foreground for "islands") smaller than a threshold are
// flipped. Regions are ordered the way OpenCV's block-based labelling numbers
// them, so the "keep the largest island when every island is small" tie-break
// matches cv2.connectedComponentsWithStats.
#pragma once

#include <cstdint>

namespace samantic {
namespace regions {

// mask: h x w (nonzero = foreground, C order); out: h x w uint8 (0/1).
// holes=true fills background regions smaller than area_thresh; false drops
// foreground regions smaller than it (the largest stays if all are small).
// Returns false (and copies the mask) when no region is small.
bool remove_small(const uint8_t* mask, int64_t h, int64_t w, double area_thresh, bool holes, uint8_t* out);

}  // namespace regions
}  // namespace samantic
