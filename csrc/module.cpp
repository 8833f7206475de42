// rankwise._C: the C++ extension. One PYBIND11_MODULE block; the ops live in
// their own .cpp files (today only masking.cpp) and are declared in the header
// of the same name (masking.h).
#include <torch/extension.h>

#include "masking.h"

#ifdef _OPENMP
#include <omp.h>
#endif

static int64_t num_threads() {
#ifdef _OPENMP
  return omp_get_max_threads();
#else
  return 1;
#endif
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "rankwise C++ extension (CPU sparse update-masking ops)";
  m.def("num_threads", &num_threads,
        "Number of OpenMP threads the extension's parallel loops use.");

  // Sparse update masking (masking.cpp). Bit order: bit j (LSB-first) of byte i
  // is element 8*i + j. `kind` is a ScoreKind and `mode` a KeyMode code
  // (masking.h; rankwise.masking.Score and Select in Python).
  m.def("pack_mask", &rankwise::pack_mask, "pack_mask(mask: bool) -> uint8[ceil(n/8)], LSB-first bits",
        py::arg("mask"));
  m.def("unpack_mask", &rankwise::unpack_mask, "unpack_mask(packed, numel) -> bool[numel]", py::arg("packed"),
        py::arg("numel"));
  m.def("mask_count", &rankwise::mask_count, "mask_count(packed, numel) -> number of set bits",
        py::arg("packed"), py::arg("numel"));
  m.def("apply_mask_", &rankwise::apply_mask_, "apply_mask_(tensor, packed): zero, in place, where the bit is 0",
        py::arg("tensor"), py::arg("packed"));
  m.def("compute_score", &rankwise::compute_score, "compute_score(base, tuned, kind: ScoreKind code) -> fp32 score",
        py::arg("base"), py::arg("tuned"), py::arg("kind"));
  m.def("compute_keys", &rankwise::compute_keys,
        "compute_keys(base, tuned, kind, mode, seed, stream) -> int64 tensor of the 32-bit selection keys",
        py::arg("base"), py::arg("tuned"), py::arg("kind"), py::arg("mode"), py::arg("seed"), py::arg("stream"));
  m.def("splitmix64", &rankwise::splitmix64,
        "splitmix64(z: int64) -> int64: element-wise splitmix64 of uint64 bit patterns (the twin of "
        "rankwise.masking.keys.splitmix64)",
        py::arg("z"));
  m.def("key_histogram_", &rankwise::key_histogram_,
        "key_histogram_(hist, base, tuned, kind, mode, seed, stream, prefix_mask, prefix, shift): add the 16-bit "
        "digit (key >> shift) & 0xFFFF of every key with (key & prefix_mask) == prefix to hist (int64[65536])",
        py::arg("hist"), py::arg("base"), py::arg("tuned"), py::arg("kind"), py::arg("mode"), py::arg("seed"),
        py::arg("stream"), py::arg("prefix_mask"), py::arg("prefix"), py::arg("shift"));
  m.def("histogram_walk", &rankwise::histogram_walk,
        "histogram_walk(hist, k) -> (digit, rank) of the k-th largest counted key", py::arg("hist"), py::arg("k"));
  m.def("select_threshold", &rankwise::select_threshold,
        "select_threshold(bases, tuneds, k, kind, mode, seed, streams) -> (threshold key, ties to take): exact "
        "radix select of the k largest keys across a list of tensors",
        py::arg("bases"), py::arg("tuneds"), py::arg("k"), py::arg("kind"), py::arg("mode"), py::arg("seed"),
        py::arg("streams"), py::arg("sampled") = true);
  m.def("build_mask", &rankwise::build_mask,
        "build_mask(base, tuned, kind, mode, seed, stream, threshold, tie_quota) -> (packed, count, ties taken, "
        "chosen score sum, total score sum)",
        py::arg("base"), py::arg("tuned"), py::arg("kind"), py::arg("mode"), py::arg("seed"), py::arg("stream"),
        py::arg("threshold"), py::arg("tie_quota"), py::arg("with_stats") = true);
  m.def("restore_", &rankwise::restore_,
        "restore_(out, base, packed, scale): out = base where the bit is set, else base + (out - base) * scale",
        py::arg("out"), py::arg("base"), py::arg("packed"), py::arg("scale"));
  m.def("masked_adamw_step_", &rankwise::masked_adamw_step_,
        "masked_adamw_step_(param, grad, exp_avg, exp_avg_sq, packed, lr, beta1, beta2, eps, weight_decay, step): "
        "AdamW on the elements whose bit is set; the others are not touched",
        py::arg("param"), py::arg("grad"), py::arg("exp_avg"), py::arg("exp_avg_sq"), py::arg("packed"),
        py::arg("lr"), py::arg("beta1"), py::arg("beta2"), py::arg("eps"), py::arg("weight_decay"), py::arg("step"));
  m.def("sparse_encode", &rankwise::sparse_encode,
        "sparse_encode(tensor, packed) -> (index_bytes: LEB128 varints of index gaps, values at the set bits)",
        py::arg("tensor"), py::arg("packed"));
  m.def("sparse_decode_", &rankwise::sparse_decode_,
        "sparse_decode_(out, index_bytes, values) -> out with the encoded elements written back",
        py::arg("out"), py::arg("index_bytes"), py::arg("values"));
}
