//! Which broker node (`mqtt.urls`) the next connection goes to: the order the nodes are
//! tried in, and the move to the next one after a failed or lost connection.

use crate::config::UrlOrder;

/// The nodes in the order they are tried, and the one in use. Index values are positions in
/// `mqtt.urls`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Nodes {
    order: Vec<usize>,
    at: usize,
}

impl Nodes {
    /// `count` nodes (at least one is assumed; zero behaves as one); `device` seeds the
    /// shuffled order, so the same device always tries its nodes in the same order.
    pub fn new(count: usize, order: UrlOrder, device: &str) -> Self {
        let mut list: Vec<usize> = (0..count.max(1)).collect();
        if order == UrlOrder::Shuffled {
            // Fisher-Yates with a generator seeded from the id (FNV-1a, then splitmix64):
            // written out so the order never changes with a Rust or dependency upgrade.
            let mut state = device.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
                (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
            });
            for i in (1..list.len()).rev() {
                state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
                let mut z = state;
                z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
                z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
                z ^= z >> 31;
                let j = usize::try_from(z % (i as u64 + 1)).unwrap_or(0);
                list.swap(i, j);
            }
        }
        Nodes { order: list, at: 0 }
    }

    /// The position in `mqtt.urls` of the node to connect to.
    pub fn current(&self) -> usize {
        self.order.get(self.at).copied().unwrap_or(0)
    }

    /// After a failed connect or a lost connection: the next node, round the list.
    pub fn advance(&mut self) {
        self.at = (self.at + 1) % self.order.len().max(1);
    }

    /// The same list (count and order) as `other`: a reload that keeps it keeps the node.
    pub fn same_list(&self, other: &Nodes) -> bool {
        self.order == other.order
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn visit(nodes: &mut Nodes, n: usize) -> Vec<usize> {
        (0..n)
            .map(|_| {
                let c = nodes.current();
                nodes.advance();
                c
            })
            .collect()
    }

    #[test]
    fn in_order_goes_round_the_list() {
        let mut n = Nodes::new(3, UrlOrder::InOrder, "pump-1");
        assert_eq!(visit(&mut n, 7), [0, 1, 2, 0, 1, 2, 0]);
    }

    #[test]
    fn one_node_stays_on_it() {
        for order in [UrlOrder::InOrder, UrlOrder::Shuffled] {
            let mut n = Nodes::new(1, order, "d");
            assert_eq!(visit(&mut n, 3), [0, 0, 0]);
            let mut n = Nodes::new(0, order, "d");
            assert_eq!(visit(&mut n, 2), [0, 0]);
        }
    }

    #[test]
    fn shuffled_is_a_stable_permutation_per_device() {
        let a = Nodes::new(5, UrlOrder::Shuffled, "pump-0042");
        assert_eq!(a, Nodes::new(5, UrlOrder::Shuffled, "pump-0042"));
        let mut seen = a.order.clone();
        seen.sort_unstable();
        assert_eq!(seen, [0, 1, 2, 3, 4]);
        // Pinned: the order must not change between releases (a fleet would move).
        assert_eq!(a.order, [3, 1, 4, 2, 0]);
        let mut n = a.clone();
        let round = visit(&mut n, 10);
        assert_eq!(round[..5], round[5..]);
    }

    #[test]
    fn shuffled_spreads_a_fleet_over_the_nodes() {
        let mut first = [0_u32; 3];
        for i in 0..600 {
            first[Nodes::new(3, UrlOrder::Shuffled, &format!("dev-{i}")).current()] += 1;
        }
        // 200 each expected; a fair split stays well within 150..250.
        assert!(first.iter().all(|&c| (150..250).contains(&c)), "{first:?}");
    }
}
