// Int8 linears for a few rows: half the bytes of bf16, and int8 multiply-adds.
//
// Weights: one int8 per weight with one fp32 scale per output channel (q = round(w / s), s =
// max|w| / 127, so q is in [-127, 127]); activations: quantized at each call in blocks of 32
// inputs, one fp32 scale each (per row instead cost +4.30% NLL on the bundled model, blocks of 32
// +0.35%: the model has outlier channels throughout). Per block of 32 inputs the products are
// summed exactly in int32, then scaled and accumulated in fp32 across blocks; the output
// channel's scale multiplies the sum at the end:
//     y[n, m] = s_w[m] * sum_b s_x[n, b] * (sum_{k in b} q_x[n, k] q_w[m, k]).
//
// Packed once (`pack_int8`) into one uint8 blob per 16 output channels, streamed front to back:
// per block of 32 inputs, 8 x 64 bytes of {16 outputs x 4 inputs} (llama.cpp's amx/mmq.cpp VNNI
// layout), stored as q + 128 (unsigned); then the 16 channels' fp32 scales (64 bytes). Bytes:
// 1.0078 a weight (bf16: 2; Q8_0: 1.0625).
//
// AVX-512 VNNI: `vpdpbusd` multiplies unsigned by signed bytes, 64 multiply-adds per op; the
// unsigned operand is the weights (q + 128), the signed one the row's 4 activations broadcast,
// so each block's sum carries 128 * sum(q_x) too: the int32 accumulator starts at minus that
// (one broadcast per row and block, no weight-side compensation bytes). AVX2 (`vpmaddubsw`,
// llama.cpp's sign trick): |x| unsigned times sign(x) * q_w signed, pairs summed in int16
// without saturation (2 * 127 * 127 < 32767), then widened. Both give the same int32 block sums.
#pragma once
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <algorithm>
#include <cmath>
#include <cstring>
#include <type_traits>
#include <vector>

namespace int8k {

constexpr int64_t kBlock = 32;                 // inputs per activation scale
constexpr int64_t kOut = 16;                   // output channels per packed block
constexpr int64_t kTile = kOut * kBlock;       // bytes of one block of 32 inputs: 512
constexpr int64_t kMaxRows = 16;               // rows per pass over the weights
constexpr int64_t kGroupBlocks = 8;            // past 16 rows: output blocks per L2-resident group

#if defined(__AVX512VNNI__) && defined(__AVX512BW__) && !defined(PARAFORK_INT8_AVX2)
constexpr const char* kPath = "avx512-vnni";
#define INT8_VNNI 1
#else
constexpr const char* kPath = "avx2";
#define INT8_VNNI 0
#endif

inline int64_t blob_bytes(int64_t K) { return K / kBlock * kTile + kOut * 4; }

// w [M, K] (any float dtype) -> uint8 [ceil(M/16), K/32 * 512 + 64]; padded channels are zeros.
inline torch::Tensor pack_int8(torch::Tensor w) {
  TORCH_CHECK(w.dim() == 2 && w.size(1) % kBlock == 0, "pack_int8: want a [M, K] weight with K a multiple of 32");
  auto wf = w.to(torch::kFloat).contiguous();
  int64_t M = wf.size(0), K = wf.size(1), MB = (M + kOut - 1) / kOut, KB = K / kBlock;
  auto scale = wf.abs().amax(1) / 127.0;
  auto q = (wf / scale.clamp_min(1e-30).unsqueeze(1)).round().clamp(-127, 127).to(torch::kShort);
  auto qp = torch::zeros({MB * kOut, K}, q.options());
  qp.narrow(0, 0, M).copy_(q);
  auto tiles = (qp + 128).to(torch::kByte).view({MB, kOut, KB, 8, 4}).permute({0, 2, 3, 1, 4}).reshape({MB, KB * kTile});
  auto sp = torch::zeros({MB * kOut}, wf.options());
  sp.narrow(0, 0, M).copy_(scale);
  auto blob = torch::empty({MB, blob_bytes(K)}, torch::dtype(torch::kByte));
  blob.narrow(1, 0, KB * kTile).copy_(tiles);
  blob.narrow(1, KB * kTile, kOut * 4).copy_(sp.view({MB, kOut}).view(torch::kByte));
  return blob;
}

// One chunk of n <= 16 rows quantized: q as 4-byte groups [KB * 8][n] (a step's broadcasts side
// by side), scales [KB][n], and per block the VNNI accumulator's start, -128 * sum(q) [KB][n].
struct Rows {
  std::vector<int32_t> q;
  std::vector<float> scale;
  std::vector<int32_t> start;
};

template <typename T>
inline float at_float(const T* x, int64_t i) { return (float)x[i]; }

// Rows [0, n) of x (bf16 or fp32, row stride K) quantized into r.
template <typename T>
inline void quantize(const T* x, int64_t n, int64_t K, Rows& r) {
  const int64_t KB = K / kBlock;
  r.q.resize(KB * 8 * n), r.scale.resize(KB * n), r.start.resize(KB * n);
  for (int64_t i = 0; i < n; ++i)
    for (int64_t b = 0; b < KB; ++b) {
      const T* v = x + i * K + b * kBlock;
      alignas(64) int8_t out[kBlock];
      int32_t sum = 0;
      float amax;
#if INT8_VNNI
      __m512 lo, hi;
      if constexpr (std::is_same_v<T, float>) {
        lo = _mm512_loadu_ps(v), hi = _mm512_loadu_ps(v + 16);
      } else {
        lo = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)v)), 16));
        hi = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)(v + 16))), 16));
      }
      amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(lo), _mm512_abs_ps(hi)));
      __m512 inv = _mm512_set1_ps(amax > 0 ? 127.f / amax : 0.f);
      __m512i qlo = _mm512_cvtps_epi32(_mm512_mul_ps(lo, inv)), qhi = _mm512_cvtps_epi32(_mm512_mul_ps(hi, inv));
      sum = _mm512_reduce_add_epi32(_mm512_add_epi32(qlo, qhi));
      _mm_store_si128((__m128i*)out, _mm512_cvtsepi32_epi8(qlo));
      _mm_store_si128((__m128i*)(out + 16), _mm512_cvtsepi32_epi8(qhi));
#else
      amax = 0.f;
      for (int k = 0; k < kBlock; ++k) amax = std::max(amax, std::fabs(at_float(v, k)));
      float inv = amax > 0 ? 127.f / amax : 0.f;
      for (int k = 0; k < kBlock; ++k) {
        int32_t q = (int32_t)std::nearbyint(at_float(v, k) * inv);  // round half to even, as cvtps_epi32
        q = std::max(-127, std::min(127, q));
        out[k] = (int8_t)q;
        sum += q;
      }
#endif
      for (int k4 = 0; k4 < 8; ++k4) std::memcpy(&r.q[(b * 8 + k4) * n + i], out + 4 * k4, 4);
      r.scale[b * n + i] = amax / 127.f;
      r.start[b * n + i] = -128 * sum;
    }
}

// The output: 16 fp32 sums times the channels' scales, stored fp32 or rounded to bf16.
struct Out {
  float* y32;
  at::BFloat16* y16;
  int64_t ld;
};

#if INT8_VNNI
// acc += w (unsigned) . the 4 signed bytes at x broadcast, with the broadcast folded into the
// multiply-add (`{1to16}`); GCC emits a separate vpbroadcastd for the intrinsics' form.
static inline __m512i dpbusd_bcast(__m512i acc, __m512i w, const int32_t* x) {
  asm("vpdpbusd %2%{1to16%}, %1, %0" : "+v"(acc) : "v"(w), "m"(*x));
  return acc;
}

// Rows [n0, n0 + N) of a chunk of NC rows over output block mb: per block of 32 inputs, each
// row's int32 sum over the tile's 8 x 64 bytes (rows side by side: independent chains), then one
// fp32 multiply-add with the row's block scale. N <= 8 keeps the sums and the fp32 accumulators
// in registers. One output block at a time for every row count: several blocks in flight (two
// or four weight streams) were no faster for one row and 20-60% slower for 2-4 (the 30 layers'
// linears and the head, Zen 5: 4 rows 2.4-2.5 ms against 3.8-4.0 with two blocks).
template <int N>
inline void tile_rows(const Rows& r, int64_t n0, int64_t NC, int64_t KB, const uint8_t* blob, int64_t bytes,
                      int64_t mb, const Out& o) {
  const uint8_t* base = blob + mb * bytes;
  __m512 acc[N];
  for (int n = 0; n < N; ++n) acc[n] = _mm512_setzero_ps();
  for (int64_t b = 0; b < KB; ++b) {
    const int32_t* xq = r.q.data() + b * 8 * NC + n0;
    __m512i s[N];
    for (int n = 0; n < N; ++n) s[n] = _mm512_set1_epi32(r.start[b * NC + n0 + n]);
    for (int k = 0; k < 8; ++k) {
      __m512i wv = _mm512_loadu_si512(base + b * kTile + 64 * k);
      for (int n = 0; n < N; ++n) s[n] = dpbusd_bcast(s[n], wv, xq + k * NC + n);
    }
    for (int n = 0; n < N; ++n)
      acc[n] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s[n]), _mm512_set1_ps(r.scale[b * NC + n0 + n]), acc[n]);
  }
  __m512 sw = _mm512_loadu_ps((const float*)(base + KB * kTile));
  for (int n = 0; n < N; ++n) {
    __m512 v = _mm512_mul_ps(acc[n], sw);
    int64_t at = (n0 + n) * o.ld + mb * kOut;
    if (o.y32) _mm512_storeu_ps(o.y32 + at, v);
    else _mm256_storeu_si256((__m256i*)(o.y16 + at), (__m256i)_mm512_cvtneps_pbh(v));
  }
}

// A chunk of NC <= 16 rows over output blocks [mb0, mb1): up to 8 rows a pass; the second pass
// (rows 9-16) reads the block's weights again from the caches, not from memory.
inline void rows(int64_t NC, const Rows& r, int64_t KB, const uint8_t* blob, int64_t bytes, int64_t mb0, int64_t mb1,
                 const Out& o) {
  for (int64_t mb = mb0; mb < mb1; mb += (NC > 8 ? 1 : mb1 - mb0)) {
    int64_t me = NC > 8 ? mb + 1 : mb1;
    for (int64_t n0 = 0; n0 < NC; n0 += 8) {
      switch (std::min<int64_t>(8, NC - n0)) {
#define G(n) case n: for (int64_t m = mb; m < me; ++m) tile_rows<n>(r, n0, NC, KB, blob, bytes, m, o); break;
        G(1) G(2) G(3) G(4) G(5) G(6) G(7) G(8)
#undef G
      }
    }
  }
}
#else
// AVX2: 8 channels per 256-bit half of a 64-byte group, one row at a time.
inline void rows(int64_t N, const Rows& r, int64_t KB, const uint8_t* blob, int64_t bytes, int64_t mb0, int64_t mb1,
                 const Out& o) {
  const __m256i flip = _mm256_set1_epi8((char)0x80), ones = _mm256_set1_epi16(1);
  for (int64_t mb = mb0; mb < mb1; ++mb) {
    const uint8_t* base = blob + mb * bytes;
    for (int64_t n = 0; n < N; ++n) {
      __m256 acc[2] = {_mm256_setzero_ps(), _mm256_setzero_ps()};
      for (int64_t b = 0; b < KB; ++b) {
        const uint8_t* w = base + b * kTile;
        __m256i s[2] = {_mm256_setzero_si256(), _mm256_setzero_si256()};
        for (int k = 0; k < 8; ++k) {
          __m256i xb = _mm256_set1_epi32(r.q[(b * 8 + k) * N + n]), ax = _mm256_abs_epi8(xb);
          for (int h = 0; h < 2; ++h) {
            __m256i wq = _mm256_xor_si256(_mm256_loadu_si256((const __m256i*)(w + 64 * k + 32 * h)), flip);  // q_w
            __m256i p = _mm256_maddubs_epi16(ax, _mm256_sign_epi8(wq, xb));
            s[h] = _mm256_add_epi32(s[h], _mm256_madd_epi16(p, ones));
          }
        }
        __m256 sx = _mm256_set1_ps(r.scale[b * N + n]);
        for (int h = 0; h < 2; ++h) acc[h] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s[h]), sx, acc[h]);
      }
      const float* sw = (const float*)(base + KB * kTile);
      alignas(32) float v[kOut];
      for (int h = 0; h < 2; ++h) _mm256_store_ps(v + 8 * h, _mm256_mul_ps(acc[h], _mm256_loadu_ps(sw + 8 * h)));
      for (int j = 0; j < kOut; ++j) {
        int64_t at = n * o.ld + mb * kOut + j;
        if (o.y32) o.y32[at] = v[j];
        else o.y16[at] = (at::BFloat16)v[j];
      }
    }
  }
}
#endif

// x [N, K] (bf16 or fp32) times a `pack_int8` blob -> [N, M], fp32 when fp32_out, else x's dtype.
// Rows go 16 at a time; past 16, each 16-row chunk runs over a group of output blocks before the
// next group, so that the group's weights come from memory once (as the bf16 kernel).
inline torch::Tensor mm_int8(torch::Tensor x, torch::Tensor blob, int64_t M, bool fp32_out) {
  TORCH_CHECK(x.dim() == 2 && (x.scalar_type() == torch::kBFloat16 || x.scalar_type() == torch::kFloat),
              "mm_int8: want [N, K] bf16 or fp32 rows");
  TORCH_CHECK(blob.scalar_type() == torch::kByte && blob.dim() == 2 && blob.is_contiguous(), "mm_int8: want a pack_int8 blob");
  int64_t N = x.size(0), K = x.size(1), MB = blob.size(0), KB = K / kBlock, bytes = blob.size(1), ld = MB * kOut;
  TORCH_CHECK(K % kBlock == 0 && bytes == blob_bytes(K), "mm_int8: weight not packed for K=", K);
  TORCH_CHECK(N >= 1 && M <= ld, "mm_int8: no rows, or M beyond the packed channels");
  x = x.contiguous();
  const bool bf16 = x.scalar_type() == torch::kBFloat16;
  const int64_t chunks = (N + kMaxRows - 1) / kMaxRows;
  thread_local std::vector<Rows> kept;  // the calling thread's buffers, reused from call to call
  if ((int64_t)kept.size() < chunks) kept.resize(chunks);
  std::vector<Rows>& q = kept;  // named here: inside the workers, `kept` would be their own
  for (int64_t c = 0; c < chunks; ++c) {
    int64_t n = std::min(kMaxRows, N - c * kMaxRows);
    if (bf16) quantize(x.data_ptr<at::BFloat16>() + c * kMaxRows * K, n, K, q[c]);
    else quantize(x.data_ptr<float>() + c * kMaxRows * K, n, K, q[c]);
  }
  const bool out32 = fp32_out || !bf16;
  auto y = torch::empty({N, ld}, x.options().dtype(out32 ? torch::kFloat : torch::kBFloat16));
  float* y32 = out32 ? y.data_ptr<float>() : nullptr;
  at::BFloat16* y16 = out32 ? nullptr : y.data_ptr<at::BFloat16>();
  const uint8_t* w = blob.data_ptr<uint8_t>();
  at::parallel_for(0, MB, 8, [&](int64_t b0, int64_t b1) {
    for (int64_t g = b0; g < b1; g += chunks > 1 ? kGroupBlocks : b1 - b0) {
      int64_t g1 = chunks > 1 ? std::min(b1, g + kGroupBlocks) : b1;
      for (int64_t c = 0; c < chunks; ++c) {
        Out o{y32 ? y32 + c * kMaxRows * ld : nullptr, y16 ? y16 + c * kMaxRows * ld : nullptr, ld};
        rows(std::min(kMaxRows, N - c * kMaxRows), q[c], KB, w, bytes, g, g1, o);
      }
    }
  });
  return ld == M ? y : y.narrow(1, 0, M);
}

}  // namespace int8k
