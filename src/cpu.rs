//! CPU kernels: ATen's flash attention for CPU, which returns the log-sum-exp, takes GQA natively, and accepts
//! strided inputs. Each run of equal-length consecutive segments is one batched call on a view of the packed
//! tensors (no copy, no padding).

use crate::executor::{Kernels, Result, Segments};
use planner::Run;
use tch::Tensor;

pub struct CpuKernels;

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

/// `[count, H, len, D]` → `[count * len, H, D]`.
fn unbatched(x: &Tensor) -> Result<Tensor> {
    let s = x.size();
    x.f_transpose(1, 2)?.f_reshape([s[0] * s[2], s[1], s[3]])
}

fn q_rows(r: &Run) -> (usize, usize) {
    (r.q_start, r.count * r.q_len)
}

impl Kernels for CpuKernels {
    fn forward(&self, q: &Tensor, k: &Tensor, v: &Tensor, seg: &Segments, causal: bool, scale: f64)
        -> Result<(Tensor, Tensor)> {
        let (mut outs, mut lses) = (Vec::with_capacity(seg.runs.len()), Vec::with_capacity(seg.runs.len()));
        for r in seg.runs {
            let (o, l) = Tensor::f_internal_scaled_dot_product_flash_attention_for_cpu(
                &batched(q, r.q_start, r.count, r.q_len)?,
                &batched(k, r.k_start, r.count, r.k_len)?,
                &batched(v, r.k_start, r.count, r.k_len)?,
                0.0,
                causal,
                None::<Tensor>,
                scale,
            )?;
            outs.push(unbatched(&o)?);
            let s = l.size();
            lses.push(l.f_transpose(1, 2)?.f_reshape([s[0] * s[2], s[1]])?);
        }
        // Runs tile the query rows in order (empty segments have no rows), so concatenation is the output.
        if outs.len() == 1 {
            return Ok((outs.pop().unwrap(), lses.pop().unwrap()));
        }
        Ok((Tensor::f_cat(&outs, 0)?, Tensor::f_cat(&lses, 0)?))
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
        // Keys no query of this call sees (a prompt whose group has no completion tokens) get zero gradient.
        let dq = q.f_zeros_like()?;
        let dk = k.f_zeros_like()?;
        let dv = v.f_zeros_like()?;
        for r in seg.runs {
            let (qs, _) = q_rows(r);
            let (g_q, g_k, g_v) = Tensor::f_internal_scaled_dot_product_flash_attention_for_cpu_backward(
                &batched(dout, qs, r.count, r.q_len)?,
                &batched(q, qs, r.count, r.q_len)?,
                &batched(k, r.k_start, r.count, r.k_len)?,
                &batched(v, r.k_start, r.count, r.k_len)?,
                &batched(out, qs, r.count, r.q_len)?,
                &batched_lse(lse, qs, r.count, r.q_len)?,
                0.0,
                causal,
                None::<Tensor>,
                scale,
            )?;
            let (qn, kn) = ((r.count * r.q_len) as i64, (r.count * r.k_len) as i64);
            dq.f_narrow(0, qs as i64, qn)?.f_copy_(&unbatched(&g_q)?)?;
            dk.f_narrow(0, r.k_start as i64, kn)?.f_copy_(&unbatched(&g_k)?)?;
            dv.f_narrow(0, r.k_start as i64, kn)?.f_copy_(&unbatched(&g_v)?)?;
        }
        Ok((dq, dk, dv))
    }
}
