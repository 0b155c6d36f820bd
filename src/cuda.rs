//! CUDA kernels through ATen, via the C++ shim for the entry points tch does not bind:
//! - flash-attention 2 varlen (the default for fp16/bf16): one call per attention call, segment tables on the
//!   device and max lengths from the host, so no call reads a device value back;
//! - cuDNN dense attention, run by run (`kernels="cudnn"`, and by `AutoKernels` for long one-batch calls; see
//!   BENCHMARKS.md for the measured choice; `"cudnn_views"`: the same without operand copies, unverified).
//!
//! GQA is native in both (Hkv < Hq): K/V are never repeated.

use crate::executor::{contiguous_if, Kernels, Result, Saved, Segments};
use crate::runs::{no_window, Dense};
use std::sync::atomic::{AtomicI64, Ordering};
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
        window_left: i64,
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
        window_left: i64,
        dq: *mut *mut C_tensor,
        dk: *mut *mut C_tensor,
        dv: *mut *mut C_tensor,
    ) -> *const c_char;

    fn sp_cudnn_fwd(
        q: *const C_tensor,
        k: *const C_tensor,
        v: *const C_tensor,
        causal: bool,
        scale: f64,
        out: *mut *mut C_tensor,
        lse: *mut *mut C_tensor,
    ) -> *const c_char;

    #[allow(clippy::too_many_arguments)]
    fn sp_cudnn_bwd(
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

fn check(err: *const c_char) -> Result<()> {
    if err.is_null() {
        return Ok(());
    }
    // SAFETY: the shim returns a NUL-terminated thread-local message, valid until its next call on this thread.
    let msg = unsafe { CStr::from_ptr(err) }.to_string_lossy().into_owned();
    Err(TchError::Torch(msg))
}

pub struct FlashKernels;

/// FA2's left window for a call's sliding window `w` (the query and the `w - 1` keys before it); -1: none.
fn window_left(seg: &Segments) -> i64 {
    seg.window.map_or(-1, |w| w as i64 - 1)
}

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
        let (dout, q, k, v, out) = (s.dout.contiguous(), s.q.contiguous(), s.k.contiguous(), s.v.contiguous(), s.out.contiguous());
        let lse = s.lse.f_transpose(0, 1)?.contiguous();
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

/// cuDNN's softmax statistics come as `[B, H, L]` or `[B, H, L, 1]` depending on the version; the rank seen in
/// the first forward is what backward hands back (0 = not seen yet).
static CUDNN_LSE_RANK: AtomicI64 = AtomicI64::new(0);

/// cuDNN dense attention. With `contiguous`, every operand is copied to a contiguous `[B, H, L, D]` tensor (the
/// verified default: q/k/v as strided `[B, H, L, D]` views of token-major storage with dO/O copied to contiguous,
/// i.e. head-major, `[B, H, L, D]` gave wrong gradients at some shapes — the operands' layouts differed). Without, every
/// operand — q, k, v, out and dO alike — goes in as the strided `[B, H, L, D]` view of token-major `[B, L, H, D]`
/// storage that `Runs` hands over (the executor makes q/k/v token-major first, once per attention call), saving
/// the per-call copies. `cudnn_views` selects the latter: NOT yet verified on a GPU (added without a device;
/// `tests/test_cuda.py` and `scripts/gpu_cudnn_diag.py layouts` check it).
pub struct CudnnDense {
    pub contiguous: bool,
}

impl CudnnDense {
    fn operand(&self, x: &Tensor) -> Tensor {
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
        let (q, k, v) = (self.operand(q), self.operand(k), self.operand(v));
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
        let (dout, out, lse) = (self.operand(s.dout), self.operand(s.out), lse.contiguous());
        let (q, k, v) = (self.operand(s.q), self.operand(s.k), self.operand(s.v));
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

/// The CUDA fp16/bf16 default, chosen per attention call by measurement (H200, BENCHMARKS.md): cuDNN when the call
/// is one dense batch (one run) with keys of at least `CUDNN_MIN_KEYS` tokens, flash-attention 2 varlen otherwise.
/// cuDNN won at 16k keys (0.54 s vs 0.66 s per step) and tied at 8k; varlen won at 4k (0.19 s vs 0.23 s) and
/// takes ragged batches in one call (cuDNN would need one call, and one cuDNN graph, per run). Forward and
/// backward of a call make the same choice, since it depends only on the plan's host integers. `cudnn` is the
/// dense kernel it picks: `AUTO` copies operands (`CUDNN`), `AUTO_VIEWS` (`kernels="auto_views"`) does not.
pub struct AutoKernels {
    cudnn: &'static crate::runs::Runs<CudnnDense>,
}

pub const CUDNN_MIN_KEYS: usize = 8192;

pub static FLASH: FlashKernels = FlashKernels;
pub static CUDNN: crate::runs::Runs<CudnnDense> = crate::runs::Runs(CudnnDense { contiguous: true });
pub static CUDNN_VIEWS: crate::runs::Runs<CudnnDense> = crate::runs::Runs(CudnnDense { contiguous: false });
pub static AUTO: AutoKernels = AutoKernels { cudnn: &CUDNN };
pub static AUTO_VIEWS: AutoKernels = AutoKernels { cudnn: &CUDNN_VIEWS };

impl AutoKernels {
    fn pick(&self, seg: &Segments) -> &'static dyn Kernels {
        // Sliding windows: FA2 takes them, cuDNN dense attention (as ATen exposes it) does not.
        if seg.window.is_none() && seg.runs.len() <= 1 && seg.max_k >= CUDNN_MIN_KEYS { self.cudnn } else { &FLASH }
    }
}

impl Kernels for AutoKernels {
    fn forward(&self, q: &Tensor, k: &Tensor, v: &Tensor, seg: &Segments, causal: bool, scale: f64)
        -> Result<(Tensor, Tensor)> {
        self.pick(seg).forward(q, k, v, seg, causal, scale)
    }

    fn backward(&self, s: &Saved, seg: &Segments, causal: bool, scale: f64) -> Result<(Tensor, Tensor, Tensor)> {
        self.pick(seg).backward(s, seg, causal, scale)
    }
}
