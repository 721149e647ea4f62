// Dispatch of the CUDA FlashAttention-2 kernels (attention_cuda.h) to the per-(head dim,
// dtype) instantiations of the generated attention_*_hdim*_*.cu files, the layout checks,
// and backward's first, small kernel (D_i = <dout_i, out_i>).
//
// Variants: the smallest compiled head dim >= D (32, 64, 96, 128, 256), so that e.g.
// D = 80 runs the 96 kernel with zero-filled columns; fp16 and bf16 (the only types
// mma.sync m16n8k16 multiplies with fp32 accumulation).
#include <cstdint>

#include "attention/attention_cuda.h"
#include "attention/cuda/attention_common.cuh"
#include "attention/cuda/attention_kernels.h"

namespace fastllm {
namespace attention {
namespace cuda {
namespace {

// ---- 1. D_i = <dout_i, out_i> ---------------------------------------------------------

constexpr int kDotRowsPerBlock = 64;
constexpr int kDotThreads = 128;

// One warp per row at a time: lane l reads the 16-byte chunk l of dout and out (D <= 256).
template <class T>
__global__ void __launch_bounds__(kDotThreads)
    attention_bwd_dot_kernel(const BwdParams p, float* __restrict__ softmax_d) {
  const int h = blockIdx.y, b = blockIdx.z;
  const SeqInfo seq = sequence_info(p, b);
  const int i0 = blockIdx.x * kDotRowsPerBlock;
  if (i0 >= seq.seqlen_q) return;
  const bool packed = p.cu_seqlens_q != nullptr;
  const T* out = static_cast<const T*>(p.out) + head_offset(p.stride_out, packed, seq.q_row0, b, h);
  const T* dout =
      static_cast<const T*>(p.dout) + head_offset(p.stride_dout, packed, seq.q_row0, b, h);
  float* d = softmax_d + lse_offset(p, seq, b, h);
  const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
  const int col = lane * kChunkElems;
  const int row_end = min(i0 + kDotRowsPerBlock, seq.seqlen_q);
  for (int i = i0 + warp; i < row_end; i += kDotThreads / kWarpSize) {
    float acc = 0.f;
    if (col < p.head_dim) {
      const uint4 o4 = *reinterpret_cast<const uint4*>(out + i * p.stride_out.t + col);
      const uint4 g4 = *reinterpret_cast<const uint4*>(dout + i * p.stride_dout.t + col);
      const T* o = reinterpret_cast<const T*>(&o4);
      const T* g = reinterpret_cast<const T*>(&g4);
      FASTLLM_UNROLL
      for (int e = 0; e < kChunkElems; ++e) acc += to_float(o[e]) * to_float(g[e]);
    }
    acc = warp_allreduce_sum(acc);
    if (lane == 0) d[i] = acc;
  }
}


template <class T>
cudaError_t launch_attention_bwd_dot(const BwdParams& p, float* softmax_d,
                                     cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>((p.seqlen_q + kDotRowsPerBlock - 1) / kDotRowsPerBlock),
                  static_cast<unsigned>(p.num_heads), static_cast<unsigned>(p.batch));
  FASTLLM_LAUNCH_KERNEL(attention_bwd_dot_kernel<T>, grid, dim3(kDotThreads), 0, stream, p,
                        softmax_d);
  return cudaGetLastError();
}


constexpr int64_t kMaxHeadDim = 256;

bool aligned16(const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0; }

// The layout every tile copy relies on (see attention_cuda.h); `packed` ignores stride.b.
bool vector_friendly(const void* ptr, const Strides4& st, bool packed) {
  return aligned16(ptr) && st.d == 1 && st.t % kChunkElems == 0 && st.h % kChunkElems == 0 &&
         (packed || st.b % kChunkElems == 0);
}

const char* problem_unsupported(const Problem& p) {
  if (p.dtype != DType::kFloat16 && p.dtype != DType::kBFloat16) {
    return "q, k, v must be float16 or bfloat16 for the CUDA kernels";
  }
  if (p.head_dim < 1 || p.head_dim % 8 != 0 || p.head_dim > kMaxHeadDim) {
    return "head dim must be a multiple of 8 up to 256 for the CUDA kernels";
  }
  if (p.num_kv_heads < 1 || p.num_heads % p.num_kv_heads != 0) {
    return "the number of q heads must be a multiple of the number of k / v heads";
  }
  if (p.batch > 65535 || p.num_heads > 65535) {
    return "batch and heads must be at most 65535 each (CUDA grid dims)";
  }
  return nullptr;
}

template <class Launch>
cudaError_t dispatch_dtype(DType dtype, Launch&& launch) {
  if (dtype == DType::kFloat16) return launch(__half{});
  return launch(__nv_bfloat16{});
}

uint32_t threshold_of(const Problem& p) {
  return p.dropout_p > 0 ? dropout_threshold(p.dropout_p) : 0u;
}

}  // namespace
}  // namespace cuda

const char* attention_cuda_fwd_unsupported(const FwdParams& p) {
  using cuda::vector_friendly;
  if (const char* why = cuda::problem_unsupported(p)) return why;
  const bool pq = p.cu_seqlens_q != nullptr, pk = p.cu_seqlens_k != nullptr;
  if (!vector_friendly(p.q, p.stride_q, pq) || !vector_friendly(p.k, p.stride_k, pk) ||
      !vector_friendly(p.v, p.stride_v, pk) || !vector_friendly(p.out, p.stride_out, pq)) {
    return "q, k, v and out need unit stride along the head dim, other strides that are "
           "multiples of 8 and 16-byte aligned data";
  }
  return nullptr;
}

const char* attention_cuda_bwd_unsupported(const BwdParams& p) {
  using cuda::vector_friendly;
  if (const char* why = cuda::problem_unsupported(p)) return why;
  const bool pq = p.cu_seqlens_q != nullptr, pk = p.cu_seqlens_k != nullptr;
  if (!vector_friendly(p.q, p.stride_q, pq) || !vector_friendly(p.k, p.stride_k, pk) ||
      !vector_friendly(p.v, p.stride_v, pk) || !vector_friendly(p.out, p.stride_out, pq) ||
      !vector_friendly(p.dout, p.stride_dout, pq) || !vector_friendly(p.dq, p.stride_dq, pq) ||
      !vector_friendly(p.dk, p.stride_dk, pk) || !vector_friendly(p.dv, p.stride_dv, pk)) {
    return "q, k, v, out, dout, dq, dk and dv need unit stride along the head dim, other "
           "strides that are multiples of 8 and 16-byte aligned data";
  }
  return nullptr;
}

cudaError_t launch_attention_fwd_cuda(const FwdParams& p, cudaStream_t stream) {
  if (attention_cuda_fwd_unsupported(p) != nullptr) return cudaErrorInvalidValue;
  if (p.batch == 0 || p.seqlen_q == 0 || p.num_heads == 0) return cudaSuccess;
  const uint32_t threshold = cuda::threshold_of(p);
  return cuda::dispatch_dtype(p.dtype, [&](auto type_tag) {
    using T = decltype(type_tag);
    if (p.head_dim <= 32) return cuda::launch_attention_fwd<32, T>(p, threshold, stream);
    if (p.head_dim <= 64) return cuda::launch_attention_fwd<64, T>(p, threshold, stream);
    if (p.head_dim <= 96) return cuda::launch_attention_fwd<96, T>(p, threshold, stream);
    if (p.head_dim <= 128) return cuda::launch_attention_fwd<128, T>(p, threshold, stream);
    return cuda::launch_attention_fwd<256, T>(p, threshold, stream);
  });
}

size_t attention_cuda_bwd_workspace_bytes(int64_t lse_numel) {
  return static_cast<size_t>(lse_numel) * sizeof(float);
}

cudaError_t launch_attention_bwd_cuda(const BwdParams& p, void* workspace, cudaStream_t stream) {
  if (attention_cuda_bwd_unsupported(p) != nullptr) return cudaErrorInvalidValue;
  if (p.batch == 0 || p.num_heads == 0) return cudaSuccess;
  const uint32_t threshold = cuda::threshold_of(p);
  float* softmax_d = static_cast<float*>(workspace);
  return cuda::dispatch_dtype(p.dtype, [&](auto type_tag) {
    using T = decltype(type_tag);
    if (p.seqlen_q > 0) {
      const cudaError_t err = cuda::launch_attention_bwd_dot<T>(p, softmax_d, stream);
      if (err != cudaSuccess) return err;
    }
    // dk / dv first: it also zeroes the keys no query sees (and all keys when Tq = 0).
    auto run = [&](auto head_dim_tag) {
      constexpr int kHeadDim = decltype(head_dim_tag)::value;
      cudaError_t err = cudaSuccess;
      if (p.seqlen_k > 0) {
        err = cuda::launch_attention_bwd_dkdv<kHeadDim, T>(p, softmax_d, threshold, stream);
      }
      if (err == cudaSuccess && p.seqlen_q > 0) {
        err = cuda::launch_attention_bwd_dq<kHeadDim, T>(p, softmax_d, threshold, stream);
      }
      return err;
    };
    if (p.head_dim <= 32) return run(std::integral_constant<int, 32>{});
    if (p.head_dim <= 64) return run(std::integral_constant<int, 64>{});
    if (p.head_dim <= 96) return run(std::integral_constant<int, 96>{});
    if (p.head_dim <= 128) return run(std::integral_constant<int, 128>{});
    return run(std::integral_constant<int, 256>{});
  });
}

}  // namespace attention
}  // namespace fastllm
