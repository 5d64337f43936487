// CPU kernels of the reversal="exact" ops (the arithmetic: revdeq_kernels/ops/reference.py,
// the format: revdeq_kernels/fixed_point.py). Included by kernels_impl.h inside its
// revdeq::cpu::CPU_CAPABILITY anonymous namespace.
//
// Design
// - The cost is the integer division by d and |n|, which no x86 vector ISA has. 1 - beta
//   takes a few values in practice, so the common pairs (|n|, d) are template constants:
//   the compiler turns the divisions into multiply-high and shifts (shifts alone for a
//   power-of-two d), and an |n| of 1 drops the second step. Other pairs take the generic
//   path with runtime divisors. The DEFAULT build runs the scalar loops below; the AVX2
//   build runs four lanes at a time (the simd namespace: divisions in exact double
//   arithmetic) and falls back to the scalar code for a group with an unusual lane, so both
//   write the same bits. The tensors stream once.
// - Floor division and remainder (remainder in [0, divisor)), as the reference: C++'s
//   truncating / and % are corrected by one compare. The digit plane is non-negative in
//   valid use and is computed unsigned, so a corrupted plane wraps instead of being UB.
// - q = rint(double(f) * scale): one IEEE multiply (-ffp-contract=off) and a round half to
//   even, so q has the same bits as the reference's torch.round.
// - flags: each parallel range ORs its bits into a local word, then one atomic OR.
// - Per-sample sums: rows up to kChunk elements are summed whole (groups of rows are the
//   tasks), longer rows in fixed kChunk chunks whose double partials are added in chunk
//   order, so results do not depend on the thread count. The y-update runs on the same
//   cache-resident block just before.
#pragma once

namespace exact {

constexpr int64_t kRange = int64_t{1} << 62;

// floor(h / D) and h mod D in [0, D) for a positive divisor (a template constant when kD > 0).
template <int64_t kD>
C10_ALWAYS_INLINE void floor_divmod(int64_t h, int64_t d, int64_t& quotient, int64_t& remainder) {
  if constexpr (kD > 0 && (kD & (kD - 1)) == 0) {
    constexpr int kShift = __builtin_ctzll(static_cast<unsigned long long>(kD));
    quotient = h >> kShift;  // arithmetic shift: floor division
    remainder = h & (kD - 1);
  } else {
    const int64_t divisor = kD > 0 ? kD : d;
    quotient = h / divisor;
    remainder = h - quotient * divisor;
    if (remainder < 0) {
      remainder += divisor;
      quotient -= 1;
    }
  }
}

template <int64_t kD>
C10_ALWAYS_INLINE uint64_t udivmod(uint64_t b, int64_t d, uint64_t& remainder) {
  const uint64_t divisor = static_cast<uint64_t>(kD > 0 ? kD : d);
  const uint64_t quotient = b / divisor;
  remainder = b - quotient * divisor;
  return quotient;
}

C10_ALWAYS_INLINE int64_t wrap_mul(int64_t a, int64_t b) {
  return static_cast<int64_t>(static_cast<uint64_t>(a) * static_cast<uint64_t>(b));
}
C10_ALWAYS_INLINE int64_t wrap_add(int64_t a, int64_t b) {
  return static_cast<int64_t>(static_cast<uint64_t>(a) + static_cast<uint64_t>(b));
}
C10_ALWAYS_INLINE int64_t wrap_neg(int64_t a) {
  return static_cast<int64_t>(uint64_t{0} - static_cast<uint64_t>(a));
}
C10_ALWAYS_INLINE bool out_of_range(int64_t h) { return h >= kRange || h <= -kRange; }

// Round half to even in plain IEEE arithmetic: adding 2^52 to a magnitude below 2^52 rounds
// it to an integer (the default rounding mode), and larger magnitudes are integers already.
// Inline and vectorizable, where nearbyint is a libm call that saves the FP environment.
C10_ALWAYS_INLINE double round_half_even(double x) {
  const double magnitude = std::fabs(x);
  const double rounded = magnitude < 0x1p52 ? (magnitude + 0x1p52) - 0x1p52 : magnitude;
  return std::copysign(rounded, x);
}

// The quantised b * f, and the flag bits it raises (q = 0 for an invalid lane).
template <typename f_t>
C10_ALWAYS_INLINE int64_t quantise(f_t f, double scale, int32_t& bits) {
  const double qd = round_half_even(static_cast<double>(f) * scale);
  if (!std::isfinite(qd)) {
    bits |= kFlagNonfinite;
    return 0;
  }
  if (std::fabs(qd) >= 0x1p62) {
    bits |= kFlagRange;
    return 0;
  }
  return static_cast<int64_t>(qd);
}

// One element: h <- mul(h, B) + q, or h <- mul^-1(h - q, B).
template <bool kInverse, int64_t kN, int64_t kD>
C10_ALWAYS_INLINE void step(int64_t& h_ref, int64_t& b_ref, int64_t q, int64_t n, int64_t d,
                            int32_t& bits) {
  const int64_t an = kN > 0 ? kN : std::abs(n);
  const bool negative = n < 0;
  int64_t h = h_ref;
  uint64_t b = static_cast<uint64_t>(b_ref);
  if constexpr (!kInverse) {
    int64_t quotient, remainder;
    floor_divmod<kD>(h, d, quotient, remainder);
    b = b * static_cast<uint64_t>(kD > 0 ? kD : d) + static_cast<uint64_t>(remainder);
    h = quotient;
    if (kN != 1) {
      uint64_t digit;
      b = udivmod<kN>(b, an, digit);
      h = wrap_add(wrap_mul(h, an), static_cast<int64_t>(digit));
    }
    if (negative) h = wrap_neg(h);
    h = wrap_add(h, q);
    if (out_of_range(h)) bits |= kFlagRange;
  } else {
    h = wrap_add(h, wrap_neg(q));
    if (out_of_range(h)) bits |= kFlagRange;
    if (negative) h = wrap_neg(h);
    if (kN != 1) {
      int64_t quotient, digit;
      floor_divmod<kN>(h, an, quotient, digit);
      b = b * static_cast<uint64_t>(an) + static_cast<uint64_t>(digit);
      h = quotient;
    }
    uint64_t remainder;
    b = udivmod<kD>(b, d, remainder);
    h = wrap_add(wrap_mul(h, kD > 0 ? kD : d), static_cast<int64_t>(remainder));
  }
  h_ref = h;
  b_ref = static_cast<int64_t>(b);
}

C10_ALWAYS_INLINE void publish(const at::Tensor& flags, int64_t step_index, int32_t bits) {
  if (bits != 0) {
    __atomic_fetch_or(flags.mutable_data_ptr<int32_t>() + step_index, bits, __ATOMIC_RELAXED);
  }
}

#ifdef CPU_CAPABILITY_AVX2
// ------------------------------------------------------------------ AVX2 path
// Four int64 lanes per __m256i. AVX2 has neither a 64-bit divide nor a 64-bit multiply-high,
// so a division by a small divisor c = 2^s * o (o odd) is a shift for 2^s and, for o, an
// exact division in double arithmetic, where every value is an integer below 2^53:
//   M = 1.5 * 2^52; for |v| < 2^51 the double M + v has the bits bits(M) + v, so an int64
//   moves in and out of a double with one integer add or subtract.
//   floor(v / o) = rint((v + k) / o) with k = -(o - 1) / 2: (r + k) / o lies in (-1/2, 1/2)
//   for every remainder r, at least 1/(2o) >= 1/128 from a tie, while the rounded
//   reciprocal errs by at most |v + k| / o * 2^-53 < 1/(4o); the rint is the rounding of
//   fma(v + k, 1/o, M) to an integer of M's binade. The remainder M + v - q*o is one exact
//   fnmadd.
// - |v| < 2^51 (the usual case: the states are ~2^35, the digit planes fill up slowly):
//   the one-digit division above, 7 instructions.
// - wider values (any int64, signed floor, or any uint64): a long division in two 32-bit
//   digits, hi = v >> 32 and lo = v mod 2^32 (as doubles by the 2^52 exponent trick):
//   qh = floor(hi / o), rh = hi - qh*o, x = rh * 2^32 + lo < o * 2^32, ql = floor(x / o),
//   the remainder x - ql*o and the quotient qh * 2^32 + ql (a dword blend). A group of four
//   takes it when any of its lanes needs it.
// So the lanes write the scalar code's bits for every input, corrupted ones included.
// q = rint(f * scale) is the low bits of f * scale + M where |f * scale| < 2^50 (round half
// to even, as the reference); a group of four with a larger, non-finite or NaN lane goes
// through the scalar code, which also sets the flags of such lanes. The sign of a negative n
// and the subtraction of the inverse fold into h' = (h ^ s) + (q' - s) (s = 0 or -1, q' = q,
// or -q from a negated scale for the inverse: rint is odd). The state range test is one
// compare, ANDed into a register and published at the end of the range.
namespace simd {

using I = __m256i;
using D = __m256d;

C10_ALWAYS_INLINE D as_d(I x) { return _mm256_castsi256_pd(x); }
C10_ALWAYS_INLINE I as_i(D x) { return _mm256_castpd_si256(x); }
C10_ALWAYS_INLINE I bcast(int64_t x) { return _mm256_set1_epi64x(x); }
C10_ALWAYS_INLINE D bcast(double x) { return _mm256_set1_pd(x); }

constexpr double kMagic = 0x1.8p52;                        // M = 1.5 * 2^52
constexpr int64_t kMagicBits = int64_t{0x4338000000000000};  // bits(M)
constexpr int64_t kExp52 = int64_t{0x4330000000000000};      // bits(2^52)

// Wrapping x * c (c > 0 small) plus a.
template <int64_t kC>
C10_ALWAYS_INLINE I mul_add(I x, I c_vec, I a) {
  if constexpr (kC == 1) {
    return _mm256_add_epi64(x, a);
  } else if constexpr (kC > 0 && (kC & (kC - 1)) == 0) {
    return _mm256_add_epi64(_mm256_slli_epi64(x, __builtin_ctzll(kC)), a);
  } else if constexpr (kC > 0 && __builtin_popcountll(kC) == 2) {
    constexpr int kLow = __builtin_ctzll(kC);
    constexpr int kHigh = 63 - __builtin_clzll(kC);
    const I lo = kLow == 0 ? x : _mm256_slli_epi64(x, kLow);
    return _mm256_add_epi64(_mm256_add_epi64(_mm256_slli_epi64(x, kHigh), lo), a);
  } else {
    const I lo = _mm256_mul_epu32(x, c_vec);
    const I hi = _mm256_mul_epu32(_mm256_srli_epi64(x, 32), c_vec);
    return _mm256_add_epi64(_mm256_add_epi64(lo, _mm256_slli_epi64(hi, 32)), a);
  }
}

// A positive divisor c <= 64 (the template constant kC when kC > 0), c = 2^shift * odd.
template <int64_t kC>
struct Divisor {
  static constexpr bool kConst = kC > 0;
  static constexpr int kShiftC = kConst ? __builtin_ctzll(static_cast<unsigned long long>(kC)) : 0;
  static constexpr int64_t kOddC = kConst ? (kC >> kShiftC) : 0;
  static constexpr bool kHasShift = !kConst || kShiftC > 0;
  static constexpr bool kHasOdd = !kConst || kOddC > 1;

  __m128i count;  // the shift, for the runtime case
  I low_mask, c_vec;
  D odd, inv, magic, m_minus_k, two32, hi_signed, hi_unsigned, lo_fix, rem_fix;

  explicit Divisor(int64_t runtime_c) {
    const int64_t c = kConst ? kC : runtime_c;
    const int shift = __builtin_ctzll(static_cast<unsigned long long>(c));
    const int64_t o = c >> shift;
    const double k = -static_cast<double>((o - 1) / 2);
    count = _mm_cvtsi64_si128(shift);
    low_mask = bcast((int64_t{1} << shift) - 1);
    c_vec = bcast(c);
    odd = bcast(static_cast<double>(o));
    inv = bcast(1.0 / static_cast<double>(o));
    magic = bcast(kMagic);
    m_minus_k = bcast(kMagic - k);              // (M + v) - this = v + k
    two32 = bcast(0x1p32);
    hi_signed = bcast(0x1p52 + 0x1p31 - k);     // A - this = hi + k (A = 2^52 + 2^31 + hi)
    hi_unsigned = bcast(0x1p52 - k);            // A - this = hi + k (A = 2^52 + hi)
    lo_fix = bcast(k - 0x1p52 - k * 0x1p32);    // (rh + k) 2^32 + 2^52 + lo + this = x + k
    rem_fix = bcast(kMagic - k);                // (r + k) + this = M + r
  }

  C10_ALWAYS_INLINE I srl(I v) const {
    return kConst ? _mm256_srli_epi64(v, kShiftC) : _mm256_srl_epi64(v, count);
  }
  C10_ALWAYS_INLINE I sra(I v) const {  // arithmetic (floor) shift, shift < 32
    const I lo = kConst ? _mm256_srli_epi64(v, kShiftC) : _mm256_srl_epi64(v, count);
    const I hi = kConst ? _mm256_srai_epi32(v, kShiftC) : _mm256_sra_epi32(v, count);
    return _mm256_blend_epi32(lo, hi, 0xAA);
  }
  C10_ALWAYS_INLINE I sll(I v) const {
    return kConst ? _mm256_slli_epi64(v, kShiftC) : _mm256_sll_epi64(v, count);
  }

  // floor(v / odd) and v mod odd for any int64 (kSigned) or uint64 v: two 32-bit digits.
  template <bool kSigned>
  C10_ALWAYS_INLINE I odd_divmod_wide(I v, I& rem) const {
    const I exp52 = bcast(kExp52);
    const I high = _mm256_srli_epi64(v, 32);
    const D hk = kSigned
        ? _mm256_sub_pd(as_d(_mm256_xor_si256(high, bcast(kExp52 | int64_t{0x80000000}))), hi_signed)
        : _mm256_sub_pd(as_d(_mm256_or_si256(high, exp52)), hi_unsigned);
    const D th = _mm256_fmadd_pd(hk, inv, magic);
    const D rhk = _mm256_fnmadd_pd(_mm256_sub_pd(th, magic), odd, hk);
    const D low = as_d(_mm256_blend_epi32(v, exp52, 0xAA));
    const D xk = _mm256_add_pd(_mm256_fmadd_pd(rhk, two32, low), lo_fix);
    const D tl = _mm256_fmadd_pd(xk, inv, magic);
    const D r = _mm256_add_pd(_mm256_fnmadd_pd(_mm256_sub_pd(tl, magic), odd, xk), rem_fix);
    rem = _mm256_sub_epi64(as_i(r), bcast(kMagicBits));
    return _mm256_blend_epi32(as_i(tl), _mm256_slli_epi64(as_i(th), 32), 0xAA);
  }

  // floor(v / odd) and v mod odd: one digit when every lane has |v| < 2^51.
  template <bool kSigned>
  C10_ALWAYS_INLINE I odd_divmod(I v, I& rem) const {
    const bool narrow =
        kSigned ? _mm256_testz_si256(_mm256_add_epi64(v, bcast(int64_t{1} << 51)),
                                     bcast(~((int64_t{1} << 52) - 1)))
                : _mm256_testz_si256(v, bcast(~((int64_t{1} << 51) - 1)));
    if (C10_LIKELY(narrow)) {
      const D vm = as_d(_mm256_add_epi64(v, bcast(kMagicBits)));  // M + v
      const D t = _mm256_fmadd_pd(_mm256_sub_pd(vm, m_minus_k), inv, magic);  // M + q
      const D r = _mm256_fnmadd_pd(_mm256_sub_pd(t, magic), odd, vm);          // M + r
      rem = _mm256_sub_epi64(as_i(r), bcast(kMagicBits));
      return _mm256_sub_epi64(as_i(t), bcast(kMagicBits));
    }
    return odd_divmod_wide<kSigned>(v, rem);
  }

  // floor(v / c) and v mod c in [0, c).
  template <bool kSigned>
  C10_ALWAYS_INLINE I divmod(I v, I& rem) const {
    I low = _mm256_setzero_si256();
    if constexpr (kHasShift) {
      low = _mm256_and_si256(v, low_mask);
      v = kSigned ? sra(v) : srl(v);
    }
    if constexpr (kHasOdd) {
      I r;
      v = odd_divmod<kSigned>(v, r);
      rem = kHasShift ? _mm256_or_si256(sll(r), low) : r;
    } else {
      rem = low;
    }
    return v;
  }
};

template <typename f_t>
C10_ALWAYS_INLINE D load4(const f_t* p) {
  if constexpr (std::is_same_v<f_t, double>) {
    return _mm256_loadu_pd(p);
  } else if constexpr (std::is_same_v<f_t, float>) {
    return _mm256_cvtps_pd(_mm_loadu_ps(p));
  } else if constexpr (std::is_same_v<f_t, c10::BFloat16>) {
    const __m128i raw = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p));
    return _mm256_cvtps_pd(_mm_castsi128_ps(_mm_slli_epi32(_mm_cvtepu16_epi32(raw), 16)));
  } else {
    static_assert(std::is_same_v<f_t, c10::Half>);
    return _mm256_cvtps_pd(_mm_cvtph_ps(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
  }
}

// double(v) of an int64, rounded once as a scalar conversion is.
C10_ALWAYS_INLINE D to_double(I v) {
  const D hi = _mm256_sub_pd(
      as_d(_mm256_xor_si256(_mm256_srli_epi64(v, 32), bcast(kExp52 | int64_t{0x80000000}))),
      bcast(0x1p52 + 0x1p31));
  const D lo = _mm256_sub_pd(as_d(_mm256_blend_epi32(v, bcast(kExp52), 0xAA)), bcast(0x1p52));
  return _mm256_fmadd_pd(hi, bcast(0x1p32), lo);
}

C10_ALWAYS_INLINE I load(const int64_t* p) {
  return _mm256_loadu_si256(reinterpret_cast<const I*>(p));
}
C10_ALWAYS_INLINE void store(int64_t* p, I v) { _mm256_storeu_si256(reinterpret_cast<I*>(p), v); }

// The per-call constants of one direction of the update.
template <bool kInverse, int64_t kN, int64_t kD>
struct Kernel {
  Divisor<kD> d;
  Divisor<kN> an;
  I sign, q_fix, range_bias;
  D scale, magic, abs_mask, fast_limit;

  explicit Kernel(const ExactParams& p)
      : d(p.denominator), an(p.numerator < 0 ? -p.numerator : p.numerator) {
    const bool negative = p.numerator < 0;
    sign = bcast(negative ? int64_t{-1} : int64_t{0});
    q_fix = bcast(kMagicBits + (negative ? int64_t{-1} : int64_t{0}));
    range_bias = bcast(kRange);
    scale = bcast(kInverse && !negative ? -p.scale : p.scale);
    magic = bcast(kMagic);
    abs_mask = as_d(bcast(int64_t{0x7fffffffffffffff}));
    fast_limit = bcast(0x1p50);
  }

  // q' - s of four lanes (q' = q, or -q for the inverse with n > 0); false when a lane needs
  // the scalar path.
  template <typename f_t>
  C10_ALWAYS_INLINE D quantise(const f_t* f, I& q) const {  // the fast-lane mask
    const D y = _mm256_mul_pd(load4(f), scale);
    q = _mm256_sub_epi64(as_i(_mm256_add_pd(y, magic)), q_fix);
    return _mm256_cmp_pd(_mm256_and_pd(y, abs_mask), fast_limit, _CMP_LT_OQ);
  }

  // in_range &= (|h| < 2^62) lanewise: h + 2^62 > 0 exactly when -2^62 < h < 2^62 (wrapping).
  C10_ALWAYS_INLINE void check(I h, I& in_range) const {
    in_range = _mm256_and_si256(
        in_range, _mm256_cmpgt_epi64(_mm256_add_epi64(h, range_bias), _mm256_setzero_si256()));
  }

  C10_ALWAYS_INLINE void step(I& h_ref, I& b_ref, I q, I& in_range) const {
    I h = h_ref, b = b_ref;
    if constexpr (!kInverse) {
      I r;
      h = d.template divmod<true>(h, r);
      b = mul_add<kD>(b, d.c_vec, r);
      if constexpr (kN != 1) {
        I digit;
        b = an.template divmod<false>(b, digit);
        h = mul_add<kN>(h, an.c_vec, digit);
      }
      h = _mm256_add_epi64(_mm256_xor_si256(h, sign), q);
      check(h, in_range);
    } else {
      h = _mm256_add_epi64(_mm256_xor_si256(h, sign), q);
      check(h, in_range);
      if constexpr (kN != 1) {
        I digit;
        h = an.template divmod<true>(h, digit);
        b = mul_add<kN>(b, an.c_vec, digit);
      }
      I r;
      b = d.template divmod<false>(b, r);
      h = mul_add<kD>(h, d.c_vec, r);
    }
    h_ref = h;
    b_ref = b;
  }
};

}  // namespace simd
#endif  // CPU_CAPABILITY_AVX2

// Updates the elements of ranges of one call; finish() gives the flag bits they raised.
template <bool kInverse, int64_t kN, int64_t kD>
struct Updater {
  const ExactParams& p;
  int32_t bits = 0;
#ifdef CPU_CAPABILITY_AVX2
  simd::Kernel<kInverse, kN, kD> kernel;
  simd::I in_range = _mm256_set1_epi64x(-1);
  explicit Updater(const ExactParams& params) : p(params), kernel(params) {}
#else
  explicit Updater(const ExactParams& params) : p(params) {}
#endif

  template <typename f_t>
  C10_ALWAYS_INLINE void run(int64_t* h, int64_t* b, const f_t* f, int64_t begin, int64_t end) {
    int64_t i = begin;
#ifdef CPU_CAPABILITY_AVX2
    for (; i + 8 <= end; i += 8) {  // two groups, one branch
      simd::I q0, q1;
      const simd::D fast = _mm256_and_pd(kernel.quantise(f + i, q0), kernel.quantise(f + i + 4, q1));
      if (C10_LIKELY(_mm256_movemask_pd(fast) == 0xF)) {
        simd::I h0 = simd::load(h + i), b0 = simd::load(b + i);
        simd::I h1 = simd::load(h + i + 4), b1 = simd::load(b + i + 4);
        kernel.step(h0, b0, q0, in_range);
        kernel.step(h1, b1, q1, in_range);
        simd::store(h + i, h0);
        simd::store(b + i, b0);
        simd::store(h + i + 4, h1);
        simd::store(b + i + 4, b1);
      } else {
        group(h, b, f, i);
        group(h, b, f, i + 4);
      }
    }
    for (; i + 4 <= end; i += 4) group(h, b, f, i);
#endif
    scalar(h, b, f, i, end);
  }

#ifdef CPU_CAPABILITY_AVX2
  template <typename f_t>
  C10_ALWAYS_INLINE void group(int64_t* h, int64_t* b, const f_t* f, int64_t i) {
    {
      simd::I q;
      if (C10_LIKELY(_mm256_movemask_pd(kernel.quantise(f + i, q)) == 0xF)) {
        simd::I hv = simd::load(h + i), bv = simd::load(b + i);
        kernel.step(hv, bv, q, in_range);
        simd::store(h + i, hv);
        simd::store(b + i, bv);
      } else {
        scalar(h, b, f, i, i + 4);
      }
    }
  }
#endif

  template <typename f_t>
  C10_ALWAYS_INLINE void scalar(int64_t* h, int64_t* b, const f_t* f, int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t q = quantise(f[i], p.scale, bits);
      step<kInverse, kN, kD>(h[i], b[i], q, p.numerator, p.denominator, bits);
    }
  }

  int32_t finish() {
#ifdef CPU_CAPABILITY_AVX2
    if (_mm256_movemask_pd(_mm256_castsi256_pd(in_range)) != 0xF) bits |= kFlagRange;
#endif
    return bits;
  }
};

template <bool kInverse, int64_t kN, int64_t kD, typename f_t>
void update_loop(int64_t* h, int64_t* b, const f_t* f, int64_t count, const ExactParams& p,
                 const at::Tensor& flags) {
  at::parallel_for(0, count, kGrain, [&](int64_t begin, int64_t end) {
    Updater<kInverse, kN, kD> updater(p);
    updater.run(h, b, f, begin, end);
    publish(flags, p.step, updater.finish());
  });
}

// sum over [begin, end) of (z * grid - f)^2 and of f^2 in double: four lanes by position
// from begin, added (0 + 1) + (2 + 3).
template <typename f_t>
C10_ALWAYS_INLINE void row_sums(const int64_t* z, const f_t* f, int64_t begin, int64_t end,
                                double grid, double& out_res, double& out_sq) {
  double res[4] = {}, sq[4] = {};
  int64_t i = begin;
#ifdef CPU_CAPABILITY_AVX2
  if (end - begin >= 4) {
    const simd::D grid_v = _mm256_set1_pd(grid);
    simd::D res_v = _mm256_setzero_pd(), sq_v = _mm256_setzero_pd();
    for (; i + 4 <= end; i += 4) {
      const simd::D fv = simd::load4(f + i);
      // z * grid is exact (a power of two), so the fused form rounds as the scalar one
      const simd::D diff = _mm256_fmsub_pd(simd::to_double(simd::load(z + i)), grid_v, fv);
      res_v = _mm256_fmadd_pd(diff, diff, res_v);
      sq_v = _mm256_fmadd_pd(fv, fv, sq_v);
    }
    _mm256_storeu_pd(res, res_v);
    _mm256_storeu_pd(sq, sq_v);
  }
#endif
  for (; i < end; ++i) {
    const double fi = static_cast<double>(f[i]);
    const double diff = static_cast<double>(z[i]) * grid - fi;
    res[(i - begin) & 3] += diff * diff;
    sq[(i - begin) & 3] += fi * fi;
  }
  out_res = (res[0] + res[1]) + (res[2] + res[3]);
  out_sq = (sq[0] + sq[1]) + (sq[2] + sq[3]);
}

// Row sums of (z * grid - f)^2 and f^2 in double, and the y-update on the same cache-resident
// block. Every row's sums are added in a fixed order (rows up to kChunk elements: one pass;
// longer rows: kChunk partials added in chunk order), so they do not depend on the threads.
template <int64_t kN, int64_t kD, typename f_t>
void residual_loop(int64_t* y, int64_t* b, const int64_t* z, const f_t* f, int64_t rows,
                   int64_t cols, const ExactParams& p, const at::Tensor& flags, double* out_res,
                   double* out_f) {
  if (cols <= kChunk) {
    const int64_t block_rows = std::max<int64_t>(1, 4096 / cols);  // ~4096 elements a block
    at::parallel_for(0, rows, std::max<int64_t>(1, kGrain / cols), [&](int64_t r0, int64_t r1) {
      Updater<false, kN, kD> updater(p);
      for (int64_t row = r0; row < r1; row += block_rows) {
        const int64_t stop = std::min(r1, row + block_rows);
        updater.run(y, b, f, row * cols, stop * cols);
        for (int64_t r = row; r < stop; ++r) {
          row_sums(z, f, r * cols, (r + 1) * cols, p.grid, out_res[r], out_f[r]);
        }
      }
      publish(flags, p.step, updater.finish());
    });
    return;
  }
  const int64_t chunks = (cols + kChunk - 1) / kChunk;
  const int64_t tasks = rows * chunks;
  std::vector<double> partial(2 * tasks);
  at::parallel_for(0, tasks, std::max<int64_t>(1, kGrain / kChunk), [&](int64_t t0, int64_t t1) {
    Updater<false, kN, kD> updater(p);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t row = t / chunks, chunk = t % chunks;
      const int64_t start = row * cols + chunk * kChunk;
      const int64_t stop = start + std::min(kChunk, cols - chunk * kChunk);
      updater.run(y, b, f, start, stop);
      row_sums(z, f, start, stop, p.grid, partial[2 * t], partial[2 * t + 1]);
    }
    publish(flags, p.step, updater.finish());
  });
  for (int64_t row = 0; row < rows; ++row) {
    double res = 0.0, sq = 0.0;
    for (int64_t t = row * chunks; t < (row + 1) * chunks; ++t) {
      res += partial[2 * t];
      sq += partial[2 * t + 1];
    }
    out_res[row] = res;
    out_f[row] = sq;
  }
}

// Calls body.template operator()<kN, kD>() with the pair as constants when it is a common
// one, else with <0, 0> (runtime divisors).
template <typename Body>
void with_ratio(int64_t n, int64_t d, Body&& body) {
  const int64_t an = n < 0 ? -n : n;
#define REVDEQ_EXACT_PAIR(AN, D) \
  if (an == AN && d == D) return body.template operator()<AN, D>();
  REVDEQ_EXACT_PAIR(1, 2)
  REVDEQ_EXACT_PAIR(1, 4)
  REVDEQ_EXACT_PAIR(3, 4)
  REVDEQ_EXACT_PAIR(1, 5)
  REVDEQ_EXACT_PAIR(4, 5)
  REVDEQ_EXACT_PAIR(1, 10)
#undef REVDEQ_EXACT_PAIR
  return body.template operator()<0, 0>();
}

#define REVDEQ_EXACT_DISPATCH_F(TYPE, NAME, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, TYPE, NAME, __VA_ARGS__)

void update(const at::Tensor& state, const at::Tensor& digits, const at::Tensor& f_out,
            const at::Tensor& flags, const ExactParams& params, bool inverse) {
  const int64_t count = state.numel();
  if (count == 0) return;
  int64_t* h = state.mutable_data_ptr<int64_t>();
  int64_t* b = digits.mutable_data_ptr<int64_t>();
  REVDEQ_EXACT_DISPATCH_F(f_out.scalar_type(), "revdeq_exact_cpu", [&] {
    const scalar_t* f = f_out.const_data_ptr<scalar_t>();
    with_ratio(params.numerator, params.denominator, [&]<int64_t kN, int64_t kD>() {
      if (inverse) {
        update_loop<true, kN, kD>(h, b, f, count, params, flags);
      } else {
        update_loop<false, kN, kD>(h, b, f, count, params, flags);
      }
    });
  });
}

void residual(const at::Tensor& y, const at::Tensor& digits, const at::Tensor& z,
              const at::Tensor& f_out, const at::Tensor& flags, const ExactParams& params,
              const at::Tensor& sq_res, const at::Tensor& sq_f) {
  const int64_t rows = y.size(0);
  if (rows == 0) return;
  const int64_t cols = y.numel() / rows;
  double* res = sq_res.mutable_data_ptr<double>();
  double* sq = sq_f.mutable_data_ptr<double>();
  if (cols == 0) {
    std::fill_n(res, rows, 0.0);
    std::fill_n(sq, rows, 0.0);
    return;
  }
  REVDEQ_EXACT_DISPATCH_F(f_out.scalar_type(), "revdeq_exact_residual_cpu", [&] {
    const scalar_t* f = f_out.const_data_ptr<scalar_t>();
    with_ratio(params.numerator, params.denominator, [&]<int64_t kN, int64_t kD>() {
      residual_loop<kN, kD>(y.mutable_data_ptr<int64_t>(), digits.mutable_data_ptr<int64_t>(),
                            z.const_data_ptr<int64_t>(), f, rows, cols, params, flags, res, sq);
    });
  });
}

#undef REVDEQ_EXACT_DISPATCH_F

}  // namespace exact
