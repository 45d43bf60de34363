//! The qcow2 metadata reader (`ferry_qemu::qcow2::changed_since_snapshot`) on a hostile
//! image: header, snapshot table, L1 and L2 tables, cluster reads. Input: one byte that
//! picks the comparison unit, then the image file. The snapshot looked for is "cp" (the
//! name the seed images use). Reported ranges must be sorted, disjoint, non-empty and
//! inside the virtual size.
#![no_main]

use ferry_fuzz::scratch_file;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&u, image)) = data.split_first() else {
        return;
    };
    let unit = 1u64 << (u % 24);
    let path = scratch_file("qcow2");
    std::fs::write(&path, image).expect("write scratch image");
    if let Ok(ranges) = ferry_qemu::qcow2::changed_since_snapshot(&path, "cp", unit) {
        let size = u64::from_be_bytes(image[24..32].try_into().expect("header was read"));
        let mut prev_end = 0u64;
        for (i, &(off, len)) in ranges.iter().enumerate() {
            assert!(len > 0, "{ranges:?}");
            assert!(i == 0 || off > prev_end, "unsorted or unmerged: {ranges:?}");
            let end = off.checked_add(len).expect("range end overflows");
            assert!(
                end <= size,
                "range past the virtual size {size}: {ranges:?}"
            );
            prev_end = end;
        }
    }
});
