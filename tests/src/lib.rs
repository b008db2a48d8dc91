//! Test kit for Tessera's integration tests: a zone made of real processes.
//!
//! [`TestZone`] runs the management API in the test process (over the
//! embedded store, in a temporary directory) and every storage node as its
//! own `tessera node run` child process on loopback, so tests can `kill -9`
//! and restart nodes. Everything is killed when the zone is dropped. The
//! nodes and vhost processes run [`TestZone::bin`]: [`tessera_bin`] unless
//! the zone was started with another executable
//! ([`TestZone::start_with_bin`], e.g. an older build for an A/B benchmark).

pub mod blk;
/// The guest kit (its own crate, also used by `tessera up --boot-guest`).
pub use tessera_guest_kit as guest;

use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tessera_api_client::ApiClient;
use tessera_replicator::{Volume, VolumeConfig};
use tessera_zone::records::{NodeState, Vdisk};
use tessera_zone::service::{CreateDatastore, CreateVdisk};

/// The `tessera` executable under test: `$TESSERA_BIN`, or the one cargo
/// built next to this test binary.
pub fn tessera_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("TESSERA_BIN") {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().expect("test executable path");
    // Test binaries live in target/<profile>/deps/, other binaries (the
    // benchmarks) in target/<profile>/: `tessera` is in target/<profile>/.
    let dir = exe.parent().expect("executable directory");
    let candidates = [
        dir.join("tessera"),
        dir.parent().unwrap_or(dir).join("tessera"),
    ];
    let bin = candidates
        .iter()
        .find(|p| p.is_file())
        .cloned()
        .unwrap_or_else(|| {
            panic!(
                "{} does not exist: build it first (cargo build --bin tessera, with the same profile)",
                candidates[1].display()
            )
        });
    bin
}

/// A free loopback port (best effort: released before use).
pub fn free_port() -> SocketAddr {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
}

/// One storage node process.
pub struct TestNode {
    pub index: usize,
    pub dir: PathBuf,
    pub listen: SocketAddr,
    pub disk: PathBuf,
    /// The host it claims ([`TEST_HOST`] unless a test moved it).
    pub host: String,
    /// The machine boot identity it reports (`TESSERA_BOOT_ID`), if a test
    /// sets one: changing it between runs makes a restart look like the
    /// machine's reboot.
    pub boot_id: Option<uuid::Uuid>,
    child: Option<Child>,
}

impl TestNode {
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }
}

/// A zone of real storage node processes and an in-process API.
pub struct TestZone {
    pub dir: tempfile::TempDir,
    pub api: ApiClient,
    pub url: String,
    pub token_file: PathBuf,
    pub nodes: Vec<TestNode>,
    /// The `tessera` executable the zone's nodes and vhost processes run
    /// (the API always runs in this process).
    pub bin: PathBuf,
    server: Option<tessera_api::ApiServer>,
    disk_size: u64,
    /// The on-disk format of the nodes' disk files (`--format-version`);
    /// `None`: the executable's default (older ones have no such flag).
    format_version: Option<u32>,
}

/// Host name the test zone's nodes claim.
pub const TEST_HOST: &str = "testhost";

impl TestZone {
    /// Starts the API and `n` nodes with `disk_size`-byte disk files, and
    /// waits until every node is registered and up.
    pub async fn start(n: usize, disk_size: u64) -> TestZone {
        Self::start_with(n, disk_size, Duration::from_secs(600)).await
    }

    /// Like [`TestZone::start`], with the API rebuilding a down node's
    /// copies elsewhere after `rebuild_after` (moves planned every 200 ms).
    pub async fn start_with(n: usize, disk_size: u64, rebuild_after: Duration) -> TestZone {
        Self::start_full(n, disk_size, rebuild_after, tessera_bin(), None).await
    }

    /// Like [`TestZone::start`], with the nodes (and the vhost processes
    /// [`TestZone::spawn_vhost`] starts) running `bin` instead of
    /// [`tessera_bin`]: for instance an older build, which talks to this
    /// process's API over HTTP like any node.
    pub async fn start_with_bin(n: usize, disk_size: u64, bin: PathBuf) -> TestZone {
        Self::start_full(n, disk_size, Duration::from_secs(600), bin, None).await
    }

    /// Like [`TestZone::start`], with the nodes' disk files formatted at
    /// `format_version` (2 or 3).
    pub async fn start_formatted(n: usize, disk_size: u64, format_version: u32) -> TestZone {
        Self::start_full(
            n,
            disk_size,
            Duration::from_secs(600),
            tessera_bin(),
            Some(format_version),
        )
        .await
    }

    async fn start_full(
        n: usize,
        disk_size: u64,
        rebuild_after: Duration,
        bin: PathBuf,
        format_version: Option<u32>,
    ) -> TestZone {
        // TESSERA_TEST_LOG=info shows the in-process API's and volumes' logs.
        if let Ok(filter) = std::env::var("TESSERA_TEST_LOG") {
            let _ = tracing_subscriber::fmt()
                .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
                .with_test_writer()
                .try_init();
        }
        let dir = tempfile::tempdir().expect("temp dir");
        let mut config = tessera_api::ApiConfig::new(
            dir.path().to_path_buf(),
            "127.0.0.1:0".parse().expect("addr"),
            "test",
        );
        config.rebuild_after = rebuild_after;
        config.plan_interval = Duration::from_millis(200);
        let server = tessera_api::start(config).await.expect("API starts");
        let url = format!("http://{}", server.addr);
        let token_file = dir.path().join("api-token");
        let api = ApiClient::from_token_file(&url, &token_file).expect("API client");
        let mut zone = TestZone {
            dir,
            api,
            url,
            token_file,
            nodes: Vec::new(),
            bin,
            server: Some(server),
            disk_size,
            format_version,
        };
        for _ in 0..n {
            zone.add_node();
        }
        zone.wait_nodes_up(n).await;
        zone
    }

    /// Starts one more node (with a fresh disk); returns its index. Does
    /// not wait for it to come up.
    pub fn add_node(&mut self) -> usize {
        let i = self.nodes.len();
        let node_dir = self.dir.path().join(format!("node{i}"));
        std::fs::create_dir_all(&node_dir).expect("node dir");
        self.nodes.push(TestNode {
            index: i,
            disk: node_dir.join("disk0.img"),
            dir: node_dir,
            listen: free_port(),
            host: TEST_HOST.to_string(),
            boot_id: None,
            child: None,
        });
        self.start_node(i);
        i
    }

    /// The uuid of node `i`'s disk, once it registered.
    pub async fn disk_of_node(&self, i: usize) -> uuid::Uuid {
        let addr = self.nodes[i].listen.to_string();
        let start = Instant::now();
        loop {
            let nodes = self.api.nodes().await.expect("nodes");
            if let Some(n) = nodes.iter().find(|n| n.node.addr == addr) {
                if let Some(d) = n.node.disks.first() {
                    return *d;
                }
            }
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "node {i} did not register"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The uuid of node `i` in the zone.
    pub async fn node_uuid(&self, i: usize) -> uuid::Uuid {
        let addr = self.nodes[i].listen.to_string();
        let nodes = self.api.nodes().await.expect("nodes");
        nodes
            .iter()
            .find(|n| n.node.addr == addr)
            .map(|n| n.node.uuid)
            .expect("node registered")
    }

    /// Runs the zone's repair worker (for vDisks nobody has open) until the
    /// returned sender is dropped or fired.
    pub fn start_repair_worker(&self) -> tokio::sync::oneshot::Sender<()> {
        let (stop, stopped) = tokio::sync::oneshot::channel();
        tokio::spawn(tessera_replicator::worker::run(
            tessera_replicator::worker::WorkerConfig {
                zone: std::sync::Arc::new(self.api.clone()),
                host: "repair-worker".into(),
                bandwidth: 512 << 20,
                period: Duration::from_millis(200),
            },
            stopped,
        ));
        stop
    }

    /// Starts (or restarts) node `i` with the same command line as before.
    pub fn start_node(&mut self, i: usize) {
        let bin = self.bin.clone();
        let node = &mut self.nodes[i];
        assert!(node.child.is_none(), "node {i} is already running");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(node.dir.join("node.log"))
            .expect("node log");
        let mut cmd = Command::new(bin);
        if let Some(boot) = node.boot_id {
            cmd.env("TESSERA_BOOT_ID", boot.to_string());
        }
        let child = cmd
            .args(["node", "run", "--dir"])
            .arg(&node.dir)
            .arg("--listen")
            .arg(node.listen.to_string())
            .args(["--host", &node.host, "--heartbeat-ms", "200"])
            .arg("--disk")
            .arg(&node.disk)
            .arg("--disk-size")
            .arg(self.disk_size.to_string())
            // Only when asked for: older executables (blkbench's base) do
            // not know the flag.
            .args(
                self.format_version
                    .map(|v| ["--format-version".to_string(), v.to_string()])
                    .into_iter()
                    .flatten(),
            )
            .arg("--api")
            .arg(&self.url)
            .arg("--token-file")
            .arg(&self.token_file)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("spawn tessera node run");
        node.child = Some(child);
    }

    /// What node `i` logged so far.
    pub fn node_log(&self, i: usize) -> String {
        std::fs::read_to_string(self.nodes[i].dir.join("node.log")).unwrap_or_default()
    }

    /// Stops node `i` and starts it again claiming to run on `host` (a
    /// node on another host is reached over TCP, never a local session).
    pub fn restart_node_on_host(&mut self, i: usize, host: &str) {
        self.stop_node(i);
        self.nodes[i].host = host.to_string();
        self.start_node(i);
    }

    /// `kill -9` node `i` and reap it.
    pub fn kill_node(&mut self, i: usize) {
        if let Some(mut c) = self.nodes[i].child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Stops node `i` with SIGTERM (clean shutdown) and reaps it.
    pub fn stop_node(&mut self, i: usize) {
        if let Some(mut c) = self.nodes[i].child.take() {
            // SAFETY: kill(2) on the pid of our own unreaped child.
            unsafe {
                libc::kill(c.id() as libc::pid_t, libc::SIGTERM);
            }
            let _ = c.wait();
        }
    }

    /// Waits until at least `n` nodes are up in the zone.
    pub async fn wait_nodes_up(&mut self, n: usize) {
        let start = Instant::now();
        loop {
            let mut rebind = Vec::new();
            for node in &mut self.nodes {
                if let Some(c) = node.child.as_mut() {
                    if let Ok(Some(status)) = c.try_wait() {
                        let log =
                            std::fs::read_to_string(node.dir.join("node.log")).unwrap_or_default();
                        // The port `free_port` found was taken by another
                        // process before the node bound it (tests run side
                        // by side): the node starts again on another one.
                        let taken =
                            format!("cannot listen on {}: Address already in use", node.listen);
                        if log.contains(&taken) {
                            node.child = None;
                            node.listen = free_port();
                            rebind.push(node.index);
                            continue;
                        }
                        panic!("node {} exited ({status}):\n{log}", node.index);
                    }
                }
            }
            for i in rebind {
                self.start_node(i);
            }
            // A node killed a moment ago may still count as up in the zone
            // until its liveness expires: also wait for every running node
            // to accept connections.
            let listening = self
                .nodes
                .iter()
                .filter(|t| t.child.is_some())
                .all(|t| std::net::TcpStream::connect(t.listen).is_ok());
            if listening {
                if let Ok(nodes) = self.api.nodes().await {
                    if nodes.iter().filter(|s| s.state == NodeState::Up).count() >= n {
                        return;
                    }
                }
            }
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "nodes did not come up"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Creates a datastore over every disk with `mirrors` copies.
    pub async fn datastore(&self, name: &str, mirrors: u32) {
        self.api
            .create_datastore(&CreateDatastore {
                name: name.into(),
                mirrors,
                stripes: None,
                disks: None,
            })
            .await
            .expect("create datastore");
    }

    /// Creates a vDisk.
    pub async fn vdisk(&self, datastore: &str, name: &str, size: u64) -> Vdisk {
        self.api
            .create_vdisk(&CreateVdisk {
                datastore: datastore.into(),
                name: name.into(),
                size,
            })
            .await
            .expect("create vdisk")
            .vdisk
    }

    /// Opens a vDisk as a volume client on the test host.
    pub async fn open(&self, datastore: &str, name: &str) -> Volume {
        Volume::open(self.volume_config(datastore, name))
            .await
            .expect("open volume")
    }

    pub fn volume_config(&self, datastore: &str, name: &str) -> VolumeConfig {
        let mut c = VolumeConfig::new(self.api.clone(), datastore, name, TEST_HOST);
        c.io_timeout = Duration::from_secs(5);
        c
    }

    /// Starts `tessera vhost serve DS/NAME` (the zone's [`TestZone::bin`])
    /// as a child process and waits until its socket accepts connections.
    pub fn spawn_vhost(&self, datastore: &str, name: &str, queues: u16) -> VhostProcess {
        let socket = self.dir.path().join(format!(
            "vhost-{datastore}-{name}-{}.sock",
            uuid::Uuid::new_v4().simple()
        ));
        let log = self
            .dir
            .path()
            .join(format!("vhost-{datastore}-{name}.log"));
        VhostProcess::spawn(
            self,
            &format!("{datastore}/{name}"),
            socket,
            log,
            queues,
            &[],
        )
    }

    /// The index of the node holding `disk`.
    pub async fn node_of_disk(&self, disk: &uuid::Uuid) -> usize {
        let disks = self.api.disks().await.expect("disks");
        let nodes = self.api.nodes().await.expect("nodes");
        let d = disks.iter().find(|d| d.uuid == *disk).expect("disk known");
        let n = nodes
            .iter()
            .find(|n| n.node.uuid == d.node)
            .expect("node known");
        self.nodes
            .iter()
            .position(|t| t.listen.to_string() == n.node.addr)
            .expect("test node with that address")
    }
}

impl Drop for TestZone {
    fn drop(&mut self) {
        for i in 0..self.nodes.len() {
            self.kill_node(i);
        }
        if let Some(s) = self.server.take() {
            // The runtime may be gone already; the server task dies with it.
            drop(s);
        }
    }
}

/// A `tessera vhost serve` child process, killed on drop.
pub struct VhostProcess {
    pub socket: PathBuf,
    pub log: PathBuf,
    child: Option<Child>,
}

impl VhostProcess {
    /// Starts `tessera vhost serve PATH` with the zone's executable
    /// ([`TestZone::bin`]), its API and token, and waits for its socket.
    pub fn spawn(
        zone: &TestZone,
        path: &str,
        socket: PathBuf,
        log: PathBuf,
        queues: u16,
        extra: &[&str],
    ) -> VhostProcess {
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .expect("vhost log");
        let child = Command::new(&zone.bin)
            .args(["vhost", "serve", path, "--socket"])
            .arg(&socket)
            .args(["--queues", &queues.to_string(), "--host", TEST_HOST])
            .arg("--api")
            .arg(&zone.url)
            .arg("--token-file")
            .arg(&zone.token_file)
            .args(extra)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(out.try_clone().expect("log"))
            .stderr(out)
            .spawn()
            .expect("spawn tessera vhost serve");
        let mut p = VhostProcess {
            socket,
            log,
            child: Some(child),
        };
        p.wait_listening();
        p
    }

    fn wait_listening(&mut self) {
        let start = Instant::now();
        loop {
            // The socket file appears when it is bound and listening.
            if self.socket.exists() {
                return;
            }
            if let Some(c) = self.child.as_mut() {
                if let Ok(Some(status)) = c.try_wait() {
                    panic!("vhost serve exited ({status}):\n{}", self.log_text());
                }
            }
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "vhost socket did not appear:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// Stops it with SIGTERM (a clean exit releases the lease); returns whether it exited 0.
    pub fn stop(&mut self) -> bool {
        let Some(mut c) = self.child.take() else {
            return false;
        };
        // SAFETY: kill(2) on the pid of our own unreaped child.
        unsafe {
            libc::kill(c.id() as libc::pid_t, libc::SIGTERM);
        }
        c.wait().map(|s| s.success()).unwrap_or(false)
    }

    /// `kill -9`.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for VhostProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A deterministic, position-dependent byte pattern: byte `i` of a write at
/// `offset` with `seed`.
pub fn pattern(seed: u64, offset: u64, len: usize) -> Vec<u8> {
    (0..len as u64)
        .map(|i| {
            let x = (offset + i)
                .wrapping_mul(0x9E37_79B9_7F4A_7C15)
                .wrapping_add(seed.wrapping_mul(0xD6E8_FEB8_6659_FD93));
            (x >> 56) as u8 ^ (x >> 17) as u8
        })
        .collect()
}

/// A raw storage-protocol session with one node (tests that act as a
/// client the volume library would never be: a stale writer, an observer).
pub mod raw {
    use tessera_proto::{
        read_frame, ChunkRange, FenceReply, Hello, HelloReply, Request, Status, VdiskRef,
    };
    use tokio::io::AsyncWriteExt;
    use tokio::net::TcpStream;
    use uuid::Uuid;

    /// The largest wire epoch a writer of zone epoch `epoch` uses (its
    /// fence generations go below it): fencing with it fences that writer's
    /// requests out no more than its own newest would, and the next writer's
    /// epoch is above it.
    pub fn last_wire_epoch(epoch: u64) -> u64 {
        (epoch << 24) | 0xff_ffff
    }

    pub struct Raw {
        s: TcpStream,
        id: u64,
        pub version: u16,
    }

    impl Raw {
        /// Connects and says hello offering versions up to `max_version`.
        pub async fn connect(addr: &str, max_version: u16) -> Raw {
            let s = TcpStream::connect(addr).await.expect("connect");
            let mut raw = Raw {
                s,
                id: 0,
                version: 0,
            };
            let (status, body) = raw
                .call(Request::Hello(Hello {
                    min_version: 1,
                    max_version,
                    client: [9; 16],
                }))
                .await;
            assert_eq!(status, Status::Ok);
            raw.version = HelloReply::decode(&body).expect("hello reply").version;
            raw
        }

        pub async fn call(&mut self, req: Request<'_>) -> (Status, Vec<u8>) {
            self.id += 1;
            let mut head = Vec::new();
            let payload = req.encode_head(self.id, &mut head);
            self.s.write_all(&head).await.expect("send");
            self.s.write_all(payload).await.expect("send");
            let frame = read_frame(&mut self.s)
                .await
                .expect("read")
                .expect("a reply");
            (frame.header.status(), frame.body.to_vec())
        }

        /// Fences `vdisk` on `disk` at `epoch`; the node's answer.
        pub async fn fence(&mut self, vdisk: Uuid, disk: Uuid, epoch: u64) -> FenceReply {
            let (status, body) = self
                .call(Request::Fence(VdiskRef {
                    vdisk: *vdisk.as_bytes(),
                    disk: *disk.as_bytes(),
                    epoch,
                }))
                .await;
            assert_eq!(status, Status::Ok, "{}", String::from_utf8_lossy(&body));
            FenceReply::decode(&body).expect("fence reply")
        }

        /// Clears `vdisk`'s marks of `extents` (none: all) up to `epoch`,
        /// as a writer at `epoch` on `disk`; the node's status.
        pub async fn unmark(
            &mut self,
            vdisk: Uuid,
            disk: Uuid,
            epoch: u64,
            extents: &[u64],
        ) -> Status {
            let list = tessera_proto::UnmarkRef::encode_extents(extents);
            let u = tessera_proto::UnmarkRef {
                vref: VdiskRef {
                    vdisk: *vdisk.as_bytes(),
                    disk: *disk.as_bytes(),
                    epoch,
                },
                count: extents.len() as u32,
                upto: epoch,
            };
            self.call(Request::Unmark(u, &list)).await.0
        }

        /// Writes `data` at `offset` of `chunk` on `disk` at `epoch`.
        pub async fn write(
            &mut self,
            vdisk: Uuid,
            disk: Uuid,
            chunk: u64,
            offset: u32,
            data: &[u8],
            epoch: u64,
        ) -> Status {
            let r = ChunkRange {
                vdisk: *vdisk.as_bytes(),
                disk: *disk.as_bytes(),
                chunk,
                offset,
                len: data.len() as u32,
                epoch,
            };
            self.call(Request::Write(r, data)).await.0
        }
    }
}
