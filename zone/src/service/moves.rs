//! Rebuild, drain and rebalance: the zone side of moving copies.
//!
//! The zone only decides and records; the vDisk's writer (or the repair
//! worker, for a vDisk nobody has open) copies the data. A move is
//! make-before-break:
//!
//! 1. [`ZoneService::plan_moves`] appends the target disk to the group,
//!    records every chunk of the group dirty on it (one run of its dirty
//!    set, whatever the vDisk's size), and bumps the placement version. Writers pick the new placement up at their next
//!    lease renewal.
//! 2. The writer's resync fills the target like any stale copy (its dirty
//!    set) and records it complete ([`ZoneService::mark_clean`]).
//! 3. Completing the target finishes its moves: the source leaves the group
//!    (and the stale and dirty lists if it holds no other group), and the
//!    placement version is bumped again.
//! 4. The source's node, reporting a copy that is in no group, is told to
//!    free it; the disk is listed in `released` until the node reports it
//!    gone (and in `released_groups` from the move's end until that
//!    report), and is never a target for this vDisk meanwhile.

use std::collections::{HashMap, HashSet};

use uuid::Uuid;

use super::{GroupsToFree, Stored, ZoneService};
use crate::placement::{over_shed_line, plan_moves, MovePlanInput, PlacementDisk, SpaceInput};
use crate::records::keys;
use crate::records::{Datastore, Disk, Move, MoveReason, Node, ReleasedGroup, Vdisk};
use crate::ZoneError;

/// A move the planner recorded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordedMove {
    pub datastore: String,
    pub vdisk: String,
    pub mv: Move,
}

impl ZoneService {
    /// Plans and records copy moves for every vDisk: off disks of
    /// `gone_nodes` (down longer than the rebuild delay) and off disks no
    /// longer in their datastore, and onto disks placement prefers
    /// (rebalance). At most one move per group at a time.
    pub async fn plan_moves(
        &self,
        gone_nodes: &HashSet<Uuid>,
    ) -> Result<Vec<RecordedMove>, ZoneError> {
        let up = self.up_nodes().await?;
        let disks: Vec<Disk> = self.disks().await?;
        let datastores: Vec<Datastore> = self.datastores().await?;
        let mut recorded = Vec::new();
        for ds in datastores {
            if ds.deleting {
                continue;
            }
            let candidates: Vec<PlacementDisk> = disks
                .iter()
                .filter(|d| ds.disks.contains(&d.uuid))
                .map(|d| PlacementDisk {
                    disk: d.uuid,
                    node: d.node,
                    capacity: d.capacity,
                    used: d.used,
                    up: up.contains(&d.node),
                })
                .collect();
            let gone: HashSet<Uuid> = disks
                .iter()
                .filter(|d| gone_nodes.contains(&d.node))
                .map(|d| d.uuid)
                .collect();
            let vdisks: Vec<Vdisk> = self.load_all(&super::vdisk_prefix(&ds.name)).await?;
            let usage = self.usage_snapshot();
            let copy_bytes = |v: &Vdisk| -> HashMap<Uuid, u64> {
                candidates
                    .iter()
                    .filter_map(|c| Some((c.disk, *usage.get(&c.disk)?.get(&v.uuid)?)))
                    .collect()
            };
            // Space under way: a disk sheds one copy at a time (a shed not
            // finished, or a moved copy its node has not freed yet, holds
            // it back: its `used` does not show the space coming back), and
            // bytes being copied onto a disk count against its room.
            let mut space = SpaceInput::default();
            let mut held_back: HashSet<Uuid> = HashSet::new();
            for v in &vdisks {
                held_back.extend(v.released.iter().copied());
                held_back.extend(v.released_groups.iter().map(|r| r.disk));
                let bytes = copy_bytes(v);
                for m in &v.placement.moves {
                    if m.reason == MoveReason::Shed {
                        held_back.insert(m.from);
                    }
                    let groups = v
                        .placement
                        .groups
                        .iter()
                        .filter(|g| g.contains(&m.from))
                        .count()
                        .max(1) as u64;
                    let share = bytes.get(&m.from).copied().unwrap_or(0) / groups;
                    *space.incoming.entry(m.to).or_insert(0) += share;
                }
            }
            space.may_shed = candidates
                .iter()
                .filter(|c| c.up && over_shed_line(c) && !held_back.contains(&c.disk))
                .map(|c| c.disk)
                .collect();
            for mut v in vdisks {
                // A move whose target is gone too is abandoned; the group
                // is planned again below.
                let lost: Vec<Move> = v
                    .placement
                    .moves
                    .iter()
                    .copied()
                    .filter(|m| gone.contains(&m.to) || !ds.disks.contains(&m.to))
                    .collect();
                for m in lost {
                    match self.cancel_move(&ds.name, &v.name, m).await {
                        Ok(updated) => v = updated,
                        Err(ZoneError::NotFound(_)) => break,
                        Err(e) => return Err(e),
                    }
                }
                let moving: Vec<u32> = v.placement.moves.iter().map(|m| m.group).collect();
                let excluded: HashSet<Uuid> = v
                    .released
                    .iter()
                    .copied()
                    .chain(v.released_groups.iter().map(|r| r.disk))
                    .collect();
                space.copy_bytes = copy_bytes(&v);
                let planned = plan_moves(&MovePlanInput {
                    vdisk: v.uuid,
                    policy: &v.policy,
                    groups: &v.placement.groups,
                    moving: &moving,
                    candidates: &candidates,
                    gone: &gone,
                    excluded: &excluded,
                    space: &space,
                });
                for p in planned {
                    let from_down = disks
                        .iter()
                        .find(|d| d.uuid == p.from)
                        .is_none_or(|d| !up.contains(&d.node));
                    let reason = if p.shed {
                        MoveReason::Shed
                    } else if !p.forced {
                        MoveReason::Rebalance
                    } else if gone.contains(&p.from) || from_down {
                        MoveReason::Rebuild
                    } else {
                        MoveReason::Drain
                    };
                    let mv = Move {
                        group: p.group,
                        from: p.from,
                        to: p.to,
                        reason,
                    };
                    let applied = self.record_move(&ds.name, &v.name, mv).await;
                    match applied {
                        Ok(true) => {
                            *space.incoming.entry(mv.to).or_insert(0) += p.bytes;
                            if p.shed {
                                space.may_shed.remove(&mv.from);
                            }
                            tracing::info!(
                                vdisk = %format!("{}/{}", ds.name, v.name),
                                group = mv.group, from = %mv.from, to = %mv.to, ?reason, bytes = p.bytes,
                                "copy move planned"
                            );
                            recorded.push(RecordedMove {
                                datastore: ds.name.clone(),
                                vdisk: v.name.clone(),
                                mv,
                            });
                        }
                        Ok(false) | Err(ZoneError::NotFound(_)) => {}
                        Err(e) => return Err(e),
                    }
                }
            }
        }
        Ok(recorded)
    }

    /// Records one move if the vDisk still allows it; false if it changed
    /// meanwhile so that the move no longer applies.
    async fn record_move(&self, datastore: &str, name: &str, mv: Move) -> Result<bool, ZoneError> {
        let (_, applied) = self
            .update(
                &keys::vdisk(datastore, name),
                || format!("vDisk {datastore}/{name}"),
                |v: &mut Vdisk| {
                    let g = mv.group as usize;
                    let ok = g < v.placement.groups.len()
                        && !v.placement.moves.iter().any(|m| m.group == mv.group)
                        && v.placement.groups[g].contains(&mv.from)
                        && !v.placement.groups[g].contains(&mv.to)
                        && !v.released.contains(&mv.to)
                        && !v.released_groups.iter().any(|r| r.disk == mv.to);
                    if !ok {
                        return Ok(false);
                    }
                    let len = v.placement.group_len(mv.group, v.size);
                    v.placement.groups[g].push(mv.to);
                    v.placement.moves.push(mv);
                    v.placement.version += 1;
                    // The target is not current in this group until the
                    // move finishes (the move says so; its copies of other
                    // groups stay current). The whole group is one run.
                    super::dirty_set(v, mv.to).add_group_range(mv.group, 0..len);
                    Ok(true)
                },
            )
            .await?;
        Ok(applied)
    }

    /// Abandons move `mv` (its target is gone): the target leaves the group
    /// it was being filled for; the source stays.
    async fn cancel_move(&self, datastore: &str, name: &str, mv: Move) -> Result<Vdisk, ZoneError> {
        let (stored, ()) = self
            .update(
                &keys::vdisk(datastore, name),
                || format!("vDisk {datastore}/{name}"),
                |v: &mut Vdisk| {
                    if !v.placement.moves.contains(&mv) {
                        return Ok(());
                    }
                    v.placement.moves.retain(|m| *m != mv);
                    if let Some(group) = v.placement.groups.get_mut(mv.group as usize) {
                        group.retain(|d| *d != mv.to);
                    }
                    if v.placement.holds(mv.to) {
                        if let Some(e) = v.dirty.iter_mut().find(|e| e.disk == mv.to) {
                            e.remove_group(mv.group);
                        }
                    } else {
                        v.stale.retain(|d| *d != mv.to);
                        v.dirty.retain(|e| e.disk != mv.to);
                    }
                    v.placement.version += 1;
                    Ok(())
                },
            )
            .await?;
        tracing::warn!(vdisk = %format!("{datastore}/{name}"), group = mv.group, to = %mv.to, "copy move abandoned: its target is gone");
        Ok(stored.record)
    }

    /// Adds a disk to a datastore; placement rebalances onto it.
    pub async fn add_datastore_disk(&self, name: &str, disk: Uuid) -> Result<Datastore, ZoneError> {
        self.load::<Disk>(&keys::disk(&disk))
            .await?
            .ok_or_else(|| ZoneError::NotFound(format!("disk {disk}")))?;
        let (stored, ()) = self
            .update(
                &keys::datastore(name),
                || format!("datastore '{name}'"),
                |ds: &mut Datastore| {
                    if !ds.disks.contains(&disk) {
                        ds.disks.push(disk);
                    }
                    Ok(())
                },
            )
            .await?;
        Ok(stored.record)
    }

    /// Removes a disk from a datastore: its copies drain to other disks.
    pub async fn remove_datastore_disk(
        &self,
        name: &str,
        disk: Uuid,
    ) -> Result<Datastore, ZoneError> {
        let (stored, ()) = self
            .update(
                &keys::datastore(name),
                || format!("datastore '{name}'"),
                |ds: &mut Datastore| {
                    if !ds.disks.contains(&disk) {
                        return Err(ZoneError::NotFound(format!(
                            "disk {disk} in datastore '{name}'"
                        )));
                    }
                    ds.disks.retain(|d| *d != disk);
                    Ok(())
                },
            )
            .await?;
        Ok(stored.record)
    }

    /// Removes a storage node for good: its disks leave every datastore
    /// (their copies are rebuilt elsewhere). Refused while the node is up,
    /// unless `force`.
    pub async fn remove_node(&self, node: Uuid, force: bool) -> Result<Vec<Uuid>, ZoneError> {
        let Stored { record, .. } = self
            .get::<Node>(&keys::node(&node), || format!("node {node}"))
            .await?;
        if !force && self.up_nodes().await?.contains(&node) {
            return Err(ZoneError::Conflict(format!(
                "node {node} is up; stop it first or force the removal"
            )));
        }
        let mut touched = Vec::new();
        for ds in self.datastores().await? {
            if !ds.disks.iter().any(|d| record.disks.contains(d)) {
                continue;
            }
            self.update(
                &keys::datastore(&ds.name),
                || format!("datastore '{}'", ds.name),
                |d: &mut Datastore| {
                    d.disks.retain(|x| !record.disks.contains(x));
                    Ok(())
                },
            )
            .await?;
            touched.push(ds.uuid);
        }
        tracing::info!(%node, disks = record.disks.len(), "node removed from every datastore");
        Ok(record.disks)
    }

    /// Which of the copies a node reports (disk, vDisk) it must free: the
    /// vDisk is deleted, or the disk is in none of its groups (moved away;
    /// recorded in `released` first, atomically with that check). Also
    /// forgets released disks of this node that it no longer reports. And
    /// which groups of copies it keeps it must free (`released_groups`:
    /// moved away while the disk keeps other groups), forgetting those the
    /// node says it freed (`freed`). Both wait until the writer settled on
    /// a placement without them (or lost its lease).
    pub(super) async fn copies_to_free(
        &self,
        node: &Node,
        copies: &[[Uuid; 2]],
        freed: &[GroupsToFree],
    ) -> Result<(Vec<[Uuid; 2]>, Vec<GroupsToFree>), ZoneError> {
        let vdisks: Vec<Vdisk> = self.load_all(keys::VDISKS).await?;
        let reported: HashSet<[Uuid; 2]> = copies.iter().copied().collect();
        let mut free = Vec::new();
        let mut free_groups = Vec::new();
        for v in &vdisks {
            let here: Vec<Uuid> = node
                .disks
                .iter()
                .copied()
                .filter(|d| {
                    reported.contains(&[*d, v.uuid])
                        || v.released.contains(d)
                        || v.released_groups.iter().any(|r| r.disk == *d)
                })
                .collect();
            if here.is_empty() {
                continue;
            }
            let acked: Vec<ReleasedGroup> = freed
                .iter()
                .filter(|f| f.vdisk == v.uuid && here.contains(&f.disk))
                .flat_map(|f| {
                    f.groups.iter().map(|g| ReleasedGroup {
                        disk: f.disk,
                        group: *g,
                    })
                })
                .collect();
            let outcome = self
                .update(
                    &keys::vdisk(&v.datastore, &v.name),
                    || format!("vDisk {}/{}", v.datastore, v.name),
                    |cur: &mut Vdisk| {
                        let mut release = Vec::new();
                        let mut groups = Vec::new();
                        if cur.uuid != v.uuid {
                            return Ok((release, groups));
                        }
                        // A group the node freed is forgotten, unless the
                        // disk was made its member again meanwhile (it
                        // cannot be while released: belt and braces).
                        cur.released_groups.retain(|r| {
                            !acked.contains(r)
                                || cur
                                    .placement
                                    .groups
                                    .get(r.group as usize)
                                    .is_some_and(|g| g.contains(&r.disk))
                        });
                        // A writer still on an older placement may read the
                        // copy a newer one dropped: it is freed once the
                        // writer settled on the newer one (or lost its lease).
                        let now = self.env.now_ms();
                        let writer_behind = cur.lease.as_ref().is_some_and(|l| {
                            l.expires_ms > now && l.settled < cur.placement.version
                        });
                        for d in &here {
                            let held = reported.contains(&[*d, cur.uuid]);
                            if held
                                && !cur.placement.holds(*d)
                                && writer_behind
                                && !cur.released.contains(d)
                            {
                                continue;
                            }
                            if held && !cur.placement.holds(*d) {
                                if !cur.released.contains(d) {
                                    cur.released.push(*d);
                                }
                                // The whole copy goes: its groups with it.
                                cur.released_groups.retain(|r| r.disk != *d);
                                release.push(*d);
                            } else if !held {
                                cur.released.retain(|x| x != d);
                                cur.released_groups.retain(|r| r.disk != *d);
                            } else if !writer_behind {
                                let mine: Vec<u32> = cur
                                    .released_groups
                                    .iter()
                                    .filter(|r| r.disk == *d)
                                    .map(|r| r.group)
                                    .collect();
                                if !mine.is_empty() {
                                    groups.push(GroupsToFree {
                                        disk: *d,
                                        vdisk: cur.uuid,
                                        stripes: cur.placement.groups.len() as u32,
                                        groups: mine,
                                    });
                                }
                            }
                        }
                        Ok((release, groups))
                    },
                )
                .await;
            let (release, groups) = match outcome {
                Ok((_, out)) => out,
                Err(ZoneError::NotFound(_)) => (Vec::new(), Vec::new()),
                Err(e) => return Err(e),
            };
            free.extend(release.iter().map(|d| [*d, v.uuid]));
            free_groups.extend(groups);
        }
        Ok((free, free_groups))
    }
}

/// Finishes every move whose target is `disk` (now current): each source
/// leaves its group, and the stale and dirty lists if it holds no other.
pub(super) fn finish_moves(v: &mut Vdisk, disk: Uuid) {
    let done: Vec<Move> = v
        .placement
        .moves
        .iter()
        .copied()
        .filter(|m| m.to == disk)
        .collect();
    if done.is_empty() {
        return;
    }
    for m in &done {
        if let Some(group) = v.placement.groups.get_mut(m.group as usize) {
            group.retain(|d| *d != m.from);
        }
        // The group's chunks on the source are to be freed: by its node
        // freeing this group only if the source keeps other groups of the
        // vDisk, else with the whole copy (`released`, once its node
        // reports the copy). Listed either way, so that the source is no
        // target of another move of this vDisk meanwhile: made a member
        // of another group first, it would keep this group's chunks for
        // good (seed 9933 of `--nodes 5 --stripes 3`).
        let left = ReleasedGroup {
            disk: m.from,
            group: m.group,
        };
        if !v.released_groups.contains(&left) {
            v.released_groups.push(left);
        }
        if !v.placement.holds(m.from) {
            v.stale.retain(|d| *d != m.from);
            v.dirty.retain(|e| e.disk != m.from);
        } else if let Some(e) = v.dirty.iter_mut().find(|e| e.disk == m.from) {
            // It holds other groups: what it missed in this one no longer
            // matters (and must not pass for chunks to copy there if it is
            // made a target of this group again).
            let had = !e.is_empty();
            e.remove_group(m.group);
            if e.is_empty() {
                v.dirty.retain(|e| e.disk != m.from);
                // It was stale only for chunks of the group it left (a
                // dirty set lists everything a stale copy lacks): its
                // other groups are whole, and its writer, which tracks
                // each group's copy, holds them current. Left listed, the
                // disk would be stale with nothing to resync (stale in
                // every group, for the next writer) while no writer ever
                // resyncs it (seed 9561 of `--nodes 5 --stripes 3`).
                if had {
                    v.stale.retain(|d| *d != m.from);
                }
            }
        }
    }
    v.placement.moves.retain(|m| m.to != disk);
    v.placement.version += 1;
}

/// Runs [`ZoneService::plan_moves`] periodically, deciding which nodes are
/// gone for good: down for longer than the rebuild delay (counted from the
/// first plan that saw them down, so a restart of the planner restarts the
/// count: it errs on the side of waiting). The delay is counted on tokio's
/// clock: monotonic (a step of the wall clock moves nothing), and simulated
/// time in a simulation that pauses it.
pub struct MovePlanner {
    svc: ZoneService,
    rebuild_after: std::time::Duration,
    down_since: std::collections::HashMap<Uuid, tokio::time::Instant>,
}

impl MovePlanner {
    pub fn new(svc: ZoneService, rebuild_after: std::time::Duration) -> Self {
        MovePlanner {
            svc,
            rebuild_after,
            down_since: Default::default(),
        }
    }

    /// One planning pass.
    pub async fn run_once(&mut self) -> Result<Vec<RecordedMove>, ZoneError> {
        let now = tokio::time::Instant::now();
        let nodes = self.svc.nodes().await?;
        let mut gone = HashSet::new();
        for n in &nodes {
            if n.state == crate::records::NodeState::Up {
                self.down_since.remove(&n.node.uuid);
                continue;
            }
            let since = *self.down_since.entry(n.node.uuid).or_insert(now);
            if now.saturating_duration_since(since) >= self.rebuild_after {
                gone.insert(n.node.uuid);
            }
        }
        self.svc.plan_moves(&gone).await
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::records::{MoveReason, CHUNK_SIZE};
    use crate::service::tests::{
        cluster, disk_id, kill, mirrors, node_id, open_req, registration, service, vdisk_req,
    };
    use crate::service::{
        CopyRepair, Health, Heartbeat, MarkClean, OpenVdisk, Registered, SessionRef,
    };

    /// The number of the node owning disk `disk_id(n, _)`.
    fn node_of(disk: Uuid) -> u128 {
        disk.as_u128() / 100
    }

    fn heartbeat(lease: u64, copies: Vec<[Uuid; 2]>) -> Heartbeat {
        Heartbeat {
            lease,
            disks: Vec::new(),
            vdisks: Vec::new(),
            copies,
            usage: None,
            freed_groups: Vec::new(),
        }
    }

    fn none() -> HashSet<Uuid> {
        HashSet::new()
    }

    const NO_DISKS: Vec<Uuid> = Vec::new();
    const NO_COPIES: Vec<[Uuid; 2]> = Vec::new();

    /// 5 chunks: 4 MiB and one sector.
    const SIZE: u64 = 4 * CHUNK_SIZE + 512;

    /// A vDisk of datastore `ds` (mirrors=2 over 3 nodes of one disk each)
    /// whose copy on `source` is being drained to `spare`.
    struct Drain {
        svc: ZoneService,
        registered: Vec<Registered>,
        /// The vDisk as created.
        created: Vdisk,
        keep: Uuid,
        source: Uuid,
        spare: Uuid,
    }

    async fn drained() -> Drain {
        let svc = service().await;
        let registered = cluster(&svc, 3, 1).await;
        svc.create_datastore(mirrors("ds", 2, None))
            .await
            .expect("datastore");
        let created = svc
            .create_vdisk(vdisk_req("ds", "vd", SIZE))
            .await
            .expect("vdisk");
        let group = created.placement.groups[0].clone();
        assert_eq!(group.len(), 2);
        let (keep, source) = (group[0], group[1]);
        let spare = (1..=3)
            .map(|n| disk_id(n, 0))
            .find(|d| !group.contains(d))
            .expect("a third disk");

        let ds = svc
            .remove_datastore_disk("ds", source)
            .await
            .expect("removed");
        assert!(!ds.disks.contains(&source));
        assert!(matches!(
            svc.remove_datastore_disk("ds", source).await,
            Err(ZoneError::NotFound(_))
        ));
        let recorded = svc.plan_moves(&none()).await.expect("planned");
        assert_eq!(
            recorded,
            vec![RecordedMove {
                datastore: "ds".into(),
                vdisk: "vd".into(),
                mv: Move {
                    group: 0,
                    from: source,
                    to: spare,
                    reason: MoveReason::Drain,
                },
            }]
        );
        Drain {
            svc,
            registered,
            created,
            keep,
            source,
            spare,
        }
    }

    impl Drain {
        async fn vdisk(&self) -> Vdisk {
            self.svc.vdisk("ds", "vd").await.expect("found").vdisk
        }

        async fn open(&self, host: &str) -> Uuid {
            self.svc
                .open_vdisk("ds", "vd", open_req(host, 60_000, false))
                .await
                .expect("opens")
                .session
        }

        /// Resyncs the spare completely: finishes the move, and the writer
        /// settles on the placement without the source.
        async fn finish(&self) {
            let session = self.finish_unsettled(60_000).await;
            let version = self.vdisk().await.placement.version;
            self.settle(session, version).await;
        }

        /// Finishes the move with a writer whose lease lasts `ttl_ms`; the
        /// writer has not adopted the placement without the source yet.
        /// Returns the writer's session.
        async fn finish_unsettled(&self, ttl_ms: u64) -> Uuid {
            let session = self
                .svc
                .open_vdisk("ds", "vd", open_req("hv1", ttl_ms, false))
                .await
                .expect("opens")
                .session;
            self.svc
                .mark_clean(
                    "ds",
                    "vd",
                    MarkClean {
                        session,
                        disk: self.spare,
                        chunks: (0..5).collect(),
                        complete: true,
                    },
                )
                .await
                .expect("the spare is complete");
            session
        }

        /// The writer of `session` renews, settled on placement `version`.
        async fn settle(&self, session: Uuid, version: u64) {
            self.svc
                .renew_vdisk(
                    "ds",
                    "vd",
                    SessionRef {
                        session,
                        ttl_ms: None,
                        keep_activity: false,
                        settled: Some(version),
                    },
                )
                .await
                .expect("renews");
        }

        /// Node `n`'s heartbeat reporting `copies`.
        async fn heartbeat(&self, n: u128, copies: Vec<[Uuid; 2]>) -> Vec<[Uuid; 2]> {
            self.svc
                .heartbeat(
                    node_id(n),
                    heartbeat(self.registered[n as usize - 1].lease, copies),
                )
                .await
                .expect("heartbeat")
                .free
        }
    }

    #[tokio::test]
    async fn a_drain_moves_a_copy_make_before_break() {
        let d = drained().await;
        let version = d.created.placement.version;

        // Recorded: the spare joins the group, stale with every chunk dirty.
        let view = d.svc.vdisk("ds", "vd").await.expect("found");
        let v = &view.vdisk;
        assert_eq!(v.placement.groups, vec![vec![d.keep, d.source, d.spare]]);
        assert_eq!(
            v.placement.moves,
            vec![Move {
                group: 0,
                from: d.source,
                to: d.spare,
                reason: MoveReason::Drain
            }]
        );
        assert_eq!(v.placement.version, version + 1);
        assert!(v.stale.is_empty(), "a move target is not stale as a whole");
        assert_eq!(v.dirty.len(), 1);
        assert_eq!(
            (v.dirty[0].disk, v.dirty[0].stripes(), v.dirty[0].runs()),
            (d.spare, 1, &[[0, 0, 5]][..])
        );
        assert_eq!(
            v.dirty[0].chunks().collect::<Vec<_>>(),
            v.placement.group_chunks(0, SIZE).collect::<Vec<_>>()
        );
        assert_eq!(
            view.repair,
            vec![CopyRepair {
                disk: d.spare,
                dirty_chunks: 5,
                node_up: true,
                replaces: Some(d.source),
            }]
        );
        // The source is still up and current: a drain keeps the vDisk's
        // full redundancy while the spare fills.
        assert_eq!(view.health, Health::Healthy);

        // Nothing more to plan while the move runs.
        assert_eq!(d.svc.plan_moves(&none()).await.expect("planned"), vec![]);
        assert_eq!(d.vdisk().await.placement.version, version + 1);

        // The writer sees the new placement, and learns of it on renewal.
        let opened = d
            .svc
            .open_vdisk("ds", "vd", open_req("hv1", 60_000, false))
            .await
            .expect("opens");
        assert_eq!(
            opened.vdisk.placement.groups[0],
            vec![d.keep, d.source, d.spare]
        );
        assert!(opened.disks.iter().any(|disk| disk.uuid == d.spare));
        let renewed = d
            .svc
            .renew_vdisk(
                "ds",
                "vd",
                SessionRef {
                    session: opened.session,
                    ttl_ms: None,
                    keep_activity: false,
                    settled: None,
                },
            )
            .await
            .expect("renews");
        assert_eq!(renewed.placement_version, version + 1);

        // Resync fills the spare in two steps, then completes it.
        let clean = |chunks: Vec<u64>, complete: bool| MarkClean {
            session: opened.session,
            disk: d.spare,
            chunks,
            complete,
        };
        let v = d
            .svc
            .mark_clean("ds", "vd", clean(vec![0, 1, 2], false))
            .await
            .expect("cleaned");
        assert_eq!(v.dirty[0].runs(), [[0, 3, 5]]);
        assert_eq!(v.placement.moves.len(), 1, "not complete yet");
        d.svc
            .mark_clean("ds", "vd", clean(vec![3, 4], true))
            .await
            .expect("complete");

        let view = d.svc.vdisk("ds", "vd").await.expect("found");
        let v = &view.vdisk;
        assert_eq!(v.placement.groups, vec![vec![d.keep, d.spare]]);
        assert_eq!(v.placement.moves, vec![]);
        assert_eq!(v.placement.version, version + 2);
        assert!(!v.placement.holds(d.source));
        assert_eq!((v.stale.clone(), v.dirty.clone()), (vec![], vec![]));
        assert_eq!(view.repair, vec![]);
        assert_eq!(view.health, Health::Healthy);
        let renewed = d
            .svc
            .renew_vdisk(
                "ds",
                "vd",
                SessionRef {
                    session: opened.session,
                    ttl_ms: None,
                    keep_activity: false,
                    settled: None,
                },
            )
            .await
            .expect("renews");
        assert_eq!(renewed.placement_version, version + 2);

        // Settled: nothing more to move.
        assert_eq!(d.svc.plan_moves(&none()).await.expect("planned"), vec![]);
    }

    #[tokio::test]
    async fn completing_a_target_that_misses_chunks_is_refused_and_finishes_nothing() {
        let d = drained().await;
        let session = d.open("hv1").await;
        let before = d.vdisk().await;
        let error = d
            .svc
            .mark_clean(
                "ds",
                "vd",
                MarkClean {
                    session,
                    disk: d.spare,
                    chunks: vec![0, 1, 2, 3],
                    complete: true,
                },
            )
            .await
            .expect_err("chunk 4 is still dirty");
        assert!(
            matches!(error, ZoneError::StillDirty { disk, missing: 1, .. } if disk == d.spare),
            "{error:?}"
        );
        let after = d.vdisk().await;
        assert_eq!(
            after
                .dirty
                .iter()
                .find(|e| e.disk == d.spare)
                .map(|e| e.count()),
            Some(5),
            "the refused call recorded nothing"
        );
        assert_eq!(
            after.placement, before.placement,
            "the move is not finished"
        );
        assert!(after.placement.holds(d.source));
        assert_eq!(after.placement.moves.len(), 1, "the move is still there");
        assert!(after
            .dirty
            .iter()
            .any(|e| e.disk == d.spare && e.contains(4)));

        // Completing the staying copy (not a move target) finishes nothing.
        d.svc
            .mark_clean(
                "ds",
                "vd",
                MarkClean {
                    session,
                    disk: d.keep,
                    chunks: vec![],
                    complete: true,
                },
            )
            .await
            .expect("a current copy may be completed");
        assert_eq!(d.vdisk().await.placement, before.placement);
    }

    #[tokio::test]
    async fn heartbeats_free_moved_copies_and_released_disks_are_no_targets() {
        let d = drained().await;
        let vd = d.created.uuid;
        let (keep_node, source_node, spare_node) =
            (node_of(d.keep), node_of(d.source), node_of(d.spare));

        // While the move runs, the source's copy is still in the placement.
        assert_eq!(
            d.heartbeat(source_node, vec![[d.source, vd]]).await,
            NO_COPIES
        );
        assert_eq!(
            d.heartbeat(spare_node, vec![[d.spare, vd]]).await,
            NO_COPIES
        );
        assert_eq!(d.vdisk().await.released, NO_DISKS);

        d.finish().await;
        // Copies in the placement are never freed.
        assert_eq!(d.heartbeat(keep_node, vec![[d.keep, vd]]).await, NO_COPIES);
        assert_eq!(
            d.heartbeat(spare_node, vec![[d.spare, vd]]).await,
            NO_COPIES
        );
        // Nor is a disk of another node, whatever this one reports.
        assert_eq!(
            d.heartbeat(keep_node, vec![[d.source, vd]]).await,
            NO_COPIES
        );
        assert_eq!(d.vdisk().await.released, NO_DISKS);

        // The source's node reports the moved copy: it frees it.
        assert_eq!(
            d.heartbeat(source_node, vec![[d.source, vd]]).await,
            vec![[d.source, vd]]
        );
        assert_eq!(d.vdisk().await.released, vec![d.source]);
        assert_eq!(
            d.heartbeat(source_node, vec![[d.source, vd]]).await,
            vec![[d.source, vd]],
            "told again until it is gone"
        );
        assert_eq!(d.vdisk().await.released, vec![d.source]);

        // The source rejoins the datastore: placement would put the copy
        // back there, but not while the old copy is being freed.
        d.svc
            .add_datastore_disk("ds", d.source)
            .await
            .expect("added");
        assert_eq!(d.svc.plan_moves(&none()).await.expect("planned"), vec![]);

        // Once the node no longer reports the copy (it still reports
        // another one, of a deleted vDisk), the disk is no longer released
        // and the copy may move back.
        let stranger = Uuid::new_v4();
        assert_eq!(
            d.heartbeat(source_node, vec![[d.source, stranger]]).await,
            NO_COPIES
        );
        assert_eq!(d.vdisk().await.released, NO_DISKS);
        let recorded = d.svc.plan_moves(&none()).await.expect("planned");
        assert_eq!(
            recorded.iter().map(|r| r.mv).collect::<Vec<_>>(),
            vec![Move {
                group: 0,
                from: d.spare,
                to: d.source,
                reason: MoveReason::Rebalance,
            }]
        );
    }

    /// A move's source that left the vDisk is no target of another move
    /// until its node freed the copy, also before that node reported the
    /// copy after the move finished.
    ///
    /// Fails if `finish_moves` lists in `released_groups` only sources that
    /// keep other groups: the planner moves the copy straight back onto
    /// the source (with stripes, into another group: the old group's
    /// chunks then stay there for good; seed 9933 of `--nodes 5 --stripes 3`).
    #[tokio::test]
    async fn a_source_is_no_target_before_its_node_freed_the_moved_copy() {
        let d = drained().await;
        let vd = d.created.uuid;
        let source_node = node_of(d.source);
        d.finish().await;
        d.svc
            .add_datastore_disk("ds", d.source)
            .await
            .expect("added");
        assert_eq!(
            d.svc.plan_moves(&none()).await.expect("planned"),
            vec![],
            "no move onto a source whose node has not freed the copy"
        );
        assert_eq!(
            d.heartbeat(source_node, vec![[d.source, vd]]).await,
            vec![[d.source, vd]]
        );
        assert_eq!(d.svc.plan_moves(&none()).await.expect("planned"), vec![]);
        assert_eq!(d.heartbeat(source_node, Vec::new()).await, NO_COPIES);
        let v = d.vdisk().await;
        assert_eq!(v.released, NO_DISKS);
        assert!(v.released_groups.is_empty());
        let recorded = d.svc.plan_moves(&none()).await.expect("planned");
        assert_eq!(
            recorded.iter().map(|r| r.mv.to).collect::<Vec<_>>(),
            vec![d.source],
            "freed, the source may take the copy back"
        );
    }

    /// A writer that has not adopted the placement without a move's source
    /// may still read the source: its node frees it only once the writer
    /// has settled on that placement, or lost its lease.
    ///
    /// Fails if `copies_to_free` releases a copy while the lease holder's
    /// `settled` version is older than the placement (the `writer_behind`
    /// check removed): the first heartbeat frees the source.
    #[tokio::test]
    async fn a_moved_copy_is_freed_only_once_the_writer_settled_past_it() {
        let d = drained().await;
        let vd = d.created.uuid;
        let source_node = node_of(d.source);
        let session = d.finish_unsettled(60_000).await;
        let version = d.vdisk().await.placement.version;
        assert!(
            !d.vdisk().await.placement.holds(d.source),
            "the move finished"
        );
        assert_eq!(
            d.heartbeat(source_node, vec![[d.source, vd]]).await,
            NO_COPIES,
            "the writer may still read the source"
        );
        assert_eq!(d.vdisk().await.released, NO_DISKS);
        // Settled on the version before: still kept.
        d.settle(session, version - 1).await;
        assert_eq!(
            d.heartbeat(source_node, vec![[d.source, vd]]).await,
            NO_COPIES
        );
        // A renewal claiming a newer version than there is settles nothing
        // beyond the placement's.
        d.settle(session, version + 5).await;
        assert_eq!(
            d.heartbeat(source_node, vec![[d.source, vd]]).await,
            vec![[d.source, vd]],
            "the writer settled: the source is freed"
        );
        assert_eq!(d.vdisk().await.released, vec![d.source]);
        let lease = d.vdisk().await.lease.expect("held");
        assert_eq!(lease.settled, version);
    }

    /// A writer whose lease ran out reads nothing any more: what it had not
    /// settled on does not keep a moved copy from being freed.
    #[tokio::test]
    async fn a_moved_copy_is_freed_once_the_lagging_writer_lost_its_lease() {
        let d = drained().await;
        let vd = d.created.uuid;
        let source_node = node_of(d.source);
        d.finish_unsettled(200).await;
        assert_eq!(
            d.heartbeat(source_node, vec![[d.source, vd]]).await,
            NO_COPIES
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(
            d.heartbeat(source_node, vec![[d.source, vd]]).await,
            vec![[d.source, vd]]
        );
    }

    #[tokio::test]
    async fn a_node_reporting_no_copies_at_all_clears_released() {
        let d = drained().await;
        let vd = d.created.uuid;
        d.finish().await;
        let source_node = node_of(d.source);
        assert_eq!(
            d.heartbeat(source_node, vec![[d.source, vd]]).await,
            vec![[d.source, vd]]
        );
        assert_eq!(d.vdisk().await.released, vec![d.source]);
        // The node freed the copy; it holds nothing else.
        assert_eq!(d.heartbeat(source_node, vec![]).await, NO_COPIES);
        assert_eq!(
            d.vdisk().await.released,
            NO_DISKS,
            "the freed copy is still listed as released"
        );
    }

    #[tokio::test]
    async fn removing_a_node_rebuilds_its_copies_elsewhere() {
        let svc = service().await;
        cluster(&svc, 4, 1).await;
        svc.create_datastore(mirrors("ds", 2, None))
            .await
            .expect("datastore");
        svc.create_datastore(mirrors("other", 1, None))
            .await
            .expect("datastore");
        let vdisk = svc
            .create_vdisk(vdisk_req("ds", "vd", SIZE))
            .await
            .expect("vdisk");
        let group = vdisk.placement.groups[0].clone();
        let (lost, keep) = (group[0], group[1]);
        let n = node_of(lost);

        let error = svc
            .remove_node(node_id(n), false)
            .await
            .expect_err("the node is up");
        assert!(matches!(error, ZoneError::Conflict(_)), "{error:?}");
        assert!(svc.datastore("ds").await.expect("ds").disks.contains(&lost));
        assert_eq!(svc.plan_moves(&none()).await.expect("planned"), vec![]);
        assert!(matches!(
            svc.remove_node(node_id(99), true).await,
            Err(ZoneError::NotFound(_))
        ));

        kill(&svc, n).await;
        assert_eq!(
            svc.remove_node(node_id(n), false).await.expect("removed"),
            vec![lost]
        );
        for ds in ["ds", "other"] {
            let disks = svc.datastore(ds).await.expect("datastore").disks;
            assert!(!disks.contains(&lost), "{ds}: {disks:?}");
            assert_eq!(disks.len(), 3, "{ds}: only the node's disk left");
        }

        let recorded = svc.plan_moves(&none()).await.expect("planned");
        assert_eq!(recorded.len(), 1, "{recorded:?}");
        let mv = recorded[0].mv;
        assert_eq!(
            (mv.group, mv.from, mv.reason),
            (0, lost, MoveReason::Rebuild)
        );
        assert!(!group.contains(&mv.to));
        assert_ne!(node_of(mv.to), node_of(keep));
        let view = svc.vdisk("ds", "vd").await.expect("found");
        assert_eq!(view.vdisk.placement.groups[0], vec![lost, keep, mv.to]);
        assert!(!view.vdisk.stale.contains(&mv.to));
        assert!(view
            .repair
            .iter()
            .any(|r| r.disk == mv.to && r.replaces == Some(lost)));
        assert_eq!(
            view.health,
            Health::Degraded,
            "one current copy on an up node"
        );

        // A node that is up may be removed with force.
        let idle = (1..=4)
            .find(|m| ![n, node_of(keep), node_of(mv.to)].contains(m))
            .expect("a fourth node");
        assert!(matches!(
            svc.remove_node(node_id(idle), false).await,
            Err(ZoneError::Conflict(_))
        ));
        assert_eq!(
            svc.remove_node(node_id(idle), true).await.expect("forced"),
            vec![disk_id(idle, 0)]
        );
        assert!(!svc
            .datastore("ds")
            .await
            .expect("ds")
            .disks
            .contains(&disk_id(idle, 0)));
    }

    /// 3 nodes, mirrors=2, one vDisk; the node of its first copy killed.
    /// Returns the service, the vDisk, the killed node's number and the
    /// disk of the node holding no copy.
    async fn one_node_down() -> (ZoneService, Vdisk, u128, Uuid) {
        let svc = service().await;
        cluster(&svc, 3, 1).await;
        svc.create_datastore(mirrors("ds", 2, None))
            .await
            .expect("datastore");
        let vdisk = svc
            .create_vdisk(vdisk_req("ds", "vd", SIZE))
            .await
            .expect("vdisk");
        let group = &vdisk.placement.groups[0];
        let spare = (1..=3)
            .map(|n| disk_id(n, 0))
            .find(|d| !group.contains(d))
            .expect("a third disk");
        let n = node_of(group[0]);
        kill(&svc, n).await;
        (svc, vdisk, n, spare)
    }

    #[tokio::test]
    async fn the_move_planner_rebuilds_only_after_the_delay() {
        let (svc, vdisk, _, spare) = one_node_down().await;
        let lost = vdisk.placement.groups[0][0];

        let mut patient = MovePlanner::new(svc.clone(), Duration::from_secs(3600));
        for _ in 0..3 {
            assert_eq!(patient.run_once().await.expect("planned"), vec![]);
        }
        assert_eq!(
            svc.vdisk("ds", "vd").await.expect("found").vdisk.placement,
            vdisk.placement,
            "a briefly down node moves nothing"
        );

        let mut eager = MovePlanner::new(svc.clone(), Duration::ZERO);
        let recorded = eager.run_once().await.expect("planned");
        assert_eq!(
            recorded.iter().map(|r| r.mv).collect::<Vec<_>>(),
            vec![Move {
                group: 0,
                from: lost,
                to: spare,
                reason: MoveReason::Rebuild,
            }]
        );
        assert_eq!(
            svc.vdisk("ds", "vd").await.expect("found").health,
            Health::Degraded
        );
        assert_eq!(eager.run_once().await.expect("planned"), vec![]);
    }

    #[tokio::test]
    async fn the_move_planner_counts_the_delay_while_the_node_stays_down() {
        let (svc, vdisk, n, spare) = one_node_down().await;
        let lost = vdisk.placement.groups[0][0];
        let mut planner = MovePlanner::new(svc.clone(), Duration::from_millis(100));
        assert_eq!(
            planner.run_once().await.expect("planned"),
            vec![],
            "the first pass starts the count"
        );
        tokio::time::sleep(Duration::from_millis(150)).await;

        // The node comes back: the count restarts when it goes down again.
        svc.register_node(registration(n, 1))
            .await
            .expect("re-registers");
        assert_eq!(planner.run_once().await.expect("planned"), vec![]);
        kill(&svc, n).await;
        assert_eq!(planner.run_once().await.expect("planned"), vec![]);

        tokio::time::sleep(Duration::from_millis(150)).await;
        let recorded = planner.run_once().await.expect("planned");
        assert_eq!(
            recorded.iter().map(|r| r.mv).collect::<Vec<_>>(),
            vec![Move {
                group: 0,
                from: lost,
                to: spare,
                reason: MoveReason::Rebuild,
            }]
        );
    }

    #[tokio::test]
    async fn a_repair_lease_yields_to_any_other_open() {
        let svc = service().await;
        cluster(&svc, 1, 1).await;
        svc.create_datastore(mirrors("ds", 1, None))
            .await
            .expect("datastore");
        svc.create_vdisk(vdisk_req("ds", "vd", SIZE))
            .await
            .expect("vdisk");
        let repair = |host: &str| OpenVdisk {
            repair: true,
            ..open_req(host, 60_000, false)
        };

        let worker = svc
            .open_vdisk("ds", "vd", repair("worker1"))
            .await
            .expect("a free vDisk opens for repair");
        let lease = worker.vdisk.lease.clone().expect("a lease");
        assert!(lease.repair);
        assert_eq!((lease.session, worker.epoch), (worker.session, 1));

        // Another worker does not take it.
        assert!(matches!(
            svc.open_vdisk("ds", "vd", repair("worker2")).await,
            Err(ZoneError::Conflict(_))
        ));

        // Any other open does, without force, with the next epoch.
        let front = svc
            .open_vdisk("ds", "vd", open_req("hv1", 60_000, false))
            .await
            .expect("takes over the repair lease");
        assert_eq!(front.epoch, worker.epoch + 1);
        let lease = front.vdisk.lease.clone().expect("a lease");
        assert_eq!((lease.holder.as_str(), lease.repair), ("hv1", false));
        assert!(matches!(
            svc.renew_vdisk(
                "ds",
                "vd",
                SessionRef {
                    session: worker.session,
                    ttl_ms: None,
                    keep_activity: false,
                    settled: None,
                }
            )
            .await,
            Err(ZoneError::LeaseLost(_))
        ));

        // A repair open does not take over a live writer's lease, nor does
        // another open without force.
        assert!(matches!(
            svc.open_vdisk("ds", "vd", repair("worker1")).await,
            Err(ZoneError::Conflict(_))
        ));
        assert!(matches!(
            svc.open_vdisk("ds", "vd", open_req("hv2", 60_000, false))
                .await,
            Err(ZoneError::Conflict(_))
        ));
        let v = svc.vdisk("ds", "vd").await.expect("found").vdisk;
        assert_eq!(v.epoch, front.epoch);
        assert_eq!(v.lease.map(|l| l.session), Some(front.session));
    }

    /// Node `n`'s heartbeat: its disk at `used` of 1 TB, and what each of
    /// `vdisks` takes there.
    async fn report_space(
        svc: &ZoneService,
        registered: &[Registered],
        n: u128,
        used: u64,
        vdisks: &[(Uuid, u64)],
    ) {
        let mut hb = heartbeat(registered[n as usize - 1].lease, NO_COPIES);
        hb.disks.push(crate::service::RegisterDisk {
            uuid: disk_id(n, 0),
            path: "/dev/disk0".into(),
            capacity: 1 << 40,
            used,
        });
        hb.usage = Some(
            vdisks
                .iter()
                .map(|(v, bytes)| crate::service::CopyUsage {
                    disk: disk_id(n, 0),
                    vdisk: *v,
                    bytes: *bytes,
                })
                .collect(),
        );
        svc.heartbeat(node_id(n), hb).await.expect("heartbeat");
    }

    #[tokio::test]
    async fn a_nearly_full_disk_sheds_one_copy_at_a_time_onto_disks_with_room() {
        const GB: u64 = 1 << 30;
        let tb: u64 = 1 << 40;
        let svc = service().await;
        let registered = cluster(&svc, 4, 1).await;
        svc.create_datastore(mirrors("ds", 2, Some(4)))
            .await
            .expect("datastore");
        let mut vdisks = Vec::new();
        for name in ["a", "b", "c"] {
            vdisks.push(
                svc.create_vdisk(vdisk_req("ds", name, 64 * GB))
                    .await
                    .expect("vdisk"),
            );
        }
        // Placement over 4 disks used equally: nothing moves.
        assert_eq!(svc.plan_moves(&none()).await.expect("planned"), vec![]);
        // The disk of node 1 reaches 95 %; nodes 2 and 3 are at 85 % (no
        // room for a copy under 80 %), node 4 at 20 %. Every vDisk takes
        // 40 GB on every disk (10 GB per group there).
        let full = disk_id(1, 0);
        let roomy = disk_id(4, 0);
        for (n, used) in [
            (1, tb / 100 * 95),
            (2, tb / 100 * 85),
            (3, tb / 100 * 85),
            (4, tb / 5),
        ] {
            let held: Vec<(Uuid, u64)> = vdisks
                .iter()
                .filter(|v| v.placement.holds(disk_id(n, 0)))
                .map(|v| {
                    let groups = v
                        .placement
                        .groups
                        .iter()
                        .filter(|g| g.contains(&disk_id(n, 0)))
                        .count() as u64;
                    (v.uuid, groups * 10 * GB)
                })
                .collect();
            report_space(&svc, &registered, n, used, &held).await;
        }
        let holds_full = vdisks.iter().filter(|v| v.placement.holds(full)).count();
        assert!(holds_full > 0, "some vDisk has a copy on node 1's disk");
        let recorded = svc.plan_moves(&none()).await.expect("planned");
        let sheds: Vec<&RecordedMove> = recorded
            .iter()
            .filter(|r| r.mv.reason == MoveReason::Shed)
            .collect();
        assert_eq!(
            sheds.len(),
            1,
            "one shed per disk at a time, across vDisks: {recorded:?}"
        );
        let shed = sheds[0];
        assert_eq!(shed.mv.from, full, "the nearly full disk sheds: {shed:?}");
        assert_eq!(
            shed.mv.to, roomy,
            "only node 4's disk has room for a 10 GB copy under 80 %: {shed:?}"
        );
        assert!(
            recorded.iter().all(|r| r.mv.to == roomy),
            "nothing moves onto the disks at 85 %: {recorded:?}"
        );
        let v = svc.vdisk("ds", &shed.vdisk).await.expect("vdisk").vdisk;
        assert!(
            v.placement.moves.contains(&shed.mv),
            "the shed is recorded on the vDisk: {:?}",
            v.placement.moves
        );
        // While that shed is under way, the disk sheds nothing more.
        let again = svc.plan_moves(&none()).await.expect("planned");
        assert!(
            again.iter().all(|r| r.mv.from != full),
            "a second shed from the same disk while the first is under way: {again:?}"
        );
    }

    #[tokio::test]
    async fn a_source_stale_only_in_the_group_it_left_is_stale_no_more() {
        let svc = service().await;
        cluster(&svc, 3, 1).await;
        svc.create_datastore(mirrors("ds", 2, Some(2)))
            .await
            .expect("datastore");
        let v = svc
            .create_vdisk(vdisk_req("ds", "vd", 4 * CHUNK_SIZE))
            .await
            .expect("vdisk");
        let g = v.placement.groups.clone();
        // Three disks, two groups of two: one disk is in both.
        let source = *g[0].iter().find(|d| g[1].contains(d)).expect("shared");
        let target = (1..=3)
            .map(|n| disk_id(n, 0))
            .find(|d| !g[0].contains(d))
            .expect("a disk outside group 0");
        let session = svc
            .open_vdisk("ds", "vd", open_req("hv1", 60_000, false))
            .await
            .expect("opens")
            .session;
        // The source missed chunk 2 (group 0): stale.
        svc.mark_stale(
            "ds",
            "vd",
            crate::service::MarkStale {
                session,
                disks: vec![source],
                chunks: vec![2],
            },
        )
        .await
        .expect("stale");
        assert_eq!(
            svc.vdisk("ds", "vd").await.expect("vd").vdisk.stale,
            vec![source]
        );
        // Group 0's copy moves off it, and the move finishes.
        let mv = Move {
            group: 0,
            from: source,
            to: target,
            reason: MoveReason::Rebalance,
        };
        assert!(svc.record_move("ds", "vd", mv).await.expect("recorded"));
        svc.mark_clean(
            "ds",
            "vd",
            MarkClean {
                session,
                disk: target,
                chunks: vec![0, 2],
                complete: true,
            },
        )
        .await
        .expect("the target is complete");
        let view = svc.vdisk("ds", "vd").await.expect("vd");
        assert!(view.vdisk.placement.holds(source), "it keeps group 1");
        assert_eq!(
            view.vdisk.stale,
            Vec::<Uuid>::new(),
            "what it missed was in the group it left: its group-1 copy is whole"
        );
        assert!(view.vdisk.dirty.is_empty(), "{:?}", view.vdisk.dirty);
        assert_eq!(view.health, Health::Healthy);
    }
}
