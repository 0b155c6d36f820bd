//! flash-attention 2 varlen through ATen (the CUDA fp16/bf16 kernel for most calls): one call per attention
//! call over all its segments, segment tables on the device and max lengths from the host, so no call reads a
//! device value back. GQA is native (K/V are never repeated); sliding windows are FA2's left window.

use crate::seam::{Kernels, Result, Saved, Segments};
use crate::shim::{check, sp_flash_varlen_bwd, sp_flash_varlen_fwd};
use tch::{TchError, Tensor};

pub struct FlashKernels;

/// FA2's left window for a call's sliding window `w` (the query and the `w - 1` keys before it); -1: none.
fn window_left(seg: &Segments) -> i64 {
    seg.window.map_or(-1, |w| w as i64 - 1)
}

/// The longest query segment as FA2 is told it: at least 2. With exactly 1 and GQA, ATen's varlen forward takes its
/// decode path, which reshapes q as one row per segment and so fails on a table with empty segments (1-token
/// completions beside an empty one). A larger bound is valid (it only sizes the grid: one block either way), and
/// causal attention of a 1-row segment equals the non-causal one that path would run.
fn fa2_max_q(seg: &Segments) -> i64 {
    seg.max_q.max(2) as i64
}

impl Kernels for FlashKernels {
    fn forward(&self, q: &Tensor, k: &Tensor, v: &Tensor, seg: &Segments, causal: bool, scale: f64)
        -> Result<(Tensor, Tensor)> {
        let (q, k, v) = (q.f_contiguous()?, k.f_contiguous()?, v.f_contiguous()?);
        let mut out = std::ptr::null_mut();
        let mut lse = std::ptr::null_mut();
        check(unsafe {
            sp_flash_varlen_fwd(
                q.as_ptr(),
                k.as_ptr(),
                v.as_ptr(),
                seg.cu_q.as_ptr(),
                seg.cu_k.as_ptr(),
                fa2_max_q(seg),
                seg.max_k as i64,
                causal,
                scale,
                window_left(seg),
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

    fn backward(&self, s: &Saved, seg: &Segments, causal: bool, scale: f64) -> Result<(Tensor, Tensor, Tensor)> {
        let (dout, q, k, v) = (s.dout.f_contiguous()?, s.q.f_contiguous()?, s.k.f_contiguous()?, s.v.f_contiguous()?);
        let (out, lse) = (s.out.f_contiguous()?, s.lse.f_transpose(0, 1)?.f_contiguous()?);
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
                fa2_max_q(seg),
                seg.max_k as i64,
                causal,
                scale,
                window_left(seg),
                &mut dq,
                &mut dk,
                &mut dv,
            )
        })?;
        // SAFETY: on success the shim hands over three new at::Tensor handles.
        Ok(unsafe { (Tensor::from_ptr(dq), Tensor::from_ptr(dk), Tensor::from_ptr(dv)) })
    }
}

