// Runs the CUDA exact kernels' element arithmetic (csrc/cuda/exact_math.cuh) on the CPU, so
// tests/test_cuda_exact_math.py can compare its bits with the reference without a GPU.
//
//   exact_math_host NUMERATOR DENOMINATOR FRAC_BITS INVERSE DIVISORS IN OUT
//
// DIVISORS: "kernel" dispatches as exact.cu does (exact_math::with_divisors: compile-time
// constants for the common ratios, shifts for powers of two); "magic" forces the run-time
// reciprocal for every divisor above 1, so each path is checked on every ratio.
// IN:  n records {int64 h, int64 digits, float64 f, int64 z}
// OUT: n records {int64 h, int64 digits, int32 flags, int32 unused, float64 res, float64 sq_f}
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "../csrc/cuda/exact_math.cuh"

namespace em = revdeq::cuda::exact_math;

namespace {

struct In {
  int64_t h, digits;
  double f;
  int64_t z;
};
struct Out {
  int64_t h, digits;
  int32_t flags, unused;
  double res, sq_f;
};

template <class DivD, class DivAn>
void run(bool inverse, const em::ExactArgs& args, const std::vector<In>& in, std::vector<Out>& out) {
  for (size_t i = 0; i < in.size(); ++i) {
    Out o{in[i].h, in[i].digits, 0, 0, 0.0, 0.0};
    em::residual_terms(in[i].z, in[i].f, args.grid, o.res, o.sq_f);
    if (inverse) {
      em::exact_element<true, DivD, DivAn>(o.h, o.digits, in[i].f, args, o.flags);
    } else {
      em::exact_element<false, DivD, DivAn>(o.h, o.digits, in[i].f, args, o.flags);
    }
    out[i] = o;
  }
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 8) {
    std::fprintf(stderr, "usage: %s NUMERATOR DENOMINATOR FRAC_BITS INVERSE kernel|magic IN OUT\n", argv[0]);
    return 2;
  }
  const int64_t numerator = std::atoll(argv[1]), denominator = std::atoll(argv[2]);
  const int frac_bits = std::atoi(argv[3]);
  const bool inverse = std::atoi(argv[4]) != 0;
  const bool magic = std::strcmp(argv[5], "magic") == 0;
  std::FILE* fin = std::fopen(argv[6], "rb");
  if (!fin) return 3;
  std::vector<In> in;
  In record;
  while (std::fread(&record, sizeof record, 1, fin) == 1) in.push_back(record);
  std::fclose(fin);
  std::vector<Out> out(in.size());

  // scale and grid as checks.h's check_exact derives them
  const double ratio = static_cast<double>(denominator - numerator) / static_cast<double>(denominator);
  const em::ExactArgs args = em::make_exact_args(numerator, denominator, std::ldexp(ratio, frac_bits),
                                                 std::ldexp(1.0, -frac_bits));
  const int64_t an = numerator < 0 ? -numerator : numerator;
  if (!magic) {
    em::with_divisors(an, denominator, [&](auto d, auto a) {
      run<decltype(d), decltype(a)>(inverse, args, in, out);
    });
  } else if (an == 1) {
    run<em::DivMagic, em::DivOne>(inverse, args, in, out);
  } else {
    run<em::DivMagic, em::DivMagic>(inverse, args, in, out);
  }

  std::FILE* fout = std::fopen(argv[7], "wb");
  if (!fout || std::fwrite(out.data(), sizeof(Out), out.size(), fout) != out.size()) return 4;
  return std::fclose(fout) == 0 ? 0 : 4;
}
