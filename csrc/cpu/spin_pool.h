// A small persistent thread pool for the CPU sparse kernels, torch-free.
//
// Why not only at::parallel_for (OpenMP): a decode step calls ~200 of these kernels at a few tens of µs each, and the
// serving engine calls them from its own thread, not the process's initial thread. Measured on the 2-core AMD EPYC
// (torch 2.13, libgomp): a 1536x576 2:4 call took 20 µs from the initial thread, 66-90 µs from any other (there
// libgomp throttles its spin-wait, as the process has more OpenMP threads than cores, and each region pays a worker
// wake-up); a 2:4 SmolLM2 decode step in the engine took 53 ms instead of 33. This pool's workers spin for
// kSpinMicros after each job whichever thread calls: the engine's step is 31-32 ms with it. On the initial thread
// OpenMP stays (ops_cpu.cpp): there this pool's spinning worker and torch's spinning OpenMP worker competed for the 2
// cores (46-64 ms per step against OpenMP's 28-33).
#pragma once

#include <cstdint>
#include <functional>

namespace sparsefast_cpu {

// Run fn(begin, end) over [0, n) in at most `threads` contiguous parts of at least `grain` items, the calling thread
// doing the first part; returns when all parts are done. Calls from several threads at once are safe: a call that
// finds the pool busy runs its whole range in the calling thread.
void parallel_ranges(int64_t n, int64_t grain, int threads, const std::function<void(int64_t, int64_t)>& fn);

}  // namespace sparsefast_cpu
