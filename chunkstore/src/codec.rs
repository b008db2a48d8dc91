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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seal_then_check() {
        let mut buf = [7u8; 64];
        assert!(!crc_ok(&buf));
        seal(&mut buf);
        assert!(crc_ok(&buf));
        buf[3] ^= 1;
        assert!(!crc_ok(&buf));
    }

    #[test]
    fn crc_covers_zeroed_field() {
        let mut buf = [1u8; 16];
        seal(&mut buf);
        let mut zeroed = buf;
        put_u32(&mut zeroed, 12, 0);
        assert_eq!(get_u32(&buf, 12), tessera_crc::crc32c(&zeroed));
    }

    #[test]
    fn field_round_trip() {
        let mut buf = [0u8; 40];
        let id = uuid::Uuid::from_u128(0x0123_4567_89ab_cdef_0011_2233_4455_6677);
        put_u16(&mut buf, 0, 0xbeef);
        put_u32(&mut buf, 2, 0xdead_beef);
        put_u64(&mut buf, 6, u64::MAX - 3);
        put_uuid(&mut buf, 14, &id);
        assert_eq!(get_u16(&buf, 0), 0xbeef);
        assert_eq!(get_u32(&buf, 2), 0xdead_beef);
        assert_eq!(get_u64(&buf, 6), u64::MAX - 3);
        assert_eq!(get_uuid(&buf, 14), id);
    }
}
