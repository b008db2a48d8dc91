//! Management commands: clients of the REST API.

use std::path::PathBuf;

use anyhow::Context;
use serde::{Deserialize, Serialize};
use tessera_api_client::ApiClient;
use tessera_zone::service::{CreateDatastore, CreateVdisk};

use crate::args::{
    vdisk_path, Command, DatastoreCommand, DiskCommand, Global, HostCommand, NodeCommand,
    RepairCommand, VdiskCommand, ZoneCommand,
};
use crate::output::{print_json, Table};
use crate::size::{human, parse_size};

/// Where `tessera up` leaves directions to its zone for later commands.
#[derive(Debug, Serialize, Deserialize)]
pub struct CurrentZone {
    pub api: String,
    pub token_file: PathBuf,
}

impl CurrentZone {
    pub fn path() -> Option<PathBuf> {
        if let Some(home) = std::env::var_os("TESSERA_HOME") {
            return Some(PathBuf::from(home).join("current-zone.json"));
        }
        std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".tessera/current-zone.json"))
    }

    pub fn load() -> Option<CurrentZone> {
        let text = std::fs::read(Self::path()?).ok()?;
        serde_json::from_slice(&text).ok()
    }

    pub fn save(&self) -> anyhow::Result<()> {
        let Some(path) = Self::path() else {
            return Ok(());
        };
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("cannot create {}", dir.display()))?;
        }
        std::fs::write(&path, serde_json::to_vec_pretty(self)?)
            .with_context(|| format!("cannot write {}", path.display()))
    }
}

/// The API client for these options: flags and environment first, then the
/// zone `tessera up` started, then the defaults.
pub fn api_client(g: &Global) -> anyhow::Result<ApiClient> {
    let current = CurrentZone::load();
    let url = g
        .api
        .clone()
        .or_else(|| current.as_ref().map(|c| c.api.clone()))
        .unwrap_or_else(|| "http://127.0.0.1:8080".to_string());
    let token_file = g
        .token_file
        .clone()
        .or_else(|| current.as_ref().map(|c| c.token_file.clone()))
        .context(
            "no API token: pass --token-file or set TESSERA_TOKEN_FILE \
             (`tessera up` writes DIR/api-token)",
        )?;
    Ok(ApiClient::from_token_file(&url, &token_file)?)
}

pub async fn run(g: &Global, command: Command) -> anyhow::Result<()> {
    let api = api_client(g)?;
    let json = g.json;
    match command {
        Command::Zone(ZoneCommand::Show) => {
            let z = api.zone().await?;
            if json {
                return print_json(&z);
            }
            let mut t = Table::new(["NAME", "UUID", "SCHEMA"]);
            t.row([z.name.clone(), z.uuid.to_string(), z.schema.to_string()]);
            t.print();
        }
        Command::Host(HostCommand::List) => {
            let hosts = api.hosts().await?;
            if json {
                return print_json(&hosts);
            }
            let mut t = Table::new(["NAME", "ROLES"]);
            for h in &hosts {
                let roles: Vec<String> = h
                    .roles
                    .iter()
                    .map(|r| serde_json::to_value(r).map(|v| v.as_str().unwrap_or("").to_string()))
                    .collect::<Result<_, _>>()?;
                t.row([h.name.clone(), roles.join(",")]);
            }
            t.print();
        }
        Command::Node(NodeCommand::List) => {
            let nodes = api.nodes().await?;
            if json {
                return print_json(&nodes);
            }
            let mut t = Table::new(["UUID", "HOST", "ADDRESS", "STATE", "DISKS"]);
            for n in &nodes {
                t.row([
                    n.node.uuid.to_string(),
                    n.node.host.clone(),
                    n.node.addr.clone(),
                    enum_str(&n.state),
                    n.node.disks.len().to_string(),
                ]);
            }
            t.print();
        }
        Command::Node(NodeCommand::Remove { node, force }) => {
            let disks = api.remove_node(node, force).await?;
            if json {
                return print_json(&disks);
            }
            println!(
                "removed node {node}: its {} disks left every datastore; their copies are rebuilt elsewhere (`tessera repair status`)",
                disks.len()
            );
        }
        Command::Disk(DiskCommand::List) => {
            let disks = api.disks().await?;
            if json {
                return print_json(&disks);
            }
            let mut t = Table::new(["UUID", "NODE", "PATH", "CAPACITY", "USED"]);
            for d in &disks {
                t.row([
                    d.uuid.to_string(),
                    d.node.to_string(),
                    d.path.clone(),
                    human(d.capacity),
                    human(d.used),
                ]);
            }
            t.print();
        }
        Command::Repair(RepairCommand::Status) => {
            let all = api.vdisks(None).await?;
            let repairing: Vec<_> = all.iter().filter(|v| !v.repair.is_empty()).collect();
            if json {
                return print_json(&repairing);
            }
            let mut t = Table::new([
                "VDISK",
                "KIND",
                "STALE DISK",
                "NODE",
                "CHUNKS LEFT",
                "BYTES LEFT",
            ]);
            for v in &repairing {
                for r in &v.repair {
                    let kind = v
                        .vdisk
                        .placement
                        .moves
                        .iter()
                        .find(|m| m.to == r.disk)
                        .map_or("resync".to_string(), |m| enum_str(&m.reason));
                    t.row([
                        format!("{}/{}", v.vdisk.datastore, v.vdisk.name),
                        kind,
                        r.disk.to_string(),
                        if r.node_up {
                            "up".into()
                        } else {
                            "down".into()
                        },
                        r.dirty_chunks.to_string(),
                        human(r.dirty_chunks * v.vdisk.placement.chunk_size),
                    ]);
                }
            }
            t.print();
            if repairing.is_empty() {
                println!("every copy of every vDisk is current");
            }
        }
        Command::Datastore(c) => datastore(&api, json, c).await?,
        Command::Vdisk(c) => vdisk(&api, json, c).await?,
        Command::Up(_)
        | Command::Api(_)
        | Command::Node(_)
        | Command::Vhost(_)
        | Command::Scrub(_) => {
            unreachable!("dispatched in main")
        }
    }
    Ok(())
}

fn enum_str<T: Serialize>(v: &T) -> String {
    serde_json::to_value(v)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_default()
}

fn policy_str(p: &tessera_zone::records::Policy) -> String {
    use tessera_zone::records::Redundancy;
    let r = match p.redundancy {
        Redundancy::Mirror { copies } => format!("mirrors={copies}"),
        Redundancy::ErasureCode { data, parity } => format!("ec={data}+{parity}"),
    };
    format!("{r} stripes={}", p.stripes)
}

async fn datastore(api: &ApiClient, json: bool, c: DatastoreCommand) -> anyhow::Result<()> {
    match c {
        DatastoreCommand::Create {
            name,
            mirrors,
            stripes,
            disks,
        } => {
            let ds = api
                .create_datastore(&CreateDatastore {
                    name,
                    mirrors,
                    stripes,
                    disks,
                })
                .await?;
            if json {
                return print_json(&ds);
            }
            println!(
                "created datastore {} ({}, {} disks)",
                ds.name,
                policy_str(&ds.policy),
                ds.disks.len()
            );
        }
        DatastoreCommand::List => {
            let all = api.datastores().await?;
            if json {
                return print_json(&all);
            }
            let mut t = Table::new([
                "NAME", "POLICY", "DISKS", "CAPACITY", "USED", "FREE", "WRITABLE", "UUID",
            ]);
            for v in &all {
                let (ds, sp) = (&v.datastore, &v.space);
                t.row([
                    ds.name.clone(),
                    policy_str(&ds.policy),
                    ds.disks.len().to_string(),
                    human(sp.capacity),
                    human(sp.used),
                    human(sp.free),
                    human(sp.writable),
                    ds.uuid.to_string(),
                ]);
            }
            t.print();
            for w in all.iter().flat_map(|v| &v.space.warnings) {
                eprintln!("warning: {w}");
            }
        }
        DatastoreCommand::Show { name } => {
            let view = api.datastore(&name).await?;
            if json {
                return print_json(&view);
            }
            let (ds, sp) = (&view.datastore, &view.space);
            let mut t = Table::new(["FIELD", "VALUE"]);
            t.row(["name".into(), ds.name.clone()]);
            t.row(["uuid".into(), ds.uuid.to_string()]);
            t.row(["policy".into(), policy_str(&ds.policy)]);
            t.row(["capacity".into(), human(sp.capacity)]);
            t.row(["used".into(), human(sp.used)]);
            t.row(["free".into(), human(sp.free)]);
            t.row([
                "writable".into(),
                format!("{} (free space / copies)", human(sp.writable)),
            ]);
            t.row([
                "fullest disk".into(),
                format!("{}% used", sp.fullest_disk_percent),
            ]);
            for d in &ds.disks {
                t.row(["disk".into(), d.to_string()]);
            }
            t.print();
            for w in &sp.warnings {
                eprintln!("warning: {w}");
            }
        }
        DatastoreCommand::Delete { name } => {
            api.delete_datastore(&name).await?;
            if !json {
                println!("deleted datastore {name}");
            }
        }
        DatastoreCommand::AddDisk { name, disk } => {
            let ds = api.add_datastore_disk(&name, disk).await?;
            if json {
                return print_json(&ds);
            }
            println!(
                "added disk {disk} to datastore {name} ({} disks); vDisks rebalance onto it",
                ds.disks.len()
            );
        }
        DatastoreCommand::RemoveDisk { name, disk } => {
            let ds = api.remove_datastore_disk(&name, disk).await?;
            if json {
                return print_json(&ds);
            }
            println!(
                "removed disk {disk} from datastore {name} ({} disks left); its copies move to other disks",
                ds.disks.len()
            );
        }
    }
    Ok(())
}

async fn vdisk(api: &ApiClient, json: bool, c: VdiskCommand) -> anyhow::Result<()> {
    match c {
        VdiskCommand::Create { path, size } => {
            let (ds, name) = vdisk_path(&path)?;
            let size = parse_size(&size).map_err(anyhow::Error::msg)?;
            let created = api
                .create_vdisk(&CreateVdisk {
                    datastore: ds.to_string(),
                    name: name.to_string(),
                    size,
                })
                .await?;
            if json {
                return print_json(&created);
            }
            let v = &created.vdisk;
            println!(
                "created vDisk {}/{} ({}, {}) uuid {}",
                v.datastore,
                v.name,
                human(v.size),
                policy_str(&v.policy),
                v.uuid
            );
            if let Some(note) = &created.note {
                eprintln!("note: {note}");
            }
        }
        VdiskCommand::List { datastore } => {
            let all = api.vdisks(datastore.as_deref()).await?;
            if json {
                return print_json(&all);
            }
            let mut t = Table::new(["VDISK", "SIZE", "POLICY", "STATE", "HEALTH", "EPOCH"]);
            for v in &all {
                t.row([
                    format!("{}/{}", v.vdisk.datastore, v.vdisk.name),
                    human(v.vdisk.size),
                    policy_str(&v.vdisk.policy),
                    state_str(&v.vdisk.state),
                    enum_str(&v.health),
                    v.vdisk.epoch.to_string(),
                ]);
            }
            t.print();
        }
        VdiskCommand::Show { path } => {
            let (ds, name) = vdisk_path(&path)?;
            let v = api.vdisk(ds, name).await?;
            if json {
                return print_json(&v);
            }
            let d = &v.vdisk;
            let mut t = Table::new(["FIELD", "VALUE"]);
            t.row(["name".into(), format!("{}/{}", d.datastore, d.name)]);
            t.row(["uuid".into(), d.uuid.to_string()]);
            t.row([
                "size".into(),
                format!("{} ({} bytes)", human(d.size), d.size),
            ]);
            t.row(["policy".into(), policy_str(&d.policy)]);
            t.row(["state".into(), state_str(&d.state)]);
            t.row(["health".into(), enum_str(&v.health)]);
            t.row(["epoch".into(), d.epoch.to_string()]);
            for (i, g) in d.placement.groups.iter().enumerate() {
                let disks: Vec<String> = g.iter().map(|u| u.to_string()).collect();
                t.row([format!("group {i}"), disks.join(" ")]);
            }
            for c in &v.space {
                t.row([
                    format!("copy, group {}", c.group),
                    format!(
                        "disk {}: {}",
                        c.disk,
                        c.used.map_or("not reported yet".into(), |b| format!(
                            "{} used ({b} bytes)",
                            human(b)
                        ))
                    ),
                ]);
            }
            for m in &d.placement.moves {
                t.row([
                    enum_str(&m.reason),
                    format!("group {}: disk {} -> disk {}", m.group, m.from, m.to),
                ]);
            }
            for r in &v.repair {
                t.row([
                    if r.replaces.is_some() {
                        "copying".into()
                    } else {
                        "resync".into()
                    },
                    format!(
                        "disk {} ({}): {} chunks ({}) left",
                        r.disk,
                        if r.node_up { "node up" } else { "node down" },
                        r.dirty_chunks,
                        human(r.dirty_chunks * d.placement.chunk_size)
                    ),
                ]);
            }
            t.print();
        }
        VdiskCommand::Resize { path, size } => {
            let (ds, name) = vdisk_path(&path)?;
            let size = parse_size(&size).map_err(anyhow::Error::msg)?;
            let v = api.resize_vdisk(ds, name, size).await?;
            if json {
                return print_json(&v);
            }
            println!("resized vDisk {ds}/{name} to {}", human(v.size));
        }
        VdiskCommand::Delete { path, force } => {
            let (ds, name) = vdisk_path(&path)?;
            api.delete_vdisk(ds, name, force).await?;
            if !json {
                println!("deleted vDisk {ds}/{name}; nodes free its space within seconds");
            }
        }
    }
    Ok(())
}

fn state_str(s: &tessera_zone::records::VdiskState) -> String {
    match s {
        tessera_zone::records::VdiskState::Offline => "offline".into(),
        tessera_zone::records::VdiskState::Online { host } => format!("online@{host}"),
    }
}
