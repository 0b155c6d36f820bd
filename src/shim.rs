//! The C ABI of the C++ sources, both ways:
//! - into C++ (`csrc/shim.cpp`): the ATen attention entry points tch does not bind, on `at::Tensor` pointers, and
//!   the handle tensor. Errors come back as a message (a C++ exception never crosses into Rust);
//! - into Rust (`csrc/ops.cpp`): `register_ops` defines the torch ops and registers their kernels, which call
//!   `op_forward` and `op_backward` here. Errors go back as a message and the kind of Python exception to raise (a Rust panic never
//!   crosses into C++).

use crate::op::{self, OpError, Options};
use crate::seam::Result;
use pyo3_tch::torch_sys::C_tensor;
use std::cell::RefCell;
use std::ffi::{CStr, CString};
use std::mem::ManuallyDrop;
use std::os::raw::c_char;
use tch::{TchError, Tensor};

extern "C" {
    pub fn sp_flash_varlen_fwd(
        q: *const C_tensor,
        k: *const C_tensor,
        v: *const C_tensor,
        cu_q: *const C_tensor,
        cu_k: *const C_tensor,
        max_q: i64,
        max_k: i64,
        causal: bool,
        scale: f64,
        window_left: i64,
        out: *mut *mut C_tensor,
        lse: *mut *mut C_tensor,
    ) -> *const c_char;

    pub fn sp_flash_varlen_bwd(
        dout: *const C_tensor,
        q: *const C_tensor,
        k: *const C_tensor,
        v: *const C_tensor,
        out: *const C_tensor,
        lse: *const C_tensor,
        cu_q: *const C_tensor,
        cu_k: *const C_tensor,
        max_q: i64,
        max_k: i64,
        causal: bool,
        scale: f64,
        window_left: i64,
        dq: *mut *mut C_tensor,
        dk: *mut *mut C_tensor,
        dv: *mut *mut C_tensor,
    ) -> *const c_char;

    pub fn sp_cudnn_fwd(
        q: *const C_tensor,
        k: *const C_tensor,
        v: *const C_tensor,
        causal: bool,
        scale: f64,
        out: *mut *mut C_tensor,
        lse: *mut *mut C_tensor,
    ) -> *const c_char;

    #[allow(clippy::too_many_arguments)]
    pub fn sp_cudnn_bwd(
        dout: *const C_tensor,
        q: *const C_tensor,
        k: *const C_tensor,
        v: *const C_tensor,
        out: *const C_tensor,
        lse: *const C_tensor,
        causal: bool,
        scale: f64,
        dq: *mut *mut C_tensor,
        dk: *mut *mut C_tensor,
        dv: *mut *mut C_tensor,
    ) -> *const c_char;
}

extern "C" {
    fn sp_storage_offset(t: *const C_tensor) -> i64;
    pub fn sp_handle_tensor(id: i64, release: extern "C" fn(i64), out: *mut *mut C_tensor) -> *const c_char;
}

/// `x`'s offset into its storage, in elements.
pub fn storage_offset(x: &Tensor) -> i64 {
    // SAFETY: `x` is a live tensor; the shim only reads it.
    unsafe { sp_storage_offset(x.as_ptr()) }
}

/// One op call's arguments, as the shim's kernels pass them: tensors the caller owns (null where the schema's
/// optional tensor is None, and the forward's `dout`, `out`, `lse`), `kernels` as UTF-8 bytes (null: None).
#[repr(C)]
pub struct OpArgs {
    dout: *const C_tensor,
    q: *const C_tensor,
    k: *const C_tensor,
    v: *const C_tensor,
    out: *const C_tensor,
    lse: *const C_tensor,
    plan: *const C_tensor,
    sinks: *const C_tensor,
    scale: f64,
    kernels: *const u8,
    kernels_len: usize,
    has_window: bool,
    window: i64,
}

/// The kinds of error `csrc/ops.cpp` raises as Python's TypeError, ValueError, NotImplementedError, RuntimeError
/// (its `run` switches on the same numbers).
const TYPE_ERROR: i32 = 1;
const VALUE_ERROR: i32 = 2;
const NOT_IMPLEMENTED: i32 = 3;
const RUNTIME_ERROR: i32 = 4;

type OpKernel = extern "C" fn(*const OpArgs, *mut *mut C_tensor, *mut i32) -> *const c_char;

extern "C" {
    fn sp_register_ops(forward: OpKernel, backward: OpKernel) -> *const c_char;
}

/// Defines the `shared_prefix` torch ops and registers their kernels and autograd (once per process).
pub fn register_ops() -> Result<()> {
    // SAFETY: plain function pointers; the shim copies them.
    check(unsafe { sp_register_ops(op_forward, op_backward) })
}

/// A tensor the caller owns, borrowed for the call (never dropped here).
///
/// # Safety
/// `p` is null or a live `at::Tensor` for the duration of the call.
unsafe fn borrowed(p: *const C_tensor) -> Option<ManuallyDrop<Tensor>> {
    (!p.is_null()).then(|| ManuallyDrop::new(Tensor::from_ptr(p as *mut C_tensor)))
}

thread_local! {
    static LAST_ERROR: RefCell<CString> = RefCell::new(CString::default());
}

/// Runs an op kernel: writes its outputs (owned `at::Tensor` pointers) into `results`, or returns an error message
/// (valid until the next call on this thread) with its kind in `kind`.
fn run_kernel(a: *const OpArgs, results: *mut *mut C_tensor, kind: *mut i32,
              f: impl FnOnce(&OpArgs, &Options) -> op::OpResult<Vec<Tensor>>) -> *const c_char {
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        // SAFETY: the shim passes a live OpArgs whose kernels bytes are valid UTF-8 (a C++ std::string of Python's).
        let a = unsafe { &*a };
        let kernels = (!a.kernels.is_null())
            .then(|| unsafe { std::str::from_utf8(std::slice::from_raw_parts(a.kernels, a.kernels_len)) })
            .transpose()
            .map_err(|_| OpError::Value("kernels: not valid UTF-8".into()))?;
        let o = Options { scale: a.scale, kernels, window: a.has_window.then_some(a.window) };
        f(a, &o)
    }));
    let (code, msg) = match outcome {
        Ok(Ok(tensors)) => {
            for (i, mut t) in tensors.into_iter().enumerate() {
                // SAFETY: the shim passes room for every output of the op; ownership moves to the shim.
                unsafe { *results.add(i) = t.as_mut_ptr() };
                std::mem::forget(t);
            }
            return std::ptr::null();
        }
        Ok(Err(OpError::Type(m))) => (TYPE_ERROR, m),
        Ok(Err(OpError::Value(m))) => (VALUE_ERROR, m),
        Ok(Err(OpError::NotImplemented(m))) => (NOT_IMPLEMENTED, m),
        Ok(Err(OpError::Torch(e))) => (RUNTIME_ERROR, format!("shared_prefix: libtorch error: {e}")),
        Err(panic) => {
            let what = panic.downcast_ref::<&str>().map(|s| s.to_string());
            let what = what.or_else(|| panic.downcast_ref::<String>().cloned());
            (RUNTIME_ERROR, format!("shared_prefix: internal error: {}", what.unwrap_or_default()))
        }
    };
    // SAFETY: `kind` is the shim's.
    unsafe { *kind = code };
    LAST_ERROR.with(|e| {
        *e.borrow_mut() = CString::new(msg.replace('\0', " ")).unwrap_or_default();
        e.borrow().as_ptr()
    })
}

extern "C" fn op_forward(a: *const OpArgs, results: *mut *mut C_tensor, kind: *mut i32) -> *const c_char {
    run_kernel(a, results, kind, |a, o| {
        // SAFETY: the forward's tensors are the shim's, live for the call.
        let [q, k, v, plan] = [a.q, a.k, a.v, a.plan].map(|p| unsafe { borrowed(p) }.expect("q, k, v, plan"));
        let sinks = unsafe { borrowed(a.sinks) };
        let (out, lse) = op::forward(&q, &k, &v, &plan, sinks.as_deref(), o)?;
        Ok(vec![out, lse])
    })
}

extern "C" fn op_backward(a: *const OpArgs, results: *mut *mut C_tensor, kind: *mut i32) -> *const c_char {
    run_kernel(a, results, kind, |a, o| {
        // SAFETY: the backward's tensors are the shim's, live for the call.
        let [dout, q, k, v, out, lse, plan] =
            [a.dout, a.q, a.k, a.v, a.out, a.lse, a.plan].map(|p| unsafe { borrowed(p) }.expect("backward tensors"));
        let sinks = unsafe { borrowed(a.sinks) };
        let (dq, dk, dv, ds) = op::backward(&dout, &q, &k, &v, &out, &lse, &plan, sinks.as_deref(), o)?;
        Ok(vec![dq, dk, dv, ds])
    })
}

pub fn check(err: *const c_char) -> Result<()> {
    if err.is_null() {
        return Ok(());
    }
    // SAFETY: the shim returns a NUL-terminated thread-local message, valid until its next call on this thread.
    let msg = unsafe { CStr::from_ptr(err) }.to_string_lossy().into_owned();
    Err(TchError::Torch(msg))
}

