//! `shared_prefix._core`: the planner and the attention executor, exposed to Python.
//! Tensors cross through pyo3-tch and share libtorch with the `torch` package (import torch first).

mod cuda;
mod device_plan;
mod executor;
mod runs;

use device_plan::DevicePlan;
use executor::Kernels;
use pyo3::exceptions::{PyNotImplementedError, PyRuntimeError, PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::PyDict;
use pyo3_tch::PyTensor;
use tch::{Device, Kind, Tensor};

fn torch_err(e: tch::TchError) -> PyErr {
    PyRuntimeError::new_err(format!("shared_prefix: libtorch error: {e}"))
}

/// A plan on its device. Immutable; shared by every layer of a forward and backward.
#[pyclass(frozen, module = "shared_prefix._core", name = "CorePlan")]
struct PyPlan {
    inner: DevicePlan,
}

fn device_name(d: Device) -> String {
    match d {
        Device::Cpu => "cpu".into(),
        Device::Cuda(i) => format!("cuda:{i}"),
        other => format!("{other:?}"),
    }
}

#[pymethods]
impl PyPlan {
    #[getter]
    fn num_tokens(&self) -> usize {
        self.inner.host.num_tokens()
    }
    #[getter]
    fn prefix_tokens(&self) -> usize {
        self.inner.host.prefix_tokens
    }
    #[getter]
    fn completion_tokens(&self) -> usize {
        self.inner.host.completion_tokens
    }
    #[getter]
    fn stock_tokens(&self) -> usize {
        self.inner.host.stock_tokens()
    }
    #[getter]
    fn rows(&self) -> usize {
        self.inner.host.rows
    }
    #[getter]
    fn prompt_width(&self) -> usize {
        self.inner.host.prompt_width
    }
    #[getter]
    fn completion_width(&self) -> usize {
        self.inner.host.completion_width
    }
    #[getter]
    fn group_sizes(&self) -> Vec<usize> {
        self.inner.host.group_sizes.clone()
    }
    #[getter]
    fn row_group(&self) -> Vec<i64> {
        self.inner.host.row_group.clone()
    }
    #[getter]
    fn max_seqlen(&self) -> usize {
        // Longest per-row sequence (prompt + completion) the stock computation would see.
        self.inner.host.max_seqlen()
    }
    #[getter]
    fn min_seqlen(&self) -> usize {
        self.inner.host.min_seqlen()
    }
    /// Sliding windows (shorter than `max_seqlen`) this plan holds key tables for.
    #[getter]
    fn windows(&self) -> Vec<usize> {
        self.inner.windows()
    }
    #[getter]
    fn device(&self) -> String {
        device_name(self.inner.device)
    }
    #[getter]
    fn src_index(&self) -> PyTensor {
        PyTensor(self.inner.src_index.shallow_clone())
    }
    #[getter]
    fn position_ids(&self) -> PyTensor {
        PyTensor(self.inner.position_ids.shallow_clone())
    }
    #[getter]
    fn predictor(&self) -> PyTensor {
        PyTensor(self.inner.predictor.shallow_clone())
    }
    #[getter]
    fn completion_flat(&self) -> PyTensor {
        PyTensor(self.inner.completion_flat.shallow_clone())
    }
    #[getter]
    fn completion_slot(&self) -> PyTensor {
        PyTensor(self.inner.completion_slot.shallow_clone())
    }
    /// The kernel each attention call of this plan runs on by default on CUDA in fp16/bf16 ("auto"), in the
    /// executor's order: "cudnn" or "flash" per call, under the current self-call mode.
    #[getter]
    fn auto_kernels(&self) -> Vec<(&'static str, &'static str)> {
        let p = &self.inner;
        let kernel = |s: &executor::Segments| if cuda::AutoKernels::cudnn(s) { "cudnn" } else { "flash" };
        let completions = p.host.completion_tokens > 0;
        let mut calls = Vec::with_capacity(3);
        if executor::self_calls_split(&cuda::AUTO, p) {
            calls.push(("prefix", kernel(&p.seg_prefix())));
            if completions {
                calls.push(("completions_x_prefix", kernel(&p.seg_group())));
                calls.push(("completions", kernel(&p.seg_completion())));
            }
        } else {
            calls.push(("prefix+completions", kernel(&p.seg_self())));
            if completions {
                calls.push(("completions_x_prefix", kernel(&p.seg_group())));
            }
        }
        calls
    }
    #[getter]
    fn cu_seqlens(&self) -> (PyTensor, PyTensor, PyTensor) {
        let p = &self.inner;
        // Copies: the plan's own tables must stay in step with its host-side max lengths and runs.
        (PyTensor(p.cu_prefix.copy()), PyTensor(p.cu_group_completions.copy()), PyTensor(p.cu_completions.copy()))
    }
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

/// Plan a micro-batch. Shapes and dtypes are checked by the Python wrapper; the planner re-checks lengths.
#[pyfunction]
#[pyo3(signature = (prompt_ids, prompt_mask, completion_mask, group_sizes=None, group_ids=None, windows=None))]
fn make_plan(
    py: Python<'_>,
    prompt_ids: PyTensor,
    prompt_mask: PyTensor,
    completion_mask: PyTensor,
    group_sizes: Option<Vec<usize>>,
    group_ids: Option<Bound<'_, PyAny>>,
    windows: Option<Vec<usize>>,
) -> PyResult<PyPlan> {
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
    // The one device→host transfer: ids and both masks in one buffer.
    let flat = |t: &Tensor| -> Result<Tensor, tch::TchError> { t.f_reshape([-1])?.f_to_kind(Kind::Int64) };
    let host = Tensor::f_cat(
        &[flat(&prompt_ids).map_err(torch_err)?, flat(&prompt_mask).map_err(torch_err)?, flat(&completion_mask).map_err(torch_err)?],
        0,
    )
    .map_err(torch_err)?;
    let host = host_i64(&host)?;
    let (ids, rest) = host.split_at(b * lp);
    let (pm, cm) = rest.split_at((b * lp).min(rest.len()));
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
        completion_mask: &cmask,
    };
    let host_plan = py.allow_threads(|| planner::plan(&batch, grouping)).map_err(|e| PyValueError::new_err(e.to_string()))?;
    let inner = DevicePlan::new(host_plan, device, &windows).map_err(torch_err)?;
    Ok(PyPlan { inner })
}

static CPU_FLASH: runs::Runs<runs::CpuFlash> = runs::Runs(runs::CpuFlash);
static MATH: runs::Runs<runs::Math> = runs::Runs(runs::Math);

/// The backend for these inputs. `name` forces one ("cpu_flash", "math", "flash", "cudnn", "cudnn_views", "auto");
/// by default:
/// CPU → ATen's CPU flash kernel; CUDA fp16/bf16 → "auto" (cuDNN for long one-batch calls whose shape recurred,
/// flash-attention 2 varlen otherwise); CUDA fp32/fp64 → the explicit-math kernel. A sliding-window layer (`window`) needs a kernel that
/// takes a window: flash-attention 2 on CUDA (which "auto" picks), the explicit-math kernel elsewhere.
fn kernels_for(q: &Tensor, name: Option<&str>, window: Option<usize>) -> PyResult<&'static dyn Kernels> {
    let device = q.device();
    let half = matches!(q.kind(), Kind::Half | Kind::BFloat16);
    let name = match (name, device) {
        (Some(n), _) => n,
        (None, Device::Cpu) if window.is_some() => "math",
        (None, Device::Cpu) => "cpu_flash",
        (None, Device::Cuda(_)) if half => "auto",
        (None, Device::Cuda(_)) => "math",
        (None, other) => {
            return Err(PyNotImplementedError::new_err(format!("shared_prefix.attention: no backend for {other:?}")))
        }
    };
    if let (Some(w), "cpu_flash" | "cudnn" | "cudnn_views") = (window, name) {
        return Err(PyValueError::new_err(format!(
            "kernels: {name:?} takes no sliding window (window={w}); use \"math\", or \"flash\"/\"auto\" on CUDA"
        )));
    }
    match (name, device) {
        ("math", _) => Ok(&MATH),
        ("cpu_flash", Device::Cpu) => Ok(&CPU_FLASH),
        ("flash" | "cudnn" | "cudnn_views" | "auto", Device::Cuda(_)) => {
            let d = q.size()[2];
            if !half {
                return Err(PyTypeError::new_err(format!("q: the {name} kernel takes fp16/bf16, got {:?}", q.kind())));
            }
            if d % 8 != 0 || d > 256 {
                return Err(PyValueError::new_err(format!(
                    "q: head dim {d} is not supported by the CUDA {name} kernel (a multiple of 8, at most 256)"
                )));
            }
            Ok(match name {
                "flash" => &cuda::FLASH,
                "cudnn" => &cuda::CUDNN,
                "cudnn_views" => &cuda::CUDNN_VIEWS,
                _ => &cuda::AUTO,
            })
        }
        (n, d) => Err(PyValueError::new_err(format!("kernels: {n:?} is not available on {}", device_name(d)))),
    }
}

/// Check packed q/k/v against the plan; every message names the argument.
fn check_qkv(q: &Tensor, k: &Tensor, v: &Tensor, plan: &DevicePlan) -> PyResult<()> {
    for (name, t) in [("q", q), ("k", k), ("v", v)] {
        if t.dim() != 3 {
            return Err(PyValueError::new_err(format!("{name}: expected a packed [T, H, D] tensor, got shape {:?}", t.size())));
        }
        if t.size()[0] as usize != plan.host.num_tokens() {
            return Err(PyValueError::new_err(format!(
                "{name}: has {} tokens but the plan packs {}",
                t.size()[0],
                plan.host.num_tokens()
            )));
        }
        if !matches!(t.kind(), Kind::Half | Kind::BFloat16 | Kind::Float | Kind::Double) {
            return Err(PyTypeError::new_err(format!("{name}: expected a floating-point tensor, got {:?}", t.kind())));
        }
        if t.kind() != q.kind() {
            return Err(PyTypeError::new_err(format!("{name}: dtype {:?} differs from q's {:?}", t.kind(), q.kind())));
        }
        if t.device() != plan.device {
            return Err(PyValueError::new_err(format!(
                "{name}: is on {} but the plan was made on {}",
                device_name(t.device()),
                device_name(plan.device)
            )));
        }
    }
    let (qs, ks, vs) = (q.size(), k.size(), v.size());
    if ks != vs {
        return Err(PyValueError::new_err(format!("v: shape {vs:?} differs from k's {ks:?}")));
    }
    if qs[2] != ks[2] {
        return Err(PyValueError::new_err(format!("k: head dim {} differs from q's {}", ks[2], qs[2])));
    }
    if qs[1] == 0 || qs[2] == 0 {
        return Err(PyValueError::new_err(format!("q: expected at least one head and a head dim >= 1, got shape {qs:?}")));
    }
    if ks[1] == 0 || qs[1] % ks[1] != 0 {
        return Err(PyValueError::new_err(format!(
            "k: {} key/value heads do not divide q's {} heads (GQA needs Hq % Hkv == 0)",
            ks[1], qs[1]
        )));
    }
    Ok(())
}

/// Forward of shared-prefix attention. Returns `(out [T, Hq, D], lse [T, Hq])`.
#[pyfunction]
#[pyo3(signature = (q, k, v, plan, scale, kernels=None, window=None))]
fn attention_forward(
    q: PyTensor,
    k: PyTensor,
    v: PyTensor,
    plan: &PyPlan,
    scale: f64,
    kernels: Option<&str>,
    window: Option<usize>,
) -> PyResult<(PyTensor, PyTensor)> {
    let p = &plan.inner;
    check_qkv(&q, &k, &v, p)?;
    check_window(p, window)?;
    let kern = kernels_for(&q, kernels, window)?;
    // The GIL stays held: libtorch ops here are short, and tch tensors are not Sync.
    let (o, l) = executor::forward(kern, p, &q, &k, &v, scale, window).map_err(torch_err)?;
    Ok((PyTensor(o), PyTensor(l)))
}

/// A window must be one the plan was made with (its key tables live on the device already: building them here
/// would copy host→device inside a layer).
fn check_window(p: &DevicePlan, window: Option<usize>) -> PyResult<()> {
    match window {
        Some(w) if p.window_tables(w).is_none() => Err(PyValueError::new_err(format!(
            "window: the plan holds no key tables for a sliding window of {w} (it has {:?}); make the plan with \
             windows=[{w}, ...] (windows of at least the longest row, {}, need none: pass window=None)",
            p.windows(),
            p.host.max_seqlen()
        ))),
        _ => Ok(()),
    }
}

/// Exact backward of shared-prefix attention. Returns `(dq, dk, dv)`.
#[pyfunction]
#[pyo3(signature = (dout, q, k, v, out, lse, plan, scale, kernels=None, window=None))]
#[allow(clippy::too_many_arguments)]
fn attention_backward(
    dout: PyTensor,
    q: PyTensor,
    k: PyTensor,
    v: PyTensor,
    out: PyTensor,
    lse: PyTensor,
    plan: &PyPlan,
    scale: f64,
    kernels: Option<&str>,
    window: Option<usize>,
) -> PyResult<(PyTensor, PyTensor, PyTensor)> {
    let p = &plan.inner;
    check_qkv(&q, &k, &v, p)?;
    check_window(p, window)?;
    if dout.size() != q.size() || out.size() != q.size() {
        return Err(PyValueError::new_err("dout/out: shape must equal q's"));
    }
    let (t, hq) = (q.size()[0], q.size()[1]);
    if lse.size() != [t, hq] || !matches!(lse.kind(), Kind::Float | Kind::Double) || lse.device() != q.device() {
        return Err(PyValueError::new_err(format!(
            "lse: expected a float [{t}, {hq}] tensor on q's device (as attention_forward returns it), got {:?} {:?}",
            lse.size(),
            lse.kind()
        )));
    }
    let kern = kernels_for(&q, kernels, window)?;
    let (dq, dk, dv) =
        executor::backward(kern, p, &dout, &q, &k, &v, &out, &lse, scale, window).map_err(torch_err)?;
    Ok((PyTensor(dq), PyTensor(dk), PyTensor(dv)))
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

/// The original Prefix Grouper's grouped layout on `device`: the attention plan and the index tensors
/// (`grouped_prefix`, `grouped_suffix`, `ungrouped_prefix`, `ungrouped_suffix`, `sample_group`, `padding_mask`),
/// made with one host→device copy.
#[pyfunction]
#[pyo3(signature = (prefix_lens, suffix_lens, group_sizes, device, padding_mask=None, left=false))]
fn make_compat_plan<'py>(
    py: Python<'py>,
    prefix_lens: Vec<usize>,
    suffix_lens: Vec<usize>,
    group_sizes: Vec<usize>,
    device: &str,
    padding_mask: Option<PyTensor>,
    left: bool,
) -> PyResult<(PyPlan, Bound<'py, PyDict>, (usize, usize, usize))> {
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
    let parts: [&[i64]; 5] = [
        &layout.grouped_prefix,
        &layout.grouped_suffix,
        &layout.ungrouped_prefix,
        &layout.ungrouped_suffix,
        &layout.sample_group,
    ];
    let mut buf: Vec<i64> = parts.iter().flat_map(|p| p.iter().copied()).collect();
    buf.extend(layout.padding_mask.iter().map(|&m| m as i64));
    let all = Tensor::f_from_slice(&buf).map_err(torch_err)?.f_to_device(device).map_err(torch_err)?;
    let out = PyDict::new(py);
    let names = ["grouped_prefix", "grouped_suffix", "ungrouped_prefix", "ungrouped_suffix", "sample_group"];
    let mut at = 0i64;
    for (name, part) in names.iter().zip(parts) {
        out.set_item(*name, PyTensor(all.f_narrow(0, at, part.len() as i64).map_err(torch_err)?))?;
        at += part.len() as i64;
    }
    let mask = all
        .f_narrow(0, at, layout.padding_mask.len() as i64)
        .and_then(|t| t.f_to_kind(Kind::Bool))
        .and_then(|t| t.f_view([layout.groups as i64, layout.width as i64]))
        .map_err(torch_err)?;
    out.set_item("padding_mask", PyTensor(mask))?;
    let inner = DevicePlan::new(host_plan, device, &[]).map_err(torch_err)?;
    Ok((PyPlan { inner }, out, (layout.width, layout.max_prefix, layout.max_suffix)))
}

/// Flat row-major positions of a mask's true entries, on the mask's device (one transfer each way).
#[pyfunction]
fn mask_positions(mask: PyTensor) -> PyResult<PyTensor> {
    let host = host_bools(&mask)?;
    let pos = planner::compat::mask_positions(&host);
    Ok(PyTensor(Tensor::f_from_slice(&pos).and_then(|t| t.f_to_device(mask.device())).map_err(torch_err)?))
}

/// Set the explicit-math kernel's score budget per block of query rows (bytes, at least 1); returns the previous
/// value. The default (256 MiB) suits real runs; tests set a tiny one to exercise many blocks.
#[pyfunction]
fn set_math_block_bytes(n: usize) -> PyResult<usize> {
    if n == 0 {
        return Err(PyValueError::new_err("n: the math kernel's block budget must be at least 1 byte"));
    }
    Ok(runs::MATH_BLOCK_BYTES.swap(n, std::sync::atomic::Ordering::Relaxed))
}

/// How the prefixes' and the completions' causal attention calls run: "auto" (as the kernels prefer: one call for
/// flash-attention 2 unless the prefix goes to cuDNN, apart for the kernels that run per run), "split" (DESIGN's
/// three calls) or "fused" (calls 1 and 3 as one). Returns the previous mode. For tests, which cover both executor
/// paths with every kernel, and the bench.
#[pyfunction]
fn set_self_calls(mode: &str) -> PyResult<String> {
    let value = match mode {
        "auto" => executor::SELF_CALLS_AUTO,
        "split" => executor::SELF_CALLS_SPLIT,
        "fused" => executor::SELF_CALLS_FUSED,
        other => {
            return Err(PyValueError::new_err(format!("mode: expected \"auto\", \"split\" or \"fused\", got {other:?}")))
        }
    };
    let before = executor::SELF_CALLS.swap(value, std::sync::atomic::Ordering::Relaxed);
    Ok(match before {
        executor::SELF_CALLS_SPLIT => "split",
        executor::SELF_CALLS_FUSED => "fused",
        _ => "auto",
    }
    .to_string())
}

/// How many earlier plans must have had a call's dense shape before "auto" runs it on cuDNN (whose first call of a
/// shape builds a graph); plans made afterwards use it. Returns the previous value. 0: at once.
#[pyfunction]
fn set_cudnn_after(plans: u32) -> u32 {
    device_plan::CUDNN_AFTER.swap(plans, std::sync::atomic::Ordering::Relaxed)
}

/// Pad the causal self-attention calls that run on dense kernels to a multiple of `tokens` rows per segment (0:
/// none), for plans made afterwards, so nearby lengths share one cuDNN graph. Returns the previous value.
#[pyfunction]
fn set_cudnn_bucket(tokens: usize) -> usize {
    device_plan::CUDNN_BUCKET.swap(tokens, std::sync::atomic::Ordering::Relaxed)
}

/// Tests: the shortest run (in keys) that `set_cudnn_bucket` pads (default 8192, cuDNN's threshold); returns the
/// previous value.
#[pyfunction]
fn _set_pad_min_keys(keys: usize) -> usize {
    runs::PAD_MIN_KEYS.swap(keys, std::sync::atomic::Ordering::Relaxed)
}

/// Forget which shapes earlier plans had (for tests: the counts behind `set_cudnn_after` are process-wide).
#[pyfunction]
fn _forget_shapes() {
    device_plan::forget_shapes();
}

#[pymodule]
fn _core(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(make_compat_plan, m)?)?;
    m.add_function(wrap_pyfunction!(mask_positions, m)?)?;
    m.add_class::<PyPlan>()?;
    m.add_function(wrap_pyfunction!(make_plan, m)?)?;
    m.add_function(wrap_pyfunction!(attention_forward, m)?)?;
    m.add_function(wrap_pyfunction!(attention_backward, m)?)?;
    m.add_function(wrap_pyfunction!(set_math_block_bytes, m)?)?;
    m.add_function(wrap_pyfunction!(set_self_calls, m)?)?;
    m.add_function(wrap_pyfunction!(set_cudnn_after, m)?)?;
    m.add_function(wrap_pyfunction!(_forget_shapes, m)?)?;
    m.add_function(wrap_pyfunction!(set_cudnn_bucket, m)?)?;
    m.add_function(wrap_pyfunction!(_set_pad_min_keys, m)?)?;
    Ok(())
}
