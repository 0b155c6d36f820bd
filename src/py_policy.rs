//! Bindings for the kernel policy: what it runs for a plan's calls, and its settings. (Attention itself is the
//! torch ops of `op`, registered by the shim.)

use crate::math;
use crate::policy::{self, SelfCalls};
use crate::py_plan::resolve;
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3_tch::PyTensor;

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
    m.add_function(wrap_pyfunction!(auto_kernels, m)?)?;
    m.add_function(wrap_pyfunction!(set_math_block_bytes, m)?)?;
    m.add_function(wrap_pyfunction!(set_self_calls, m)?)?;
    m.add_function(wrap_pyfunction!(set_cudnn_after, m)?)?;
    m.add_function(wrap_pyfunction!(set_cudnn_bucket, m)?)?;
    m.add_function(wrap_pyfunction!(_set_pad_min_keys, m)?)?;
    m.add_function(wrap_pyfunction!(_forget_shapes, m)?)?;
    Ok(())
}
