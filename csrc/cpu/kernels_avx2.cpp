// The CPU kernels compiled for AVX2 + FMA + F16C, selected at run time when torch reports an
// AVX2 (or AVX512) CPU: ATen's own CPU_CAPABILITY scheme, without per-file compiler flags.
//
// Only this file's kernels and at::vec (namespaced at::vec::AVX2 by CPU_CAPABILITY) are
// compiled for AVX2: every other header that at::vec pulls in is included first, under the
// baseline target, so no inline function shared with the rest of the extension (c10, ATen,
// libstdc++) gets an AVX2 copy that the linker could pick for the portable path.
#include "kernels.h"

#if REVDEQ_CPU_HAVE_AVX2

#include <ATen/AccumulateType.h>
#include <ATen/Dispatch.h>
#include <ATen/NumericUtils.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/native/Math.h>
#include <ATen/native/cpu/zmath.h>
#include <ATen/native/quantized/AffineQuantizerBase.h>
#include <c10/util/BFloat16-math.h>
#include <c10/util/Load.h>
#include <c10/util/MathConstants.h>
#include <c10/util/TypeCast.h>
#include <c10/util/copysign.h>
#include <c10/util/irange.h>
#include <x86intrin.h>

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstdlib>
#include <type_traits>
#include <vector>

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
// GCC's C++ front end lexes the whole file before it applies `#pragma GCC target`, so the
// pragma never defines the ISA macros that at::vec's AVX2 path and sleef.h's AVX
// declarations test. Define them for this region only.
#define __AVX__ 1
#define __AVX2__ 1
#define __FMA__ 1
#define __F16C__ 1
#define CPU_CAPABILITY AVX2
#define CPU_CAPABILITY_AVX2
#include "kernels_impl.h"
#undef __AVX__
#undef __AVX2__
#undef __FMA__
#undef __F16C__
#pragma GCC pop_options

#endif  // REVDEQ_CPU_HAVE_AVX2
