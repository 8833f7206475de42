// Sparse update-masking ops on CPU tensors: bit-packed masks, scores, exact
// radix selection of the k largest keys across many tensors, mask building,
// restoration, a masked AdamW step and a sparse (delta-coded index) codec.
// See masking.h for the conventions (bit order, score kinds, key modes, ties).
#include "masking.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <functional>
#include <limits>
#include <type_traits>
#include <utility>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace rankwise {
namespace {

constexpr int64_t kChunk = 1 << 16;  // elements per parallel work item (multiple of 8)
constexpr int64_t kBins = 1 << 16;   // radix digit: 16 bits, two levels cover a 32-bit key
constexpr int64_t kNoThreshold = int64_t(1) << 32;

inline int max_threads() {
#ifdef _OPENMP
  return omp_get_max_threads();
#else
  return 1;
#endif
}

inline int thread_id() {
#ifdef _OPENMP
  return omp_get_thread_num();
#else
  return 0;
#endif
}

inline int64_t num_chunks(int64_t n) { return (n + kChunk - 1) / kChunk; }

// The splitmix64 step (Steele, Lea and Flood 2014). The CPU twin of
// rankwise.masking.keys.splitmix64, the package's one definition of it: the two
// must agree bit for bit (bound as rankwise._C.splitmix64 and tested so).
inline uint64_t mix64(uint64_t z) {
  z += 0x9E3779B97F4A7C15ull;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

// Per-tensor salt of the random key stream: key_i = hi32(mix64(salt + i)).
inline uint64_t stream_salt(int64_t seed, int64_t stream) {
  return mix64(static_cast<uint64_t>(seed) ^ mix64(static_cast<uint64_t>(stream)));
}

// Order-preserving map float -> uint32: a < b  <=>  key(a) < key(b). All NaNs
// map to the largest key (as torch.topk treats NaN as largest), -0 maps to +0.
inline uint32_t float_key(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  u = (f == 0.0f) ? 0u : u;
  // Negative: flip every bit; non-negative: set the sign bit. Branch-free.
  const uint32_t key = u ^ (static_cast<uint32_t>(static_cast<int32_t>(u) >> 31) | 0x80000000u);
  return (f != f) ? 0xFFFFFFFFu : key;
}

template <typename scalar_t, ScoreKind KIND>
inline float score_of(const scalar_t* a, const scalar_t* b, int64_t i) {
  if constexpr (KIND == ScoreKind::kValue) {
    return static_cast<float>(b[i]);
  } else {
    const float ta = static_cast<float>(a[i]);
    const float d = std::fabs(static_cast<float>(b[i]) - ta);
    if constexpr (KIND == ScoreKind::kAbs) {
      return d;
    } else {
      return d / (std::fabs(ta) + 1e-8f);
    }
  }
}

template <KeyMode MODE>
inline uint32_t key_from(float s, uint64_t salt, int64_t i) {
  if constexpr (MODE == KeyMode::kRandom) {
    return static_cast<uint32_t>(mix64(salt + static_cast<uint64_t>(i)) >> 32);
  } else if constexpr (MODE == KeyMode::kBottom) {
    return ~float_key(s);
  } else {
    return float_key(s);
  }
}

// The selection key of element i (random keys skip the score).
template <typename scalar_t, ScoreKind KIND, KeyMode MODE>
inline uint32_t key_at(const scalar_t* a, const scalar_t* b, uint64_t salt, int64_t i) {
  const float s = MODE == KeyMode::kRandom ? 0.0f : score_of<scalar_t, KIND>(a, b, i);
  return key_from<MODE>(s, salt, i);
}

// Compile-time score kinds and key modes, as the dispatcher passes them to the op bodies.
template <ScoreKind K>
using kind_c = std::integral_constant<ScoreKind, K>;
template <KeyMode M>
using mode_c = std::integral_constant<KeyMode, M>;

// dtype x score kind x key mode dispatch: calls f(scalar_t{}, kind_c<K>{}, mode_c<M>{}).
// Written without the AT_DISPATCH macros, so that the OpenMP pragmas in the op
// bodies are not inside macro arguments.
template <typename scalar_t, ScoreKind K, typename F>
void dispatch_mode(int64_t mode, F& f) {
  switch (static_cast<KeyMode>(mode)) {
    case KeyMode::kTop: f(scalar_t{}, kind_c<K>{}, mode_c<KeyMode::kTop>{}); break;
    case KeyMode::kBottom: f(scalar_t{}, kind_c<K>{}, mode_c<KeyMode::kBottom>{}); break;
    case KeyMode::kRandom: f(scalar_t{}, kind_c<K>{}, mode_c<KeyMode::kRandom>{}); break;
  }
}

template <typename scalar_t, typename F>
void dispatch_kind_mode(int64_t kind, int64_t mode, F& f) {
  switch (static_cast<ScoreKind>(kind)) {
    case ScoreKind::kValue: dispatch_mode<scalar_t, ScoreKind::kValue>(mode, f); break;
    case ScoreKind::kAbs: dispatch_mode<scalar_t, ScoreKind::kAbs>(mode, f); break;
    case ScoreKind::kRelative: dispatch_mode<scalar_t, ScoreKind::kRelative>(mode, f); break;
  }
}

template <typename F>
void dispatch_keys(at::ScalarType t, int64_t kind, int64_t mode, const char* op, F&& f) {
  TORCH_CHECK(kind >= 0 && kind <= 2, op, ": score kind must be 0 (value), 1 (abs) or 2 (relative), got ", kind);
  TORCH_CHECK(mode >= 0 && mode <= 2, op, ": selection mode must be 0 (top), 1 (bottom) or 2 (random), got ", mode);
  switch (t) {
    case at::kFloat: dispatch_kind_mode<float>(kind, mode, f); break;
    case at::kHalf: dispatch_kind_mode<at::Half>(kind, mode, f); break;
    case at::kBFloat16: dispatch_kind_mode<at::BFloat16>(kind, mode, f); break;
    case at::kDouble: dispatch_kind_mode<double>(kind, mode, f); break;
    default: TORCH_CHECK(false, op, ": unsupported dtype ", t, " (expected fp32, fp16 or bf16)");
  }
}

// dtype dispatch alone (ops with no keys): calls f(scalar_t{}).
template <typename F>
void dispatch_float(at::ScalarType t, const char* op, F&& f) {
  switch (t) {
    case at::kFloat: f(float{}); break;
    case at::kHalf: f(at::Half{}); break;
    case at::kBFloat16: f(at::BFloat16{}); break;
    case at::kDouble: f(double{}); break;
    default: TORCH_CHECK(false, op, ": unsupported dtype ", t, " (expected fp32, fp16 or bf16)");
  }
}

void check_float_tensor(const torch::Tensor& t, const char* op, const char* arg) {
  TORCH_CHECK(t.device().is_cpu(), op, ": ", arg, " must be a CPU tensor (CUDA tensors go through rankwise.kernels)");
  TORCH_CHECK(t.is_floating_point(), op, ": ", arg, " must be a floating-point tensor (fp32/fp16/bf16), got ",
              t.scalar_type());
  TORCH_CHECK(t.is_contiguous(), op, ": ", arg, " must be contiguous");
}

void check_pair(const torch::Tensor& base, const torch::Tensor& tuned, const char* op) {
  check_float_tensor(base, op, "base");
  check_float_tensor(tuned, op, "tuned");
  TORCH_CHECK(base.scalar_type() == tuned.scalar_type(), op, ": base and tuned must share a dtype, got ",
              base.scalar_type(), " and ", tuned.scalar_type());
  TORCH_CHECK(base.numel() == tuned.numel(), op, ": base and tuned must have the same number of elements, got ",
              base.numel(), " and ", tuned.numel());
}

void check_packed(const torch::Tensor& packed, int64_t numel, const char* op) {
  TORCH_CHECK(packed.device().is_cpu(), op, ": mask must be a CPU tensor");
  TORCH_CHECK(packed.scalar_type() == at::kByte, op, ": packed mask must be uint8, got ", packed.scalar_type());
  TORCH_CHECK(packed.is_contiguous(), op, ": packed mask must be contiguous");
  TORCH_CHECK(packed.numel() == (numel + 7) / 8, op, ": packed mask must have ceil(numel / 8) = ", (numel + 7) / 8,
              " bytes for ", numel, " elements, got ", packed.numel());
}

inline bool bit_at(const uint8_t* m, int64_t i) { return (m[i >> 3] >> (i & 7)) & 1; }

}  // namespace

// ---------------------------------------------------------------- bit masks

torch::Tensor pack_mask(const torch::Tensor& mask) {
  TORCH_CHECK(mask.device().is_cpu(), "pack_mask: mask must be a CPU tensor");
  TORCH_CHECK(mask.scalar_type() == at::kBool, "pack_mask: mask must be a bool tensor, got ", mask.scalar_type());
  auto m = mask.contiguous();
  const int64_t n = m.numel();
  const int64_t nbytes = (n + 7) / 8;
  auto out = torch::empty({nbytes}, torch::dtype(torch::kUInt8));
  const bool* src = m.data_ptr<bool>();
  uint8_t* dst = out.data_ptr<uint8_t>();
#pragma omp parallel for schedule(static) if (nbytes > 65536)
  for (int64_t j = 0; j < nbytes; ++j) {
    const int64_t lo = j * 8;
    const int64_t hi = std::min<int64_t>(lo + 8, n);
    uint8_t byte = 0;
    for (int64_t i = lo; i < hi; ++i) byte |= static_cast<uint8_t>(src[i] ? 1 : 0) << (i - lo);
    dst[j] = byte;
  }
  return out;
}

torch::Tensor unpack_mask(const torch::Tensor& packed, int64_t numel) {
  TORCH_CHECK(numel >= 0, "unpack_mask: numel must be >= 0, got ", numel);
  check_packed(packed, numel, "unpack_mask");
  auto out = torch::empty({numel}, torch::dtype(torch::kBool));
  const uint8_t* src = packed.data_ptr<uint8_t>();
  bool* dst = out.data_ptr<bool>();
#pragma omp parallel for schedule(static) if (numel > 524288)
  for (int64_t i = 0; i < numel; ++i) dst[i] = bit_at(src, i);
  return out;
}

int64_t mask_count(const torch::Tensor& packed, int64_t numel) {
  check_packed(packed, numel, "mask_count");
  const uint8_t* m = packed.data_ptr<uint8_t>();
  const int64_t full = numel / 8;
  int64_t total = 0;
#pragma omp parallel for schedule(static) reduction(+ : total) if (full > 65536)
  for (int64_t j = 0; j < full; ++j) total += __builtin_popcount(m[j]);
  for (int64_t i = full * 8; i < numel; ++i) total += bit_at(m, i);
  return total;
}

template <typename word_t>
static void zero_unmasked(word_t* x, const uint8_t* m, int64_t n) {
#pragma omp parallel for schedule(static) if (n > 524288)
  for (int64_t j = 0; j < (n + 7) / 8; ++j) {
    const uint8_t byte = m[j];
    if (byte == 0xFF) continue;
    const int64_t lo = j * 8;
    const int64_t hi = std::min<int64_t>(lo + 8, n);
    for (int64_t i = lo; i < hi; ++i)
      if (!((byte >> (i - lo)) & 1)) x[i] = word_t(0);
  }
}

void apply_mask_(torch::Tensor& tensor, const torch::Tensor& packed) {
  check_float_tensor(tensor, "apply_mask_", "tensor");
  check_packed(packed, tensor.numel(), "apply_mask_");
  const int64_t n = tensor.numel();
  const uint8_t* m = packed.data_ptr<uint8_t>();
  // Zeroing is a bit pattern of all zeros in every IEEE format, so dispatch on width.
  switch (tensor.element_size()) {
    case 2: zero_unmasked(reinterpret_cast<uint16_t*>(tensor.data_ptr()), m, n); break;
    case 4: zero_unmasked(reinterpret_cast<uint32_t*>(tensor.data_ptr()), m, n); break;
    case 8: zero_unmasked(reinterpret_cast<uint64_t*>(tensor.data_ptr()), m, n); break;
    default: TORCH_CHECK(false, "apply_mask_: unsupported element size ", tensor.element_size());
  }
}

// ---------------------------------------------------------------- scores and keys

torch::Tensor compute_score(const torch::Tensor& base, const torch::Tensor& tuned, int64_t kind) {
  check_pair(base, tuned, "compute_score");
  const int64_t n = tuned.numel();
  auto out = torch::empty(tuned.sizes(), torch::dtype(torch::kFloat32));
  float* o = out.data_ptr<float>();
  dispatch_keys(tuned.scalar_type(), kind, 0, "compute_score", [&](auto tag, auto K, auto) {
    using scalar_t = decltype(tag);
    constexpr ScoreKind KIND = decltype(K)::value;
    const scalar_t* a = base.data_ptr<scalar_t>();
    const scalar_t* b = tuned.data_ptr<scalar_t>();
#pragma omp parallel for schedule(static) if (n > 65536)
    for (int64_t i = 0; i < n; ++i) o[i] = score_of<scalar_t, KIND>(a, b, i);
  });
  return out;
}

torch::Tensor compute_keys(const torch::Tensor& base, const torch::Tensor& tuned, int64_t kind, int64_t mode,
                           int64_t seed, int64_t stream) {
  check_pair(base, tuned, "compute_keys");
  const int64_t n = tuned.numel();
  auto out = torch::empty(tuned.sizes(), torch::dtype(torch::kInt64));
  int64_t* o = out.data_ptr<int64_t>();
  const uint64_t salt = stream_salt(seed, stream);
  dispatch_keys(tuned.scalar_type(), kind, mode, "compute_keys", [&](auto tag, auto K, auto M) {
    using scalar_t = decltype(tag);
    constexpr ScoreKind KIND = decltype(K)::value;
    constexpr KeyMode MODE = decltype(M)::value;
    const scalar_t* a = base.data_ptr<scalar_t>();
    const scalar_t* b = tuned.data_ptr<scalar_t>();
#pragma omp parallel for schedule(static) if (n > 65536)
    for (int64_t i = 0; i < n; ++i) o[i] = static_cast<int64_t>(key_at<scalar_t, KIND, MODE>(a, b, salt, i));
  });
  return out;
}

torch::Tensor splitmix64(const torch::Tensor& z) {
  TORCH_CHECK(z.device().is_cpu() && z.scalar_type() == at::kLong,
              "splitmix64: z must be a CPU int64 tensor (uint64 bit patterns), got ", z.scalar_type());
  auto zc = z.contiguous();
  auto out = torch::empty_like(zc);
  const int64_t* src = zc.data_ptr<int64_t>();
  int64_t* dst = out.data_ptr<int64_t>();
  const int64_t n = zc.numel();
#pragma omp parallel for schedule(static) if (n > 65536)
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<int64_t>(mix64(static_cast<uint64_t>(src[i])));
  return out;
}

// ---------------------------------------------------------------- radix selection

// Adds the 16-bit digit of every key in [lo, hi) that matches the prefix to L
// (int64 for the serial path, a thread's private uint32 histogram otherwise).
template <typename scalar_t, ScoreKind KIND, KeyMode MODE, typename count_t>
static void count_digits(const scalar_t* a, const scalar_t* b, uint64_t salt, int64_t lo, int64_t hi,
                         uint32_t prefix_mask, uint32_t prefix, int shift, count_t* L) {
  for (int64_t i = lo; i < hi; ++i) {
    const uint32_t key = key_at<scalar_t, KIND, MODE>(a, b, salt, i);
    if ((key & prefix_mask) == prefix) ++L[(key >> shift) & 0xFFFFu];
  }
}

void key_histogram_(torch::Tensor& hist, const torch::Tensor& base, const torch::Tensor& tuned, int64_t kind,
                    int64_t mode, int64_t seed, int64_t stream, int64_t prefix_mask, int64_t prefix,
                    int64_t shift) {
  check_pair(base, tuned, "key_histogram_");
  TORCH_CHECK(hist.device().is_cpu() && hist.scalar_type() == at::kLong && hist.is_contiguous() &&
                  hist.numel() == kBins,
              "key_histogram_: hist must be a contiguous CPU int64 tensor of 65536 bins");
  TORCH_CHECK(shift == 0 || shift == 16, "key_histogram_: shift must be 0 or 16, got ", shift);
  const uint32_t pm = static_cast<uint32_t>(prefix_mask);
  const uint32_t pv = static_cast<uint32_t>(prefix);
  const int sh = static_cast<int>(shift);
  const int64_t n = tuned.numel();
  const uint64_t salt = stream_salt(seed, stream);
  int64_t* H = hist.data_ptr<int64_t>();
  const int nt = max_threads();
  dispatch_keys(tuned.scalar_type(), kind, mode, "key_histogram_", [&](auto tag, auto K, auto M) {
    using scalar_t = decltype(tag);
    constexpr ScoreKind KIND = decltype(K)::value;
    constexpr KeyMode MODE = decltype(M)::value;
    const scalar_t* a = base.data_ptr<scalar_t>();
    const scalar_t* b = tuned.data_ptr<scalar_t>();
    if (n <= kChunk || nt <= 1) {
      count_digits<scalar_t, KIND, MODE>(a, b, salt, 0, n, pm, pv, sh, H);
      return;
    }
    // One private uint32 histogram per thread (256 KiB, cache-friendly), summed
    // into the int64 output after each slice of < 2^32 elements: no atomics.
    std::vector<uint32_t> local(static_cast<size_t>(nt) * kBins);
    constexpr int64_t kSlice = int64_t(1) << 31;
    for (int64_t s0 = 0; s0 < n; s0 += kSlice) {
      const int64_t s1 = std::min(n, s0 + kSlice);
      std::fill(local.begin(), local.end(), 0u);
      const int64_t nc = (s1 - s0 + kChunk - 1) / kChunk;
#pragma omp parallel
      {
        uint32_t* L = local.data() + static_cast<size_t>(thread_id()) * kBins;
#pragma omp for schedule(static)
        for (int64_t c = 0; c < nc; ++c) {
          const int64_t lo = s0 + c * kChunk;
          count_digits<scalar_t, KIND, MODE>(a, b, salt, lo, std::min(s1, lo + kChunk), pm, pv, sh, L);
        }
      }
      for (int t = 0; t < nt; ++t) {
        const uint32_t* L = local.data() + static_cast<size_t>(t) * kBins;
        for (int64_t j = 0; j < kBins; ++j) H[j] += L[j];
      }
    }
  });
}

// Walks a histogram from its largest digit down: returns (digit, rank) such that
// the k-th largest key has that digit and is the rank-th largest (1-based) of it.
std::tuple<int64_t, int64_t> histogram_walk(const torch::Tensor& hist, int64_t k) {
  TORCH_CHECK(hist.scalar_type() == at::kLong && hist.numel() == kBins && hist.is_contiguous(),
              "histogram_walk: hist must be a contiguous int64 tensor of 65536 bins");
  TORCH_CHECK(k >= 1, "histogram_walk: k must be >= 1, got ", k);
  const int64_t* H = hist.data_ptr<int64_t>();
  int64_t above = 0;
  for (int64_t d = kBins - 1; d >= 0; --d) {
    if (above + H[d] >= k) return {d, k - above};
    above += H[d];
  }
  TORCH_CHECK(false, "histogram_walk: k = ", k, " exceeds the ", above, " counted elements");
  return {0, 0};
}

namespace {

// Keys of one tensor at the given flat offsets (the sample of select_threshold).
void keys_at(const torch::Tensor& base, const torch::Tensor& tuned, int64_t kind, int64_t mode, int64_t seed,
             int64_t stream, const int64_t* offs, int64_t count, uint32_t* out) {
  const uint64_t salt = stream_salt(seed, stream);
  dispatch_keys(tuned.scalar_type(), kind, mode, "select_threshold", [&](auto tag, auto K, auto M) {
    using scalar_t = decltype(tag);
    constexpr ScoreKind KIND = decltype(K)::value;
    constexpr KeyMode MODE = decltype(M)::value;
    const scalar_t* a = base.data_ptr<scalar_t>();
    const scalar_t* b = tuned.data_ptr<scalar_t>();
    for (int64_t j = 0; j < count; ++j) out[j] = key_at<scalar_t, KIND, MODE>(a, b, salt, offs[j]);
  });
}

// One read: the number of keys > hi and (up to cap of) the keys in [lo, hi].
// Returns false when more than cap keys fall in the window.
bool window_pass(const torch::Tensor& base, const torch::Tensor& tuned, int64_t kind, int64_t mode, int64_t seed,
                 int64_t stream, uint32_t lo, uint32_t hi, size_t cap, int64_t& above,
                 std::vector<uint32_t>& cand) {
  const int64_t n = tuned.numel();
  const uint64_t salt = stream_salt(seed, stream);
  bool ok = true;
  dispatch_keys(tuned.scalar_type(), kind, mode, "select_threshold", [&](auto tag, auto K, auto M) {
    using scalar_t = decltype(tag);
    constexpr ScoreKind KIND = decltype(K)::value;
    constexpr KeyMode MODE = decltype(M)::value;
    const scalar_t* a = base.data_ptr<scalar_t>();
    const scalar_t* b = tuned.data_ptr<scalar_t>();
    const int64_t nc = num_chunks(n);
    int64_t above_local = 0;
    const uint32_t width = hi - lo;  // key in [lo, hi]  <=>  key - lo <= width (unsigned)
#pragma omp parallel reduction(+ : above_local)
    {
      std::vector<uint32_t> mine;
      std::vector<uint32_t> buf(static_cast<size_t>(kChunk));
#pragma omp for schedule(static) nowait
      for (int64_t c = 0; c < nc; ++c) {
        int64_t cnt = 0;
        size_t m = 0;
        uint32_t* B = buf.data();
        for (int64_t i = c * kChunk, e = std::min(n, (c + 1) * kChunk); i < e; ++i) {
          const uint32_t key = key_at<scalar_t, KIND, MODE>(a, b, salt, i);
          cnt += key > hi;
          B[m] = key;  // branch-free append: keep the slot only when inside
          m += (key - lo) <= width;
        }
        above_local += cnt;
        if (mine.size() <= cap) mine.insert(mine.end(), B, B + m);
      }
#pragma omp critical
      {
        if (ok && cand.size() + mine.size() <= cap) {
          cand.insert(cand.end(), mine.begin(), mine.end());
        } else {
          ok = false;
        }
      }
    }
    above += above_local;
  });
  return ok;
}

}  // namespace

std::tuple<int64_t, int64_t> select_threshold(const std::vector<torch::Tensor>& bases,
                                              const std::vector<torch::Tensor>& tuneds, int64_t k, int64_t kind,
                                              int64_t mode, int64_t seed, const std::vector<int64_t>& streams,
                                              bool sampled) {
  TORCH_CHECK(bases.size() == tuneds.size() && tuneds.size() == streams.size(),
              "select_threshold: bases, tuneds and streams must have the same length");
  int64_t n = 0;
  for (size_t t = 0; t < tuneds.size(); ++t) {
    check_pair(bases[t], tuneds[t], "select_threshold");
    n += tuneds[t].numel();
  }
  TORCH_CHECK(k >= 0 && k <= n, "select_threshold: k must be in [0, ", n, "], got ", k);
  if (k == 0) return {kNoThreshold, 0};
  if (sampled && n >= (int64_t(1) << 22)) {
    // Fast path, one read: a stratified sample of S keys brackets the k-th largest
    // key in [lo, hi] (+-4 standard deviations of its sample rank); one pass counts
    // the keys above hi and collects those inside; the exact k-th largest is then
    // selected among the few collected. If the bracket misses (or holds too many
    // keys, e.g. heavy ties), fall through to the two-level radix select.
    constexpr int64_t S = int64_t(1) << 16;
    std::vector<uint32_t> sample(S);
    std::vector<int64_t> offs;
    int64_t start = 0, j = 0;
    for (size_t t = 0; t < tuneds.size(); ++t) {
      const int64_t m = tuneds[t].numel();
      offs.clear();
      for (; j < S; ++j) {
        const int64_t g = static_cast<int64_t>((static_cast<double>(j) + 0.5) * static_cast<double>(n) / S);
        if (g >= start + m) break;
        offs.push_back(g - start);
      }
      keys_at(bases[t], tuneds[t], kind, mode, seed, streams[t], offs.data(), static_cast<int64_t>(offs.size()),
              sample.data() + (j - static_cast<int64_t>(offs.size())));
      start += m;
    }
    std::sort(sample.begin(), sample.end(), std::greater<uint32_t>());
    const double p = static_cast<double>(k) / static_cast<double>(n);
    const double r = p * S;
    const double delta = 4.0 * std::sqrt(S * p * (1.0 - p)) + 16.0;
    const int64_t hi_i = static_cast<int64_t>(std::floor(r - delta));
    const int64_t lo_i = static_cast<int64_t>(std::ceil(r + delta));
    const uint32_t hi = hi_i < 0 ? 0xFFFFFFFFu : sample[hi_i];
    const uint32_t lo = lo_i >= S ? 0u : sample[lo_i];
    const size_t cap = static_cast<size_t>(
        std::max(1.0e6, 4.0 * static_cast<double>(n) * (std::min<double>(lo_i, S) - std::max<int64_t>(hi_i, 0)) / S));
    int64_t above = 0;
    std::vector<uint32_t> cand;
    bool ok = true;
    for (size_t t = 0; t < tuneds.size() && ok; ++t)
      ok = window_pass(bases[t], tuneds[t], kind, mode, seed, streams[t], lo, hi, cap, above, cand);
    const int64_t nc = static_cast<int64_t>(cand.size());
    if (ok && above < k && above + nc >= k) {
      const int64_t need = k - above;  // the need-th largest candidate
      std::nth_element(cand.begin(), cand.begin() + (need - 1), cand.end(), std::greater<uint32_t>());
      const uint32_t thr = cand[need - 1];
      int64_t greater = 0;
      for (const uint32_t c : cand) greater += c > thr;
      return {static_cast<int64_t>(thr), need - greater};
    }
  }
  // Level 1: high 16 bits of every key; level 2: low 16 bits of the keys whose
  // high digit holds the k-th largest. Two reads of the data, no concatenation.
  auto hist = torch::zeros({kBins}, torch::dtype(torch::kInt64));
  for (size_t t = 0; t < tuneds.size(); ++t)
    key_histogram_(hist, bases[t], tuneds[t], kind, mode, seed, streams[t], 0, 0, 16);
  const auto [high, k2] = histogram_walk(hist, k);
  hist.zero_();
  for (size_t t = 0; t < tuneds.size(); ++t)
    key_histogram_(hist, bases[t], tuneds[t], kind, mode, seed, streams[t], 0xFFFF0000LL, high << 16, 0);
  const auto [low, rank] = histogram_walk(hist, k2);
  return {(high << 16) | low, rank};
}

// ---------------------------------------------------------------- masks from a threshold

namespace {

// One mask byte: the chosen bits of up to 8 elements, the ties among them, and
// their fp32 score sums (0 unless STATS).
struct MaskByte {
  uint32_t bits;
  int64_t ties;
  float score_sum;
  float chosen_sum;
};

// The mask byte of elements [j, j + count). FULL (count == 8) gives the compiler
// a constant trip count to unroll; the tail byte of a chunk takes the other
// instantiation of the same body. Every tie is chosen unless take_ties is false.
template <typename scalar_t, ScoreKind KIND, KeyMode MODE, bool STATS, bool FULL>
inline MaskByte mask_byte(const scalar_t* a, const scalar_t* b, uint64_t salt, int64_t j, int count,
                          int64_t threshold, bool take_ties) {
  const int e = FULL ? 8 : count;
  uint32_t bits = 0;
  int64_t ties = 0;
  float all = 0.0f, chosen_sum = 0.0f;
  for (int q = 0; q < e; ++q) {
    const float sc = score_of<scalar_t, KIND>(a, b, j + q);
    const int64_t key = static_cast<int64_t>(key_from<MODE>(sc, salt, j + q));
    const bool eq = key == threshold;
    const bool ch = (key > threshold) | (eq & take_ties);
    ties += eq;
    bits |= static_cast<uint32_t>(ch) << q;
    if constexpr (STATS) {
      all += sc;
      chosen_sum += sc * static_cast<float>(ch);  // branch-free
    }
  }
  return {bits, ties, all, chosen_sum};
}

// What pass 1 found in one chunk (and, summed, in the tensor).
struct ChunkCounts {
  int64_t selected;
  int64_t ties;
  double chosen_sum;
  double score_sum;
};

// Pass 1 over the chunk [lo, hi) (lo a multiple of 8): writes its mask bytes.
// The running counts are plain locals returned by value, not references into
// the caller or lambda captures: the byte stores through uint8_t* may alias
// anything whose address escapes, which would force a reload of every
// accumulator after each byte.
template <typename scalar_t, ScoreKind KIND, KeyMode MODE, bool STATS>
ChunkCounts mask_chunk(const scalar_t* a, const scalar_t* b, uint64_t salt, int64_t lo, int64_t hi,
                       int64_t threshold, bool take_ties, uint8_t* P) {
  int64_t selected = 0, ties = 0;
  double chosen = 0.0, all = 0.0;
  for (int64_t j = lo; j < hi; j += 8) {
    const int e = static_cast<int>(std::min<int64_t>(8, hi - j));
    const MaskByte m = e == 8 ? mask_byte<scalar_t, KIND, MODE, STATS, true>(a, b, salt, j, 8, threshold, take_ties)
                              : mask_byte<scalar_t, KIND, MODE, STATS, false>(a, b, salt, j, e, threshold, take_ties);
    P[j >> 3] = static_cast<uint8_t>(m.bits);
    selected += __builtin_popcount(m.bits);
    ties += m.ties;
    chosen += m.chosen_sum;
    all += m.score_sum;
  }
  return {selected, ties, chosen, all};
}

// Pass 2 over the chunk [lo, hi): keeps its first `keep` ties in index order and
// clears the others; returns how many it cleared and their score sum.
template <typename scalar_t, ScoreKind KIND, KeyMode MODE>
std::pair<int64_t, double> clear_extra_ties(const scalar_t* a, const scalar_t* b, uint64_t salt, int64_t lo,
                                            int64_t hi, int64_t threshold, int64_t keep, uint8_t* P) {
  int64_t seen = 0, cleared = 0;
  double cleared_sum = 0.0;
  for (int64_t i = lo; i < hi; ++i) {
    const float sc = score_of<scalar_t, KIND>(a, b, i);
    if (static_cast<int64_t>(key_from<MODE>(sc, salt, i)) != threshold) continue;
    if (seen++ >= keep) {
      P[i >> 3] &= static_cast<uint8_t>(~(1u << (i & 7)));
      ++cleared;
      cleared_sum += sc;
    }
  }
  return {cleared, cleared_sum};
}

struct MaskResult {
  int64_t selected;
  int64_t ties_taken;
  double chosen_sum;
  double score_sum;
};

// build_mask for one dtype, score kind, key mode and stats flag: pass 1 over all
// chunks in parallel, then pass 2 over the chunks holding ties beyond the quota.
template <typename scalar_t, ScoreKind KIND, KeyMode MODE, bool STATS>
MaskResult build_mask_typed(const scalar_t* a, const scalar_t* b, int64_t n, uint64_t salt, int64_t threshold,
                            int64_t tie_quota, uint8_t* P) {
  const int64_t nc = num_chunks(n);
  const bool take_ties = tie_quota != 0;
  std::vector<int64_t> ties(nc, 0);
  int64_t selected = 0;
  double chosen_sum = 0.0, score_sum = 0.0;
#pragma omp parallel for schedule(static) reduction(+ : selected, chosen_sum, score_sum) if (nc > 1)
  for (int64_t c = 0; c < nc; ++c) {
    const int64_t lo = c * kChunk;
    const ChunkCounts cc =
        mask_chunk<scalar_t, KIND, MODE, STATS>(a, b, salt, lo, std::min(n, lo + kChunk), threshold, take_ties, P);
    selected += cc.selected;
    chosen_sum += cc.chosen_sum;
    score_sum += cc.score_sum;
    ties[c] = cc.ties;
  }
  int64_t all_ties = 0;
  for (int64_t c = 0; c < nc; ++c) all_ties += ties[c];
  if (!take_ties || tie_quota < 0 || all_ties <= tie_quota) {
    return {selected, take_ties ? all_ties : 0, chosen_sum, score_sum};
  }
  std::vector<int64_t> keep(nc, 0);  // the first tie_quota ties in index order
  int64_t left = tie_quota;
  for (int64_t c = 0; c < nc; ++c) {
    keep[c] = std::min(ties[c], left);
    left -= keep[c];
  }
  int64_t cleared = 0;
  double cleared_sum = 0.0;
#pragma omp parallel for schedule(dynamic) reduction(+ : cleared, cleared_sum) if (nc > 1)
  for (int64_t c = 0; c < nc; ++c) {
    if (keep[c] == ties[c]) continue;
    const int64_t lo = c * kChunk;
    const auto [cl, cl_sum] =
        clear_extra_ties<scalar_t, KIND, MODE>(a, b, salt, lo, std::min(n, lo + kChunk), threshold, keep[c], P);
    cleared += cl;
    cleared_sum += cl_sum;
  }
  return {selected - cleared, tie_quota, chosen_sum - cleared_sum, score_sum};
}

}  // namespace

std::tuple<torch::Tensor, int64_t, int64_t, double, double> build_mask(
    const torch::Tensor& base, const torch::Tensor& tuned, int64_t kind, int64_t mode, int64_t seed, int64_t stream,
    int64_t threshold, int64_t tie_quota, bool with_stats) {
  check_pair(base, tuned, "build_mask");
  TORCH_CHECK(threshold >= 0 && threshold <= kNoThreshold, "build_mask: threshold must be in [0, 2^32], got ",
              threshold);
  const int64_t n = tuned.numel();
  const uint64_t salt = stream_salt(seed, stream);
  auto packed = torch::empty({(n + 7) / 8}, torch::dtype(torch::kUInt8));
  uint8_t* P = packed.data_ptr<uint8_t>();
  MaskResult r{};
  dispatch_keys(tuned.scalar_type(), kind, mode, "build_mask", [&](auto tag, auto K, auto M) {
    using scalar_t = decltype(tag);
    constexpr ScoreKind KIND = decltype(K)::value;
    constexpr KeyMode MODE = decltype(M)::value;
    const scalar_t* a = base.data_ptr<scalar_t>();
    const scalar_t* b = tuned.data_ptr<scalar_t>();
    r = with_stats ? build_mask_typed<scalar_t, KIND, MODE, true>(a, b, n, salt, threshold, tie_quota, P)
                   : build_mask_typed<scalar_t, KIND, MODE, false>(a, b, n, salt, threshold, tie_quota, P);
  });
  return {packed, r.selected, r.ties_taken, r.chosen_sum, r.score_sum};
}

void restore_(torch::Tensor& out, const torch::Tensor& base, const torch::Tensor& packed, double scale) {
  check_pair(base, out, "restore_");
  check_packed(packed, out.numel(), "restore_");
  const int64_t n = out.numel();
  const uint8_t* m = packed.data_ptr<uint8_t>();
  dispatch_float(out.scalar_type(), "restore_", [&](auto tag) {
    using scalar_t = decltype(tag);
    scalar_t* o = out.data_ptr<scalar_t>();
    const scalar_t* a = base.data_ptr<scalar_t>();
    const float sc = static_cast<float>(scale);
    const bool rescale = scale != 1.0;
#pragma omp parallel for schedule(static) if (n > 65536)
    for (int64_t i = 0; i < n; ++i) {
      if (bit_at(m, i)) {
        o[i] = a[i];
      } else if (rescale) {
        const float ta = static_cast<float>(a[i]);
        o[i] = static_cast<scalar_t>(ta + (static_cast<float>(o[i]) - ta) * sc);
      }
    }
  });
}

// ---------------------------------------------------------------- masked AdamW

void masked_adamw_step_(torch::Tensor& param, const torch::Tensor& grad, torch::Tensor& exp_avg,
                        torch::Tensor& exp_avg_sq, const torch::Tensor& packed, double lr, double beta1,
                        double beta2, double eps, double weight_decay, int64_t step) {
  check_float_tensor(param, "masked_adamw_step_", "param");
  check_float_tensor(grad, "masked_adamw_step_", "grad");
  TORCH_CHECK(grad.scalar_type() == param.scalar_type() && grad.numel() == param.numel(),
              "masked_adamw_step_: grad must match param in dtype and numel");
  for (const torch::Tensor* s : {&exp_avg, &exp_avg_sq}) {
    TORCH_CHECK(s->device().is_cpu() && s->scalar_type() == at::kFloat && s->is_contiguous() &&
                    s->numel() == param.numel(),
                "masked_adamw_step_: exp_avg and exp_avg_sq must be contiguous fp32 CPU tensors of param's numel");
  }
  check_packed(packed, param.numel(), "masked_adamw_step_");
  TORCH_CHECK(step >= 1, "masked_adamw_step_: step must be >= 1, got ", step);
  const int64_t n = param.numel();
  const uint8_t* m = packed.data_ptr<uint8_t>();
  float* ma = exp_avg.data_ptr<float>();
  float* va = exp_avg_sq.data_ptr<float>();
  // Same order of operations as torch.optim.AdamW (single-tensor path):
  //   p *= 1 - lr * wd;  m += (1 - b1) * (g - m);  v = v * b2 + (1 - b2) * g * g
  //   p -= lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)
  const float decay = static_cast<float>(1.0 - lr * weight_decay);
  const float w1 = static_cast<float>(1.0 - beta1);
  const float b2 = static_cast<float>(beta2);
  const float w2 = static_cast<float>(1.0 - beta2);
  const float step_size = static_cast<float>(lr / (1.0 - std::pow(beta1, static_cast<double>(step))));
  const float bc2_sqrt = static_cast<float>(std::sqrt(1.0 - std::pow(beta2, static_cast<double>(step))));
  const float epsf = static_cast<float>(eps);
  dispatch_float(param.scalar_type(), "masked_adamw_step_", [&](auto tag) {
    using scalar_t = decltype(tag);
    scalar_t* p = param.data_ptr<scalar_t>();
    const scalar_t* g = grad.data_ptr<scalar_t>();
#pragma omp parallel for schedule(static) if (n > 65536)
    for (int64_t j = 0; j < (n + 7) / 8; ++j) {
      const uint8_t byte = m[j];
      if (byte == 0) continue;
      const int64_t lo = j * 8;
      const int64_t hi = std::min<int64_t>(lo + 8, n);
      for (int64_t i = lo; i < hi; ++i) {
        if (!((byte >> (i - lo)) & 1)) continue;
        const float gi = static_cast<float>(g[i]);
        float pi = static_cast<float>(p[i]) * decay;
        const float mi = ma[i] + w1 * (gi - ma[i]);
        const float vi = va[i] * b2 + w2 * gi * gi;
        ma[i] = mi;
        va[i] = vi;
        pi -= step_size * (mi / (std::sqrt(vi) / bc2_sqrt + epsf));
        p[i] = static_cast<scalar_t>(pi);
      }
    }
  });
}

// ---------------------------------------------------------------- sparse codec

std::tuple<torch::Tensor, torch::Tensor> sparse_encode(const torch::Tensor& tensor, const torch::Tensor& packed) {
  check_float_tensor(tensor, "sparse_encode", "tensor");
  check_packed(packed, tensor.numel(), "sparse_encode");
  const int64_t n = tensor.numel();
  const int64_t count = mask_count(packed, n);
  const uint8_t* m = packed.data_ptr<uint8_t>();
  auto values = torch::empty({count}, tensor.options());
  std::vector<uint8_t> bytes;
  bytes.reserve(static_cast<size_t>(count) + 16);
  const int64_t esize = tensor.element_size();
  const char* src = static_cast<const char*>(tensor.data_ptr());
  char* dst = static_cast<char*>(values.data_ptr());
  int64_t prev = -1, j = 0;
  for (int64_t byte_i = 0; byte_i < (n + 7) / 8; ++byte_i) {
    uint8_t byte = m[byte_i];
    while (byte) {
      const int bit = __builtin_ctz(byte);
      byte &= byte - 1;
      const int64_t i = byte_i * 8 + bit;
      if (i >= n) break;
      // LEB128 varint of the gap to the previous index, minus one.
      uint64_t gap = static_cast<uint64_t>(i - prev - 1);
      do {
        uint8_t b7 = gap & 0x7F;
        gap >>= 7;
        bytes.push_back(gap ? (b7 | 0x80) : b7);
      } while (gap);
      std::memcpy(dst + j * esize, src + i * esize, esize);
      prev = i;
      ++j;
    }
  }
  auto index_bytes = torch::empty({static_cast<int64_t>(bytes.size())}, torch::dtype(torch::kUInt8));
  if (!bytes.empty()) std::memcpy(index_bytes.data_ptr<uint8_t>(), bytes.data(), bytes.size());
  return {index_bytes, values};
}

torch::Tensor sparse_decode_(torch::Tensor& out, const torch::Tensor& index_bytes, const torch::Tensor& values) {
  check_float_tensor(out, "sparse_decode_", "out");
  TORCH_CHECK(index_bytes.device().is_cpu() && index_bytes.scalar_type() == at::kByte && index_bytes.is_contiguous(),
              "sparse_decode_: index_bytes must be a contiguous CPU uint8 tensor");
  TORCH_CHECK(values.device().is_cpu() && values.scalar_type() == out.scalar_type() && values.is_contiguous(),
              "sparse_decode_: values must be a contiguous CPU tensor of out's dtype");
  const int64_t n = out.numel();
  const int64_t count = values.numel();
  const int64_t nb = index_bytes.numel();
  const uint8_t* ib = index_bytes.data_ptr<uint8_t>();
  const int64_t esize = out.element_size();
  const char* src = static_cast<const char*>(values.data_ptr());
  char* dst = static_cast<char*>(out.data_ptr());
  int64_t pos = 0, prev = -1;
  for (int64_t j = 0; j < count; ++j) {
    uint64_t gap = 0;
    int shift = 0;
    while (true) {
      TORCH_CHECK(pos < nb, "sparse_decode_: index_bytes ended after ", j, " of ", count, " indices");
      TORCH_CHECK(shift < 64, "sparse_decode_: malformed varint in index_bytes");
      const uint8_t b = ib[pos++];
      gap |= static_cast<uint64_t>(b & 0x7F) << shift;
      shift += 7;
      if (!(b & 0x80)) break;
    }
    const int64_t i = prev + 1 + static_cast<int64_t>(gap);
    TORCH_CHECK(i >= 0 && i < n, "sparse_decode_: index ", i, " out of range for ", n, " elements");
    std::memcpy(dst + i * esize, src + j * esize, esize);
    prev = i;
  }
  TORCH_CHECK(pos == nb, "sparse_decode_: ", nb - pos, " trailing bytes in index_bytes");
  return out;
}

}  // namespace rankwise
