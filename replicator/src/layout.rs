//! Splitting a vDisk byte range at chunk boundaries.

/// The part of an I/O that falls in one chunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Piece {
    pub chunk: u64,
    /// Offset inside the chunk.
    pub offset: u32,
    pub len: u32,
}

/// Splits `[offset, offset + len)` into per-chunk pieces, in address order.
pub(crate) fn split(offset: u64, len: u64, chunk_size: u64) -> Vec<Piece> {
    let mut out = Vec::with_capacity(1);
    let mut pos = offset;
    let end = offset + len;
    while pos < end {
        let chunk = pos / chunk_size;
        let within = pos % chunk_size;
        let n = (chunk_size - within).min(end - pos);
        out.push(Piece {
            chunk,
            offset: within as u32,
            len: n as u32,
        });
        pos += n;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_at_chunk_boundaries() {
        assert_eq!(split(0, 0, 1024), vec![]);
        assert_eq!(
            split(512, 1024, 1024),
            vec![
                Piece {
                    chunk: 0,
                    offset: 512,
                    len: 512
                },
                Piece {
                    chunk: 1,
                    offset: 0,
                    len: 512
                }
            ]
        );
        let p = split(1000 * 1024 - 512, 3 * 1024, 1024);
        assert_eq!(p.len(), 4);
        assert_eq!(p.iter().map(|p| p.len as u64).sum::<u64>(), 3 * 1024);
        assert_eq!(
            p[0],
            Piece {
                chunk: 999,
                offset: 512,
                len: 512
            }
        );
    }
}
