// The CUDA the kernels of csrc/cuda use, on the host, so that their own source (kernels.cu,
// exact.cu: memory paths, team reductions, grid-stride loops, flags) runs with no GPU, built by
// the host compiler under the address and UB sanitizers (tests/test_cuda_emulated.py).
//
// Model: a launch runs its blocks one after another; a block's threads are fibers on the
// calling thread, each running until it reaches a barrier or returns. __syncthreads,
// __syncthreads_or and full-warp __shfl_xor_sync are barriers over the block or the warp; one
// that can never be released (a thread returned, or waits at another) is a deadlock on the
// GPU, and here fails the launch, naming it. __shared__ arrays are function statics (one
// block at a time uses them). Element arithmetic: the _rn intrinsics are the host's IEEE
// operations (built with -ffp-contract=off, so nothing is fused that the kernel does not fuse);
// exact_math.cuh takes its host branches.
//
// Not modelled: memory ordering between blocks or between threads other than at barriers (no
// kernel here shares memory without one), and the device-only intrinsics (their host twins
// are checked by tests/test_cuda_exact_math.py).
#pragma once

#include <sys/mman.h>
#include <ucontext.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/common_interface_defs.h>
#endif

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static

struct uint3 {
  unsigned int x, y, z;
};
struct dim3 {
  unsigned int x, y, z;
};

// The running thread's coordinates: set by the scheduler at every switch (one launch at a time).
inline uint3 threadIdx{0, 0, 0};
inline uint3 blockIdx{0, 0, 0};
inline dim3 blockDim{1, 1, 1};
inline dim3 gridDim{1, 1, 1};

inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __fmaf_rn(float a, float b, float c) { return std::fmaf(a, b, c); }
inline double __dmul_rn(double a, double b) { return a * b; }
inline double __dsub_rn(double a, double b) { return a - b; }
inline double __dadd_rn(double a, double b) { return a + b; }
inline double __ddiv_rn(double a, double b) { return a / b; }
inline double __fma_rn(double a, double b, double c) { return std::fma(a, b, c); }

namespace cuda_emulation {

constexpr int kWarpSize = 32;

// Unwinds a thread's kernel once its block is found broken; the launch reports why.
struct BlockFailed {};

// A block's threads as fibers on the calling thread: each runs until it reaches a barrier or
// returns; a barrier is released once every thread it concerns waits at it, and the threads
// it releases run next. Threads start in ascending order in even launches and descending in
// odd ones, so a read that a missing barrier leaves before its write shows in one of them.
class Scheduler {
 public:
  static Scheduler& instance() {
    static Scheduler* const scheduler = new Scheduler();  // leaked: fibers' stacks live on
    return *scheduler;
  }

  // Runs body() as every thread of every block, blocks in order; throws on a broken block.
  template <class Body>
  void run(int grid, int threads, Body& body) {
    std::lock_guard<std::mutex> one_launch(launch_mutex_);
    const bool descending = launches_++ % 2 == 1;
    body_ = [&body] { body(); };
    threads_ = threads;
    blockDim = {static_cast<unsigned>(threads), 1, 1};
    gridDim = {static_cast<unsigned>(grid), 1, 1};
    while (static_cast<int>(fibers_.size()) < threads) fibers_.push_back(std::make_unique<Fiber>());
    for (int b = 0; b < grid; ++b) {
      blockIdx = {static_cast<unsigned>(b), 0, 0};
      run_block(descending);
    }
  }

  // __syncthreads / __syncthreads_or: the OR of every thread's predicate.
  int sync_block(int predicate) {
    Fiber& self = *fibers_[current_];
    self.state = State::kAtBlockBarrier;
    self.value = predicate != 0;
    suspend();
    return static_cast<int>(self.value);
  }

  // __shfl_xor_sync(0xffffffff, value, lane_mask): lane (lane ^ lane_mask)'s value.
  uint64_t shuffle_xor(uint64_t bits, int lane_mask) {
    if (lane_mask <= 0 || lane_mask >= kWarpSize) {
      fail("__shfl_xor_sync with lane mask " + std::to_string(lane_mask));
    }
    Fiber& self = *fibers_[current_];
    self.state = State::kAtShuffle;
    self.value = bits;
    self.lane_mask = lane_mask;
    suspend();
    return self.value;
  }

  [[noreturn]] void fail(const std::string& why) {
    if (message_.empty()) {
      message_ = "block " + std::to_string(blockIdx.x) + ", thread " + std::to_string(current_) +
                 ": " + why;
    }
    throw BlockFailed{};
  }

 private:
  enum class State { kRunnable, kAtBlockBarrier, kAtShuffle, kReturned };
  static constexpr size_t kStackBytes = 64 * 1024;

  // A fiber's stack, with an inaccessible page below it: an overflow faults at once. (Small:
  // the address sanitizer clears a stack's shadow at every switch to it.)
  struct Stack {
    Stack() {
      const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
      void* base = mmap(nullptr, page + kStackBytes, PROT_READ | PROT_WRITE,
                        MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
      if (base == MAP_FAILED || mprotect(base, page, PROT_NONE) != 0) {
        throw std::runtime_error("cannot map a fiber stack");
      }
      bottom = static_cast<char*>(base) + page;
    }
    char* get() const { return bottom; }
    char* bottom = nullptr;  // never unmapped: the scheduler lives as long as the process
  };

  struct Fiber {
    ucontext_t context{};
    Stack stack;
    State state = State::kRunnable;
    uint64_t value = 0;
    int lane_mask = 0;
    void* fake_stack = nullptr;  // the address sanitizer's, while switched out
  };

  void run_block(bool descending) {
    message_.clear();
    for (int t = 0; t < threads_; ++t) {
      Fiber& fiber = *fibers_[t];
      getcontext(&fiber.context);
      fiber.context.uc_stack.ss_sp = fiber.stack.get();
      fiber.context.uc_stack.ss_size = kStackBytes;
      fiber.context.uc_link = nullptr;
      makecontext(&fiber.context, &Scheduler::entry, 0);
      fiber.state = State::kRunnable;
    }
    // Depth first: the threads a barrier releases run next, so whichever warps finish a
    // barrier first run ahead of the rest, as they may on the GPU.
    std::vector<int> ready;
    make_ready(0, threads_, descending, ready);
    while (!ready.empty()) {
      const int t = ready.back();
      ready.pop_back();
      resume(t);
      if (!message_.empty()) throw std::runtime_error("CUDA kernel (host emulation): " + message_);
      release_barrier_of(t, descending, ready);
    }
    for (int t = 0; t < threads_; ++t) {
      if (fibers_[t]->state != State::kReturned) deadlock(t);
    }
  }

  // Queues threads [first, last) to run next, in the launch's order.
  void make_ready(int first, int last, bool descending, std::vector<int>& ready) {
    for (int k = 0; k < last - first; ++k) {
      const int t = descending ? first + k : last - 1 - k;  // popped from the back
      fibers_[t]->state = State::kRunnable;
      ready.push_back(t);
    }
  }

  // Releases the barrier thread t has just reached, if every thread it concerns waits there.
  void release_barrier_of(int t, bool descending, std::vector<int>& ready) {
    const State state = fibers_[t]->state;
    if (state == State::kAtBlockBarrier) {
      for (int u = 0; u < threads_; ++u) {
        if (fibers_[u]->state != State::kAtBlockBarrier) return;
      }
      uint64_t any = 0;
      for (int u = 0; u < threads_; ++u) any |= fibers_[u]->value;
      for (int u = 0; u < threads_; ++u) fibers_[u]->value = any;
      make_ready(0, threads_, descending, ready);
    } else if (state == State::kAtShuffle) {
      const int first = t / kWarpSize * kWarpSize, last = std::min(threads_, first + kWarpSize);
      for (int u = first; u < last; ++u) {
        if (fibers_[u]->state != State::kAtShuffle) return;
      }
      uint64_t bits[kWarpSize];
      for (int u = first; u < last; ++u) {
        const int partner = first + ((u - first) ^ fibers_[u]->lane_mask);
        if (partner >= last) {
          throw std::runtime_error("CUDA kernel (host emulation): block " + std::to_string(blockIdx.x) +
                                   ", thread " + std::to_string(u) + ": shuffles with lane " +
                                   std::to_string(partner - first) + ", past the block");
        }
        bits[u - first] = fibers_[partner]->value;
      }
      for (int u = first; u < last; ++u) fibers_[u]->value = bits[u - first];
      make_ready(first, last, descending, ready);
    }
  }

  // No thread can run, and thread `waiter` waits at a barrier that will never be released:
  // on the GPU, a hang.
  [[noreturn]] void deadlock(int waiter) {
    int returned = 0, at_block = 0, at_shuffle = 0;
    for (int t = 0; t < threads_; ++t) {
      returned += fibers_[t]->state == State::kReturned;
      at_block += fibers_[t]->state == State::kAtBlockBarrier;
      at_shuffle += fibers_[t]->state == State::kAtShuffle;
    }
    const bool waits_at_block = fibers_[waiter]->state == State::kAtBlockBarrier;
    throw std::runtime_error(
        "CUDA kernel (host emulation): block " + std::to_string(blockIdx.x) + " deadlocks: thread " +
        std::to_string(waiter) + " waits at " + (waits_at_block ? "__syncthreads" : "__shfl_xor_sync") +
        " while " + std::to_string(returned) + " threads have returned, " + std::to_string(at_block) +
        " wait at __syncthreads and " + std::to_string(at_shuffle) + " at __shfl_xor_sync");
  }

  void resume(int t) {
    current_ = t;
    threadIdx = {static_cast<unsigned>(t), 0, 0};
    Fiber& fiber = *fibers_[t];
#if defined(__SANITIZE_ADDRESS__)
    __sanitizer_start_switch_fiber(&main_fake_stack_, fiber.stack.get(), kStackBytes);
#endif
    swapcontext(&main_context_, &fiber.context);
#if defined(__SANITIZE_ADDRESS__)
    __sanitizer_finish_switch_fiber(main_fake_stack_, nullptr, nullptr);
#endif
  }

  // From a fiber: back to run_block, until the barrier it waits at is released.
  void suspend() { switch_to_main(false); }

  void switch_to_main(bool for_good) {
    Fiber& fiber = *fibers_[current_];
#if defined(__SANITIZE_ADDRESS__)
    __sanitizer_start_switch_fiber(for_good ? nullptr : &fiber.fake_stack, main_stack_bottom_,
                                   main_stack_size_);
#endif
    swapcontext(&fiber.context, &main_context_);
#if defined(__SANITIZE_ADDRESS__)
    __sanitizer_finish_switch_fiber(fiber.fake_stack, &main_stack_bottom_, &main_stack_size_);
#endif
  }

  static void entry() {
    Scheduler& self = instance();
#if defined(__SANITIZE_ADDRESS__)
    __sanitizer_finish_switch_fiber(nullptr, &self.main_stack_bottom_, &self.main_stack_size_);
#endif
    try {
      self.body_();
    } catch (const BlockFailed&) {
    }
    self.fibers_[self.current_]->state = State::kReturned;
    self.switch_to_main(true);  // never resumed
  }

  std::mutex launch_mutex_;
  uint64_t launches_ = 0;
  std::function<void()> body_;
  int threads_ = 0, current_ = 0;
  std::vector<std::unique_ptr<Fiber>> fibers_;
  ucontext_t main_context_{};
  void* main_fake_stack_ = nullptr;
  const void* main_stack_bottom_ = nullptr;
  size_t main_stack_size_ = 0;
  std::string message_;
};

// kernel<<<grid, threads>>>(args...).
template <typename... Params, typename... Args>
void launch(void (*kernel)(Params...), int grid, int threads, Args... args) {
  if (grid < 1 || threads < 1 || threads > 1024) {
    throw std::invalid_argument("launch of " + std::to_string(grid) + " blocks of " +
                                std::to_string(threads) + " threads");
  }
  auto body = [&] { kernel(args...); };
  Scheduler::instance().run(grid, threads, body);
}

}  // namespace cuda_emulation

inline void __syncthreads() { cuda_emulation::Scheduler::instance().sync_block(0); }
inline int __syncthreads_or(int predicate) {
  return cuda_emulation::Scheduler::instance().sync_block(predicate);
}

template <typename T>
T __shfl_xor_sync(unsigned int mask, T value, int lane_mask, int width = cuda_emulation::kWarpSize) {
  static_assert(std::is_trivially_copyable_v<T> && sizeof(T) <= 8, "a register-sized value");
  auto& scheduler = cuda_emulation::Scheduler::instance();
  if (mask != 0xffffffffu || width != cuda_emulation::kWarpSize) {
    scheduler.fail("only full-warp __shfl_xor_sync is emulated");
  }
  uint64_t bits = 0;
  std::memcpy(&bits, &value, sizeof(T));
  bits = scheduler.shuffle_xor(bits, lane_mask);
  std::memcpy(&value, &bits, sizeof(T));
  return value;
}

inline int atomicOr(int* address, int value) {
  const int old = *address;
  *address = old | value;
  return old;
}
