//! Bindings for attention: forward and exact backward on a plan (inputs checked here, every message naming its
//! argument), and the kernel policy's settings.

use crate::device_plan::{device_name, DevicePlan};
use crate::policy::{self, NoBackend, SelfCalls};
use crate::py_plan::{resolve, torch_err};
use crate::seam::Kernels;
use crate::{executor, math};
use pyo3::exceptions::{PyNotImplementedError, PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3_tch::PyTensor;
use tch::{Kind, Tensor};

fn backend(q: &Tensor, name: Option<&str>, window: Option<usize>) -> PyResult<&'static dyn Kernels> {
    policy::backend(q, name, window).map_err(|e| match e {
        NoBackend::Type(m) => PyTypeError::new_err(m),
        NoBackend::Value(m) => PyValueError::new_err(m),
        NoBackend::Device(m) => PyNotImplementedError::new_err(m),
    })
}

/// Check packed q/k/v against the plan; every message names the argument.
fn check_qkv(q: &Tensor, k: &Tensor, v: &Tensor, plan: &DevicePlan) -> PyResult<()> {
    for (name, t) in [("q", q), ("k", k), ("v", v)] {
        if t.dim() != 3 {
            return Err(PyValueError::new_err(format!("{name}: expected a packed [T, H, D] tensor, got shape {:?}", t.size())));
        }
        if t.size()[0] as usize != plan.host.num_tokens() {
            return Err(PyValueError::new_err(format!(
                "{name}: has {} tokens but the plan packs {}",
                t.size()[0],
                plan.host.num_tokens()
            )));
        }
        if !matches!(t.kind(), Kind::Half | Kind::BFloat16 | Kind::Float | Kind::Double) {
            return Err(PyTypeError::new_err(format!("{name}: expected a floating-point tensor, got {:?}", t.kind())));
        }
        if t.kind() != q.kind() {
            return Err(PyTypeError::new_err(format!("{name}: dtype {:?} differs from q's {:?}", t.kind(), q.kind())));
        }
        if t.device() != plan.device {
            return Err(PyValueError::new_err(format!(
                "{name}: is on {} but the plan was made on {}",
                device_name(t.device()),
                device_name(plan.device)
            )));
        }
    }
    let (qs, ks, vs) = (q.size(), k.size(), v.size());
    if ks != vs {
        return Err(PyValueError::new_err(format!("v: shape {vs:?} differs from k's {ks:?}")));
    }
    if qs[2] != ks[2] {
        return Err(PyValueError::new_err(format!("k: head dim {} differs from q's {}", ks[2], qs[2])));
    }
    if qs[1] == 0 || qs[2] == 0 {
        return Err(PyValueError::new_err(format!("q: expected at least one head and a head dim >= 1, got shape {qs:?}")));
    }
    if ks[1] == 0 || qs[1] % ks[1] != 0 {
        return Err(PyValueError::new_err(format!(
            "k: {} key/value heads do not divide q's {} heads (GQA needs Hq % Hkv == 0)",
            ks[1], qs[1]
        )));
    }
    Ok(())
}

/// The window a call applies: None for one that cuts no row (at least the plan's longest). Any other must be one
/// the plan was made with (its key tables live on the device already: building them here would copy host→device
/// inside a layer).
fn check_window(p: &DevicePlan, window: Option<usize>) -> PyResult<Option<usize>> {
    match window.filter(|&w| p.host.cuts(w)) {
        Some(w) if p.window_tables(w).is_none() => Err(PyValueError::new_err(format!(
            "window: the plan holds no key tables for a sliding window of {w} (it has {:?}); make the plan with \
             windows=[{w}, ...] (windows of at least the longest row, {}, need none)",
            p.windows(),
            p.host.max_seqlen()
        ))),
        cut => Ok(cut),
    }
}

/// Forward of shared-prefix attention. Returns `(out [T, Hq, D], lse [T, Hq])`.
#[pyfunction]
#[pyo3(signature = (q, k, v, plan, scale, kernels=None, window=None))]
fn attention_forward(
    q: PyTensor,
    k: PyTensor,
    v: PyTensor,
    plan: PyTensor,
    scale: f64,
    kernels: Option<&str>,
    window: Option<usize>,
) -> PyResult<(PyTensor, PyTensor)> {
    let p = &*resolve(&plan)?;
    check_qkv(&q, &k, &v, p)?;
    let window = check_window(p, window)?;
    let kern = backend(&q, kernels, window)?;
    let split = policy::split_self_calls(kern, p);
    // The GIL stays held: libtorch ops here are short, and tch tensors are not Sync.
    let (o, l) = executor::forward(kern, p, &q, &k, &v, scale, window, split).map_err(torch_err)?;
    Ok((PyTensor(o), PyTensor(l)))
}

/// Exact backward of shared-prefix attention. Returns `(dq, dk, dv)`.
#[pyfunction]
#[pyo3(signature = (dout, q, k, v, out, lse, plan, scale, kernels=None, window=None))]
#[allow(clippy::too_many_arguments)]
fn attention_backward(
    dout: PyTensor,
    q: PyTensor,
    k: PyTensor,
    v: PyTensor,
    out: PyTensor,
    lse: PyTensor,
    plan: PyTensor,
    scale: f64,
    kernels: Option<&str>,
    window: Option<usize>,
) -> PyResult<(PyTensor, PyTensor, PyTensor)> {
    let p = &*resolve(&plan)?;
    check_qkv(&q, &k, &v, p)?;
    let window = check_window(p, window)?;
    if dout.size() != q.size() || out.size() != q.size() {
        return Err(PyValueError::new_err("dout/out: shape must equal q's"));
    }
    let (t, hq) = (q.size()[0], q.size()[1]);
    if lse.size() != [t, hq] || !matches!(lse.kind(), Kind::Float | Kind::Double) || lse.device() != q.device() {
        return Err(PyValueError::new_err(format!(
            "lse: expected a float [{t}, {hq}] tensor on q's device (as attention_forward returns it), got {:?} {:?}",
            lse.size(),
            lse.kind()
        )));
    }
    let kern = backend(&q, kernels, window)?;
    let split = policy::split_self_calls(kern, p);
    let (dq, dk, dv) =
        executor::backward(kern, p, &dout, &q, &k, &v, &out, &lse, scale, window, split).map_err(torch_err)?;
    Ok((PyTensor(dq), PyTensor(dk), PyTensor(dv)))
}

/// `(call, "cudnn" | "flash")` for each full-attention call of `plan` under the CUDA fp16/bf16 default, in order.
#[pyfunction]
fn auto_kernels(plan: PyTensor) -> PyResult<Vec<(String, &'static str)>> {
    Ok(policy::auto_kernels(&*resolve(&plan)?))
}

/// Sets the explicit-math kernel's score budget per block of query rows (bytes, at least 1); returns the previous
/// value. The default (256 MiB) suits real runs; tests set a tiny one to exercise many blocks.
#[pyfunction]
fn set_math_block_bytes(n: usize) -> PyResult<usize> {
    if n == 0 {
        return Err(PyValueError::new_err("n: the math kernel's block budget must be at least 1 byte"));
    }
    Ok(math::set_block_bytes(n))
}

/// Sets how the prefixes' and the completions' causal calls run: "auto", "split" or "fused" (`policy::SelfCalls`);
/// returns the previous mode.
#[pyfunction]
fn set_self_calls(mode: &str) -> PyResult<&'static str> {
    let mode = match mode {
        "auto" => SelfCalls::Auto,
        "split" => SelfCalls::Split,
        "fused" => SelfCalls::Fused,
        other => {
            return Err(PyValueError::new_err(format!("mode: expected \"auto\", \"split\" or \"fused\", got {other:?}")))
        }
    };
    Ok(match policy::set_self_calls(mode) {
        SelfCalls::Auto => "auto",
        SelfCalls::Split => "split",
        SelfCalls::Fused => "fused",
    })
}

/// See `policy::set_cudnn_after`.
#[pyfunction]
fn set_cudnn_after(plans: u32) -> u32 {
    policy::set_cudnn_after(plans)
}

/// See `policy::set_cudnn_bucket`.
#[pyfunction]
fn set_cudnn_bucket(tokens: usize) -> usize {
    policy::set_cudnn_bucket(tokens)
}

/// Tests: see `policy::set_pad_min_keys`.
#[pyfunction]
fn _set_pad_min_keys(keys: usize) -> usize {
    policy::set_pad_min_keys(keys)
}

/// Tests: forgets the shapes earlier plans had (the counts behind `set_cudnn_after` are process-wide).
#[pyfunction]
fn _forget_shapes() {
    policy::forget_shapes();
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(attention_forward, m)?)?;
    m.add_function(wrap_pyfunction!(attention_backward, m)?)?;
    m.add_function(wrap_pyfunction!(auto_kernels, m)?)?;
    m.add_function(wrap_pyfunction!(set_math_block_bytes, m)?)?;
    m.add_function(wrap_pyfunction!(set_self_calls, m)?)?;
    m.add_function(wrap_pyfunction!(set_cudnn_after, m)?)?;
    m.add_function(wrap_pyfunction!(set_cudnn_bucket, m)?)?;
    m.add_function(wrap_pyfunction!(_set_pad_min_keys, m)?)?;
    m.add_function(wrap_pyfunction!(_forget_shapes, m)?)?;
    Ok(())
}
