// The torch ops shared_prefix::attention_forward and shared_prefix::attention_backward: their schema, their CPU and
// CUDA kernels (which call the Rust executor through `sp_op_kernel` pointers, see src/shim.rs) and their autograd,
// all in C++ so that a call costs the dispatcher no Python. Their fake implementations are Python's
// (python/shared_prefix/_ops.py), as torch.compile expects of C++ ops.
#include <ATen/ATen.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include "guarded.h"

#include <optional>
#include <string>
#include <string_view>
#include <tuple>

// One call's arguments for the Rust kernels (src/shim.rs `OpArgs`): null where absent.
struct sp_op_args {
  const at::Tensor* dout;
  const at::Tensor* q;
  const at::Tensor* k;
  const at::Tensor* v;
  const at::Tensor* out;
  const at::Tensor* lse;
  const at::Tensor* plan;
  const at::Tensor* sinks;
  double scale;
  const char* kernels;
  size_t kernels_len;
  bool has_window;
  int64_t window;
};

// Writes owned at::Tensor pointers into `results`, or returns an error message and its kind (1 TypeError,
// 2 ValueError, 3 NotImplementedError, else RuntimeError: src/shim.rs's TYPE_ERROR etc.).
typedef const char* (*sp_op_kernel)(const sp_op_args* args, at::Tensor** results, int32_t* kind);

namespace {
sp_op_kernel rust_forward = nullptr;
sp_op_kernel rust_backward = nullptr;

constexpr const char* kForwardSchema =
    "attention_forward(Tensor q, Tensor k, Tensor v, Tensor plan, float scale, str? kernels, int? window, "
    "Tensor? sinks) -> (Tensor, Tensor)";
constexpr const char* kBackwardSchema =
    "attention_backward(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, Tensor plan, "
    "float scale, str? kernels, int? window, Tensor? sinks) -> (Tensor, Tensor, Tensor, Tensor)";

using Kernels = std::optional<std::string_view>;

sp_op_args make_args(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& plan,
                     double scale, Kernels kernels, std::optional<int64_t> window,
                     const std::optional<at::Tensor>& sinks) {
  sp_op_args a{};
  a.q = &q;
  a.k = &k;
  a.v = &v;
  a.plan = &plan;
  a.sinks = sinks.has_value() ? &*sinks : nullptr;
  a.scale = scale;
  a.kernels = kernels.has_value() ? kernels->data() : nullptr;
  a.kernels_len = kernels.has_value() ? kernels->size() : 0;
  a.has_window = window.has_value();
  a.window = window.value_or(0);
  return a;
}

// Runs a Rust kernel with autocast off (the kernels run in the operands' dtypes; autocast's state would otherwise
// reach the ATen ops the executor dispatches) and raises its error as the Python exception it names.
template <size_t N>
std::array<at::Tensor, N> run(sp_op_kernel kernel, const sp_op_args& args) {
  c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  at::Tensor* results[N] = {};
  int32_t kind = 0;
  const char* err = kernel(&args, results, &kind);
  if (err != nullptr) {
    std::string msg(err);
    switch (kind) {
      case 1:
        C10_THROW_ERROR(TypeError, msg);
      case 2:
        C10_THROW_ERROR(ValueError, msg);
      case 3:
        C10_THROW_ERROR(NotImplementedError, msg);
      default:
        C10_THROW_ERROR(Error, msg);
    }
  }
  std::array<at::Tensor, N> out;
  for (size_t i = 0; i < N; ++i) {
    out[i] = std::move(*results[i]);
    delete results[i];
  }
  return out;
}

std::tuple<at::Tensor, at::Tensor> forward_kernel(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                  const at::Tensor& plan, double scale, Kernels kernels,
                                                  std::optional<int64_t> window,
                                                  const std::optional<at::Tensor>& sinks) {
  auto r = run<2>(rust_forward, make_args(q, k, v, plan, scale, kernels, window, sinks));
  return {std::move(r[0]), std::move(r[1])};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward_kernel(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse, const at::Tensor& plan, double scale, Kernels kernels, std::optional<int64_t> window,
    const std::optional<at::Tensor>& sinks) {
  auto a = make_args(q, k, v, plan, scale, kernels, window, sinks);
  a.dout = &dout;
  a.out = &out;
  a.lse = &lse;
  auto r = run<4>(rust_backward, a);
  return {std::move(r[0]), std::move(r[1]), std::move(r[2]), std::move(r[3])};
}

const c10::TypedOperatorHandle<decltype(forward_kernel)>& forward_op() {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("shared_prefix::attention_forward", "")
                       .typed<decltype(forward_kernel)>();
  return op;
}

const c10::TypedOperatorHandle<decltype(backward_kernel)>& backward_op() {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("shared_prefix::attention_backward", "")
                       .typed<decltype(backward_kernel)>();
  return op;
}

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

std::optional<at::Tensor> optional_tensor(const at::Tensor& t) {
  return t.defined() ? std::optional<at::Tensor>(t) : std::nullopt;
}

// The backward op under autograd: first-order gradients with create_graph=True work; differentiating them again
// is refused (the kernels' backward is not differentiable), never silently first-order.
struct AttentionBackward : public torch::autograd::Function<AttentionBackward> {
  static variable_list forward(AutogradContext*, const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k,
                               const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse,
                               const at::Tensor& plan, double scale, Kernels kernels, std::optional<int64_t> window,
                               const std::optional<at::Tensor>& sinks) {
    at::AutoDispatchBelowADInplaceOrView below;
    auto [dq, dk, dv, dsinks] = backward_op().call(dout, q, k, v, out, lse, plan, scale, kernels, window, sinks);
    return {dq, dk, dv, dsinks};
  }

  static variable_list backward(AutogradContext*, variable_list) {
    TORCH_CHECK(false, "shared_prefix.attention has no double backward: its kernels' backward is not differentiable");
    return {};
  }
};

// The forward op under autograd. The log-sum-exp of flash kernels is not differentiable, so autograd through the
// merge would be silently wrong; the backward op calls each kernel's backward with the merged out/lse (exact).
struct Attention : public torch::autograd::Function<Attention> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                               const at::Tensor& plan, double scale, Kernels kernels, std::optional<int64_t> window,
                               const std::optional<at::Tensor>& sinks) {
    at::Tensor out, lse;
    {
      at::AutoDispatchBelowADInplaceOrView below;
      std::tie(out, lse) = forward_op().call(q, k, v, plan, scale, kernels, window, sinks);
    }
    ctx->save_for_backward({q, k, v, out, lse, plan, sinks.value_or(at::Tensor())});
    ctx->saved_data["scale"] = scale;
    ctx->saved_data["kernels"] = kernels.has_value() ? c10::IValue(std::string(*kernels)) : c10::IValue();
    ctx->saved_data["window"] = window.has_value() ? c10::IValue(*window) : c10::IValue();
    ctx->mark_non_differentiable({lse});
    return {out, lse};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    auto s = ctx->get_saved_variables();
    const auto& kernels_value = ctx->saved_data["kernels"];
    std::optional<std::string> kernels;
    if (!kernels_value.isNone()) kernels = kernels_value.toStringRef();
    const auto& window_value = ctx->saved_data["window"];
    std::optional<int64_t> window;
    if (!window_value.isNone()) window = window_value.toInt();
    auto sinks = optional_tensor(s[6]);
    auto g = AttentionBackward::apply(grads[0], s[0], s[1], s[2], s[3], s[4], s[5],
                                      ctx->saved_data["scale"].toDouble(),
                                      kernels.has_value() ? Kernels(*kernels) : Kernels(), window, sinks);
    // needs_input_grad counts tensor inputs only: q, k, v, plan, sinks.
    at::Tensor dsinks = sinks.has_value() && ctx->needs_input_grad(4) ? g[3] : at::Tensor();
    return {g[0], g[1], g[2], at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), dsinks};
  }
};

std::tuple<at::Tensor, at::Tensor> forward_autograd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                    const at::Tensor& plan, double scale, Kernels kernels,
                                                    std::optional<int64_t> window,
                                                    const std::optional<at::Tensor>& sinks) {
  auto r = Attention::apply(q, k, v, plan, scale, kernels, window, sinks);
  return {r[0], r[1]};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward_autograd(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse, const at::Tensor& plan, double scale, Kernels kernels, std::optional<int64_t> window,
    const std::optional<at::Tensor>& sinks) {
  auto r = AttentionBackward::apply(dout, q, k, v, out, lse, plan, scale, kernels, window, sinks);
  return {r[0], r[1], r[2], r[3]};
}
}  // namespace

extern "C" {

// Defines the ops and registers their kernels (once per process; the libraries live as long as it does).
const char* sp_register_ops(sp_op_kernel forward, sp_op_kernel backward) {
  return sp::guarded([&] {
    if (rust_forward != nullptr) return;
    rust_forward = forward;
    rust_backward = backward;
    auto* def = new torch::Library(torch::Library::DEF, "shared_prefix", std::nullopt, __FILE__, __LINE__);
    def->set_python_module("shared_prefix._ops");
    def->def(kForwardSchema);
    def->def(kBackwardSchema);
    for (auto key : {c10::DispatchKey::CPU, c10::DispatchKey::CUDA}) {
      auto* impl = new torch::Library(torch::Library::IMPL, "shared_prefix", key, __FILE__, __LINE__);
      impl->impl("attention_forward", TORCH_FN(forward_kernel));
      impl->impl("attention_backward", TORCH_FN(backward_kernel));
    }
    auto* grad = new torch::Library(torch::Library::IMPL, "shared_prefix", c10::DispatchKey::Autograd, __FILE__,
                                    __LINE__);
    grad->impl("attention_forward", TORCH_FN(forward_autograd));
    grad->impl("attention_backward", TORCH_FN(backward_autograd));
  });
}
}
