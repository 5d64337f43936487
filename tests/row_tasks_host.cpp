// Prints the task spans of the CUDA per-sample-sum kernels (csrc/cuda/row_tasks.cuh) for
// tests/test_cuda_row_tasks.py, computed on the host:
//
//   row_tasks_host ROWS COLS CHUNKS TASK_LEN VECTORIZED V
//
// one line "begin head body end" per task, tasks in order.
#include <cstdio>
#include <cstdlib>

#include "../csrc/cuda/row_tasks.cuh"

int main(int argc, char** argv) {
  if (argc != 7) {
    std::fprintf(stderr, "usage: %s ROWS COLS CHUNKS TASK_LEN VECTORIZED V\n", argv[0]);
    return 2;
  }
  const long long rows = std::atoll(argv[1]), cols = std::atoll(argv[2]), chunks = std::atoll(argv[3]);
  const long long task_len = std::atoll(argv[4]), v = std::atoll(argv[6]);
  const bool vectorized = std::atoi(argv[5]) != 0;
  for (long long task = 0; task < rows * chunks; ++task) {
    const auto s = revdeq::cuda::row_tasks::task_span(task, cols, chunks, task_len, vectorized, v);
    std::printf("%lld %lld %lld %lld\n", static_cast<long long>(s.begin), static_cast<long long>(s.head),
                static_cast<long long>(s.body), static_cast<long long>(s.end));
  }
  return 0;
}
