// Torch glue of the test-only kernels (tests/emu_kernels/*.cu): the ops of
// torch.ops.fastllm_emu_test, built into fastllm_emu_ext by fastllm/_emu.py. CPU tensors
// in, CPU tensors out; the kernels run in the SIMT emulation.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "emu_test_kernels.h"

namespace fastllm {
namespace emu_test {
namespace {

void check_launch(cudaError_t err, const char* op) {
  TORCH_CHECK(err == cudaSuccess, "fastllm_emu_test::", op, ": launch failed: ",
              cudaGetErrorString(err));
}

void check_tensor(const at::Tensor& t, const char* op, const char* name, at::ScalarType dtype,
                  int64_t numel) {
  TORCH_CHECK(t.device().is_cpu() && t.is_contiguous(), op, ": ", name,
              " must be a contiguous CPU tensor");
  TORCH_CHECK_TYPE(t.scalar_type() == dtype, op, ": ", name, " must be ", dtype, ", got ",
                   t.scalar_type());
  TORCH_CHECK(numel < 0 || t.numel() == numel, op, ": ", name, " must have ", numel,
              " elements, got ", t.numel());
}

at::Tensor shift_add(const at::Tensor& x, bool with_barrier) {
  check_tensor(x, "shift_add", "x", at::kFloat, -1);
  at::Tensor out = at::empty_like(x);
  check_launch(launch_shift_add(x.data_ptr<float>(), out.data_ptr<float>(),
                                static_cast<int>(x.numel()), with_barrier),
               "shift_add");
  return out;
}

at::Tensor two_block_sums(const at::Tensor& x, bool with_trailing_barrier) {
  check_tensor(x, "two_block_sums", "x", at::kFloat, 128);
  at::Tensor out = at::empty({128, 2}, at::kFloat);
  check_launch(launch_two_block_sums(x.data_ptr<float>(), out.data_ptr<float>(),
                                     with_trailing_barrier),
               "two_block_sums");
  return out;
}

at::Tensor warp_broadcast_sum(const at::Tensor& x, int64_t src_lane) {
  check_tensor(x, "warp_broadcast_sum", "x", at::kFloat, -1);
  TORCH_CHECK(x.dim() == 2 && x.size(1) == 32, "warp_broadcast_sum: x must be (rows, 32), got ",
              x.sizes());
  at::Tensor out = at::empty_like(x);
  check_launch(launch_warp_broadcast_sum(x.data_ptr<float>(), out.data_ptr<float>(),
                                         static_cast<int>(x.size(0)), static_cast<int>(src_lane)),
               "warp_broadcast_sum");
  return out;
}

at::Tensor dynamic_smem_access(const at::Tensor& x, int64_t smem_floats, int64_t offset,
                               bool write) {
  check_tensor(x, "dynamic_smem_access", "x", at::kFloat, -1);
  at::Tensor out = at::zeros_like(x);
  check_launch(launch_dynamic_smem_access(x.data_ptr<float>(), out.data_ptr<float>(),
                                          static_cast<int>(x.numel()),
                                          static_cast<int>(smem_floats),
                                          static_cast<int>(offset), write),
               "dynamic_smem_access");
  return out;
}

void faulty(int64_t kind) {
  at::Tensor scratch = at::zeros({16}, at::kInt);
  check_launch(launch_faulty(static_cast<FaultKind>(kind), scratch.data_ptr<int>()), "faulty");
}

at::Tensor warp_shuffle(const at::Tensor& values, const at::Tensor& lane_args, int64_t mode,
                        int64_t width, int64_t mask) {
  check_tensor(values, "warp_shuffle", "values", at::kInt, -1);
  check_tensor(lane_args, "warp_shuffle", "lane_args", at::kInt, values.numel());
  at::Tensor out = at::empty_like(values);
  check_launch(launch_warp_shuffle(values.data_ptr<int>(), lane_args.data_ptr<int>(),
                                   out.data_ptr<int>(), static_cast<int>(values.numel()),
                                   static_cast<int>(mode), static_cast<int>(width),
                                   static_cast<unsigned>(mask)),
               "warp_shuffle");
  return out;
}

at::Tensor warp_vote(const at::Tensor& predicates, int64_t mask) {
  check_tensor(predicates, "warp_vote", "predicates", at::kInt, -1);
  at::Tensor out = at::empty({predicates.numel(), 5}, at::kInt);
  check_launch(launch_warp_vote(predicates.data_ptr<int>(),
                                reinterpret_cast<unsigned*>(out.data_ptr<int>()),
                                static_cast<int>(predicates.numel()),
                                static_cast<unsigned>(mask)),
               "warp_vote");
  return out;
}

at::Tensor mma_m16n8k16(const at::Tensor& a, const at::Tensor& b, const at::Tensor& c,
                        bool via_ldmatrix) {
  const at::ScalarType t = a.scalar_type();
  TORCH_CHECK_TYPE(t == at::kHalf || t == at::kBFloat16,
                   "mma_m16n8k16: a must be float16 or bfloat16, got ", t);
  check_tensor(a, "mma_m16n8k16", "a", t, 16 * 16);
  check_tensor(b, "mma_m16n8k16", "b", t, 16 * 8);
  check_tensor(c, "mma_m16n8k16", "c", at::kFloat, 16 * 8);
  at::Tensor d = at::empty({16, 8}, at::kFloat);
  check_launch(launch_mma_m16n8k16(a.data_ptr(), b.data_ptr(), c.data_ptr<float>(),
                                   d.data_ptr<float>(), t == at::kBFloat16, via_ldmatrix),
               "mma_m16n8k16");
  return d;
}

at::Tensor ldmatrix(const at::Tensor& tile, const at::Tensor& row_of_lane, int64_t num,
                    bool trans) {
  check_tensor(tile, "ldmatrix", "tile", at::kShort, -1);
  check_tensor(row_of_lane, "ldmatrix", "row_of_lane", at::kInt, 32);
  TORCH_CHECK(tile.dim() == 2 && tile.size(1) == 8, "ldmatrix: tile must be (rows, 8), got ",
              tile.sizes());
  at::Tensor out = at::empty({32, num}, at::kInt);
  check_launch(launch_ldmatrix(reinterpret_cast<const uint16_t*>(tile.data_ptr<int16_t>()),
                               static_cast<int>(tile.size(0)), row_of_lane.data_ptr<int>(),
                               reinterpret_cast<uint32_t*>(out.data_ptr<int>()),
                               static_cast<int>(num), trans),
               "ldmatrix");
  return out;
}

at::Tensor cp_async(const at::Tensor& x, int64_t n_valid, int64_t wait) {
  check_tensor(x, "cp_async", "x", at::kFloat, -1);
  at::Tensor out = at::empty_like(x);
  check_launch(launch_cp_async(x.data_ptr<float>(), out.data_ptr<float>(),
                               static_cast<int>(x.numel()), static_cast<int>(n_valid),
                               static_cast<int>(wait)),
               "cp_async");
  return out;
}

}  // namespace

TORCH_LIBRARY(fastllm_emu_test, m) {
  m.def("shift_add(Tensor x, bool with_barrier) -> Tensor", &shift_add);
  m.def("two_block_sums(Tensor x, bool with_trailing_barrier) -> Tensor", &two_block_sums);
  m.def("warp_broadcast_sum(Tensor x, int src_lane) -> Tensor", &warp_broadcast_sum);
  m.def("dynamic_smem_access(Tensor x, int smem_floats, int offset, bool write) -> Tensor",
        &dynamic_smem_access);
  m.def("faulty(int kind) -> ()", &faulty);
  m.def("warp_shuffle(Tensor values, Tensor lane_args, int mode, int width, int mask) -> Tensor",
        &warp_shuffle);
  m.def("warp_vote(Tensor predicates, int mask) -> Tensor", &warp_vote);
  m.def("mma_m16n8k16(Tensor a, Tensor b, Tensor c, bool via_ldmatrix) -> Tensor",
        &mma_m16n8k16);
  m.def("ldmatrix(Tensor tile, Tensor row_of_lane, int num, bool trans) -> Tensor", &ldmatrix);
  m.def("cp_async(Tensor x, int n_valid, int wait) -> Tensor", &cp_async);
}

}  // namespace emu_test
}  // namespace fastllm
