// The segment table: what the products compute over, built and validated once (segment_table),
// then read by every call, the way variable-length attention kernels take cu_seqlens.
//
// Segment s is a flattened tensor of numel[s] entries at rows [row_offset[s], row_offset[s] +
// numel[s]) of compartment comp[s]'s matrix; compartment k has dim[k] directions on stream
// stream[k], and its coefficients sit at [offset[k], offset[k + 1]) of one vector of offset[C]
// (the total) entries. The single ops are tables of one segment (TableOfOne), which alone may
// address columns from a col_offset.
//
// As a tensor (int64, CPU, 1-D; S segments, C compartments):
//   [kTableMagic, S, C, total, numel[S], row_offset[S], comp[S], dim[C], stream[C], offset[C + 1], seal]
// The seal is a hash of the words before it: the products index memory with the table's entries
// and do not re-check its rules, so a table edited after it was built, or an int64 tensor not
// built by segment_table, is refused instead of trusted. Checking it per call is an integrity
// check, not a re-validation: one pass over the 3S + 3C + 5 words before it, a multiply and a shift
// each, the same order as checking the call's S tensors against the table, which every call must
// do.
#pragma once

#include <vector>

#include "common.h"

namespace rbd {

constexpr int64_t kTableMagic = 0x5242445441424C31;  // "RBDTABL1"
constexpr int64_t kTableHeader = 4;                  // magic, S, C, total

struct SegmentTable {
  int64_t n_segs = 0, n_comps = 0;
  const int64_t* numel = nullptr;       // per segment
  const int64_t* row_offset = nullptr;  // per segment
  const int64_t* comp = nullptr;        // per segment
  const int64_t* dim = nullptr;         // per compartment
  const int64_t* stream = nullptr;      // per compartment
  const int64_t* offset = nullptr;      // per compartment, and offset[n_comps] = total
  int64_t col_offset = 0;               // the single ops' column offset (a table tensor has none)

  int64_t total() const { return offset[n_comps]; }
  // Segment s's stream arguments: the keys all segments share, its compartment's stream, its rows.
  StreamArgs args(const StreamArgs& shared, int64_t s) const {
    StreamArgs a = shared;
    a.stream = static_cast<uint32_t>(stream[comp[s]]);
    a.row_offset = row_offset[s];
    a.col_offset = col_offset;
    return a;
  }
};

// The single ops' table: one segment, one compartment, from arguments make_stream_args checked.
struct TableOfOne {
  int64_t numel, row_offset, comp = 0, dim, stream, offset[2];
  SegmentTable table;
  TableOfOne(const StreamArgs& a, int64_t numel_, int64_t dim_)
      : numel(numel_), row_offset(a.row_offset), dim(dim_), stream(a.stream), offset{0, dim_} {
    table.n_segs = table.n_comps = 1;
    table.numel = &numel;
    table.row_offset = &row_offset;
    table.comp = &comp;
    table.dim = &dim;
    table.stream = &stream;
    table.offset = offset;
    table.col_offset = a.col_offset;
  }
  TableOfOne(const TableOfOne&) = delete;  // table points into this object
};

inline int64_t table_words(int64_t n_segs, int64_t n_comps) { return kTableHeader + 3 * n_segs + 3 * n_comps + 2; }

inline int64_t table_seal(const int64_t* words, int64_t n) {
  // A multiply-xorshift mix of each word, then a final avalanche: one pass, a few ns a word.
  uint64_t h = 0x9e3779b97f4a7c15ull ^ static_cast<uint64_t>(n);
  for (int64_t i = 0; i < n; ++i) {
    h = (h ^ static_cast<uint64_t>(words[i])) * 0xff51afd7ed558ccdull;
    h ^= h >> 29;
  }
  h *= 0xc4ceb9fe1a85ec53ull;
  h ^= h >> 32;
  return static_cast<int64_t>(h);
}

// Builds the table tensor, checking every rule once, in int64 arithmetic (a sum that would
// overflow is refused), with messages naming the argument and index at fault.
inline at::Tensor build_segment_table(at::IntArrayRef numels, at::IntArrayRef row_offsets,
                                      at::IntArrayRef compartments, at::IntArrayRef dims, at::IntArrayRef streams) {
  const int64_t n_segs = int64_t(numels.size()), n_comps = int64_t(dims.size());
  TORCH_CHECK_VALUE(n_segs > 0, "rbd_cuda: a segment table must hold at least one segment (numels is empty)");
  TORCH_CHECK_VALUE(int64_t(row_offsets.size()) == n_segs && int64_t(compartments.size()) == n_segs,
                    "rbd_cuda: row_offsets and compartments need one entry per segment (len(numels)=",
                    decimal(n_segs), "), got ", decimal(int64_t(row_offsets.size())), " and ",
                    decimal(int64_t(compartments.size())));
  TORCH_CHECK_VALUE(n_comps > 0 && int64_t(streams.size()) == n_comps,
                    "rbd_cuda: dims and streams need one entry per compartment (at least one), got ",
                    decimal(n_comps), " and ", decimal(int64_t(streams.size())));
  std::vector<int64_t> w;
  w.reserve(size_t(table_words(n_segs, n_comps)));
  w.insert(w.end(), {kTableMagic, n_segs, n_comps, 0});
  for (int64_t s = 0; s < n_segs; ++s) {
    TORCH_CHECK_VALUE(numels[s] >= 0 && numels[s] <= kMaxRows, "rbd_cuda: numels[", decimal(s),
                      "] must be in [0, 2**34] (the stream's row range), got ", decimal(numels[s]));
    w.push_back(numels[s]);
  }
  for (int64_t s = 0; s < n_segs; ++s) {
    TORCH_CHECK_VALUE(row_offsets[s] >= 0 && row_offsets[s] <= kMaxRows - numels[s], "rbd_cuda: row_offsets[",
                      decimal(s), "] must be in [0, 2**34 - numels[", decimal(s), "]], got ", decimal(row_offsets[s]));
    w.push_back(row_offsets[s]);
  }
  for (int64_t s = 0; s < n_segs; ++s) {
    TORCH_CHECK_VALUE(compartments[s] >= 0 && compartments[s] < n_comps, "rbd_cuda: compartments[", decimal(s),
                      "] must be in [0, len(dims)=", decimal(n_comps), "), got ", decimal(compartments[s]));
    w.push_back(compartments[s]);
  }
  for (int64_t k = 0; k < n_comps; ++k) {
    TORCH_CHECK_VALUE(dims[k] > 0 && dims[k] <= kMaxCols, "rbd_cuda: dims[", decimal(k),
                      "] must be in [1, 2**32] (the stream's column range), got ", decimal(dims[k]));
    w.push_back(dims[k]);
  }
  for (int64_t k = 0; k < n_comps; ++k) {
    TORCH_CHECK_VALUE(streams[k] >= 0 && streams[k] < (int64_t(1) << 32), "rbd_cuda: streams[", decimal(k),
                      "] must be in [0, 2**32), got ", decimal(streams[k]));
    w.push_back(streams[k]);
  }
  int64_t total = 0;
  w.push_back(0);
  for (int64_t k = 0; k < n_comps; ++k) {
    TORCH_CHECK_VALUE(!__builtin_add_overflow(total, dims[k], &total),
                      "rbd_cuda: sum(dims) must fit in int64, overflowed at dims[", decimal(k), "]");
    w.push_back(total);
  }
  w[3] = total;
  w.push_back(table_seal(w.data(), int64_t(w.size())));
  return at::tensor(w, at::TensorOptions().dtype(at::kLong));
}

// The table a product was handed, `name` its argument: a tensor segment_table built, unchanged
// since (its seal), whose total is `total` (the coefficients' count, which the products' schemas
// also take so that torch.compile knows the output's size without reading the table).
inline SegmentTable read_segment_table(const at::Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(t.scalar_type() == at::kLong && t.dim() == 1 && t.device().is_cpu() && t.is_contiguous() &&
                        t.numel() >= kTableHeader,
                    "rbd_cuda: ", name, " must be a segment table (rbd_cuda.SegmentPlan(...).table: a contiguous "
                    "1-D int64 CPU tensor), got ", t.scalar_type(), " of shape ", shape_string(t.sizes()), " on ",
                    t.device().str());
  const int64_t* w = t.data_ptr<int64_t>();
  const int64_t n_segs = w[1], n_comps = w[2];
  TORCH_CHECK_VALUE(w[0] == kTableMagic && n_segs > 0 && n_comps > 0 && n_segs < (int64_t(1) << 40) &&
                        n_comps < (int64_t(1) << 40) && t.numel() == table_words(n_segs, n_comps) &&
                        w[t.numel() - 1] == table_seal(w, t.numel() - 1),
                    "rbd_cuda: ", name, " is not a segment table as rbd_cuda.SegmentPlan (the op "
                    "torch.ops.rbd_cuda.segment_table) built it, or was changed since");
  SegmentTable tab;
  tab.n_segs = n_segs;
  tab.n_comps = n_comps;
  tab.numel = w + kTableHeader;
  tab.row_offset = tab.numel + n_segs;
  tab.comp = tab.row_offset + n_segs;
  tab.dim = tab.comp + n_segs;
  tab.stream = tab.dim + n_comps;
  tab.offset = tab.stream + n_comps;
  return tab;
}

inline void check_total(const SegmentTable& tab, int64_t total, const char* table_name) {
  TORCH_CHECK_VALUE(total == tab.total(), "rbd_cuda: total must be the ", table_name, "'s sum(dims)=",
                    decimal(tab.total()), ", got ", decimal(total));
}

// The tensors a product is handed for the table's segments (`name`: g or out): one per segment, of
// its numel, all of one floating dtype on one device.
inline void check_segments(at::TensorList tensors, const char* name, const SegmentTable& tab) {
  TORCH_CHECK_VALUE(int64_t(tensors.size()) == tab.n_segs, "rbd_cuda: ", name,
                    " needs one tensor per segment of the table (", decimal(tab.n_segs), "), got ",
                    decimal(int64_t(tensors.size())));
  for (int64_t s = 0; s < tab.n_segs; ++s) {
    const at::Tensor& t = tensors[s];
    check_float_input(t, name);
    TORCH_CHECK_VALUE(t.device() == tensors[0].device() && t.scalar_type() == tensors[0].scalar_type(),
                      "rbd_cuda: every tensor of ", name, " must have the device and dtype of ", name, "[0]; ",
                      name, "[", decimal(s), "] is ", t.scalar_type(), " on ", t.device().str());
    TORCH_CHECK_VALUE(t.numel() == tab.numel[s], "rbd_cuda: ", name, "[", decimal(s), "] has ",
                      decimal(t.numel()), " entries; the table's segment ", decimal(s), " has ",
                      decimal(tab.numel[s]));
  }
}

// The keys every segment of a call shares (seed, step, distribution), checked once per call.
inline StreamArgs shared_keys(int64_t seed, int64_t step, c10::string_view distribution) {
  return make_stream_args(0, 1, seed, step, 0, std::string(distribution), 0, 0);
}

}  // namespace rbd
