//! The guest kit: boot a tiny Linux guest under QEMU (TCG) with vhost-user-blk
//! disks attached, run a shell script inside it and read what it printed.
//!
//! ```no_run
//! use std::time::Duration;
//! use tessera_guest_kit::{Guest, GuestConfig, GuestKit, VhostDisk};
//!
//! let kit = GuestKit::get().expect("guest kit");
//! let outcome = Guest::boot(
//!     kit,
//!     GuestConfig {
//!         disks: vec![VhostDisk::new("/tmp/vdisk.sock", 2)],
//!         script: "echo SIZE $(cat /sys/block/vda/size)".into(),
//!         timeout: Duration::from_secs(60),
//!         ..GuestConfig::default()
//!     },
//! )
//! .expect("QEMU starts");
//! outcome.expect_success();
//! assert_eq!(outcome.value_of("SIZE "), Some("131072"));
//! ```
//!
//! Pieces:
//! - [`GuestKit`]: the host's Debian kernel, the virtio and ext4 modules it
//!   needs, and busybox-static, packed once into a cached newc archive under
//!   `$TMPDIR/tessera-guest-kit-<kernel version>/` (shared by test processes).
//! - [`GuestKit::initramfs`]: that archive plus one script. Its `/init` mounts
//!   proc/sys/devtmpfs, loads the modules, waits (bounded) for the attached
//!   virtio disks, runs the script with `sh -e` (after sourcing
//!   `/tessera/lib.sh`, see [`GUEST_LIB`]), prints `TESSERA-GUEST-EXIT <status>`
//!   and powers off.
//! - [`Guest::boot`] / [`Guest::spawn`]: QEMU with shared memfd memory and one
//!   `vhost-user-blk-pci` per [`VhostDisk`]; the serial console comes out on
//!   QEMU's stdout and is collected. [`RunningGuest`] can wait for console
//!   output, send a line to the guest's console (`read` in the script), and
//!   kill QEMU. QEMU is killed at the timeout and always reaped; it is also
//!   killed if the test process dies (`PR_SET_PDEATHSIG`), and the guest powers
//!   itself off a little after the timeout as a last resort.
//!
//! Nothing here silently skips: a missing binary is an error that names
//! `scripts/install-test-deps.sh`.
//!
//! Environment: `TESSERA_GUEST_ECHO=1` copies every guest console to stderr
//! as it arrives; `TESSERA_GUEST_KERNEL=<version>` picks a kernel from
//! `/lib/modules` (default: the newest one with a `/boot/vmlinuz-*`).

use std::collections::{BTreeSet, HashMap, HashSet};
use std::ffi::OsString;
use std::fmt::Write as _;
use std::hash::{Hash, Hasher};
use std::io::{Read, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::sync::{mpsc, Arc, Condvar, Mutex, MutexGuard, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, ensure, Context, Result};

/// Printed by the guest's `/init` after the script: `TESSERA-GUEST-EXIT <status>`.
pub const EXIT_MARKER: &str = "TESSERA-GUEST-EXIT ";
/// Printed by the guest's `/init` right before the script starts.
pub const SCRIPT_START_MARKER: &str = "TESSERA-GUEST-SCRIPT-START";
/// Printed by the `tessera_dd` helper of [`GUEST_LIB`].
pub const DD_MARKER: &str = "TESSERA-DD ";

const INSTALL_HINT: &str =
    "run scripts/install-test-deps.sh (as root) to install the guest test dependencies";

/// Bumped whenever the archive layout or `/init` changes, so stale caches
/// are rebuilt.
const KIT_FORMAT: u32 = 1;

/// Modules loaded in the guest, in this order (each after its dependencies
/// from `modules.dep`). Built-in or absent ones are skipped; `virtio_pci`,
/// `virtio_blk` and `ext4` must exist (as modules or built in).
const MODULE_ROOTS: &[&str] = &[
    "virtio_ring",
    "virtio",
    "virtio_pci_modern_dev",
    "virtio_pci_legacy_dev",
    "virtio_pci",
    "virtio_blk",
    // ext4 and jbd2 soft-depend on the "crc32c" crypto driver.
    "crc32c_generic",
    "crc16",
    "mbcache",
    "jbd2",
    "ext4",
];
const REQUIRED_MODULES: &[&str] = &["virtio_pci", "virtio_blk", "ext4"];

/// Shell helpers every guest script can use (sourced before it runs):
///
/// - `tessera_now_us`: wall clock in microseconds.
/// - `tessera_dd LABEL DD-ARGS...`: runs `dd DD-ARGS...`, then prints
///   `TESSERA-DD LABEL bytes=<n> usec=<t> MiBps=<rate>` (see
///   [`GuestOutcome::dd_results`]). `bytes` counts full records × `bs`/`obs`.
pub const GUEST_LIB: &str = r#"# Helpers for Tessera guest scripts (tessera_guest_kit::GUEST_LIB).
tessera_now_us() {
    adjtimex | awk '/tv_sec/ {s = $2} /tv_usec/ {u = $2} END {printf "%.0f\n", s * 1000000 + u}'
}

tessera_dd() {
    _tl=$1
    shift
    _tbs=512
    for _ta in "$@"; do
        case "$_ta" in
        bs=* | obs=*) _tbs=${_ta#*=} ;;
        esac
    done
    case "$_tbs" in
    *k | *K) _tbs=$((${_tbs%?} * 1024)) ;;
    *M) _tbs=$((${_tbs%?} * 1048576)) ;;
    *G) _tbs=$((${_tbs%?} * 1073741824)) ;;
    esac
    _tt0=$(tessera_now_us)
    if ! dd "$@" 2>/tmp/.tessera-dd.err; then
        cat /tmp/.tessera-dd.err
        echo "tessera_dd $_tl: dd failed"
        return 1
    fi
    _tt1=$(tessera_now_us)
    _trec=$(sed -n 's/^\([0-9]*\)+[0-9]* records out$/\1/p' /tmp/.tessera-dd.err)
    awk -v l="$_tl" -v r="${_trec:-0}" -v bs="$_tbs" -v t0="$_tt0" -v t1="$_tt1" 'BEGIN {
        b = r * bs; us = t1 - t0; if (us < 1) us = 1;
        printf "TESSERA-DD %s bytes=%.0f usec=%.0f MiBps=%.2f\n", l, b, us, b / us * 1000000 / 1048576
    }'
}
"#;

const INIT_TEMPLATE: &str = r#"#!/bin/sh
# /init of a Tessera test guest (generated by tessera_guest_kit).
export PATH=/sbin:/bin:/usr/sbin:/usr/bin HOME=/root
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/pts /dev/shm
disks=0
watchdog=0
for w in $(cat /proc/cmdline); do
    case "$w" in
    tessera.disks=*) disks=${w#*=} ;;
    tessera.watchdog=*) watchdog=${w#*=} ;;
    esac
done
if [ "$watchdog" -gt 0 ]; then
    (
        sleep "$watchdog"
        echo "TESSERA-GUEST-WATCHDOG: ${watchdog}s passed, powering off"
        poweroff -f
    ) &
fi
for m in @MODULES@; do
    insmod "/lib/modules/$m.ko" || echo "TESSERA-GUEST-WARN: insmod $m failed"
done
i=0
while :; do
    n=0
    for d in /sys/block/vd*; do
        [ -e "$d" ] && [ -b "/dev/${d##*/}" ] && n=$((n + 1))
    done
    [ "$n" -ge "$disks" ] && break
    i=$((i + 1))
    [ "$i" -ge 300 ] && break
    sleep 0.1
done
if [ "$n" -lt "$disks" ]; then
    echo "TESSERA-GUEST-ERROR: expected $disks virtio disks, found $n"
    rc=125
else
    echo "TESSERA-GUEST-SCRIPT-START"
    sh -e -c '. /tessera/lib.sh; . /tessera/script.sh'
    rc=$?
fi
echo "TESSERA-GUEST-EXIT $rc"
sync
poweroff -f
sleep 10
"#;

// ---------------------------------------------------------------------------
// newc cpio
// ---------------------------------------------------------------------------

/// A writer of "newc" cpio archives, the format the kernel unpacks as an
/// initramfs. Names are relative (`bin/busybox`); parents must come first.
pub struct CpioWriter {
    buf: Vec<u8>,
    ino: u32,
}

impl Default for CpioWriter {
    fn default() -> Self {
        Self::new()
    }
}

impl CpioWriter {
    pub fn new() -> CpioWriter {
        CpioWriter {
            buf: Vec::new(),
            ino: 1,
        }
    }

    fn entry(&mut self, name: &str, mode: u32, rdev: (u32, u32), data: &[u8]) {
        let name = name.trim_start_matches('/');
        let nlink = if mode & 0o170000 == 0o040000 { 2 } else { 1 };
        let fields = [
            self.ino,
            mode,
            0, // uid
            0, // gid
            nlink,
            0, // mtime
            data.len() as u32,
            0, // devmajor
            0, // devminor
            rdev.0,
            rdev.1,
            name.len() as u32 + 1,
            0, // check
        ];
        self.ino += 1;
        self.buf.extend_from_slice(b"070701");
        for f in fields {
            self.buf.extend_from_slice(format!("{f:08X}").as_bytes());
        }
        self.buf.extend_from_slice(name.as_bytes());
        self.buf.push(0);
        self.pad(4);
        self.buf.extend_from_slice(data);
        self.pad(4);
    }

    fn pad(&mut self, to: usize) {
        while self.buf.len() % to != 0 {
            self.buf.push(0);
        }
    }

    pub fn dir(&mut self, name: &str) {
        self.entry(name, 0o040755, (0, 0), &[]);
    }

    /// A regular file with permission bits `perm` (e.g. `0o755`).
    pub fn file(&mut self, name: &str, perm: u32, data: &[u8]) {
        self.entry(name, 0o100000 | (perm & 0o7777), (0, 0), data);
    }

    pub fn symlink(&mut self, name: &str, target: &str) {
        self.entry(name, 0o120777, (0, 0), target.as_bytes());
    }

    pub fn char_dev(&mut self, name: &str, perm: u32, major: u32, minor: u32) {
        self.entry(name, 0o020000 | (perm & 0o7777), (major, minor), &[]);
    }

    /// Appends the trailer and pads to 512 bytes (so more archives can be
    /// concatenated after it: the kernel unpacks them all, later ones
    /// overriding earlier ones).
    pub fn finish(mut self) -> Vec<u8> {
        self.entry("TRAILER!!!", 0, (0, 0), &[]);
        self.pad(512);
        self.buf
    }
}

// ---------------------------------------------------------------------------
// The kit
// ---------------------------------------------------------------------------

/// The kernel, modules and busybox, packed once; see the module docs.
#[derive(Debug)]
pub struct GuestKit {
    /// The cache directory (`$TMPDIR/tessera-guest-kit-<kernel version>/`).
    pub dir: PathBuf,
    /// E.g. `6.1.0-56-amd64`.
    pub kernel_version: String,
    /// The kernel image (a copy inside `dir`).
    pub kernel: PathBuf,
    /// Modules the guest loads, in load order.
    pub modules: Vec<String>,
    /// `qemu-system-x86_64`.
    pub qemu: PathBuf,
    /// QEMU's version, e.g. `(10, 0, 2)`.
    pub qemu_version: (u32, u32, u32),
    /// The base archive (everything but the script), without its script.
    base: Vec<u8>,
}

static KIT: OnceLock<std::result::Result<GuestKit, String>> = OnceLock::new();

impl GuestKit {
    /// The kit, built once per process and cached on disk across processes.
    pub fn get() -> Result<&'static GuestKit> {
        KIT.get_or_init(|| GuestKit::build().map_err(|e| format!("{e:#}")))
            .as_ref()
            .map_err(|e| anyhow!("guest kit unavailable: {e}"))
    }

    fn build() -> Result<GuestKit> {
        let qemu = find_binary("qemu-system-x86_64")?;
        let qemu_version = qemu_version(&qemu)?;
        let busybox = find_busybox()?;
        let (kernel_version, vmlinuz) = find_kernel()?;
        let moddir = Path::new("/lib/modules").join(&kernel_version);

        let stamp = {
            let k = std::fs::metadata(&vmlinuz)?;
            let b = std::fs::metadata(&busybox)?;
            let d = std::fs::metadata(moddir.join("modules.dep"))?;
            format!(
                "format={KIT_FORMAT}\nkernel={} {} {}\nbusybox={} {} {}\nmodules.dep={} {}\n",
                vmlinuz.display(),
                k.len(),
                k.mtime(),
                busybox.display(),
                b.len(),
                b.mtime(),
                d.len(),
                d.mtime()
            )
        };
        let dir = std::env::temp_dir().join(format!("tessera-guest-kit-{kernel_version}"));
        if read_to_string_opt(&dir.join("stamp")).as_deref() != Some(stamp.as_str()) {
            build_cache(&dir, &stamp, &vmlinuz, &busybox, &moddir)
                .with_context(|| format!("building the guest kit in {}", dir.display()))?;
        }
        let base = std::fs::read(dir.join("base.cpio"))?;
        let modules = std::fs::read_to_string(dir.join("modules"))?
            .lines()
            .map(str::to_owned)
            .collect();
        Ok(GuestKit {
            kernel: dir.join("vmlinuz"),
            dir,
            kernel_version,
            modules,
            qemu,
            qemu_version,
            base,
        })
    }

    /// A complete initramfs running `script`, cached in the kit directory by
    /// content (so repeated calls with the same script are free).
    pub fn initramfs(&self, script: &str) -> Result<PathBuf> {
        let mut h = std::hash::DefaultHasher::new();
        script.hash(&mut h);
        self.base.len().hash(&mut h);
        let dir = self.dir.join("initrd");
        std::fs::create_dir_all(&dir)?;
        let path = dir.join(format!("{:016x}.cpio", h.finish()));
        if !path.exists() {
            let tmp = dir.join(format!(".{:016x}.{}.tmp", h.finish(), std::process::id()));
            self.write_initramfs(script, &tmp)?;
            std::fs::rename(&tmp, &path)?;
        }
        Ok(path)
    }

    /// Writes the initramfs running `script` to `dest`.
    pub fn write_initramfs(&self, script: &str, dest: &Path) -> Result<()> {
        let mut c = CpioWriter::new();
        c.file("tessera/script.sh", 0o755, script.as_bytes());
        let tail = c.finish();
        let mut f =
            std::fs::File::create(dest).with_context(|| format!("creating {}", dest.display()))?;
        f.write_all(&self.base)?;
        f.write_all(&tail)?;
        Ok(())
    }

    /// Whether QEMU knows `reconnect-ms` (9.2 and later) rather than
    /// `reconnect` (seconds) on socket chardevs.
    pub fn qemu_has_reconnect_ms(&self) -> bool {
        self.qemu_version >= (9, 2, 0)
    }
}

fn read_to_string_opt(p: &Path) -> Option<String> {
    std::fs::read_to_string(p).ok()
}

/// Builds the cache in a sibling temporary directory and renames it into
/// place, so concurrent test processes never see a half-built kit.
fn build_cache(
    dir: &Path,
    stamp: &str,
    vmlinuz: &Path,
    busybox: &Path,
    moddir: &Path,
) -> Result<()> {
    let parent = dir.parent().context("cache dir has a parent")?;
    let uniq = format!(
        "{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos()
    );
    let name = dir.file_name().context("cache dir name")?.to_string_lossy();
    let tmp = parent.join(format!(".{name}.build-{uniq}"));
    std::fs::create_dir_all(&tmp)?;
    let result = (|| -> Result<()> {
        std::fs::copy(vmlinuz, tmp.join("vmlinuz"))
            .with_context(|| format!("reading {} (are you root?)", vmlinuz.display()))?;
        let modules = resolve_modules(moddir)?;
        let mut names = String::new();
        let mut c = CpioWriter::new();
        for d in [
            "bin",
            "sbin",
            "usr",
            "usr/bin",
            "usr/sbin",
            "dev",
            "etc",
            "lib",
            "lib/modules",
            "mnt",
            "proc",
            "root",
            "run",
            "sys",
            "tessera",
            "tmp",
        ] {
            c.dir(d);
        }
        c.char_dev("dev/console", 0o600, 5, 1);
        c.char_dev("dev/null", 0o666, 1, 3);
        c.symlink("etc/mtab", "/proc/mounts");
        c.file("bin/busybox", 0o755, &std::fs::read(busybox)?);
        let applets = busybox_applets(busybox)?;
        for a in &applets {
            if a != "bin/busybox" {
                c.symlink(a, "/bin/busybox");
            }
        }
        // Debian's busybox calls its ext2 maker mke2fs only.
        if !applets.iter().any(|a| a.ends_with("/mkfs.ext2")) {
            c.file("sbin/mkfs.ext2", 0o755, b"#!/bin/sh\nexec mke2fs \"$@\"\n");
        }
        for (name, path) in &modules {
            c.file(
                &format!("lib/modules/{name}.ko"),
                0o644,
                &read_module(path)?,
            );
            names.push_str(name);
            names.push('\n');
        }
        let list: Vec<&str> = modules.iter().map(|(n, _)| n.as_str()).collect();
        let init = INIT_TEMPLATE.replace("@MODULES@", &list.join(" "));
        c.file("init", 0o755, init.as_bytes());
        c.file("tessera/lib.sh", 0o644, GUEST_LIB.as_bytes());
        std::fs::write(tmp.join("base.cpio"), c.finish())?;
        std::fs::write(tmp.join("modules"), names)?;
        std::fs::write(tmp.join("stamp"), stamp)?;
        Ok(())
    })();
    if let Err(e) = result {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(e);
    }
    if dir.exists() {
        let stale = parent.join(format!(".{name}.stale-{uniq}"));
        if std::fs::rename(dir, &stale).is_ok() {
            let _ = std::fs::remove_dir_all(&stale);
        }
    }
    if let Err(e) = std::fs::rename(&tmp, dir) {
        let _ = std::fs::remove_dir_all(&tmp);
        // Another process may have won the race with an identical kit.
        if read_to_string_opt(&dir.join("stamp")).as_deref() != Some(stamp) {
            return Err(e).with_context(|| format!("renaming the kit into {}", dir.display()));
        }
    }
    Ok(())
}

/// Module name as the kernel knows it (`crc32c-intel` -> `crc32c_intel`).
fn module_name(path: &str) -> String {
    let file = path.rsplit('/').next().unwrap_or(path);
    let stem = file.split(".ko").next().unwrap_or(file);
    stem.replace('-', "_")
}

/// `(name, absolute path)` of the modules to load, in load order.
fn resolve_modules(moddir: &Path) -> Result<Vec<(String, PathBuf)>> {
    let dep_file = moddir.join("modules.dep");
    let dep = std::fs::read_to_string(&dep_file)
        .with_context(|| format!("reading {}: {INSTALL_HINT}", dep_file.display()))?;
    let mut deps: HashMap<String, (String, Vec<String>)> = HashMap::new();
    for line in dep.lines() {
        let Some((path, rest)) = line.split_once(':') else {
            continue;
        };
        let d = rest.split_whitespace().map(module_name).collect();
        deps.insert(module_name(path), (path.to_owned(), d));
    }
    let builtin: HashSet<String> = std::fs::read_to_string(moddir.join("modules.builtin"))
        .unwrap_or_default()
        .lines()
        .map(module_name)
        .collect();

    fn visit(
        name: &str,
        deps: &HashMap<String, (String, Vec<String>)>,
        seen: &mut HashSet<String>,
        out: &mut Vec<(String, String)>,
    ) {
        if !seen.insert(name.to_owned()) {
            return;
        }
        if let Some((path, ds)) = deps.get(name) {
            for d in ds {
                visit(d, deps, seen, out);
            }
            out.push((name.to_owned(), path.clone()));
        }
    }

    let mut seen = HashSet::new();
    let mut out = Vec::new();
    for root in MODULE_ROOTS {
        if !deps.contains_key(*root) && !builtin.contains(*root) && REQUIRED_MODULES.contains(root)
        {
            bail!(
                "kernel {} has no {root} module (nor built in): {INSTALL_HINT}",
                moddir.display()
            );
        }
        visit(root, &deps, &mut seen, &mut out);
    }
    Ok(out.into_iter().map(|(n, p)| (n, moddir.join(p))).collect())
}

/// A module's bytes, decompressed to a plain `.ko`.
fn read_module(path: &Path) -> Result<Vec<u8>> {
    let p = path.to_string_lossy();
    let tool: Option<(&str, &[&str])> = if p.ends_with(".ko.xz") {
        Some(("xz", &["-dc"]))
    } else if p.ends_with(".ko.zst") {
        Some(("zstd", &["-dcq"]))
    } else if p.ends_with(".ko.gz") {
        Some(("gzip", &["-dc"]))
    } else {
        None
    };
    match tool {
        None => std::fs::read(path).with_context(|| format!("reading {p}")),
        Some((tool, args)) => {
            let bin = find_binary(tool)?;
            let out = Command::new(bin)
                .args(args)
                .arg(path)
                .stderr(Stdio::inherit())
                .output()
                .with_context(|| format!("running {tool} on {p}"))?;
            ensure!(out.status.success(), "{tool} failed on {p}");
            Ok(out.stdout)
        }
    }
}

fn busybox_applets(busybox: &Path) -> Result<BTreeSet<String>> {
    let out = Command::new(busybox)
        .arg("--list-full")
        .output()
        .with_context(|| format!("running {} --list-full", busybox.display()))?;
    ensure!(out.status.success(), "busybox --list-full failed");
    let mut set: BTreeSet<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| l.trim().trim_start_matches('/').to_owned())
        .filter(|l| !l.is_empty())
        .filter(|l| {
            ["bin/", "sbin/", "usr/bin/", "usr/sbin/"]
                .iter()
                .any(|d| l.starts_with(d) && !l[d.len()..].contains('/'))
        })
        .collect();
    ensure!(
        set.contains("bin/sh"),
        "{} has no sh applet",
        busybox.display()
    );
    set.remove("bin/busybox");
    Ok(set)
}

/// `PATH` plus the sbin directories (root's tools live there).
pub fn find_binary(name: &str) -> Result<PathBuf> {
    let mut dirs: Vec<PathBuf> =
        std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default()).collect();
    for d in [
        "/usr/local/sbin",
        "/usr/local/bin",
        "/usr/sbin",
        "/usr/bin",
        "/sbin",
        "/bin",
    ] {
        dirs.push(PathBuf::from(d));
    }
    for d in dirs {
        let p = d.join(name);
        if let Ok(m) = std::fs::metadata(&p) {
            if m.is_file() && m.permissions().mode() & 0o111 != 0 {
                return Ok(p);
            }
        }
    }
    bail!("`{name}` not found: {INSTALL_HINT}")
}

fn qemu_version(qemu: &Path) -> Result<(u32, u32, u32)> {
    let out = Command::new(qemu)
        .arg("--version")
        .output()
        .with_context(|| format!("running {} --version", qemu.display()))?;
    let text = String::from_utf8_lossy(&out.stdout);
    let v = text
        .split_whitespace()
        .skip_while(|w| *w != "version")
        .nth(1)
        .with_context(|| format!("unexpected `qemu-system-x86_64 --version` output: {text}"))?;
    let mut it = v.split('.').map(|p| {
        p.chars()
            .take_while(char::is_ascii_digit)
            .collect::<String>()
            .parse::<u32>()
            .unwrap_or(0)
    });
    Ok((
        it.next().unwrap_or(0),
        it.next().unwrap_or(0),
        it.next().unwrap_or(0),
    ))
}

/// busybox from busybox-static: it must be statically linked (the guest has
/// no libc).
fn find_busybox() -> Result<PathBuf> {
    let p = ["/bin/busybox", "/usr/bin/busybox"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
        .map(Ok)
        .unwrap_or_else(|| find_binary("busybox"))?;
    let bytes = std::fs::read(&p)?;
    ensure!(
        elf_is_static(&bytes),
        "{} is dynamically linked; the guest needs busybox-static: {INSTALL_HINT}",
        p.display()
    );
    Ok(p)
}

/// An x86-64 ELF without a PT_INTERP program header.
fn elf_is_static(b: &[u8]) -> bool {
    let u16_at = |o: usize| b.get(o..o + 2).map(|s| u16::from_le_bytes([s[0], s[1]]));
    let u32_at = |o: usize| {
        b.get(o..o + 4)
            .map(|s| u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
    };
    let u64_at = |o: usize| {
        b.get(o..o + 8)
            .map(|s| u64::from_le_bytes(s.try_into().expect("8 bytes")))
    };
    if b.get(0..5) != Some(b"\x7fELF\x02") {
        return false;
    }
    let (Some(phoff), Some(phentsize), Some(phnum)) = (u64_at(0x20), u16_at(0x36), u16_at(0x38))
    else {
        return false;
    };
    (0..phnum as usize).all(|i| {
        let o = phoff as usize + i * phentsize as usize;
        u32_at(o) != Some(3) // PT_INTERP
    })
}

/// `(version, /boot/vmlinuz-version)`.
fn find_kernel() -> Result<(String, PathBuf)> {
    if let Ok(v) = std::env::var("TESSERA_GUEST_KERNEL") {
        let k = PathBuf::from(format!("/boot/vmlinuz-{v}"));
        ensure!(
            k.exists() && Path::new("/lib/modules").join(&v).is_dir(),
            "TESSERA_GUEST_KERNEL={v}: no {} with /lib/modules/{v}",
            k.display()
        );
        return Ok((v, k));
    }
    let mut found: Vec<String> = std::fs::read_dir("/lib/modules")
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|v| Path::new(&format!("/boot/vmlinuz-{v}")).exists())
                .collect()
        })
        .unwrap_or_default();
    found.sort_by_key(|v| version_key(v));
    let v = found.pop().with_context(|| {
        format!("no Debian kernel (/boot/vmlinuz-* with /lib/modules/*) found: {INSTALL_HINT}")
    })?;
    let k = PathBuf::from(format!("/boot/vmlinuz-{v}"));
    Ok((v, k))
}

/// Orders `6.1.0-9` before `6.1.0-56`.
fn version_key(v: &str) -> Vec<(u64, String)> {
    let mut key = Vec::new();
    let mut num = String::new();
    let mut text = String::new();
    for ch in v.chars() {
        if ch.is_ascii_digit() {
            if !text.is_empty() {
                key.push((0, std::mem::take(&mut text)));
            }
            num.push(ch);
        } else {
            if !num.is_empty() {
                key.push((num.parse().unwrap_or(0), String::new()));
                num.clear();
            }
            text.push(ch);
        }
    }
    if !num.is_empty() {
        key.push((num.parse().unwrap_or(0), String::new()));
    }
    if !text.is_empty() {
        key.push((0, text));
    }
    key
}

// ---------------------------------------------------------------------------
// Guests
// ---------------------------------------------------------------------------

/// One vhost-user-blk disk (`-device vhost-user-blk-pci`). The first is
/// `/dev/vda` in the guest, the next `/dev/vdb`, and so on.
#[derive(Clone, Debug, Default)]
pub struct VhostDisk {
    /// The backend's unix socket (QEMU connects to it).
    pub socket: PathBuf,
    pub num_queues: u16,
    /// Let QEMU reconnect to a restarted backend after this delay
    /// (`reconnect-ms=`, or `reconnect=` seconds on QEMU before 9.2).
    pub reconnect: Option<Duration>,
    /// Virtqueue size (`queue-size=`); QEMU's default when `None`.
    pub queue_size: Option<u16>,
}

impl VhostDisk {
    pub fn new(socket: impl Into<PathBuf>, num_queues: u16) -> VhostDisk {
        VhostDisk {
            socket: socket.into(),
            num_queues,
            ..VhostDisk::default()
        }
    }

    pub fn with_reconnect(mut self, after: Duration) -> VhostDisk {
        self.reconnect = Some(after);
        self
    }
}

/// What to boot.
#[derive(Clone, Debug)]
pub struct GuestConfig {
    pub disks: Vec<VhostDisk>,
    /// Guest RAM (shared memfd, as vhost-user needs). Default 512.
    pub memory_mib: u32,
    /// vCPUs. Default 2.
    pub cpus: u32,
    /// Run with `sh -e` after sourcing [`GUEST_LIB`]; its stdin is the
    /// serial console (see [`RunningGuest::send_line`]).
    pub script: String,
    /// From QEMU's start to its end, boot included; QEMU is killed then.
    /// Default 120 s.
    pub timeout: Duration,
    /// Appended to the kernel command line.
    pub kernel_args: String,
    /// Appended to QEMU's command line.
    pub qemu_args: Vec<String>,
}

impl Default for GuestConfig {
    fn default() -> Self {
        GuestConfig {
            disks: Vec::new(),
            memory_mib: 512,
            cpus: 2,
            script: String::new(),
            timeout: Duration::from_secs(120),
            kernel_args: String::new(),
            qemu_args: Vec::new(),
        }
    }
}

/// One `TESSERA-DD` line (from `tessera_dd` in a guest script).
#[derive(Clone, Debug, PartialEq)]
pub struct DdResult {
    pub label: String,
    pub bytes: u64,
    pub usec: u64,
}

impl DdResult {
    pub fn mib_per_s(&self) -> f64 {
        self.bytes as f64 / 1_048_576.0 / (self.usec.max(1) as f64 / 1e6)
    }
}

/// How a guest run ended.
#[derive(Clone, Debug, Default)]
pub struct GuestOutcome {
    /// The script's exit status from the `TESSERA-GUEST-EXIT` line; `None` if
    /// the guest never got there (killed, timed out, crashed).
    pub exit: Option<i32>,
    /// Everything on the serial console (`\r\n` turned into `\n`).
    pub console: String,
    /// QEMU was killed at the timeout.
    pub timed_out: bool,
    /// QEMU was killed by [`RunningGuest::kill`] (or on drop).
    pub killed: bool,
    /// QEMU's own exit status.
    pub qemu_status: Option<ExitStatus>,
    /// What QEMU printed on stderr.
    pub qemu_stderr: String,
    /// From QEMU's start to its end.
    pub elapsed: Duration,
    /// From QEMU's start to the script's start (the boot).
    pub boot_time: Option<Duration>,
}

impl GuestOutcome {
    /// An outcome parsed from console text alone (for tests of parsers).
    pub fn from_console(console: impl Into<String>) -> GuestOutcome {
        let console = console.into().replace("\r\n", "\n");
        GuestOutcome {
            exit: parse_exit(&console),
            console,
            ..GuestOutcome::default()
        }
    }

    /// Every console line that contains `prefix`, from `prefix` on (kernel
    /// messages may have been printed in front of it on the same line).
    pub fn lines_with(&self, prefix: &str) -> Vec<&str> {
        self.console
            .lines()
            .filter_map(|l| l.find(prefix).map(|i| l[i..].trim_end()))
            .collect()
    }

    /// What follows `prefix` on the first line containing it, trimmed.
    pub fn value_of(&self, prefix: &str) -> Option<&str> {
        self.lines_with(prefix)
            .first()
            .map(|l| l[prefix.len()..].trim())
    }

    /// The `TESSERA-DD` lines printed by `tessera_dd`.
    pub fn dd_results(&self) -> Vec<DdResult> {
        self.lines_with(DD_MARKER)
            .iter()
            .filter_map(|l| {
                let mut words = l[DD_MARKER.len()..].split_whitespace();
                let label = words.next()?.to_owned();
                let mut bytes = None;
                let mut usec = None;
                for w in words {
                    if let Some(v) = w.strip_prefix("bytes=") {
                        bytes = v.parse().ok();
                    } else if let Some(v) = w.strip_prefix("usec=") {
                        usec = v.parse().ok();
                    }
                }
                Some(DdResult {
                    label,
                    bytes: bytes?,
                    usec: usec?,
                })
            })
            .collect()
    }

    pub fn succeeded(&self) -> bool {
        self.exit == Some(0)
    }

    /// Panics, showing the console and QEMU's stderr, unless the script
    /// exited 0.
    #[track_caller]
    pub fn expect_success(&self) -> &GuestOutcome {
        if !self.succeeded() {
            panic!(
                "guest script failed: exit {:?} (timed out: {}, killed: {}, qemu: {:?}, after {:?})\n\
                 ----- guest console -----\n{}\n----- qemu stderr -----\n{}",
                self.exit,
                self.timed_out,
                self.killed,
                self.qemu_status,
                self.elapsed,
                self.console,
                self.qemu_stderr
            );
        }
        self
    }
}

fn parse_exit(console: &str) -> Option<i32> {
    console.lines().rev().find_map(|l| {
        let rest = &l[l.find(EXIT_MARKER)? + EXIT_MARKER.len()..];
        rest.split(|c: char| !c.is_ascii_digit() && c != '-')
            .next()?
            .parse()
            .ok()
    })
}

/// Boots guests.
pub struct Guest;

impl Guest {
    /// Boots, runs the script, and waits for the guest to power off (or the
    /// timeout).
    pub fn boot(kit: &GuestKit, config: GuestConfig) -> Result<GuestOutcome> {
        Ok(Guest::spawn(kit, config)?.wait_outcome())
    }

    /// Starts QEMU and returns at once.
    pub fn spawn(kit: &GuestKit, config: GuestConfig) -> Result<RunningGuest> {
        for d in &config.disks {
            ensure!(
                d.socket.exists(),
                "vhost-user socket {} does not exist (is the backend running?)",
                d.socket.display()
            );
            ensure!(d.num_queues > 0, "num_queues must be at least 1");
        }
        let workdir = tempfile::Builder::new()
            .prefix("tessera-guest-")
            .tempdir()?;
        let initrd = workdir.path().join("initrd.cpio");
        kit.write_initramfs(&config.script, &initrd)?;

        let args = qemu_args(kit, &config, &initrd);
        let mut cmd = Command::new(&kit.qemu);
        cmd.args(&args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        // SAFETY: the closure runs in the forked child before exec and only
        // calls prctl(2), which is async-signal-safe; it touches no memory
        // shared with the parent.
        unsafe {
            cmd.pre_exec(|| {
                // QEMU dies with the thread that spawned it (the supervisor,
                // which lives exactly as long as QEMU), hence with the test
                // process.
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }

        let shared = Arc::new(Shared::default());
        let start = Instant::now();
        let deadline = start + config.timeout;
        let (tx, rx) = mpsc::channel();
        let sup_shared = shared.clone();
        let supervisor = std::thread::Builder::new()
            .name("qemu-supervisor".into())
            .spawn(move || supervise(cmd, sup_shared, deadline, tx))?;
        let (pid, stdin) = match rx.recv() {
            Ok(Ok(x)) => x,
            Ok(Err(e)) => {
                let _ = supervisor.join();
                return Err(e).with_context(|| format!("starting {}", kit.qemu.display()));
            }
            Err(_) => {
                let _ = supervisor.join();
                bail!("the QEMU supervisor thread died");
            }
        };
        Ok(RunningGuest {
            pid,
            stdin: Some(stdin),
            shared,
            supervisor: Some(supervisor),
            start,
            args,
            _workdir: workdir,
        })
    }
}

fn qemu_args(kit: &GuestKit, config: &GuestConfig, initrd: &Path) -> Vec<OsString> {
    let mem = config.memory_mib;
    let mut a: Vec<OsString> = Vec::new();
    for s in [
        "-accel",
        "tcg",
        "-cpu",
        "max",
        "-smp",
        &config.cpus.max(1).to_string(),
        "-m",
        &format!("{mem}M"),
        "-object",
        &format!("memory-backend-memfd,id=mem,size={mem}M,share=on"),
        "-numa",
        "node,memdev=mem",
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
        "-no-reboot",
        "-chardev",
        "stdio,id=console,signal=off",
        "-serial",
        "chardev:console",
    ] {
        a.push(OsString::from(s));
    }
    for (i, d) in config.disks.iter().enumerate() {
        let mut chardev = format!("socket,id=vu{i},path={}", qemu_escape(&d.socket));
        if let Some(r) = d.reconnect {
            if kit.qemu_has_reconnect_ms() {
                let _ = write!(chardev, ",reconnect-ms={}", r.as_millis().max(1));
            } else {
                let _ = write!(chardev, ",reconnect={}", r.as_secs().max(1));
            }
        }
        let mut dev = format!(
            "vhost-user-blk-pci,chardev=vu{i},num-queues={}",
            d.num_queues
        );
        if let Some(q) = d.queue_size {
            let _ = write!(dev, ",queue-size={q}");
        }
        a.push(OsString::from("-chardev"));
        a.push(OsString::from(&chardev));
        a.push(OsString::from("-device"));
        a.push(OsString::from(&dev));
    }
    // The guest powers itself off a little after the host would have killed
    // it: a last resort should the test process vanish without killing QEMU.
    let watchdog = config.timeout.as_secs() + 15;
    let append = format!(
        "console=ttyS0 panic=-1 quiet tessera.disks={} tessera.watchdog={watchdog} {}",
        config.disks.len(),
        config.kernel_args
    );
    a.push(OsString::from("-kernel"));
    a.push(kit.kernel.clone().into_os_string());
    a.push(OsString::from("-initrd"));
    a.push(initrd.to_path_buf().into_os_string());
    a.push(OsString::from("-append"));
    a.push(OsString::from(append.trim_end()));
    a.extend(config.qemu_args.iter().map(OsString::from));
    a
}

/// QEMU's option syntax doubles commas inside values.
fn qemu_escape(p: &Path) -> String {
    p.to_string_lossy().replace(',', ",,")
}

#[derive(Default)]
struct Shared {
    state: Mutex<State>,
    /// QEMU exited, or a kill was requested.
    exit_cv: Condvar,
    /// Console output grew, or a reader finished.
    output_cv: Condvar,
}

#[derive(Default)]
struct State {
    console: Vec<u8>,
    stderr: Vec<u8>,
    script_started: Option<Instant>,
    status: Option<ExitStatus>,
    timed_out: bool,
    kill_requested: bool,
    killed: bool,
    readers_done: u8,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

type Spawned = Result<(u32, ChildStdin), std::io::Error>;

/// Owns QEMU: spawns it (so PR_SET_PDEATHSIG ties it to this thread), kills
/// it at the deadline or on request, and reaps it.
fn supervise(mut cmd: Command, shared: Arc<Shared>, deadline: Instant, tx: mpsc::Sender<Spawned>) {
    let mut child: Child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => {
            let _ = tx.send(Err(e));
            return;
        }
    };
    let stdout = child.stdout.take().expect("piped stdout");
    let stderr = child.stderr.take().expect("piped stderr");
    let stdin = child.stdin.take().expect("piped stdin");
    let echo = std::env::var_os("TESSERA_GUEST_ECHO").is_some_and(|v| v != "0");
    let pid = child.id();
    let mut readers = Vec::new();
    for (is_console, mut r) in [
        (true, Box::new(stdout) as Box<dyn Read + Send>),
        (false, Box::new(stderr)),
    ] {
        let rs = shared.clone();
        let spawned = std::thread::Builder::new()
            .name(
                if is_console {
                    "qemu-console"
                } else {
                    "qemu-stderr"
                }
                .into(),
            )
            .spawn(move || {
                let mut buf = [0u8; 8192];
                loop {
                    match r.read(&mut buf) {
                        Ok(0) => break,
                        Ok(n) => {
                            if echo {
                                let mut e = std::io::stderr().lock();
                                let _ = e.write_all(&buf[..n]);
                            }
                            let mut st = rs.lock();
                            if is_console {
                                let from =
                                    st.console.len().saturating_sub(SCRIPT_START_MARKER.len());
                                st.console.extend_from_slice(&buf[..n]);
                                if st.script_started.is_none()
                                    && contains(&st.console[from..], SCRIPT_START_MARKER.as_bytes())
                                {
                                    st.script_started = Some(Instant::now());
                                }
                            } else {
                                st.stderr.extend_from_slice(&buf[..n]);
                            }
                            rs.output_cv.notify_all();
                        }
                        Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                        Err(_) => break,
                    }
                }
                rs.lock().readers_done += 1;
                rs.output_cv.notify_all();
            });
        match spawned {
            Ok(h) => readers.push(h),
            Err(_) => {
                // Without a reader QEMU could block on a full pipe: give up.
                shared.lock().readers_done += 1;
            }
        }
    }
    if tx.send(Ok((pid, stdin))).is_err() {
        shared.lock().kill_requested = true;
    }

    let mut st = shared.lock();
    loop {
        match child.try_wait() {
            Ok(Some(status)) => {
                st.status = Some(status);
                break;
            }
            Ok(None) => {}
            Err(_) => {
                // Cannot happen for our own child; make sure it is gone.
                let _ = child.kill();
                if let Ok(status) = child.wait() {
                    st.status = Some(status);
                }
                break;
            }
        }
        let now = Instant::now();
        if now >= deadline && !st.killed && !st.timed_out {
            st.timed_out = true;
            let _ = child.kill();
        }
        if st.kill_requested && !st.killed && !st.timed_out {
            st.killed = true;
            let _ = child.kill();
        }
        st = shared
            .exit_cv
            .wait_timeout(st, Duration::from_millis(10))
            .unwrap_or_else(|e| e.into_inner())
            .0;
    }
    drop(st);
    shared.exit_cv.notify_all();
    shared.output_cv.notify_all();
    // QEMU is gone, so the pipes reach EOF (unless something inherited them:
    // then the readers are left behind rather than hanging the test).
    let until = Instant::now() + Duration::from_secs(5);
    let mut st = shared.lock();
    while st.readers_done < 2 && Instant::now() < until {
        st = shared
            .output_cv
            .wait_timeout(st, Duration::from_millis(50))
            .unwrap_or_else(|e| e.into_inner())
            .0;
    }
    let all_done = st.readers_done >= 2;
    drop(st);
    if all_done {
        for r in readers {
            let _ = r.join();
        }
    }
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

/// A running guest; QEMU is killed and reaped when this is dropped.
pub struct RunningGuest {
    pid: u32,
    stdin: Option<ChildStdin>,
    shared: Arc<Shared>,
    supervisor: Option<JoinHandle<()>>,
    start: Instant,
    args: Vec<OsString>,
    _workdir: tempfile::TempDir,
}

impl RunningGuest {
    /// QEMU's pid.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// QEMU's command line (for logs).
    pub fn qemu_args(&self) -> &[OsString] {
        &self.args
    }

    /// Whether QEMU is still running.
    pub fn is_running(&self) -> bool {
        self.shared.lock().status.is_none()
    }

    /// The console so far.
    pub fn console(&self) -> String {
        String::from_utf8_lossy(&self.shared.lock().console).replace("\r\n", "\n")
    }

    /// Waits until the console has a line containing `needle` and returns
    /// that line (from `needle` on). Fails if QEMU ends first or after
    /// `timeout`, showing the console.
    pub fn wait_for(&self, needle: &str, timeout: Duration) -> Result<String> {
        let deadline = Instant::now() + timeout;
        let mut st = self.shared.lock();
        loop {
            // Only complete lines count.
            if let Some(end) = st.console.iter().rposition(|&b| b == b'\n') {
                let text = String::from_utf8_lossy(&st.console[..end]);
                if let Some(line) = text
                    .lines()
                    .find_map(|l| l.find(needle).map(|i| l[i..].trim_end().to_owned()))
                {
                    return Ok(line);
                }
            }
            let ended = st.status.is_some() && st.readers_done >= 2;
            if ended || Instant::now() >= deadline {
                let console = String::from_utf8_lossy(&st.console).replace("\r\n", "\n");
                let stderr = String::from_utf8_lossy(&st.stderr).into_owned();
                bail!(
                    "{} before the guest printed {needle:?}\n----- guest console -----\n{console}\n----- qemu stderr -----\n{stderr}",
                    if ended { "QEMU ended" } else { "timed out" }
                );
            }
            let wait = deadline.saturating_duration_since(Instant::now());
            st = self
                .shared
                .output_cv
                .wait_timeout(st, wait.min(Duration::from_millis(200)))
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// Sends `line` and a newline to the guest's serial console: the
    /// script's stdin (`read -r x`). The tty echoes it on the console.
    pub fn send_line(&mut self, line: &str) -> Result<()> {
        let stdin = self.stdin.as_mut().context("QEMU's stdin is closed")?;
        stdin.write_all(line.as_bytes())?;
        stdin.write_all(b"\n")?;
        stdin.flush()?;
        Ok(())
    }

    /// Kills QEMU (SIGKILL) and waits until it is reaped.
    pub fn kill(&mut self) {
        let mut st = self.shared.lock();
        st.kill_requested = true;
        self.shared.exit_cv.notify_all();
        while st.status.is_none() && self.supervisor.is_some() {
            st = self
                .shared
                .exit_cv
                .wait_timeout(st, Duration::from_millis(50))
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// Waits for QEMU to end (killing it at the timeout) and returns the
    /// outcome.
    pub fn wait_outcome(mut self) -> GuestOutcome {
        self.finish()
    }

    fn finish(&mut self) -> GuestOutcome {
        if let Some(s) = self.supervisor.take() {
            let _ = s.join();
        }
        self.stdin = None;
        let st = self.shared.lock();
        let console = String::from_utf8_lossy(&st.console).replace("\r\n", "\n");
        GuestOutcome {
            exit: parse_exit(&console),
            console,
            timed_out: st.timed_out,
            killed: st.killed,
            qemu_status: st.status,
            qemu_stderr: String::from_utf8_lossy(&st.stderr).into_owned(),
            elapsed: self.start.elapsed(),
            boot_time: st.script_started.map(|t| t - self.start),
        }
    }
}

impl Drop for RunningGuest {
    fn drop(&mut self) {
        if self.supervisor.is_some() {
            self.kill();
            let _ = self.finish();
        }
    }
}

// ---------------------------------------------------------------------------
// The reference backend
// ---------------------------------------------------------------------------

/// `qemu-storage-daemon` exporting a raw file over vhost-user-blk: the
/// reference backend. Killed and reaped on drop.
pub struct QemuStorageDaemon {
    pub socket: PathBuf,
    /// Its stdout and stderr.
    pub log: PathBuf,
    child: Option<Child>,
}

impl QemuStorageDaemon {
    /// Exports `image` (raw) writable on `socket` with `num_queues` queues,
    /// and waits for the socket to appear.
    pub fn start(image: &Path, socket: &Path, num_queues: u16) -> Result<QemuStorageDaemon> {
        let bin = find_binary("qemu-storage-daemon")?;
        let log = socket.with_extension("qsd.log");
        let logf = std::fs::File::create(&log)?;
        let child = Command::new(bin)
            .arg("--blockdev")
            .arg(format!(
                "driver=file,node-name=f0,filename={}",
                qemu_escape(image)
            ))
            .arg("--export")
            .arg(format!(
                "type=vhost-user-blk,id=e0,node-name=f0,addr.type=unix,addr.path={},writable=on,num-queues={num_queues}",
                qemu_escape(socket)
            ))
            .stdin(Stdio::null())
            .stdout(logf.try_clone()?)
            .stderr(logf)
            .spawn()
            .context("starting qemu-storage-daemon")?;
        let mut qsd = QemuStorageDaemon {
            socket: socket.to_path_buf(),
            log,
            child: Some(child),
        };
        let until = Instant::now() + Duration::from_secs(15);
        while !socket.exists() {
            if let Some(c) = qsd.child.as_mut() {
                if let Ok(Some(status)) = c.try_wait() {
                    let log = std::fs::read_to_string(&qsd.log).unwrap_or_default();
                    bail!("qemu-storage-daemon exited ({status}):\n{log}");
                }
            }
            ensure!(
                Instant::now() < until,
                "qemu-storage-daemon did not create {}",
                socket.display()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        Ok(qsd)
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// `kill -9` and reap.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for QemuStorageDaemon {
    fn drop(&mut self) {
        self.kill();
    }
}
