// Stands in for the CUDA runtime header that csrc/cuda/kernels.cuh includes for cudaStream_t,
// so the host emulation builds with no CUDA toolkit (the launches ignore the stream).
#pragma once

typedef struct CUstream_st* cudaStream_t;
