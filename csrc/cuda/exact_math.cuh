// The element arithmetic of the reversal="exact" kernels (exact.cu), host-and-device so it
// can be checked off the GPU: plain C++ (no ATen, no CUDA headers) when not compiled by nvcc.
//
// Every function here mirrors revdeq_kernels/ops/reference.py bit for bit:
// - Floor division by d and |n| (d <= 64) is the cost of the ops, so a divisor is a type:
//   DivConst<K> for the common ratios (the compiler's own multiply-shift), DivPow2 (shift and
//   mask), DivMagic (one 64x64 high multiply by a host-computed reciprocal), DivOne (nothing).
//   Floor division of a signed x goes through x ^ (x >> 63), which is < 2^63: floor(x / d) =
//   ~floor(~x / d) for x < 0, so one unsigned quotient serves both signs, with no branch,
//   and a 63-bit dividend lets the runtime reciprocal skip the usual add-and-shift fix-up.
// - All arithmetic that a corrupted state or digit plane could overflow is done in uint64
//   and cast back (two's complement, as torch's int64 ops wrap): garbage in gives garbage
//   out and maybe a flag, never undefined behaviour. Valid input never wraps.
// - q = rint(f * scale): one correctly rounded multiply (__dmul_rn on the device, which nvcc
//   never contracts), then round-half-even. The NaN/Inf/range tests read the exponent bits,
//   so no fast-math setting can fold them away.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#include "host_device.cuh"

namespace revdeq::cuda::exact_math {

constexpr int32_t kNonfinite = 1;  // = kFlagNonfinite of checks.h (exact.cu asserts it)
constexpr int32_t kRange = 2;      // = kFlagRange

// The bits of a double (the device's reinterpret, the host's memcpy).
REVDEQ_HD uint64_t bits_of(double x) {
#if defined(__CUDA_ARCH__)
  return static_cast<uint64_t>(__double_as_longlong(x));
#else
  uint64_t u;
  std::memcpy(&u, &x, sizeof u);
  return u;
#endif
}

REVDEQ_HD double mul_rn(double a, double b) {
#if defined(__CUDA_ARCH__)
  return __dmul_rn(a, b);
#else
  return a * b;  // a lone multiply: nothing to contract it with
#endif
}

REVDEQ_HD double sub_rn(double a, double b) {
#if defined(__CUDA_ARCH__)
  return __dsub_rn(a, b);
#else
  return a - b;
#endif
}

REVDEQ_HD double rint_even(double x) {
#if defined(__CUDA_ARCH__)
  return rint(x);  // cvt.rni: round half to even, whatever the host's rounding mode
#else
  return std::nearbyint(x);  // the default rounding mode: half to even
#endif
}

REVDEQ_HD uint64_t umulhi(uint64_t a, uint64_t b) {
#if defined(__CUDA_ARCH__)
  return __umul64hi(a, b);
#else
  return static_cast<uint64_t>((static_cast<unsigned __int128>(a) * b) >> 64);
#endif
}

// Two's complement arithmetic without signed overflow.
REVDEQ_HD int64_t wrap_add(int64_t a, int64_t b) {
  return static_cast<int64_t>(static_cast<uint64_t>(a) + static_cast<uint64_t>(b));
}
REVDEQ_HD int64_t wrap_sub(int64_t a, int64_t b) {
  return static_cast<int64_t>(static_cast<uint64_t>(a) - static_cast<uint64_t>(b));
}
REVDEQ_HD int64_t wrap_mul(int64_t a, uint64_t b) {
  return static_cast<int64_t>(static_cast<uint64_t>(a) * b);
}
// x for mask 0, -x for mask -1 (all ones).
REVDEQ_HD int64_t negate_if(int64_t x, int64_t mask) {
  return static_cast<int64_t>((static_cast<uint64_t>(x) ^ static_cast<uint64_t>(mask)) -
                              static_cast<uint64_t>(mask));
}

// |h| >= 2^62, i.e. h outside (-2^62, 2^62). The wrapped value -2^63 counts as outside, where
// the reference's h.abs() wraps and misses it: the one difference, on corrupted input only.
REVDEQ_HD bool out_of_range(int64_t h) {
  constexpr uint64_t kLimit = uint64_t{1} << 62;
  return static_cast<uint64_t>(h) + (kLimit - 1) > 2 * kLimit - 2;
}

// A divisor known at run time. DivPow2 (value a power of two): log2 = log2(value).
// DivMagic (value >= 2): magic = ceil(2^(63 + l) / value) with l = ceil(log2(value)),
// shift = l - 1; then floor(x / value) = umulhi(magic, x) >> shift for every 0 <= x < 2^63
// (Granlund and Montgomery 1994, theorem 4.2: magic * value - 2^(63+l) is in [0, 2^l]).
struct DivisorArg {
  int64_t value;
  uint64_t magic;
  int shift;
  int log2;
};

// Floor quotient and remainder (in [0, d)) of any x, from udiv(u) = floor(u / d) for u < 2^63.
template <class UnsignedDiv>
REVDEQ_HD void floor_divmod_signed(int64_t x, int64_t d, int64_t& q, int64_t& r, UnsignedDiv udiv) {
  const int64_t sign = x >> 63;  // arithmetic shift (C++20): 0 or -1
  const uint64_t u = static_cast<uint64_t>(x ^ sign);  // x, or ~x = -x - 1 when x < 0: < 2^63
  q = static_cast<int64_t>(udiv(u) ^ static_cast<uint64_t>(sign));
  r = wrap_sub(x, wrap_mul(q, static_cast<uint64_t>(d)));  // in [0, d): exact mod 2^64
}

struct DivOne {
  REVDEQ_HD static void divmod(int64_t x, const DivisorArg&, int64_t& q, int64_t& r) {
    q = x;
    r = 0;
  }
  REVDEQ_HD static int64_t mul(int64_t x, const DivisorArg&) { return x; }
};

struct DivPow2 {
  REVDEQ_HD static void divmod(int64_t x, const DivisorArg& d, int64_t& q, int64_t& r) {
    q = x >> d.log2;  // arithmetic shift: the floor quotient
    r = static_cast<int64_t>(static_cast<uint64_t>(x) & static_cast<uint64_t>(d.value - 1));
  }
  REVDEQ_HD static int64_t mul(int64_t x, const DivisorArg& d) {
    return static_cast<int64_t>(static_cast<uint64_t>(x) << d.log2);
  }
};

struct DivMagic {
  REVDEQ_HD static void divmod(int64_t x, const DivisorArg& d, int64_t& q, int64_t& r) {
    floor_divmod_signed(x, d.value, q, r,
                        [&](uint64_t u) { return umulhi(d.magic, u) >> d.shift; });
  }
  REVDEQ_HD static int64_t mul(int64_t x, const DivisorArg& d) {
    return wrap_mul(x, static_cast<uint64_t>(d.value));
  }
};

constexpr int floor_log2(int64_t k) { return k <= 1 ? 0 : 1 + floor_log2(k / 2); }

template <int64_t K>
struct DivConst {
  static_assert(K >= 1);
  static constexpr bool kPow2 = (K & (K - 1)) == 0;
  static constexpr int kShift = floor_log2(K);
  REVDEQ_HD static void divmod(int64_t x, const DivisorArg&, int64_t& q, int64_t& r) {
    if constexpr (K == 1) {
      q = x;
      r = 0;
    } else if constexpr (kPow2) {
      q = x >> kShift;
      r = static_cast<int64_t>(static_cast<uint64_t>(x) & static_cast<uint64_t>(K - 1));
    } else {
      floor_divmod_signed(x, K, q, r, [](uint64_t u) { return u / static_cast<uint64_t>(K); });
    }
  }
  REVDEQ_HD static int64_t mul(int64_t x, const DivisorArg&) {
    if constexpr (K == 1) {
      return x;
    } else {
      return wrap_mul(x, static_cast<uint64_t>(K));
    }
  }
};

// Everything an exact kernel needs besides the tensors.
struct ExactArgs {
  double scale;     // ldexp((d - n) / d, frac_bits), from the host (ExactParams::scale)
  double grid;      // 2^-frac_bits (the residual sums; ExactParams::grid)
  DivisorArg d;     // the denominator
  DivisorArg an;    // |numerator|
  int64_t negate;   // -1 when numerator < 0, else 0
};

// Host only: the divisor constants of 1 <= value <= 2^62.
inline DivisorArg make_divisor(int64_t value) {
  int l = 0;
  while ((int64_t{1} << l) < value) ++l;  // l = ceil(log2(value))
  DivisorArg a{value, 0, 0, (value & (value - 1)) == 0 ? l : -1};
  if (value >= 2) {
    const unsigned __int128 p = static_cast<unsigned __int128>(1) << (63 + l);
    const auto v = static_cast<unsigned __int128>(value);
    a.magic = static_cast<uint64_t>((p + v - 1) / v);  // < 2^64 as value > 2^(l-1)
    a.shift = l - 1;
  }
  return a;
}

inline ExactArgs make_exact_args(int64_t numerator, int64_t denominator, double scale,
                                 double grid) {
  const int64_t an = numerator < 0 ? -numerator : numerator;
  return {scale, grid, make_divisor(denominator), make_divisor(an),
          numerator < 0 ? int64_t{-1} : int64_t{0}};
}

// q = rint(f * scale); a NaN/Inf product or |q| >= 2^62 adds 0 and sets its flag bit.
REVDEQ_HD int64_t quantise(double f, double scale, int32_t& flags) {
  const double q = rint_even(mul_rn(f, scale));
  const uint32_t exponent = static_cast<uint32_t>(bits_of(q) >> 52) & 0x7ffu;
  const bool nonfinite = exponent == 0x7ffu;
  const bool too_big = exponent >= 1023u + 62u;  // |q| >= 2^62 (or non-finite)
  flags |= nonfinite ? kNonfinite : (too_big ? kRange : 0);
  return too_big ? 0 : static_cast<int64_t>(q);  // converts an integer < 2^62: exact
}

// h <- mul(h, B) + q:  B = B*d + (h mod d); h = h div d; h = h*an + (B mod an); B = B div an;
// h = sign(n) h + q.
template <class DivD, class DivAn>
REVDEQ_HD int64_t relax_element(int64_t h, int64_t& digits, int64_t q, const ExactArgs& a,
                                int32_t& flags) {
  int64_t hq, r, bq, s;
  DivD::divmod(h, a.d, hq, r);
  DivAn::divmod(wrap_add(DivD::mul(digits, a.d), r), a.an, bq, s);
  digits = bq;
  const int64_t out = wrap_add(negate_if(wrap_add(DivAn::mul(hq, a.an), s), a.negate), q);
  flags |= out_of_range(out) ? kRange : 0;
  return out;
}

// h <- mul^-1(h - q, B): the steps of relax_element undone in reverse order.
template <class DivD, class DivAn>
REVDEQ_HD int64_t unrelax_element(int64_t h, int64_t& digits, int64_t q, const ExactArgs& a,
                                  int32_t& flags) {
  const int64_t x = wrap_sub(h, q);
  flags |= out_of_range(x) ? kRange : 0;
  int64_t xq, s, bq, r;
  DivAn::divmod(negate_if(x, a.negate), a.an, xq, s);
  DivD::divmod(wrap_add(DivAn::mul(digits, a.an), s), a.d, bq, r);
  digits = bq;
  return wrap_add(DivD::mul(xq, a.d), r);
}

// One element of exact_relax_ (kInverse = false) or exact_unrelax_.
template <bool kInverse, class DivD, class DivAn>
REVDEQ_HD void exact_element(int64_t& h, int64_t& digits, double f, const ExactArgs& a,
                             int32_t& flags) {
  const int64_t q = quantise(f, a.scale, flags);
  h = kInverse ? unrelax_element<DivD, DivAn>(h, digits, q, a, flags)
               : relax_element<DivD, DivAn>(h, digits, q, a, flags);
}

// The two terms of one element of the residual sums: (z * 2^-F - f)^2 and f^2.
REVDEQ_HD void residual_terms(int64_t z, double f, double grid, double& res, double& sq_f) {
  const double diff = sub_rn(mul_rn(static_cast<double>(z), grid), f);
  res = mul_rn(diff, diff);
  sq_f = mul_rn(f, f);
}

// Calls body(DivD{}, DivAn{}) with the divisor types of (|numerator|, denominator): the
// common ratios as compile-time constants, else the run-time fast paths.
template <class Body>
inline void with_divisors(int64_t an, int64_t d, Body&& body) {
  if (an == 1 && d == 2) {
    body(DivConst<2>{}, DivConst<1>{});
  } else if (an == 1 && d == 4) {
    body(DivConst<4>{}, DivConst<1>{});
  } else if (an == 3 && d == 4) {
    body(DivConst<4>{}, DivConst<3>{});
  } else if (an == 1 && d == 5) {
    body(DivConst<5>{}, DivConst<1>{});
  } else if (an == 4 && d == 5) {
    body(DivConst<5>{}, DivConst<4>{});
  } else if (an == 1 && d == 10) {
    body(DivConst<10>{}, DivConst<1>{});
  } else if ((d & (d - 1)) == 0) {
    if (an == 1) {
      body(DivPow2{}, DivOne{});
    } else {
      body(DivPow2{}, DivMagic{});
    }
  } else if (an == 1) {
    body(DivMagic{}, DivOne{});
  } else {
    body(DivMagic{}, DivMagic{});
  }
}

}  // namespace revdeq::cuda::exact_math
