//! Attention written out with matmuls, softmax statistics and the textbook backward: a dense kernel
//! (`dense::Runs`) for any device and dtype. The CUDA fp32/fp64 path, the CPU path for sliding windows, and an
//! independent implementation the CPU tests check the others against.

use crate::dense::Dense;
use crate::seam::{Result, Saved};
use std::sync::atomic::{AtomicUsize, Ordering};
use tch::{Kind, Tensor};

/// Bytes of attention scores one block of query rows may take in the explicit-math kernel: queries are processed in
/// blocks so that the `[batch, Hq, rows, Lk]` score tensors (and the 3 temporaries of the same size) stay bounded
/// at any sequence length (unblocked, one fp32 score tensor of a 16k-token prompt with 14 heads is 15 GB).
static MATH_BLOCK_BYTES: AtomicUsize = AtomicUsize::new(256 << 20);

/// Sets the score budget per block of query rows (bytes); returns the previous one.
pub fn set_block_bytes(n: usize) -> usize {
    MATH_BLOCK_BYTES.swap(n, Ordering::Relaxed)
}

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
/// rounded once (in their own dtype every matmul, the softmax and the probabilities would round, several times
/// SDPA's error). fp32/fp64 run as they are.
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
