//! `tessera node run` and `tessera node format`.

use std::time::Duration;

use anyhow::Context;
use tessera_storage_node::{DiskSpec, NodeConfig};

use crate::args::{Global, NodeFormatArgs, NodeRunArgs};
use crate::manage::api_client;
use crate::size::parse_size;

pub async fn run(global: &Global, a: NodeRunArgs) -> anyhow::Result<()> {
    keep_freed_memory();
    let create_size = a
        .disk_size
        .as_deref()
        .map(parse_size)
        .transpose()
        .map_err(anyhow::Error::msg)?;
    let api = if a.standalone {
        None
    } else {
        let mut g = global.clone();
        g.api = a.api.clone().or(g.api);
        g.token_file = a.token_file.clone().or(g.token_file);
        Some(api_client(&g)?)
    };
    let local_socket = if a.no_local_socket {
        None
    } else {
        Some(a.local_socket.unwrap_or_else(|| a.dir.join("node.sock")))
    };
    let config = NodeConfig {
        local_socket,
        dir: a.dir,
        listen: a.listen,
        advertise: a.advertise,
        host: a.host.unwrap_or_else(system_host_name),
        disks: a
            .disks
            .into_iter()
            .map(|path| DiskSpec {
                path,
                create_size,
                create_format: a.format_version,
            })
            .collect(),
        api,
        heartbeat_interval: Duration::from_millis(a.heartbeat_ms.max(50)),
    };
    tessera_storage_node::run(config, shutdown_signal()).await?;
    Ok(())
}

/// A node allocates a buffer per request body (up to 4 MiB) and frees it
/// when the request is done. With glibc's defaults the freed memory goes
/// back to the kernel (a large block is unmapped, a heap's top trimmed) and
/// the next request faults fresh, zeroed pages in again: on 1 MiB writes
/// that was a tenth of the node's CPU. Keep it instead; what a node holds
/// is then bounded by its peak of requests in flight.
fn keep_freed_memory() {
    #[cfg(target_env = "gnu")]
    {
        // Bodies below this come from the heap, not from a mapping each.
        const MMAP_THRESHOLD: libc::c_int = 16 << 20;
        // A heap keeps up to this much free memory at its top.
        const TRIM_THRESHOLD: libc::c_int = 256 << 20;
        // SAFETY: mallopt only changes allocator parameters, under the
        // allocator's own lock (safe with other threads allocating), and
        // both values are in their documented ranges (the mmap threshold
        // at most 32 MiB on 64-bit).
        let ok = unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1
                && libc::mallopt(libc::M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
        };
        if !ok {
            tracing::warn!("cannot tune the allocator: large requests will fault memory in");
        }
    }
}

pub fn format(a: NodeFormatArgs) -> anyhow::Result<()> {
    let size = a
        .size
        .as_deref()
        .map(parse_size)
        .transpose()
        .map_err(anyhow::Error::msg)?;
    let disk = tessera_chunkstore::Disk::format(
        &a.path,
        &tessera_chunkstore::FormatOptions {
            disk_uuid: uuid::Uuid::new_v4(),
            extent_size: tessera_chunkstore::DEFAULT_EXTENT_SIZE,
            size,
            force: a.force,
            thin: a.format_version >= 3,
        },
    )
    .with_context(|| format!("cannot format {}", a.path.display()))?;
    let info = disk.info();
    println!(
        "formatted {}: disk {} (format version {}) with {} of chunk space",
        a.path.display(),
        disk.uuid(),
        info.format_version,
        crate::size::human(info.capacity)
    );
    Ok(())
}

/// The system's host name.
pub fn system_host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "localhost".to_string())
}

/// Resolves on SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(error = %e, "cannot watch SIGTERM");
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}
