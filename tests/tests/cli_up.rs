//! The README's run command: `tessera up` brings up a zone, and the CLI
//! creates a datastore and a vDisk on it.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use tessera_tests::{free_port, tessera_bin};

fn tessera(home: &std::path::Path, args: &[&str]) -> std::process::Output {
    Command::new(tessera_bin())
        .args(args)
        .env("TESSERA_HOME", home)
        .env_remove("TESSERA_API")
        .env_remove("TESSERA_TOKEN_FILE")
        .output()
        .expect("run tessera")
}

#[test]
fn up_then_cli_creates_datastore_and_vdisk() {
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path().join("home");
    let zone_dir = dir.path().join("zone");
    let api = free_port();
    let mut up = Command::new(tessera_bin())
        .args(["up", "--nodes", "3", "--disk-size", "256M", "--dir"])
        .arg(&zone_dir)
        .arg("--api")
        .arg(api.to_string())
        .env("TESSERA_HOME", &home)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("tessera up");

    // Ready when three nodes are listed as up.
    let start = Instant::now();
    loop {
        let out = tessera(&home, &["node", "list", "--json"]);
        if out.status.success() {
            let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
            let up_nodes = v
                .as_array()
                .unwrap()
                .iter()
                .filter(|n| n["state"] == "up")
                .count();
            if up_nodes == 3 {
                break;
            }
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "zone did not come up"
        );
        assert!(up.try_wait().unwrap().is_none(), "tessera up exited");
        std::thread::sleep(Duration::from_millis(200));
    }
    // It serves its demo vDisk: online on this host, over a vhost-user socket.
    let start = Instant::now();
    loop {
        let out = tessera(&home, &["vdisk", "show", "local/demo", "--json"]);
        if out.status.success() {
            let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
            if v["state"] == "online" && zone_dir.join("local-demo.sock").exists() {
                assert_eq!(v["health"], "healthy");
                break;
            }
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "demo vDisk not served"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let token = zone_dir.join("api-token");
    let mode = std::fs::metadata(&token).unwrap();
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        mode.permissions().mode() & 0o777,
        0o600,
        "token file is 0600"
    );

    let out = tessera(&home, &["datastore", "create", "ds1", "--mirrors", "2"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = tessera(&home, &["vdisk", "create", "ds1/vm1", "--size", "1G"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = tessera(&home, &["vdisk", "show", "ds1/vm1", "--json"]);
    assert!(out.status.success());
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["size"], 1u64 << 30);
    assert_eq!(v["name"], "vm1");
    assert_eq!(v["datastore"], "ds1");
    assert_eq!(v["state"], "offline");
    assert_eq!(v["placement"]["groups"][0].as_array().unwrap().len(), 2);

    // Tables by default.
    let out = tessera(&home, &["vdisk", "list"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("ds1/vm1") && text.contains("1.0 GiB"),
        "{text}"
    );

    // The explicit flags reach the same zone.
    let out = Command::new(tessera_bin())
        .args(["--api", &format!("http://{api}"), "--token-file"])
        .arg(&token)
        .args(["datastore", "list", "--json"])
        .output()
        .unwrap();
    assert!(out.status.success());

    // Errors are one line on stderr and a non-zero exit.
    for bad in [
        vec!["datastore", "create", "big", "--mirrors", "5"],
        vec!["vdisk", "create", "nope/v", "--size", "1G"],
        vec!["vdisk", "create", "ds1/v2", "--size", "1X"],
        vec!["vdisk", "show", "ds1/missing"],
        vec!["vdisk", "create", "ds1/vm1", "--size", "1G"],
    ] {
        let out = tessera(&home, &bad);
        assert!(!out.status.success(), "{bad:?} succeeded");
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(err.trim().lines().count(), 1, "{bad:?}: {err}");
        assert!(err.starts_with("error: "), "{err}");
    }

    // Draining a disk moves its copy (the repair worker fills the new one:
    // nobody has vm1 open), and the vDisk is healthy on the other disks.
    let group: Vec<String> = v["placement"]["groups"][0]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d.as_str().unwrap().to_string())
        .collect();
    let out = tessera(&home, &["datastore", "remove-disk", "ds1", &group[0]]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let start = Instant::now();
    loop {
        let out = tessera(&home, &["vdisk", "show", "ds1/vm1", "--json"]);
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let now: Vec<&str> = v["placement"]["groups"][0]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| d.as_str().unwrap())
            .collect();
        if v["health"] == "healthy"
            && v["placement"]["moves"].as_array().unwrap().is_empty()
            && !now.contains(&group[0].as_str())
        {
            assert_eq!(now.len(), 2);
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(90),
            "drain did not finish: {v}"
        );
        std::thread::sleep(Duration::from_millis(250));
    }
    let out = tessera(&home, &["repair", "status"]);
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("every copy of every vDisk is current"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let out = tessera(&home, &["datastore", "add-disk", "ds1", &group[0]]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // An up node is not removed without --force.
    let out = tessera(&home, &["node", "list", "--json"]);
    let nodes: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let some_node = nodes[0]["uuid"].as_str().unwrap().to_string();
    let out = tessera(&home, &["node", "remove", &some_node]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(err.contains("is up"), "{err}");

    // SIGTERM stops the zone and its nodes.
    // SAFETY: kill(2) on our own child.
    unsafe {
        libc::kill(up.id() as libc::pid_t, libc::SIGTERM);
    }
    let start = Instant::now();
    let status = loop {
        if let Some(s) = up.try_wait().unwrap() {
            break s;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "tessera up did not stop"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(status.success(), "tessera up exit status {status}");
    // Its nodes are gone: their ports no longer accept connections.
    for i in 0..3 {
        let listen = std::fs::read_to_string(zone_dir.join(format!("node{i}/listen"))).unwrap();
        assert!(
            std::net::TcpStream::connect(listen.trim()).is_err(),
            "node {i} still running"
        );
    }
}
