// The CPU kernels for any CPU: at::vec's portable Vectorized (NEON on aarch64), compiled with
// the extension's baseline flags. Selected when torch reports no AVX2 (or
// ATEN_CPU_CAPABILITY=default).
#define CPU_CAPABILITY DEFAULT
#include "kernels_impl.h"
