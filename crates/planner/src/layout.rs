//! The packed stream as a forest of nodes, level-major.
//!
//! A node is a run of tokens that the same set of rows shares; each row is a root-to-node path. Nodes are stored
//! level by level (all depth-0 nodes, then the depth-1 nodes ordered by parent, …), each node's tokens contiguous.
//! In that order the depth-`d` descendants of any depth-`a` node are contiguous too, so every attention call is
//! a plain pair of slices:
//!
//! - every node over itself, causally: one segment table over the whole stream (`cu_nodes`);
//! - for each ancestor level `a` and query level `d > a`: the depth-`d` tokens of each depth-`a` node's subtree
//!   over that node's tokens, non-causally (`cross_table(a, d)` against `level_table(a)`).
//!
//! A one-level plan is the special case of two levels: prompts (level 0) and completions (level 1).

/// Parent of a root node.
pub const NO_PARENT: u32 = u32::MAX;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    /// Node boundaries over the whole packed stream, level-major (`nodes + 1` entries).
    pub cu_nodes: Vec<i32>,
    /// Level `d` is nodes `level_nodes[d]..level_nodes[d + 1]`.
    pub level_nodes: Vec<usize>,
    /// Each node's parent (`NO_PARENT` for level 0).
    pub parent: Vec<u32>,
}

impl Layout {
    pub fn levels(&self) -> usize {
        self.level_nodes.len() - 1
    }

    pub fn num_tokens(&self) -> usize {
        *self.cu_nodes.last().unwrap_or(&0) as usize
    }

    /// Token range `[start, end)` of level `d`.
    pub fn level_span(&self, d: usize) -> (usize, usize) {
        (self.cu_nodes[self.level_nodes[d]] as usize, self.cu_nodes[self.level_nodes[d + 1]] as usize)
    }

    pub fn level_tokens(&self, d: usize) -> usize {
        let (s, e) = self.level_span(d);
        e - s
    }

    /// Level `d`'s node boundaries, relative to the level's first token.
    pub fn level_table(&self, d: usize) -> Vec<i32> {
        let (n0, n1) = (self.level_nodes[d], self.level_nodes[d + 1]);
        let base = self.cu_nodes[n0];
        self.cu_nodes[n0..=n1].iter().map(|&c| c - base).collect()
    }

    /// The level of `node`.
    pub fn level_of(&self, node: usize) -> usize {
        self.level_nodes.partition_point(|&first| first <= node) - 1
    }

    /// For each depth-`a` node in order, the end of its depth-`d` descendants' tokens, relative to level `d`'s first
    /// token (`d > a`; one entry per depth-`a` node plus the leading 0). Nodes without such descendants get empty
    /// segments.
    pub fn cross_table(&self, a: usize, d: usize) -> Vec<i32> {
        assert!(a < d && d < self.levels(), "cross_table({a}, {d}) on {} levels", self.levels());
        let (a0, a1) = (self.level_nodes[a], self.level_nodes[a + 1]);
        let mut tokens = vec![0i32; a1 - a0];
        for node in self.level_nodes[d]..self.level_nodes[d + 1] {
            let mut up = node;
            for _ in a..d {
                up = self.parent[up] as usize;
            }
            tokens[up - a0] += self.cu_nodes[node + 1] - self.cu_nodes[node];
        }
        let mut cu = Vec::with_capacity(tokens.len() + 1);
        cu.push(0i32);
        for t in tokens {
            cu.push(cu.last().unwrap() + t);
        }
        cu
    }
}

/// Longest segment of a cumulative table.
pub fn max_segment(cu: &[i32]) -> usize {
    cu.windows(2).map(|w| (w[1] - w[0]) as usize).max().unwrap_or(0)
}
