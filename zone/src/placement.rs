//! Placement: which disks hold a vDisk's chunks.

use std::collections::{HashMap, HashSet};

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
///    group yet: no group ever holds two disks of one node. Groups are
///    chosen independently of each other (each with its own hash), so a
///    change in the pool changes only the groups whose own ranking it
///    touches.
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

    let mut groups = Vec::with_capacity(policy.stripes as usize);
    for g in 0..policy.stripes {
        let mut ranked: Vec<(f64, &PlacementDisk)> =
            eligible.iter().map(|d| (score(vdisk, g, d), *d)).collect();
        ranked.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.disk.cmp(&b.1.disk)));

        // Indices into `ranked` of the chosen disks.
        let mut chosen: Vec<usize> = Vec::with_capacity(needed);
        let mut nodes: HashSet<Uuid> = HashSet::new();
        for (i, (_, d)) in ranked.iter().enumerate() {
            if chosen.len() == needed {
                break;
            }
            if nodes.insert(d.node) {
                chosen.push(i);
            }
        }
        let group: Vec<Uuid> = chosen.iter().map(|&i| ranked[i].1.disk).collect();
        groups.push(group);
    }
    Ok(groups)
}

/// A disk whose used space reaches this share of its capacity sheds copies
/// onto disks with room, one at a time, until it is below it again.
pub const SHED_AT: f64 = 0.90;

/// No move (shed or rebalance) is planned onto a disk that it would fill
/// beyond this share of its capacity. The gap to [`SHED_AT`] keeps a shed
/// copy from moving back (a rebalance towards where placement prefers it)
/// until its old disk has room for it with a margin.
pub const FILL_UP_TO: f64 = 0.80;

/// A copy move that placement wants: group `group`'s copy on `from` goes to `to`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PlannedMove {
    pub group: u32,
    pub from: Uuid,
    pub to: Uuid,
    /// `from` must leave (gone or removed) rather than being a rebalance.
    pub forced: bool,
    /// `from` is at or above [`SHED_AT`] and sheds this copy.
    pub shed: bool,
    /// The bytes the copy is estimated to take on `to` (its share of what
    /// the vDisk takes on `from`; 0 when unknown).
    pub bytes: u64,
}

/// What the planner knows of space, for one vDisk. The default knows
/// nothing: no disk sheds, and every copy counts as empty.
#[derive(Debug, Clone, Default)]
pub struct SpaceInput {
    /// Bytes this vDisk's copies take on each disk (all its groups there
    /// together), as the nodes report them.
    pub copy_bytes: HashMap<Uuid, u64>,
    /// Disks that may shed a copy now: at or above [`SHED_AT`], with no shed
    /// under way (the caller bounds the sheds per disk).
    pub may_shed: HashSet<Uuid>,
    /// Bytes on their way onto each disk that its `used` does not show yet
    /// (moves under way or planned in this pass).
    pub incoming: HashMap<Uuid, u64>,
}

impl SpaceInput {
    /// Whether `c` can take `bytes` more and stay at or below [`FILL_UP_TO`].
    pub fn has_room(&self, c: &PlacementDisk, bytes: u64) -> bool {
        let after = c
            .used
            .saturating_add(self.incoming.get(&c.disk).copied().unwrap_or(0))
            .saturating_add(bytes);
        after as f64 <= FILL_UP_TO * c.capacity as f64
    }
}

/// Whether `c` is at or above [`SHED_AT`] of its capacity.
pub fn over_shed_line(c: &PlacementDisk) -> bool {
    c.capacity > 0 && c.used as f64 >= SHED_AT * c.capacity as f64
}

/// What placement knows about one vDisk when planning moves.
pub struct MovePlanInput<'a> {
    pub vdisk: Uuid,
    pub policy: &'a Policy,
    /// The current groups (a group with a move in progress is skipped).
    pub groups: &'a [Vec<Uuid>],
    /// Groups that already have a move in progress.
    pub moving: &'a [u32],
    /// Every disk of the datastore, as placement sees it.
    pub candidates: &'a [PlacementDisk],
    /// Disks whose copies must leave: node gone for good, or removed by the
    /// operator. (Members that are not candidates at all count as gone too.)
    pub gone: &'a HashSet<Uuid>,
    /// Disks never to choose as a target (their old copy is being freed).
    pub excluded: &'a HashSet<Uuid>,
    /// Space: which disks shed, and which have room for a copy.
    pub space: &'a SpaceInput,
}

/// Plans at most one move per group of a vDisk:
///
/// - a group with a gone member moves that copy to the best target;
/// - otherwise, a group with a member that may shed (at or above
///   [`SHED_AT`]; at most one shed per disk in one call) moves that copy to
///   the best-ranked disk that fits, is not itself at the shed line, and has
///   room for it ([`SpaceInput::has_room`]), placement's choice first;
/// - otherwise, if the group differs from where [`place`] would put it
///   today (a disk was added, or a returning one ranks higher), one member
///   that placement would not choose moves to one it would, if that one
///   has room for it.
///
/// The ideal placement is computed over every candidate that is not gone,
/// as if all were up and empty: a node that is briefly down, or a disk
/// filling up, moves nothing. A target, however, must really be eligible
/// (up, not full), not excluded, not already a member, and on a node no
/// remaining member uses. Because placement is rendezvous hashing, adding a
/// disk moves only the groups that rank it among their best: bounded
/// movement.
pub fn plan_moves(input: &MovePlanInput<'_>) -> Vec<PlannedMove> {
    let by_disk: std::collections::HashMap<Uuid, &PlacementDisk> =
        input.candidates.iter().map(|d| (d.disk, d)).collect();
    let is_gone = |d: &Uuid| input.gone.contains(d) || !by_disk.contains_key(d);
    let idealised: Vec<PlacementDisk> = input
        .candidates
        .iter()
        .filter(|d| !input.gone.contains(&d.disk) && d.capacity > 0)
        .map(|d| PlacementDisk {
            up: true,
            used: 0,
            ..*d
        })
        .collect();
    let ideal = place(input.vdisk, input.policy, &idealised).ok();
    // A copy's share of what the vDisk takes on its disk.
    let copy_bytes = |disk: &Uuid| -> u64 {
        let total = input.space.copy_bytes.get(disk).copied().unwrap_or(0);
        let groups = input.groups.iter().filter(|g| g.contains(disk)).count() as u64;
        total / groups.max(1)
    };
    let mut shedding: HashSet<Uuid> = HashSet::new();
    // Room counts what this call plans too.
    let mut space = input.space.clone();
    let mut out = Vec::new();
    for (g, members) in input.groups.iter().enumerate() {
        let g32 = g as u32;
        if input.moving.contains(&g32) {
            continue;
        }
        let ideal_g: &[Uuid] = ideal
            .as_ref()
            .and_then(|i| i.get(g))
            .map_or(&[], |v| v.as_slice());
        let shedder = members
            .iter()
            .find(|d| space.may_shed.contains(d) && !shedding.contains(*d));
        let (from, forced, shed) = match members.iter().find(|d| is_gone(d)) {
            Some(d) => (*d, true, false),
            None => match shedder {
                Some(d) => (*d, false, true),
                None => match members.iter().rev().find(|d| !ideal_g.contains(d)) {
                    Some(d) if !ideal_g.is_empty() => (*d, false, false),
                    _ => continue,
                },
            },
        };
        let bytes = copy_bytes(&from);
        let staying_nodes: HashSet<Uuid> = members
            .iter()
            .filter(|d| **d != from)
            .filter_map(|d| by_disk.get(d).map(|c| c.node))
            .collect();
        let fits = |c: &PlacementDisk| {
            c.eligible()
                && !is_gone(&c.disk)
                && !input.excluded.contains(&c.disk)
                && !members.contains(&c.disk)
                && !staying_nodes.contains(&c.node)
        };
        // A forced move takes any disk that fits; a shed or a rebalance
        // only one with room for the copy (and a shed never one that
        // would shed it on).
        let acceptable = |c: &PlacementDisk| {
            fits(c) && (forced || (space.has_room(c, bytes) && !over_shed_line(c)))
        };
        // Prefer where placement would put it; a forced move or a shed
        // takes the best-ranked disk that is acceptable when the ideal one
        // is not.
        let preferred = ideal_g
            .iter()
            .filter_map(|d| by_disk.get(d).copied())
            .find(|c| acceptable(c));
        let target = match preferred {
            Some(c) => Some(c),
            None if forced || shed => {
                let mut ranked: Vec<(f64, &PlacementDisk)> = input
                    .candidates
                    .iter()
                    .filter(|c| acceptable(c))
                    .map(|c| (score(input.vdisk, g32, c), c))
                    .collect();
                ranked.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.disk.cmp(&b.1.disk)));
                ranked.first().map(|(_, c)| *c)
            }
            None => None,
        };
        if let Some(to) = target {
            if shed {
                shedding.insert(from);
            }
            *space.incoming.entry(to.disk).or_insert(0) += bytes;
            out.push(PlannedMove {
                group: g32,
                from,
                to: to.disk,
                forced,
                shed,
                bytes,
            });
        }
    }
    out
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
    fn groups_are_placed_independently() {
        let disks = pool(6, 1, 1 << 40);
        for _ in 0..200 {
            let v = Uuid::new_v4();
            let groups = place(v, &mirror(2, 8), &disks).expect("placeable");
            assert_eq!(groups.len(), 8);
            assert!(groups
                .iter()
                .all(|g| node_of(&disks, g[0]) != node_of(&disks, g[1])));
            // Without one disk, only the groups that held it change.
            let gone = disks[0].disk;
            let rest: Vec<PlacementDisk> =
                disks.iter().copied().filter(|d| d.disk != gone).collect();
            let after = place(v, &mirror(2, 8), &rest).expect("placeable");
            for (before, now) in groups.iter().zip(&after) {
                if !before.contains(&gone) {
                    assert_eq!(before, now, "a group that did not hold the disk moved");
                }
            }
        }
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

    // ---- plan_moves ----

    const TB: u64 = 1 << 40;

    /// Something that happens to a disk.
    type Damage = fn(&mut PlacementDisk);

    /// Plans the moves of `groups` with no move in progress.
    fn plan(
        vdisk: Uuid,
        policy: &Policy,
        groups: &[Vec<Uuid>],
        candidates: &[PlacementDisk],
        gone: &HashSet<Uuid>,
        excluded: &HashSet<Uuid>,
    ) -> Vec<PlannedMove> {
        plan_moves(&MovePlanInput {
            vdisk,
            policy,
            groups,
            moving: &[],
            candidates,
            gone,
            excluded,
            space: &SpaceInput::default(),
        })
    }

    /// Whether `c` may receive the copy of `members` that leaves `from`,
    /// checked independently of `plan_moves`: up, with capacity and not
    /// full, neither gone nor excluded, not a member, and on a node none of
    /// the staying members uses.
    fn may_receive(
        c: &PlacementDisk,
        candidates: &[PlacementDisk],
        members: &[Uuid],
        from: Uuid,
        gone: &HashSet<Uuid>,
        excluded: &HashSet<Uuid>,
    ) -> bool {
        let staying_nodes: HashSet<Uuid> = members
            .iter()
            .filter(|d| **d != from)
            .filter_map(|d| candidates.iter().find(|c| c.disk == *d).map(|c| c.node))
            .collect();
        c.up && c.capacity > 0
            && c.used < c.capacity
            && !gone.contains(&c.disk)
            && !excluded.contains(&c.disk)
            && !members.contains(&c.disk)
            && !staying_nodes.contains(&c.node)
    }

    fn candidate(candidates: &[PlacementDisk], disk: Uuid) -> &PlacementDisk {
        candidates
            .iter()
            .find(|c| c.disk == disk)
            .expect("a candidate disk")
    }

    #[test]
    fn plan_moves_rebuilds_a_gone_member_onto_an_eligible_disk() {
        let healthy = pool(6, 2, TB);
        let policy = mirror(3, 4);
        // Node 3 is down (briefly: not gone), one disk of node 4 is full,
        // one of node 5 has no capacity, one of node 6 is excluded.
        let mut damaged = healthy.clone();
        for d in damaged.iter_mut() {
            if d.node == id(3) {
                d.up = false;
            }
            if d.disk == id(1300) {
                d.used = d.capacity;
            }
            if d.disk == id(1400) {
                d.capacity = 0;
            }
        }
        let excluded: HashSet<Uuid> = HashSet::from([id(1500)]);
        let unusable: HashSet<Uuid> = [1200, 1201, 1300, 1400, 1500].map(id).into();

        let (mut expected_rebuilds, mut rebuilds) = (0, 0);
        for v in 0..300u128 {
            let vdisk = id(1 << 64 | v);
            let groups = place(vdisk, &policy, &healthy).expect("placeable");
            let lost = groups[(v % 4) as usize][(v % 3) as usize];
            let gone = HashSet::from([lost]);
            let moves = plan(vdisk, &policy, &groups, &damaged, &gone, &excluded);

            let mut planned_groups = HashSet::new();
            for m in &moves {
                assert!(
                    planned_groups.insert(m.group),
                    "vDisk {v}: two moves for group {}: {moves:?}",
                    m.group
                );
            }
            for (g, members) in groups.iter().enumerate() {
                let mv = moves.iter().find(|m| m.group == g as u32);
                if members.contains(&lost) {
                    expected_rebuilds += 1;
                    let possible = damaged
                        .iter()
                        .any(|c| may_receive(c, &damaged, members, lost, &gone, &excluded));
                    let Some(m) = mv else {
                        assert!(
                            !possible,
                            "vDisk {v} group {g} {members:?} lost {lost} and got no move although a target fits"
                        );
                        continue;
                    };
                    assert!(m.forced, "vDisk {v}: {m:?} must be forced");
                    assert_eq!(m.from, lost, "vDisk {v}: the gone copy moves");
                    rebuilds += 1;
                } else if let Some(m) = mv {
                    // Another group may take a rebalance, never a forced move.
                    assert!(
                        !m.forced,
                        "vDisk {v}: {m:?} is forced without a gone member"
                    );
                    assert!(members.contains(&m.from), "vDisk {v}: {m:?}");
                }
                if let Some(m) = mv {
                    let target = candidate(&damaged, m.to);
                    assert!(
                        may_receive(target, &damaged, members, m.from, &gone, &excluded),
                        "vDisk {v} group {g} {members:?}: target of {m:?} does not fit"
                    );
                    assert!(!unusable.contains(&m.to), "vDisk {v}: {m:?}");
                    let staying: Vec<Uuid> =
                        members.iter().copied().filter(|d| *d != m.from).collect();
                    assert!(
                        staying.iter().all(|d| node_of(&healthy, *d) != target.node),
                        "vDisk {v}: {m:?} puts two copies on one node"
                    );
                }
            }
        }
        assert!(expected_rebuilds >= 300);
        assert_eq!(
            rebuilds, expected_rebuilds,
            "every group that lost a copy has a fitting target here"
        );
    }

    #[test]
    fn a_rebuild_goes_where_placement_would_put_it() {
        let disks = pool(5, 1, TB);
        let policy = mirror(2, 1);
        let none = HashSet::new();
        for v in 0..200u128 {
            let vdisk = id(2 << 64 | v);
            let groups = place(vdisk, &policy, &disks).expect("placeable");
            let lost = groups[0][1];
            let gone = HashSet::from([lost]);
            let moves = plan(vdisk, &policy, &groups, &disks, &gone, &none);
            let rest: Vec<PlacementDisk> =
                disks.iter().filter(|d| d.disk != lost).copied().collect();
            let ideal = place(vdisk, &policy, &rest).expect("placeable");
            assert_eq!(moves.len(), 1, "vDisk {v}: {moves:?}");
            assert!(
                ideal[0].contains(&moves[0].to),
                "vDisk {v}: {:?} is not in the ideal group {:?}",
                moves[0],
                ideal[0]
            );
            assert_eq!((moves[0].from, moves[0].forced), (lost, true));
        }
    }

    #[test]
    fn plan_moves_without_a_fitting_target_plans_nothing() {
        let disks = pool(3, 1, TB);
        let policy = mirror(2, 1);
        let none = HashSet::new();
        let breaks: [(&str, Damage); 3] = [
            ("down", |d| d.up = false),
            ("full", |d| d.used = d.capacity),
            ("without capacity", |d| d.capacity = 0),
        ];
        for v in 0..50u128 {
            let vdisk = id(v);
            let groups = place(vdisk, &policy, &disks).expect("placeable");
            let lost = groups[0][0];
            let spare = disks
                .iter()
                .find(|d| !groups[0].contains(&d.disk))
                .expect("a third disk")
                .disk;
            let gone = HashSet::from([lost]);

            // The spare is the only possible target.
            assert_eq!(
                plan(vdisk, &policy, &groups, &disks, &gone, &none),
                vec![PlannedMove {
                    group: 0,
                    from: lost,
                    to: spare,
                    forced: true,
                    shed: false,
                    bytes: 0
                }]
            );
            // A member that is no candidate at all counts as gone.
            let without: Vec<PlacementDisk> =
                disks.iter().filter(|d| d.disk != lost).copied().collect();
            assert_eq!(
                plan(vdisk, &policy, &groups, &without, &none, &none),
                vec![PlannedMove {
                    group: 0,
                    from: lost,
                    to: spare,
                    forced: true,
                    shed: false,
                    bytes: 0
                }]
            );

            for (what, damage) in breaks {
                let mut broken = disks.clone();
                damage(broken.iter_mut().find(|d| d.disk == spare).expect("spare"));
                assert_eq!(
                    plan(vdisk, &policy, &groups, &broken, &gone, &none),
                    vec![],
                    "vDisk {v}: the only spare is {what}"
                );
            }
            assert_eq!(
                plan(
                    vdisk,
                    &policy,
                    &groups,
                    &disks,
                    &gone,
                    &HashSet::from([spare])
                ),
                vec![],
                "vDisk {v}: the only spare is excluded"
            );

            // A spare on the staying member's node does not fit either.
            let staying = groups[0][1];
            let mut crowded: Vec<PlacementDisk> =
                disks.iter().filter(|d| d.disk != spare).copied().collect();
            crowded.push(PlacementDisk {
                disk: id(7777),
                node: node_of(&disks, staying),
                capacity: TB,
                used: 0,
                up: true,
            });
            assert_eq!(
                plan(vdisk, &policy, &groups, &crowded, &gone, &none),
                vec![],
                "vDisk {v}: the only spare shares the staying copy's node"
            );
        }
    }

    #[test]
    fn plan_moves_moves_one_copy_per_group_even_when_all_are_gone() {
        let disks = pool(6, 1, TB);
        let policy = mirror(2, 3);
        let none = HashSet::new();
        for v in 0..50u128 {
            let vdisk = id(4 << 64 | v);
            let groups = place(vdisk, &policy, &disks).expect("placeable");
            let gone: HashSet<Uuid> = groups[1].iter().copied().collect();
            let moves = plan(vdisk, &policy, &groups, &disks, &gone, &none);
            let in_group_1: Vec<&PlannedMove> = moves.iter().filter(|m| m.group == 1).collect();
            assert_eq!(in_group_1.len(), 1, "vDisk {v}: {moves:?}");
            assert!(in_group_1[0].forced && gone.contains(&in_group_1[0].from));
            assert!(!gone.contains(&in_group_1[0].to));
        }
    }

    #[test]
    fn plan_moves_is_stable() {
        let disks = pool(4, 2, TB);
        let policy = mirror(2, 4);
        let none = HashSet::new();
        for v in 0..200u128 {
            let vdisk = id(5 << 64 | v);
            let groups = place(vdisk, &policy, &disks).expect("placeable");
            assert_eq!(
                plan(vdisk, &policy, &groups, &disks, &none, &none),
                vec![],
                "vDisk {v}: nothing changed"
            );
            let mut reversed = disks.clone();
            reversed.reverse();
            assert_eq!(
                plan(vdisk, &policy, &groups, &reversed, &none, &none),
                vec![],
                "vDisk {v}: candidate order changes nothing"
            );

            let member = groups[v as usize % 4][0];
            let member_node = node_of(&disks, member);
            let mut down = disks.clone();
            for d in down.iter_mut().filter(|d| d.node == member_node) {
                d.up = false;
            }
            assert_eq!(
                plan(vdisk, &policy, &groups, &down, &none, &none),
                vec![],
                "vDisk {v}: a briefly down member moves nothing"
            );

            let mut full = disks.clone();
            for d in full.iter_mut() {
                if d.disk == member {
                    d.used = d.capacity;
                } else {
                    d.used = d.capacity / 2;
                }
            }
            assert_eq!(
                plan(vdisk, &policy, &groups, &full, &none, &none),
                vec![],
                "vDisk {v}: a member filling up moves nothing"
            );
        }
    }

    /// vDisks placed over 4 nodes of one disk each, and the same pool with
    /// a fifth disk (the last one).
    fn grown_pool() -> (Vec<PlacementDisk>, Vec<PlacementDisk>) {
        let four = pool(4, 1, TB);
        let new = PlacementDisk {
            disk: id(9000),
            node: id(99),
            capacity: TB,
            used: 0,
            up: true,
        };
        let five = four.iter().copied().chain([new]).collect();
        (four, five)
    }

    #[test]
    fn adding_a_disk_rebalances_a_bounded_share_onto_it() {
        let (four, five) = grown_pool();
        let new = *five.last().expect("the new disk");
        let policy = mirror(2, 4);
        let none = HashSet::new();
        let (mut groups_total, mut moved, mut onto_new) = (0usize, 0usize, 0usize);
        for v in 0..200u128 {
            let vdisk = id(6 << 64 | v);
            let groups = place(vdisk, &policy, &four).expect("placeable");
            groups_total += groups.len();
            let moves = plan(vdisk, &policy, &groups, &five, &none, &none);
            let mut planned_groups = HashSet::new();
            for m in &moves {
                assert!(planned_groups.insert(m.group), "vDisk {v}: {moves:?}");
                assert!(!m.forced, "vDisk {v}: {m:?} is a rebalance");
                let members = &groups[m.group as usize];
                assert!(members.contains(&m.from), "vDisk {v}: {m:?}");
                assert!(
                    may_receive(candidate(&five, m.to), &five, members, m.from, &none, &none),
                    "vDisk {v}: {m:?} does not fit {members:?}"
                );
            }
            moved += moves.len();
            onto_new += moves.iter().filter(|m| m.to == new.disk).count();

            // A group with a move in progress is skipped; the others plan
            // the same moves.
            if let Some(first) = moves.first() {
                let moving = [first.group];
                let rest = plan_moves(&MovePlanInput {
                    vdisk,
                    policy: &policy,
                    groups: &groups,
                    moving: &moving,
                    candidates: &five,
                    gone: &none,
                    excluded: &none,
                    space: &SpaceInput::default(),
                });
                assert_eq!(rest, moves[1..].to_vec(), "vDisk {v}");
            }
            let all: Vec<u32> = (0..policy.stripes).collect();
            assert_eq!(
                plan_moves(&MovePlanInput {
                    vdisk,
                    policy: &policy,
                    groups: &groups,
                    moving: &all,
                    candidates: &five,
                    gone: &HashSet::from([groups[0][0]]),
                    excluded: &none,
                    space: &SpaceInput::default(),
                }),
                vec![],
                "vDisk {v}: every group is moving, even a gone copy waits"
            );

            // The new disk must really be eligible to receive a rebalance.
            for (what, damage) in [
                ("down", (|d| d.up = false) as Damage),
                ("full", |d| d.used = d.capacity),
            ] {
                let mut broken = five.clone();
                damage(broken.last_mut().expect("the new disk"));
                assert!(
                    plan(vdisk, &policy, &groups, &broken, &none, &none)
                        .iter()
                        .all(|m| m.to != new.disk),
                    "vDisk {v}: the new disk is {what}"
                );
            }
            assert!(
                plan(
                    vdisk,
                    &policy,
                    &groups,
                    &five,
                    &none,
                    &HashSet::from([new.disk])
                )
                .iter()
                .all(|m| m.to != new.disk),
                "vDisk {v}: the new disk is excluded"
            );
        }
        // The new disk takes about a fifth of all copies: 2 copies per
        // group, so about 2/5 of the groups move one copy onto it.
        let share = onto_new as f64 / groups_total as f64;
        assert!(
            (0.3..=0.5).contains(&share),
            "{onto_new} of {groups_total} groups moved a copy onto the new disk ({share:.2}), expected about 0.40"
        );
        assert!(
            moved * 4 < groups_total * 3,
            "{moved} of {groups_total} groups move: far from bounded"
        );
    }

    #[test]
    fn adding_a_disk_moves_copies_only_onto_it() {
        let (four, five) = grown_pool();
        let new = *five.last().expect("the new disk");
        let policy = mirror(2, 4);
        let none = HashSet::new();
        let mut onto_old = Vec::new();
        for v in 0..200u128 {
            let vdisk = id(6 << 64 | v);
            let groups = place(vdisk, &policy, &four).expect("placeable");
            let moves = plan(vdisk, &policy, &groups, &five, &none, &none);
            onto_old.extend(
                moves
                    .iter()
                    .filter(|m| m.to != new.disk)
                    .map(|m| (v, groups[m.group as usize].clone(), *m)),
            );
        }
        assert!(
            onto_old.is_empty(),
            "{} moves between old disks, e.g. {:?}",
            onto_old.len(),
            onto_old.first()
        );
    }

    // ---- shedding and room ----

    const GB: u64 = 1 << 30;

    /// Plans with `space`, no group moving, nothing gone or excluded.
    fn plan_space(
        vdisk: Uuid,
        policy: &Policy,
        groups: &[Vec<Uuid>],
        candidates: &[PlacementDisk],
        space: &SpaceInput,
    ) -> Vec<PlannedMove> {
        plan_moves(&MovePlanInput {
            vdisk,
            policy,
            groups,
            moving: &[],
            candidates,
            gone: &HashSet::new(),
            excluded: &HashSet::new(),
            space,
        })
    }

    /// What the vDisk's copies take on each disk: `per_group` bytes for
    /// every group the disk is in.
    fn copy_bytes(groups: &[Vec<Uuid>], per_group: u64) -> HashMap<Uuid, u64> {
        let mut out = HashMap::new();
        for d in groups.iter().flatten() {
            *out.entry(*d).or_insert(0) += per_group;
        }
        out
    }

    #[test]
    fn a_disk_over_the_shed_line_sheds_one_copy_onto_a_disk_with_room() {
        let policy = mirror(2, 4);
        let mut shed_total = 0;
        for v in 0..200u128 {
            let vdisk = id(7 << 64 | v);
            let mut disks = pool(5, 1, 100 * GB);
            let groups = place(vdisk, &policy, &disks).expect("placeable");
            let full = groups[(v % 4) as usize][(v % 2) as usize];
            // The full disk at 95 %, one other at 85 %, the rest at 50 %.
            let busy = disks
                .iter()
                .map(|d| d.disk)
                .find(|d| *d != full)
                .expect("another disk");
            for d in disks.iter_mut() {
                d.used = if d.disk == full {
                    95 * GB
                } else if d.disk == busy {
                    85 * GB
                } else {
                    50 * GB
                };
            }
            let space = SpaceInput {
                copy_bytes: copy_bytes(&groups, 5 * GB),
                may_shed: HashSet::from([full]),
                incoming: HashMap::new(),
            };
            let moves = plan_space(vdisk, &policy, &groups, &disks, &space);
            let sheds: Vec<&PlannedMove> = moves.iter().filter(|m| m.shed).collect();
            assert_eq!(
                sheds.len(),
                1,
                "vDisk {v}: one shed per disk and call, whatever the groups: {moves:?}"
            );
            let m = sheds[0];
            shed_total += 1;
            assert_eq!(m.from, full, "vDisk {v}: the full disk sheds: {m:?}");
            assert!(!m.forced, "vDisk {v}: a shed is not forced: {m:?}");
            assert_eq!(m.bytes, 5 * GB, "vDisk {v}: one group's share");
            let members = &groups[m.group as usize];
            let none = HashSet::new();
            let target = candidate(&disks, m.to);
            assert!(
                may_receive(target, &disks, members, m.from, &none, &none),
                "vDisk {v}: {m:?} does not fit {members:?}"
            );
            assert_ne!(
                m.to, busy,
                "vDisk {v}: a disk at 85 % has no room for 5 GB under 80 %"
            );
            // With no other disk under the fill line, nothing sheds.
            let mut crowded = disks.clone();
            for d in crowded.iter_mut().filter(|d| d.disk != full) {
                d.used = 78 * GB;
            }
            assert!(
                plan_space(vdisk, &policy, &groups, &crowded, &space)
                    .iter()
                    .all(|m| !m.shed),
                "vDisk {v}: 78 % + 5 GB is above the fill line everywhere"
            );
            // Bytes already on their way onto a disk count against its room.
            let mut incoming = space.clone();
            for d in &disks {
                if d.disk != full {
                    incoming.incoming.insert(d.disk, 30 * GB);
                }
            }
            assert!(
                plan_space(vdisk, &policy, &groups, &disks, &incoming)
                    .iter()
                    .all(|m| !m.shed),
                "vDisk {v}: 50 % + 30 GB under way + 5 GB is above the fill line"
            );
            // A disk the caller does not let shed (a shed already under
            // way) sheds nothing.
            let waiting = SpaceInput {
                may_shed: HashSet::new(),
                ..space.clone()
            };
            assert!(
                plan_space(vdisk, &policy, &groups, &disks, &waiting)
                    .iter()
                    .all(|m| !m.shed && m.from != full),
                "vDisk {v}: no shed without the caller's leave"
            );
        }
        assert_eq!(shed_total, 200);
    }

    #[test]
    fn a_shed_copy_moves_back_only_once_its_old_disk_has_room_for_it() {
        let policy = mirror(2, 1);
        let mut back = 0;
        for v in 0..200u128 {
            let vdisk = id(8 << 64 | v);
            let mut disks = pool(4, 1, 100 * GB);
            let groups = place(vdisk, &policy, &disks).expect("placeable");
            let full = groups[0][0];
            for d in disks.iter_mut() {
                d.used = if d.disk == full { 92 * GB } else { 20 * GB };
            }
            let space = SpaceInput {
                copy_bytes: copy_bytes(&groups, 10 * GB),
                may_shed: HashSet::from([full]),
                incoming: HashMap::new(),
            };
            let moves = plan_space(vdisk, &policy, &groups, &disks, &space);
            assert_eq!(moves.len(), 1, "vDisk {v}: {moves:?}");
            let m = moves[0];
            assert!(m.shed && m.from == full, "vDisk {v}: {m:?}");
            // The shed done: the copy is on m.to, and the old disk gave 10 GB
            // back (82 %): still above the fill line with the copy back.
            let after: Vec<Vec<Uuid>> = vec![groups[0]
                .iter()
                .map(|d| if *d == full { m.to } else { *d })
                .collect()];
            for d in disks.iter_mut() {
                if d.disk == full {
                    d.used = 82 * GB;
                } else if d.disk == m.to {
                    d.used += 10 * GB;
                }
            }
            let space_after = SpaceInput {
                copy_bytes: copy_bytes(&after, 10 * GB),
                ..SpaceInput::default()
            };
            assert_eq!(
                plan_space(vdisk, &policy, &after, &disks, &space_after),
                vec![],
                "vDisk {v}: at 82 % the old disk has no room for the copy: it stays where it went"
            );
            // The old disk emptied (another vDisk deleted): placement's
            // choice has room again, and the copy goes back.
            for d in disks.iter_mut().filter(|d| d.disk == full) {
                d.used = 10 * GB;
            }
            let moves = plan_space(vdisk, &policy, &after, &disks, &space_after);
            assert_eq!(
                moves,
                vec![PlannedMove {
                    group: 0,
                    from: m.to,
                    to: full,
                    forced: false,
                    shed: false,
                    bytes: 10 * GB,
                }],
                "vDisk {v}: the copy returns where placement prefers it"
            );
            back += 1;
        }
        assert_eq!(back, 200);
    }

    #[test]
    fn a_rebalance_never_fills_its_target_past_the_fill_line() {
        let (four, five) = grown_pool();
        let new = five.last().expect("the new disk").disk;
        let policy = mirror(2, 4);
        let mut blocked = 0;
        for v in 0..200u128 {
            let vdisk = id(6 << 64 | v);
            let groups = place(vdisk, &policy, &four).expect("placeable");
            let free = plan_space(vdisk, &policy, &groups, &five, &SpaceInput::default());
            if !free.iter().any(|m| m.to == new) {
                continue;
            }
            // The new disk is at 70 % of 1 TB; each copy takes 150 GB.
            let mut filling = five.clone();
            filling.last_mut().expect("the new disk").used = TB / 10 * 7;
            let space = SpaceInput {
                copy_bytes: copy_bytes(&groups, 150 * GB),
                ..SpaceInput::default()
            };
            let moves = plan_space(vdisk, &policy, &groups, &filling, &space);
            assert!(
                moves.iter().all(|m| m.to != new),
                "vDisk {v}: 70 % + 150 GB passes the fill line: {moves:?}"
            );
            // Small copies still fit.
            let small = SpaceInput {
                copy_bytes: copy_bytes(&groups, GB),
                ..SpaceInput::default()
            };
            assert_eq!(
                plan_space(vdisk, &policy, &groups, &filling, &small)
                    .iter()
                    .map(|m| (m.group, m.from, m.to))
                    .collect::<Vec<_>>(),
                free.iter()
                    .map(|m| (m.group, m.from, m.to))
                    .collect::<Vec<_>>(),
                "vDisk {v}: copies of 1 GB fit under the fill line"
            );
            blocked += 1;
        }
        assert!(
            blocked > 20,
            "only {blocked} vDisks rebalanced onto the new disk"
        );
    }

    #[test]
    fn moves_planned_in_one_call_count_against_their_targets_room() {
        let policy = mirror(2, 8);
        let mut disks = pool(2, 1, 100 * GB);
        let vdisk = id(10 << 64);
        let groups = place(vdisk, &policy, &disks).expect("placeable");
        for d in disks.iter_mut() {
            d.used = 95 * GB;
        }
        let new = PlacementDisk {
            disk: id(9000),
            node: id(99),
            capacity: 100 * GB,
            used: 50 * GB,
            up: true,
        };
        disks.push(new);
        let space = SpaceInput {
            copy_bytes: copy_bytes(&groups, 10 * GB),
            may_shed: disks[..2].iter().map(|d| d.disk).collect(),
            incoming: HashMap::new(),
        };
        let moves = plan_space(vdisk, &policy, &groups, &disks, &space);
        let onto: u64 = moves
            .iter()
            .filter(|m| m.to == new.disk)
            .map(|m| m.bytes)
            .sum();
        assert!(
            onto <= 30 * GB,
            "50 GB used + {onto} bytes planned passes 80 GB: {moves:?}"
        );
        assert_eq!(
            moves.iter().filter(|m| m.shed).count(),
            2,
            "each full disk sheds one copy: {moves:?}"
        );
        assert_eq!(
            onto,
            30 * GB,
            "the room left takes a third copy (a rebalance): {moves:?}"
        );
    }

    #[test]
    fn a_forced_move_takes_any_disk_that_fits_whatever_its_fill() {
        let disks = pool(3, 1, 100 * GB);
        let policy = mirror(2, 1);
        for v in 0..50u128 {
            let vdisk = id(9 << 64 | v);
            let groups = place(vdisk, &policy, &disks).expect("placeable");
            let lost = groups[0][0];
            let mut crowded = disks.clone();
            for d in crowded.iter_mut() {
                d.used = 95 * GB;
            }
            let space = SpaceInput {
                copy_bytes: copy_bytes(&groups, 50 * GB),
                ..SpaceInput::default()
            };
            let moves = plan_moves(&MovePlanInput {
                vdisk,
                policy: &policy,
                groups: &groups,
                moving: &[],
                candidates: &crowded,
                gone: &HashSet::from([lost]),
                excluded: &HashSet::new(),
                space: &space,
            });
            assert_eq!(
                moves.len(),
                1,
                "vDisk {v}: a lost copy is rebuilt: {moves:?}"
            );
            assert!(
                moves[0].forced && moves[0].from == lost,
                "vDisk {v}: {moves:?}"
            );
        }
    }
}
