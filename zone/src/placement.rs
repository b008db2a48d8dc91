//! Placement: which disks hold a vDisk's chunks.

use std::collections::HashSet;

use uuid::Uuid;

use crate::records::Policy;

/// A disk that may hold a vDisk's chunks, as placement sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PlacementDisk {
    pub disk: Uuid,
    /// The storage node serving the disk.
    pub node: Uuid,
    /// Bytes available for chunk data: the disk's weight.
    pub capacity: u64,
    /// Bytes already taken.
    pub used: u64,
    /// Whether the disk's node is alive.
    pub up: bool,
}

impl PlacementDisk {
    /// Whether the disk may receive a new placement: its node is up, and it
    /// has capacity and is not full.
    fn eligible(&self) -> bool {
        self.up && self.capacity > 0 && self.used < self.capacity
    }
}

/// Why a placement cannot be made.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlacementError {
    /// Fewer distinct nodes have an eligible disk than one group needs.
    #[error("the placement needs {needed} nodes with disks up and not full, and only {nodes_available} have one")]
    Unsatisfiable {
        needed: usize,
        nodes_available: usize,
    },
    /// The policy asks for no group or for groups of no disk.
    #[error("a policy with {stripes} stripes of {width} disks places nothing")]
    EmptyPolicy { stripes: u32, width: u32 },
}

/// Chooses the disks of every placement group of vDisk `vdisk`.
///
/// Returns `policy.stripes` groups of `policy.redundancy.width()` disks each;
/// chunk `c` of the vDisk lives on the disks of group `c % stripes`.
///
/// The choice is weighted rendezvous hashing (highest random weight, HRW):
///
/// 1. Only *eligible* candidates take part: node up, capacity above zero,
///    `used < capacity`. A down disk is never chosen.
/// 2. For group `g`, every eligible disk `d` draws `u = hash(vdisk, g, d)`
///    mapped to `(0, 1]`, where `hash` is FNV-1a over the 16 bytes of the vDisk
///    uuid, `g` as 4 little-endian bytes and the 16 bytes of the disk uuid,
///    finished with the splitmix64 mixer: a fixed function, the same in every
///    process and release (no random seed). Its score is `-ln(u) / capacity`.
///    The disk with the lowest score ranks first; ties go to the smaller disk
///    uuid. The first-ranked disk is therefore disk `d` with probability
///    `capacity(d) / Σ capacity`: data spreads in proportion to capacity.
/// 3. Walking the ranking, the group takes disks whose node is not in the
///    group yet, first only disks that no earlier group of this vDisk took
///    (so stripes spread over as many disks as possible), then, if the group
///    is still short, disks already taken by earlier groups. No group ever
///    holds two disks of one node.
/// 4. Each group lists its disks in ranking order.
///
/// The result depends only on the vDisk uuid, the policy and the eligible
/// candidates with their capacities (not on their order in `candidates`, nor on
/// `used` beyond eligibility). Adding or removing a disk only changes the
/// groups that rank it high enough to take it or that held it: placement moves
/// the least data possible when the pool changes.
///
/// Fails with [`PlacementError::Unsatisfiable`] when fewer distinct nodes
/// have an eligible disk than the width of a group.
pub fn place(
    vdisk: Uuid,
    policy: &Policy,
    candidates: &[PlacementDisk],
) -> Result<Vec<Vec<Uuid>>, PlacementError> {
    let width = policy.redundancy.width();
    if width == 0 || policy.stripes == 0 {
        return Err(PlacementError::EmptyPolicy {
            stripes: policy.stripes,
            width,
        });
    }
    let needed = width as usize;

    let mut eligible: Vec<&PlacementDisk> = candidates.iter().filter(|d| d.eligible()).collect();
    eligible.sort_by_key(|d| d.disk);
    eligible.dedup_by_key(|d| d.disk);
    let nodes_available = eligible
        .iter()
        .map(|d| d.node)
        .collect::<HashSet<_>>()
        .len();
    if nodes_available < needed {
        return Err(PlacementError::Unsatisfiable {
            needed,
            nodes_available,
        });
    }

    let mut taken: HashSet<Uuid> = HashSet::new();
    let mut groups = Vec::with_capacity(policy.stripes as usize);
    for g in 0..policy.stripes {
        let mut ranked: Vec<(f64, &PlacementDisk)> =
            eligible.iter().map(|d| (score(vdisk, g, d), *d)).collect();
        ranked.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.disk.cmp(&b.1.disk)));

        // Indices into `ranked` of the chosen disks.
        let mut chosen: Vec<usize> = Vec::with_capacity(needed);
        let mut nodes: HashSet<Uuid> = HashSet::new();
        for fresh_only in [true, false] {
            for (i, (_, d)) in ranked.iter().enumerate() {
                if chosen.len() == needed {
                    break;
                }
                if chosen.contains(&i)
                    || nodes.contains(&d.node)
                    || (fresh_only && taken.contains(&d.disk))
                {
                    continue;
                }
                chosen.push(i);
                nodes.insert(d.node);
            }
        }
        chosen.sort_unstable();
        let group: Vec<Uuid> = chosen.iter().map(|&i| ranked[i].1.disk).collect();
        taken.extend(group.iter().copied());
        groups.push(group);
    }
    Ok(groups)
}

/// The HRW score of disk `d` for group `g` of `vdisk`: lower ranks first.
fn score(vdisk: Uuid, g: u32, d: &PlacementDisk) -> f64 {
    let u = unit(hash(vdisk, g, d.disk));
    -u.ln() / d.capacity as f64
}

/// Maps a hash to `(0, 1]` using its top 53 bits (the precision of an f64).
fn unit(h: u64) -> f64 {
    ((h >> 11) + 1) as f64 / (1u64 << 53) as f64
}

/// FNV-1a (64 bits) of (vdisk, group, disk), finished with splitmix64 so
/// inputs differing in one byte give unrelated outputs.
fn hash(vdisk: Uuid, g: u32, disk: Uuid) -> u64 {
    const OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    let g = g.to_le_bytes();
    let bytes = vdisk
        .as_bytes()
        .iter()
        .chain(g.iter())
        .chain(disk.as_bytes().iter());
    let h = bytes.fold(OFFSET, |h, &b| (h ^ u64::from(b)).wrapping_mul(PRIME));
    splitmix64(h)
}

fn splitmix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;
    use crate::records::Redundancy;

    fn mirror(copies: u32, stripes: u32) -> Policy {
        Policy {
            redundancy: Redundancy::Mirror { copies },
            stripes,
        }
    }

    fn id(n: u128) -> Uuid {
        Uuid::from_u128(n)
    }

    /// `nodes` nodes with `per_node` disks each of capacity `capacity`.
    fn pool(nodes: u128, per_node: u128, capacity: u64) -> Vec<PlacementDisk> {
        (0..nodes)
            .flat_map(|n| {
                (0..per_node).map(move |d| PlacementDisk {
                    disk: id(1000 + n * 100 + d),
                    node: id(n + 1),
                    capacity,
                    used: 0,
                    up: true,
                })
            })
            .collect()
    }

    fn node_of(disks: &[PlacementDisk], disk: Uuid) -> Uuid {
        disks
            .iter()
            .find(|d| d.disk == disk)
            .map(|d| d.node)
            .expect("a candidate disk")
    }

    #[test]
    fn the_hash_is_fixed() {
        // FNV-1a + splitmix64, checked against an independent computation.
        // Changing these values moves every vDisk ever placed: never do it.
        assert_eq!(hash(id(0), 0, id(0)), 0x9755_20fd_bd41_f5f0);
        assert_eq!(hash(id(1), 2, id(3)), hash(id(1), 2, id(3)));
        assert_ne!(hash(id(1), 2, id(3)), hash(id(1), 3, id(3)));
        assert!(unit(0) > 0.0 && unit(u64::MAX) == 1.0);
    }

    #[test]
    fn placement_is_deterministic_and_ignores_candidate_order() {
        let disks = pool(5, 3, 1 << 40);
        let policy = mirror(3, 4);
        let vdisk = Uuid::new_v4();
        let first = place(vdisk, &policy, &disks).expect("placeable");
        let mut reversed = disks.clone();
        reversed.reverse();
        assert_eq!(place(vdisk, &policy, &disks).expect("placeable"), first);
        assert_eq!(place(vdisk, &policy, &reversed).expect("placeable"), first);
        assert_eq!(first.len(), 4);
        assert!(first.iter().all(|g| g.len() == 3));
    }

    #[test]
    fn groups_use_distinct_nodes_and_never_a_down_disk() {
        let mut disks = pool(6, 2, 1 << 40);
        for d in disks.iter_mut().filter(|d| d.node == id(2)) {
            d.up = false;
        }
        for _ in 0..500 {
            let groups = place(Uuid::new_v4(), &mirror(3, 3), &disks).expect("placeable");
            for group in &groups {
                let nodes: HashSet<Uuid> = group.iter().map(|&d| node_of(&disks, d)).collect();
                assert_eq!(nodes.len(), 3, "copies of one group on distinct nodes");
                assert!(!nodes.contains(&id(2)), "never a down disk");
            }
        }
    }

    #[test]
    fn stripes_spread_over_unused_disks_first() {
        let disks = pool(6, 1, 1 << 40);
        for _ in 0..200 {
            let groups = place(Uuid::new_v4(), &mirror(2, 3), &disks).expect("placeable");
            let all: HashSet<Uuid> = groups.iter().flatten().copied().collect();
            assert_eq!(all.len(), 6, "3 groups of 2 take all 6 disks");
        }
        // With more groups than disks allow, disks are reused, nodes still distinct.
        let groups = place(Uuid::new_v4(), &mirror(2, 8), &disks).expect("placeable");
        assert_eq!(groups.len(), 8);
        assert!(groups
            .iter()
            .all(|g| node_of(&disks, g[0]) != node_of(&disks, g[1])));
    }

    #[test]
    fn data_spreads_in_proportion_to_capacity() {
        let disks: Vec<PlacementDisk> = (1..=4u64)
            .map(|i| PlacementDisk {
                disk: id(100 + u128::from(i)),
                node: id(u128::from(i)),
                capacity: i << 40,
                used: 0,
                up: true,
            })
            .collect();
        let total: u64 = (1..=4).sum();
        let n = 20_000;
        let mut counts: HashMap<Uuid, u64> = HashMap::new();
        for v in 0..n {
            let groups = place(id(1 << 64 | v), &mirror(1, 1), &disks).expect("placeable");
            *counts.entry(groups[0][0]).or_default() += 1;
        }
        for (i, d) in (1..=4u64).zip(&disks) {
            let expected = n as f64 * i as f64 / total as f64;
            let got = counts.get(&d.disk).copied().unwrap_or(0) as f64;
            assert!(
                (got - expected).abs() < expected * 0.05,
                "disk {i}: {got} placements, expected about {expected}"
            );
        }
    }

    #[test]
    fn removing_a_disk_moves_only_what_it_held() {
        let disks = pool(5, 1, 1 << 40);
        let gone = disks[2].disk;
        let fewer: Vec<PlacementDisk> = disks.iter().filter(|d| d.disk != gone).copied().collect();
        for v in 0..1000 {
            let before = place(id(v), &mirror(1, 1), &disks).expect("placeable");
            let after = place(id(v), &mirror(1, 1), &fewer).expect("placeable");
            if before[0][0] != gone {
                assert_eq!(before, after, "vDisk {v} moved although its disk stayed");
            }
        }
    }

    #[test]
    fn full_and_empty_disks_are_not_chosen() {
        let mut disks = pool(3, 1, 1 << 40);
        disks[0].used = disks[0].capacity;
        disks[1].capacity = 0;
        for v in 0..100 {
            assert_eq!(
                place(id(v), &mirror(1, 1), &disks).expect("placeable"),
                vec![vec![disks[2].disk]]
            );
        }
    }

    #[test]
    fn too_few_nodes_is_unsatisfiable() {
        let mut disks = pool(3, 4, 1 << 40);
        for d in disks.iter_mut().filter(|d| d.node == id(3)) {
            d.up = false;
        }
        assert_eq!(
            place(id(1), &mirror(3, 1), &disks),
            Err(PlacementError::Unsatisfiable {
                needed: 3,
                nodes_available: 2
            })
        );
        assert!(place(id(1), &mirror(2, 1), &disks).is_ok());
        assert!(matches!(
            place(id(1), &mirror(0, 1), &disks),
            Err(PlacementError::EmptyPolicy { .. })
        ));
        assert!(matches!(
            place(id(1), &mirror(1, 0), &disks),
            Err(PlacementError::EmptyPolicy { .. })
        ));
        assert!(matches!(
            place(id(1), &mirror(1, 1), &[]),
            Err(PlacementError::Unsatisfiable {
                nodes_available: 0,
                ..
            })
        ));
    }

    #[test]
    fn erasure_code_groups_span_data_plus_parity_nodes() {
        let disks = pool(6, 1, 1 << 40);
        let policy = Policy {
            redundancy: Redundancy::ErasureCode { data: 4, parity: 2 },
            stripes: 1,
        };
        let groups = place(id(7), &policy, &disks).expect("placeable");
        assert_eq!(groups[0].len(), 6);
    }
}
