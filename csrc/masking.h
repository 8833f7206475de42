// rankwise._C sparse update-masking ops (CPU). Implemented in masking.cpp,
// bound in module.cpp.
//
// Conventions shared by every op:
// - A "packed" mask is a contiguous uint8 tensor of ceil(numel / 8) bytes; bit j
//   (LSB-first) of byte i is element 8 * i + j of the flattened tensor. Padding
//   bits of the last byte are always written as 0.
// - Scores are computed in fp32 whatever the storage dtype (fp32, fp16, bf16);
//   the score kind is a ScoreKind below (Python: rankwise.masking.Score).
// - Selection works on 32-bit unsigned keys that order like the scores; the key
//   mode is a KeyMode below (Python: rankwise.masking.Select), and the chosen
//   elements are always the k largest keys.
//   The ops take both as int64 codes (the enum values) and refuse others.
// - Ties at the threshold key are broken by position: the tensor that comes first
//   in the list, then the lower flat index, wins.
#pragma once

#include <torch/extension.h>

#include <tuple>
#include <vector>

namespace rankwise {

// What an element's score is; the same values as rankwise.masking.Score.
enum class ScoreKind : int64_t {
  kValue = 0,     // s = tuned
  kAbs = 1,       // s = |tuned - base|
  kRelative = 2,  // s = |tuned - base| / (|base| + 1e-8)
};

// How a score becomes a key; the same values as rankwise.masking.Select.
enum class KeyMode : int64_t {
  kTop = 0,     // key = order-preserving bits of s (NaN largest, -0 == +0)
  kBottom = 1,  // key = ~key(s), so the smallest scores have the largest keys
  kRandom = 2,  // key = upper 32 bits of splitmix64(salt(seed, stream) + index)
};

torch::Tensor pack_mask(const torch::Tensor& mask);
torch::Tensor unpack_mask(const torch::Tensor& packed, int64_t numel);
void apply_mask_(torch::Tensor& tensor, const torch::Tensor& packed);
int64_t mask_count(const torch::Tensor& packed, int64_t numel);

torch::Tensor compute_score(const torch::Tensor& base, const torch::Tensor& tuned, int64_t kind);
torch::Tensor compute_keys(const torch::Tensor& base, const torch::Tensor& tuned, int64_t kind,
                           int64_t mode, int64_t seed, int64_t stream);

// Element-wise splitmix64 of an int64 tensor of uint64 bit patterns: the CPU twin
// of rankwise.masking.keys.splitmix64, exposed so tests can compare them bit for bit.
torch::Tensor splitmix64(const torch::Tensor& z);

// Adds the 16-bit digit (key >> shift) & 0xFFFF of every element whose key
// satisfies (key & prefix_mask) == prefix into hist (int64[65536]).
void key_histogram_(torch::Tensor& hist, const torch::Tensor& base, const torch::Tensor& tuned,
                    int64_t kind, int64_t mode, int64_t seed, int64_t stream,
                    int64_t prefix_mask, int64_t prefix, int64_t shift);

// Walks a 65536-bin histogram from the largest digit down: (digit, rank) such
// that the k-th largest counted key has that digit and is its rank-th largest.
std::tuple<int64_t, int64_t> histogram_walk(const torch::Tensor& hist, int64_t k);

// Exact k-th largest key over a list of tensors (two histogram levels): returns
// (threshold key, ties) where the chosen elements are every key > threshold plus
// the first `ties` elements with key == threshold, in list order then index
// order. threshold == 2^32 (nothing chosen) when k == 0. With `sampled` and at
// least 2^22 elements, a sampled bracket usually makes it one read (see .cpp).
std::tuple<int64_t, int64_t> select_threshold(const std::vector<torch::Tensor>& bases,
                                              const std::vector<torch::Tensor>& tuneds, int64_t k, int64_t kind,
                                              int64_t mode, int64_t seed, const std::vector<int64_t>& streams,
                                              bool sampled = true);

// Packed mask of key > threshold plus the first tie_quota elements (by index)
// with key == threshold (tie_quota < 0: all of them); returns (packed, chosen
// count, ties taken, score sum of the chosen elements, score sum of all; the
// sums are 0 when with_stats is false).
std::tuple<torch::Tensor, int64_t, int64_t, double, double> build_mask(
    const torch::Tensor& base, const torch::Tensor& tuned, int64_t kind, int64_t mode, int64_t seed, int64_t stream,
    int64_t threshold, int64_t tie_quota, bool with_stats = true);

// out[i] = base[i] where the bit is set; elsewhere base + (out - base) * scale
// (left untouched when scale == 1).
void restore_(torch::Tensor& out, const torch::Tensor& base, const torch::Tensor& packed, double scale);

void masked_adamw_step_(torch::Tensor& param, const torch::Tensor& grad, torch::Tensor& exp_avg,
                        torch::Tensor& exp_avg_sq, const torch::Tensor& packed, double lr, double beta1,
                        double beta2, double eps, double weight_decay, int64_t step);

std::tuple<torch::Tensor, torch::Tensor> sparse_encode(const torch::Tensor& tensor, const torch::Tensor& packed);
torch::Tensor sparse_decode_(torch::Tensor& out, const torch::Tensor& index_bytes, const torch::Tensor& values);

}  // namespace rankwise
