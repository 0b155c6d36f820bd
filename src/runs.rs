//! Kernels that take dense `[batch, heads, len, dim]` inputs, applied run by run: each run of equal-length
//! consecutive segments is one batched call on a view of the packed tensors (no copy, no padding, exact).
//!
//! Two dense kernels: ATen's flash attention for CPU, and an explicit-math kernel that runs on any device and
//! dtype (the correct path for fp32/fp64 on CUDA, and an independent implementation the CPU tests check).

use crate::executor::{Kernels, Result, Saved, Segments};
use planner::Run;
use std::sync::atomic::{AtomicUsize, Ordering};
use tch::{Kind, Tensor};

/// Attention on dense batches. `lse` is `[batch, Hq, Lq]`; GQA (`Hkv < Hq`) must be supported.
/// `window`: a sliding window on a causal call (see `Segments::window`); kernels without one refuse it.
pub trait Dense {
    fn fwd(&self, q: &Tensor, k: &Tensor, v: &Tensor, causal: bool, window: Option<usize>, scale: f64)
        -> Result<(Tensor, Tensor)>;
    /// `s` holds dense batches: `[batch, H, L, D]` tensors and `lse` `[batch, Hq, Lq]`.
    fn bwd(&self, s: &Saved, causal: bool, window: Option<usize>, scale: f64) -> Result<(Tensor, Tensor, Tensor)>;

    /// See `Kernels::token_major`.
    fn token_major(&self) -> bool {
        false
    }
}

pub struct Runs<D: Dense>(pub D);

/// `[count * len, H, D]` rows starting at `start` → `[count, H, len, D]` view.
fn batched(x: &Tensor, start: usize, count: usize, len: usize) -> Result<Tensor> {
    let s = x.size();
    x.f_narrow(0, start as i64, (count * len) as i64)?
        .f_view([count as i64, len as i64, s[1], s[2]])?
        .f_transpose(1, 2)
}

/// `[count * len, H]` log-sum-exp rows → `[count, H, len]` view.
fn batched_lse(x: &Tensor, start: usize, count: usize, len: usize) -> Result<Tensor> {
    let h = x.size()[1];
    x.f_narrow(0, start as i64, (count * len) as i64)?.f_view([count as i64, len as i64, h])?.f_transpose(1, 2)
}

/// Runs shorter than this many keys are never padded: only calls long enough for cuDNN (`CUDNN_MIN_KEYS`) gain
/// from sharing a graph. Tests lower it to exercise the padding on short runs.
pub static PAD_MIN_KEYS: AtomicUsize = AtomicUsize::new(crate::cuda::CUDNN_MIN_KEYS);

/// `len` rounded up to a multiple of `bucket` (0: `len` itself): the length a padded run has, and the length the
/// plan counts it by (`device_plan::recurring`).
pub fn bucketed(len: usize, bucket: usize) -> usize {
    if bucket == 0 { len } else { len.div_ceil(bucket) * bucket }
}

/// The length a causal self-attention run is padded to: a multiple of the segments' `bucket` (0: none), so that
/// runs of nearby lengths share one shape (one cuDNN graph). Tail padding is exact for such a run: no real query
/// sees a key after it, and the padded rows (zero q/k/v, zero dO and out, lse 0) add nothing to any gradient
/// (their dS = P∘(dO·Vᵀ - rowsum(dO∘O)) is 0). `None` when the run is not one, is short, or needs no padding.
fn padded_len(seg: &Segments, r: &Run, causal: bool) -> Option<usize> {
    let self_run = causal && seg.window.is_none() && r.q_start == r.k_start && r.q_len == r.k_len;
    let long = r.k_len >= PAD_MIN_KEYS.load(Ordering::Relaxed);
    let padded = bucketed(r.q_len, seg.bucket);
    (self_run && long && padded != r.q_len).then_some(padded)
}

/// `batched`, but each segment zero-padded at its tail to `padded` rows: a fresh token-major
/// `[count, padded, ...]` buffer, returned as its `[count, H, padded, ...]` view. Also takes `[rows, H]` lse rows.
fn batched_padded(x: &Tensor, start: usize, count: usize, len: usize, padded: usize) -> Result<Tensor> {
    let s = x.size();
    let mut shape = vec![count as i64, len as i64];
    shape.extend_from_slice(&s[1..]);
    let rows = x.f_narrow(0, start as i64, (count * len) as i64)?.f_view(shape.as_slice())?;
    shape[1] = padded as i64;
    let buf = Tensor::f_empty(shape.as_slice(), (x.kind(), x.device()))?;
    buf.f_narrow(1, 0, len as i64)?.f_copy_(&rows)?;
    let _ = buf.f_narrow(1, len as i64, (padded - len) as i64)?.f_zero_()?;
    buf.f_transpose(1, 2)
}

/// `[count, H, len, ...]` → `[count * len, H, ...]`.
fn unbatched(x: &Tensor) -> Result<Tensor> {
    let s = x.size();
    let mut shape = vec![s[0] * s[2], s[1]];
    shape.extend_from_slice(&s[3..]);
    x.f_transpose(1, 2)?.f_reshape(shape.as_slice())
}

impl<D: Dense> Kernels for Runs<D> {
    fn token_major(&self) -> bool {
        self.0.token_major()
    }

    // One call per run either way: as one, the self calls' runs would only add concatenations (measured on CPU:
    // 520 vs 476 ATen ops per attention forward+backward at 16x4x4x2, +10-30 % host time there, neutral at the
    // bench's shapes).
    fn prefix_alone(&self, _prefix: &Segments) -> bool {
        true
    }

    fn forward(&self, q: &Tensor, k: &Tensor, v: &Tensor, seg: &Segments, causal: bool, scale: f64)
        -> Result<(Tensor, Tensor)> {
        let (mut outs, mut lses) = (Vec::with_capacity(seg.runs.len()), Vec::with_capacity(seg.runs.len()));
        for r in seg.runs {
            let (o, l) = match padded_len(seg, r, causal) {
                None => self.0.fwd(
                    &batched(q, r.q_start, r.count, r.q_len)?,
                    &batched(k, r.k_start, r.count, r.k_len)?,
                    &batched(v, r.k_start, r.count, r.k_len)?,
                    causal,
                    seg.window,
                    scale,
                )?,
                Some(n) => {
                    let pad = |x: &Tensor| batched_padded(x, r.q_start, r.count, r.q_len, n);
                    let (o, l) = self.0.fwd(&pad(q)?, &pad(k)?, &pad(v)?, causal, seg.window, scale)?;
                    let len = r.q_len as i64;
                    (o.f_narrow(2, 0, len)?, l.f_narrow(2, 0, len)?)
                }
            };
            outs.push(unbatched(&o)?);
            lses.push(unbatched(&l)?);
        }
        // Runs tile the query rows in order (empty segments have no rows), so concatenation is the output.
        if outs.len() == 1 {
            return Ok((outs.pop().unwrap(), lses.pop().unwrap()));
        }
        Ok((Tensor::f_cat(&outs, 0)?, Tensor::f_cat(&lses, 0)?))
    }

    fn backward(&self, s: &Saved, seg: &Segments, causal: bool, scale: f64) -> Result<(Tensor, Tensor, Tensor)> {
        let run_grads = |r: &Run| {
            if let Some(n) = padded_len(seg, r, causal) {
                let pad = |x: &Tensor| batched_padded(x, r.q_start, r.count, r.q_len, n);
                let (dout, out, lse) = (pad(s.dout)?, pad(s.out)?, pad(s.lse)?);
                let (q, k, v) = (pad(s.q)?, pad(s.k)?, pad(s.v)?);
                let batch = Saved { dout: &dout, q: &q, k: &k, v: &v, out: &out, lse: &lse };
                let (g_q, g_k, g_v) = self.0.bwd(&batch, causal, seg.window, scale)?;
                let len = r.q_len as i64;
                return Ok((g_q.f_narrow(2, 0, len)?, g_k.f_narrow(2, 0, len)?, g_v.f_narrow(2, 0, len)?));
            }
            let rows = |x: &Tensor| batched(x, r.q_start, r.count, r.q_len);
            let keys = |x: &Tensor| batched(x, r.k_start, r.count, r.k_len);
            let (dout, q, k, v, out) = (rows(s.dout)?, rows(s.q)?, keys(s.k)?, keys(s.v)?, rows(s.out)?);
            let lse = batched_lse(s.lse, r.q_start, r.count, r.q_len)?;
            let batch = Saved { dout: &dout, q: &q, k: &k, v: &v, out: &out, lse: &lse };
            self.0.bwd(&batch, causal, seg.window, scale)
        };
        // Runs are disjoint and in bounds, so runs whose lengths add up to every row (key) cover them all.
        let all_keys = seg.runs.iter().map(|r| r.count * r.k_len).sum::<usize>() == s.k.size()[0] as usize;
        let all_rows = seg.runs.iter().map(|r| r.count * r.q_len).sum::<usize>() == s.q.size()[0] as usize;
        if let ([r], true, true) = (seg.runs, all_rows, all_keys) {
            // One run over every row and key (segments all of one length: one prompt, one group, or equal
            // lengths): its gradients are the whole answer, with no zero-filled tensors to copy them into.
            // Token-major like the zero-filled path's (a no-op for the kernels that return that layout).
            let (g_q, g_k, g_v) = run_grads(r)?;
            let packed = |g: &Tensor| unbatched(g)?.f_contiguous();
            return Ok((packed(&g_q)?, packed(&g_k)?, packed(&g_v)?));
        }
        // Keys no query of this call sees (a prompt whose group has no completion tokens) get zero gradient; fully
        // covered ones (self-attention calls) need no zero fill.
        let fresh = |x: &Tensor, covered: bool| if covered { x.f_empty_like() } else { x.f_zeros_like() };
        let (dq, dk, dv) = (fresh(s.q, all_rows)?, fresh(s.k, all_keys)?, fresh(s.v, all_keys)?);
        for r in seg.runs {
            let (g_q, g_k, g_v) = run_grads(r)?;
            let (qn, kn) = ((r.count * r.q_len) as i64, (r.count * r.k_len) as i64);
            dq.f_narrow(0, r.q_start as i64, qn)?.f_copy_(&unbatched(&g_q)?)?;
            dk.f_narrow(0, r.k_start as i64, kn)?.f_copy_(&unbatched(&g_k)?)?;
            dv.f_narrow(0, r.k_start as i64, kn)?.f_copy_(&unbatched(&g_v)?)?;
        }
        Ok((dq, dk, dv))
    }
}

/// ATen's flash attention for CPU: returns the log-sum-exp, takes GQA natively, accepts strided views.
pub struct CpuFlash;

/// The error of a kernel asked for a sliding window it cannot apply (kernel selection never asks; a guard).
pub fn no_window(kernel: &str, window: Option<usize>) -> Result<()> {
    match window {
        Some(w) => Err(tch::TchError::Kind(format!("the {kernel} kernel takes no sliding window (window={w})"))),
        None => Ok(()),
    }
}

impl Dense for CpuFlash {
    fn fwd(&self, q: &Tensor, k: &Tensor, v: &Tensor, causal: bool, window: Option<usize>, scale: f64)
        -> Result<(Tensor, Tensor)> {
        no_window("cpu_flash", window)?;
        Tensor::f_internal_scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, causal, None::<Tensor>, scale)
    }

    fn bwd(&self, s: &Saved, causal: bool, window: Option<usize>, scale: f64) -> Result<(Tensor, Tensor, Tensor)> {
        no_window("cpu_flash", window)?;
        Tensor::f_internal_scaled_dot_product_flash_attention_for_cpu_backward(
            s.dout, s.q, s.k, s.v, s.out, s.lse, 0.0, causal, None::<Tensor>, scale,
        )
    }
}

/// Bytes of attention scores one block of query rows may take in the explicit-math kernel: queries are processed in
/// blocks so that the `[batch, Hq, rows, Lk]` score tensors (and the 3 temporaries of the same size) stay bounded
/// at any sequence length (a 16k-token prompt would otherwise need 15 GB per fp32 score tensor with 14 heads).
pub static MATH_BLOCK_BYTES: AtomicUsize = AtomicUsize::new(256 << 20);

/// `v` as a 0-dim CPU tensor: binary ops with it run on any device and keep the other operand's dtype. Used instead
/// of tch's Scalar-taking ops, which free their Scalar before reading the op's error, so a failing op (out of
/// memory) would panic there instead of returning the error.
fn host_scalar(v: f64) -> Result<Tensor> {
    Tensor::f_from_slice(&[v])?.f_squeeze()
}

/// Attention written out with matmuls, softmax statistics and the textbook backward, over blocks of query rows.
/// Any device, any float dtype. K/V heads are expanded for GQA here (this path is not the fast one).
pub struct Math;

impl Math {
    fn expand_heads(x: &Tensor, hq: i64) -> Result<Tensor> {
        let h = x.size()[1];
        if h == hq { Ok(x.shallow_clone()) } else { x.f_repeat_interleave_self_int(hq / h, 1, None::<i64>) }
    }

    /// Query rows per block for `q [b, Hq, Lq, D]` against `lk` keys.
    fn block_rows(q: &Tensor, lk: i64) -> i64 {
        let s = q.size();
        let row_bytes = (s[0] * s[1] * lk.max(1)) as usize * q.kind().elt_size_in_bytes();
        let budget = MATH_BLOCK_BYTES.load(Ordering::Relaxed);
        ((budget / row_bytes.max(1)) as i64).clamp(1, s[2].max(1))
    }

    /// Scaled scores `[b, Hq, rows, Lk]` of query rows `[r0, r0 + rows)` out of `lq`, with the causal mask applied
    /// (bottom-right aligned, as flash kernels do) and, with a window `w`, the keys more than `w - 1` before each
    /// query's diagonal masked too.
    fn scores(q: &Tensor, k: &Tensor, causal: bool, window: Option<usize>, scale: f64, r0: i64, lq: i64)
        -> Result<Tensor> {
        let s = q.f_matmul(&k.f_transpose(-2, -1)?)?.f_mul(&host_scalar(scale)?)?;
        if !causal {
            return Ok(s);
        }
        let (rows, lk) = (q.size()[2], k.size()[2]);
        let ones = Tensor::f_ones([rows, lk], (Kind::Bool, q.device()))?;
        let mut hidden = ones.f_triu(1 + lk - lq + r0)?;
        if let Some(w) = window {
            let _ = hidden.f_logical_or_(&ones.f_tril(lk - lq + r0 - w as i64)?)?;
        }
        s.f_masked_fill_tensor(&hidden, &host_scalar(f64::NEG_INFINITY)?)
    }

    /// `acc += x`, or `x` itself for the first block.
    fn accumulate(acc: Option<Tensor>, x: Tensor) -> Result<Option<Tensor>> {
        Ok(Some(match acc {
            None => x,
            Some(mut a) => {
                let _ = a.f_add_(&x)?;
                a
            }
        }))
    }
}

/// fp16/bf16 operands go through the math kernel in fp32, as flash kernels accumulate them, and its outputs are
/// rounded once (in their own dtype every matmul, the softmax and the probabilities would round: 2-4x the error of
/// SDPA's CPU kernel, measured on the CPU at bf16). fp32/fp64 run as they are.
fn math_operand(x: &Tensor) -> Result<Tensor> {
    if matches!(x.kind(), Kind::Half | Kind::BFloat16) { x.f_to_kind(Kind::Float) } else { Ok(x.shallow_clone()) }
}

impl Dense for Math {
    fn fwd(&self, q: &Tensor, k: &Tensor, v: &Tensor, causal: bool, window: Option<usize>, scale: f64)
        -> Result<(Tensor, Tensor)> {
        let (o, lse) = Math::fwd_work(&math_operand(q)?, &math_operand(k)?, &math_operand(v)?, causal, window, scale)?;
        Ok((o.f_to_kind(q.kind())?, lse))
    }

    fn bwd(&self, s: &Saved, causal: bool, window: Option<usize>, scale: f64) -> Result<(Tensor, Tensor, Tensor)> {
        let (dout, q, k, v, out) =
            (math_operand(s.dout)?, math_operand(s.q)?, math_operand(s.k)?, math_operand(s.v)?, math_operand(s.out)?);
        let work = Saved { dout: &dout, q: &q, k: &k, v: &v, out: &out, lse: s.lse };
        let (dq, dk, dv) = Math::bwd_work(&work, causal, window, scale)?;
        Ok((dq.f_to_kind(s.q.kind())?, dk.f_to_kind(s.k.kind())?, dv.f_to_kind(s.v.kind())?))
    }
}

impl Math {
    fn fwd_work(q: &Tensor, k: &Tensor, v: &Tensor, causal: bool, window: Option<usize>, scale: f64)
        -> Result<(Tensor, Tensor)> {
        let hq = q.size()[1];
        let (k, v) = (Math::expand_heads(k, hq)?, Math::expand_heads(v, hq)?);
        let (lq, lk) = (q.size()[2], k.size()[2]);
        let block = Math::block_rows(q, lk);
        let (mut outs, mut lses) = (Vec::new(), Vec::new());
        for r0 in (0..lq).step_by(block as usize) {
            let qb = q.f_narrow(2, r0, block.min(lq - r0))?;
            let s = Math::scores(&qb, &k, causal, window, scale, r0, lq)?;
            let lse = s.f_logsumexp(&[-1i64][..], false)?;
            let p = s.f_sub(&lse.f_unsqueeze(-1)?)?.f_exp()?;
            outs.push(p.f_matmul(&v)?);
            lses.push(lse);
        }
        if outs.len() == 1 {
            return Ok((outs.pop().unwrap(), lses.pop().unwrap()));
        }
        Ok((Tensor::f_cat(&outs, 2)?, Tensor::f_cat(&lses, 2)?))
    }

    fn bwd_work(s: &Saved, causal: bool, window: Option<usize>, scale: f64) -> Result<(Tensor, Tensor, Tensor)> {
        let Saved { dout, q, k, v, out, lse } = *s;
        let (hq, hkv) = (q.size()[1], k.size()[1]);
        let (ke, ve) = (Math::expand_heads(k, hq)?, Math::expand_heads(v, hq)?);
        let (lq, lk) = (q.size()[2], ke.size()[2]);
        let block = Math::block_rows(q, lk);
        // dK and dV sum over query blocks in the work dtype, fp32 or fp64 (`math_operand` upcasts fp16/bf16).
        let (mut dqs, mut dk, mut dv) = (Vec::new(), None, None);
        let scale_t = host_scalar(scale)?;
        for r0 in (0..lq).step_by(block as usize) {
            let n = block.min(lq - r0);
            let rows = |x: &Tensor| x.f_narrow(2, r0, n);
            let (qb, dob, ob) = (rows(q)?, rows(dout)?, rows(out)?);
            let lb = lse.f_narrow(2, r0, n)?;
            // P from the merged lse: the probabilities of this call's keys within the full softmax.
            let p = Math::scores(&qb, &ke, causal, window, scale, r0, lq)?
                .f_sub(&lb.f_to_kind(q.kind())?.f_unsqueeze(-1)?)?
                .f_exp()?;
            dv = Math::accumulate(dv, p.f_transpose(-2, -1)?.f_matmul(&dob)?)?;
            let dp = dob.f_matmul(&ve.f_transpose(-2, -1)?)?;
            let row = dob.f_mul(&ob)?.f_sum_dim_intlist(&[-1i64][..], true, None::<Kind>)?;
            let ds = p.f_mul(&dp.f_sub(&row)?)?;
            dqs.push(ds.f_matmul(&ke)?.f_mul(&scale_t)?);
            dk = Math::accumulate(dk, ds.f_transpose(-2, -1)?.f_matmul(&qb)?.f_mul(&scale_t)?)?;
        }
        let fold = |x: Option<Tensor>| -> Result<Tensor> {
            // Runs never have empty query blocks (the planner skips segments without query rows).
            let x = x.ok_or_else(|| tch::TchError::Shape("math kernel: a run with no query rows".into()))?;
            let s = x.size();
            if hq == hkv {
                return Ok(x);
            }
            x.f_view([s[0], hkv, hq / hkv, s[2], s[3]])?.f_sum_dim_intlist(&[2i64][..], false, None::<Kind>)
        };
        let dq = if dqs.len() == 1 { dqs.pop().unwrap() } else { Tensor::f_cat(&dqs, 2)? };
        Ok((dq, fold(dk)?, fold(dv)?))
    }
}
