use super::*;
use proptest::prelude::*;

/// A row: (left pad, prompt tokens, right pad) and (left pad, completion length, right pad).
#[derive(Debug, Clone)]
struct Rows {
    lp: usize,
    lc: usize,
    ids: Vec<i64>,
    pmask: Vec<bool>,
    cmask: Vec<bool>,
}

impl Rows {
    fn new(prompts: &[Vec<i64>], comp_lens: &[usize], left_pad_prompt: bool, left_pad_comp: bool) -> Rows {
        let lp = prompts.iter().map(|p| p.len()).max().unwrap_or(0) + 1;
        let lc = comp_lens.iter().copied().max().unwrap_or(0) + 1;
        let (mut ids, mut pmask, mut cmask) = (vec![], vec![], vec![]);
        for (p, &c) in prompts.iter().zip(comp_lens) {
            let pad = lp - p.len();
            let (l, r) = if left_pad_prompt { (pad, 0) } else { (0, pad) };
            ids.extend(std::iter::repeat(-7).take(l).chain(p.iter().copied()).chain(std::iter::repeat(-7).take(r)));
            pmask.extend((0..lp).map(|j| j >= l && j < l + p.len()));
            let pad = lc - c;
            let l = if left_pad_comp { pad } else { 0 };
            cmask.extend((0..lc).map(|j| j >= l && j < l + c));
        }
        Rows { lp, lc, ids, pmask, cmask }
    }

    fn batch(&self) -> Batch<'_> {
        Batch {
            rows: self.pmask.len() / self.lp,
            prompt_width: self.lp,
            completion_width: self.lc,
            prompt_ids: &self.ids,
            prompt_mask: &self.pmask,
            completion_mask: &self.cmask,
        }
    }
}

fn valid_prompt(rows: &Rows, r: usize) -> Vec<i64> {
    (0..rows.lp).filter(|&j| rows.pmask[r * rows.lp + j]).map(|j| rows.ids[r * rows.lp + j]).collect()
}

/// Check every property of a plan against the batch, independently of how the planner computed it.
fn check_plan(rows: &Rows, p: &Plan) {
    let b = rows.pmask.len() / rows.lp;
    let (lp, lc) = (rows.lp, rows.lc);
    let t = p.num_tokens();
    assert_eq!(p.src_index.len(), t);
    assert_eq!(p.position_ids.len(), t);
    assert_eq!(p.group_sizes.iter().sum::<usize>(), b);
    assert_eq!(p.group_sizes.len() + 1, p.cu_prefix.len());

    // Groups: members share their valid prompt; rows_in_order is a permutation consistent with row_group.
    let mut seen = vec![false; b];
    let mut k = 0;
    for (g, &size) in p.group_sizes.iter().enumerate() {
        let members = &p.rows_in_order[k..k + size];
        assert!(members.windows(2).all(|w| w[0] < w[1]), "rows keep input order within a group");
        for &r in members {
            assert!(!seen[r]);
            seen[r] = true;
            assert_eq!(p.row_group[r], g as i64);
            assert_eq!(valid_prompt(rows, r), valid_prompt(rows, members[0]));
        }
        let plen = (p.cu_prefix[g + 1] - p.cu_prefix[g]) as usize;
        assert_eq!(plen, valid_prompt(rows, members[0]).len());
        k += size;
    }
    assert!(seen.iter().all(|&s| s));

    // Every valid completion token appears exactly once; the prefix region holds one copy of each prompt.
    let valid_comp: usize = rows.cmask.iter().filter(|&&m| m).count();
    assert_eq!(p.completion_tokens, valid_comp);
    let mut hits = vec![0u32; b * lp + b * lc];
    for &s in &p.src_index {
        hits[s as usize] += 1;
    }
    for f in 0..b * lc {
        assert_eq!(hits[b * lp + f], rows.cmask[f] as u32, "completion token {f}");
    }
    for f in 0..b * lp {
        assert!(hits[f] <= 1);
        if hits[f] == 1 {
            assert!(rows.pmask[f]);
        }
    }
    assert!(p.src_index[..p.prefix_tokens].iter().all(|&s| (s as usize) < b * lp));
    assert!(p.src_index[p.prefix_tokens..].iter().all(|&s| (s as usize) >= b * lp));

    // Segment tables and positions.
    let mut comp_seg = 0;
    for (g, &size) in p.group_sizes.iter().enumerate() {
        let (ps, pe) = (p.cu_prefix[g] as usize, p.cu_prefix[g + 1] as usize);
        let pos: Vec<i64> = p.position_ids[ps..pe].to_vec();
        assert_eq!(pos, (0..(pe - ps) as i64).collect::<Vec<_>>());
        assert_eq!(p.cu_group_completions[g], p.cu_completions[comp_seg]);
        for &r in &p.rows_in_order[comp_seg..comp_seg + size] {
            let (cs, ce) = (p.cu_completions[comp_seg] as usize, p.cu_completions[comp_seg + 1] as usize);
            let row_len = (0..lc).filter(|&j| rows.cmask[r * lc + j]).count();
            assert_eq!(ce - cs, row_len);
            for i in 0..ce - cs {
                let packed = p.prefix_tokens + cs + i;
                assert_eq!(p.position_ids[packed], (pe - ps + i) as i64);
                let flat = p.completion_flat[cs + i] as usize;
                assert_eq!(flat / lc, r, "completion token belongs to its row");
                assert_eq!(p.src_index[packed] as usize, b * lp + flat);
                // The predictor is the previous token of the same row, or the group's last prompt token.
                let want = if i == 0 { pe as i64 - 1 } else { packed as i64 - 1 };
                assert_eq!(p.predictor[cs + i], want);
            }
            comp_seg += 1;
        }
        assert_eq!(p.cu_group_completions[g + 1], p.cu_completions[comp_seg]);
    }
    assert_eq!(p.completion_flat.len(), p.completion_tokens);
    let seg_max = |cu: &[i32]| cu.windows(2).map(|w| (w[1] - w[0]) as usize).max().unwrap_or(0);
    assert_eq!(p.max_prefix, seg_max(&p.cu_prefix));
    assert_eq!(p.max_completion, seg_max(&p.cu_completions));
    assert_eq!(p.max_group_completions, seg_max(&p.cu_group_completions));

    // The self-attention table: the prefix segments then the completion segments, tiling [0, T) in order.
    let cu_self = p.cu_self();
    assert_eq!(cu_self.len(), p.cu_prefix.len() + p.cu_completions.len() - 1);
    assert_eq!((cu_self[0], *cu_self.last().unwrap()), (0, t as i32));
    assert_eq!(&cu_self[..p.cu_prefix.len()], &p.cu_prefix[..]);
    for (i, w) in p.cu_completions.windows(2).enumerate() {
        let s = p.cu_prefix.len() - 1 + i;
        assert_eq!(cu_self[s], p.prefix_tokens as i32 + w[0]);
        assert_eq!(cu_self[s + 1] - cu_self[s], w[1] - w[0]);
    }
    assert_eq!(seg_max(&cu_self), p.max_prefix.max(p.max_completion));

    // Each row's stock sequence: its valid prompt and completion tokens, counted from the masks.
    let stock_len = |r: usize| valid_prompt(rows, r).len() + (0..lc).filter(|&j| rows.cmask[r * lc + j]).count();
    let want: Vec<usize> = p.rows_in_order.iter().map(|&r| stock_len(r)).collect();
    assert_eq!(p.seqlens().collect::<Vec<_>>(), want);
    assert_eq!(p.max_seqlen(), *want.iter().max().unwrap());
    assert_eq!(p.min_seqlen(), *want.iter().min().unwrap());
}

/// Runs cover exactly the non-empty segments, in order, each as consecutive equal-length slices.
fn check_runs(cu_q: &[i32], cu_k: &[i32]) {
    let runs = runs_from_lengths(cu_q, cu_k);
    let mut expanded = vec![];
    for r in &runs {
        assert!(r.count >= 1 && r.q_len >= 1);
        for i in 0..r.count {
            expanded.push((r.q_start + i * r.q_len, r.q_len, r.k_start + i * r.k_len, r.k_len));
        }
    }
    let want: Vec<_> = (0..cu_q.len() - 1)
        .filter(|&i| cu_q[i + 1] > cu_q[i])
        .map(|i| {
            let q = (cu_q[i] as usize, (cu_q[i + 1] - cu_q[i]) as usize);
            let k = (cu_k[i] as usize, (cu_k[i + 1] - cu_k[i]) as usize);
            (q.0, q.1, k.0, k.1)
        })
        .collect();
    assert_eq!(expanded, want);
}

#[test]
fn two_groups_shuffled() {
    let prompts = vec![vec![1, 2, 3], vec![9, 9], vec![1, 2, 3], vec![9, 9], vec![1, 2, 3]];
    let rows = Rows::new(&prompts, &[2, 1, 0, 3, 1], true, false);
    let p = plan(&rows.batch(), Grouping::ByPrompt).unwrap();
    assert_eq!(p.group_sizes, vec![3, 2]);
    assert_eq!(p.row_group, vec![0, 1, 0, 1, 0]);
    assert_eq!(p.rows_in_order, vec![0, 2, 4, 1, 3]);
    assert_eq!(p.cu_prefix, vec![0, 3, 5]);
    assert_eq!(p.cu_completions, vec![0, 2, 2, 3, 4, 7]);
    assert_eq!(p.cu_group_completions, vec![0, 3, 7]);
    assert_eq!(p.position_ids, vec![0, 1, 2, 0, 1, 3, 4, 3, 2, 2, 3, 4]);
    // Completion of row 0 predicted by prefix 0's last token (2), then itself (5).
    assert_eq!(&p.predictor[..3], &[2, 5, 2]);
    assert_eq!(p.stock_tokens(), 3 * 3 + 2 * 2 + 7);
    check_plan(&rows, &p);
}

#[test]
fn declared_groups_must_share_prompts() {
    let rows = Rows::new(&[vec![1, 2], vec![1, 2], vec![1, 3]], &[1, 1, 1], false, false);
    let err = plan(&rows.batch(), Grouping::Sizes(&[3])).unwrap_err();
    assert_eq!(err, PlanError::PromptsDiffer { arg: "group_sizes", first: 0, other: 2 });
    let err = plan(&rows.batch(), Grouping::Labels(&[5, 5, 5])).unwrap_err();
    assert!(err.to_string().starts_with("group_ids: rows 0 and 2"));
    let p = plan(&rows.batch(), Grouping::Sizes(&[2, 1])).unwrap();
    check_plan(&rows, &p);
    let e = plan(&rows.batch(), Grouping::Labels(&[4, 8, 4])).unwrap_err();
    assert_eq!(e, PlanError::PromptsDiffer { arg: "group_ids", first: 0, other: 2 });
}

#[test]
fn bad_inputs_name_the_argument() {
    let rows = Rows::new(&[vec![1, 2], vec![1, 2]], &[1, 1], false, false);
    let e = plan(&rows.batch(), Grouping::Sizes(&[1])).unwrap_err();
    assert_eq!(e.to_string(), "group_sizes: sizes sum to 1 but the batch has 2 rows");
    let e = plan(&rows.batch(), Grouping::Sizes(&[2, 0])).unwrap_err();
    assert!(e.to_string().starts_with("group_sizes:"));
    // Sizes whose sum wraps around usize must not pass for the batch size (nor reach an allocation).
    for sizes in [&[usize::MAX, 3][..], &[1, usize::MAX, 3][..], &[usize::MAX - 1, 4][..]] {
        let e = plan(&rows.batch(), Grouping::Sizes(sizes)).unwrap_err();
        assert_eq!(e.to_string(), "group_sizes: sizes sum to more than the address space but the batch has 2 rows");
    }
    let e = plan(&rows.batch(), Grouping::Labels(&[1])).unwrap_err();
    assert!(e.to_string().starts_with("group_ids:"));

    let mut empty = rows.clone();
    empty.pmask[rows.lp..].iter_mut().for_each(|m| *m = false);
    assert_eq!(plan(&empty.batch(), Grouping::ByPrompt).unwrap_err(), PlanError::EmptyPrompt { row: 1 });

    let holes = Rows::new(&[vec![1, 2], vec![1, 2]], &[3, 1], false, false);
    let mut holes = holes.clone();
    holes.cmask[1] = false; // row 0: [1, 0, 1, 0]
    let e = plan(&holes.batch(), Grouping::ByPrompt).unwrap_err();
    assert_eq!(e, PlanError::NotContiguous { arg: "completion_mask", row: 0 });

    let mut short = rows.clone();
    short.ids.pop();
    let e = plan(&short.batch(), Grouping::ByPrompt).unwrap_err();
    assert!(e.to_string().starts_with("prompt_ids: has 5 elements"));
}

#[test]
fn runs_merge_only_equal_consecutive_segments() {
    assert_eq!(
        runs_from_lengths(&[0, 4, 8, 8, 10], &[0, 3, 6, 9, 12]),
        vec![
            Run { q_start: 0, k_start: 0, count: 2, q_len: 4, k_len: 3 },
            Run { q_start: 8, k_start: 9, count: 1, q_len: 2, k_len: 3 },
        ]
    );
    check_runs(&[0, 4, 8, 8, 10], &[0, 3, 6, 9, 12]);
}

fn batch_strategy() -> impl Strategy<Value = (Rows, Vec<usize>)> {
    // A few distinct prompts, rows drawn from them in any order, ragged completions (0 allowed).
    (1usize..5, 1usize..12, any::<bool>(), any::<bool>()).prop_flat_map(|(n_prompts, n_rows, lpad, lcpad)| {
        (
            prop::collection::vec(prop::collection::vec(0i64..4, 1..9), n_prompts),
            prop::collection::vec((0..n_prompts, 0usize..7), n_rows),
            Just(lpad),
            Just(lcpad),
        )
            .prop_map(|(prompts, picks, lpad, lcpad)| {
                let chosen: Vec<Vec<i64>> = picks.iter().map(|&(i, _)| prompts[i].clone()).collect();
                let lens: Vec<usize> = picks.iter().map(|&(_, c)| c).collect();
                let labels = picks.iter().map(|&(i, _)| i).collect();
                (Rows::new(&chosen, &lens, lpad, lcpad), labels)
            })
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(400))]

    #[test]
    fn plans_by_prompt_are_consistent((rows, _) in batch_strategy()) {
        let p = plan(&rows.batch(), Grouping::ByPrompt).unwrap();
        check_plan(&rows, &p);
        check_runs(&p.cu_prefix, &p.cu_prefix);
        check_runs(&p.cu_group_completions, &p.cu_prefix);
        check_runs(&p.cu_completions, &p.cu_completions);
        check_runs(&p.cu_self(), &p.cu_self());
        // Identical prompts always merge: no two groups share a prompt.
        let firsts: Vec<Vec<i64>> = (0..p.group_sizes.len())
            .map(|g| {
                let r = p.row_group.iter().position(|&x| x == g as i64).unwrap();
                valid_prompt(&rows, r)
            })
            .collect();
        for i in 0..firsts.len() {
            for j in i + 1..firsts.len() {
                prop_assert_ne!(&firsts[i], &firsts[j]);
            }
        }
    }

    #[test]
    fn plans_by_label_are_consistent((rows, labels) in batch_strategy(), salt in any::<u64>()) {
        let ids: Vec<u64> = labels.iter().map(|&l| (l as u64).wrapping_mul(0x9E37_79B9).wrapping_add(salt)).collect();
        // Labels picked from the same prompt index always share the prompt, so the plan must succeed.
        let p = plan(&rows.batch(), Grouping::Labels(&ids)).unwrap();
        check_plan(&rows, &p);
    }

    #[test]
    fn window_keys_are_each_rows_last_keys((rows, _) in batch_strategy(), window in 1usize..12) {
        let p = plan(&rows.batch(), Grouping::ByPrompt).unwrap();
        let w = p.window_keys(window);
        prop_assert_eq!(w.cu_k.len(), p.cu_completions.len());
        prop_assert_eq!(*w.cu_k.last().unwrap() as usize, w.gather.len());
        let mut c = 0;
        for (g, &size) in p.group_sizes.iter().enumerate() {
            let (p0, p1) = (p.cu_prefix[g] as usize, p.cu_prefix[g + 1] as usize);
            for _ in 0..size {
                let (c0, c1) = (p.cu_completions[c] as usize, p.cu_completions[c + 1] as usize);
                let keys = &w.gather[w.cu_k[c] as usize..w.cu_k[c + 1] as usize];
                let (plen, slen) = (p1 - p0, c1 - c0);
                if slen == 0 {
                    prop_assert!(keys.is_empty());
                } else {
                    let tail = (window - 1).min(plen);
                    prop_assert_eq!(keys.len(), tail + slen);
                    // The group's last prompt tokens, then the completion's own rows, in stock position order.
                    let pos: Vec<i64> = keys.iter().map(|&k| p.position_ids[k as usize]).collect();
                    let want: Vec<i64> = ((plen - tail) as i64..(plen + slen) as i64).collect();
                    prop_assert_eq!(pos, want);
                    prop_assert!(keys[..tail].iter().all(|&k| (p0..p1).contains(&(k as usize))));
                    let own: Vec<i64> = (c0..c1).map(|r| (p.prefix_tokens + r) as i64).collect();
                    prop_assert_eq!(&keys[tail..], &own[..]);
                    prop_assert!(keys.len() <= w.max_k);
                }
                c += 1;
            }
        }
    }

    #[test]
    fn group_size_one_is_valid((rows, _) in batch_strategy()) {
        let b = rows.pmask.len() / rows.lp;
        let ones = vec![1usize; b];
        let p = plan(&rows.batch(), Grouping::Sizes(&ones)).unwrap();
        prop_assert_eq!(p.group_sizes.len(), b);
        check_plan(&rows, &p);
        prop_assert_eq!(p.stock_tokens(), p.num_tokens());
    }
}

mod compat_layout {
    use crate::compat::{compat_layout, mask_positions, Padding};
    use proptest::prelude::*;

    #[test]
    fn two_groups_left_and_right() {
        // Group 0: prefix 2, suffixes [1, 2]; group 1: prefix 3, suffix [1]. Totals 5 and 4.
        let (l, p) = compat_layout(&[2, 3], &[1, 2, 1], &[2, 1], Padding::Right).unwrap();
        assert_eq!(l.width, 5);
        assert_eq!(l.grouped_prefix, vec![0, 1, 5, 6, 7]);
        assert_eq!(l.grouped_suffix, vec![2, 3, 4, 8]);
        assert_eq!(l.ungrouped_prefix, vec![1, 2, 3, 4, 5]); // [2, 3] left-padded in width 3
        assert_eq!(l.ungrouped_suffix, vec![0, 2, 3, 4]); // [3 samples, width 2]
        assert_eq!(l.sample_group, vec![0, 0, 1]);
        assert_eq!(p.group_sizes, vec![2, 1]);
        assert_eq!(p.cu_prefix, vec![0, 2, 5]);
        assert_eq!(p.cu_completions, vec![0, 1, 3, 4]);
        let (l, _) = compat_layout(&[2, 3], &[1, 2, 1], &[2, 1], Padding::Left).unwrap();
        assert_eq!(l.grouped_prefix, vec![0, 1, 6, 7, 8]);
        assert_eq!(l.padding_mask[5], false);
    }

    #[test]
    fn mask_padding_is_checked() {
        let mask = [true, false, true, true, false, true];
        let (l, _) = compat_layout(&[1, 1], &[1, 1], &[1, 1], Padding::Mask { mask: &mask, width: 3 }).unwrap();
        assert_eq!(l.grouped_prefix, vec![0, 3]);
        assert_eq!(l.grouped_suffix, vec![2, 5]);
        let bad = [true, true, true, true, false, true];
        assert!(compat_layout(&[1, 1], &[1, 1], &[1, 1], Padding::Mask { mask: &bad, width: 3 }).is_err());
        assert!(compat_layout(&[1], &[1, 1], &[1], Padding::Right).is_err());
        assert_eq!(mask_positions(&mask), vec![0, 2, 3, 5]);
    }

    proptest! {
        #[test]
        fn packed_order_covers_the_grouped_layout(
            groups in prop::collection::vec((1usize..9, prop::collection::vec(0usize..6, 1..4)), 1..5),
            left in any::<bool>(),
        ) {
            let prefix: Vec<usize> = groups.iter().map(|g| g.0).collect();
            let sizes: Vec<usize> = groups.iter().map(|g| g.1.len()).collect();
            let suffix: Vec<usize> = groups.iter().flat_map(|g| g.1.clone()).collect();
            let pad = if left { Padding::Left } else { Padding::Right };
            let (l, p) = compat_layout(&prefix, &suffix, &sizes, pad).unwrap();
            let mut all: Vec<i64> = l.grouped_prefix.iter().chain(&l.grouped_suffix).copied().collect();
            prop_assert_eq!(all.len(), p.num_tokens());
            all.sort();
            prop_assert_eq!(all, mask_positions(&l.padding_mask));
            prop_assert_eq!(l.ungrouped_prefix.len(), p.prefix_tokens);
            prop_assert_eq!(l.ungrouped_suffix.len(), p.completion_tokens);
        }
    }
}
