//! Shared-prefix attention on packed q/k/v `[T, H, D]`: every node over itself causally (one call, or one per
//! level), every node over each of its ancestors (one call per pair of levels), the log-sum-exp merge and the exact
//! backward, on any backend behind the seam (`seam::Kernels`). A one-level plan runs DESIGN's three calls.

use crate::device_plan::{Call, DevicePlan, WindowTables};
use crate::seam::{contiguous_if, Kernels, Result, Saved};
use tch::{Kind, Tensor};

/// The calls a full-attention layer runs, in order: the self calls (by level when `split`, else as one), and for
/// each query level with tokens the cross calls over each of its ancestor levels. A one-level plan runs
/// `[prefix, completions_x_prefix, completions]` split, or `[prefix+completions, completions_x_prefix]`.
pub fn calls(p: &DevicePlan, split: bool) -> Vec<Call> {
    let mut out = Vec::new();
    if !split {
        out.push(Call::SelfCalls);
    }
    for d in 0..p.levels() {
        if p.level(d).1 == 0 {
            continue;
        }
        out.extend((0..d).map(|a| Call::Cross { k: a as u16, q: d as u16 }));
        if split {
            out.push(Call::Level(d as u16));
        }
    }
    out
}

/// Whether level 1 (a one-level plan's completions) has tokens.
fn has_level1(p: &DevicePlan) -> bool {
    p.levels() > 1 && p.level(1).1 > 0
}

/// `x` itself, or a token-major contiguous copy when the kernels need one layout for every operand or when its
/// last dimension is not unit-stride (a transposed or expanded view): the dense kernels read each head's D values
/// as one contiguous row, and ATen's CPU flash kernel returns garbage for such views.
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
/// (the input dtype) and `lse` (fp32, or fp64), which may be `o3` and `l3` themselves (a merge in place: every op
/// writes element by element where it reads, and the lse is written last). The weights are
/// e^(l2 - lse') = σ(l2 - l3) and e^(l3 - lse') = σ(l3 - l2). The fp16/bf16 partial outputs times the fp32 weights
/// promote to fp32 inside each op, so the merge is computed in fp32 without upcast copies and rounded once, on the
/// write. Nine dispatched ops: each one is host time in every layer.
fn merge_into(o2: &Tensor, l2: &Tensor, o3: &Tensor, l3: &Tensor, out: &Tensor, lse: &Tensor) -> Result<()> {
    let acc = lse.kind();
    let as_acc = |l: &Tensor| if l.kind() == acc { Ok(l.shallow_clone()) } else { l.f_to_kind(acc) };
    let (l2, l3) = (as_acc(l2)?, as_acc(l3)?);
    // Fallible ops throughout (tch's operators unwrap, so an out-of-memory error there would be a panic).
    let (l2u, l3u) = (l2.f_unsqueeze(-1)?, l3.f_unsqueeze(-1)?);
    let w2 = l2u.f_sub(&l3u)?.f_sigmoid_()?;
    let w3 = l3u.f_sub(&l2u)?.f_sigmoid_()?;
    let _ = o2.f_mul(&w2)?.f_addcmul_out(out, o3, &w3)?;
    let _ = l2.f_logaddexp_out(lse, &l3)?;
    Ok(())
}

fn split_at(x: &Tensor, n_prefix: i64) -> Result<(Tensor, Tensor)> {
    let total = x.size()[0];
    Ok((x.f_narrow(0, 0, n_prefix)?, x.f_narrow(0, n_prefix, total - n_prefix)?))
}

fn rows(x: &Tensor, (start, len): (i64, i64)) -> Result<Tensor> {
    x.f_narrow(0, start, len)
}

/// The plan's key tables for `window` (callers check that it has them).
fn tables(p: &DevicePlan, window: usize) -> Result<&WindowTables> {
    p.window_tables(window)
        .ok_or_else(|| tch::TchError::Shape(format!("the plan holds no key tables for sliding window {window}")))
}

/// Forward: returns `out [T, Hq, D]` and `lse [T, Hq]` (what backward needs). `window`: a sliding-window layer
/// (one the plan holds key tables for); otherwise the layer runs `calls(p, split)`: each query row's self call,
/// merged by log-sum-exp with its cross calls.
#[allow(clippy::too_many_arguments)]
pub fn forward(kern: &dyn Kernels, p: &DevicePlan, q: &Tensor, k: &Tensor, v: &Tensor, scale: f64,
               window: Option<usize>, split: bool) -> Result<(Tensor, Tensor)> {
    let (q, k, v) = (laid_out(kern, q)?, laid_out(kern, k)?, laid_out(kern, v)?);
    if let Some(w) = window {
        return forward_window(kern, p, &q, &k, &v, scale, tables(p, w)?);
    }
    let acc = accum_kind(q.kind());
    let calls = calls(p, split);
    let cross = |call: Call| -> Result<(Tensor, Tensor, (i64, i64))> {
        let (qs, ks) = p.operands(call);
        let (o, l) = kern.forward(&rows(&q, qs)?, &rows(&k, ks)?, &rows(&v, ks)?, &p.segments(call), false, scale)?;
        Ok((o, l, qs))
    };
    if !split {
        // The self call's output is final for rows without cross calls; the others are merged into it in place.
        let (out, lse) = kern.forward(&q, &k, &v, &p.segments(Call::SelfCalls), true, scale)?;
        let lse = lse.f_to_kind(acc)?;
        for &call in &calls[1..] {
            let (o2, l2, qs) = cross(call)?;
            let (o, l) = (rows(&out, qs)?, rows(&lse, qs)?);
            merge_into(&o2, &l2, &o, &l, &o, &l)?;
        }
        return Ok((out, lse));
    }
    if let [Call::Level(0)] = calls[..] {
        let (o1, l1) = kern.forward(&q, &k, &v, &p.segments(Call::Level(0)), true, scale)?;
        return Ok((o1, l1.f_to_kind(acc)?));
    }
    // One [T, Hq, D] output and one [T, Hq] lse; each level's rows are its self call's, merged with its cross
    // calls' (the first merge writes into place, the others merge in place).
    let (t, hq) = (q.size()[0], q.size()[1]);
    let out = Tensor::f_empty([t, hq, v.size()[2]], (q.kind(), q.device()))?;
    let lse = Tensor::f_empty([t, hq], (acc, q.device()))?;
    let mut pending: Vec<(Tensor, Tensor)> = Vec::new();
    for &call in &calls {
        match call {
            Call::Cross { .. } => {
                let (o2, l2, _) = cross(call)?;
                pending.push((o2, l2));
            }
            _ => {
                let d = p.operands(call).0;
                let (o, l) = kern.forward(&rows(&q, d)?, &rows(&k, d)?, &rows(&v, d)?, &p.segments(call), true, scale)?;
                let (out_d, lse_d) = (rows(&out, d)?, rows(&lse, d)?);
                let mut crosses = pending.drain(..);
                match crosses.next() {
                    None => {
                        out_d.shallow_clone().f_copy_(&o)?;
                        lse_d.shallow_clone().f_copy_(&l)?;
                    }
                    Some((o2, l2)) => merge_into(&o2, &l2, &o, &l, &out_d, &lse_d)?,
                }
                for (o2, l2) in crosses {
                    merge_into(&o2, &l2, &out_d, &lse_d, &out_d, &lse_d)?;
                }
            }
        }
    }
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
    split: bool,
) -> Result<(Tensor, Tensor, Tensor)> {
    let (q, k, v) = (laid_out(kern, q)?, laid_out(kern, k)?, laid_out(kern, v)?);
    let (dout, out) = (laid_out(kern, dout)?, laid_out(kern, out)?);
    if let Some(w) = window {
        return backward_window(kern, p, &dout, &q, &k, &v, &out, lse, scale, tables(p, w)?);
    }
    let calls = calls(p, split);
    // A call's backward sees the merged out/lse (and dO) of its query rows.
    let saved = |call: Call| -> Result<[Tensor; 6]> {
        let (qs, ks) = p.operands(call);
        Ok([rows(&dout, qs)?, rows(&q, qs)?, rows(&k, ks)?, rows(&v, ks)?, rows(&out, qs)?, rows(lse, qs)?])
    };
    let run = |call: Call| -> Result<(Tensor, Tensor, Tensor)> {
        let [dout, q, k, v, out, lse] = saved(call)?;
        let s = Saved { dout: &dout, q: &q, k: &k, v: &v, out: &out, lse: &lse };
        kern.backward(&s, &p.segments(call), call.is_self(), scale)
    };
    let self_calls: Vec<Call> = calls.iter().copied().filter(|c| c.is_self()).collect();
    let (dq, dk, dv) = match &self_calls[..] {
        [one] => run(*one)?,
        levels => {
            let mut parts = (Vec::new(), Vec::new(), Vec::new());
            for &call in levels {
                let (dq, dk, dv) = run(call)?;
                parts.0.push(dq);
                parts.1.push(dk);
                parts.2.push(dv);
            }
            (Tensor::f_cat(&parts.0, 0)?, Tensor::f_cat(&parts.1, 0)?, Tensor::f_cat(&parts.2, 0)?)
        }
    };
    // The cross calls' gradients, added onto the fresh ones in place.
    for &call in calls.iter().filter(|c| !c.is_self()) {
        let (dq2, dk2, dv2) = run(call)?;
        let (qs, ks) = p.operands(call);
        let _ = rows(&dq, qs)?.f_add_(&dq2)?;
        let _ = rows(&dk, ks)?.f_add_(&dk2)?;
        let _ = rows(&dv, ks)?.f_add_(&dv2)?;
    }
    Ok((dq, dk, dv))
}

/// A sliding-window layer in two calls and no merge: each prefix causally within the window, and each completion
/// causally within the window over its own key run (its prompt's last `w - 1` tokens, gathered, then itself;
/// see `planner::WindowKeys`), aligned bottom-right so that its token j sees stock positions P+j-w+1 ..= P+j.
fn forward_window(kern: &dyn Kernels, p: &DevicePlan, q: &Tensor, k: &Tensor, v: &Tensor, scale: f64,
                  w: &WindowTables) -> Result<(Tensor, Tensor)> {
    let np = p.level(0).1;
    let acc = accum_kind(q.kind());
    let ((qp, qc), (kp, _), (vp, _)) = (split_at(q, np)?, split_at(k, np)?, split_at(v, np)?);
    let (o1, l1) = kern.forward(&qp, &kp, &vp, &p.prefix_window(w.window), true, scale)?;
    if !has_level1(p) {
        return Ok((o1, l1.f_to_kind(acc)?));
    }
    let (kw, vw) = (k.f_index_select(0, &w.gather)?, v.f_index_select(0, &w.gather)?);
    let (o2, l2) = kern.forward(&qc, &kw, &vw, &p.completion_window(w), true, scale)?;
    Ok((Tensor::f_cat(&[o1, o2], 0)?, Tensor::f_cat(&[l1.f_to_kind(acc)?, l2.f_to_kind(acc)?], 0)?))
}

/// Backward of `forward_window`: the gathered key rows' gradients are added back onto the prompt rows they came
/// from (a prompt token's keys serve its own prefix and up to `w - 1` positions into every completion of its
/// group), summed in fp32 (fp64) and rounded once.
#[allow(clippy::too_many_arguments)]
fn backward_window(kern: &dyn Kernels, p: &DevicePlan, dout: &Tensor, q: &Tensor, k: &Tensor, v: &Tensor,
                   out: &Tensor, lse: &Tensor, scale: f64, w: &WindowTables) -> Result<(Tensor, Tensor, Tensor)> {
    let np = p.level(0).1;
    let ((qp, qc), (kp, _), (vp, _)) = (split_at(q, np)?, split_at(k, np)?, split_at(v, np)?);
    let ((dop, doc), (op, oc), (lp, lc)) = (split_at(dout, np)?, split_at(out, np)?, split_at(lse, np)?);
    let call1 = Saved { dout: &dop, q: &qp, k: &kp, v: &vp, out: &op, lse: &lp };
    let (dq1, dk1, dv1) = kern.backward(&call1, &p.prefix_window(w.window), true, scale)?;
    if !has_level1(p) {
        return Ok((dq1, dk1, dv1));
    }
    let (kw, vw) = (k.f_index_select(0, &w.gather)?, v.f_index_select(0, &w.gather)?);
    let call2 = Saved { dout: &doc, q: &qc, k: &kw, v: &vw, out: &oc, lse: &lc };
    let (dq2, dkw, dvw) = kern.backward(&call2, &p.completion_window(w), true, scale)?;
    let acc = accum_kind(k.kind());
    let scatter = |d1: &Tensor, dw: &Tensor, like: &Tensor| -> Result<Tensor> {
        let rest = like.size()[0] - np;
        let shape = [rest, like.size()[1], like.size()[2]];
        let full = Tensor::f_cat(&[d1.f_to_kind(acc)?, Tensor::f_zeros(shape, (acc, like.device()))?], 0)?;
        full.f_index_add(0, &w.gather, &dw.f_to_kind(acc)?)?.f_to_kind(like.kind())
    };
    Ok((Tensor::f_cat(&[dq1, dq2], 0)?, scatter(&dk1, &dkw, k)?, scatter(&dv1, &dvw, v)?))
}
