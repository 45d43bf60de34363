//! Extents returned by block status queries.

/// A run of bytes sharing the same metadata-context flags.
///
/// For `base:allocation` the flags are [`crate::STATE_HOLE`] and
/// [`crate::STATE_ZERO`]; for `qemu:dirty-bitmap:*` they are
/// [`crate::STATE_DIRTY`] or 0.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Extent {
    pub offset: u64,
    pub length: u64,
    pub flags: u32,
}

impl Extent {
    pub fn new(offset: u64, length: u64, flags: u32) -> Self {
        Self {
            offset,
            length,
            flags,
        }
    }

    /// First byte after the extent.
    pub fn end(&self) -> u64 {
        self.offset + self.length
    }

    /// Whether all bits of `flag` are set.
    pub fn has(&self, flag: u32) -> bool {
        self.flags & flag == flag
    }
}

/// Appends `extent`, merging it into the last one when they touch and carry
/// the same flags (servers may split runs arbitrarily across replies).
pub(crate) fn push_merged(extents: &mut Vec<Extent>, extent: Extent) {
    match extents.last_mut() {
        Some(last) if last.end() == extent.offset && last.flags == extent.flags => {
            last.length += extent.length;
        }
        _ => extents.push(extent),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merges_only_adjacent_equal_flags() {
        let mut v = Vec::new();
        push_merged(&mut v, Extent::new(0, 10, 1));
        push_merged(&mut v, Extent::new(10, 5, 1));
        push_merged(&mut v, Extent::new(15, 5, 0));
        push_merged(&mut v, Extent::new(30, 5, 0));
        assert_eq!(
            v,
            vec![
                Extent::new(0, 15, 1),
                Extent::new(15, 5, 0),
                Extent::new(30, 5, 0)
            ]
        );
    }
}
