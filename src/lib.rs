//! `shared_prefix._core`: the planner and the attention executor, exposed to Python.
//! Tensors cross through pyo3-tch and share libtorch with the `torch` package (import torch first).
//!
//! Layers, each using only those below it:
//! - entry points: `py_plan` (plans) and `py_policy` (the policy's settings), Python bindings; `op`, the kernels
//!   of the torch ops `shared_prefix::attention_forward` / `attention_backward` (their checks and the sinks), which
//!   the C++ shim registers at import (`shim::register_ops`) and calls back through `shim`;
//! - `policy`: which backend runs each call, and the process-wide settings behind the choice;
//! - `executor`: the calls of a layer, their merge and the exact backward;
//! - backends: `flash` (FA2 varlen), `cudnn`, `cpu_flash`, `math`; the dense ones through `dense::Runs`;
//!   the C++ shim's ABI in `shim`;
//! - `device_plan` (a plan's tables on its device), `handle` (the tensor a plan crosses torch's op boundary as)
//!   and `seam` (what every backend implements).

mod cpu_flash;
mod cudnn;
mod dense;
mod device_plan;
mod executor;
mod flash;
mod handle;
mod math;
mod op;
mod policy;
mod py_policy;
mod py_plan;
mod seam;
mod shim;

use pyo3::prelude::*;

#[pymodule]
fn _core(m: &Bound<'_, PyModule>) -> PyResult<()> {
    // The torch this extension was built against (major.minor.patch), as build.rs found it.
    m.add("TORCH_VERSION", env!("SP_TORCH_VERSION"))?;
    shim::register_ops().map_err(py_plan::torch_err)?;
    py_plan::register(m)?;
    py_policy::register(m)
}
