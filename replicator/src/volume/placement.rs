//! The volume's view of its placement, and how it changes while open.
//!
//! A [`Layout`] is immutable: which disks hold each group's copies, the
//! node each disk is on, and each disk's copy state. When the zone moves a
//! copy (rebuild, drain, rebalance) the volume builds a new layout and
//! swaps it in:
//!
//! - disks it already knew keep their state objects (a stale copy stays
//!   stale, a current one current);
//! - a disk new to it starts stale if the zone says so (a move's target
//!   always is, with every chunk of its group dirty), and its dirty set is
//!   taken from the zone;
//! - a disk that left the placement is forgotten, with its dirty set.
//!
//! Every read, write and flush holds the layout it started with until it
//! ends. After a swap, the adoption waits until no operation holds the old
//! layout any more before it lets resync run: a write that did not know a
//! new copy existed cannot then land on the other copies after resync
//! copied its chunk.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Duration;

use tessera_zone::records::{Disk, NodeStatus, Vdisk};
use tokio::time::Instant;
use uuid::Uuid;

use super::copies::{CopyHealth, CopyState};
use super::{CopySlot, Inner};
use crate::conn::NodeLink;
use crate::link::{BootWatch, Connector, Link, NodeAddr};
use crate::shm::SharedMemory;
use crate::VolumeError;

/// Which disks hold each group's copies, as of one placement version.
pub(crate) struct Layout {
    /// The zone's placement version this layout follows.
    pub(super) version: u64,
    /// Per placement group, the copies in placement order.
    pub(super) groups: Vec<Vec<CopySlot>>,
    /// Per placement group, the copy reads go to first (a local one if any).
    pub(super) read_first: Vec<usize>,
    /// Every copy slot of the placement (a disk's copies, and separately
    /// a move target's copy): disk, node index and state. A disk may be
    /// listed twice.
    pub(super) disks: Vec<(Uuid, usize, Arc<CopyState>)>,
    /// The copies being filled for a move: (disk, group).
    pub(super) targets: HashSet<(Uuid, usize)>,
}

impl Layout {
    /// Builds the layout of `vdisk`'s placement. Disks known to `previous`
    /// keep their state and node; others start stale if the zone lists them
    /// stale, on the node `locate` names (address, and whether it is on this
    /// host). Node addresses are appended to `nodes` as needed (indices are
    /// stable).
    pub(super) fn build(
        vdisk: &Vdisk,
        nodes: &std::sync::RwLock<Vec<NodeAddr>>,
        previous: Option<&Layout>,
        locate: impl Fn(Uuid) -> Result<(NodeAddr, bool), VolumeError>,
    ) -> Result<Layout, VolumeError> {
        let mut addrs = nodes.write().expect("nodes poisoned");
        // Where each disk is; and each copy slot's state: a disk's copies
        // share one state, except a move's target, whose copy in the group
        // it is filled for has its own (stale until the move finishes).
        let mut located: HashMap<Uuid, (usize, bool)> = HashMap::new();
        let mut states: HashMap<(Uuid, usize), Arc<CopyState>> = HashMap::new();
        let mut generations: HashMap<Uuid, Arc<AtomicU64>> = HashMap::new();
        if let Some(p) = previous {
            for (g, group) in p.groups.iter().enumerate() {
                for c in group {
                    located.insert(c.disk, (c.node, c.local));
                    generations.insert(c.disk, c.generation.clone());
                    states.insert((c.disk, g), c.state.clone());
                }
            }
        }
        let mut all = Vec::new();
        let mut listed: HashSet<(Uuid, usize)> = HashSet::new();
        let mut targets: HashSet<(Uuid, usize)> = HashSet::new();
        let mut groups = Vec::with_capacity(vdisk.placement.groups.len());
        let mut read_first = Vec::with_capacity(vdisk.placement.groups.len());
        for (g, group) in vdisk.placement.groups.iter().enumerate() {
            let mut copies = Vec::with_capacity(group.len());
            for disk in group {
                let (node, local) = match located.get(disk) {
                    Some(l) => *l,
                    None => {
                        let (addr, local) = locate(*disk)?;
                        let index = match addrs.iter().position(|a| *a == addr) {
                            Some(i) => i,
                            None => {
                                addrs.push(addr);
                                addrs.len() - 1
                            }
                        };
                        located.insert(*disk, (index, local));
                        (index, local)
                    }
                };
                let target = vdisk
                    .placement
                    .moves
                    .iter()
                    .any(|m| m.to == *disk && m.group as usize == g);
                if target {
                    targets.insert((*disk, g));
                }
                // Every group's copy has a state of its own: a chunk one
                // copy missed makes only its group's copy stale.
                let key = (*disk, g);
                // A copy that becomes a move's target starts afresh, even if
                // the previous layout had it in this group: between the two
                // placements the zone may have moved it out, had its node
                // free it, and planned a move back onto it.
                if target && previous.is_some_and(|p| !p.targets.contains(&key)) {
                    states.remove(&key);
                }
                let state = states
                    .entry(key)
                    .or_insert_with(|| {
                        Arc::new(CopyState::new(initial_health(vdisk, *disk, g, target)))
                    })
                    .clone();
                if listed.insert(key) {
                    all.push((*disk, node, state.clone()));
                }
                let generation = generations.entry(*disk).or_default().clone();
                copies.push(CopySlot {
                    disk: *disk,
                    node,
                    local,
                    state,
                    generation,
                });
            }
            read_first.push(copies.iter().position(|c| c.local).unwrap_or(0));
            groups.push(copies);
        }
        if groups.is_empty() {
            return Err(VolumeError::Placement("the placement has no group".into()));
        }
        Ok(Layout {
            version: vdisk.placement.version,
            groups,
            read_first,
            disks: all,
            targets,
        })
    }

    pub(super) fn group_index(&self, chunk: u64) -> usize {
        (chunk % self.groups.len() as u64) as usize
    }

    pub(super) fn group(&self, chunk: u64) -> &[CopySlot] {
        &self.groups[self.group_index(chunk)]
    }

    /// Whether `disk` holds a copy of `chunk`.
    pub(super) fn holds(&self, disk: Uuid, chunk: u64) -> bool {
        self.group(chunk).iter().any(|c| c.disk == disk)
    }

    /// One slot of every disk of the placement (for requests to the disk
    /// as a whole: fence, flush), in placement order.
    pub(super) fn disk_slots(&self) -> Vec<CopySlot> {
        let mut out: Vec<CopySlot> = Vec::new();
        for c in self.groups.iter().flatten() {
            if !out.iter().any(|x| x.disk == c.disk) {
                out.push(c.clone());
            }
        }
        out
    }

    /// Whether any of `disk`'s copies is in a state `keep` accepts.
    pub(super) fn disk_any(&self, disk: Uuid, keep: impl Fn(CopyHealth) -> bool) -> bool {
        self.slots(disk).any(|st| keep(st.get()))
    }

    /// Every copy slot of `disk`.
    pub(super) fn slots(&self, disk: Uuid) -> impl Iterator<Item = &Arc<CopyState>> + '_ {
        self.disks
            .iter()
            .filter(move |(d, _, _)| *d == disk)
            .map(|(_, _, st)| st)
    }

    pub(super) fn has_disk(&self, disk: Uuid) -> bool {
        self.disks.iter().any(|(d, _, _)| *d == disk)
    }
}

/// The state a copy starts in when a layout first lists it: a move's
/// target is stale; a disk the zone lists stale is stale in the groups
/// where its dirty set names chunks (its dirty set lists everything it may
/// lack, so its other groups' copies are whole), and in every group if its
/// dirty set is empty (resync then only records it complete).
fn initial_health(vdisk: &Vdisk, disk: Uuid, group: usize, target: bool) -> CopyHealth {
    if target {
        return CopyHealth::Stale;
    }
    if !vdisk.stale.contains(&disk) {
        return CopyHealth::Current;
    }
    let groups = vdisk.placement.groups.len().max(1) as u64;
    let dirty = vdisk.dirty.iter().find(|e| e.disk == disk);
    match dirty {
        Some(e) if !e.is_empty() => {
            if e.chunks().any(|c| c % groups == group as u64) {
                CopyHealth::Stale
            } else {
                CopyHealth::Current
            }
        }
        _ => CopyHealth::Stale,
    }
}

/// Where the zone's records put a disk: its node's address (with its
/// local-session socket if the node is on `host`), and whether that node is
/// on `host`.
pub(super) fn locator<'a>(
    disks: &'a [Disk],
    nodes: &'a [NodeStatus],
    host: &'a str,
    marks: bool,
) -> impl Fn(Uuid) -> Result<(NodeAddr, bool), VolumeError> + 'a {
    move |disk| {
        let node = disks
            .iter()
            .find(|d| d.uuid == disk)
            .map(|d| d.node)
            .ok_or(VolumeError::Placement(format!("disk {disk} has no node")))?;
        let n = nodes
            .iter()
            .find(|n| n.node.uuid == node)
            .ok_or(VolumeError::Placement(format!("node {node} is unknown")))?;
        let local = n.node.host == host;
        let addr = NodeAddr {
            addr: n.node.addr.clone(),
            socket: n.node.socket.clone().filter(|_| local),
            marks,
        };
        Ok((addr, local))
    }
}

/// One handle's connections, by node index; grows when a layout brings a
/// node the handle has not talked to yet.
pub(crate) struct Links {
    slots: std::sync::RwLock<Vec<Arc<Link>>>,
    addrs: Arc<std::sync::RwLock<Vec<NodeAddr>>>,
    boots: Arc<std::sync::Mutex<Vec<Arc<BootWatch>>>>,
    shm: Arc<SharedMemory>,
    client: [u8; 16],
    timeout: Duration,
    connector: Option<Arc<dyn Connector>>,
}

impl Links {
    pub(super) fn new(
        addrs: Arc<std::sync::RwLock<Vec<NodeAddr>>>,
        boots: Arc<std::sync::Mutex<Vec<Arc<BootWatch>>>>,
        shm: Arc<SharedMemory>,
        client: [u8; 16],
        timeout: Duration,
        connector: Option<Arc<dyn Connector>>,
    ) -> Links {
        Links {
            slots: std::sync::RwLock::new(Vec::new()),
            addrs,
            boots,
            shm,
            client,
            timeout,
            connector,
        }
    }

    /// The (lazily connecting) link to node `node`.
    pub(crate) fn get(&self, node: usize) -> Arc<Link> {
        if let Some(link) = self.slots.read().expect("links poisoned").get(node) {
            return link.clone();
        }
        let mut slots = self.slots.write().expect("links poisoned");
        let addrs = self.addrs.read().expect("nodes poisoned");
        let mut boots = self.boots.lock().expect("boots poisoned");
        while boots.len() < addrs.len() {
            boots.push(Arc::default());
        }
        while slots.len() < addrs.len() {
            let addr = addrs[slots.len()].clone();
            let boot = boots[slots.len()].clone();
            let link = match &self.connector {
                Some(c) => {
                    Link::Other(c.link(&addr, self.shm.clone(), self.client, self.timeout, boot))
                }
                None => Link::Net(NodeLink::new(
                    addr,
                    self.shm.clone(),
                    self.client,
                    self.timeout,
                    boot,
                )),
            };
            slots.push(Arc::new(link));
        }
        slots[node].clone()
    }

    pub(super) async fn close_all(&self) {
        let slots: Vec<Arc<Link>> = self.slots.read().expect("links poisoned").clone();
        for link in slots {
            link.close().await;
        }
    }
}

impl Inner {
    /// Fetches the vDisk's placement from the zone and adopts it if it is
    /// newer than the layout's.
    pub(super) async fn refresh_placement(&self) -> Result<(), VolumeError> {
        let zone = &self.config.zone;
        let view = self
            .zone_retry(|| zone.vdisk(&self.config.datastore, &self.config.name))
            .await
            .map_err(|e| self.zone_error(e))?;
        self.adopt(&view.vdisk).await
    }

    /// Adopts `vdisk`'s placement if it is newer than the layout's; returns
    /// once no operation uses the old layout.
    pub(super) async fn adopt(&self, vdisk: &Vdisk) -> Result<(), VolumeError> {
        let _one = self.adopting.lock().await;
        let old = self.layout();
        if vdisk.uuid != self.vdisk.uuid || vdisk.placement.version <= old.version {
            return Ok(());
        }
        let known: HashSet<Uuid> = old.disks.iter().map(|(d, _, _)| *d).collect();
        let placed: HashSet<Uuid> = vdisk.placement.groups.iter().flatten().copied().collect();
        let (disks, nodes) = if placed.is_subset(&known) {
            (Vec::new(), Vec::new())
        } else {
            let zone = &self.config.zone;
            let disks = self
                .zone_retry(|| zone.disks())
                .await
                .map_err(|e| self.zone_error(e))?;
            let nodes = self
                .zone_retry(|| zone.nodes())
                .await
                .map_err(|e| self.zone_error(e))?;
            (disks, nodes)
        };
        let layout = Layout::build(
            vdisk,
            &self.nodes,
            Some(&old),
            locator(&disks, &nodes, &self.config.host, self.node_marks),
        )?;
        {
            let mut d = self.dirty.lock().expect("dirty poisoned");
            // The zone's dirty sets hold what the moves added; what this
            // volume recorded is in there too (the union may copy a chunk
            // twice, never too few).
            for e in &vdisk.dirty {
                d.known.entry(e.disk).or_default().extend(e.chunks());
            }
            d.known.retain(|disk, _| placed.contains(disk));
            d.pending.retain(|(disk, _)| placed.contains(disk));
            d.copied.retain(|disk, _| placed.contains(disk));
        }
        let added: Vec<Uuid> = placed.difference(&known).copied().collect();
        let removed: Vec<Uuid> = known.difference(&placed).copied().collect();
        // Copies this volume knew in the group a move now fills them for.
        let refilled: Vec<Uuid> = layout
            .targets
            .iter()
            .filter(|(d, g)| {
                !old.targets.contains(&(*d, *g))
                    && old
                        .groups
                        .get(*g)
                        .is_some_and(|c| c.iter().any(|c| c.disk == *d))
            })
            .map(|(d, _)| *d)
            .collect();
        let previous = self.layout.swap(Arc::new(layout));
        drop(old);
        tracing::info!(
            from = previous.version,
            to = vdisk.placement.version,
            ?added,
            ?removed,
            ?refilled,
            "adopted a new placement"
        );
        // Operations that started on the old layout finish before resync
        // may touch a new copy.
        let started = Instant::now();
        let mut warned = false;
        while Arc::strong_count(&previous) > 1 {
            if !warned && started.elapsed() > Duration::from_secs(5) {
                tracing::warn!("still waiting for I/O started on the previous placement");
                warned = true;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        self.settled
            .fetch_max(vdisk.placement.version, std::sync::atomic::Ordering::AcqRel);
        Ok(())
    }
}
