//! Real guests on Tessera vDisks: a Linux guest under QEMU (TCG) with the
//! vDisk attached as vhost-user-blk-pci, served by `tessera vhost serve`.

use std::time::Duration;

use tessera_tests::guest::{Guest, GuestConfig, GuestKit, VhostDisk};
use tessera_tests::TestZone;

const MIB: u64 = 1 << 20;

/// What `yes TESSERA-PATTERN | head -c N` writes.
fn yes_pattern(word: &str, len: usize) -> Vec<u8> {
    let line = format!("{word}\n");
    line.as_bytes().iter().copied().cycle().take(len).collect()
}

fn kit() -> &'static GuestKit {
    GuestKit::get().expect("guest kit (run scripts/install-test-deps.sh)")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guest_sees_the_vdisk_and_its_writes_reach_every_copy() {
    let zone = TestZone::start(3, 256 * MIB).await;
    zone.datastore("ds", 2).await;
    let size = 64 * MIB;
    zone.vdisk("ds", "v", size).await;
    let mut vhost = zone.spawn_vhost("ds", "v", 2);
    let socket = vhost.socket.clone();
    let outcome = tokio::task::spawn_blocking(move || {
        Guest::boot(
            kit(),
            GuestConfig {
                disks: vec![VhostDisk::new(&socket, 2)],
                script: r#"
echo "SIZE $(cat /sys/block/vda/size)"
echo "QUEUES $(ls /sys/block/vda/mq | wc -l)"
echo "SERIAL $(cat /sys/block/vda/serial 2>/dev/null || echo none)"
echo "LBS $(cat /sys/block/vda/queue/logical_block_size)"
echo "PBS $(cat /sys/block/vda/queue/physical_block_size)"
yes TESSERA-PATTERN | head -c 1048576 > /tmp/p
dd if=/tmp/p of=/dev/vda bs=4096 seek=8192 oflag=direct
dd if=/dev/vda of=/tmp/r bs=4096 skip=8192 count=256 iflag=direct
cmp /tmp/p /tmp/r
echo PATTERN-OK
mkfs.ext2 -q /dev/vda 16384 || mkfs.ext2 /dev/vda 16384
mkdir -p /mnt
mount -t ext2 /dev/vda /mnt || mount -t ext4 /dev/vda /mnt
yes TESSERA-FILE | head -c 300000 > /mnt/file
mkdir /mnt/dir && echo hello > /mnt/dir/hello
sync
umount /mnt
mount -t ext2 /dev/vda /mnt || mount -t ext4 /dev/vda /mnt
cmp /mnt/file /tmp/p && exit 9
[ "$(cat /mnt/dir/hello)" = hello ]
[ "$(wc -c < /mnt/file)" = 300000 ]
umount /mnt
sync
echo FS-OK
"#
                .into(),
                timeout: Duration::from_secs(180),
                ..GuestConfig::default()
            },
        )
        .expect("QEMU starts")
    })
    .await
    .unwrap();
    outcome.expect_success();
    assert_eq!(outcome.value_of("SIZE "), Some(&*(size / 512).to_string()));
    assert_eq!(outcome.value_of("QUEUES "), Some("2"));
    assert_eq!(outcome.value_of("LBS "), Some("512"));
    assert_eq!(outcome.value_of("PBS "), Some("4096"));
    assert!(outcome.console.contains("PATTERN-OK"));
    assert!(outcome.console.contains("FS-OK"));
    assert!(
        !outcome.console.contains("I/O error"),
        "{}",
        outcome.console
    );

    assert!(vhost.stop(), "vhost serve exits 0:\n{}", vhost.log_text());
    // The same bytes through the volume client and on every copy.
    let vol = zone.open("ds", "v").await;
    let want = yes_pattern("TESSERA-PATTERN", MIB as usize);
    let mut first = vec![0u8; 16 * MIB as usize];
    vol.read_copy(0, &mut first, 0).await.unwrap();
    assert_eq!(
        &first[1024 + 56..1024 + 58],
        &[0x53, 0xEF],
        "ext2 magic on copy 0"
    );
    for copy in 0..2 {
        let mut buf = vec![0u8; MIB as usize];
        vol.read_copy(32 * MIB, &mut buf, copy).await.unwrap();
        assert!(buf == want, "copy {copy} lacks the guest's pattern");
        let mut fs = vec![0u8; 16 * MIB as usize];
        vol.read_copy(0, &mut fs, copy).await.unwrap();
        assert!(fs == first, "copy {copy} of the filesystem differs");
    }
    let mut buf = vec![0u8; MIB as usize];
    vol.read(32 * MIB, &mut buf).await.unwrap();
    assert!(buf == want);
    vol.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_qemu_sees_the_first_guests_data() {
    let zone = TestZone::start(2, 128 * MIB).await;
    zone.datastore("ds", 2).await;
    zone.vdisk("ds", "v", 32 * MIB).await;
    let mut vhost = zone.spawn_vhost("ds", "v", 1);
    let socket = vhost.socket.clone();
    let (first, second) = tokio::task::spawn_blocking(move || {
        let boot = |script: &str| {
            Guest::boot(
                kit(),
                GuestConfig {
                    disks: vec![VhostDisk::new(&socket, 1)],
                    script: script.into(),
                    timeout: Duration::from_secs(120),
                    ..GuestConfig::default()
                },
            )
            .expect("QEMU starts")
        };
        // The first QEMU is killed (SIGKILL) once its write is done.
        let mut first = Guest::spawn(
            kit(),
            GuestConfig {
                disks: vec![VhostDisk::new(&socket, 1)],
                script: "yes FIRST-GUEST | head -c 2097152 > /dev/vda; sync; echo WRITTEN; sleep 600".into(),
                timeout: Duration::from_secs(120),
                ..GuestConfig::default()
            },
        )
        .expect("QEMU starts");
        first
            .wait_for("WRITTEN", Duration::from_secs(100))
            .expect("the first guest wrote");
        first.kill();
        let first = first.wait_outcome();
        let second = boot(
            "yes FIRST-GUEST | head -c 2097152 > /tmp/want; dd if=/dev/vda of=/tmp/got bs=65536 count=32 iflag=direct; cmp /tmp/want /tmp/got; echo SAME",
        );
        (first, second)
    })
    .await
    .unwrap();
    assert!(first.killed, "the first QEMU was killed");
    second.expect_success();
    assert!(second.console.contains("SAME"));
    // The same backend process served both.
    assert!(
        vhost.log_text().matches("front-end connected").count() >= 2,
        "{}",
        vhost.log_text()
    );
    assert!(vhost.stop());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_storage_node_killed_while_the_guest_writes_causes_no_guest_error() {
    let mut zone = TestZone::start(3, 256 * MIB).await;
    zone.datastore("ds", 2).await;
    let vdisk = zone.vdisk("ds", "v", 64 * MIB).await;
    let victim = zone.node_of_disk(&vdisk.placement.groups[0][0]).await;
    let vhost = zone.spawn_vhost("ds", "v", 2);
    let guest = Guest::spawn(
        kit(),
        GuestConfig {
            disks: vec![VhostDisk::new(&vhost.socket, 2)],
            script: r#"
yes TESSERA-KILL | head -c 33554432 > /tmp/p
dd if=/tmp/p of=/dev/vda bs=65536 count=64 oflag=direct
echo STARTED
dd if=/tmp/p of=/dev/vda bs=65536 skip=64 seek=64 oflag=direct
sync
dd if=/dev/vda of=/tmp/r bs=65536 count=512 iflag=direct
cmp /tmp/p /tmp/r
echo ALL-WRITTEN
"#
            .into(),
            timeout: Duration::from_secs(300),
            ..GuestConfig::default()
        },
    )
    .expect("QEMU starts");
    let started =
        tokio::task::block_in_place(|| guest.wait_for("STARTED", Duration::from_secs(120)));
    started.expect("guest started writing");
    zone.kill_node(victim);
    let outcome = tokio::task::spawn_blocking(move || guest.wait_outcome())
        .await
        .unwrap();
    outcome.expect_success();
    assert!(outcome.console.contains("ALL-WRITTEN"));
    assert!(
        !outcome.console.contains("I/O error"),
        "{}",
        outcome.console
    );
    drop(vhost);

    let shown = zone.api.vdisk("ds", "v").await.unwrap();
    assert!(shown.vdisk.stale.contains(&vdisk.placement.groups[0][0]));
    let mut cfg = zone.volume_config("ds", "v");
    cfg.force = true; // the backend was killed without releasing its lease
    let vol = tessera_replicator::Volume::open(cfg).await.unwrap();
    let mut buf = vec![0u8; 32 * MIB as usize];
    vol.read(0, &mut buf).await.unwrap();
    assert!(
        buf == yes_pattern("TESSERA-KILL", 32 * MIB as usize),
        "what the guest wrote reads back"
    );
    vol.close().await.unwrap();
}
