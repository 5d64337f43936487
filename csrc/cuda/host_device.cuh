// REVDEQ_HD: a function the CUDA kernels call that also compiles as plain C++ (no CUDA
// headers), so the tests can build and check it on the host (tests/*_host.cpp).
#pragma once

#if defined(__CUDACC__)
#define REVDEQ_HD __host__ __device__ __forceinline__
#else
#define REVDEQ_HD inline
#endif
