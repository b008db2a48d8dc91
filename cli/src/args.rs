//! Command-line arguments. Doc comments are the `--help` text.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

/// Tessera: distributed block storage for KVM clouds.
#[derive(Debug, Parser)]
#[command(name = "tessera", version, propagate_version = true)]
pub struct Cli {
    #[command(flatten)]
    pub global: Global,
    /// More log output (-v debug, -vv trace).
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,
    #[command(subcommand)]
    pub command: Command,
}

/// How to reach the zone's management API.
#[derive(Debug, Clone, Args)]
pub struct Global {
    /// Management API URL [default: the zone `tessera up` started, else http://127.0.0.1:8080].
    #[arg(long, env = "TESSERA_API")]
    pub api: Option<String>,
    /// File holding the API bearer token [default: the zone `tessera up` started].
    #[arg(long, env = "TESSERA_TOKEN_FILE")]
    pub token_file: Option<PathBuf>,
    /// Print JSON instead of tables.
    #[arg(long, global = true)]
    pub json: bool,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Bring up a whole zone on this machine: metadata, API and storage nodes.
    Up(UpArgs),
    /// The management API server.
    #[command(subcommand)]
    Api(ApiCommand),
    /// Storage nodes.
    #[command(subcommand)]
    Node(NodeCommand),
    /// The zone.
    #[command(subcommand)]
    Zone(ZoneCommand),
    /// Hosts of the zone.
    #[command(subcommand)]
    Host(HostCommand),
    /// Disks of the zone's storage nodes.
    #[command(subcommand)]
    Disk(DiskCommand),
    /// Datastores: pools of disks with a redundancy policy.
    #[command(subcommand)]
    Datastore(DatastoreCommand),
    /// Virtual disks.
    #[command(subcommand)]
    Vdisk(VdiskCommand),
    /// The per-VM vhost-user-blk device.
    #[command(subcommand)]
    Vhost(VhostCommand),
    /// Verify every copy of an offline vDisk and repair bad ones (online
    /// vDisks are scrubbed by their backend).
    Scrub(ScrubArgs),
    /// Repair work: stale copies and what resync still has to copy.
    #[command(subcommand)]
    Repair(RepairCommand),
}

#[derive(Debug, Args)]
pub struct ScrubArgs {
    /// DATASTORE/NAME
    pub path: String,
    /// Bandwidth scrub and repair may use, e.g. 100M (per second).
    #[arg(long, default_value = "256M")]
    pub bandwidth: String,
}

#[derive(Debug, Subcommand)]
pub enum RepairCommand {
    /// vDisks with stale copies and their resync progress.
    Status,
}

#[derive(Debug, Subcommand)]
pub enum VhostCommand {
    /// Serve a vDisk to QEMU over vhost-user-blk, in the foreground, one
    /// QEMU connection after another, holding the vDisk's write lease.
    Serve(VhostServeArgs),
}

#[derive(Debug, Args)]
pub struct VhostServeArgs {
    /// DATASTORE/NAME
    pub path: String,
    /// Unix socket QEMU connects to (`-chardev socket,path=…`).
    #[arg(long)]
    pub socket: PathBuf,
    /// Number of virtqueues offered (QEMU's num-queues may use fewer).
    #[arg(long, default_value_t = 4)]
    pub queues: u16,
    /// Virtqueue size.
    #[arg(long, default_value_t = 256)]
    pub queue_size: u16,
    /// Host name of this machine in the zone [default: the system host name].
    #[arg(long)]
    pub host: Option<String>,
    /// Exit when QEMU disconnects instead of waiting for it to reconnect.
    #[arg(long)]
    pub exit_on_disconnect: bool,
    /// Take the write lease even if another host holds it.
    #[arg(long)]
    pub force: bool,
    /// Write lease time to live in milliseconds.
    #[arg(long, default_value_t = 10_000)]
    pub lease_ttl_ms: u64,
    /// Bandwidth resync and scrub may use, e.g. 100M (per second).
    #[arg(long, default_value = "256M")]
    pub repair_bandwidth: String,
    /// Scrub every copy of the vDisk this often, in hours (0: never).
    #[arg(long, default_value_t = 24)]
    pub scrub_interval_hours: u64,
    /// Management API URL (overrides `tessera --api`).
    #[arg(long = "api")]
    pub api: Option<String>,
    /// File holding the API bearer token (overrides `tessera --token-file`).
    #[arg(long = "token-file")]
    pub token_file: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct UpArgs {
    /// Directory holding the zone's metadata, token, and every node's disk files.
    #[arg(long, default_value = "/var/lib/tessera/local")]
    pub dir: PathBuf,
    /// Number of storage nodes to run.
    #[arg(long, default_value_t = 3)]
    pub nodes: u32,
    /// Management API listen address.
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub api: SocketAddr,
    /// Size of each node's disk file (created on first start).
    #[arg(long, default_value = "4G")]
    pub disk_size: String,
    /// Name of the zone (on first start).
    #[arg(long, default_value = "local")]
    pub zone_name: String,
    /// The vDisk to create (if missing) and serve over vhost-user, as DATASTORE/NAME;
    /// its datastore is created with min(2, nodes) mirrors if missing.
    #[arg(long, default_value = "local/demo")]
    pub vdisk: String,
    /// Size of that vDisk when it is created.
    #[arg(long, default_value = "1G")]
    pub vdisk_size: String,
    /// Serve no vDisk: only the zone.
    #[arg(long)]
    pub no_vdisk: bool,
    /// Boot a small test guest (QEMU, TCG) on the served vDisk once the zone is up.
    #[arg(long, conflicts_with = "no_vdisk")]
    pub boot_guest: bool,
}

#[derive(Debug, Subcommand)]
pub enum ApiCommand {
    /// Serve the management API over the zone metadata in DIR.
    Run(ApiRunArgs),
}

#[derive(Debug, Args)]
pub struct ApiRunArgs {
    /// Directory of the zone metadata and the API token.
    #[arg(long)]
    pub dir: PathBuf,
    /// Listen address.
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,
    /// Name of the zone (on first start).
    #[arg(long, default_value = "local")]
    pub zone_name: String,
    /// Seconds a storage node may stay down before its copies are rebuilt
    /// on other disks of their datastores.
    #[arg(long, default_value_t = 600)]
    pub rebuild_after_secs: u64,
    /// Bandwidth the repair worker (resync, rebuild and rebalance of vDisks
    /// nobody has open) may use, MiB/s per vDisk.
    #[arg(long, default_value_t = 256)]
    pub repair_bandwidth_mib: u64,
}

impl TryFrom<ApiRunArgs> for tessera_api::ApiConfig {
    type Error = anyhow::Error;
    fn try_from(a: ApiRunArgs) -> anyhow::Result<Self> {
        if a.zone_name.is_empty() {
            anyhow::bail!("the zone name must not be empty");
        }
        let mut config = tessera_api::ApiConfig::new(a.dir, a.listen, &a.zone_name);
        config.rebuild_after = std::time::Duration::from_secs(a.rebuild_after_secs);
        Ok(config)
    }
}

#[derive(Debug, Subcommand)]
pub enum NodeCommand {
    /// Run a storage node in the foreground.
    Run(NodeRunArgs),
    /// Format a disk (block device or file) for Tessera.
    Format(NodeFormatArgs),
    /// List the zone's storage nodes.
    List,
    /// Remove a storage node for good: its disks leave every datastore and
    /// their copies are rebuilt on other disks.
    Remove {
        node: uuid::Uuid,
        /// Remove it even though it is up (its copies drain first).
        #[arg(long)]
        force: bool,
    },
}

#[derive(Debug, Args)]
pub struct NodeRunArgs {
    /// Directory of the node's identity.
    #[arg(long)]
    pub dir: PathBuf,
    /// Storage protocol listen address.
    #[arg(long)]
    pub listen: SocketAddr,
    /// Address clients use to reach the node [default: the listen address].
    #[arg(long)]
    pub advertise: Option<String>,
    /// Host name of this machine in the zone [default: the system host name].
    #[arg(long)]
    pub host: Option<String>,
    /// Unix socket for local sessions: vDisk processes on this host share
    /// their (guest) memory with the node and skip the network copies
    /// [default: DIR/node.sock].
    #[arg(long, conflicts_with = "no_local_socket")]
    pub local_socket: Option<PathBuf>,
    /// Serve TCP only.
    #[arg(long)]
    pub no_local_socket: bool,
    /// A disk to serve (repeatable): a formatted block device or file.
    #[arg(long = "disk", required = true)]
    pub disks: Vec<PathBuf>,
    /// Create and format missing disk files with this size.
    #[arg(long)]
    pub disk_size: Option<String>,
    /// The format version of disk files created with `--disk-size`: 3
    /// (space taken 4 KiB at a time as chunks are written) or 2 (a chunk
    /// takes its whole size at its first write).
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(2..=3))]
    pub format_version: u32,
    /// Heartbeat period in milliseconds.
    #[arg(long, default_value_t = 1000)]
    pub heartbeat_ms: u64,
    /// Run without a zone (no registration): for tests of the node alone.
    #[arg(long)]
    pub standalone: bool,
    /// Management API URL of the zone to join (overrides `tessera --api`).
    #[arg(long = "api")]
    pub api: Option<String>,
    /// File holding the API bearer token (overrides `tessera --token-file`).
    #[arg(long = "token-file")]
    pub token_file: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct NodeFormatArgs {
    /// Block device or file.
    pub path: PathBuf,
    /// Create the file with this size if it does not exist.
    #[arg(long)]
    pub size: Option<String>,
    /// Overwrite an existing Tessera disk (its data is lost).
    #[arg(long)]
    pub force: bool,
    /// On-disk format version: 3 (space taken 4 KiB at a time as chunks
    /// are written) or 2 (a chunk takes its whole size at its first
    /// write).
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(2..=3))]
    pub format_version: u32,
}

#[derive(Debug, Subcommand)]
pub enum ZoneCommand {
    /// Show the zone.
    Show,
}

#[derive(Debug, Subcommand)]
pub enum HostCommand {
    /// List hosts.
    List,
}

#[derive(Debug, Subcommand)]
pub enum DiskCommand {
    /// List disks.
    List,
}

#[derive(Debug, Subcommand)]
pub enum DatastoreCommand {
    /// Create a datastore.
    Create {
        /// Datastore name.
        name: String,
        /// Synchronous copies of every chunk, on distinct nodes.
        #[arg(long)]
        mirrors: u32,
        /// Placement groups each vDisk's chunks are striped over.
        #[arg(long)]
        stripes: Option<u32>,
        /// Member disks (uuids, comma separated) [default: every disk of the zone].
        #[arg(long, value_delimiter = ',')]
        disks: Option<Vec<uuid::Uuid>>,
    },
    /// List datastores.
    List,
    /// Show one datastore.
    Show { name: String },
    /// Delete an empty datastore.
    Delete { name: String },
    /// Add a disk to a datastore: vDisks rebalance onto it.
    AddDisk { name: String, disk: uuid::Uuid },
    /// Remove a disk from a datastore: its copies move to other disks first.
    RemoveDisk { name: String, disk: uuid::Uuid },
}

#[derive(Debug, Subcommand)]
pub enum VdiskCommand {
    /// Create a vDisk.
    Create {
        /// DATASTORE/NAME
        path: String,
        /// Size, e.g. 10G.
        #[arg(long)]
        size: String,
    },
    /// List vDisks.
    List {
        /// Only this datastore's.
        #[arg(long)]
        datastore: Option<String>,
    },
    /// Show one vDisk.
    Show {
        /// DATASTORE/NAME
        path: String,
    },
    /// Grow a vDisk.
    Resize {
        /// DATASTORE/NAME
        path: String,
        /// New size, e.g. 20G.
        #[arg(long)]
        size: String,
    },
    /// Delete a vDisk and free its space on every node.
    Delete {
        /// DATASTORE/NAME
        path: String,
        /// Delete even while it is open.
        #[arg(long)]
        force: bool,
    },
}

/// Splits `DATASTORE/NAME`.
pub fn vdisk_path(path: &str) -> anyhow::Result<(&str, &str)> {
    match path.split_once('/') {
        Some((ds, name)) if !ds.is_empty() && !name.is_empty() && !name.contains('/') => {
            Ok((ds, name))
        }
        _ => anyhow::bail!("'{path}' is not DATASTORE/NAME"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn vdisk_paths() {
        assert_eq!(vdisk_path("ds/vm1").unwrap(), ("ds", "vm1"));
        assert!(vdisk_path("ds").is_err());
        assert!(vdisk_path("/vm1").is_err());
        assert!(vdisk_path("ds/").is_err());
        assert!(vdisk_path("a/b/c").is_err());
    }

    #[test]
    fn contract_commands_parse() {
        Cli::try_parse_from(["tessera", "up", "--dir", "/tmp/x", "--nodes", "3"]).unwrap();
        Cli::try_parse_from([
            "tessera",
            "up",
            "--dir",
            "/tmp/x",
            "--nodes",
            "3",
            "--api",
            "127.0.0.1:9000",
        ])
        .unwrap();
        Cli::try_parse_from([
            "tessera",
            "datastore",
            "create",
            "ds",
            "--mirrors",
            "2",
            "--stripes",
            "2",
        ])
        .unwrap();
        Cli::try_parse_from(["tessera", "vdisk", "create", "ds/v", "--size", "1G"]).unwrap();
        Cli::try_parse_from(["tessera", "vdisk", "show", "ds/v", "--json"]).unwrap();
        Cli::try_parse_from(["tessera", "vhost", "serve", "ds/v", "--socket", "/tmp/s"]).unwrap();
        Cli::try_parse_from([
            "tessera", "vhost", "serve", "ds/v", "--socket", "/tmp/s", "--queues", "2",
        ])
        .unwrap();
        Cli::try_parse_from([
            "tessera",
            "--api",
            "http://x",
            "--token-file",
            "/t",
            "vdisk",
            "list",
        ])
        .unwrap();
    }
}
