// ATen entry points that tch does not bind (flash-attention 2 varlen and cuDNN attention, forward and backward,
// tensors over memory with a deleter, a tensor's storage offset), exposed as extern "C" on at::Tensor pointers
// (tch's C_tensor). Errors come back as a message, never as a C++ exception crossing into Rust.
#include <ATen/ATen.h>
#include <ATen/ops/_flash_attention_backward.h>
#include <ATen/ops/_flash_attention_forward.h>
#include <ATen/ops/_scaled_dot_product_cudnn_attention.h>
#include <ATen/ops/_scaled_dot_product_cudnn_attention_backward.h>

#include <optional>
#include <string>
#include <utility>

#include "guarded.h"

namespace {

// FA2's (window_size_left, window_size_right) for a left window (-1: none). With a window, the right edge is the
// query itself: with causal, FA2 keeps keys [i - window_left, i], bottom-right aligned.
std::pair<std::optional<int64_t>, std::optional<int64_t>> window_args(int64_t window_left) {
  if (window_left < 0) return {std::nullopt, std::nullopt};
  return {window_left, 0};
}
}  // namespace

extern "C" {

// Varlen flash attention forward. q [Tq, Hq, D], k/v [Tk, Hkv, D], cu_* int32 [n+1]. Returns out [Tq, Hq, D] and
// lse [Hq, Tq] (fp32).
const char* sp_flash_varlen_fwd(const at::Tensor* q, const at::Tensor* k, const at::Tensor* v,
                                const at::Tensor* cu_q, const at::Tensor* cu_k, int64_t max_q, int64_t max_k,
                                bool causal, double scale, int64_t window_left, at::Tensor** out,
                                at::Tensor** lse) {
  return sp::guarded([&] {
    auto [left, right] = window_args(window_left);
    auto res = at::_flash_attention_forward(*q, *k, *v, *cu_q, *cu_k, max_q, max_k, /*dropout_p=*/0.0, causal,
                                            /*return_debug_mask=*/false, scale, left, right);
    *out = new at::Tensor(std::get<0>(res));
    *lse = new at::Tensor(std::get<1>(res));
  });
}

// Varlen flash attention backward with the caller's (merged) out and lse [Hq, Tq].
const char* sp_flash_varlen_bwd(const at::Tensor* dout, const at::Tensor* q, const at::Tensor* k,
                                const at::Tensor* v, const at::Tensor* out, const at::Tensor* lse,
                                const at::Tensor* cu_q, const at::Tensor* cu_k, int64_t max_q, int64_t max_k,
                                bool causal, double scale, int64_t window_left, at::Tensor** dq, at::Tensor** dk,
                                at::Tensor** dv) {
  return sp::guarded([&] {
    // No dropout: the philox state is never read, but the op takes one (empty: no fill kernel to launch).
    auto rng = at::empty({2}, q->options().dtype(at::kUInt64));
    auto unused = at::empty({0}, q->options());
    auto [left, right] = window_args(window_left);
    auto res = at::_flash_attention_backward(*dout, *q, *k, *v, *out, *lse, *cu_q, *cu_k, max_q, max_k,
                                             /*dropout_p=*/0.0, causal, rng, unused, scale, left, right);
    *dq = new at::Tensor(std::get<0>(res));
    *dk = new at::Tensor(std::get<1>(res));
    *dv = new at::Tensor(std::get<2>(res));
  });
}

// Dense cuDNN attention on [B, H, L, D] (any strides; Hkv may be < Hq). Returns out and the softmax statistics
// (log-sum-exp) as cuDNN gives them.
const char* sp_cudnn_fwd(const at::Tensor* q, const at::Tensor* k, const at::Tensor* v, bool causal, double scale,
                         at::Tensor** out, at::Tensor** lse) {
  return sp::guarded([&] {
    auto res = at::_scaled_dot_product_cudnn_attention(*q, *k, *v, /*attn_bias=*/std::nullopt,
                                                       /*compute_log_sumexp=*/true, /*dropout_p=*/0.0, causal,
                                                       /*return_debug_mask=*/false, scale);
    *out = new at::Tensor(std::get<0>(res));
    *lse = new at::Tensor(std::get<1>(res));
  });
}

// Dense cuDNN attention backward with the caller's (merged) out and lse, shaped as the forward returned them.
const char* sp_cudnn_bwd(const at::Tensor* dout, const at::Tensor* q, const at::Tensor* k, const at::Tensor* v,
                         const at::Tensor* out, const at::Tensor* lse, bool causal, double scale, at::Tensor** dq,
                         at::Tensor** dk, at::Tensor** dv) {
  return sp::guarded([&] {
    // No dropout: the philox seed/offset are not read (empty: no fill kernels to launch).
    auto seed = at::empty({1}, q->options().dtype(at::kLong));
    auto offset = at::empty({1}, q->options().dtype(at::kLong));
    at::Tensor none;
    auto res = at::_scaled_dot_product_cudnn_attention_backward(*dout, *q, *k, *v, *out, *lse, seed, offset, none,
                                                                none, none, q->size(2), k->size(2),
                                                                /*dropout_p=*/0.0, causal, scale);
    *dq = new at::Tensor(std::get<0>(res));
    *dk = new at::Tensor(std::get<1>(res));
    *dv = new at::Tensor(std::get<2>(res));
  });
}

// A tensor's offset into its storage, in elements (tch binds no accessor; reading it dispatches nothing).
int64_t sp_storage_offset(const at::Tensor* t) { return t->storage_offset(); }

// A one-element int64 CPU tensor holding `id`, whose storage calls `release(id)` when it is freed: a plan's handle.
// torch traces it as a tensor, and the plan it names lives as long as any tensor (autograd's saved ones included)
// holds that storage.
const char* sp_handle_tensor(int64_t id, void (*release)(int64_t), at::Tensor** out) {
  return sp::guarded([&] {
    auto* cell = new int64_t(id);
    auto deleter = [release](void* p) {
      auto* c = static_cast<int64_t*>(p);
      int64_t value = *c;
      delete c;
      release(value);
    };
    *out = new at::Tensor(at::from_blob(cell, {1}, deleter, at::TensorOptions().dtype(at::kLong)));
  });
}
}
