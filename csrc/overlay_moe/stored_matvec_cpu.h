// Why: the base GEMV + grouped shrink of a small batch as OpenMP work items, for the one-call forward of
// overlay_moe_cpu.cpp to run inside its own parallel region (stored_matvec_cpu.cpp holds the kernels). Internal
// to the CPU kernels; the public contract is overlay_moe.h (MatvecProblem, ShrinkProblem).
#pragma once

#include <cstdint>
#include <memory>

#include "overlay_moe/overlay_moe.h"

namespace lazarus {

// stored_matvec_and_shrink_cpu's two products split into items: kBaseRowsPerItem rows of the base, or (expert,
// first rank row) of the shrink, in one index range. Built before the parallel loop; prepare_inputs() reads
// the input rows (and rounds them for an integer MXFP4 token mode), so a plan whose inputs an earlier stage
// writes is prepared after that stage. run(it) for it < items() may be called from any thread, each item once.
class MatvecShrinkPlan {
 public:
  MatvecShrinkPlan(const MatvecProblem& base, const ShrinkProblem& shrink);
  ~MatvecShrinkPlan();
  MatvecShrinkPlan(const MatvecShrinkPlan&) = delete;
  MatvecShrinkPlan& operator=(const MatvecShrinkPlan&) = delete;

  int64_t items() const;
  // Items [0, base_items()) are the base's row runs, the others the shrink's; shrink_expert(it), for
  // it >= base_items(), is the expert whose factor rows (and pairs' outputs) shrink item it covers.
  int64_t base_items() const;
  int64_t shrink_expert(int64_t it) const;
  void prepare_inputs();
  // prepare_inputs() in three steps, for a base input that an earlier stage of the same parallel region finishes
  // column block by column block: layout_inputs() before the region, fill_base_inputs(c0, c1) for the columns
  // [c0, c1) of every input row once they are final (c0 and c1 multiples of 32 or the row's end; disjoint ranges
  // may run on different threads; false when they hold inf or NaN), then commit_inputs(every fill was true) on
  // one thread before run().
  void layout_inputs();
  bool fill_base_inputs(int64_t c0, int64_t c1);
  void commit_inputs(bool finite);
  void run(int64_t it) const;
  // Asks for the first `bytes` of the weight rows item `it` reads in L2 (MXFP4: the code bytes and, in proportion,
  // their scales), without waiting: for a stage that starts once the one before it ends (x86-64 only).
  void prefetch(int64_t it, int64_t bytes) const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace lazarus
