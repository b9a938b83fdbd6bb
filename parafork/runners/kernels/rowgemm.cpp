// A few rows through a linear layer at the cost of reading its weights once (AVX-512 BF16).
//
// y[n, m] = sum_k x[n, k] * W[m, k] for up to 16 rows a pass. W is packed once as [M/16][K/2][16][2]
// bf16: one 64-byte load holds 16 outputs x 2 k, and one `vdpbf16ps` per row multiplies it by
// that row's broadcast (k, k+1) pair into 16 fp32 sums. So each weight byte is read once per
// step, whatever the row count, and no horizontal sum is needed; several 16-output blocks are
// in flight for one or two rows (independent chains), one from three rows on (a single weight
// stream per thread, which the prefetcher follows best: 4 rows in two blocks took 5.3 ms over
// the 30 layers' linears, in one 4.5 ms, on the 2-core Zen 5).
// Output blocks are split over torch's intra-op threads. fp32 accumulation; the output is
// rounded to bf16 or kept fp32 (the logits).
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <atomic>
#include <cmath>
#include <omp.h>
#include <cstring>
#include <vector>

#include "int8.h"  // int8 weights: `mm` takes a pack_int8 blob as well as packed bf16


static constexpr int64_t kMaxRows = 16;
static constexpr int64_t kPrefetchLines = 256;  // 128 lines: 16 rows 4.5 ms, 512: no better than 256

static torch::Tensor pack(torch::Tensor w) {  // [M, K] -> [ceil(M/16), K/2, 16, 2] bf16, M padded with zeros
  TORCH_CHECK(w.dim() == 2 && w.size(1) % 2 == 0, "pack: want a [M, K] weight with K even");
  w = w.to(torch::kBFloat16);
  int64_t M = w.size(0), K = w.size(1), Mp = (M + 15) / 16 * 16;
  auto wp = torch::zeros({Mp, K}, w.options());
  wp.narrow(0, 0, M).copy_(w);
  return wp.view({Mp / 16, 16, K / 2, 2}).permute({0, 2, 1, 3}).contiguous();
}

template <int N>
static inline void store(__m512 acc, float* y32, at::BFloat16* y16, int64_t offset) {
  if (y32) _mm512_storeu_ps(y32 + offset, acc);
  else _mm256_storeu_si256((__m256i*)(y16 + offset), (__m256i)_mm512_cvtneps_pbh(acc));
}

template <int N, int B>
static void blocks(const uint32_t* x, int64_t K2, const __m512bh* wb, int64_t mb0, int64_t mb1, float* y32,
                   at::BFloat16* y16, int64_t ld) {
  // x: [K2, N] pairs (k-major, so a step's broadcasts are adjacent); B output blocks at a time.
  int64_t mb = mb0;
  for (; mb + B <= mb1; mb += B) {
    __m512 acc[B][N];
    for (int b = 0; b < B; ++b)
      for (int n = 0; n < N; ++n) acc[b][n] = _mm512_setzero_ps();
    const __m512bh* w = wb + mb * K2;
    for (int64_t k = 0; k < K2; ++k) {
      const uint32_t* xk = x + k * N;
      // One stream (three rows on): fetched 256 lines (16 KB) ahead by hand. The hardware
      // prefetcher alone left the weights' reads behind the multiply-adds once rows made the
      // loop longer: 30 layers' linears, 8 rows 4.9 -> 3.4 ms, 16 rows 7.5 -> 4.4 ms (Zen 5).
      if (B == 1) _mm_prefetch((const char*)(w + k + kPrefetchLines), _MM_HINT_T0);
      for (int b = 0; b < B; ++b) {
        __m512bh wv = w[b * K2 + k];
        for (int n = 0; n < N; ++n) acc[b][n] = _mm512_dpbf16_ps(acc[b][n], (__m512bh)_mm512_set1_epi32(xk[n]), wv);
      }
    }
    for (int b = 0; b < B; ++b)
      for (int n = 0; n < N; ++n) store<N>(acc[b][n], y32, y16, n * ld + (mb + b) * 16);
  }
  if (mb < mb1) blocks<N, 1>(x, K2, wb, mb, mb1, y32, y16, ld);
}

static void rows(int64_t N, const uint32_t* x, int64_t K2, const __m512bh* w, int64_t b0, int64_t b1, float* y32,
                 at::BFloat16* y16, int64_t ld) {  // 1 to 16 rows over output blocks [b0, b1)
  switch (N) {
#define ROWS(n) case n: blocks<n, (n <= 2 ? 4 : 1)>(x, K2, w, b0, b1, y32, y16, ld); break;
    ROWS(1) ROWS(2) ROWS(3) ROWS(4) ROWS(5) ROWS(6) ROWS(7) ROWS(8)
    ROWS(9) ROWS(10) ROWS(11) ROWS(12) ROWS(13) ROWS(14) ROWS(15) ROWS(16)
#undef ROWS
  }
}

// x [N, K] bf16, wp from pack(), M the unpadded output size -> [N, M] (fp32 or bf16). Rows go
// 16 at a time; past 16, every 16-row chunk runs over a group of kGroupBlocks output blocks
// before the next group, so the group's weights come from memory once and from L2 for the
// other chunks (16-row calls one after the other read all the weights again each time).
static constexpr int64_t kGroupBlocks = 8;
static torch::Tensor mm(torch::Tensor x, torch::Tensor wp, int64_t M, bool fp32_out) {
  if (wp.scalar_type() == torch::kByte) return int8k::mm_int8(x, wp, M, fp32_out);
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kBFloat16, "mm: want [N, K] bf16 rows");
  int64_t N = x.size(0), K = x.size(1), MB = wp.size(0), K2 = K / 2, ld = MB * 16;
  TORCH_CHECK(wp.dim() == 4 && wp.size(1) == K2 && wp.size(2) == 16 && wp.size(3) == 2, "mm: weight not packed for K=", K);
  TORCH_CHECK(N >= 1, "mm: no rows");
  x = x.contiguous();
  const int64_t chunks = (N + kMaxRows - 1) / kMaxRows;
  // Per 16-row chunk, [K2, n] (k, k+1) pairs: a step's broadcasts lie side by side.
  std::vector<uint32_t> xt(K2 * N);
  const uint32_t* xr = (const uint32_t*)x.data_ptr();
  for (int64_t c = 0; c < chunks; ++c) {
    int64_t n0 = c * kMaxRows, n = std::min(kMaxRows, N - n0);
    uint32_t* dst = xt.data() + n0 * K2;
    for (int64_t r = 0; r < n; ++r)
      for (int64_t k = 0; k < K2; ++k) dst[k * n + r] = xr[(n0 + r) * K2 + k];
  }
  auto y = torch::empty({N, ld}, x.options().dtype(fp32_out ? torch::kFloat : torch::kBFloat16));
  const __m512bh* w = (const __m512bh*)wp.data_ptr();
  float* y32 = fp32_out ? y.data_ptr<float>() : nullptr;
  at::BFloat16* y16 = fp32_out ? nullptr : y.data_ptr<at::BFloat16>();
  at::parallel_for(0, MB, 8, [&](int64_t b0, int64_t b1) {
    for (int64_t g = b0; g < b1; g += chunks > 1 ? kGroupBlocks : b1 - b0) {
      int64_t g1 = chunks > 1 ? std::min(b1, g + kGroupBlocks) : b1;
      for (int64_t c = 0; c < chunks; ++c) {
        int64_t n0 = c * kMaxRows;
        rows(std::min(kMaxRows, N - n0), xt.data() + n0 * K2, K2, w, g, g1, y32 ? y32 + n0 * ld : nullptr,
             y16 ? y16 + n0 * ld : nullptr, ld);
      }
    }
  });
  return ld == M ? y : y.narrow(1, 0, M);
}

static inline __m512 load_bf16(const at::BFloat16* p) {  // 16 bf16 -> 16 fp32
  __m256i u = _mm256_loadu_si256((const __m256i*)p);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(u), 16));
}

static inline __m512 round_bf16(__m512 x) {  // x rounded to bf16, kept as fp32
  __m256i b = (__m256i)_mm512_cvtneps_pbh(x);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(b), 16));
}

// x += delta (bf16, in place; delta may be empty), then h = w * rms_norm(x) as HF's Llama norm
// rounds it: the sum of squares in fp32, x * rsqrt(mean + eps) rounded to bf16, times w in bf16.
// One call instead of the ~10 small ops (casts, pow, mean, rsqrt, muls, add) a layer paid twice.
static torch::Tensor add_rms_norm(torch::Tensor x, torch::Tensor delta, torch::Tensor w, double eps) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && x.scalar_type() == torch::kBFloat16, "add_rms_norm: want [T, D] bf16");
  int64_t T = x.size(0), D = x.size(1);
  bool add = delta.numel() > 0;
  if (add) delta = delta.contiguous();
  auto wc = w.contiguous();
  auto h = torch::empty_like(x);
  at::BFloat16* xp = x.data_ptr<at::BFloat16>();
  const at::BFloat16* dp = add ? delta.data_ptr<at::BFloat16>() : nullptr;
  const at::BFloat16* wp = wc.data_ptr<at::BFloat16>();
  at::BFloat16* hp = h.data_ptr<at::BFloat16>();
  const int64_t vec_end = D / 16 * 16;  // the vector part; any tail is done one by one, rounded the same way
  at::parallel_for(0, T, 16, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      at::BFloat16* xr = xp + t * D;
      __m512 ssv = _mm512_setzero_ps();
      for (int64_t k = 0; k < vec_end; k += 16) {
        __m512 v = load_bf16(xr + k);
        if (add) {
          v = round_bf16(_mm512_add_ps(v, load_bf16(dp + t * D + k)));
          _mm256_storeu_si256((__m256i*)(xr + k), (__m256i)_mm512_cvtneps_pbh(v));
        }
        ssv = _mm512_fmadd_ps(v, v, ssv);
      }
      float ss = _mm512_reduce_add_ps(ssv);
      for (int64_t k = vec_end; k < D; ++k) {
        float v = add ? (float)(at::BFloat16)((float)xr[k] + (float)dp[t * D + k]) : (float)xr[k];
        if (add) xr[k] = (at::BFloat16)v;
        ss += v * v;
      }
      float r = 1.f / std::sqrt(ss / D + (float)eps);
      __m512 rv = _mm512_set1_ps(r);
      for (int64_t k = 0; k < vec_end; k += 16) {
        __m512 y = _mm512_mul_ps(load_bf16(wp + k), round_bf16(_mm512_mul_ps(load_bf16(xr + k), rv)));
        _mm256_storeu_si256((__m256i*)(hp + t * D + k), (__m256i)_mm512_cvtneps_pbh(y));
      }
      for (int64_t k = vec_end; k < D; ++k)
        hp[t * D + k] = (at::BFloat16)((float)wp[k] * (float)(at::BFloat16)((float)xr[k] * r));
    }
  });
  return h;
}

// exp(x) for 16 lanes: 2^(x log2 e) split into 2^n * 2^f, |f| <= 1/2, 2^f by a degree-6
// polynomial (relative error ~2e-7), then scaled by 2^n; x = -inf gives 0. std::exp per score
// was most of this kernel's time.
static inline __m512 exp512(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-87.f));
  __m512 t = _mm512_mul_ps(x, _mm512_set1_ps(1.4426950408889634f));
  __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 f = _mm512_mul_ps(_mm512_sub_ps(t, n), _mm512_set1_ps(0.6931471805599453f));  // f ln2, |.| <= 0.35
  __m512 p = _mm512_set1_ps(1.f / 720);
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.f / 120));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.f / 24));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.f / 6));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.f));
  return _mm512_scalef_ps(p, n);
}


// hsum of each of 16 vectors, as one vector: r[j] = sum of a[j]'s lanes (45 ops where 16
// `_mm512_reduce_add_ps` take ~130; the score of one query against 16 keys at once).
static inline __m512 hsum16(__m512* a) {
  __m512 b[8], c[4];
  for (int i = 0; i < 8; ++i)  // per 128-bit lane: [x0+x2, y0+y2, x1+x3, y1+y3]
    b[i] = _mm512_add_ps(_mm512_unpacklo_ps(a[2 * i], a[2 * i + 1]), _mm512_unpackhi_ps(a[2 * i], a[2 * i + 1]));
  for (int i = 0; i < 4; ++i) {  // per 128-bit lane: partial sums of a[4i..4i+3]
    __m512d x = _mm512_castps_pd(b[2 * i]), y = _mm512_castps_pd(b[2 * i + 1]);
    c[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(x, y)), _mm512_castpd_ps(_mm512_unpackhi_pd(x, y)));
  }
  __m512 e0 = _mm512_add_ps(_mm512_shuffle_f32x4(c[0], c[1], 0x88), _mm512_shuffle_f32x4(c[0], c[1], 0xDD));
  __m512 e1 = _mm512_add_ps(_mm512_shuffle_f32x4(c[2], c[3], 0x88), _mm512_shuffle_f32x4(c[2], c[3], 0xDD));
  return _mm512_add_ps(_mm512_shuffle_f32x4(e0, e1, 0x88), _mm512_shuffle_f32x4(e0, e1, 0xDD));
}

// One chunk of keys against several query rows that all see it: for each row, its running
// softmax state over the chunk (max m, sum l, unnormalised acc[D]), to be merged later.
struct Partial {
  float m, l;
};
static constexpr int64_t kChunk = 64;  // keys per task: 1 sequence x 3 KV heads x 160 keys -> 9 tasks for 2 threads

// Both products in bf16 with `vdpbf16ps` (fp32 sums), as HF's bf16 attention rounds them:
// scores from the bf16 keys as stored, and the values weighted by the probabilities rounded to
// bf16 (HF casts its fp32 softmax to bf16 before the product); the softmax itself in fp32. Two
// keys' values are interleaved once per chunk, (v_j[d], v_j+1[d]) pairs, for all rows that read
// it; each product then takes half the instructions of the fp32 path this replaced (16 siblings:
// attention 2.65 -> 2.14 ms a step; 76 -> 48 us a layer). DK = ceil(D / 32) vectors a key, a template argument so that the
// accumulators stay in registers (a runtime count kept them on the stack: 3x slower).
template <int DK>
static void attend_chunk(const at::BFloat16* const* q, int64_t R, const at::BFloat16* cache, const int64_t* slots,
                         int64_t n, int64_t stride, int64_t koff, int64_t voff, int64_t D, __m512bh* kb, __m512bh* vp,
                         float* sc, Partial* const* part, float* const* acc) {
  const int64_t n16 = (n + 15) / 16 * 16, n32 = (n + 31) / 32 * 32, pairs = (n + 1) / 2;
  __mmask32 mask[DK];
  for (int c = 0; c < DK; ++c) mask[c] = (__mmask32)(D - 32 * c >= 32 ? 0xFFFFFFFFu : (1u << (D - 32 * c)) - 1);
  for (int64_t j = 0; j < n16; ++j)  // keys, zero past n and past D
    for (int c = 0; c < DK; ++c)
      kb[j * DK + c] = (__m512bh)(j < n ? _mm512_maskz_loadu_epi16(mask[c], cache + slots[j] * stride + koff + 32 * c)
                                        : _mm512_setzero_si512());
  for (int64_t jp = 0; jp < pairs; ++jp)  // values of keys 2jp and 2jp+1, interleaved per 128-bit lane
    for (int c = 0; c < DK; ++c) {
      __m512i a = _mm512_maskz_loadu_epi16(mask[c], cache + slots[2 * jp] * stride + voff + 32 * c);
      __m512i b = 2 * jp + 1 < n ? _mm512_maskz_loadu_epi16(mask[c], cache + slots[2 * jp + 1] * stride + voff + 32 * c)
                                 : _mm512_setzero_si512();
      vp[(jp * DK + c) * 2] = (__m512bh)_mm512_unpacklo_epi16(a, b);      // d = 0-3, 8-11, 16-19, 24-27 of the 32
      vp[(jp * DK + c) * 2 + 1] = (__m512bh)_mm512_unpackhi_epi16(a, b);  // d = 4-7, 12-15, 20-23, 28-31
    }
  const __m512i lo_idx = _mm512_set_epi32(23, 22, 21, 20, 7, 6, 5, 4, 19, 18, 17, 16, 3, 2, 1, 0);
  const __m512i hi_idx = _mm512_set_epi32(31, 30, 29, 28, 15, 14, 13, 12, 27, 26, 25, 24, 11, 10, 9, 8);
  for (int64_t r = 0; r < R; ++r) {
    __m512bh qv[DK];
    for (int c = 0; c < DK; ++c) qv[c] = (__m512bh)_mm512_maskz_loadu_epi16(mask[c], q[r] + 32 * c);
    __m512 mx = _mm512_set1_ps(-INFINITY);
    for (int64_t j0 = 0; j0 < n16; j0 += 16) {
      __m512 d[16];
      for (int j = 0; j < 16; ++j) {
        d[j] = _mm512_setzero_ps();
        for (int c = 0; c < DK; ++c) d[j] = _mm512_dpbf16_ps(d[j], kb[(j0 + j) * DK + c], qv[c]);
      }
      __m512 s = hsum16(d);
      if (j0 + 16 > n) s = _mm512_mask_mov_ps(_mm512_set1_ps(-INFINITY), (__mmask16)((1u << (n - j0)) - 1), s);
      _mm512_storeu_ps(sc + j0, s);
      mx = _mm512_max_ps(mx, s);
    }
    float m = _mm512_reduce_max_ps(mx);
    __m512 mv = _mm512_set1_ps(m), sum = _mm512_setzero_ps();
    for (int64_t j0 = 0; j0 < n32; j0 += 16) {  // probabilities, exactly 0 past n
      __m512 e = j0 < n16 ? exp512(_mm512_sub_ps(_mm512_loadu_ps(sc + j0), mv)) : _mm512_setzero_ps();
      if (j0 + 16 > n) e = _mm512_maskz_mov_ps((__mmask16)(j0 >= n ? 0 : (1u << (n - j0)) - 1), e);
      _mm512_storeu_ps(sc + j0, e);
      sum = _mm512_add_ps(sum, e);
    }
    uint32_t pb[kChunk / 2];  // (p_2jp, p_2jp+1) in bf16
    for (int64_t j0 = 0; j0 < n32; j0 += 32)
      _mm512_storeu_si512(pb + j0 / 2, (__m512i)_mm512_cvtne2ps_pbh(_mm512_loadu_ps(sc + j0 + 16), _mm512_loadu_ps(sc + j0)));
    __m512 a[2 * DK];
    for (int v = 0; v < 2 * DK; ++v) a[v] = _mm512_setzero_ps();
    for (int64_t jp = 0; jp < pairs; ++jp) {
      __m512bh pv = (__m512bh)_mm512_set1_epi32(pb[jp]);
      for (int v = 0; v < 2 * DK; ++v) a[v] = _mm512_dpbf16_ps(a[v], vp[jp * DK * 2 + v], pv);
    }
    for (int c = 0; c < DK; ++c) {  // back to d order: 0-15 and 16-31 of the chunk
      _mm512_mask_storeu_ps(acc[r] + 32 * c, (__mmask16)mask[c], _mm512_permutex2var_ps(a[2 * c], lo_idx, a[2 * c + 1]));
      if (D - 32 * c > 16)
        _mm512_mask_storeu_ps(acc[r] + 32 * c + 16, (__mmask16)(mask[c] >> 16), _mm512_permutex2var_ps(a[2 * c], hi_idx, a[2 * c + 1]));
    }
    part[r]->m = m;
    part[r]->l = _mm512_reduce_add_ps(sum);
  }
}

// Decode attention, one query per sequence: out[b, h] = softmax(q[b, h] . K) V over the keys of
// sequence b: the first plens[p] slots of pslots[p] where prefix_of[b] = p >= 0 (a prefix that
// several sequences share, APAR siblings' common ancestors: read once for all of them), then its
// own slots[b, :lens[b]] (joined spans and its own entries up to the query; every one visible).
// Keys are read in place from the paged cache [slots, 2, KVH, D]; scores and sums in fp32; the
// softmax scale is already in q; query head h reads KV head h / G. The keys are cut into chunks
// of kChunk, one task per (key source, KV head, chunk), so one sequence's attention still runs on
// every thread (flash-decoding); each task leaves per-row partial softmax states, merged at the end.
static torch::Tensor decode_attention(torch::Tensor q, torch::Tensor cache, torch::Tensor slots, torch::Tensor lens,
                                      torch::Tensor pslots, torch::Tensor plens, torch::Tensor prefix_of) {
  TORCH_CHECK(q.dim() == 3 && q.scalar_type() == torch::kBFloat16 && cache.scalar_type() == torch::kBFloat16,
              "decode_attention: want bf16 q [B, H, D] and cache [S, 2, KVH, D]");
  int64_t B = q.size(0), H = q.size(1), D = q.size(2), KVH = cache.size(2), G = H / KVH, L = slots.size(1);
  TORCH_CHECK(D % 16 == 0 && D <= 256 && cache.size(3) == D && H % KVH == 0 && cache.is_contiguous(),
              "decode_attention: shapes");
  q = q.contiguous();
  auto sl = slots.to(torch::kLong).contiguous();
  auto ln = lens.to(torch::kLong).contiguous();
  int64_t NP = pslots.numel() ? pslots.size(0) : 0, LP = NP ? pslots.size(1) : 0;
  auto psl = pslots.to(torch::kLong).contiguous();
  auto pln = plens.to(torch::kLong).contiguous();
  auto pof = prefix_of.to(torch::kLong).contiguous();
  TORCH_CHECK(NP == 0 || (pln.numel() == NP && pof.numel() == B), "decode_attention: prefix shapes");
  const int64_t* sp = sl.data_ptr<int64_t>();
  const int64_t* lp = ln.data_ptr<int64_t>();
  const int64_t* psp = NP ? psl.data_ptr<int64_t>() : nullptr;
  const int64_t* plp = NP ? pln.data_ptr<int64_t>() : nullptr;
  const int64_t* pop = NP ? pof.data_ptr<int64_t>() : nullptr;

  // Partial states: per sequence, its prefix's chunks then its own, each for every query head.
  auto chunks = [](int64_t n) { return (n + kChunk - 1) / kChunk; };
  std::vector<int64_t> base(B + 1, 0), own0(B);
  for (int64_t b = 0; b < B; ++b) {
    int64_t p = NP ? pop[b] : -1;
    own0[b] = p >= 0 ? chunks(plp[p]) : 0;
    base[b + 1] = base[b] + own0[b] + chunks(lp[b]);
  }
  std::vector<Partial> parts(base[B] * H);
  std::vector<float> accs(base[B] * H * D);
  const at::BFloat16* qptr = q.data_ptr<at::BFloat16>();

  struct Task { int64_t prefix, seq, kvh, chunk; };  // prefix >= 0: that prefix's members; else sequence `seq`
  std::vector<Task> tasks;
  std::vector<std::vector<int64_t>> members(NP);
  for (int64_t b = 0; b < B; ++b)
    if (NP && pop[b] >= 0) members[pop[b]].push_back(b);
  for (int64_t p = 0; p < NP; ++p)
    if (!members[p].empty())
      for (int64_t h = 0; h < KVH; ++h)
        for (int64_t c = 0; c < chunks(plp[p]); ++c) tasks.push_back({p, -1, h, c});
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < KVH; ++h)
      for (int64_t c = 0; c < chunks(lp[b]); ++c) tasks.push_back({-1, b, h, c});

  const at::BFloat16* cp = cache.data_ptr<at::BFloat16>();
  const int64_t stride = 2 * KVH * D, DV = D / 16, num_tasks = (int64_t)tasks.size();
  auto out = torch::empty({B, H * D}, q.options());
  at::BFloat16* op = out.data_ptr<at::BFloat16>();
  // One parallel region for both phases. Tasks are taken from a shared counter, not split in
  // two ranges: a shared prefix's tasks (rows for every sibling) cost many times a lone
  // sequence's, and a static split put them all on one thread (16 siblings: 5.2 ms a step).
  std::atomic<int64_t> next{0};
  int threads = (int)std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), num_tasks));
#pragma omp parallel num_threads(threads)
  {
    const int64_t DK = (D + 31) / 32;
    std::vector<__m512bh> kb(kChunk * DK), vp(kChunk * DK);
    std::vector<float> sc(kChunk);
    std::vector<const at::BFloat16*> qs;
    std::vector<Partial*> ps;
    std::vector<float*> as;
    for (int64_t t; (t = next.fetch_add(1)) < num_tasks;) {
      const Task& task = tasks[t];
      qs.clear(), ps.clear(), as.clear();
      const int64_t* keys;
      int64_t n;
      auto add_rows = [&](int64_t b, int64_t part) {
        for (int64_t g = 0; g < G; ++g) {
          int64_t h = task.kvh * G + g, i = (base[b] + part) * H + h;
          qs.push_back(qptr + (b * H + h) * D);
          ps.push_back(&parts[i]);
          as.push_back(&accs[i * D]);
        }
      };
      if (task.prefix >= 0) {
        keys = psp + task.prefix * LP + task.chunk * kChunk;
        n = std::min(kChunk, plp[task.prefix] - task.chunk * kChunk);
        for (int64_t b : members[task.prefix]) add_rows(b, task.chunk);
      } else {
        keys = sp + task.seq * L + task.chunk * kChunk;
        n = std::min(kChunk, lp[task.seq] - task.chunk * kChunk);
        add_rows(task.seq, own0[task.seq] + task.chunk);
      }
      switch (DK) {
#define HEAD(dk) case dk: attend_chunk<dk>(qs.data(), (int64_t)qs.size(), cp, keys, n, stride, task.kvh * D, \
                                           (KVH + task.kvh) * D, D, kb.data(), vp.data(), sc.data(), ps.data(), as.data()); break;
        HEAD(1) HEAD(2) HEAD(3) HEAD(4) HEAD(5) HEAD(6) HEAD(7) HEAD(8)
#undef HEAD
      }
    }
#pragma omp barrier
#pragma omp for schedule(static)
    for (int64_t w = 0; w < B * H; ++w) {  // each query head's partial states merged
      int64_t b = w / H, h = w % H;
      float m = -INFINITY;
      for (int64_t c = base[b]; c < base[b + 1]; ++c) m = std::max(m, parts[c * H + h].m);
      float l = 0.f;
      __m512 a[16];
      for (int64_t v = 0; v < DV; ++v) a[v] = _mm512_setzero_ps();
      for (int64_t c = base[b]; c < base[b + 1]; ++c) {
        float s = std::exp(parts[c * H + h].m - m);
        l += parts[c * H + h].l * s;
        __m512 sv = _mm512_set1_ps(s);
        for (int64_t v = 0; v < DV; ++v) a[v] = _mm512_fmadd_ps(sv, _mm512_loadu_ps(&accs[(c * H + h) * D + v * 16]), a[v]);
      }
      __m512 inv = _mm512_set1_ps(1.f / l);
      for (int64_t v = 0; v < DV; ++v)
        _mm256_storeu_si256((__m256i*)(op + w * D + v * 16), (__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(a[v], inv)));
    }
  }
  return out;
}

// Rotary embedding of q and k, and the step's K/V written to the paged cache, in one call:
// qkv [T, (H + 2 KVH) * D] bf16 rows, cos/sin [T, D] (sin's first half negated, so that
// rot(x) = x cos + roll(x, D/2) sin), slots [T]. Returns the rotated queries [T, H, D]; the
// rotated keys and the values go to cache[slot, 0/1, kv head]. fp32 inside, bf16 out.
static torch::Tensor rope_cache(torch::Tensor qkv, torch::Tensor cos, torch::Tensor sin, torch::Tensor cache,
                                torch::Tensor slots, int64_t H) {
  TORCH_CHECK(qkv.scalar_type() == torch::kBFloat16 && cache.scalar_type() == torch::kBFloat16 && cache.is_contiguous(),
              "rope_cache: bf16 qkv and cache");
  qkv = qkv.contiguous();
  auto c = cos.contiguous(), sn = sin.contiguous();
  auto sl = slots.to(torch::kLong).contiguous();
  int64_t T = qkv.size(0), KVH = cache.size(2), D = cache.size(3), half = D / 2;
  TORCH_CHECK(qkv.size(1) == (H + 2 * KVH) * D && c.numel() == T * D && sn.numel() == T * D, "rope_cache: shapes");
  auto q = torch::empty({T, H, D}, qkv.options());
  const at::BFloat16* x = qkv.data_ptr<at::BFloat16>();
  const at::BFloat16* cp = c.data_ptr<at::BFloat16>();
  const at::BFloat16* sp = sn.data_ptr<at::BFloat16>();
  const int64_t* slp = sl.data_ptr<int64_t>();
  at::BFloat16* qp = q.data_ptr<at::BFloat16>();
  at::BFloat16* kv = cache.data_ptr<at::BFloat16>();
  const int64_t width = (H + 2 * KVH) * D, stride = 2 * KVH * D;
  at::parallel_for(0, T, 16, [&](int64_t t0, int64_t t1) {
  for (int64_t t = t0; t < t1; ++t) {
    const at::BFloat16* row = x + t * width;
    const at::BFloat16* ct = cp + t * D;
    const at::BFloat16* st = sp + t * D;
    for (int64_t head = 0; head < H + KVH; ++head) {
      const at::BFloat16* in = row + head * D;
      at::BFloat16* out = head < H ? qp + (t * H + head) * D : kv + slp[t] * stride + (head - H) * D;
      for (int64_t j = 0; j < D; ++j) {
        float rolled = (float)in[j < half ? j + half : j - half];
        out[j] = (at::BFloat16)((float)in[j] * (float)ct[j] + rolled * (float)st[j]);
      }
    }
    std::memcpy(kv + slp[t] * stride + KVH * D, row + (H + KVH) * D, KVH * D * sizeof(at::BFloat16));
  }
  });
  return q;
}

// silu(gate) * up for gate_up rows [T, 2F] (gate first), fp32 inside, bf16 out [T, F].
static torch::Tensor silu_mul(torch::Tensor gu) {
  TORCH_CHECK(gu.dim() == 2 && gu.scalar_type() == torch::kBFloat16 && gu.size(1) % 2 == 0, "silu_mul: [T, 2F] bf16");
  gu = gu.contiguous();
  int64_t T = gu.size(0), F = gu.size(1) / 2;
  auto y = torch::empty({T, F}, gu.options());
  const at::BFloat16* p = gu.data_ptr<at::BFloat16>();
  at::BFloat16* o = y.data_ptr<at::BFloat16>();
  // Rows x 16-wide chunks over the threads (a decode step has few rows but 1,536 columns).
  const int64_t chunks = (F + 15) / 16;
  at::parallel_for(0, T * chunks, 16, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      int64_t t = c / chunks, j0 = (c % chunks) * 16;
      const at::BFloat16* gp = p + t * 2 * F;
      if (j0 + 16 <= F) {
        __m512 g = load_bf16(gp + j0), u = load_bf16(gp + F + j0);
        __m512 act = _mm512_div_ps(g, _mm512_add_ps(_mm512_set1_ps(1.f), exp512(_mm512_sub_ps(_mm512_setzero_ps(), g))));
        act = round_bf16(act);
        _mm256_storeu_si256((__m256i*)(o + t * F + j0), (__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(act, u)));
      } else {
        for (int64_t j = j0; j < F; ++j) {
          float g = (float)gp[j], u = (float)gp[F + j];
          o[t * F + j] = (at::BFloat16)((float)(at::BFloat16)(g / (1.f + std::exp(-g))) * u);
        }
      }
    }
  });
  return y;
}

// Per row of logits [R, V] fp32: the argmax and its softmax probability, exp(max - logsumexp).
// A draft head's chain step wants only these; torch's max, logsumexp and exp over a row of
// 8,192 took ~80 us a step (three calls, each fanned out to the threads), this ~5.
static std::tuple<torch::Tensor, torch::Tensor> top_prob(torch::Tensor logits) {
  TORCH_CHECK(logits.dim() == 2 && logits.scalar_type() == torch::kFloat, "top_prob: want fp32 [R, V]");
  logits = logits.contiguous();
  int64_t R = logits.size(0), V = logits.size(1);
  auto index = torch::empty({R}, logits.options().dtype(torch::kLong));
  auto prob = torch::empty({R}, logits.options());
  const float* lp = logits.data_ptr<float>();
  int64_t* ip = index.data_ptr<int64_t>();
  float* pp = prob.data_ptr<float>();
  at::parallel_for(0, R, 4, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const float* x = lp + r * V;
      __m512 top = _mm512_set1_ps(-INFINITY);
      int64_t j = 0;
      for (; j + 16 <= V; j += 16) top = _mm512_max_ps(top, _mm512_loadu_ps(x + j));
      float m = _mm512_reduce_max_ps(top);
      for (; j < V; ++j) m = std::max(m, x[j]);
      int64_t best = 0;  // the first index holding the maximum, as torch's argmax
      while (best < V - 1 && x[best] != m) ++best;  // (NaN rows stop at the end)
      __m512 sum = _mm512_setzero_ps(), mv = _mm512_set1_ps(m);
      for (j = 0; j + 16 <= V; j += 16) sum = _mm512_add_ps(sum, exp512(_mm512_sub_ps(_mm512_loadu_ps(x + j), mv)));
      float total = _mm512_reduce_add_ps(sum);
      for (; j < V; ++j) total += std::exp(x[j] - m);
      ip[r] = best;
      pp[r] = 1.f / total;
    }
  });
  return {index, prob};
}

// Every decoder layer of a decode step in one call (one query per sequence):
// the same ops the runner's Python loop calls, in the same order, so the result is the same
// bit for bit; what goes is ~10 Python-to-C++ calls a layer (300 a step for 30 layers, ~1 ms
// of a 6-7 ms one-row step on the 2-core Zen 5). `weights` holds per layer: qkv, o, gate_up,
// down (packed), input and post-attention norm weights; `sizes` the linears' output widths.
// Returns the residual stream after the last layer (its last block's output added).
static torch::Tensor decode_layers(torch::Tensor x, std::vector<torch::Tensor> weights, std::vector<int64_t> sizes,
                                   std::vector<torch::Tensor> caches, torch::Tensor cos, torch::Tensor sin,
                                   torch::Tensor slot_mapping, torch::Tensor slots, torch::Tensor lens,
                                   torch::Tensor pslots, torch::Tensor plens, torch::Tensor prefix_of, int64_t H,
                                   double eps) {
  const int64_t layers = (int64_t)caches.size();
  TORCH_CHECK(weights.size() == (size_t)(6 * layers) && sizes.size() == (size_t)(4 * layers),
              "decode_layers: 6 weights and 4 sizes a layer");
  torch::Tensor delta = torch::empty({0}, x.options());
  for (int64_t l = 0; l < layers; ++l) {
    const torch::Tensor* w = &weights[6 * l];
    const int64_t* m = &sizes[4 * l];
    auto h = add_rms_norm(x, delta, w[4], eps);
    auto q = rope_cache(mm(h, w[0], m[0], false), cos, sin, caches[l], slot_mapping, H);
    delta = mm(decode_attention(q, caches[l], slots, lens, pslots, plens, prefix_of), w[1], m[1], false);
    h = add_rms_norm(x, delta, w[5], eps);
    delta = mm(silu_mul(mm(h, w[2], m[2], false)), w[3], m[3], false);
  }
  return x.add_(delta);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("pack", &pack, "pack a [M, K] weight for mm");
  m.def("mm", &mm, "x [N, K] bf16 times a packed weight (bf16 from pack, or int8 from pack_int8)");
  m.def("pack_int8", &int8k::pack_int8, "pack a [M, K] weight as int8 with per-channel scales for mm");
  m.attr("int8_path") = int8k::kPath;
  m.def("add_rms_norm", &add_rms_norm, "x += delta in place, then w * rms_norm(x)");
  m.def("decode_attention", &decode_attention, "one query per sequence over its keys in the paged cache");
  m.def("rope_cache", &rope_cache, "rotary q/k, K/V into the paged cache; returns q");
  m.def("silu_mul", &silu_mul, "silu(gate) * up");
  m.def("top_prob", &top_prob, "per row of fp32 logits: argmax and its softmax probability");
  m.def("decode_layers", &decode_layers, "every decoder layer of a decode step in one call");
}
