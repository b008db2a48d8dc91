//! Proves the guest kit (`tessera_tests::guest`) against the reference
//! vhost-user-blk server, `qemu-storage-daemon`: a real Linux guest under
//! QEMU TCG sees the disk, does direct I/O and a filesystem on it, and the
//! bytes land in the backing file.
//!
//! Needs qemu-system-x86, qemu-storage-daemon, a Debian kernel and
//! busybox-static: `scripts/install-test-deps.sh`. Missing ones fail the
//! test (never skip).

use std::io::{Read, Seek, SeekFrom};
use std::path::Path;
use std::time::Duration;

use tessera_tests::guest::{
    find_binary, CpioWriter, Guest, GuestConfig, GuestKit, GuestOutcome, QemuStorageDaemon,
    VhostDisk,
};

const DISK_SIZE: u64 = 64 << 20;
/// Where the guest writes the pattern the host checks (the filesystem only
/// covers the first 32 MiB).
const PATTERN_OFFSET: u64 = 40 << 20;
const PATTERN_LEN: usize = 1 << 20;

fn kit() -> &'static GuestKit {
    match GuestKit::get() {
        Ok(k) => k,
        Err(e) => panic!("{e:#}"),
    }
}

/// The pattern the guest's awk writes: 64-byte records, 64 per 4 KiB block.
fn pattern(seed: u64) -> Vec<u8> {
    let mut v = Vec::with_capacity(PATTERN_LEN);
    for block in 0..256 {
        for rec in 0..64 {
            let r = format!("TESSERA-PATTERN seed={seed} block={block:06} rec={rec:02}");
            v.extend_from_slice(format!("{r:<63}\n").as_bytes());
        }
    }
    assert_eq!(v.len(), PATTERN_LEN);
    v
}

fn read_at(file: &Path, offset: u64, len: usize) -> Vec<u8> {
    let mut f = std::fs::File::open(file).expect("open image");
    f.seek(SeekFrom::Start(offset)).expect("seek");
    let mut buf = vec![0; len];
    f.read_exact(&mut buf).expect("read image");
    buf
}

#[test]
fn reference_backend_roundtrip() {
    let kit = kit();
    let dir = tempfile::tempdir().expect("temp dir");
    let image = dir.path().join("disk.raw");
    std::fs::File::create(&image)
        .and_then(|f| f.set_len(DISK_SIZE))
        .expect("create image");
    let socket = dir.path().join("vhost.sock");
    let qsd = QemuStorageDaemon::start(&image, &socket, 2).unwrap_or_else(|e| panic!("{e:#}"));

    let seed: u64 = rand::random::<u32>() as u64;
    let script = format!(
        r#"
echo "SIZE-SECTORS $(cat /sys/block/vda/size)"
echo "QUEUES $(ls /sys/block/vda/mq/ | wc -l)"

# 1 MiB of random data at offset 0 in 4 KiB O_DIRECT requests, read back, compared.
dd if=/dev/urandom of=/tmp/p bs=4096 count=256 2>/dev/null
tessera_dd write-4k-direct if=/tmp/p of=/dev/vda bs=4096 count=256 oflag=direct
tessera_dd read-4k-direct if=/dev/vda of=/tmp/r bs=4096 count=256 iflag=direct
cmp /tmp/p /tmp/r
echo "RANDOM-MD5 $(md5sum < /tmp/p | cut -d' ' -f1)"

# A pattern the host regenerates, at 40 MiB.
awk -v seed={seed} 'BEGIN {{ for (b = 0; b < 256; b++) for (r = 0; r < 64; r++)
    printf("%-63s\n", sprintf("TESSERA-PATTERN seed=%s block=%06d rec=%02d", seed, b, r)) }}' > /tmp/q
[ "$(wc -c < /tmp/q)" -eq {PATTERN_LEN} ]
dd if=/tmp/q of=/dev/vda bs=4096 seek=$(({PATTERN_OFFSET} / 4096)) count=256 oflag=direct 2>/dev/null

# Sequential throughput, 1 MiB requests, 16 MiB at 48 MiB.
tessera_dd write-1m-direct if=/dev/zero of=/dev/vda bs=1M seek=48 count=16 oflag=direct
tessera_dd read-1m-direct if=/dev/vda of=/dev/null bs=1M skip=48 count=16 iflag=direct

# A filesystem over the first 32 MiB.
mkfs.ext2 -b 1024 /dev/vda 32768 >/dev/null
mount -t ext2 /dev/vda /mnt
echo "TESSERA-FILE seed={seed}" > /mnt/hello.txt
sync
umount /mnt
mount -t ext2 -o ro /dev/vda /mnt
echo "READBACK $(cat /mnt/hello.txt)"
umount /mnt
echo DONE
"#
    );
    let outcome = Guest::boot(
        kit,
        GuestConfig {
            disks: vec![VhostDisk::new(&socket, 2)],
            script,
            timeout: Duration::from_secs(90),
            ..GuestConfig::default()
        },
    )
    .unwrap_or_else(|e| panic!("{e:#}"));
    outcome.expect_success();
    drop(qsd);

    assert_eq!(
        outcome.value_of("SIZE-SECTORS "),
        Some((DISK_SIZE / 512).to_string().as_str())
    );
    assert_eq!(outcome.value_of("QUEUES "), Some("2"));
    assert_eq!(
        outcome.value_of("READBACK "),
        Some(format!("TESSERA-FILE seed={seed}").as_str())
    );
    assert!(outcome.value_of("DONE").is_some());

    // The bytes reached the backing file.
    assert!(
        read_at(&image, PATTERN_OFFSET, PATTERN_LEN) == pattern(seed),
        "the pattern at 40 MiB is not in the backing file"
    );
    let sb = read_at(&image, 1024, 1024);
    assert_eq!(&sb[56..58], &[0x53, 0xEF], "no ext2 superblock in the file");
    let fs = read_at(&image, 0, 32 << 20);
    let token = format!("TESSERA-FILE seed={seed}\n");
    assert!(
        fs.windows(token.len()).any(|w| w == token.as_bytes()),
        "the file written in the guest is not in the backing file"
    );

    let dd = outcome.dd_results();
    let labels: Vec<&str> = dd.iter().map(|d| d.label.as_str()).collect();
    assert_eq!(
        labels,
        [
            "write-4k-direct",
            "read-4k-direct",
            "write-1m-direct",
            "read-1m-direct"
        ]
    );
    println!(
        "guest boot {:?}, whole run {:?}, kernel {}, modules {:?}",
        outcome.boot_time, outcome.elapsed, kit.kernel_version, kit.modules
    );
    for d in &dd {
        assert!(d.bytes > 0, "{d:?}");
        println!(
            "qemu-storage-daemon {:<16} {:>9} bytes in {:>8} us = {:>8.2} MiB/s",
            d.label,
            d.bytes,
            d.usec,
            d.mib_per_s()
        );
    }
}

/// A test can talk to the running guest through its console, and kill QEMU
/// mid-run; QEMU is reaped.
#[test]
fn console_handshake_and_kill() {
    let kit = kit();
    let mut guest = Guest::spawn(
        kit,
        GuestConfig {
            script: "echo READY; read -r word; echo \"GOT-$word\"; sleep 600".into(),
            timeout: Duration::from_secs(90),
            ..GuestConfig::default()
        },
    )
    .unwrap_or_else(|e| panic!("{e:#}"));
    let pid = guest.pid();
    guest
        .wait_for("READY", Duration::from_secs(60))
        .unwrap_or_else(|e| panic!("{e:#}"));
    guest.send_line("hello").expect("send to the console");
    let line = guest
        .wait_for("GOT-", Duration::from_secs(30))
        .unwrap_or_else(|e| panic!("{e:#}"));
    assert_eq!(line, "GOT-hello");
    assert!(guest.is_running());
    guest.kill();
    assert!(!guest.is_running());
    let outcome = guest.wait_outcome();
    assert!(outcome.killed && !outcome.timed_out, "{outcome:?}");
    assert_eq!(outcome.exit, None);
    assert!(outcome.boot_time.is_some());
    assert_reaped(pid);
}

/// QEMU is killed at the timeout, even in the middle of the boot.
#[test]
fn timeout_kills_qemu() {
    let kit = kit();
    let guest = Guest::spawn(
        kit,
        GuestConfig {
            script: "sleep 600".into(),
            timeout: Duration::from_secs(2),
            ..GuestConfig::default()
        },
    )
    .unwrap_or_else(|e| panic!("{e:#}"));
    let pid = guest.pid();
    let outcome = guest.wait_outcome();
    assert!(outcome.timed_out, "{outcome:?}");
    assert_eq!(outcome.exit, None);
    assert!(outcome.elapsed < Duration::from_secs(10), "{outcome:?}");
    assert_reaped(pid);

    // Dropping a running guest kills and reaps it too.
    let guest = Guest::spawn(
        kit,
        GuestConfig {
            script: "sleep 600".into(),
            ..GuestConfig::default()
        },
    )
    .unwrap_or_else(|e| panic!("{e:#}"));
    let pid = guest.pid();
    drop(guest);
    assert_reaped(pid);
}

fn assert_reaped(pid: u32) {
    // Reaped means no /proc entry (not even a zombie). The pid could in
    // theory be reused by then, but not by a QEMU of ours.
    let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
    assert!(
        !comm.starts_with("qemu-system"),
        "QEMU {pid} is still there ({comm:?})"
    );
}

#[test]
fn outcome_parsing() {
    let o = GuestOutcome::from_console(
        "[    1.0] booting\r\nSIZE 42\r\n[   2.0] x: y TESSERA-DD w bytes=1048576 usec=500000 MiBps=2.00\r\nTESSERA-GUEST-EXIT 3\r\n",
    );
    assert_eq!(o.exit, Some(3));
    assert!(!o.succeeded());
    assert_eq!(o.value_of("SIZE "), Some("42"));
    assert_eq!(o.lines_with("SIZE"), ["SIZE 42"]);
    let dd = o.dd_results();
    assert_eq!(dd.len(), 1);
    assert_eq!(dd[0].label, "w");
    assert!((dd[0].mib_per_s() - 2.0).abs() < 1e-9);
    assert_eq!(GuestOutcome::from_console("no marker").exit, None);
}

#[test]
fn cpio_newc_layout() {
    let mut c = CpioWriter::new();
    c.dir("bin");
    c.file("bin/x", 0o755, b"hello");
    c.symlink("bin/y", "/bin/x");
    let a = c.finish();
    assert_eq!(a.len() % 512, 0);
    assert!(a.starts_with(b"070701"));
    // Every header starts 4-byte aligned: walk them.
    let mut off = 0;
    let mut names = Vec::new();
    loop {
        let h = &a[off..off + 110];
        assert_eq!(&h[..6], b"070701");
        let field = |i: usize| {
            u32::from_str_radix(std::str::from_utf8(&h[6 + i * 8..14 + i * 8]).unwrap(), 16)
                .unwrap() as usize
        };
        let (filesize, namesize) = (field(6), field(11));
        let name = std::str::from_utf8(&a[off + 110..off + 110 + namesize - 1]).unwrap();
        names.push(name.to_owned());
        let data = (off + 110 + namesize).next_multiple_of(4);
        off = (data + filesize).next_multiple_of(4);
        if name == "TRAILER!!!" {
            break;
        }
    }
    assert_eq!(names, ["bin", "bin/x", "bin/y", "TRAILER!!!"]);
}

#[test]
fn initramfs_is_cached_by_script() {
    let kit = kit();
    let a = kit.initramfs("echo one").expect("initramfs");
    let b = kit.initramfs("echo one").expect("initramfs");
    let c = kit.initramfs("echo two").expect("initramfs");
    assert_eq!(a, b);
    assert_ne!(a, c);
    assert!(a.starts_with(&kit.dir));
    let bytes = std::fs::read(&a).expect("read initramfs");
    assert!(bytes.windows(8).any(|w| w == b"echo one"));
    assert!(bytes.windows(4).any(|w| w == b"init"));
    assert!(kit.modules.iter().any(|m| m == "virtio_blk"));
}

#[test]
fn missing_binary_names_the_install_script() {
    let e = find_binary("tessera-no-such-binary").unwrap_err();
    assert!(
        format!("{e:#}").contains("scripts/install-test-deps.sh"),
        "{e:#}"
    );
}
