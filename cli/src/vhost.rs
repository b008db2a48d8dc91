//! `tessera vhost serve`: the per-VM backend process.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tessera_replicator::{Volume, VolumeConfig};
use tessera_vhost_backend::ServeConfig;

use crate::args::{vdisk_path, Global, ScrubArgs, VhostServeArgs};
use crate::manage::api_client;
use crate::node::{shutdown_signal, system_host_name};

pub async fn serve(global: &Global, a: VhostServeArgs) -> anyhow::Result<()> {
    let (ds, name) = vdisk_path(&a.path)?;
    if a.queues == 0 || a.queues > 64 {
        anyhow::bail!("--queues must be between 1 and 64");
    }
    if !a.queue_size.is_power_of_two() || a.queue_size < 4 {
        anyhow::bail!("--queue-size must be a power of two of at least 4");
    }
    let mut g = global.clone();
    g.api = a.api.clone().or(g.api);
    g.token_file = a.token_file.clone().or(g.token_file);
    let api = api_client(&g)?;
    let host = a.host.clone().unwrap_or_else(system_host_name);
    let mut config = VolumeConfig::new(api, ds, name, &host);
    config.force = a.force;
    config.lease_ttl = Duration::from_millis(a.lease_ttl_ms.max(1000));
    config.repair_bandwidth = crate::size::parse_size(&a.repair_bandwidth)
        .map_err(anyhow::Error::msg)?
        .max(1 << 20);
    config.scrub_interval =
        (a.scrub_interval_hours > 0).then(|| Duration::from_secs(a.scrub_interval_hours * 3600));
    let volume = Volume::open(config)
        .await
        .with_context(|| format!("cannot open vDisk {ds}/{name}"))?;
    let vdisk = volume.vdisk().clone();
    let serial: String = vdisk.uuid.simple().to_string().chars().take(20).collect();
    let serve_config = ServeConfig {
        socket: a.socket.clone(),
        num_queues: a.queues,
        queue_size: a.queue_size,
        serial,
        exit_on_disconnect: a.exit_on_disconnect,
    };
    println!(
        "serving vDisk {ds}/{name} ({} bytes, epoch {}) on {}",
        vdisk.size,
        volume.epoch(),
        a.socket.display()
    );

    let stop = Arc::new(AtomicBool::new(false));
    let (done_tx, done_rx) = tokio::sync::oneshot::channel();
    let device = tessera_vhost_backend::device(Arc::new(volume.clone()), &serve_config)
        .context("cannot create the vhost-user device")?;
    {
        let device = device.clone();
        let stop = stop.clone();
        std::thread::Builder::new()
            .name("vhost-user".into())
            .spawn(move || {
                let r = tessera_vhost_backend::serve_device(device, &serve_config, stop);
                let _ = done_tx.send(r);
            })
            .context("cannot start the vhost-user thread")?;
    }
    let served = tokio::select! {
        _ = shutdown_signal() => Ok(()),
        r = done_rx => r.unwrap_or(Ok(())),
    };
    stop.store(true, Ordering::Release);
    let _ = std::fs::remove_file(&a.socket);
    // Take no more requests and let those taken finish before the final
    // flush: nothing may be written after it (or after the activity log is
    // cleared). What the guest queued meanwhile stays in its rings.
    let quiet = tokio::task::spawn_blocking(move || device.quiesce(Duration::from_secs(60)))
        .await
        .unwrap_or(false);
    if !quiet {
        tracing::warn!("requests still in flight after 60 s; closing anyway (the lease is kept if the flush fails)");
    }
    let closed = volume.close().await;
    served.context("the vhost-user device failed")?;
    closed.context("cannot release the vDisk cleanly")?;
    tracing::info!("vDisk released");
    Ok(())
}

/// `tessera scrub DS/NAME`: open the (offline) vDisk, compare every copy,
/// let resync repair what differs, report.
pub async fn scrub(global: &Global, a: ScrubArgs) -> anyhow::Result<()> {
    let (ds, name) = vdisk_path(&a.path)?;
    let bandwidth = crate::size::parse_size(&a.bandwidth).map_err(anyhow::Error::msg)?;
    let api = api_client(global)?;
    let mut config = VolumeConfig::new(api.clone(), ds, name, &system_host_name());
    config.repair_bandwidth = bandwidth.max(1 << 20);
    let volume = Volume::open(config).await.with_context(|| {
        format!("cannot open vDisk {ds}/{name} (an online vDisk is scrubbed by its backend)")
    })?;
    let report = volume.scrub().await;
    let report = match report {
        Ok(r) => r,
        Err(e) => {
            let _ = volume.close().await;
            return Err(e).context("scrub failed");
        }
    };
    // Wait for resync to rewrite what the scrub found.
    let deadline = std::time::Instant::now() + Duration::from_secs(600);
    while !volume.all_current() && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let repaired_all = volume.all_current();
    volume
        .close()
        .await
        .context("cannot release the vDisk cleanly")?;
    if global.json {
        crate::output::print_json(&report)?;
    } else {
        println!(
            "scrubbed {ds}/{name}: {} chunks, {} read; {} checksum errors, {} mismatching copies; {} copies repaired",
            report.chunks,
            crate::size::human(report.bytes_read),
            report.checksum_errors.len(),
            report.mismatches.len(),
            report.repaired
        );
        for (disk, chunk) in &report.checksum_errors {
            println!("  checksum error: disk {disk} chunk {chunk}");
        }
        for (disk, chunk) in &report.mismatches {
            println!("  mismatch: disk {disk} chunk {chunk}");
        }
    }
    if !repaired_all {
        anyhow::bail!(
            "some copies are still stale (their node may be down): see `tessera repair status`"
        );
    }
    Ok(())
}
