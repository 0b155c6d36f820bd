//! The plan on the inputs' device: every index tensor the layers use, made with one host→device copy and reused
//! by every layer, forward and backward. Host integers (max lengths, runs) stay on the host, so no layer ever
//! reads a device value back.

use crate::cuda::CUDNN_MIN_KEYS;
use crate::executor::{Result, Segments};
use crate::runs::bucketed;
use planner::{runs_from_lengths, Plan, Run, WindowKeys};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::sync::Mutex;
use tch::{Device, Kind, Tensor};

/// The attention calls of a plan whose shape can recur (the sliding-window calls never go to cuDNN).
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
enum Call {
    Prefix,
    Group,
    Completion,
    SelfCalls,
}

/// How many earlier plans of the same dense shape a call needs before "auto" gives it to cuDNN (default 8; see
/// `AutoKernels` for the measurement behind it). 0: at once, as every eligible call did before 2026-11-27.
pub static CUDNN_AFTER: AtomicU32 = AtomicU32::new(8);

/// Pad the causal self-attention calls that run on dense kernels (cuDNN above all) to a multiple of this many rows
/// per segment, so that prompt lengths within one bucket share one cuDNN graph and count as one shape for
/// `CUDNN_AFTER` (0, the default: no padding). Experimental: measured on no GPU yet.
pub static CUDNN_BUCKET: AtomicUsize = AtomicUsize::new(0);

/// Per device, call and dense shape (segments, query length, key length) of a one-run call with enough keys for
/// cuDNN: how many plans made so far in this process had it. Only such calls are counted, one entry per distinct
/// long shape; past `SEEN_MAX` entries, those that have not reached `CUDNN_AFTER` are dropped (they count up
/// again if they recur).
type ShapeKey = (Device, Call, usize, usize, usize);
static SEEN: Mutex<Option<HashMap<ShapeKey, u32>>> = Mutex::new(None);
const SEEN_MAX: usize = 1 << 16;

/// Forget every count (tests: the counts are process-wide).
pub fn forget_shapes() {
    *SEEN.lock().unwrap_or_else(|e| e.into_inner()) = None;
}

/// Whether this plan's `call` recurs often enough for cuDNN: it is one dense batch (`runs`) with at least
/// `CUDNN_MIN_KEYS` keys, and at least `CUDNN_AFTER` earlier plans had the same one (its lengths rounded up to
/// `bucket`, the padding of the calls that get one; 0 for the others). Counts this plan.
fn recurring(device: Device, call: Call, runs: &[Run], bucket: usize) -> bool {
    let [r] = runs else { return false };
    if r.k_len < CUDNN_MIN_KEYS {
        return false;
    }
    let after = CUDNN_AFTER.load(Ordering::Relaxed);
    // A poisoned lock only means another thread panicked while counting: the counts are still usable.
    let mut guard = SEEN.lock().unwrap_or_else(|e| e.into_inner());
    let seen = guard.get_or_insert_with(HashMap::new);
    if seen.len() >= SEEN_MAX {
        seen.retain(|_, c| *c >= after.max(1));
        if seen.len() >= SEEN_MAX {
            seen.clear();
        }
    }
    let key = (device, call, r.count, bucketed(r.q_len, bucket), bucketed(r.k_len, bucket));
    let count = seen.entry(key).or_insert(0);
    let before = *count;
    *count = count.saturating_add(1);
    before >= after
}

pub struct DevicePlan {
    pub host: Plan,
    pub device: Device,
    pub src_index: Tensor,
    pub position_ids: Tensor,
    pub predictor: Tensor,
    pub completion_flat: Tensor,
    pub completion_slot: Tensor,
    pub cu_prefix: Tensor,
    pub cu_group_completions: Tensor,
    pub cu_completions: Tensor,
    /// Prefix segments then completion segments over the whole stream (`Plan::cu_self`).
    pub cu_self: Tensor,
    runs_prefix: Vec<Run>,
    runs_group: Vec<Run>,
    runs_completion: Vec<Run>,
    runs_self: Vec<Run>,
    /// Per `Call`: whether its dense shape recurred enough for cuDNN when this plan was made (see `recurring`).
    /// Fixed for the plan's lifetime, so its forward and backward choose alike.
    recurring: [bool; 4],
    /// `CUDNN_BUCKET` when this plan was made (the self-attention calls' padding), fixed for its lifetime.
    bucket: usize,
    windows: Vec<WindowTables>,
}

/// The completions' keys in a sliding-window layer (see `planner::WindowKeys`), on the device.
pub struct WindowTables {
    pub window: usize,
    /// Packed rows gathered into the per-completion key runs.
    pub gather: Tensor,
    cu_k: Tensor,
    max_k: usize,
    runs: Vec<Run>,
}

// SAFETY: the tensors are created once and only read afterwards (autograd may run backward on another thread);
// libtorch permits concurrent reads of a tensor.
unsafe impl Sync for DevicePlan {}

impl DevicePlan {
    /// `windows`: the sliding windows of the model's layers. Those shorter than the longest row get key tables
    /// (in the same host→device copy); longer ones never cut a row, and their layers take the plain path.
    pub fn new(host: Plan, device: Device, windows: &[usize]) -> Result<DevicePlan> {
        let max_seqlen = host.max_seqlen();
        let mut wanted: Vec<usize> = windows.iter().copied().filter(|&w| w < max_seqlen).collect();
        wanted.sort_unstable();
        wanted.dedup();
        let keys: Vec<WindowKeys> = wanted.iter().map(|&w| host.window_keys(w)).collect();
        let parts: [&[i64]; 5] = [
            &host.src_index,
            &host.position_ids,
            &host.predictor,
            &host.completion_flat,
            &host.completion_slot,
        ];
        let cu_self = host.cu_self();
        let cus: [&[i32]; 4] = [&host.cu_prefix, &host.cu_group_completions, &host.cu_completions, &cu_self];
        let mut buf: Vec<i64> = Vec::with_capacity(parts.iter().map(|p| p.len()).sum::<usize>() + 32);
        for p in parts {
            buf.extend_from_slice(p);
        }
        for c in cus {
            buf.extend(c.iter().map(|&x| x as i64));
        }
        for w in &keys {
            buf.extend_from_slice(&w.gather);
            buf.extend(w.cu_k.iter().map(|&x| x as i64));
        }
        // The one host→device copy of this plan.
        let all = Tensor::f_from_slice(&buf)?.f_to_device(device)?;
        let mut at = 0i64;
        let mut take = |n: usize| -> Result<Tensor> {
            let t = all.f_narrow(0, at, n as i64)?;
            at += n as i64;
            Ok(t)
        };
        let src_index = take(parts[0].len())?;
        let position_ids = take(parts[1].len())?;
        let predictor = take(parts[2].len())?;
        let completion_flat = take(parts[3].len())?;
        let completion_slot = take(parts[4].len())?;
        let cu_prefix = take(cus[0].len())?.f_to_kind(Kind::Int)?;
        let cu_group_completions = take(cus[1].len())?.f_to_kind(Kind::Int)?;
        let cu_completions = take(cus[2].len())?.f_to_kind(Kind::Int)?;
        let cu_self_t = take(cus[3].len())?.f_to_kind(Kind::Int)?;
        let mut window_tables = Vec::with_capacity(keys.len());
        for w in keys {
            window_tables.push(WindowTables {
                window: w.window,
                gather: take(w.gather.len())?,
                cu_k: take(w.cu_k.len())?.f_to_kind(Kind::Int)?,
                max_k: w.max_k,
                runs: runs_from_lengths(&host.cu_completions, &w.cu_k),
            });
        }
        let runs_prefix = runs_from_lengths(&host.cu_prefix, &host.cu_prefix);
        let runs_group = runs_from_lengths(&host.cu_group_completions, &host.cu_prefix);
        let runs_completion = runs_from_lengths(&host.cu_completions, &host.cu_completions);
        let runs_self = runs_from_lengths(&cu_self, &cu_self);
        let bucket = CUDNN_BUCKET.load(Ordering::Relaxed);
        let recurring = [
            recurring(device, Call::Prefix, &runs_prefix, bucket),
            recurring(device, Call::Group, &runs_group, 0),  // never padded: its keys would be seen
            recurring(device, Call::Completion, &runs_completion, bucket),
            recurring(device, Call::SelfCalls, &runs_self, bucket),
        ];
        Ok(DevicePlan {
            windows: window_tables,
            runs_prefix,
            runs_group,
            runs_completion,
            runs_self,
            recurring,
            bucket,
            host,
            device,
            src_index,
            position_ids,
            predictor,
            completion_flat,
            completion_slot,
            cu_prefix,
            cu_group_completions,
            cu_completions,
            cu_self: cu_self_t,
        })
    }

    /// Call 1: each prefix attends causally to itself.
    pub fn seg_prefix(&self) -> Segments<'_> {
        Segments {
            cu_q: &self.cu_prefix,
            cu_k: &self.cu_prefix,
            max_q: self.host.max_prefix,
            max_k: self.host.max_prefix,
            runs: &self.runs_prefix,
            window: None,
            recurring: self.recurring[Call::Prefix as usize],
            bucket: self.bucket,
        }
    }

    /// Call 2: all completion tokens of a group attend to the group's whole prefix.
    pub fn seg_group(&self) -> Segments<'_> {
        Segments {
            cu_q: &self.cu_group_completions,
            cu_k: &self.cu_prefix,
            max_q: self.host.max_group_completions,
            max_k: self.host.max_prefix,
            runs: &self.runs_group,
            window: None,
            recurring: self.recurring[Call::Group as usize],
            bucket: 0,
        }
    }

    /// Call 3: each completion attends causally to itself.
    pub fn seg_completion(&self) -> Segments<'_> {
        Segments {
            cu_q: &self.cu_completions,
            cu_k: &self.cu_completions,
            max_q: self.host.max_completion,
            max_k: self.host.max_completion,
            runs: &self.runs_completion,
            window: None,
            recurring: self.recurring[Call::Completion as usize],
            bucket: self.bucket,
        }
    }

    /// Calls 1 and 3 as one call: each prefix and each completion attends causally to itself (see
    /// `Plan::cu_self`), on the full packed q/k/v.
    pub fn seg_self(&self) -> Segments<'_> {
        let max = self.host.max_prefix.max(self.host.max_completion);
        Segments {
            cu_q: &self.cu_self,
            cu_k: &self.cu_self,
            max_q: max,
            max_k: max,
            runs: &self.runs_self,
            window: None,
            recurring: self.recurring[Call::SelfCalls as usize],
            bucket: self.bucket,
        }
    }

    /// The windows this plan holds key tables for.
    pub fn windows(&self) -> Vec<usize> {
        self.windows.iter().map(|w| w.window).collect()
    }

    pub fn window_tables(&self, window: usize) -> Option<&WindowTables> {
        self.windows.iter().find(|w| w.window == window)
    }

    /// Sliding-window layer, call 1: each prefix attends causally to itself within the window.
    pub fn seg_prefix_window(&self, window: usize) -> Segments<'_> {
        Segments { window: Some(window), recurring: false, bucket: 0, ..self.seg_prefix() }
    }

    /// Sliding-window layer, call 2 (the only other): each completion attends causally, within the window, to its
    /// key run (its prompt's tail, then itself).
    pub fn seg_window<'a>(&'a self, w: &'a WindowTables) -> Segments<'a> {
        Segments {
            cu_q: &self.cu_completions,
            cu_k: &w.cu_k,
            max_q: self.host.max_completion,
            max_k: w.max_k,
            runs: &w.runs,
            window: Some(w.window),
            recurring: false,
            bucket: 0,
        }
    }
}
