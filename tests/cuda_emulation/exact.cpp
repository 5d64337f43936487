// csrc/cuda/exact.cu, built by the host compiler on cuda_emulation.h.
#include "cuda_emulation.h"

#include "../../csrc/cuda/exact.cu"
