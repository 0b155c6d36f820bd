//! Kernels that take dense `[batch, heads, len, dim]` inputs (`Dense`: CPU flash, explicit math, cuDNN),
//! applied run by run (`Runs`): each run of equal-length consecutive segments is one batched call on a view of
//! the packed tensors, with no gather and no padding unless the call's tuning asks for tail padding.

use crate::seam::{Kernels, Result, Saved, Segments};
use crate::shim;
use planner::Run;
use tch::Tensor;

/// Attention on dense batches. `lse` is `[batch, Hq, Lq]`; GQA (`Hkv < Hq`) must be supported.
/// `window`: a sliding window on a causal call (see `Segments::window`); kernels without one refuse it.
pub trait Dense: Sync {
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

/// `[count * len, H, D]` rows starting at `start` → `[count, H, len, D]` view (one dispatched op: each one is host
/// time on every call).
fn batched(x: &Tensor, start: usize, count: usize, len: usize) -> Result<Tensor> {
    let st = x.stride();
    let (count, len) = (count as i64, len as i64);
    let offset = shim::storage_offset(x) + start as i64 * st[0];
    x.f_as_strided([count, x.size()[1], len, x.size()[2]], [len * st[0], st[1], st[0], st[2]], offset)
}

/// `[count * len, H]` log-sum-exp rows → `[count, H, len]` view.
fn batched_lse(x: &Tensor, start: usize, count: usize, len: usize) -> Result<Tensor> {
    let st = x.stride();
    let (count, len) = (count as i64, len as i64);
    let offset = shim::storage_offset(x) + start as i64 * st[0];
    x.f_as_strided([count, x.size()[1], len], [len * st[0], st[1], st[0]], offset)
}

/// The length a causal self-attention run is padded to (`Segments::padding`), so that runs of nearby lengths share
/// one shape (one cuDNN graph). Tail padding is exact for such a run: no real query sees a key after it, and the
/// padded rows (zero q/k/v, zero dO and out, lse 0) add nothing to any gradient (their
/// dS = P∘(dO·Vᵀ - rowsum(dO∘O)) is 0). `None` when the run is not one, is short, or needs no padding.
fn padded_len(seg: &Segments, r: &Run, causal: bool) -> Option<usize> {
    let self_run = causal && seg.window.is_none() && r.q_start == r.k_start && r.q_len == r.k_len;
    let padded = seg.padding.rounded(r.q_len);
    (self_run && r.k_len >= seg.padding.min_keys && padded != r.q_len).then_some(padded)
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

/// `[count, H, len, ...]` → `[count * len, H, ...]`: one view where the rows are token-major (what the kernels
/// return), else a copy.
fn unbatched(x: &Tensor) -> Result<Tensor> {
    let (s, st) = (x.size(), x.stride());
    let mut shape = vec![s[0] * s[2], s[1]];
    shape.extend_from_slice(&s[3..]);
    if s[0] == 1 || st[0] == s[2] * st[2] {
        let mut strides = vec![st[2], st[1]];
        strides.extend_from_slice(&st[3..]);
        return x.f_as_strided(shape.as_slice(), strides.as_slice(), None);
    }
    x.f_transpose(1, 2)?.f_reshape(shape.as_slice())
}

impl<D: Dense> Kernels for Runs<D> {
    fn token_major(&self) -> bool {
        self.0.token_major()
    }

    // One kernel call per run either way: as one call, the self calls' runs would only add concatenations.
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

/// The error of a kernel asked for a sliding window it cannot apply (kernel selection never asks; a guard).
pub fn no_window(kernel: &str, window: Option<usize>) -> Result<()> {
    match window {
        Some(w) => Err(tch::TchError::Kind(format!("the {kernel} kernel takes no sliding window (window={w})"))),
        None => Ok(()),
    }
}
