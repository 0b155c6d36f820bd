//! The plan on the inputs' device: the segment tables every attention layer uses, made with one host→device copy
//! and reused by every layer, forward and backward. Host integers (max lengths, runs) stay on the host, so no layer
//! ever reads a device value back. Making one has no effect on process state: how its calls are tuned
//! (`Tuning`) is decided by `policy::observe` and handed in.

use crate::seam::{Padding, Result, Segments};
use planner::{runs_from_lengths, Plan, Run, WindowKeys};
use tch::{Device, Kind, Tensor};

/// `cpu` or `cuda:N`, as torch prints devices.
pub fn device_name(d: Device) -> String {
    match d {
        Device::Cpu => "cpu".into(),
        Device::Cuda(i) => format!("cuda:{i}"),
        other => format!("{other:?}"),
    }
}

/// The attention calls of a full-attention layer (see `executor`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Call {
    /// Each prefix over itself, causally.
    Prefix,
    /// Every completion token of a group over the group's whole prefix.
    Group,
    /// Each completion over itself, causally.
    Completion,
    /// `Prefix` and `Completion` as one causal call over the whole stream.
    SelfCalls,
}

impl Call {
    pub const ALL: [Call; 4] = [Call::Prefix, Call::Group, Call::Completion, Call::SelfCalls];

    pub fn name(self) -> &'static str {
        match self {
            Call::Prefix => "prefix",
            Call::Group => "completions_x_prefix",
            Call::Completion => "completions",
            Call::SelfCalls => "prefix+completions",
        }
    }

    /// Causal self-attention within each segment (the calls whose tail may be padded).
    pub fn is_self(self) -> bool {
        self != Call::Group
    }
}

/// How the kernel policy tuned a plan's calls when the plan was made, fixed for its lifetime so that its
/// forward and backward choose alike. The default is untuned: no cuDNN, no padding.
#[derive(Clone, Copy, Debug, Default)]
pub struct Tuning {
    /// Per `Call`: whether its dense shape recurred often enough for cuDNN.
    pub recurring: [bool; 4],
    /// The causal self-attention calls' tail padding.
    pub padding: Padding,
}

pub struct DevicePlan {
    pub host: Plan,
    pub device: Device,
    pub tuning: Tuning,
    cu: [Tensor; 4],
    runs: [Vec<Run>; 4],
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
    /// The plan's tables on `device`, and `extra` (other host index vectors its caller needs there) in the same
    /// host→device copy. `windows`: the sliding windows of the model's layers; those shorter than the longest row
    /// get key tables, longer ones never cut a row and their layers take the plain path.
    pub fn new(host: Plan, device: Device, windows: &[usize], extra: &[&[i64]]) -> Result<(DevicePlan, Vec<Tensor>)> {
        let max_seqlen = host.max_seqlen();
        let mut wanted: Vec<usize> = windows.iter().copied().filter(|&w| w < max_seqlen).collect();
        wanted.sort_unstable();
        wanted.dedup();
        let keys: Vec<WindowKeys> = wanted.iter().map(|&w| host.window_keys(w)).collect();
        let cu_self = host.cu_self();
        let tables: [&[i32]; 4] = [&host.cu_prefix, &host.cu_group_completions, &host.cu_completions, &cu_self];
        let mut buf: Vec<i64> = Vec::new();
        for part in extra {
            buf.extend_from_slice(part);
        }
        for table in tables {
            buf.extend(table.iter().map(|&x| x as i64));
        }
        for w in &keys {
            buf.extend_from_slice(&w.gather);
            buf.extend(w.cu_k.iter().map(|&x| x as i64));
        }
        let all = Tensor::f_from_slice(&buf)?.f_to_device(device)?;
        let mut at = 0i64;
        let mut take = |n: usize| -> Result<Tensor> {
            let t = all.f_narrow(0, at, n as i64)?;
            at += n as i64;
            Ok(t)
        };
        let extra = extra.iter().map(|part| take(part.len())).collect::<Result<Vec<_>>>()?;
        let cu = [
            take(tables[0].len())?.f_to_kind(Kind::Int)?,
            take(tables[1].len())?.f_to_kind(Kind::Int)?,
            take(tables[2].len())?.f_to_kind(Kind::Int)?,
            take(tables[3].len())?.f_to_kind(Kind::Int)?,
        ];
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
        let runs = [
            runs_from_lengths(&host.cu_prefix, &host.cu_prefix),
            runs_from_lengths(&host.cu_group_completions, &host.cu_prefix),
            runs_from_lengths(&host.cu_completions, &host.cu_completions),
            runs_from_lengths(&cu_self, &cu_self),
        ];
        let plan = DevicePlan { host, device, tuning: Tuning::default(), cu, runs, windows: window_tables };
        Ok((plan, extra))
    }

    pub fn has_completions(&self) -> bool {
        self.host.completion_tokens > 0
    }

    /// The run structure of `call` (equal-length segments), what decides its dense shape.
    pub fn runs(&self, call: Call) -> &[Run] {
        &self.runs[call as usize]
    }

    /// The segments of `call` on a full-attention layer.
    pub fn segments(&self, call: Call) -> Segments<'_> {
        let h = &self.host;
        let (q, k, max_q, max_k) = match call {
            Call::Prefix => (0, 0, h.max_prefix, h.max_prefix),
            Call::Group => (1, 0, h.max_group_completions, h.max_prefix),
            Call::Completion => (2, 2, h.max_completion, h.max_completion),
            Call::SelfCalls => (3, 3, h.max_prefix.max(h.max_completion), h.max_prefix.max(h.max_completion)),
        };
        Segments {
            cu_q: &self.cu[q],
            cu_k: &self.cu[k],
            max_q,
            max_k,
            runs: &self.runs[call as usize],
            window: None,
            recurring: self.tuning.recurring[call as usize],
            padding: if call.is_self() { self.tuning.padding } else { Padding::NONE },
        }
    }

    /// The windows this plan holds key tables for.
    pub fn windows(&self) -> Vec<usize> {
        self.windows.iter().map(|w| w.window).collect()
    }

    pub fn window_tables(&self, window: usize) -> Option<&WindowTables> {
        self.windows.iter().find(|w| w.window == window)
    }

    /// Sliding-window layer, first call: each prefix attends causally to itself within the window.
    pub fn prefix_window(&self, window: usize) -> Segments<'_> {
        Segments { window: Some(window), recurring: false, padding: Padding::NONE, ..self.segments(Call::Prefix) }
    }

    /// Sliding-window layer, second call: each completion attends causally, within the window, to its key run
    /// (its prompt's tail, then itself).
    pub fn completion_window<'a>(&'a self, w: &'a WindowTables) -> Segments<'a> {
        Segments {
            cu_q: &self.cu[Call::Completion as usize],
            cu_k: &w.cu_k,
            max_q: self.host.max_completion,
            max_k: w.max_k,
            runs: &w.runs,
            window: Some(w.window),
            recurring: false,
            padding: Padding::NONE,
        }
    }
}
