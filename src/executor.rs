//! Shared-prefix attention on packed q/k/v `[T, H, D]`: DESIGN's three calls, the log-sum-exp merge and the exact
//! backward. Backends only supply varlen attention kernels that return (and accept) the log-sum-exp; everything
//! else here is shared, so the CPU tests exercise the same merge and backward the CUDA path runs.

use crate::device_plan::{DevicePlan, WindowTables};
use planner::Run;
use std::sync::atomic::{AtomicU8, Ordering};
use tch::{Kind, Tensor};

pub type Result<T> = std::result::Result<T, tch::TchError>;

/// One attention call's segments: the device tables (flash-attention convention) and the host view of them.
pub struct Segments<'a> {
    pub cu_q: &'a Tensor,
    pub cu_k: &'a Tensor,
    pub max_q: usize,
    pub max_k: usize,
    /// Consecutive equal-length segments, for kernels that take dense batches.
    pub runs: &'a [Run],
    /// A sliding window (causal calls only): each query sees itself and the `w - 1` keys before it, with queries
    /// aligned to the last keys of their segment (bottom-right, as flash kernels align causal attention).
    pub window: Option<usize>,
    /// Whether this call's dense shape (one run) recurred in enough earlier plans to be worth a cuDNN graph
    /// (`device_plan::CUDNN_AFTER`); decided when the plan was made.
    pub recurring: bool,
    /// Causal self-attention calls only: dense kernels pad each run of segments at the tail to a multiple of this
    /// many rows (0: none; `device_plan::CUDNN_BUCKET`), so that nearby lengths share one cuDNN graph.
    pub bucket: usize,
}

/// What one attention call's backward takes: the incoming gradient, the call's inputs, and the *final* (merged)
/// `out` and `lse` of its query rows (views of the packed tensors, `[rows, H, D]` and `[rows, H]`).
pub struct Saved<'a> {
    pub dout: &'a Tensor,
    pub q: &'a Tensor,
    pub k: &'a Tensor,
    pub v: &'a Tensor,
    pub out: &'a Tensor,
    pub lse: &'a Tensor,
}

/// The backend seam. `out` is `[Tq, Hq, D]` in the input dtype; `lse` is `[Tq, Hq]` (fp32, or fp64 for fp64).
/// Rows of segments with no keys never occur (every completion sees its prompt, prompts are non-empty).
pub trait Kernels {
    fn forward(&self, q: &Tensor, k: &Tensor, v: &Tensor, seg: &Segments, causal: bool, scale: f64)
        -> Result<(Tensor, Tensor)>;

    /// Gradients of this call's q, k, v given the final (merged) `out` and `lse` of its query rows.
    fn backward(&self, s: &Saved, seg: &Segments, causal: bool, scale: f64) -> Result<(Tensor, Tensor, Tensor)>;

    /// Whether every `[T, H, D]` operand must be token-major contiguous, so that all of them (q, k, v, out, dO)
    /// reach the kernel in one layout. Callers may pass q/k/v in any layout (transformers' come token-major
    /// after RoPE; a head-major view is just as valid); kernels that take strided views but need one layout for
    /// all operands say so.
    fn token_major(&self) -> bool {
        false
    }

    /// Whether the prefixes' causal call (`prefix`) should run on its own, as DESIGN's call 1. Otherwise calls 1
    /// and 3 run as one causal call over the whole stream (`DevicePlan::seg_self`): for a varlen kernel one launch
    /// instead of two in forward and in backward, no copy of the prefix rows' output, and gradients added in
    /// place instead of concatenated. Kernels that run per run of equal segments gain nothing from it (the same
    /// calls, plus concatenations), nor do kernels faster on the prefix alone.
    fn prefix_alone(&self, _prefix: &Segments) -> bool {
        false
    }
}

/// How calls 1 and 3 run: as the kernels prefer (`SELF_CALLS_AUTO`, the default), always apart (`SELF_CALLS_SPLIT`)
/// or always as one (`SELF_CALLS_FUSED`). The forced modes let the CPU tests cover both executor paths with every
/// kernel and the bench measure one against the other.
pub static SELF_CALLS: AtomicU8 = AtomicU8::new(SELF_CALLS_AUTO);
pub const SELF_CALLS_AUTO: u8 = 0;
pub const SELF_CALLS_SPLIT: u8 = 1;
pub const SELF_CALLS_FUSED: u8 = 2;

pub fn self_calls_split(kern: &dyn Kernels, p: &DevicePlan) -> bool {
    match SELF_CALLS.load(Ordering::Relaxed) {
        SELF_CALLS_SPLIT => true,
        SELF_CALLS_FUSED => false,
        _ => kern.prefix_alone(&p.seg_prefix()),
    }
}

/// A contiguous copy of `x` when `yes` (a no-op if it already is), else `x` itself. Fallible: the copy may run
/// out of memory, which must reach Python as an exception (tch's `contiguous` would panic).
pub fn contiguous_if(yes: bool, x: &Tensor) -> Result<Tensor> {
    if yes { x.f_contiguous() } else { Ok(x.shallow_clone()) }
}

/// `x` itself, or a token-major contiguous copy when the kernels need one layout for every operand or when its
/// last dimension is not unit-stride (a transposed or expanded view): the dense kernels read each head's D values
/// as one contiguous row, and ATen's CPU flash kernel returned garbage for such views (found by fuzzing).
fn laid_out(kern: &dyn Kernels, x: &Tensor) -> Result<Tensor> {
    contiguous_if(kern.token_major() || x.stride().last().is_some_and(|&s| s != 1), x)
}

/// The dtype the merge computes in: fp32, or fp64 for fp64 inputs.
fn accum_kind(kind: Kind) -> Kind {
    if kind == Kind::Double {
        Kind::Double
    } else {
        Kind::Float
    }
}

/// Combine two partial attentions over disjoint key sets into the attention over their union, written into `out`
/// (the input dtype) and `lse` (fp32, or fp64), which may be `o3` and `l3` themselves (a merge in place: the
/// output is written element by element where it is read; the lse goes through a temporary). The fp16/bf16 partial
/// outputs times the fp32 weights promote to fp32 inside each op, so the merge is computed in fp32 without upcast
/// copies and rounded once, on the write.
fn merge_into(o2: &Tensor, l2: &Tensor, o3: &Tensor, l3: &Tensor, out: &Tensor, lse: &Tensor) -> Result<()> {
    let acc = lse.kind();
    let (l2, l3) = (l2.f_to_kind(acc)?, l3.f_to_kind(acc)?);
    // Fallible ops throughout (tch's operators unwrap, so an out-of-memory error there would be a panic).
    // In place, l3 is needed after the merged lse is known: that goes to a temporary first and is copied in last.
    let in_place = lse.data_ptr() == l3.data_ptr();
    let merged = if in_place { l2.f_logaddexp(&l3)? } else { l2.f_logaddexp_out(lse, &l3)? };
    let w2 = l2.f_sub(&merged)?.f_exp_()?.f_unsqueeze(-1)?;
    let w3 = l3.f_sub(&merged)?.f_exp_()?.f_unsqueeze(-1)?;
    let _ = o2.f_mul(&w2)?.f_addcmul_out(out, o3, &w3)?;
    if in_place {
        lse.shallow_clone().f_copy_(&merged)?;
    }
    Ok(())
}

fn split(x: &Tensor, n_prefix: i64) -> Result<(Tensor, Tensor)> {
    let total = x.size()[0];
    Ok((x.f_narrow(0, 0, n_prefix)?, x.f_narrow(0, n_prefix, total - n_prefix)?))
}

/// The plan's key tables for `window` (callers check that it has them).
fn tables(p: &DevicePlan, window: usize) -> Result<&WindowTables> {
    p.window_tables(window)
        .ok_or_else(|| tch::TchError::Shape(format!("the plan holds no key tables for sliding window {window}")))
}

/// Forward: returns `out [T, Hq, D]` and `lse [T, Hq]` (what backward needs). `window`: a sliding-window layer
/// (one the plan holds key tables for).
pub fn forward(kern: &dyn Kernels, p: &DevicePlan, q: &Tensor, k: &Tensor, v: &Tensor, scale: f64,
               window: Option<usize>) -> Result<(Tensor, Tensor)> {
    let np = p.host.prefix_tokens as i64;
    let (q, k, v) = (laid_out(kern, q)?, laid_out(kern, k)?, laid_out(kern, v)?);
    if let Some(w) = window {
        return forward_window(kern, p, &q, &k, &v, scale, tables(p, w)?);
    }
    let ((qp, qc), (kp, kc), (vp, vc)) = (split(&q, np)?, split(&k, np)?, split(&v, np)?);
    let acc = accum_kind(q.kind());
    if !self_calls_split(kern, p) {
        // Calls 1 and 3 as one: the prefix rows' results are final; call 2 is merged into the completion rows.
        let (out, lse) = kern.forward(&q, &k, &v, &p.seg_self(), true, scale)?;
        let lse = lse.f_to_kind(acc)?;
        if p.host.completion_tokens > 0 {
            let (o2, l2) = kern.forward(&qc, &kp, &vp, &p.seg_group(), false, scale)?;
            let ((_, oc), (_, lc)) = (split(&out, np)?, split(&lse, np)?);
            merge_into(&o2, &l2, &oc, &lc, &oc, &lc)?;
        }
        return Ok((out, lse));
    }
    let (o1, l1) = kern.forward(&qp, &kp, &vp, &p.seg_prefix(), true, scale)?;
    if p.host.completion_tokens == 0 {
        return Ok((o1, l1.f_to_kind(acc)?));
    }
    let (o2, l2) = kern.forward(&qc, &kp, &vp, &p.seg_group(), false, scale)?;
    let (o3, l3) = kern.forward(&qc, &kc, &vc, &p.seg_completion(), true, scale)?;
    // One [T, Hq, D] output and one [T, Hq] lse: prefix rows copied in, completion rows merged in place.
    let (t, hq) = (q.size()[0], q.size()[1]);
    let out = Tensor::f_empty([t, hq, v.size()[2]], (o1.kind(), o1.device()))?;
    let lse = Tensor::f_empty([t, hq], (acc, o1.device()))?;
    out.f_narrow(0, 0, np)?.f_copy_(&o1)?;
    lse.f_narrow(0, 0, np)?.f_copy_(&l1)?;
    merge_into(&o2, &l2, &o3, &l3, &out.f_narrow(0, np, t - np)?, &lse.f_narrow(0, np, t - np)?)?;
    Ok((out, lse))
}

/// Exact backward: each call's kernel backward runs with the merged `out`/`lse` of the rows it served, then the
/// pieces add up. Exact because the softmax probabilities and rowsum(dO∘O) depend only on merged quantities.
#[allow(clippy::too_many_arguments)]
pub fn backward(
    kern: &dyn Kernels,
    p: &DevicePlan,
    dout: &Tensor,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    out: &Tensor,
    lse: &Tensor,
    scale: f64,
    window: Option<usize>,
) -> Result<(Tensor, Tensor, Tensor)> {
    let np = p.host.prefix_tokens as i64;
    let (q, k, v) = (laid_out(kern, q)?, laid_out(kern, k)?, laid_out(kern, v)?);
    let (dout, out) = (laid_out(kern, dout)?, laid_out(kern, out)?);
    if let Some(w) = window {
        return backward_window(kern, p, &dout, &q, &k, &v, &out, lse, scale, tables(p, w)?);
    }
    let ((qp, qc), (kp, kc), (vp, vc)) = (split(&q, np)?, split(&k, np)?, split(&v, np)?);
    let ((dop, doc), (op, oc), (lp, lc)) = (split(&dout, np)?, split(&out, np)?, split(lse, np)?);
    if !self_calls_split(kern, p) {
        let all = Saved { dout: &dout, q: &q, k: &k, v: &v, out: &out, lse };
        let (dq, dk, dv) = kern.backward(&all, &p.seg_self(), true, scale)?;
        if p.host.completion_tokens > 0 {
            // Call 2 (completion rows against their prefix keys) adds onto the fresh gradients in place.
            let call2 = Saved { dout: &doc, q: &qc, k: &kp, v: &vp, out: &oc, lse: &lc };
            let (dq2, dk2, dv2) = kern.backward(&call2, &p.seg_group(), false, scale)?;
            let _ = split(&dq, np)?.1.f_add_(&dq2)?;
            let _ = split(&dk, np)?.0.f_add_(&dk2)?;
            let _ = split(&dv, np)?.0.f_add_(&dv2)?;
        }
        return Ok((dq, dk, dv));
    }
    let call1 = Saved { dout: &dop, q: &qp, k: &kp, v: &vp, out: &op, lse: &lp };
    let (dq1, dk1, dv1) = kern.backward(&call1, &p.seg_prefix(), true, scale)?;
    if p.host.completion_tokens == 0 {
        return Ok((dq1, dk1, dv1));
    }
    // Calls 2 and 3 serve the same completion rows: both see the merged out/lse of those rows.
    let call2 = Saved { dout: &doc, q: &qc, k: &kp, v: &vp, out: &oc, lse: &lc };
    let call3 = Saved { k: &kc, v: &vc, ..call2 };
    let (dq2, dk2, dv2) = kern.backward(&call2, &p.seg_group(), false, scale)?;
    let (dq3, dk3, dv3) = kern.backward(&call3, &p.seg_completion(), true, scale)?;
    Ok((
        Tensor::f_cat(&[dq1, dq2.f_add(&dq3)?], 0)?,
        Tensor::f_cat(&[dk1.f_add(&dk2)?, dk3], 0)?,
        Tensor::f_cat(&[dv1.f_add(&dv2)?, dv3], 0)?,
    ))
}

/// A sliding-window layer in two calls and no merge: each prefix causally within the window, and each completion
/// causally within the window over its own key run (its prompt's last `w - 1` tokens, gathered, then itself;
/// see `planner::WindowKeys`), aligned bottom-right so that its token j sees stock positions P+j-w+1 ..= P+j.
fn forward_window(kern: &dyn Kernels, p: &DevicePlan, q: &Tensor, k: &Tensor, v: &Tensor, scale: f64,
                  w: &WindowTables) -> Result<(Tensor, Tensor)> {
    let np = p.host.prefix_tokens as i64;
    let acc = accum_kind(q.kind());
    let ((qp, qc), (kp, _), (vp, _)) = (split(q, np)?, split(k, np)?, split(v, np)?);
    let (o1, l1) = kern.forward(&qp, &kp, &vp, &p.seg_prefix_window(w.window), true, scale)?;
    if p.host.completion_tokens == 0 {
        return Ok((o1, l1.f_to_kind(acc)?));
    }
    let (kw, vw) = (k.f_index_select(0, &w.gather)?, v.f_index_select(0, &w.gather)?);
    let (o2, l2) = kern.forward(&qc, &kw, &vw, &p.seg_window(w), true, scale)?;
    Ok((Tensor::f_cat(&[o1, o2], 0)?, Tensor::f_cat(&[l1.f_to_kind(acc)?, l2.f_to_kind(acc)?], 0)?))
}

/// Backward of `forward_window`: the gathered key rows' gradients are added back onto the prompt rows they came
/// from (a prompt token's keys serve its own prefix and up to `w - 1` positions into every completion of its
/// group), summed in fp32 (fp64) and rounded once.
#[allow(clippy::too_many_arguments)]
fn backward_window(kern: &dyn Kernels, p: &DevicePlan, dout: &Tensor, q: &Tensor, k: &Tensor, v: &Tensor,
                   out: &Tensor, lse: &Tensor, scale: f64, w: &WindowTables) -> Result<(Tensor, Tensor, Tensor)> {
    let np = p.host.prefix_tokens as i64;
    let ((qp, qc), (kp, _), (vp, _)) = (split(q, np)?, split(k, np)?, split(v, np)?);
    let ((dop, doc), (op, oc), (lp, lc)) = (split(dout, np)?, split(out, np)?, split(lse, np)?);
    let call1 = Saved { dout: &dop, q: &qp, k: &kp, v: &vp, out: &op, lse: &lp };
    let (dq1, dk1, dv1) = kern.backward(&call1, &p.seg_prefix_window(w.window), true, scale)?;
    if p.host.completion_tokens == 0 {
        return Ok((dq1, dk1, dv1));
    }
    let (kw, vw) = (k.f_index_select(0, &w.gather)?, v.f_index_select(0, &w.gather)?);
    let call2 = Saved { dout: &doc, q: &qc, k: &kw, v: &vw, out: &oc, lse: &lc };
    let (dq2, dkw, dvw) = kern.backward(&call2, &p.seg_window(w), true, scale)?;
    let acc = accum_kind(k.kind());
    let scatter = |d1: &Tensor, dw: &Tensor, like: &Tensor| -> Result<Tensor> {
        let rest = like.size()[0] - np;
        let shape = [rest, like.size()[1], like.size()[2]];
        let full = Tensor::f_cat(&[d1.f_to_kind(acc)?, Tensor::f_zeros(shape, (acc, like.device()))?], 0)?;
        full.f_index_add(0, &w.gather, &dw.f_to_kind(acc)?)?.f_to_kind(like.kind())
    };
    Ok((Tensor::f_cat(&[dq1, dq2], 0)?, scatter(&dk1, &dkw, k)?, scatter(&dv1, &dvw, v)?))
}
