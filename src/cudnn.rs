//! cuDNN dense attention through ATen, a dense kernel (`dense::Runs`) for CUDA fp16/bf16: run by run, on strided
//! views of the packed tensors (`kernels="cudnn_views"`, what the policy's "auto" uses for long recurring calls)
//! or on contiguous copies (`kernels="cudnn"`). GQA is native.

use crate::dense::{no_window, Dense};
use crate::seam::{contiguous_if, Result, Saved};
use crate::shim::{check, sp_cudnn_bwd, sp_cudnn_fwd};
use std::sync::atomic::{AtomicI64, Ordering};
use tch::Tensor;

/// cuDNN's softmax statistics come as `[B, H, L]` or `[B, H, L, 1]` depending on the version; the rank seen in
/// the first forward is what backward hands back (0 = not seen yet).
static CUDNN_LSE_RANK: AtomicI64 = AtomicI64::new(0);

/// cuDNN dense attention. Without `contiguous` (`cudnn_views`, what "auto" uses) every operand (q, k, v, out and
/// dO alike) goes in as the strided `[B, H, L, D]` view of token-major `[B, L, H, D]` storage that `Runs` hands
/// over (the executor makes them token-major once per attention call): no per-call copies. The operands must
/// share one layout: cuDNN gives wrong gradients for strided q/k/v beside head-major dO/O. With `contiguous`
/// (`kernels="cudnn"`) every operand is copied to a contiguous `[B, H, L, D]` tensor. Both layouts are checked
/// against fp32 references on the GPU (`tests/test_cuda.py`).
pub struct CudnnDense {
    pub contiguous: bool,
}

impl CudnnDense {
    fn operand(&self, x: &Tensor) -> Result<Tensor> {
        contiguous_if(self.contiguous, x)
    }
}

impl Dense for CudnnDense {
    // Without copies the views keep the packed tensors' layout: make that one layout (token-major) for all.
    fn token_major(&self) -> bool {
        !self.contiguous
    }

    fn fwd(&self, q: &Tensor, k: &Tensor, v: &Tensor, causal: bool, window: Option<usize>, scale: f64)
        -> Result<(Tensor, Tensor)> {
        no_window("cudnn", window)?;
        let (q, k, v) = (self.operand(q)?, self.operand(k)?, self.operand(v)?);
        let (mut out, mut lse) = (std::ptr::null_mut(), std::ptr::null_mut());
        check(unsafe { sp_cudnn_fwd(q.as_ptr(), k.as_ptr(), v.as_ptr(), causal, scale, &mut out, &mut lse) })?;
        // SAFETY: on success the shim hands over two new at::Tensor handles.
        let (out, lse) = unsafe { (Tensor::from_ptr(out), Tensor::from_ptr(lse)) };
        CUDNN_LSE_RANK.store(lse.dim() as i64, Ordering::Relaxed);
        let lse = if lse.dim() == 4 { lse.f_squeeze_dim(-1)? } else { lse };
        Ok((out, lse))
    }

    fn bwd(&self, s: &Saved, causal: bool, window: Option<usize>, scale: f64) -> Result<(Tensor, Tensor, Tensor)> {
        no_window("cudnn", window)?;
        let lse = if CUDNN_LSE_RANK.load(Ordering::Relaxed) == 4 { s.lse.f_unsqueeze(-1)? } else { s.lse.shallow_clone() };
        let (dout, out, lse) = (self.operand(s.dout)?, self.operand(s.out)?, lse.f_contiguous()?);
        let (q, k, v) = (self.operand(s.q)?, self.operand(s.k)?, self.operand(s.v)?);
        let (mut dq, mut dk, mut dv) = (std::ptr::null_mut(), std::ptr::null_mut(), std::ptr::null_mut());
        check(unsafe {
            sp_cudnn_bwd(
                dout.as_ptr(),
                q.as_ptr(),
                k.as_ptr(),
                v.as_ptr(),
                out.as_ptr(),
                lse.as_ptr(),
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

