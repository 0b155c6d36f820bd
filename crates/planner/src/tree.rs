//! The prefix tree of a micro-batch: a compressed trie over whole rows (valid prompt tokens, then valid completion
//! tokens), in which each node is a maximal run of tokens that the same set of rows shares.
//!
//! Rows of different prompt groups share at most the tokens before either prompt's last token, so every group keeps
//! the token that predicts its completions' first token in a node of its own, and declared groups keep their meaning.
//! Shared nodes shorter than `min_node` tokens are not split off: their tokens go to each child, so a short common
//! chat header costs no attention calls. A node that holds a group's last prompt token (what a plan sharing whole
//! prompts has as its prompt) is kept whatever its length, so a batch without deeper sharing packs as it would by
//! prompts. A depth limit pushes down the nodes whose copies cost fewest tokens.

use crate::layout::NO_PARENT;

/// A node of the forest: the tokens at path positions `start..end` of row `rep` (every row through the node has
/// the same tokens there).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Node {
    pub rep: u32,
    pub start: u32,
    pub end: u32,
    pub parent: u32,
}

/// Nodes in level-major order (level `d`: `level_nodes[d]..level_nodes[d + 1]`, ordered by parent) and the node
/// where each row's path ends.
#[derive(Debug, Clone)]
pub struct Forest {
    pub nodes: Vec<Node>,
    pub level_nodes: Vec<usize>,
    pub row_end: Vec<u32>,
}

struct TrieNode {
    rep: usize,
    start: usize,
    end: usize,
    children: Vec<usize>,
    /// Rows whose path ends here.
    ends: Vec<usize>,
}

impl TrieNode {
    fn len(&self) -> usize {
        self.end - self.start
    }
}

/// Build the forest. `key(row, pos)` is the comparison key of a row's token at path position `pos`;
/// `lens[row]` its path length and `prompt_lens[row]` its prompt's (at least 1). Rows are inserted in `order`,
/// which fixes the order of siblings (first appearance).
pub fn build<K: PartialEq>(
    order: &[usize],
    lens: &[usize],
    prompt_lens: &[usize],
    key: impl Fn(usize, usize) -> K,
    max_depth: usize,
    min_node: usize,
) -> Forest {
    let mut t = vec![TrieNode { rep: usize::MAX, start: 0, end: 0, children: vec![], ends: vec![] }];
    for &r in order {
        insert(&mut t, r, lens[r], &key);
    }
    // Short unless it holds its rows' last prompt token (one group's, by the keys).
    let short = |n: &TrieNode| n.len() < min_node && !(n.start < prompt_lens[n.rep] && prompt_lens[n.rep] <= n.end);
    push_down_short(&mut t, 0, &short);
    limit_depth(&mut t, max_depth);
    level_major(&t, lens.len())
}

fn insert<K: PartialEq>(t: &mut Vec<TrieNode>, r: usize, len: usize, key: &impl Fn(usize, usize) -> K) {
    let (mut node, mut pos) = (0usize, 0usize);
    loop {
        if pos == len {
            t[node].ends.push(r);
            return;
        }
        let k = key(r, pos);
        let found = t[node].children.iter().position(|&c| key(t[c].rep, t[c].start) == k);
        let Some(slot) = found else {
            t.push(TrieNode { rep: r, start: pos, end: len, children: vec![], ends: vec![r] });
            let leaf = t.len() - 1;
            t[node].children.push(leaf);
            return;
        };
        let c = t[node].children[slot];
        let (rep, start, clen) = (t[c].rep, t[c].start, t[c].len());
        let limit = clen.min(len - pos);
        let m = 1 + (1..limit).take_while(|&i| key(r, pos + i) == key(rep, start + i)).count();
        if m < clen {
            // Split c after m tokens: the shared head becomes a new node above it.
            t.push(TrieNode { rep, start, end: start + m, children: vec![c], ends: vec![] });
            let head = t.len() - 1;
            t[c].start += m;
            t[node].children[slot] = head;
            node = head;
        } else {
            node = c;
        }
        pos += m;
    }
}

/// Replace child `slot` of `parent` by its children, each extended upwards over its tokens, and by a leaf for the
/// rows that end there.
fn push_down(t: &mut Vec<TrieNode>, parent: usize, slot: usize) {
    let n = t[parent].children[slot];
    let start = t[n].start;
    let mut replacement = Vec::with_capacity(t[n].children.len() + 1);
    if !t[n].ends.is_empty() {
        let ends = std::mem::take(&mut t[n].ends);
        t.push(TrieNode { rep: ends[0], start, end: t[n].end, children: vec![], ends });
        replacement.push(t.len() - 1);
    }
    for c in std::mem::take(&mut t[n].children) {
        t[c].start = start;
        replacement.push(c);
    }
    t[parent].children.splice(slot..slot + 1, replacement);
}

fn push_down_short(t: &mut Vec<TrieNode>, node: usize, short: &impl Fn(&TrieNode) -> bool) {
    while let Some(slot) = t[node].children.iter().position(|&c| !t[c].children.is_empty() && short(&t[c])) {
        push_down(t, node, slot);
    }
    for i in 0..t[node].children.len() {
        let c = t[node].children[i];
        push_down_short(t, c, short);
    }
}

/// Push down nodes until no path has more than `max_depth + 1` nodes, each time the node whose copies add the
/// fewest tokens among those on a too-deep path.
fn limit_depth(t: &mut Vec<TrieNode>, max_depth: usize) {
    loop {
        // (cost, parent, slot) of the cheapest internal node on a too-deep path, found in one walk.
        let mut best: Option<(usize, usize, usize)> = None;
        let mut height = vec![0usize; t.len()];
        heights(t, 0, &mut height);
        let mut stack = vec![(0usize, 0usize)]; // (node, its level + 1; the virtual root is level "-1")
        while let Some((node, depth)) = stack.pop() {
            for (slot, &c) in t[node].children.iter().enumerate() {
                if t[c].children.is_empty() {
                    continue;
                }
                if depth + height[c] > max_depth {
                    let copies = t[c].children.len() + usize::from(!t[c].ends.is_empty()) - 1;
                    let cost = copies * t[c].len();
                    if best.is_none_or(|(b, _, _)| cost < b) {
                        best = Some((cost, node, slot));
                    }
                }
                stack.push((c, depth + 1));
            }
        }
        match best {
            Some((_, parent, slot)) => push_down(t, parent, slot),
            None => return,
        }
    }
}

/// Levels below each node (0 for a leaf).
fn heights(t: &[TrieNode], node: usize, out: &mut [usize]) -> usize {
    let h = t[node].children.iter().map(|&c| 1 + heights(t, c, out)).max().unwrap_or(0);
    out[node] = h;
    h
}

fn level_major(t: &[TrieNode], rows: usize) -> Forest {
    let mut nodes = Vec::new();
    let mut level_nodes = vec![0usize];
    let mut row_end = vec![NO_PARENT; rows];
    // (trie node, parent's index in `nodes`)
    let mut level: Vec<(usize, u32)> = t[0].children.iter().map(|&c| (c, NO_PARENT)).collect();
    while !level.is_empty() {
        let mut next = Vec::new();
        for &(n, parent) in &level {
            let id = nodes.len() as u32;
            let tn = &t[n];
            nodes.push(Node { rep: tn.rep as u32, start: tn.start as u32, end: tn.end as u32, parent });
            for &r in &tn.ends {
                row_end[r] = id;
            }
            next.extend(tn.children.iter().map(|&c| (c, id)));
        }
        level_nodes.push(nodes.len());
        level = next;
    }
    Forest { nodes, level_nodes, row_end }
}
