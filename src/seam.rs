//! The backend seam: what an attention backend implements (`Kernels`) and what it is handed (`Segments`,
//! `Saved`). The executor is written once against it, so the CPU tests exercise the same merge and backward that
//! the CUDA backends run.

use planner::Run;
use tch::Tensor;

pub type Result<T> = std::result::Result<T, tch::TchError>;

/// Tail padding of causal self-attention runs on dense kernels: each segment of a run with at least `min_keys`
/// keys is padded to a multiple of `multiple` rows (0: no padding), so that runs of nearby lengths share one
/// shape. See `dense::Runs` for why it is exact.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Padding {
    pub multiple: usize,
    pub min_keys: usize,
}

impl Padding {
    pub const NONE: Padding = Padding { multiple: 0, min_keys: 0 };

    /// `len` rounded up to the multiple (`len` itself without padding).
    pub fn rounded(&self, len: usize) -> usize {
        if self.multiple == 0 { len } else { len.div_ceil(self.multiple) * self.multiple }
    }
}

/// One attention call's segments: the device tables (flash-attention convention), their host view, and how the
/// kernel policy tuned the call when the plan was made.
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
    /// Whether this call's dense shape recurred in enough earlier plans to be worth a cuDNN graph (`policy`).
    pub recurring: bool,
    /// Causal self-attention calls only: the tail padding dense kernels apply (`policy`).
    pub padding: Padding,
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

/// An attention backend. `out` is `[Tq, Hq, D]` in the input dtype; `lse` is `[Tq, Hq]` (fp32, or fp64 for fp64).
/// Rows of segments with no keys never occur (every completion sees its prompt, prompts are non-empty).
pub trait Kernels: Sync {
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

    /// Whether the prefixes' causal call (`prefix`) should run on its own rather than in one call with the
    /// completions' causal call. One call saves a varlen kernel a launch in forward and in backward, the copy of the
    /// prefix rows' output and the concatenated gradients; kernels that run per run of equal segments gain nothing
    /// from it (the same calls, plus concatenations), nor do kernels faster on the prefix alone.
    fn prefix_alone(&self, _prefix: &Segments) -> bool {
        false
    }
}

/// A contiguous copy of `x` when `yes` (a no-op if it already is), else `x` itself. Fallible: the copy may run
/// out of memory, which must reach Python as an exception (tch's `contiguous` would panic).
pub fn contiguous_if(yes: bool, x: &Tensor) -> Result<Tensor> {
    if yes { x.f_contiguous() } else { Ok(x.shallow_clone()) }
}
