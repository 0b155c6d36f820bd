//! CUDA kernels through ATen, via the C++ shim for the entry points tch does not bind:
//! - flash-attention 2 varlen (the default for fp16/bf16): one call per attention call, segment tables on the
//!   device and max lengths from the host, so no call reads a device value back;
//! - cuDNN dense attention, run by run, on strided views of the packed tensors (`kernels="cudnn_views"`, and by
//!   `AutoKernels` for long one-batch calls; see BENCHMARKS.md for the measured choice), or on contiguous copies
//!   (`kernels="cudnn"`).
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

/// cuDNN's softmax statistics come as `[B, H, L]` or `[B, H, L, 1]` depending on the version; the rank seen in
/// the first forward is what backward hands back (0 = not seen yet).
static CUDNN_LSE_RANK: AtomicI64 = AtomicI64::new(0);

/// cuDNN dense attention. Without `contiguous` (`cudnn_views`, what "auto" uses) every operand — q, k, v, out and
/// dO alike — goes in as the strided `[B, H, L, D]` view of token-major `[B, L, H, D]` storage that `Runs` hands
/// over (the executor makes q/k/v token-major first, once per attention call): no per-call copies. The operands
/// must share one layout: strided q/k/v with head-major (contiguous) dO/O gave wrong gradients at 8192x256x16x1
/// (H200 run 2). With `contiguous` (`kernels="cudnn"`) every operand is copied to a contiguous `[B, H, L, D]`
/// tensor. Both are checked against fp32 references on the GPU (`tests/test_cuda.py`; `scripts/gpu_cudnn_diag.py
/// layouts`: the same dq/dk/dv errors, 2.4e-3 to 3.0e-3, for either layout, H200 run 6).
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

/// The CUDA fp16/bf16 default, chosen per attention call by measurement (H200, BENCHMARKS.md): cuDNN, copy-free
/// (`CUDNN_VIEWS`), when the call is one dense batch (one run) with keys of at least `CUDNN_MIN_KEYS` tokens whose
/// shape recurred in `device_plan::CUDNN_AFTER` (8) earlier plans; flash-attention 2 varlen otherwise.
/// - In GPU kernel time cuDNN's attention is 35-40 % below FA2's at 4k-16k keys, but each cuDNN call costs more
///   host time, which a small model's host-bound step feels at 4k (run 7: all-cuDNN 0.134 s of kernels vs 0.152 s,
///   yet 0.242 s vs 0.209 s of wall time); at 8k and 16k the rule is the best or tied in both once its graphs
///   exist (16k: 0.533 s a step vs FA2's 0.675 s).
/// - cuDNN builds a graph for every new shape: the first step of a shape took 0.10-0.67 s longer under the rule
///   than its later steps (H200 runs 4, 6-8; 0.839 vs 0.246 s at 8192x256x16x1 in run 4), while FA2's first step
///   is its median; the rule's gain once built is at most 0.14 s a step (16k). GRPO batches rarely repeat a prompt
///   length, and TRL/verl put each micro-batch through 2-4 plans (reference, old and policy log-probs, PPO
///   epochs), hence cuDNN only for shapes that keep recurring.
/// - Varlen also takes ragged batches in one call (cuDNN would need one call, and one cuDNN graph, per run).
///   Copy-free beat copying operands at 8k and 16k (0.206 vs 0.212 s and 0.515 vs 0.526 s of kernels).
///
/// Forward and backward of a call make the same choice: it depends only on the plan (its host integers, and
/// whether its shapes recurred, fixed when it was made).
pub struct AutoKernels;

pub const CUDNN_MIN_KEYS: usize = 8192;

pub static FLASH: FlashKernels = FlashKernels;
pub static CUDNN: crate::runs::Runs<CudnnDense> = crate::runs::Runs(CudnnDense { contiguous: true });
pub static CUDNN_VIEWS: crate::runs::Runs<CudnnDense> = crate::runs::Runs(CudnnDense { contiguous: false });
pub static AUTO: AutoKernels = AutoKernels;

impl AutoKernels {
    pub fn cudnn(seg: &Segments) -> bool {
        // Sliding windows: FA2 takes them, cuDNN dense attention (as ATen exposes it) does not.
        seg.window.is_none() && seg.runs.len() <= 1 && seg.max_k >= CUDNN_MIN_KEYS && seg.recurring
    }

    fn pick(seg: &Segments) -> &'static dyn Kernels {
        if Self::cudnn(seg) { &CUDNN_VIEWS } else { &FLASH }
    }
}

impl Kernels for AutoKernels {
    // The copy-free cuDNN calls need every operand in one layout, and `pick` comes after the executor lays them out:
    // token-major for all (q/k/v, out and dO). FA2 copies its operands to exactly that layout anyway.
    fn token_major(&self) -> bool {
        true
    }

    // A prefix long enough for cuDNN keeps its own call; otherwise FA2 takes it with the completions' in one call.
    fn prefix_alone(&self, prefix: &Segments) -> bool {
        Self::cudnn(prefix)
    }

    fn forward(&self, q: &Tensor, k: &Tensor, v: &Tensor, seg: &Segments, causal: bool, scale: f64)
        -> Result<(Tensor, Tensor)> {
        Self::pick(seg).forward(q, k, v, seg, causal, scale)
    }

    fn backward(&self, s: &Saved, seg: &Segments, causal: bool, scale: f64) -> Result<(Tensor, Tensor, Tensor)> {
        Self::pick(seg).backward(s, seg, causal, scale)
    }
}
