//! The plan on the inputs' device: the segment tables every attention layer uses, made with one host→device copy
//! and reused by every layer, forward and backward. Host integers (max lengths, runs) stay on the host, so no layer
//! ever reads a device value back. Making one has no effect on process state: how its calls are tuned
//! (`Tuning`) is decided by `policy::observe` and handed in.

use crate::seam::{Padding, Result, Segments};
use planner::{max_segment, runs_from_lengths, Plan, Run, WindowKeys};
use tch::{Device, Kind, Tensor};

/// `cpu` or `cuda:N`, as torch prints devices.
pub fn device_name(d: Device) -> String {
    match d {
        Device::Cpu => "cpu".into(),
        Device::Cuda(i) => format!("cuda:{i}"),
        other => format!("{other:?}"),
    }
}

/// The attention calls of a full-attention layer (see `executor` and `planner::Layout`). Level 0 holds the
/// prefixes; in a one-level plan level 1 holds the completions.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Call {
    /// The nodes of one level, each over itself, causally.
    Level(u16),
    /// Each node of level `q` over its ancestor at level `k < q`, non-causally.
    Cross { k: u16, q: u16 },
    /// Every node over itself, causally: the `Level` calls as one call over the whole stream.
    SelfCalls,
}

impl Call {
    pub fn name(self) -> String {
        match self {
            Call::Level(0) => "prefix".into(),
            Call::Level(1) => "completions".into(),
            Call::Cross { k: 0, q: 1 } => "completions_x_prefix".into(),
            Call::SelfCalls => "prefix+completions".into(),
            Call::Level(d) => format!("level{d}"),
            Call::Cross { k, q } => format!("level{q}_x_level{k}"),
        }
    }

    /// Causal self-attention within each segment (the calls whose tail may be padded).
    pub fn is_self(self) -> bool {
        !matches!(self, Call::Cross { .. })
    }
}

/// How the kernel policy tuned a plan's calls when the plan was made, fixed for its lifetime so that its
/// forward and backward choose alike. The default is untuned: no cuDNN, no padding.
#[derive(Clone, Debug, Default)]
pub struct Tuning {
    /// Per call of `DevicePlan::all_calls`: whether its dense shape recurred often enough for cuDNN.
    pub recurring: Vec<bool>,
    /// The causal self-attention calls' tail padding.
    pub padding: Padding,
}

/// One call's operands: token ranges of the packed q (queries) and k/v (keys), and its segment tables.
struct CallTables {
    call: Call,
    q: (i64, i64),
    k: (i64, i64),
    cu_q: usize,
    cu_k: usize,
    max_q: usize,
    max_k: usize,
    runs: Vec<Run>,
}

pub struct DevicePlan {
    pub host: Plan,
    pub device: Device,
    pub tuning: Tuning,
    /// Segment tables on the device, indexed by `CallTables::cu_q`/`cu_k`.
    tables: Vec<Tensor>,
    calls: Vec<CallTables>,
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
    /// get key tables (plans of at most two levels), longer ones never cut a row and their layers take the plain
    /// path.
    pub fn new(host: Plan, device: Device, windows: &[usize], extra: &[&[i64]]) -> Result<(DevicePlan, Vec<Tensor>)> {
        let mut wanted: Vec<usize> = windows.iter().copied().filter(|&w| host.cuts(w)).collect();
        wanted.sort_unstable();
        wanted.dedup();
        let l = &host.layout;
        if !wanted.is_empty() && l.levels() > 2 {
            return Err(tch::TchError::Shape(format!(
                "sliding windows need a plan of at most two levels; this one has {}", l.levels())));
        }
        let keys: Vec<WindowKeys> = wanted.iter().map(|&w| host.window_keys(w)).collect();

        // Segment tables: the whole stream's nodes, each level's nodes, and each (ancestor, query level) pair's
        // query table.
        let levels = l.levels();
        let mut int_tables: Vec<Vec<i32>> = vec![l.cu_nodes.clone()];
        int_tables.extend((0..levels).map(|d| l.level_table(d)));
        let span = |d: usize| {
            let (s, e) = l.level_span(d);
            (s as i64, (e - s) as i64)
        };
        let table = |cu_q: usize, cu_k: usize, q: (i64, i64), k: (i64, i64), call: Call, tabs: &[Vec<i32>]| CallTables {
            call, q, k, cu_q, cu_k,
            max_q: max_segment(&tabs[cu_q]),
            max_k: max_segment(&tabs[cu_k]),
            runs: runs_from_lengths(&tabs[cu_q], &tabs[cu_k]),
        };
        let mut calls = Vec::new();
        let total = (0, l.num_tokens() as i64);
        calls.push(table(0, 0, total, total, Call::SelfCalls, &int_tables));
        for d in 0..levels {
            calls.push(table(1 + d, 1 + d, span(d), span(d), Call::Level(d as u16), &int_tables));
        }
        for d in 1..levels {
            for a in 0..d {
                int_tables.push(l.cross_table(a, d));
                let cu_q = int_tables.len() - 1;
                calls.push(table(cu_q, 1 + a, span(d), span(a), Call::Cross { k: a as u16, q: d as u16 }, &int_tables));
            }
        }
        let first_window_table = int_tables.len();
        int_tables.extend(keys.iter().map(|w| w.cu_k.clone()));

        // One host→device copy: the caller's vectors and the window gathers (i64), then every segment table,
        // converted to i32 in one op.
        let mut buf: Vec<i64> = Vec::new();
        for part in extra {
            buf.extend_from_slice(part);
        }
        for w in &keys {
            buf.extend_from_slice(&w.gather);
        }
        let wide = buf.len();
        for t in &int_tables {
            buf.extend(t.iter().map(|&x| x as i64));
        }
        let all = Tensor::f_from_slice(&buf)?.f_to_device(device)?;
        let ints = all.f_narrow(0, wide as i64, (buf.len() - wide) as i64)?.f_to_kind(Kind::Int)?;
        let mut at = 0i64;
        let mut take = |n: usize| -> Result<Tensor> {
            let t = all.f_narrow(0, at, n as i64)?;
            at += n as i64;
            Ok(t)
        };
        let extra = extra.iter().map(|part| take(part.len())).collect::<Result<Vec<_>>>()?;
        let gathers = keys.iter().map(|w| take(w.gather.len())).collect::<Result<Vec<_>>>()?;
        let mut at = 0i64;
        let mut tables = Vec::with_capacity(int_tables.len());
        for t in &int_tables {
            tables.push(ints.f_narrow(0, at, t.len() as i64)?);
            at += t.len() as i64;
        }
        let completions = if levels > 1 { l.level_table(1) } else { vec![0] };
        let window_tables = keys
            .into_iter()
            .zip(gathers)
            .enumerate()
            .map(|(i, (w, gather))| WindowTables {
                window: w.window,
                gather,
                cu_k: tables[first_window_table + i].shallow_clone(),
                max_k: w.max_k,
                runs: runs_from_lengths(&completions, &w.cu_k),
            })
            .collect();
        let plan = DevicePlan { host, device, tuning: Tuning::default(), tables, calls, windows: window_tables };
        Ok((plan, extra))
    }

    pub fn levels(&self) -> usize {
        self.host.layout.levels()
    }

    /// Token range (start, length) of level `d` in the packed stream.
    pub fn level(&self, d: usize) -> (i64, i64) {
        let (s, e) = self.host.layout.level_span(d);
        (s as i64, (e - s) as i64)
    }

    /// Every call a plan may run (the self calls fused and by level, and each cross call), in a fixed order.
    pub fn all_calls(&self) -> impl Iterator<Item = Call> + '_ {
        self.calls.iter().map(|c| c.call)
    }

    fn tables_of(&self, call: Call) -> &CallTables {
        self.calls.iter().find(|c| c.call == call).expect("a call of this plan")
    }


    /// The query and key token ranges (start, length) of `call` in the packed stream.
    pub fn operands(&self, call: Call) -> ((i64, i64), (i64, i64)) {
        let c = self.tables_of(call);
        (c.q, c.k)
    }

    /// The run structure of `call` (equal-length segments), what decides its dense shape.
    pub fn runs(&self, call: Call) -> &[Run] {
        &self.tables_of(call).runs
    }

    /// The segments of `call` on a full-attention layer.
    pub fn segments(&self, call: Call) -> Segments<'_> {
        let i = self.calls.iter().position(|c| c.call == call).expect("a call of this plan");
        let c = &self.calls[i];
        Segments {
            cu_q: &self.tables[c.cu_q],
            cu_k: &self.tables[c.cu_k],
            max_q: c.max_q,
            max_k: c.max_k,
            runs: &c.runs,
            window: None,
            recurring: self.tuning.recurring.get(i).copied().unwrap_or(false),
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

    /// Sliding-window layer, first call: each level-0 node attends causally to itself within the window.
    pub fn prefix_window(&self, window: usize) -> Segments<'_> {
        Segments { window: Some(window), recurring: false, padding: Padding::NONE, ..self.segments(Call::Level(0)) }
    }

    /// Sliding-window layer, second call: each level-1 node attends causally, within the window, to its key run
    /// (its parent's tail, then itself).
    pub fn completion_window<'a>(&'a self, w: &'a WindowTables) -> Segments<'a> {
        Segments {
            cu_k: &w.cu_k,
            max_k: w.max_k,
            runs: &w.runs,
            window: Some(w.window),
            recurring: false,
            padding: Padding::NONE,
            ..self.segments(Call::Level(1))
        }
    }
}
