//! `tessera up`: a whole zone on this machine in one command.
//!
//! Runs the management API (over the embedded metadata store) in this
//! process and each storage node as its own child process (`tessera node
//! run`), so one node can be stopped alone. Stops everything on Ctrl-C or
//! SIGTERM.

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use tessera_api_client::ApiClient;
use tessera_zone::records::NodeState;

use crate::args::UpArgs;
use crate::manage::CurrentZone;
use crate::node::{shutdown_signal, system_host_name};
use crate::size::parse_size;

/// One storage node child.
struct NodeChild {
    index: u32,
    child: Child,
    /// Its exit was logged already.
    reported: bool,
}

pub async fn run(a: UpArgs) -> anyhow::Result<()> {
    if a.nodes == 0 {
        bail!("--nodes must be at least 1");
    }
    let disk_size = parse_size(&a.disk_size).map_err(anyhow::Error::msg)?;
    std::fs::create_dir_all(&a.dir)
        .with_context(|| format!("cannot create {}", a.dir.display()))?;
    let dir = a
        .dir
        .canonicalize()
        .with_context(|| format!("cannot resolve {}", a.dir.display()))?;

    let api = tessera_api::start(tessera_api::ApiConfig::new(
        dir.clone(),
        a.api,
        &a.zone_name,
    ))
    .await
    .context("cannot start the management API")?;
    let worker = crate::start_repair_worker(&api, 256 << 20)?;
    let url = format!("http://{}", api.addr);
    let token_file = dir.join("api-token");
    CurrentZone {
        api: url.clone(),
        token_file: token_file.clone(),
    }
    .save()?;

    let exe = std::env::current_exe().context("cannot find the tessera executable")?;
    let host = system_host_name();
    let mut children = Vec::new();
    for index in 0..a.nodes {
        let listen = node_listen(&dir, index)?;
        let child = spawn_node(
            &exe,
            &dir,
            index,
            listen,
            &url,
            &token_file,
            &host,
            disk_size,
        )?;
        children.push(NodeChild {
            index,
            child,
            reported: false,
        });
    }

    let client = ApiClient::from_token_file(&url, &token_file)?;
    let ready = wait_nodes_up(
        &client,
        a.nodes as usize,
        &mut children,
        Duration::from_secs(60),
    )
    .await;
    if let Err(e) = ready {
        stop_children(&mut children);
        let _ = api.shutdown().await;
        return Err(e);
    }
    println!("Tessera zone '{}' is up.", a.zone_name);
    println!("  API:        {url}");
    println!("  token file: {}", token_file.display());
    println!("  nodes:      {} (data under {})", a.nodes, dir.display());

    let mut vhost: Option<Child> = None;
    if !a.no_vdisk {
        let served = serve_vdisk(&a, &client, &exe, &dir, &url, &token_file, &host).await;
        match served {
            Ok((child, socket)) => {
                vhost = Some(child);
                print_qemu_line(&a.vdisk, &socket);
                if a.boot_guest {
                    boot_guest(socket).await;
                }
            }
            Err(e) => {
                stop_children(&mut children);
                let _ = api.shutdown().await;
                return Err(e);
            }
        }
    }
    println!("Try:");
    println!("  tessera node list");
    println!("  tessera vdisk list");
    println!(
        "  tessera datastore create ds1 --mirrors {}",
        a.nodes.min(2)
    );
    println!("  tessera vdisk create ds1/vm1 --size 1G");
    println!("Ctrl-C stops the zone.");

    let mut watch = tokio::time::interval(Duration::from_millis(500));
    let shutdown = shutdown_signal();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            _ = watch.tick() => {
                for n in &mut children {
                    if n.reported {
                        continue;
                    }
                    if let Ok(Some(status)) = n.child.try_wait() {
                        n.reported = true;
                        tracing::warn!(node = n.index, %status, "storage node exited");
                    }
                }
            }
        }
    }
    println!("stopping the zone");
    if let Some(mut v) = vhost.take() {
        // First the device, so it flushes and gives its lease back.
        terminate(&mut v, Duration::from_secs(20));
    }
    stop_children(&mut children);
    worker.stop().await;
    api.shutdown()
        .await
        .context("the management API did not stop cleanly")?;
    Ok(())
}

/// The node's listen address: kept in `DIR/nodeN/listen` so a restarted zone
/// keeps its addresses; a free loopback port on first start.
fn node_listen(dir: &Path, index: u32) -> anyhow::Result<SocketAddr> {
    let node_dir = dir.join(format!("node{index}"));
    std::fs::create_dir_all(&node_dir)
        .with_context(|| format!("cannot create {}", node_dir.display()))?;
    let file = node_dir.join("listen");
    if let Ok(text) = std::fs::read_to_string(&file) {
        if let Ok(addr) = text.trim().parse::<SocketAddr>() {
            if TcpListener::bind(addr).is_ok() {
                return Ok(addr);
            }
        }
    }
    let addr = TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .context("cannot find a free port")?;
    std::fs::write(&file, addr.to_string())
        .with_context(|| format!("cannot write {}", file.display()))?;
    Ok(addr)
}

#[allow(clippy::too_many_arguments)]
fn spawn_node(
    exe: &Path,
    dir: &Path,
    index: u32,
    listen: SocketAddr,
    url: &str,
    token_file: &Path,
    host: &str,
    disk_size: u64,
) -> anyhow::Result<Child> {
    let node_dir: PathBuf = dir.join(format!("node{index}"));
    let log = std::fs::File::create(node_dir.join("node.log"))
        .with_context(|| format!("cannot create the log of node {index}"))?;
    let mut cmd = Command::new(exe);
    cmd.arg("node")
        .arg("run")
        .arg("--dir")
        .arg(&node_dir)
        .arg("--listen")
        .arg(listen.to_string())
        .arg("--host")
        .arg(host)
        .arg("--disk")
        .arg(node_dir.join("disk0.img"))
        .arg("--disk-size")
        .arg(disk_size.to_string())
        .arg("--api")
        .arg(url)
        .arg("--token-file")
        .arg(token_file)
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log);
    // The nodes must not outlive `tessera up`, even if it is killed.
    die_with_parent(&mut cmd);
    let child = cmd
        .spawn()
        .with_context(|| format!("cannot start storage node {index}"))?;
    tracing::info!(node = index, pid = child.id(), %listen, "storage node started");
    Ok(child)
}

async fn wait_nodes_up(
    client: &ApiClient,
    want: usize,
    children: &mut [NodeChild],
    timeout: Duration,
) -> anyhow::Result<()> {
    let start = Instant::now();
    loop {
        for n in children.iter_mut() {
            if let Ok(Some(status)) = n.child.try_wait() {
                bail!(
                    "storage node {} exited during start-up ({status}); see its node.log",
                    n.index
                );
            }
        }
        if let Ok(nodes) = client.nodes().await {
            if nodes.iter().filter(|n| n.state == NodeState::Up).count() >= want {
                return Ok(());
            }
        }
        if start.elapsed() > timeout {
            bail!("storage nodes did not register within {timeout:?}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Creates the datastore and vDisk of `--vdisk` if missing and starts
/// `tessera vhost serve` on it; returns the child and its socket.
#[allow(clippy::too_many_arguments)]
async fn serve_vdisk(
    a: &UpArgs,
    client: &ApiClient,
    exe: &Path,
    dir: &Path,
    url: &str,
    token_file: &Path,
    host: &str,
) -> anyhow::Result<(Child, PathBuf)> {
    let (ds, name) = crate::args::vdisk_path(&a.vdisk)?;
    let size = parse_size(&a.vdisk_size).map_err(anyhow::Error::msg)?;
    if let Err(e) = client.datastore(ds).await {
        if !e.is_not_found() {
            return Err(e.into());
        }
        client
            .create_datastore(&tessera_zone::service::CreateDatastore {
                name: ds.to_string(),
                mirrors: a.nodes.min(2),
                stripes: None,
                disks: None,
            })
            .await
            .with_context(|| format!("cannot create datastore {ds}"))?;
    }
    if let Err(e) = client.vdisk(ds, name).await {
        if !e.is_not_found() {
            return Err(e.into());
        }
        client
            .create_vdisk(&tessera_zone::service::CreateVdisk {
                datastore: ds.to_string(),
                name: name.to_string(),
                size,
            })
            .await
            .with_context(|| format!("cannot create vDisk {ds}/{name}"))?;
    }
    let socket = dir.join(format!("{ds}-{name}.sock"));
    let log = std::fs::File::create(dir.join(format!("vhost-{ds}-{name}.log")))
        .context("cannot create the vhost log")?;
    let mut cmd = Command::new(exe);
    cmd.args([
        "vhost", "serve", &a.vdisk, "--queues", "2", "--host", host, "--force",
    ])
    .arg("--socket")
    .arg(&socket)
    .arg("--api")
    .arg(url)
    .arg("--token-file")
    .arg(token_file)
    .stdin(Stdio::null())
    .stdout(log.try_clone()?)
    .stderr(log);
    die_with_parent(&mut cmd);
    let mut child = cmd.spawn().context("cannot start tessera vhost serve")?;
    let start = Instant::now();
    while !socket.exists() {
        if let Ok(Some(status)) = child.try_wait() {
            bail!(
                "tessera vhost serve exited ({status}); see {}",
                dir.join(format!("vhost-{ds}-{name}.log")).display()
            );
        }
        if start.elapsed() > Duration::from_secs(30) {
            terminate(&mut child, Duration::from_secs(5));
            bail!(
                "tessera vhost serve did not open {} in time",
                socket.display()
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    println!(
        "  vDisk:      {} served over vhost-user at {}",
        a.vdisk,
        socket.display()
    );
    Ok((child, socket))
}

fn print_qemu_line(vdisk: &str, socket: &Path) {
    println!("Attach it to a VM (shared guest memory is required by vhost-user):");
    println!(
        "  qemu-system-x86_64 -m 1G \\\n    -object memory-backend-memfd,id=mem,size=1G,share=on -numa node,memdev=mem \\\n    -chardev socket,id=vd0,path={},reconnect-ms=1000 \\\n    -device vhost-user-blk-pci,chardev=vd0,num-queues=2 …",
        socket.display()
    );
    println!("  (libvirt: <disk type='vhostuser' device='disk'><source type='unix' path='{}'/> for {vdisk})", socket.display());
}

/// Boots the guest kit's tiny Linux on the vDisk and shows what it saw.
async fn boot_guest(socket: PathBuf) {
    println!("Booting a test guest on the vDisk (QEMU, TCG)…");
    let outcome = tokio::task::spawn_blocking(move || {
        let kit = tessera_guest_kit::GuestKit::get()?;
        tessera_guest_kit::Guest::boot(
            kit,
            tessera_guest_kit::GuestConfig {
                disks: vec![tessera_guest_kit::VhostDisk::new(&socket, 2)],
                script: "echo \"guest: /dev/vda has $(cat /sys/block/vda/size) sectors, $(ls /sys/block/vda/mq | wc -l) queues\"\n\
                         dd if=/dev/vda of=/dev/null bs=1M count=16 iflag=direct 2>&1 | tail -n 1\n\
                         echo guest: read 16 MiB of the vDisk"
                    .into(),
                timeout: Duration::from_secs(180),
                ..Default::default()
            },
        )
    })
    .await;
    match outcome {
        Ok(Ok(o)) => {
            for line in o.lines_with("guest:") {
                println!("  {line}");
            }
            if !o.succeeded() {
                println!(
                    "  the test guest failed (exit {:?}); its console:\n{}",
                    o.exit, o.console
                );
            }
        }
        Ok(Err(e)) => {
            println!("  cannot boot the test guest: {e:#} (see scripts/install-test-deps.sh)")
        }
        Err(e) => println!("  cannot boot the test guest: {e}"),
    }
}

/// Children get SIGTERM when `tessera up` dies, even by SIGKILL.
fn die_with_parent(cmd: &mut Command) {
    use std::os::unix::process::CommandExt;
    // SAFETY: the closure runs in the forked child before exec and only calls
    // prctl(2), which is async-signal-safe; it touches no memory of the parent.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// SIGTERM one child and wait for it (SIGKILL after `grace`).
fn terminate(child: &mut Child, grace: Duration) {
    // SAFETY: kill(2) on the pid of a child we spawned and have not reaped.
    unsafe {
        libc::kill(child.id() as libc::pid_t, libc::SIGTERM);
    }
    let deadline = Instant::now() + grace;
    loop {
        match child.try_wait() {
            Ok(Some(_)) | Err(_) => return,
            Ok(None) if Instant::now() > deadline => {
                let _ = child.kill();
                let _ = child.wait();
                return;
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}

/// SIGTERM every node, wait for them (SIGKILL after 10 s).
fn stop_children(children: &mut [NodeChild]) {
    for n in children.iter() {
        // SAFETY: kill(2) on the pid of a child we spawned and have not reaped.
        unsafe {
            libc::kill(n.child.id() as libc::pid_t, libc::SIGTERM);
        }
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    for n in children.iter_mut() {
        loop {
            match n.child.try_wait() {
                Ok(Some(_)) | Err(_) => break,
                Ok(None) if Instant::now() > deadline => {
                    let _ = n.child.kill();
                    let _ = n.child.wait();
                    break;
                }
                Ok(None) => std::thread::sleep(Duration::from_millis(20)),
            }
        }
    }
}
