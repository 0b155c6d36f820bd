//! Host-side planner for shared-prefix packing. Pure Rust, no torch.
//!
//! Input: a micro-batch of `B` rows, each a (possibly padded) prompt and completion, plus how rows group.
//! Output: every index the device side needs, computed in one pass over the tokens:
//!
//! ```text
//! packed = [prefix_0 | prefix_1 | … | prefix_{n-1} | completions of group 0 | completions of group 1 | …]
//! ```
//!
//! All prefix tokens are contiguous, all completion tokens are contiguous, and each group's completions are
//! contiguous, so every attention call works on plain slices of the packed q/k/v.

use std::collections::HashMap;
use std::fmt;

pub mod compat;
mod segment_runs;
pub use segment_runs::{runs_from_lengths, Run};

/// How rows form groups.
#[derive(Debug, Clone, Copy)]
pub enum Grouping<'a> {
    /// Rows whose valid prompt tokens are identical form a group (any row order).
    ByPrompt,
    /// Consecutive rows, one entry per group.
    Sizes(&'a [usize]),
    /// A dense label per row (rows with equal labels form a group, any order).
    Labels(&'a [u64]),
}

/// One micro-batch, row-major, as flat host slices.
#[derive(Debug, Clone, Copy)]
pub struct Batch<'a> {
    pub rows: usize,
    pub prompt_width: usize,
    pub completion_width: usize,
    pub prompt_ids: &'a [i64],
    pub prompt_mask: &'a [bool],
    pub completion_mask: &'a [bool],
}

/// A planning failure that names the argument at fault. The bindings raise it as `ValueError`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PlanError {
    Shape { arg: &'static str, detail: String },
    EmptyPrompt { row: usize },
    NotContiguous { arg: &'static str, row: usize },
    GroupSizes { detail: String },
    PromptsDiffer { arg: &'static str, first: usize, other: usize },
}

impl fmt::Display for PlanError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PlanError::Shape { arg, detail } => write!(f, "{arg}: {detail}"),
            PlanError::EmptyPrompt { row } => write!(f, "prompt_mask: row {row} has no valid prompt token"),
            PlanError::NotContiguous { arg, row } => write!(
                f,
                "{arg}: the valid tokens of row {row} are not one contiguous run (only left or right padding is supported)"
            ),
            PlanError::GroupSizes { detail } => write!(f, "group_sizes: {detail}"),
            PlanError::PromptsDiffer { arg, first, other } => write!(
                f,
                "{arg}: rows {first} and {other} are declared one group but their valid prompt tokens differ"
            ),
        }
    }
}

impl std::error::Error for PlanError {}

/// Everything the device side needs, as host vectors. Packed indices are `i64` (gather indices), segment tables
/// `i32` (the flash-attention convention). Offsets in `cu_*` are relative to their region (prefix or completion).
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    pub rows: usize,
    pub prompt_width: usize,
    pub completion_width: usize,
    /// Group sizes in plan order.
    pub group_sizes: Vec<usize>,
    /// Plan-order group of each input row.
    pub row_group: Vec<i64>,
    /// Input rows in plan order (group by group); `group_sizes` splits it.
    pub rows_in_order: Vec<usize>,
    pub prefix_tokens: usize,
    pub completion_tokens: usize,
    /// For each packed token, the flat index into `cat(prompt.flatten(), completion.flatten())`.
    pub src_index: Vec<i64>,
    /// Position id of each packed token.
    pub position_ids: Vec<i64>,
    /// Segment tables: one per prefix; one per group's completion block; one per completion (plan order).
    pub cu_prefix: Vec<i32>,
    pub cu_group_completions: Vec<i32>,
    pub cu_completions: Vec<i32>,
    pub max_prefix: usize,
    pub max_group_completions: usize,
    pub max_completion: usize,
    /// For each completion-region token (packed order): the packed row that predicts it.
    pub predictor: Vec<i64>,
    /// For each completion-region token (packed order): its flat index into `[B, Lc]`.
    pub completion_flat: Vec<i64>,
}

impl Plan {
    pub fn num_tokens(&self) -> usize {
        self.prefix_tokens + self.completion_tokens
    }

    /// Each row's sequence (prompt + completion) as the stock computation would see it, in plan order.
    pub fn seqlens(&self) -> impl Iterator<Item = usize> + '_ {
        self.group_sizes.iter().enumerate().scan(0, move |c, (g, &size)| {
            let first = *c;
            *c += size;
            let p = (self.cu_prefix[g + 1] - self.cu_prefix[g]) as usize;
            Some((first..first + size).map(move |i| p + (self.cu_completions[i + 1] - self.cu_completions[i]) as usize))
        })
        .flatten()
    }

    /// Longest per-row sequence (prompt + completion) the stock computation would see.
    pub fn max_seqlen(&self) -> usize {
        self.seqlens().max().unwrap_or(0)
    }

    /// Shortest per-row sequence (prompt + completion) the stock computation would see.
    pub fn min_seqlen(&self) -> usize {
        self.seqlens().min().unwrap_or(0)
    }

    /// One segment table over the whole packed stream for the two causal self-attention calls (each prefix
    /// over itself, each completion over itself): the prefix segments, then the completion segments offset by
    /// `prefix_tokens`. Both calls are plain causal attention within a segment, so a varlen kernel serves them in
    /// one call on the full q/k/v instead of two.
    pub fn cu_self(&self) -> Vec<i32> {
        let np = self.prefix_tokens as i32;
        let mut cu = self.cu_prefix.clone();
        cu.extend(self.cu_completions[1..].iter().map(|&c| np + c));
        cu
    }

    /// Tokens the stock per-row computation would forward: each row's prompt plus its completion.
    pub fn stock_tokens(&self) -> usize {
        let mut total = self.completion_tokens;
        for (g, &size) in self.group_sizes.iter().enumerate() {
            total += size * (self.cu_prefix[g + 1] - self.cu_prefix[g]) as usize;
        }
        total
    }
}

/// The keys of the completions' attention call in a sliding-window layer (window `window`: each token sees itself
/// and the `window - 1` tokens before it). Each completion gets its own key run: the last `window - 1` tokens of
/// its group's prompt (all of it if shorter) followed by the completion itself. With causal attention aligned
/// bottom-right (as flash kernels align it) and a left window of `window - 1`, completion token `j` then sees
/// exactly the stock row's keys, positions `P + j - window + 1 ..= P + j`; no merge with another call is needed.
/// The prompt tail is gathered (at most `window - 1` rows per completion), so this suits windows short next to
/// the prompt, which is when a window cuts at all.
#[derive(Debug, Clone, PartialEq)]
pub struct WindowKeys {
    pub window: usize,
    /// Packed rows (prefix region first, then the completion region) gathered into the key runs, run after run.
    pub gather: Vec<i64>,
    /// Key segment table: one segment per completion in plan order, aligned with `Plan::cu_completions`.
    pub cu_k: Vec<i32>,
    pub max_k: usize,
}

impl Plan {
    /// Key runs for a sliding-window layer; see [`WindowKeys`]. Completions without tokens get no keys.
    pub fn window_keys(&self, window: usize) -> WindowKeys {
        let tail_max = window.saturating_sub(1);
        let mut gather = Vec::new();
        let mut cu_k = Vec::with_capacity(self.cu_completions.len());
        cu_k.push(0i32);
        let mut c = 0; // completion index, plan order
        for (g, &size) in self.group_sizes.iter().enumerate() {
            let (p0, p1) = (self.cu_prefix[g] as usize, self.cu_prefix[g + 1] as usize);
            for _ in 0..size {
                let (c0, c1) = (self.cu_completions[c] as usize, self.cu_completions[c + 1] as usize);
                if c1 > c0 {
                    let tail = tail_max.min(p1 - p0);
                    gather.extend((p1 - tail..p1).map(|r| r as i64));
                    gather.extend((c0..c1).map(|r| (self.prefix_tokens + r) as i64));
                }
                cu_k.push(gather.len() as i32);
                c += 1;
            }
        }
        let max_k = cu_k.windows(2).map(|w| (w[1] - w[0]) as usize).max().unwrap_or(0);
        WindowKeys { window, gather, cu_k, max_k }
    }
}

/// The single contiguous valid run of a mask row, as (start, len). `Ok(None)` if the row has none.
fn valid_run(mask: &[bool]) -> Option<Option<(usize, usize)>> {
    let start = match mask.iter().position(|&m| m) {
        Some(s) => s,
        None => return Some(None),
    };
    let len = mask[start..].iter().position(|&m| !m).unwrap_or(mask.len() - start);
    if mask[start + len..].iter().any(|&m| m) {
        return None;
    }
    Some(Some((start, len)))
}

fn check_len(arg: &'static str, got: usize, want: usize, what: &str) -> Result<(), PlanError> {
    if got != want {
        return Err(PlanError::Shape { arg, detail: format!("has {got} elements, expected {want} ({what})") });
    }
    Ok(())
}

/// Build the plan. O(tokens) time; the only hashing is over whole prompts, one lookup per row.
pub fn plan(batch: &Batch<'_>, grouping: Grouping<'_>) -> Result<Plan, PlanError> {
    let (b, lp, lc) = (batch.rows, batch.prompt_width, batch.completion_width);
    if b == 0 {
        return Err(PlanError::Shape { arg: "prompt_ids", detail: "the batch has no rows".into() });
    }
    let shape = format!("{b} rows x {lp} prompt positions");
    check_len("prompt_ids", batch.prompt_ids.len(), b * lp, &shape)?;
    check_len("prompt_mask", batch.prompt_mask.len(), b * lp, &shape)?;
    check_len("completion_mask", batch.completion_mask.len(), b * lc, &format!("{b} rows x {lc} completion positions"))?;

    // Valid runs of every row.
    let mut prompt_run = Vec::with_capacity(b);
    let mut comp_run = Vec::with_capacity(b);
    for r in 0..b {
        let pr = valid_run(&batch.prompt_mask[r * lp..(r + 1) * lp])
            .ok_or(PlanError::NotContiguous { arg: "prompt_mask", row: r })?
            .ok_or(PlanError::EmptyPrompt { row: r })?;
        prompt_run.push(pr);
        let cr = valid_run(&batch.completion_mask[r * lc..(r + 1) * lc])
            .ok_or(PlanError::NotContiguous { arg: "completion_mask", row: r })?
            .unwrap_or((0, 0));
        comp_run.push(cr);
    }
    let prompt_of = |r: usize| {
        let (s, n) = prompt_run[r];
        &batch.prompt_ids[r * lp + s..r * lp + s + n]
    };

    // Group label per row, then groups in order of first appearance.
    let labels: Vec<usize> = match grouping {
        Grouping::ByPrompt => {
            let mut seen: HashMap<&[i64], usize> = HashMap::with_capacity(b);
            (0..b)
                .map(|r| {
                    let next = seen.len();
                    *seen.entry(prompt_of(r)).or_insert(next)
                })
                .collect()
        }
        Grouping::Sizes(sizes) => {
            if sizes.contains(&0) {
                return Err(PlanError::GroupSizes { detail: "every group size must be at least 1".into() });
            }
            // Checked: sizes come from Python ints, and a wrapped sum could pass the comparison.
            let total = sizes.iter().try_fold(0usize, |acc, &s| acc.checked_add(s));
            if total != Some(b) {
                let shown = total.map_or_else(|| "more than the address space".to_string(), |t| t.to_string());
                return Err(PlanError::GroupSizes { detail: format!("sizes sum to {shown} but the batch has {b} rows") });
            }
            sizes.iter().enumerate().flat_map(|(g, &s)| std::iter::repeat_n(g, s)).collect()
        }
        Grouping::Labels(ids) => {
            check_len("group_ids", ids.len(), b, "one per row")?;
            let mut dense: HashMap<u64, usize> = HashMap::with_capacity(b);
            ids.iter()
                .map(|&id| {
                    let next = dense.len();
                    *dense.entry(id).or_insert(next)
                })
                .collect()
        }
    };
    let declared_arg = match grouping {
        Grouping::Sizes(_) => "group_sizes",
        _ => "group_ids",
    };

    // Plan order of groups: first appearance of a label. Rows keep input order within a group.
    let mut order_of_label: HashMap<usize, usize> = HashMap::new();
    let mut row_group = vec![0i64; b];
    let mut group_first_row: Vec<usize> = Vec::new();
    let mut group_sizes: Vec<usize> = Vec::new();
    for r in 0..b {
        let next = order_of_label.len();
        let g = *order_of_label.entry(labels[r]).or_insert(next);
        if g == group_sizes.len() {
            group_sizes.push(0);
            group_first_row.push(r);
        } else if !matches!(grouping, Grouping::ByPrompt) && prompt_of(r) != prompt_of(group_first_row[g]) {
            return Err(PlanError::PromptsDiffer { arg: declared_arg, first: group_first_row[g], other: r });
        }
        group_sizes[g] += 1;
        row_group[r] = g as i64;
    }
    let n = group_sizes.len();

    // Rows in plan order (a counting sort by group).
    let mut group_start = vec![0usize; n + 1];
    for g in 0..n {
        group_start[g + 1] = group_start[g] + group_sizes[g];
    }
    let mut fill = group_start.clone();
    let mut rows_in_order = vec![0usize; b];
    for r in 0..b {
        let g = row_group[r] as usize;
        rows_in_order[fill[g]] = r;
        fill[g] += 1;
    }

    // Region sizes and segment tables. The tables are i32 (the flash-attention convention): refuse what would wrap.
    let packed: usize = (0..n).map(|g| prompt_run[group_first_row[g]].1).sum::<usize>()
        + (0..b).map(|r| comp_run[r].1).sum::<usize>();
    if packed > i32::MAX as usize {
        return Err(PlanError::Shape {
            arg: "prompt_mask",
            detail: format!("the packed stream would hold {packed} tokens, more than the {} the segment tables take",
                            i32::MAX),
        });
    }
    let mut cu_prefix = Vec::with_capacity(n + 1);
    cu_prefix.push(0i32);
    for g in 0..n {
        cu_prefix.push(cu_prefix[g] + prompt_run[group_first_row[g]].1 as i32);
    }
    let mut cu_completions = Vec::with_capacity(b + 1);
    cu_completions.push(0i32);
    let mut cu_group_completions = Vec::with_capacity(n + 1);
    cu_group_completions.push(0i32);
    for g in 0..n {
        for &r in &rows_in_order[group_start[g]..group_start[g + 1]] {
            let last = *cu_completions.last().unwrap();
            cu_completions.push(last + comp_run[r].1 as i32);
        }
        cu_group_completions.push(cu_completions[group_start[g + 1]]);
    }
    let prefix_tokens = cu_prefix[n] as usize;
    let completion_tokens = cu_completions[b] as usize;
    let total = prefix_tokens + completion_tokens;
    let max_diff = |cu: &[i32]| cu.windows(2).map(|w| (w[1] - w[0]) as usize).max().unwrap_or(0);

    // Per-token maps, in one pass.
    let mut src_index = Vec::with_capacity(total);
    let mut position_ids = Vec::with_capacity(total);
    for g in 0..n {
        let r = group_first_row[g];
        let (s, len) = prompt_run[r];
        src_index.extend((0..len).map(|j| (r * lp + s + j) as i64));
        position_ids.extend(0..len as i64);
    }
    let comp_base = (b * lp) as i64;
    let mut predictor = Vec::with_capacity(completion_tokens);
    let mut completion_flat = Vec::with_capacity(completion_tokens);
    for g in 0..n {
        let prefix_len = (cu_prefix[g + 1] - cu_prefix[g]) as i64;
        let last_prompt_row = cu_prefix[g + 1] as i64 - 1;
        for &r in &rows_in_order[group_start[g]..group_start[g + 1]] {
            let (s, len) = comp_run[r];
            let first_packed = (prefix_tokens + predictor.len()) as i64;
            for j in 0..len {
                let flat = (r * lc + s + j) as i64;
                completion_flat.push(flat);
                src_index.push(comp_base + flat);
                position_ids.push(prefix_len + j as i64);
                predictor.push(if j == 0 { last_prompt_row } else { first_packed + j as i64 - 1 });
            }
        }
    }

    Ok(Plan {
        rows: b,
        prompt_width: lp,
        completion_width: lc,
        max_prefix: max_diff(&cu_prefix),
        max_group_completions: max_diff(&cu_group_completions),
        max_completion: max_diff(&cu_completions),
        group_sizes,
        row_group,
        rows_in_order,
        prefix_tokens,
        completion_tokens,
        src_index,
        position_ids,
        cu_prefix,
        cu_group_completions,
        cu_completions,
        predictor,
        completion_flat,
    })
}

#[cfg(test)]
mod tests;
