//! CUDA kernels: flash-attention 2 varlen through ATen (the forward via the C++ shim, which tch does not bind).
//! Segment tables live on the device and max lengths on the host, so no call reads a device value back.
//! GQA is native (Hkv < Hq), K/V are never repeated.

use crate::executor::{Kernels, Result, Segments};
use std::ffi::CStr;
use std::os::raw::c_char;
use tch::{TchError, Tensor};
use pyo3_tch::torch_sys::C_tensor;

extern "C" {
    fn sp_flash_varlen_fwd(
        q: *const C_tensor,
        k: *const C_tensor,
        v: *const C_tensor,
        cu_q: *const C_tensor,
        cu_k: *const C_tensor,
        max_q: i64,
        max_k: i64,
        causal: bool,
        scale: f64,
        out: *mut *mut C_tensor,
        lse: *mut *mut C_tensor,
    ) -> *const c_char;

    fn sp_flash_varlen_bwd(
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
        dq: *mut *mut C_tensor,
        dk: *mut *mut C_tensor,
        dv: *mut *mut C_tensor,
    ) -> *const c_char;
}

fn check(err: *const c_char) -> Result<()> {
    if err.is_null() {
        return Ok(());
    }
    // SAFETY: the shim returns a NUL-terminated thread-local message, valid until its next call on this thread.
    let msg = unsafe { CStr::from_ptr(err) }.to_string_lossy().into_owned();
    Err(TchError::Torch(msg))
}

pub struct FlashKernels;

impl Kernels for FlashKernels {
    fn forward(&self, q: &Tensor, k: &Tensor, v: &Tensor, seg: &Segments, causal: bool, scale: f64)
        -> Result<(Tensor, Tensor)> {
        let (q, k, v) = (q.contiguous(), k.contiguous(), v.contiguous());
        let mut out = std::ptr::null_mut();
        let mut lse = std::ptr::null_mut();
        check(unsafe {
            sp_flash_varlen_fwd(
                q.as_ptr(),
                k.as_ptr(),
                v.as_ptr(),
                seg.cu_q.as_ptr(),
                seg.cu_k.as_ptr(),
                seg.max_q as i64,
                seg.max_k as i64,
                causal,
                scale,
                &mut out,
                &mut lse,
            )
        })?;
        // SAFETY: on success the shim hands over two new at::Tensor handles.
        let (out, lse) = unsafe { (Tensor::from_ptr(out), Tensor::from_ptr(lse)) };
        // FA2 varlen gives lse as [H, T]; the executor's layout is [T, H].
        let (tq, h) = (q.size()[0], q.size()[1]);
        if lse.size() != [h, tq] {
            return Err(TchError::Shape(format!("flash varlen lse has shape {:?}, expected [{h}, {tq}]", lse.size())));
        }
        Ok((out, lse.f_transpose(0, 1)?))
    }

    fn backward(
        &self,
        dout: &Tensor,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        out: &Tensor,
        lse: &Tensor,
        seg: &Segments,
        causal: bool,
        scale: f64,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        let (dout, q, k, v, out) = (dout.contiguous(), q.contiguous(), k.contiguous(), v.contiguous(), out.contiguous());
        let lse = lse.f_transpose(0, 1)?.contiguous();
        let (mut dq, mut dk, mut dv) = (std::ptr::null_mut(), std::ptr::null_mut(), std::ptr::null_mut());
        check(unsafe {
            sp_flash_varlen_bwd(
                dout.as_ptr(),
                q.as_ptr(),
                k.as_ptr(),
                v.as_ptr(),
                out.as_ptr(),
                lse.as_ptr(),
                seg.cu_q.as_ptr(),
                seg.cu_k.as_ptr(),
                seg.max_q as i64,
                seg.max_k as i64,
                causal,
                scale,
                &mut dq,
                &mut dk,
                &mut dv,
            )
        })?;
        // SAFETY: on success the shim hands over three new at::Tensor handles.
        Ok(unsafe { (Tensor::from_ptr(dq), Tensor::from_ptr(dk), Tensor::from_ptr(dv)) })
    }
}
