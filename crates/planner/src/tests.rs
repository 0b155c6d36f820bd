use super::*;
use proptest::prelude::*;

/// A row: (left pad, prompt tokens, right pad) and (left pad, completion length, right pad).
#[derive(Debug, Clone)]
struct Rows {
    lp: usize,
    lc: usize,
    ids: Vec<i64>,
    pmask: Vec<bool>,
    cids: Vec<i64>,
    cmask: Vec<bool>,
}

impl Rows {
    /// Rows whose completions (`comp_lens` tokens each) share no token.
    fn new(prompts: &[Vec<i64>], comp_lens: &[usize], left_pad_prompt: bool, left_pad_comp: bool) -> Rows {
        let comps: Vec<Vec<i64>> =
            comp_lens.iter().enumerate().map(|(r, &c)| (0..c as i64).map(|j| 1000 * (r as i64 + 1) + j).collect()).collect();
        Rows::with_ids(prompts, &comps, left_pad_prompt, left_pad_comp)
    }

    fn with_ids(prompts: &[Vec<i64>], comps: &[Vec<i64>], left_pad_prompt: bool, left_pad_comp: bool) -> Rows {
        let lp = prompts.iter().map(|p| p.len()).max().unwrap_or(0) + 1;
        let lc = comps.iter().map(|c| c.len()).max().unwrap_or(0) + 1;
        let (mut ids, mut pmask, mut cids, mut cmask) = (vec![], vec![], vec![], vec![]);
        for (p, c) in prompts.iter().zip(comps) {
            let pad = lp - p.len();
            let (l, r) = if left_pad_prompt { (pad, 0) } else { (0, pad) };
            ids.extend(std::iter::repeat_n(-7, l).chain(p.iter().copied()).chain(std::iter::repeat_n(-7, r)));
            pmask.extend((0..lp).map(|j| j >= l && j < l + p.len()));
            let pad = lc - c.len();
            let (l, r) = if left_pad_comp { (pad, 0) } else { (0, pad) };
            cids.extend(std::iter::repeat_n(-9, l).chain(c.iter().copied()).chain(std::iter::repeat_n(-9, r)));
            cmask.extend((0..lc).map(|j| j >= l && j < l + c.len()));
        }
        Rows { lp, lc, ids, pmask, cids, cmask }
    }

    fn batch(&self) -> Batch<'_> {
        Batch {
            rows: self.pmask.len() / self.lp,
            prompt_width: self.lp,
            completion_width: self.lc,
            prompt_ids: &self.ids,
            prompt_mask: &self.pmask,
            completion_ids: Some(&self.cids),
            completion_mask: &self.cmask,
        }
    }
}

fn valid_prompt(rows: &Rows, r: usize) -> Vec<i64> {
    (0..rows.lp).filter(|&j| rows.pmask[r * rows.lp + j]).map(|j| rows.ids[r * rows.lp + j]).collect()
}

/// The two-level view of a plan that shares whole prompts.
struct TwoLevel {
    cu_prefix: Vec<i32>,
    cu_completions: Vec<i32>,
    cu_group_completions: Vec<i32>,
    cu_self: Vec<i32>,
    prefix_tokens: usize,
    completion_tokens: usize,
}

fn two(p: &Plan) -> TwoLevel {
    let l = &p.layout;
    assert_eq!(l.levels(), 2);
    TwoLevel {
        cu_prefix: l.level_table(0),
        cu_completions: l.level_table(1),
        cu_group_completions: l.cross_table(0, 1),
        cu_self: l.cu_nodes.clone(),
        prefix_tokens: l.level_tokens(0),
        completion_tokens: l.level_tokens(1),
    }
}

fn by_prompt(rows: &Rows, grouping: Grouping<'_>) -> Result<Plan, PlanError> {
    plan(&rows.batch(), grouping, Sharing::Prompts)
}

/// Check every property of a plan against the batch, independently of how the planner computed it.
fn check_plan(rows: &Rows, p: &Plan) {
    let v = two(p);
    let b = rows.pmask.len() / rows.lp;
    let (lp, lc) = (rows.lp, rows.lc);
    let t = p.num_tokens();
    assert_eq!(p.src_index.len(), t);
    assert_eq!(p.position_ids.len(), t);
    assert_eq!(p.group_sizes.iter().sum::<usize>(), b);
    assert_eq!(p.group_sizes.len() + 1, v.cu_prefix.len());

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
        let plen = (v.cu_prefix[g + 1] - v.cu_prefix[g]) as usize;
        assert_eq!(plen, valid_prompt(rows, members[0]).len());
        k += size;
    }
    assert!(seen.iter().all(|&s| s));

    // Every valid completion token appears exactly once; the prefix region holds one copy of each prompt.
    let valid_comp: usize = rows.cmask.iter().filter(|&&m| m).count();
    assert_eq!(v.completion_tokens, valid_comp);
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
    assert!(p.src_index[..v.prefix_tokens].iter().all(|&s| (s as usize) < b * lp));
    assert!(p.src_index[v.prefix_tokens..].iter().all(|&s| (s as usize) >= b * lp));

    // Segment tables and positions.
    let mut comp_seg = 0;
    for (g, &size) in p.group_sizes.iter().enumerate() {
        let (ps, pe) = (v.cu_prefix[g] as usize, v.cu_prefix[g + 1] as usize);
        let pos: Vec<i64> = p.position_ids[ps..pe].to_vec();
        assert_eq!(pos, (0..(pe - ps) as i64).collect::<Vec<_>>());
        assert_eq!(v.cu_group_completions[g], v.cu_completions[comp_seg]);
        for &r in &p.rows_in_order[comp_seg..comp_seg + size] {
            let (cs, ce) = (v.cu_completions[comp_seg] as usize, v.cu_completions[comp_seg + 1] as usize);
            let row_len = (0..lc).filter(|&j| rows.cmask[r * lc + j]).count();
            assert_eq!(ce - cs, row_len);
            for i in 0..ce - cs {
                let packed = v.prefix_tokens + cs + i;
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
        assert_eq!(v.cu_group_completions[g + 1], v.cu_completions[comp_seg]);
    }
    assert_eq!(p.completion_flat.len(), v.completion_tokens);
    assert!(p.entry_scored.is_empty(), "a one-level plan scores each completion token once");
    assert_eq!(p.scored_tail(), Some(v.prefix_tokens));
    let seg_max = max_segment;

    // The self-attention table: the prefix segments then the completion segments, tiling [0, T) in order.
    let cu_self = v.cu_self.clone();
    assert_eq!(cu_self.len(), v.cu_prefix.len() + v.cu_completions.len() - 1);
    assert_eq!((cu_self[0], *cu_self.last().unwrap()), (0, t as i32));
    assert_eq!(&cu_self[..v.cu_prefix.len()], &v.cu_prefix[..]);
    for (i, w) in v.cu_completions.windows(2).enumerate() {
        let s = v.cu_prefix.len() - 1 + i;
        assert_eq!(cu_self[s], v.prefix_tokens as i32 + w[0]);
        assert_eq!(cu_self[s + 1] - cu_self[s], w[1] - w[0]);
    }
    assert_eq!(seg_max(&cu_self), seg_max(&v.cu_prefix).max(seg_max(&v.cu_completions)));

    // Each row's stock sequence: its valid prompt and completion tokens, counted from the masks.
    let stock_len = |r: usize| valid_prompt(rows, r).len() + (0..lc).filter(|&j| rows.cmask[r * lc + j]).count();
    let want: Vec<usize> = p.rows_in_order.iter().map(|&r| stock_len(r)).collect();
    let lens: Vec<usize> = p.row_lens().collect();
    let got: Vec<usize> = p.rows_in_order.iter().map(|&r| lens[r]).collect();
    assert_eq!(got, want);
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
    let p = by_prompt(&rows, Grouping::ByPrompt).unwrap();
    let v = two(&p);
    assert_eq!(p.group_sizes, vec![3, 2]);
    assert_eq!(p.row_group, vec![0, 1, 0, 1, 0]);
    assert_eq!(p.rows_in_order, vec![0, 2, 4, 1, 3]);
    assert_eq!(v.cu_prefix, vec![0, 3, 5]);
    assert_eq!(v.cu_completions, vec![0, 2, 2, 3, 4, 7]);
    assert_eq!(v.cu_group_completions, vec![0, 3, 7]);
    assert_eq!(p.position_ids, vec![0, 1, 2, 0, 1, 3, 4, 3, 2, 2, 3, 4]);
    // Completion of row 0 predicted by prefix 0's last token (2), then itself (5).
    assert_eq!(&p.predictor[..3], &[2, 5, 2]);
    assert_eq!(p.stock_tokens(), 3 * 3 + 2 * 2 + 7);
    check_plan(&rows, &p);
}

#[test]
fn declared_groups_must_share_prompts() {
    let rows = Rows::new(&[vec![1, 2], vec![1, 2], vec![1, 3]], &[1, 1, 1], false, false);
    let err = by_prompt(&rows, Grouping::Sizes(&[3])).unwrap_err();
    assert_eq!(err, PlanError::PromptsDiffer { arg: "group_sizes", first: 0, other: 2 });
    let err = by_prompt(&rows, Grouping::Labels(&[5, 5, 5])).unwrap_err();
    assert!(err.to_string().starts_with("group_ids: rows 0 and 2"));
    let p = by_prompt(&rows, Grouping::Sizes(&[2, 1])).unwrap();
    check_plan(&rows, &p);
    let e = by_prompt(&rows, Grouping::Labels(&[4, 8, 4])).unwrap_err();
    assert_eq!(e, PlanError::PromptsDiffer { arg: "group_ids", first: 0, other: 2 });
}

#[test]
fn bad_inputs_name_the_argument() {
    let rows = Rows::new(&[vec![1, 2], vec![1, 2]], &[1, 1], false, false);
    let e = by_prompt(&rows, Grouping::Sizes(&[1])).unwrap_err();
    assert_eq!(e.to_string(), "group_sizes: sizes sum to 1 but the batch has 2 rows");
    let e = by_prompt(&rows, Grouping::Sizes(&[2, 0])).unwrap_err();
    assert!(e.to_string().starts_with("group_sizes:"));
    // Sizes whose sum wraps around usize must not pass for the batch size (nor reach an allocation).
    for sizes in [&[usize::MAX, 3][..], &[1, usize::MAX, 3][..], &[usize::MAX - 1, 4][..]] {
        let e = by_prompt(&rows, Grouping::Sizes(sizes)).unwrap_err();
        assert_eq!(e.to_string(), "group_sizes: sizes sum to more than the address space but the batch has 2 rows");
    }
    let e = by_prompt(&rows, Grouping::Labels(&[1])).unwrap_err();
    assert!(e.to_string().starts_with("group_ids:"));

    let mut empty = rows.clone();
    empty.pmask[rows.lp..].iter_mut().for_each(|m| *m = false);
    assert_eq!(by_prompt(&empty, Grouping::ByPrompt).unwrap_err(), PlanError::EmptyPrompt { row: 1 });

    let holes = Rows::new(&[vec![1, 2], vec![1, 2]], &[3, 1], false, false);
    let mut holes = holes.clone();
    holes.cmask[1] = false; // row 0: [1, 0, 1, 0]
    let e = by_prompt(&holes, Grouping::ByPrompt).unwrap_err();
    assert_eq!(e, PlanError::NotContiguous { arg: "completion_mask", row: 0 });

    let mut short = rows.clone();
    short.ids.pop();
    let e = by_prompt(&short, Grouping::ByPrompt).unwrap_err();
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
        let p = by_prompt(&rows, Grouping::ByPrompt).unwrap();
        check_plan(&rows, &p);
        let v = two(&p);
        check_runs(&v.cu_prefix, &v.cu_prefix);
        check_runs(&v.cu_group_completions, &v.cu_prefix);
        check_runs(&v.cu_completions, &v.cu_completions);
        check_runs(&v.cu_self, &v.cu_self);
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
        let p = by_prompt(&rows, Grouping::Labels(&ids)).unwrap();
        check_plan(&rows, &p);
    }

    #[test]
    fn window_keys_are_each_rows_last_keys((rows, _) in batch_strategy(), window in 1usize..12) {
        let p = by_prompt(&rows, Grouping::ByPrompt).unwrap();
        let w = p.window_keys(window);
        let v = two(&p);
        prop_assert_eq!(w.cu_k.len(), v.cu_completions.len());
        prop_assert_eq!(*w.cu_k.last().unwrap() as usize, w.gather.len());
        let mut c = 0;
        for (g, &size) in p.group_sizes.iter().enumerate() {
            let (p0, p1) = (v.cu_prefix[g] as usize, v.cu_prefix[g + 1] as usize);
            for _ in 0..size {
                let (c0, c1) = (v.cu_completions[c] as usize, v.cu_completions[c + 1] as usize);
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
                    let own: Vec<i64> = (c0..c1).map(|r| (v.prefix_tokens + r) as i64).collect();
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
        let p = by_prompt(&rows, Grouping::Sizes(&ones)).unwrap();
        prop_assert_eq!(p.group_sizes.len(), b);
        check_plan(&rows, &p);
        prop_assert_eq!(p.stock_tokens(), p.num_tokens());
    }
}


// -- prefix trees ---------------------------------------------------------------------------------------------

fn tree_plan(rows: &Rows, grouping: Grouping<'_>, max_depth: usize, min_node: usize) -> Plan {
    plan(&rows.batch(), grouping, Sharing::Tree { max_depth, min_node }).unwrap()
}

/// Row `r`'s stock sequence: valid prompt tokens, then valid completion tokens.
fn sequence(rows: &Rows, r: usize) -> Vec<i64> {
    let mut s = valid_prompt(rows, r);
    s.extend((0..rows.lc).filter(|&j| rows.cmask[r * rows.lc + j]).map(|j| rows.cids[r * rows.lc + j]));
    s
}

/// Check a prefix-tree plan against the batch, independently of how the planner built it: every scored token and
/// its predictor see exactly their row's tokens before them (position and id) through the layout's attention
/// calls (their node causally, every ancestor node whole); the layout is level-major; limits hold.
fn check_tree(rows: &Rows, p: &Plan, max_depth: usize, min_node: usize) {
    let b = rows.pmask.len() / rows.lp;
    let (lp, lc) = (rows.lp, rows.lc);
    let l = &p.layout;
    let t = p.num_tokens();
    assert_eq!((p.src_index.len(), p.position_ids.len()), (t, t));
    let tok = |i: usize| {
        let s = p.src_index[i] as usize;
        if s < b * lp { rows.ids[s] } else { rows.cids[s - b * lp] }
    };
    // Level-major: each level's nodes ordered by parent, parents one level up; then every cross call's query
    // segments are the subtrees' tokens.
    assert!(l.levels() <= max_depth + 1, "{} levels, limit {}", l.levels(), max_depth + 1);
    let nodes = l.parent.len();
    assert_eq!(l.cu_nodes.len(), nodes + 1);
    for d in 0..l.levels() {
        assert!(l.level_nodes[d] < l.level_nodes[d + 1], "level {d} is empty");
        for n in l.level_nodes[d]..l.level_nodes[d + 1] {
            assert!(l.cu_nodes[n + 1] > l.cu_nodes[n], "node {n} is empty");
            if d == 0 {
                assert_eq!(l.parent[n], NO_PARENT);
            } else {
                let parent = l.parent[n] as usize;
                assert!((l.level_nodes[d - 1]..l.level_nodes[d]).contains(&parent));
                if n > l.level_nodes[d] {
                    assert!(l.parent[n - 1] as usize <= parent, "level {d} is not ordered by parent");
                }
            }
        }
    }
    let ancestors = |mut n: usize| {
        let mut up = vec![];
        while l.parent[n] != NO_PARENT {
            n = l.parent[n] as usize;
            up.push(n);
        }
        up
    };
    for d in 1..l.levels() {
        for a in 0..d {
            let cu = l.cross_table(a, d);
            let (a0, d_start) = (l.level_nodes[a], l.level_span(d).0);
            for n in l.level_nodes[d]..l.level_nodes[d + 1] {
                let up = ancestors(n)[d - a - 1] - a0;
                let (s, e) = (l.cu_nodes[n] as usize - d_start, l.cu_nodes[n + 1] as usize - d_start);
                assert!(cu[up] as usize <= s && e <= cu[up + 1] as usize, "cross({a}, {d}) misses node {n}");
            }
        }
    }
    // Internal nodes are at least min_node long, or hold a prompt's last token.
    for n in 0..nodes {
        let (s, e) = (l.cu_nodes[n] as usize, l.cu_nodes[n + 1] as usize);
        let holds_prompt_end = (s..e).any(|i| {
            let src = p.src_index[i] as usize;
            src < b * lp && (src % lp + 1 == lp || !rows.pmask[src + 1])
        });
        if l.parent.contains(&(n as u32)) && !holds_prompt_end {
            assert!(e - s >= min_node, "internal node {n} is short");
        }
    }
    let node_of = |i: usize| l.cu_nodes.partition_point(|&c| c as usize <= i) - 1;
    // What packed token i sees: (position, id) of its ancestors' tokens and its node's tokens up to itself.
    let sees = |i: usize| {
        let n = node_of(i);
        let mut seen: Vec<(i64, i64)> = vec![];
        for a in ancestors(n) {
            seen.extend((l.cu_nodes[a] as usize..l.cu_nodes[a + 1] as usize).map(|k| (p.position_ids[k], tok(k))));
        }
        seen.extend((l.cu_nodes[n] as usize..=i).map(|k| (p.position_ids[k], tok(k))));
        seen.sort();
        seen
    };
    let stock = |r: usize, upto: usize| -> Vec<(i64, i64)> {
        sequence(rows, r)[..upto].iter().enumerate().map(|(i, &x)| (i as i64, x)).collect()
    };
    // Entries: every valid completion position of every row once, each scoring a token that sees its row.
    let mut covered = vec![false; b * lc];
    assert_eq!(p.scored.len(), p.predictor.len());
    assert!(p.scored.windows(2).all(|w| w[0] < w[1]));
    for (e, &flat) in p.completion_flat.iter().enumerate() {
        let flat = flat as usize;
        assert!(rows.cmask[flat] && !covered[flat]);
        covered[flat] = true;
        let (r, col) = (flat / lc, flat % lc);
        let j = (0..col).filter(|&c| rows.cmask[r * lc + c]).count();
        let plen = valid_prompt(rows, r).len();
        let s = if p.entry_scored.is_empty() { e } else { p.entry_scored[e] as usize };
        let (target, pred) = (p.scored[s] as usize, p.predictor[s] as usize);
        assert_eq!(sees(target), stock(r, plen + j + 1), "row {r} completion token {j}");
        assert_eq!(sees(pred), stock(r, plen + j), "row {r} predictor of completion token {j}");
        assert_eq!(p.position_ids[target], p.position_ids[pred] + 1);
    }
    assert!(covered.iter().zip(&rows.cmask).all(|(&c, &m)| c == m));
    if !p.entry_scored.is_empty() {
        assert_eq!(p.entry_scored.len(), p.completion_flat.len());
    }
    let want: Vec<usize> = (0..b).map(|r| sequence(rows, r).len()).collect();
    assert_eq!(p.row_lens().collect::<Vec<_>>(), want);
    // Each node stands for as many rows as hold its tokens: the weights sum to the stock token count.
    let weighted: usize = (0..nodes).map(|n| p.node_rows[n] * (l.cu_nodes[n + 1] - l.cu_nodes[n]) as usize).sum();
    assert_eq!(weighted, p.stock_tokens());
    for n in 0..nodes {
        let children: usize = (0..nodes).filter(|&c| l.parent[c] == n as u32).map(|c| p.node_rows[c]).sum();
        assert!(p.node_rows[n] >= children.max(1));
    }
    assert!(t <= p.stock_tokens());
}

/// Distinct prefixes of the rows' keyed sequences (token, and the row's group from its prompt's last token on):
/// the tokens a tree without limits packs.
fn distinct_prefixes(rows: &Rows, p: &Plan) -> usize {
    let b = rows.pmask.len() / rows.lp;
    let mut seen = std::collections::HashSet::new();
    for r in 0..b {
        let plen = valid_prompt(rows, r).len();
        let keyed: Vec<(i64, i64)> = sequence(rows, r)
            .into_iter()
            .enumerate()
            .map(|(i, x)| (x, if i + 1 >= plen { p.row_group[r] + 1 } else { 0 }))
            .collect();
        for i in 1..=keyed.len() {
            seen.insert(keyed[..i].to_vec());
        }
    }
    seen.len()
}

#[test]
fn a_shared_system_prompt_is_one_node() {
    let sys = vec![7, 7, 7, 7, 7, 7];
    let prompts: Vec<Vec<i64>> = (0..4).map(|i| [sys.clone(), vec![i, i]].concat()).collect();
    let comps: Vec<Vec<i64>> = (0..4).map(|i| vec![10 + i, 20 + i, 30 + i]).collect();
    let rows = Rows::with_ids(&prompts, &comps, true, false);
    let p = tree_plan(&rows, Grouping::ByPrompt, 4, 1);
    check_tree(&rows, &p, 4, 1);
    assert_eq!(p.num_tokens(), 6 + 4 * (2 + 3));
    assert_eq!(p.layout.levels(), 2);
    assert_eq!(p.layout.level_table(0), vec![0, 6]);
    // A threshold above the shared run pushes it into each row: one node per row.
    let p = tree_plan(&rows, Grouping::ByPrompt, 4, 7);
    check_tree(&rows, &p, 4, 7);
    assert_eq!((p.layout.levels(), p.num_tokens()), (1, 4 * 11));
    // A prompt's node stays, however short: rows of one prompt pack as by prompts.
    let rows = Rows::with_ids(&[vec![1, 2], vec![1, 2], vec![1, 2]], &[vec![5, 6], vec![7], vec![8, 9]], true, false);
    let p = tree_plan(&rows, Grouping::ByPrompt, 4, 64);
    check_tree(&rows, &p, 4, 64);
    let by = by_prompt(&rows, Grouping::ByPrompt).unwrap();
    assert_eq!((&p.layout, &p.src_index, &p.position_ids), (&by.layout, &by.src_index, &by.position_ids));
}

#[test]
fn identical_rows_share_everything_and_score_once() {
    let rows = Rows::with_ids(&[vec![1, 2], vec![1, 2], vec![1, 2]], &[vec![5, 6], vec![5, 6], vec![5]], false, true);
    let p = tree_plan(&rows, Grouping::ByPrompt, 4, 1);
    check_tree(&rows, &p, 4, 1);
    assert_eq!(p.num_tokens(), 4);
    assert_eq!(p.scored, vec![2, 3]);
    assert_eq!(p.completion_flat.len(), 5);
    assert!(!p.entry_scored.is_empty());
}

#[test]
fn tree_rollouts_branch_inside_completions() {
    // One prompt, completions that branch after 4 tokens, one of them twice more.
    let base = vec![3, 1, 4, 1];
    let comps = vec![
        [base.clone(), vec![5, 9, 2, 6]].concat(),
        [base.clone(), vec![5, 9, 8, 8]].concat(),
        [base.clone(), vec![2, 7, 1, 8]].concat(),
        [base.clone(), vec![2, 7, 1, 8]].concat(),
    ];
    let rows = Rows::with_ids(&vec![vec![42, 43, 44]; 4], &comps, true, false);
    let p = tree_plan(&rows, Grouping::ByPrompt, 4, 2);
    check_tree(&rows, &p, 4, 2);
    assert_eq!(p.num_tokens(), distinct_prefixes(&rows, &p));
    assert_eq!(p.layout.levels(), 3);
    // Depth limited to 1: the cheapest node is pushed down.
    let p1 = tree_plan(&rows, Grouping::ByPrompt, 1, 2);
    check_tree(&rows, &p1, 1, 2);
    assert_eq!(p1.layout.levels(), 2);
    assert!(p1.num_tokens() > p.num_tokens());
}

#[test]
fn declared_groups_keep_their_last_prompt_token() {
    // Two groups with one prompt: they share all of it but its last token.
    let rows = Rows::with_ids(&[vec![1, 2, 3], vec![1, 2, 3]], &[vec![4], vec![4]], false, false);
    let p = tree_plan(&rows, Grouping::Labels(&[0, 1]), 4, 1);
    check_tree(&rows, &p, 4, 1);
    assert_eq!(p.num_tokens(), 2 + 2 * 2);
    let p = tree_plan(&rows, Grouping::Labels(&[0, 0]), 4, 1);
    assert_eq!(p.num_tokens(), 4);
}

fn tree_batch_strategy() -> impl Strategy<Value = (Rows, Vec<usize>)> {
    // Prompts: an optional system prompt from a few, then a short user part; completions: a random prefix of
    // their prompt's base completion, then a random tail. Small alphabets, so that sharing happens often.
    (1usize..4, 1usize..10, any::<bool>(), any::<bool>()).prop_flat_map(|(n_prompts, n_rows, lpad, lcpad)| {
        (
            prop::collection::vec(prop::collection::vec(0i64..3, 0..7), 2),
            prop::collection::vec((0usize..2, prop::collection::vec(0i64..3, 1..4), prop::collection::vec(0i64..3, 0..8)), n_prompts),
            prop::collection::vec((0..n_prompts, 0usize..9, prop::collection::vec(0i64..3, 0..4)), n_rows),
            Just(lpad),
            Just(lcpad),
        )
            .prop_map(|(systems, prompts, picks, lpad, lcpad)| {
                let prompt = |i: usize| [systems[prompts[i].0].clone(), prompts[i].1.clone()].concat();
                let chosen: Vec<Vec<i64>> = picks.iter().map(|&(i, _, _)| prompt(i)).collect();
                let comps: Vec<Vec<i64>> = picks
                    .iter()
                    .map(|(i, keep, tail)| {
                        let base = &prompts[*i].2;
                        [base[..(*keep).min(base.len())].to_vec(), tail.clone()].concat()
                    })
                    .collect();
                let labels = picks.iter().map(|&(i, _, _)| i).collect();
                (Rows::with_ids(&chosen, &comps, lpad, lcpad), labels)
            })
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(400))]

    #[test]
    fn trees_see_each_rows_tokens((rows, labels) in tree_batch_strategy(), max_depth in 1usize..6,
                                  min_node in 1usize..5, declared in any::<bool>()) {
        let ids: Vec<u64> = labels.iter().map(|&l| l as u64).collect();
        let grouping = if declared { Grouping::Labels(&ids) } else { Grouping::ByPrompt };
        let p = tree_plan(&rows, grouping, max_depth, min_node);
        check_tree(&rows, &p, max_depth, min_node);
        let runs_of = |cu: &[i32]| check_runs(cu, cu);
        runs_of(&p.layout.cu_nodes);
        if max_depth >= 8 && min_node == 1 {
            prop_assert_eq!(p.num_tokens(), distinct_prefixes(&rows, &p));
        }
    }

    #[test]
    fn unlimited_trees_pack_each_distinct_prefix_once((rows, _) in tree_batch_strategy()) {
        let p = tree_plan(&rows, Grouping::ByPrompt, usize::MAX, 1);
        check_tree(&rows, &p, usize::MAX - 1, 1);
        prop_assert_eq!(p.num_tokens(), distinct_prefixes(&rows, &p));
    }

    #[test]
    fn trees_never_pack_more_than_prompt_sharing((rows, _) in tree_batch_strategy()) {
        // (A threshold above 1 may pack more: a short shared prompt goes to each row.)
        let tree = tree_plan(&rows, Grouping::ByPrompt, usize::MAX, 1);
        let prompts = by_prompt(&rows, Grouping::ByPrompt).unwrap();
        prop_assert!(tree.num_tokens() <= prompts.num_tokens());
        prop_assert_eq!(tree.by_prompt_tokens(), prompts.num_tokens());
        prop_assert_eq!(prompts.by_prompt_tokens(), prompts.num_tokens());
    }

    #[test]
    fn two_level_trees_take_window_keys((rows, _) in tree_batch_strategy(), window in 1usize..12) {
        let p = tree_plan(&rows, Grouping::ByPrompt, 1, 1);
        let w = p.window_keys(window);
        let l = &p.layout;
        if l.levels() == 2 {
            for (i, n) in (l.level_nodes[1]..l.level_nodes[2]).enumerate() {
                let keys = &w.gather[w.cu_k[i] as usize..w.cu_k[i + 1] as usize];
                let first = p.position_ids[l.cu_nodes[n] as usize];
                let last = p.position_ids[l.cu_nodes[n + 1] as usize - 1];
                let pos: Vec<i64> = keys.iter().map(|&k| p.position_ids[k as usize]).collect();
                let want: Vec<i64> = ((first - (window as i64 - 1)).max(first - (l.cu_nodes[l.parent[n] as usize + 1] - l.cu_nodes[l.parent[n] as usize]) as i64)..=last).collect();
                prop_assert_eq!(pos, want);
            }
        }
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
        let v = super::two(&p);
        assert_eq!(p.group_sizes, vec![2, 1]);
        assert_eq!(v.cu_prefix, vec![0, 2, 5]);
        assert_eq!(v.cu_completions, vec![0, 1, 3, 4]);
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
            prop_assert_eq!(l.ungrouped_prefix.len(), p.layout.level_tokens(0));
            prop_assert_eq!(l.ungrouped_suffix.len(), p.layout.level_tokens(1));
        }
    }
}
