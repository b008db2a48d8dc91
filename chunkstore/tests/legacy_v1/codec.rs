//! Little-endian field access and crc sealing shared by the on-disk records.
//!
//! Every structure keeps its crc32c in its last 4 bytes, computed over the
//! whole structure with those 4 bytes set to zero.

/// Reads a little-endian u16 at `off`.
pub(crate) fn get_u16(buf: &[u8], off: usize) -> u16 {
    u16::from_le_bytes([buf[off], buf[off + 1]])
}

/// Reads a little-endian u32 at `off`.
pub(crate) fn get_u32(buf: &[u8], off: usize) -> u32 {
    let mut b = [0u8; 4];
    b.copy_from_slice(&buf[off..off + 4]);
    u32::from_le_bytes(b)
}

/// Reads a little-endian u64 at `off`.
pub(crate) fn get_u64(buf: &[u8], off: usize) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&buf[off..off + 8]);
    u64::from_le_bytes(b)
}

/// Reads 16 bytes at `off` as a UUID.
pub(crate) fn get_uuid(buf: &[u8], off: usize) -> uuid::Uuid {
    let mut b = [0u8; 16];
    b.copy_from_slice(&buf[off..off + 16]);
    uuid::Uuid::from_bytes(b)
}

/// Writes a little-endian u16 at `off`.
pub(crate) fn put_u16(buf: &mut [u8], off: usize, v: u16) {
    buf[off..off + 2].copy_from_slice(&v.to_le_bytes());
}

/// Writes a little-endian u32 at `off`.
pub(crate) fn put_u32(buf: &mut [u8], off: usize, v: u32) {
    buf[off..off + 4].copy_from_slice(&v.to_le_bytes());
}

/// Writes a little-endian u64 at `off`.
pub(crate) fn put_u64(buf: &mut [u8], off: usize, v: u64) {
    buf[off..off + 8].copy_from_slice(&v.to_le_bytes());
}

/// Writes a UUID's 16 bytes at `off`.
pub(crate) fn put_uuid(buf: &mut [u8], off: usize, v: &uuid::Uuid) {
    buf[off..off + 16].copy_from_slice(v.as_bytes());
}

/// The crc32c of `buf` with its last 4 bytes taken as zero.
fn crc_with_zeroed_tail(buf: &[u8]) -> u32 {
    let body = buf.len() - 4;
    tessera_crc::crc32c_append(tessera_crc::crc32c(&buf[..body]), &[0u8; 4])
}

/// Stores the structure's crc32c in its last 4 bytes.
pub(crate) fn seal(buf: &mut [u8]) {
    let crc = crc_with_zeroed_tail(buf);
    let end = buf.len();
    put_u32(buf, end - 4, crc);
}

/// Whether the crc32c in the structure's last 4 bytes matches its content.
pub(crate) fn crc_ok(buf: &[u8]) -> bool {
    get_u32(buf, buf.len() - 4) == crc_with_zeroed_tail(buf)
}
