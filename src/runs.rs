//! Kernels that take dense `[batch, heads, len, dim]` inputs, applied run by run: each run of equal-length
//! consecutive segments is one batched call on a view of the packed tensors (no copy, no padding, exact).
//!
//! Two dense kernels: ATen's flash attention for CPU, and an explicit-math kernel that runs on any device and
//! dtype (the correct path for fp32/fp64 on CUDA, and an independent implementation the CPU tests check).

use crate::executor::{Kernels, Result, Saved, Segments};
use tch::{Kind, Tensor};

/// Attention on dense batches. `lse` is `[batch, Hq, Lq]`; GQA (`Hkv < Hq`) must be supported.
pub trait Dense {
    fn fwd(&self, q: &Tensor, k: &Tensor, v: &Tensor, causal: bool, scale: f64) -> Result<(Tensor, Tensor)>;
    /// `s` holds dense batches: `[batch, H, L, D]` tensors and `lse` `[batch, Hq, Lq]`.
    fn bwd(&self, s: &Saved, causal: bool, scale: f64) -> Result<(Tensor, Tensor, Tensor)>;

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

    fn forward(&self, q: &Tensor, k: &Tensor, v: &Tensor, seg: &Segments, causal: bool, scale: f64)
        -> Result<(Tensor, Tensor)> {
        let (mut outs, mut lses) = (Vec::with_capacity(seg.runs.len()), Vec::with_capacity(seg.runs.len()));
        for r in seg.runs {
            let (o, l) = self.0.fwd(
                &batched(q, r.q_start, r.count, r.q_len)?,
                &batched(k, r.k_start, r.count, r.k_len)?,
                &batched(v, r.k_start, r.count, r.k_len)?,
                causal,
                scale,
            )?;
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
        // Keys no query of this call sees (a prompt whose group has no completion tokens) get zero gradient.
        let (dq, dk, dv) = (s.q.f_zeros_like()?, s.k.f_zeros_like()?, s.v.f_zeros_like()?);
        for r in seg.runs {
            let rows = |x: &Tensor| batched(x, r.q_start, r.count, r.q_len);
            let keys = |x: &Tensor| batched(x, r.k_start, r.count, r.k_len);
            let (dout, q, k, v, out) = (rows(s.dout)?, rows(s.q)?, keys(s.k)?, keys(s.v)?, rows(s.out)?);
            let lse = batched_lse(s.lse, r.q_start, r.count, r.q_len)?;
            let batch = Saved { dout: &dout, q: &q, k: &k, v: &v, out: &out, lse: &lse };
            let (g_q, g_k, g_v) = self.0.bwd(&batch, causal, scale)?;
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

impl Dense for CpuFlash {
    fn fwd(&self, q: &Tensor, k: &Tensor, v: &Tensor, causal: bool, scale: f64) -> Result<(Tensor, Tensor)> {
        Tensor::f_internal_scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, causal, None::<Tensor>, scale)
    }

    fn bwd(&self, s: &Saved, causal: bool, scale: f64) -> Result<(Tensor, Tensor, Tensor)> {
        Tensor::f_internal_scaled_dot_product_flash_attention_for_cpu_backward(
            s.dout, s.q, s.k, s.v, s.out, s.lse, 0.0, causal, None::<Tensor>, scale,
        )
    }
}

/// Attention written out with matmuls, softmax statistics and the textbook backward. Any device, any float dtype;
/// memory O(batch · H · Lq · Lk) per run. K/V heads are expanded for GQA here (this path is not the fast one).
pub struct Math;

impl Math {
    fn expand_heads(x: &Tensor, hq: i64) -> Result<Tensor> {
        let h = x.size()[1];
        if h == hq { Ok(x.shallow_clone()) } else { x.f_repeat_interleave_self_int(hq / h, 1, None::<i64>) }
    }

    /// Scaled scores `[b, Hq, Lq, Lk]` with the causal mask applied (bottom-right aligned, as flash kernels do).
    fn scores(q: &Tensor, k: &Tensor, causal: bool, scale: f64) -> Result<Tensor> {
        let s = q.f_matmul(&k.f_transpose(-2, -1)?)? * scale;
        if !causal {
            return Ok(s);
        }
        let (lq, lk) = (q.size()[2], k.size()[2]);
        let future = Tensor::f_ones([lq, lk], (Kind::Bool, q.device()))?.f_triu(1 + lk - lq)?;
        s.f_masked_fill(&future, f64::NEG_INFINITY)
    }
}

impl Dense for Math {
    fn fwd(&self, q: &Tensor, k: &Tensor, v: &Tensor, causal: bool, scale: f64) -> Result<(Tensor, Tensor)> {
        let hq = q.size()[1];
        let (k, v) = (Math::expand_heads(k, hq)?, Math::expand_heads(v, hq)?);
        let s = Math::scores(q, &k, causal, scale)?;
        let lse = s.f_logsumexp(&[-1i64][..], false)?;
        let p = (s - lse.f_unsqueeze(-1)?).f_exp()?;
        Ok((p.f_matmul(&v)?, lse))
    }

    fn bwd(&self, s: &Saved, causal: bool, scale: f64) -> Result<(Tensor, Tensor, Tensor)> {
        let Saved { dout, q, k, v, out, lse } = *s;
        let (hq, hkv) = (q.size()[1], k.size()[1]);
        let (ke, ve) = (Math::expand_heads(k, hq)?, Math::expand_heads(v, hq)?);
        // P from the merged lse: the probabilities of this call's keys within the full softmax.
        let p = (Math::scores(q, &ke, causal, scale)? - lse.f_to_kind(q.kind())?.f_unsqueeze(-1)?).f_exp()?;
        let dv = p.f_transpose(-2, -1)?.f_matmul(dout)?;
        let dp = dout.f_matmul(&ve.f_transpose(-2, -1)?)?;
        let row = (dout * out).f_sum_dim_intlist(&[-1i64][..], true, None::<Kind>)?;
        let ds = p * (dp - row);
        let dq = ds.f_matmul(&ke)? * scale;
        let dk = ds.f_transpose(-2, -1)?.f_matmul(q)? * scale;
        let fold = |x: Tensor| -> Result<Tensor> {
            if hq == hkv {
                return Ok(x);
            }
            let s = x.size();
            x.f_view([s[0], hkv, hq / hkv, s[2], s[3]])?.f_sum_dim_intlist(&[2i64][..], false, None::<Kind>)
        };
        Ok((dq, fold(dk)?, fold(dv)?))
    }
}
