// How the per-sample-sum kernels (kernels.cu's residual_kernel, exact.cu's
// exact_residual_kernel) split a [rows, cols] tensor into tasks, and a task into scalar and
// vector parts. Host-and-device, so tests/test_cuda_row_tasks.py checks on the host, with no
// GPU, that the parts tile every row exactly once with whole, aligned vectors.
#pragma once

#include <cstdint>

#include "host_device.cuh"

namespace revdeq::cuda::row_tasks {

// Task t's elements, flat indices: [begin, head) scalar up to the first multiple of V;
// [head, body) whole V-element vectors (k = head / V .. body / V); [body, end) the scalar
// tail. Without vectorized (a misaligned pointer), all of it is scalar: head = body = end.
struct TaskSpan {
  int64_t begin, head, body, end;
};

// Row t / chunks, split into chunks tasks of task_len elements (the last one shorter).
REVDEQ_HD TaskSpan task_span(int64_t task, int64_t cols, int64_t chunks, int64_t task_len,
                             bool vectorized, int64_t V) {
  const int64_t row = task / chunks;
  const int64_t begin = row * cols + (task - row * chunks) * task_len;
  const int64_t row_end = (row + 1) * cols;
  const int64_t end = begin + task_len < row_end ? begin + task_len : row_end;
  const int64_t aligned = (begin + V - 1) / V * V;
  const int64_t head = !vectorized ? end : (aligned < end ? aligned : end);
  return {begin, head, head + (end - head) / V * V, end};
}

}  // namespace revdeq::cuda::row_tasks
