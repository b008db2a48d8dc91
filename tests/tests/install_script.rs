//! `scripts/install-test-deps.sh` finds the Debian mirror (and whether
//! bookworm-backports must be added) in every apt-source layout Debian ships:
//! `scripts/test-install-deps.sh` runs it against fixture apt directories
//! (nothing is installed, the machine's own sources are not read).

use std::path::Path;
use std::process::Command;

#[test]
fn install_script_detects_apt_sources_in_every_layout() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root");
    let out = Command::new("bash")
        .arg("scripts/test-install-deps.sh")
        .current_dir(root)
        .output()
        .expect("run bash scripts/test-install-deps.sh");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "scripts/test-install-deps.sh failed ({}):\n{stdout}\n{stderr}",
        out.status
    );
    assert!(stdout.contains(" 0 failed"), "{stdout}");
}
