//! Host-side planner for shared-prefix packing. Pure Rust, no torch.
//!
//! Input: a micro-batch of `B` rows, each a (possibly padded) prompt and completion, plus how rows group.
//! Output: every index the device side needs, computed in one pass over the tokens: the packed stream as nodes of
//! shared tokens, level-major (see `layout`), with positions, segment tables and the predictor map. Sharing whole
//! prompts gives
//!
//! ```text
//! packed = [prompt_0 | prompt_1 | … | prompt_{n-1} | completions of group 0 | completions of group 1 | …]
//! ```
//!
//! and a prefix tree (`tree`) shares every common prefix of whole rows (a system prompt, tree rollouts) as well.

use std::collections::HashMap;
use std::fmt;

pub mod compat;
mod layout;
mod segment_runs;
mod tree;
pub use layout::{max_segment, Layout, NO_PARENT};
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

/// What the packed stream shares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sharing {
    /// Each prompt group's prompt, once (two levels: prompts, then every row's completion).
    Prompts,
    /// Every common prefix of whole rows (see `tree`): at most `max_depth + 1` levels of nodes, shared nodes of at
    /// least `min_node` tokens.
    Tree { max_depth: usize, min_node: usize },
}

/// One micro-batch, row-major, as flat host slices.
#[derive(Debug, Clone, Copy)]
pub struct Batch<'a> {
    pub rows: usize,
    pub prompt_width: usize,
    pub completion_width: usize,
    pub prompt_ids: &'a [i64],
    pub prompt_mask: &'a [bool],
    /// Needed for `Sharing::Tree` only.
    pub completion_ids: Option<&'a [i64]>,
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
/// `i32` (the flash-attention convention).
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    pub rows: usize,
    pub prompt_width: usize,
    pub completion_width: usize,
    /// Prompt groups (rows with one prompt) in plan order: their sizes, each input row's group, and the input rows
    /// group by group.
    pub group_sizes: Vec<usize>,
    pub row_group: Vec<i64>,
    pub rows_in_order: Vec<usize>,
    /// Each input row's valid prompt and completion tokens.
    pub prompt_lens: Vec<usize>,
    pub completion_lens: Vec<usize>,
    /// The nodes of the packed stream and how they nest.
    pub layout: Layout,
    /// For each node, the rows whose path crosses it: how many rows each of its tokens stands for.
    pub node_rows: Vec<usize>,
    /// For each packed token, the flat index into `cat(prompt.flatten(), completion.flatten())`.
    pub src_index: Vec<i64>,
    /// Position id of each packed token: its position on its rows' paths.
    pub position_ids: Vec<i64>,
    /// The packed tokens some row scores (completion tokens), ascending, and for each the packed token before it on
    /// its path (the row of the hidden state that predicts it).
    pub scored: Vec<i64>,
    pub predictor: Vec<i64>,
    /// One entry per valid completion position of a row (plan order): its flat index into `[B, Lc]`, and which
    /// scored token it is (`entry_scored`; empty when the entries are the scored tokens themselves, in order).
    pub completion_flat: Vec<i64>,
    pub entry_scored: Vec<i64>,
}

/// The window rule: a sliding window (transformers': each token sees itself and the `window - 1` before it) cuts
/// a batch iff it is shorter than the batch's longest row; a longer one changes nothing and needs no key tables.
pub fn window_cuts(window: usize, longest_row: usize) -> bool {
    window < longest_row
}

impl Plan {
    pub fn num_tokens(&self) -> usize {
        self.layout.num_tokens()
    }

    /// Each input row's sequence (prompt + completion) as the stock computation sees it.
    pub fn row_lens(&self) -> impl Iterator<Item = usize> + '_ {
        self.prompt_lens.iter().zip(&self.completion_lens).map(|(p, c)| p + c)
    }

    /// Longest per-row sequence (prompt + completion) the stock computation would see.
    pub fn max_seqlen(&self) -> usize {
        self.row_lens().max().unwrap_or(0)
    }

    /// Whether a sliding window of `window` tokens cuts some row of this plan (see [`window_cuts`]).
    pub fn cuts(&self, window: usize) -> bool {
        window_cuts(window, self.max_seqlen())
    }

    /// Shortest per-row sequence (prompt + completion) the stock computation would see.
    pub fn min_seqlen(&self) -> usize {
        self.row_lens().min().unwrap_or(0)
    }

    /// Tokens the stock per-row computation would forward: each row's prompt plus its completion.
    pub fn stock_tokens(&self) -> usize {
        self.row_lens().sum()
    }

    /// Tokens a plan sharing whole prompts only packs: each group's prompt once, then every completion token.
    pub fn by_prompt_tokens(&self) -> usize {
        let (mut first, mut prompts) = (0, 0);
        for &size in &self.group_sizes {
            prompts += self.prompt_lens[self.rows_in_order[first]];
            first += size;
        }
        prompts + self.completion_lens.iter().sum::<usize>()
    }

    /// Where the scored tokens are exactly the packed stream's tail `[start, T)`, `start` (a slice, not a gather).
    pub fn scored_tail(&self) -> Option<usize> {
        let t = self.num_tokens();
        let start = t - self.scored.len();
        let tail = self.scored.first().is_none_or(|&s| s as usize == start)
            && self.scored.last().is_none_or(|&s| s as usize == t - 1);
        tail.then_some(start)  // ascending and unique, so first and last fix the range
    }
}

/// The keys of the level-1 nodes' attention call in a sliding-window layer of a two-level plan (window `window`:
/// each token sees itself and the `window - 1` tokens before it). Each level-1 node (a completion, in a one-level
/// plan) gets its own key run: the last `window - 1` tokens of its parent (all of it if shorter) followed by the
/// node itself. With causal attention aligned bottom-right (as flash kernels align it) and a left window of
/// `window - 1`, the node's token `j` then sees exactly the stock row's keys, positions `P + j - window + 1 ..=
/// P + j`; no merge with another call is needed. The parent's tail is gathered (at most `window - 1` rows per
/// node), so this suits windows short next to the prompt, which is when a window cuts at all.
#[derive(Debug, Clone, PartialEq)]
pub struct WindowKeys {
    pub window: usize,
    /// Packed rows gathered into the key runs, run after run.
    pub gather: Vec<i64>,
    /// Key segment table: one segment per level-1 node, aligned with the layout's `level_table(1)`.
    pub cu_k: Vec<i32>,
    pub max_k: usize,
}

impl Plan {
    /// Key runs for a sliding-window layer of a plan of at most two levels; see [`WindowKeys`]. Level-1 nodes
    /// without tokens get no keys.
    pub fn window_keys(&self, window: usize) -> WindowKeys {
        let l = &self.layout;
        assert!(l.levels() <= 2, "window keys need a plan of at most two levels, not {}", l.levels());
        let tail_max = window.saturating_sub(1);
        let mut gather = Vec::new();
        let mut cu_k = vec![0i32];
        if l.levels() == 2 {
            for node in l.level_nodes[1]..l.level_nodes[2] {
                let (c0, c1) = (l.cu_nodes[node] as usize, l.cu_nodes[node + 1] as usize);
                if c1 > c0 {
                    let p = l.parent[node] as usize;
                    let (p0, p1) = (l.cu_nodes[p] as usize, l.cu_nodes[p + 1] as usize);
                    let tail = tail_max.min(p1 - p0);
                    gather.extend((p1 - tail..p1).chain(c0..c1).map(|i| i as i64));
                }
                cu_k.push(gather.len() as i32);
            }
        }
        let max_k = max_segment(&cu_k);
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
pub fn plan(batch: &Batch<'_>, grouping: Grouping<'_>, sharing: Sharing) -> Result<Plan, PlanError> {
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

    // The nodes: one per prompt group and one per row's completion, or the prefix tree.
    let prompt_lens: Vec<usize> = prompt_run.iter().map(|&(_, n)| n).collect();
    let completion_lens: Vec<usize> = comp_run.iter().map(|&(_, n)| n).collect();
    let row_lens: Vec<usize> = (0..b).map(|r| prompt_lens[r] + completion_lens[r]).collect();
    let forest = match sharing {
        Sharing::Prompts => {
            let mut nodes: Vec<tree::Node> = (0..n)
                .map(|g| {
                    let r = group_first_row[g];
                    tree::Node { rep: r as u32, start: 0, end: prompt_run[r].1 as u32, parent: NO_PARENT }
                })
                .collect();
            let mut row_end = vec![0u32; b];
            for &r in &rows_in_order {
                row_end[r] = nodes.len() as u32;
                let plen = prompt_run[r].1 as u32;
                nodes.push(tree::Node { rep: r as u32, start: plen, end: row_lens[r] as u32, parent: row_group[r] as u32 });
            }
            tree::Forest { nodes, level_nodes: vec![0, n, n + b], row_end }
        }
        Sharing::Tree { max_depth, min_node } => {
            let Some(comp_ids) = batch.completion_ids else {
                return Err(PlanError::Shape { arg: "completion_ids", detail: "a prefix tree needs the completion ids".into() });
            };
            check_len("completion_ids", comp_ids.len(), b * lc, &format!("{b} rows x {lc} completion positions"))?;
            // A row's token at path position i, keyed by its group from the prompt's last token on.
            let key = |r: usize, i: usize| {
                let ((ps, pl), (cs, _)) = (prompt_run[r], comp_run[r]);
                let token = if i < pl { batch.prompt_ids[r * lp + ps + i] } else { comp_ids[r * lc + cs + i - pl] };
                (token, if i + 1 >= pl { row_group[r] + 1 } else { 0 })
            };
            tree::build(&rows_in_order, &row_lens, &prompt_lens, key, max_depth.max(1), min_node)
        }
    };
    let tree::Forest { nodes, level_nodes, row_end } = forest;

    // The packed stream: node after node. The segment tables are i32 (the flash-attention convention): refuse what
    // would wrap.
    let packed: usize = nodes.iter().map(|nd| (nd.end - nd.start) as usize).sum();
    if packed > i32::MAX as usize {
        return Err(PlanError::Shape {
            arg: "prompt_mask",
            detail: format!("the packed stream would hold {packed} tokens, more than the {} the segment tables take",
                            i32::MAX),
        });
    }
    let mut cu_nodes = Vec::with_capacity(nodes.len() + 1);
    cu_nodes.push(0i32);
    let mut src_index = Vec::with_capacity(packed);
    let mut position_ids = Vec::with_capacity(packed);
    let comp_base = b * lp;
    for nd in &nodes {
        let r = nd.rep as usize;
        let ((ps, pl), (cs, _)) = (prompt_run[r], comp_run[r]);
        let (start, end) = (nd.start as usize, nd.end as usize);
        let split = end.min(pl).max(start);
        src_index.extend((start..split).map(|i| (r * lp + ps + i) as i64));
        src_index.extend((split..end).map(|i| (comp_base + r * lc + cs + i - pl) as i64));
        position_ids.extend(start as i64..end as i64);
        cu_nodes.push(cu_nodes.last().unwrap() + (end - start) as i32);
    }
    let layout = Layout { cu_nodes, level_nodes, parent: nodes.iter().map(|nd| nd.parent).collect() };
    let mut node_rows = vec![0usize; nodes.len()];
    for &end in &row_end {
        let mut node = end;
        while node != NO_PARENT {
            node_rows[node as usize] += 1;
            node = nodes[node as usize].parent;
        }
    }

    // Scoring: for each row's completion position, its packed token and the one before it on the row's path.
    let mut predictor_of = vec![-1i64; packed];
    let mut entries: Vec<(i64, usize)> = Vec::new(); // (flat [B, Lc] index, packed token)
    let mut path: Vec<usize> = Vec::new();
    for &r in &rows_in_order {
        let ((_, pl), (cs, cl)) = (prompt_run[r], comp_run[r]);
        if cl == 0 {
            continue;
        }
        path.clear();
        let mut node = row_end[r];
        while node != NO_PARENT {
            path.push(node as usize);
            node = nodes[node as usize].parent;
        }
        // Packed index of the row's path position i, walking the path's nodes from the root.
        let mut at = path.iter().rev().map(|&nd| (nodes[nd].start as usize, nodes[nd].end as usize, layout.cu_nodes[nd] as usize));
        let mut cur = at.next().unwrap();
        let mut packed_at = |i: usize| {
            while i >= cur.1 {
                cur = at.next().unwrap();
            }
            cur.2 + i - cur.0
        };
        let mut prev = packed_at(pl - 1);
        for j in 0..cl {
            let t = packed_at(pl + j);
            predictor_of[t] = prev as i64;
            entries.push(((r * lc + cs + j) as i64, t));
            prev = t;
        }
    }
    let mut rank = vec![0i64; packed];
    let mut scored = Vec::new();
    let mut predictor = Vec::new();
    for (t, &p) in predictor_of.iter().enumerate() {
        if p >= 0 {
            rank[t] = scored.len() as i64;
            scored.push(t as i64);
            predictor.push(p);
        }
    }
    // Entries in packed order of their tokens (a counting sort; rows keep plan order), so that a plan where no two
    // rows share a scored token needs no gather from scored tokens to entries.
    let mut first = vec![0usize; packed + 1];
    for &(_, t) in &entries {
        first[t + 1] += 1;
    }
    for t in 0..packed {
        first[t + 1] += first[t];
    }
    let mut completion_flat = vec![0i64; entries.len()];
    let mut entry_scored = vec![0i64; entries.len()];
    for &(flat, t) in &entries {
        completion_flat[first[t]] = flat;
        entry_scored[first[t]] = rank[t];
        first[t] += 1;
    }
    let identity = entry_scored.iter().enumerate().all(|(i, &s)| s == i as i64);

    Ok(Plan {
        rows: b,
        prompt_width: lp,
        completion_width: lc,
        group_sizes,
        row_group,
        rows_in_order,
        prompt_lens,
        completion_lens,
        layout,
        node_rows,
        src_index,
        position_ids,
        scored,
        predictor,
        completion_flat,
        entry_scored: if identity { Vec::new() } else { entry_scored },
    })
}

#[cfg(test)]
mod tests;
