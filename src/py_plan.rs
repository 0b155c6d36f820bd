//! Bindings for planning: `make_plan` (a micro-batch), `make_compat_plan` (the original Prefix Grouper's grouped
//! layout) and `mask_positions`. A plan reaches Python as its handle (a tensor, what attention takes: see `handle`)
//! and a dict of what the Python `Plan` exposes; the Python side declares and documents those fields.

use crate::device_plan::DevicePlan;
use crate::{handle, policy};
use pyo3::exceptions::{PyRuntimeError, PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::PyDict;
use pyo3_tch::PyTensor;
use std::sync::Arc;
use tch::{Device, Kind, Tensor};

/// A libtorch error as the Python exception every binding raises for it (never a panic).
pub fn torch_err(e: tch::TchError) -> PyErr {
    PyRuntimeError::new_err(format!("shared_prefix: libtorch error: {e}"))
}

/// The live plan a handle names, as the Python exception for an argument `plan` that names none.
pub fn resolve(plan: &Tensor) -> PyResult<Arc<DevicePlan>> {
    handle::resolve(plan).map_err(|e| PyValueError::new_err(format!("plan: {e}")))
}

/// The plan on `device` with the Python-facing index tensors in the same host→device copy, tuned by the policy.
fn on_device<'py>(py: Python<'py>, mut host: planner::Plan, device: Device, windows: &[usize], extra: &[&[i64]])
    -> PyResult<(PyTensor, Bound<'py, PyDict>, Vec<Tensor>)> {
    let scored_tail = host.scored_tail();
    // Packing per-token inputs: where the prompts' tokens lead the stream, two gathers (prompt rows, completion
    // rows) and a concatenation, else one gather from both.
    let src = std::mem::take(&mut host.src_index);
    let from_prompts = (host.rows * host.prompt_width) as i64;
    let prompt_tokens = src.iter().filter(|&&s| s < from_prompts).count();
    let gathers = if src[..prompt_tokens].iter().all(|&s| s < from_prompts) {
        vec![src[..prompt_tokens].to_vec(), src[prompt_tokens..].iter().map(|&s| s - from_prompts).collect()]
    } else {
        vec![src]
    };
    // The per-token maps only Python uses move out of the plan the layers keep.
    const MAPS: [&str; 5] = ["position_ids", "scored", "predictor", "completion_flat", "entry_scored"];
    let maps = [
        std::mem::take(&mut host.position_ids),
        std::mem::take(&mut host.scored),
        std::mem::take(&mut host.predictor),
        std::mem::take(&mut host.completion_flat),
        std::mem::take(&mut host.entry_scored),
    ];
    let all: Vec<&[i64]> =
        gathers.iter().chain(maps.iter()).map(Vec::as_slice).chain(extra.iter().copied()).collect();
    let info = PyDict::new(py);
    let h = &host;
    info.set_item("rows", h.rows)?;
    info.set_item("prompt_width", h.prompt_width)?;
    info.set_item("completion_width", h.completion_width)?;
    info.set_item("num_tokens", h.num_tokens())?;
    // Packed tokens from the prompts, and from the completions (every one of them scored).
    info.set_item("prefix_tokens", prompt_tokens)?;
    info.set_item("completion_tokens", h.num_tokens() - prompt_tokens)?;
    info.set_item("scored_tail", scored_tail)?;
    info.set_item("levels", h.layout.levels())?;
    info.set_item("node_rows", h.node_rows.clone())?;
    info.set_item("node_tokens", h.layout.cu_nodes.windows(2).map(|w| (w[1] - w[0]) as usize).collect::<Vec<_>>())?;
    let parents = h.layout.parent.iter().map(|&p| if p == planner::NO_PARENT { -1 } else { p as i64 });
    info.set_item("node_parent", parents.collect::<Vec<_>>())?;
    info.set_item("stock_tokens", h.stock_tokens())?;
    info.set_item("by_prompt_tokens", h.by_prompt_tokens())?;
    info.set_item("max_seqlen", h.max_seqlen())?;
    info.set_item("min_seqlen", h.min_seqlen())?;
    info.set_item("group_sizes", h.group_sizes.clone())?;
    info.set_item("row_group", h.row_group.clone())?;
    let (mut plan, mut tensors) = DevicePlan::new(host, device, windows, &all).map_err(torch_err)?;
    plan.tuning = policy::observe(&plan);
    info.set_item("windows", plan.windows())?;
    let mut made_for = windows.to_vec();
    made_for.sort_unstable();
    made_for.dedup();
    info.set_item("made_for_windows", made_for)?;
    let rest = tensors.split_off(gathers.len() + maps.len());
    let named = tensors.split_off(gathers.len());
    info.set_item("src_gathers", tensors.into_iter().map(PyTensor).collect::<Vec<_>>())?;
    for (name, t) in MAPS.into_iter().zip(named) {
        info.set_item(name, PyTensor(t))?;
    }
    Ok((PyTensor(handle::publish(plan).map_err(torch_err)?), info, rest))
}

/// Dense labels for arbitrary hashable group ids (equality as Python defines it).
fn dense_labels(py: Python<'_>, ids: &Bound<'_, PyAny>, rows: usize) -> PyResult<Vec<u64>> {
    if let Ok(t) = ids.extract::<PyTensor>() {
        if t.dim() != 1 || t.size()[0] as usize != rows {
            return Err(PyValueError::new_err(format!(
                "group_ids: expected one id per row ({rows}), got a tensor of shape {:?}",
                t.size()
            )));
        }
        if t.is_floating_point() {
            return Err(PyTypeError::new_err("group_ids: expected integer ids, got a floating-point tensor"));
        }
        return Ok(host_i64(&t)?.into_iter().map(|x| x as u64).collect());
    }
    let seen = PyDict::new(py);
    let mut out = Vec::with_capacity(rows);
    let iter = ids.try_iter().map_err(|_| {
        PyTypeError::new_err(format!("group_ids: expected a sequence or tensor of ids, got {}", ids.get_type()))
    })?;
    for item in iter {
        if out.len() == rows {  // one more than expected: stop here (the iterable may be endless)
            return Err(PyValueError::new_err(format!("group_ids: has more than {rows} elements, expected one per row")));
        }
        let item = item?;
        let next = seen.len();
        let label = match seen.get_item(&item).map_err(|e| {
            PyTypeError::new_err(format!("group_ids: ids must be hashable ({e})"))
        })? {
            Some(l) => l.extract::<usize>()?,
            None => {
                seen.set_item(&item, next)?;
                next
            }
        };
        out.push(label as u64);
    }
    Ok(out)
}

/// Plan a micro-batch: `(handle, info)`. Shapes and dtypes are checked by the Python wrapper; the planner
/// re-checks lengths.
///
/// `tree`: `(max_depth, min_node)` to share every common prefix (`planner::Sharing::Tree`), None for whole
/// prompts. A sliding window shorter than some row limits the tree to two levels (`max_depth` 1), as window key
/// runs need.
#[pyfunction]
#[pyo3(signature = (prompt_ids, prompt_mask, completion_ids, completion_mask, group_sizes=None, group_ids=None,
                    windows=None, tree=None))]
#[allow(clippy::too_many_arguments)]
fn make_plan<'py>(
    py: Python<'py>,
    prompt_ids: PyTensor,
    prompt_mask: PyTensor,
    completion_ids: PyTensor,
    completion_mask: PyTensor,
    group_sizes: Option<Vec<usize>>,
    group_ids: Option<Bound<'py, PyAny>>,
    windows: Option<Vec<usize>>,
    tree: Option<(usize, usize)>,
) -> PyResult<(PyTensor, Bound<'py, PyDict>)> {
    let windows = windows.unwrap_or_default();
    if windows.contains(&0) {
        return Err(PyValueError::new_err("windows: every sliding window must be at least 1 token"));
    }
    let (ps, cs) = (prompt_ids.size(), completion_mask.size());
    if ps.len() != 2 || cs.len() != 2 {
        return Err(PyValueError::new_err("prompt_ids and completion_mask must be 2-D [B, L]"));
    }
    let (b, lp, lc) = (ps[0] as usize, ps[1] as usize, cs[1] as usize);
    let device = prompt_ids.device();
    if completion_ids.size() != cs {
        return Err(PyValueError::new_err("completion_ids and completion_mask must have one shape"));
    }
    // The one device→host transfer: ids and masks in one buffer (completion ids only for a tree).
    let flat = |t: &Tensor| -> Result<Tensor, tch::TchError> { t.f_reshape([-1])?.f_to_kind(Kind::Int64) };
    let mut parts = vec![flat(&prompt_ids).map_err(torch_err)?, flat(&prompt_mask).map_err(torch_err)?,
                         flat(&completion_mask).map_err(torch_err)?];
    if tree.is_some() {
        parts.push(flat(&completion_ids).map_err(torch_err)?);
    }
    let host = Tensor::f_cat(&parts, 0).map_err(torch_err)?;
    let host = host_i64(&host)?;
    let (ids, rest) = host.split_at(b * lp);
    let (pm, rest) = rest.split_at((b * lp).min(rest.len()));
    let (cm, cids) = rest.split_at((b * lc).min(rest.len()));
    let pmask: Vec<bool> = pm.iter().map(|&x| x != 0).collect();
    let cmask: Vec<bool> = cm.iter().map(|&x| x != 0).collect();
    let labels = group_ids.as_ref().map(|g| dense_labels(py, g, b)).transpose()?;
    let grouping = match (&group_sizes, &labels) {
        (Some(_), Some(_)) => return Err(PyValueError::new_err("group_sizes and group_ids are mutually exclusive")),
        (Some(s), None) => planner::Grouping::Sizes(s),
        (None, Some(l)) => planner::Grouping::Labels(l),
        (None, None) => planner::Grouping::ByPrompt,
    };
    let batch = planner::Batch {
        rows: b,
        prompt_width: lp,
        completion_width: lc,
        prompt_ids: ids,
        prompt_mask: &pmask,
        completion_ids: tree.map(|_| cids),
        completion_mask: &cmask,
    };
    // Window key runs need two levels: a window shorter than some row limits the tree to depth 1.
    let longest_row = (0..b)
        .map(|r| {
            let valid = |m: &[bool]| m.iter().filter(|&&v| v).count();
            valid(&pmask[r * lp..(r + 1) * lp]) + valid(&cmask[r * lc..(r + 1) * lc])
        })
        .max()
        .unwrap_or(0);
    let cut = windows.iter().any(|&w| planner::window_cuts(w, longest_row));
    let sharing = match tree {
        Some((max_depth, min_node)) => planner::Sharing::Tree { max_depth: if cut { 1 } else { max_depth }, min_node },
        None => planner::Sharing::Prompts,
    };
    let planned = py.allow_threads(|| planner::plan(&batch, grouping, sharing));
    let host_plan = planned.map_err(|e| PyValueError::new_err(e.to_string()))?;
    let (plan, info, _) = on_device(py, host_plan, device, &windows, &[])?;
    Ok((plan, info))
}

fn parse_device(text: &str) -> PyResult<Device> {
    match text.split_once(':') {
        None if text == "cpu" => Ok(Device::Cpu),
        None if text == "cuda" => Ok(Device::Cuda(0)),
        Some(("cuda", i)) => i.parse().map(Device::Cuda).map_err(|_| PyValueError::new_err(format!("device: {text:?}"))),
        _ => Err(PyValueError::new_err(format!("device: expected 'cpu' or 'cuda[:N]', got {text:?}"))),
    }
}

/// Any integer/bool tensor's elements, row-major, as host `i64` (one device→host transfer; errors, never panics).
fn host_i64(t: &Tensor) -> PyResult<Vec<i64>> {
    let host = t.f_reshape([-1]).and_then(|t| t.f_to_kind(Kind::Int64)).and_then(|t| t.f_to_device(Device::Cpu));
    Vec::try_from(host.map_err(torch_err)?).map_err(torch_err)
}

fn host_bools(t: &Tensor) -> PyResult<Vec<bool>> {
    Ok(host_i64(t)?.into_iter().map(|x| x != 0).collect())
}

/// The original Prefix Grouper's grouped layout on `device`: `(handle, info, indices, (width, max_prefix,
/// max_suffix))`, where `indices` holds `grouped_prefix`, `grouped_suffix`, `ungrouped_prefix`,
/// `ungrouped_suffix`, `sample_group` and `padding_mask`, all in the plan's one host→device copy.
#[pyfunction]
#[pyo3(signature = (prefix_lens, suffix_lens, group_sizes, device, padding_mask=None, left=false))]
#[allow(clippy::type_complexity)]
fn make_compat_plan<'py>(
    py: Python<'py>,
    prefix_lens: Vec<usize>,
    suffix_lens: Vec<usize>,
    group_sizes: Vec<usize>,
    device: &str,
    padding_mask: Option<PyTensor>,
    left: bool,
) -> PyResult<(PyTensor, Bound<'py, PyDict>, Bound<'py, PyDict>, (usize, usize, usize))> {
    let device = parse_device(device)?;
    let mask_host = padding_mask.as_ref().map(|m| host_bools(m)).transpose()?;
    let padding = match (&mask_host, &padding_mask) {
        (Some(h), Some(m)) => {
            if m.dim() != 2 {
                return Err(PyValueError::new_err("padding_mode: a mask must be 2-D [groups, seq]"));
            }
            planner::compat::Padding::Mask { mask: h, width: m.size()[1] as usize }
        }
        _ if left => planner::compat::Padding::Left,
        _ => planner::compat::Padding::Right,
    };
    let (layout, host_plan) = planner::compat::compat_layout(&prefix_lens, &suffix_lens, &group_sizes, padding)
        .map_err(|e| PyValueError::new_err(e.to_string()))?;
    let mask: Vec<i64> = layout.padding_mask.iter().map(|&m| m as i64).collect();
    let parts: [&[i64]; 6] = [
        &layout.grouped_prefix,
        &layout.grouped_suffix,
        &layout.ungrouped_prefix,
        &layout.ungrouped_suffix,
        &layout.sample_group,
        &mask,
    ];
    let (plan, info, tensors) = on_device(py, host_plan, device, &[], &parts)?;
    let indices = PyDict::new(py);
    let names = ["grouped_prefix", "grouped_suffix", "ungrouped_prefix", "ungrouped_suffix", "sample_group"];
    for (name, t) in names.iter().zip(&tensors) {
        indices.set_item(*name, PyTensor(t.shallow_clone()))?;
    }
    let mask = tensors[5]
        .f_to_kind(Kind::Bool)
        .and_then(|t| t.f_view([layout.groups as i64, layout.width as i64]))
        .map_err(torch_err)?;
    indices.set_item("padding_mask", PyTensor(mask))?;
    Ok((plan, info, indices, (layout.width, layout.max_prefix, layout.max_suffix)))
}

/// Flat row-major positions of a mask's true entries, on the mask's device (one transfer each way).
#[pyfunction]
fn mask_positions(mask: PyTensor) -> PyResult<PyTensor> {
    let host = host_bools(&mask)?;
    let pos = planner::compat::mask_positions(&host);
    Ok(PyTensor(Tensor::f_from_slice(&pos).and_then(|t| t.f_to_device(mask.device())).map_err(torch_err)?))
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(make_plan, m)?)?;
    m.add_function(wrap_pyfunction!(make_compat_plan, m)?)?;
    m.add_function(wrap_pyfunction!(mask_positions, m)?)?;
    Ok(())
}
