//! The kernels of the torch ops `shared_prefix::attention_forward` and `shared_prefix::attention_backward`:
//! `csrc/ops.cpp` defines the ops, registers their CPU and CUDA kernels and their autograd, and its kernels call
//! `forward` and `backward` here through the C ABI (`shim::OpArgs`). Every input is checked here, each message
//! naming its argument; the sinks' math is here too, so that every caller of the ops gets the same attention.

use crate::device_plan::{device_name, DevicePlan};
use crate::policy::{self, NoBackend};
use crate::seam::Kernels;
use crate::{executor, handle};
use tch::{Kind, Tensor};

/// Why a call fails, as the Python exception the shim raises for it.
pub enum OpError {
    Type(String),
    Value(String),
    NotImplemented(String),
    Torch(tch::TchError),
}

impl From<NoBackend> for OpError {
    fn from(e: NoBackend) -> Self {
        match e {
            NoBackend::Type(m) => OpError::Type(m),
            NoBackend::Value(m) => OpError::Value(m),
            NoBackend::Device(m) => OpError::NotImplemented(m),
        }
    }
}

impl From<tch::TchError> for OpError {
    fn from(e: tch::TchError) -> Self {
        OpError::Torch(e)
    }
}

pub type OpResult<T> = std::result::Result<T, OpError>;

fn value(msg: String) -> OpError {
    OpError::Value(msg)
}

/// A call's scalar arguments, as the ops' schema gives them.
pub struct Options<'a> {
    pub scale: f64,
    pub kernels: Option<&'a str>,
    pub window: Option<i64>,
}

/// Check packed q/k/v against the plan.
fn check_qkv(q: &Tensor, k: &Tensor, v: &Tensor, plan: &DevicePlan) -> OpResult<()> {
    for (name, t) in [("q", q), ("k", k), ("v", v)] {
        if t.dim() != 3 {
            return Err(value(format!("{name}: expected a packed [T, H, D] tensor, got shape {:?}", t.size())));
        }
        if t.size()[0] as usize != plan.host.num_tokens() {
            return Err(value(format!(
                "{name}: has {} tokens but the plan packs {}",
                t.size()[0],
                plan.host.num_tokens()
            )));
        }
        if float_kind(t).is_none() {
            let kind = dtype_name(t);
            return Err(OpError::Type(format!("{name}: expected float16, bfloat16, float32 or float64, got {kind}")));
        }
        if t.kind() != q.kind() {
            return Err(OpError::Type(format!("{name}: dtype {:?} differs from q's {:?}", t.kind(), q.kind())));
        }
        if t.device() != plan.device {
            return Err(value(format!(
                "{name}: is on {} but the plan was made on {}",
                device_name(t.device()),
                device_name(plan.device)
            )));
        }
    }
    let (qs, ks, vs) = (q.size(), k.size(), v.size());
    if ks != vs {
        return Err(value(format!("v: shape {vs:?} differs from k's {ks:?}")));
    }
    if qs[2] != ks[2] {
        return Err(value(format!("k: head dim {} differs from q's {}", ks[2], qs[2])));
    }
    if qs[1] == 0 || qs[2] == 0 {
        return Err(value(format!("q: expected at least one head and a head dim >= 1, got shape {qs:?}")));
    }
    if ks[1] == 0 || qs[1] % ks[1] != 0 {
        return Err(value(format!(
            "k: {} key/value heads do not divide q's {} heads (GQA needs Hq % Hkv == 0)",
            ks[1], qs[1]
        )));
    }
    Ok(())
}

/// The tensor's dtype where the kernels take it (tch knows no kind for some of torch's dtypes, e.g. uint16).
fn float_kind(t: &Tensor) -> Option<Kind> {
    t.f_kind().ok().filter(|k| matches!(k, Kind::Half | Kind::BFloat16 | Kind::Float | Kind::Double))
}

fn dtype_name(t: &Tensor) -> String {
    t.f_kind().map(|k| format!("{k:?}")).unwrap_or_else(|_| "a dtype the kernels do not take".into())
}

fn check_scale(scale: f64) -> OpResult<()> {
    // ATen's CPU flash kernel returns NaN for scale <= 0; no attention layer uses one.
    if !scale.is_finite() || scale <= 0.0 {
        return Err(value(format!("scale: must be a finite positive number, got {scale}")));
    }
    Ok(())
}

fn check_sinks(sinks: Option<&Tensor>, q: &Tensor) -> OpResult<()> {
    match sinks {
        Some(s) if s.size() != [q.size()[1]] || s.device() != q.device() || float_kind(s).is_none() => {
            Err(value(format!(
                "sinks: expected a float [Hq] tensor on q's device (one logit per query head), got {:?} {} on {}",
                s.size(),
                dtype_name(s),
                device_name(s.device())
            )))
        }
        _ => Ok(()),
    }
}

/// The window a call applies: None for one that cuts no row (at least the plan's longest). Any other must be one
/// the plan was made with (its key tables live on the device already: building them here would copy host→device
/// inside a layer).
fn check_window(p: &DevicePlan, window: Option<i64>) -> OpResult<Option<usize>> {
    let window = match window {
        Some(w) if w < 1 => {
            return Err(value(format!("window: expected a positive int (a sliding window in tokens) or None, got {w}")))
        }
        w => w.map(|w| w as usize),
    };
    match window.filter(|&w| p.host.cuts(w)) {
        Some(w) if p.window_tables(w).is_none() => Err(value(format!(
            "window: the plan holds no key tables for a sliding window of {w} (it has {:?}); make the plan with \
             windows=[{w}, ...] (windows of at least the longest row, {}, need none)",
            p.windows(),
            p.host.max_seqlen()
        ))),
        cut => Ok(cut),
    }
}

/// The plan, the checked window and the kernels of a call on q/k/v (and sinks, checked too).
fn prepare(q: &Tensor, k: &Tensor, v: &Tensor, plan: &Tensor, sinks: Option<&Tensor>, o: &Options)
    -> OpResult<(std::sync::Arc<DevicePlan>, Option<usize>, &'static dyn Kernels)> {
    let p = handle::resolve(plan).map_err(|e| value(format!("plan: {e}")))?;
    check_qkv(q, k, v, &p)?;
    check_scale(o.scale)?;
    let window = check_window(&p, o.window)?;
    let kern = policy::backend(q, o.kernels, window)?;
    check_sinks(sinks, q)?;
    Ok((p, window, kern))
}

/// The op's forward: `(out [T, Hq, D], lse [T, Hq])`, both contiguous (as the ops' fake implementations say).
pub fn forward(q: &Tensor, k: &Tensor, v: &Tensor, plan: &Tensor, sinks: Option<&Tensor>, o: &Options)
    -> OpResult<(Tensor, Tensor)> {
    let (p, window, kern) = prepare(q, k, v, plan, sinks, o)?;
    let (out, lse) = executor::forward(kern, &p, q, k, v, o.scale, window, policy::split_self_calls(kern, &p))?;
    let (out, lse) = match sinks {
        None => (out, lse),
        // A sink is one more key per head with logit s_h and a zero value: it joins the softmax's denominator.
        // The kernels' backward with the final out/lse stays exact (the sink adds nothing to rowsum(dO∘O)).
        Some(s) => {
            let with_sink = lse.f_logaddexp(&s.f_to_kind(lse.kind())?)?;
            let weight = lse.f_sub(&with_sink)?.f_exp_()?.f_unsqueeze(-1)?;
            (out.f_to_kind(lse.kind())?.f_mul(&weight)?.f_to_kind(out.kind())?, with_sink)
        }
    };
    Ok((out.f_contiguous()?, lse.f_contiguous()?))
}

/// The op's backward: `(dq, dk, dv, dsinks)`, contiguous; `dsinks` is empty without sinks.
#[allow(clippy::too_many_arguments)]
pub fn backward(dout: &Tensor, q: &Tensor, k: &Tensor, v: &Tensor, out: &Tensor, lse: &Tensor, plan: &Tensor,
                sinks: Option<&Tensor>, o: &Options) -> OpResult<(Tensor, Tensor, Tensor, Tensor)> {
    let (p, window, kern) = prepare(q, k, v, plan, sinks, o)?;
    for (name, x) in [("dout", dout), ("out", out)] {
        if x.size() != q.size() || float_kind(x) != float_kind(q) || x.device() != q.device() {
            return Err(value(format!(
                "{name}: expected q's shape {:?} and dtype {} on q's device, got {:?} {}",
                q.size(),
                dtype_name(q),
                x.size(),
                dtype_name(x)
            )));
        }
    }
    let (t, hq) = (q.size()[0], q.size()[1]);
    let lse_kind = float_kind(lse);
    if lse.size() != [t, hq] || !matches!(lse_kind, Some(Kind::Float | Kind::Double)) || lse.device() != q.device() {
        return Err(value(format!(
            "lse: expected a float [{t}, {hq}] tensor on q's device (as attention_forward returns it), got {:?} {}",
            lse.size(),
            dtype_name(lse)
        )));
    }
    let split = policy::split_self_calls(kern, &p);
    let (dq, dk, dv) = executor::backward(kern, &p, dout, q, k, v, out, lse, o.scale, window, split)?;
    let dsinks = match sinks {
        None => Tensor::f_empty([0], (q.kind(), q.device()))?,
        // d s_h = -Σ_rows p_sink · rowsum(dO∘O), p_sink = e^(s_h - lse).
        Some(s) => {
            let acc = lse.kind();
            let row = dout.f_to_kind(acc)?.f_mul(&out.f_to_kind(acc)?)?.f_sum_dim_intlist(-1, false, acc)?;
            let p_sink = s.f_to_kind(acc)?.f_sub(lse)?.f_exp_()?;
            p_sink.f_mul(&row)?.f_sum_dim_intlist(0, false, acc)?.f_neg()?.f_to_kind(s.kind())?
        }
    };
    Ok((dq.f_contiguous()?, dk.f_contiguous()?, dv.f_contiguous()?, dsinks))
}
