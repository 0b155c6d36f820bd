//! The C ABI of the C++ shim (`csrc/shim.cpp`): the ATen attention entry points tch does not bind, on `at::Tensor`
//! pointers. Errors come back as a message (a C++ exception never crosses into Rust).

use crate::seam::Result;
use pyo3_tch::torch_sys::C_tensor;
use std::ffi::CStr;
use std::os::raw::c_char;
use tch::TchError;

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
    pub fn sp_handle_tensor(id: i64, release: extern "C" fn(i64), out: *mut *mut C_tensor) -> *const c_char;
}

pub fn check(err: *const c_char) -> Result<()> {
    if err.is_null() {
        return Ok(());
    }
    // SAFETY: the shim returns a NUL-terminated thread-local message, valid until its next call on this thread.
    let msg = unsafe { CStr::from_ptr(err) }.to_string_lossy().into_owned();
    Err(TchError::Torch(msg))
}

