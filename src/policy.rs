//! Kernel policy: which backend runs each attention call, and every process-wide setting behind that choice.
//!
//! - `backend`: the kernels for some inputs, by name or by default (CPU: ATen's CPU flash kernel; CUDA fp16/bf16:
//!   `Auto`; CUDA fp32/fp64: explicit math; sliding windows: a kernel that takes one).
//! - `Auto`, per call: cuDNN (copy-free) for a call that is one dense batch of at least `CUDNN_MIN_KEYS` keys
//!   whose shape recurred in `cudnn_after` earlier plans; flash-attention 2 varlen otherwise. cuDNN's kernels are
//!   faster on long calls but it builds a graph for every new shape, which costs more than several steps' gain,
//!   and GRPO prompt lengths rarely repeat (measurements: docs/DESIGN-NOTES.md, "Kernel policy").
//! - `observe`: a new plan's `Tuning` (which of its calls recurred, the self calls' tail padding), fixed for its
//!   lifetime so its forward and backward choose alike. Counting the plan's shapes here is the one effect
//!   planning has on process state.
//! - `split_self_calls`: whether the prefixes' and the completions' causal calls run apart or as one.
//! - `auto_kernels`: what `Auto` runs for each call of a plan, from the executor's own call list.
//!
//! Kernel-internal state stays with its kernel: the explicit-math kernel's block budget (`math`) and the rank of
//! cuDNN's softmax statistics (`cudnn`).

use crate::cpu_flash::CpuFlash;
use crate::cudnn::CudnnDense;
use crate::dense::Runs;
use crate::device_plan::{Call, DevicePlan, Tuning};
use crate::executor;
use crate::flash::FlashKernels;
use crate::math::Math;
use crate::seam::{Kernels, Padding, Result, Saved, Segments};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, AtomicU8, AtomicUsize, Ordering};
use std::sync::Mutex;
use tch::{Device, Kind, Tensor};

/// Fewest keys of a call `Auto` gives to cuDNN; below it FA2 is as fast and builds nothing.
pub const CUDNN_MIN_KEYS: usize = 8192;

pub static FLASH: FlashKernels = FlashKernels;
pub static CUDNN: Runs<CudnnDense> = Runs(CudnnDense { contiguous: true });
pub static CUDNN_VIEWS: Runs<CudnnDense> = Runs(CudnnDense { contiguous: false });
pub static CPU_FLASH: Runs<CpuFlash> = Runs(CpuFlash);
pub static MATH: Runs<Math> = Runs(Math);
pub static AUTO: Auto = Auto;

// -- settings -------------------------------------------------------------------------------------------------

/// How the prefixes' and the completions' causal calls run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SelfCalls {
    /// As the kernels prefer (`Kernels::prefix_alone`).
    Auto = 0,
    /// Apart, as DESIGN's calls 1 and 3.
    Split = 1,
    /// As one call over the whole stream.
    Fused = 2,
}

static SELF_CALLS: AtomicU8 = AtomicU8::new(SelfCalls::Auto as u8);
static CUDNN_AFTER: AtomicU32 = AtomicU32::new(8);
static CUDNN_BUCKET: AtomicUsize = AtomicUsize::new(0);
static PAD_MIN_KEYS: AtomicUsize = AtomicUsize::new(CUDNN_MIN_KEYS);

/// Sets the self-call mode (read when a layer runs); returns the previous one.
pub fn set_self_calls(mode: SelfCalls) -> SelfCalls {
    match SELF_CALLS.swap(mode as u8, Ordering::Relaxed) {
        1 => SelfCalls::Split,
        2 => SelfCalls::Fused,
        _ => SelfCalls::Auto,
    }
}

/// Sets how many earlier plans of a call's dense shape `Auto` waits for before cuDNN (plans made afterwards);
/// returns the previous value. 0: at once. The default, 8, covers the 2-4 plans TRL and verl make of one
/// micro-batch (reference, old and policy log-probs, PPO epochs) with room to spare.
pub fn set_cudnn_after(plans: u32) -> u32 {
    CUDNN_AFTER.swap(plans, Ordering::Relaxed)
}

/// Sets the tail padding multiple of the causal self-attention calls on dense kernels (plans made afterwards;
/// 0: none); returns the previous value. Plans then count those calls' lengths by bucket, so nearby prompt
/// lengths share one shape and one cuDNN graph.
pub fn set_cudnn_bucket(tokens: usize) -> usize {
    CUDNN_BUCKET.swap(tokens, Ordering::Relaxed)
}

/// Sets the fewest keys a run needs to be padded (plans made afterwards; default `CUDNN_MIN_KEYS`: only calls
/// long enough for cuDNN gain from sharing a graph); returns the previous value. Tests lower it.
pub fn set_pad_min_keys(keys: usize) -> usize {
    PAD_MIN_KEYS.swap(keys, Ordering::Relaxed)
}

// -- the shapes earlier plans had -----------------------------------------------------------------------------

/// Per device, call and dense shape (segments, query length, key length) of a one-run call with enough keys for
/// cuDNN: how many plans made so far in this process had it. One entry per distinct long shape; past `SEEN_MAX`
/// entries, those that have not reached `cudnn_after` are dropped (they count up again if they recur).
type ShapeKey = (Device, Call, usize, usize, usize);
static SEEN: Mutex<Option<HashMap<ShapeKey, u32>>> = Mutex::new(None);
const SEEN_MAX: usize = 1 << 16;

/// Forgets every count (tests: the counts are process-wide).
pub fn forget_shapes() {
    *SEEN.lock().unwrap_or_else(|e| e.into_inner()) = None;
}

/// Whether `call` (`runs`, lengths as `padding` rounds them) recurs often enough for cuDNN, counting this plan.
fn recurring(device: Device, call: Call, runs: &[planner::Run], padding: Padding, after: u32) -> bool {
    let [r] = runs else { return false };
    if r.k_len < CUDNN_MIN_KEYS {
        return false;
    }
    // A poisoned lock only means another thread panicked while counting: the counts are still usable.
    let mut guard = SEEN.lock().unwrap_or_else(|e| e.into_inner());
    let seen = guard.get_or_insert_with(HashMap::new);
    if seen.len() >= SEEN_MAX {
        seen.retain(|_, c| *c >= after.max(1));
        if seen.len() >= SEEN_MAX {
            seen.clear();
        }
    }
    let key = (device, call, r.count, padding.rounded(r.q_len), padding.rounded(r.k_len));
    let count = seen.entry(key).or_insert(0);
    let before = *count;
    *count = count.saturating_add(1);
    before >= after
}

/// A new plan's tuning under the current settings; counts its shapes.
pub fn observe(plan: &DevicePlan) -> Tuning {
    let padding = Padding { multiple: CUDNN_BUCKET.load(Ordering::Relaxed), min_keys: PAD_MIN_KEYS.load(Ordering::Relaxed) };
    let after = CUDNN_AFTER.load(Ordering::Relaxed);
    let recurring_calls = plan
        .all_calls()
        .map(|call| {
            // Cross calls are never padded: their keys would be seen.
            let rounding = if call.is_self() { padding } else { Padding::NONE };
            recurring(plan.device, call, plan.runs(call), rounding, after)
        })
        .collect();
    Tuning { recurring: recurring_calls, padding }
}

// -- choices --------------------------------------------------------------------------------------------------

/// Whether the levels' causal calls run apart (one per level) for `kern` on `plan`, rather than as one.
pub fn split_self_calls(kern: &dyn Kernels, plan: &DevicePlan) -> bool {
    match SELF_CALLS.load(Ordering::Relaxed) {
        1 => true,
        2 => false,
        _ => kern.prefix_alone(&plan.segments(Call::Level(0))),
    }
}

/// The CUDA fp16/bf16 default: cuDNN or FA2 per call (see the module's notes). Its choice depends only on the
/// plan, so a call's forward and backward agree.
pub struct Auto;

impl Auto {
    pub fn cudnn(seg: &Segments) -> bool {
        // Sliding windows: FA2 takes them, cuDNN dense attention (as ATen exposes it) does not.
        seg.window.is_none() && seg.runs.len() <= 1 && seg.max_k >= CUDNN_MIN_KEYS && seg.recurring
    }

    fn pick(seg: &Segments) -> &'static dyn Kernels {
        if Self::cudnn(seg) { &CUDNN_VIEWS } else { &FLASH }
    }
}

impl Kernels for Auto {
    // The copy-free cuDNN calls need every operand in one layout, and `pick` comes after the executor lays them out:
    // token-major for all (q/k/v, out and dO). FA2 copies its operands to exactly that layout anyway.
    fn token_major(&self) -> bool {
        true
    }

    // A prefix that goes to cuDNN keeps its own call; otherwise FA2 takes it with the completions' in one call.
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

/// `(call, "cudnn" | "flash")` for each full-attention call `Auto` runs on `plan`, in the executor's order, under
/// the current self-call mode.
pub fn auto_kernels(plan: &DevicePlan) -> Vec<(String, &'static str)> {
    executor::calls(plan, split_self_calls(&AUTO, plan))
        .into_iter()
        .map(|call| (call.name(), if Auto::cudnn(&plan.segments(call)) { "cudnn" } else { "flash" }))
        .collect()
}

/// Why no backend fits; the bindings raise it as the named Python exception.
pub enum NoBackend {
    Type(String),
    Value(String),
    Device(String),
}

/// The kernels for `q` (`[T, H, D]`, already checked). `name` forces one: "cpu_flash", "math", "flash",
/// "cudnn", "cudnn_views" or "auto". `window`: a sliding-window layer, which needs a kernel that takes one.
pub fn backend(q: &Tensor, name: Option<&str>, window: Option<usize>) -> std::result::Result<&'static dyn Kernels, NoBackend> {
    let device = q.device();
    let half = matches!(q.kind(), Kind::Half | Kind::BFloat16);
    let name = match (name, device) {
        (Some(n), _) => n,
        (None, Device::Cpu) if window.is_some() => "math",
        (None, Device::Cpu) => "cpu_flash",
        (None, Device::Cuda(_)) if half => "auto",
        (None, Device::Cuda(_)) => "math",
        (None, other) => return Err(NoBackend::Device(format!("shared_prefix.attention: no backend for {other:?}"))),
    };
    if let (Some(w), "cpu_flash" | "cudnn" | "cudnn_views") = (window, name) {
        return Err(NoBackend::Value(format!(
            "kernels: {name:?} takes no sliding window (window={w}); use \"math\", or \"flash\"/\"auto\" on CUDA"
        )));
    }
    match (name, device) {
        ("math", _) => Ok(&MATH),
        ("cpu_flash", Device::Cpu) => Ok(&CPU_FLASH),
        ("flash" | "cudnn" | "cudnn_views" | "auto", Device::Cuda(_)) => {
            let d = q.size()[2];
            if !half {
                return Err(NoBackend::Type(format!("q: the {name} kernel takes fp16/bf16, got {:?}", q.kind())));
            }
            if d % 8 != 0 || d > 256 {
                return Err(NoBackend::Value(format!(
                    "q: head dim {d} is not supported by the CUDA {name} kernel (a multiple of 8, at most 256)"
                )));
            }
            Ok(match name {
                "flash" => &FLASH,
                "cudnn" => &CUDNN,
                "cudnn_views" => &CUDNN_VIEWS,
                _ => &AUTO,
            })
        }
        (n, _) => Err(NoBackend::Value(format!("kernels: {n:?} is not available on {}", crate::device_plan::device_name(device)))),
    }
}
