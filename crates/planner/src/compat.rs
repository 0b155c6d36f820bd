//! The layout of the original Prefix Grouper package ("grouped" rows `[prefix, suffix_1 … suffix_k]` per group,
//! padded left, right, or by a caller's mask), mapped onto our packed layout.
//!
//! Our packed order lists prefix tokens group by group, then suffix tokens group by group and sample by sample;
//! that is exactly the row-major order of the grouped layout's prefix positions followed by its suffix positions.
//! So one index vector maps packed rows to grouped positions, and the plan for attention is the ordinary one.

use crate::{plan, Batch, Grouping, Plan, PlanError, Sharing};

/// How the grouped rows are padded.
#[derive(Debug, Clone, Copy)]
pub enum Padding<'a> {
    Left,
    Right,
    /// A `[groups, width]` row-major mask whose row `g` has exactly `total_g` true entries.
    Mask { mask: &'a [bool], width: usize },
}

#[derive(Debug, Clone, PartialEq)]
pub struct CompatLayout {
    pub groups: usize,
    pub samples: usize,
    /// Width of the grouped rows.
    pub width: usize,
    pub max_prefix: usize,
    pub max_suffix: usize,
    /// `[groups * width]`: true at real tokens.
    pub padding_mask: Vec<bool>,
    /// Flat grouped positions of prefix tokens, then of suffix tokens (= packed order).
    pub grouped_prefix: Vec<i64>,
    pub grouped_suffix: Vec<i64>,
    /// Flat positions of the same tokens in the ungrouped layouts: prefixes `[groups, max_prefix]` left-padded,
    /// suffixes `[samples, max_suffix]` right-padded.
    pub ungrouped_prefix: Vec<i64>,
    pub ungrouped_suffix: Vec<i64>,
    /// Group of each sample.
    pub sample_group: Vec<i64>,
}

fn lens_error(detail: String) -> PlanError {
    PlanError::Shape { arg: "group_info", detail }
}

/// The grouped layout and the attention plan for `prefix_lens[g]` and `suffix_lens` (group by group,
/// `group_sizes[g]` samples each).
pub fn compat_layout(
    prefix_lens: &[usize],
    suffix_lens: &[usize],
    group_sizes: &[usize],
    padding: Padding<'_>,
) -> Result<(CompatLayout, Plan), PlanError> {
    let groups = prefix_lens.len();
    if groups == 0 || group_sizes.len() != groups {
        return Err(lens_error(format!("expected one entry per group, got {groups} prefix lengths")));
    }
    if group_sizes.contains(&0) {
        return Err(lens_error("every group needs at least one suffix".into()));
    }
    if prefix_lens.contains(&0) {
        return Err(lens_error("every prefix length must be at least 1".into()));
    }
    let samples: usize = group_sizes.iter().sum();
    if suffix_lens.len() != samples {
        return Err(lens_error(format!("{} suffix lengths for {samples} samples", suffix_lens.len())));
    }
    let mut starts = Vec::with_capacity(groups + 1);
    starts.push(0usize);
    for &s in group_sizes {
        starts.push(starts.last().unwrap() + s);
    }
    let totals: Vec<usize> =
        (0..groups).map(|g| prefix_lens[g] + suffix_lens[starts[g]..starts[g + 1]].iter().sum::<usize>()).collect();
    let width = match padding {
        Padding::Mask { width, .. } => width,
        _ => totals.iter().copied().max().unwrap_or(0),
    };

    // Valid positions of each grouped row, in order. The [groups, width] mask is the one allocation not bounded by
    // the token count: allocated fallibly, so a layout too large is an error rather than an abort.
    let cells = groups.checked_mul(width).ok_or_else(|| lens_error(format!("{groups} x {width} grouped layout")))?;
    let mut padding_mask = Vec::new();
    padding_mask
        .try_reserve_exact(cells)
        .map_err(|_| lens_error(format!("the {groups} x {width} grouped layout does not fit in memory")))?;
    padding_mask.resize(cells, false);
    let mut row_positions: Vec<Vec<usize>> = Vec::with_capacity(groups);
    for g in 0..groups {
        let positions: Vec<usize> = match padding {
            Padding::Left => (width - totals[g]..width).collect(),
            Padding::Right => (0..totals[g]).collect(),
            Padding::Mask { mask, width } => {
                if mask.len() != groups * width {
                    return Err(PlanError::Shape {
                        arg: "padding_mode",
                        detail: format!("mask has {} elements, expected {groups} x {width}", mask.len()),
                    });
                }
                let p: Vec<usize> = (0..width).filter(|&j| mask[g * width + j]).collect();
                if p.len() != totals[g] {
                    return Err(PlanError::Shape {
                        arg: "padding_mode",
                        detail: format!("row {g} of the mask has {} tokens but the group has {}", p.len(), totals[g]),
                    });
                }
                p
            }
        };
        for &j in &positions {
            padding_mask[g * width + j] = true;
        }
        row_positions.push(positions);
    }

    let max_prefix = prefix_lens.iter().copied().max().unwrap_or(0);
    let max_suffix = suffix_lens.iter().copied().max().unwrap_or(0);
    let (mut grouped_prefix, mut grouped_suffix) = (Vec::new(), Vec::new());
    let (mut ungrouped_prefix, mut ungrouped_suffix) = (Vec::new(), Vec::new());
    let mut sample_group = Vec::with_capacity(samples);
    for g in 0..groups {
        let row = &row_positions[g];
        let p = prefix_lens[g];
        for (j, &pos) in row[..p].iter().enumerate() {
            grouped_prefix.push((g * width + pos) as i64);
            ungrouped_prefix.push((g * max_prefix + max_prefix - p + j) as i64);
        }
        let mut at = p;
        for s in starts[g]..starts[g + 1] {
            for j in 0..suffix_lens[s] {
                grouped_suffix.push((g * width + row[at + j]) as i64);
                ungrouped_suffix.push((s * max_suffix + j) as i64);
            }
            at += suffix_lens[s];
            sample_group.push(g as i64);
        }
    }

    // The attention plan: synthetic rows with the same lengths, declared groups (prompt ids all equal).
    let prompt_mask: Vec<bool> =
        (0..samples).flat_map(|s| (0..max_prefix).map(move |j| (s, j))).map(|(s, j)| j < prefix_lens[sample_group[s] as usize]).collect();
    let comp_width = max_suffix.max(1);
    let completion_mask: Vec<bool> =
        (0..samples).flat_map(|s| (0..comp_width).map(move |j| j < suffix_lens[s])).collect();
    let ids = vec![0i64; samples * max_prefix];
    let batch = Batch {
        rows: samples,
        prompt_width: max_prefix,
        completion_width: comp_width,
        prompt_ids: &ids,
        prompt_mask: &prompt_mask,
        completion_ids: None,
        completion_mask: &completion_mask,
    };
    let plan = plan(&batch, Grouping::Sizes(group_sizes), Sharing::Prompts)?;
    Ok((
        CompatLayout {
            groups,
            samples,
            width,
            max_prefix,
            max_suffix,
            padding_mask,
            grouped_prefix,
            grouped_suffix,
            ungrouped_prefix,
            ungrouped_suffix,
            sample_group,
        },
        plan,
    ))
}

/// Flat row-major positions of the true entries of a mask (like `nonzero`, flattened).
pub fn mask_positions(mask: &[bool]) -> Vec<i64> {
    mask.iter().enumerate().filter(|(_, &m)| m).map(|(i, _)| i as i64).collect()
}
