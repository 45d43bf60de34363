//! The NBD client against a hostile server: the fixed-newstyle handshake (greeting,
//! option replies, meta contexts, NBD_OPT_GO info), then structured and simple replies to
//! BLOCK_STATUS (a whole-disk map), READ, WRITE, WRITE_ZEROES, TRIM and FLUSH. The input
//! is everything the server sends, delivered a few bytes per read (first byte: read size);
//! what the client writes is dropped. Cookies are sequential from 1, so a recorded
//! session replays exactly.
#![no_main]

use ferry_fuzz::{block_on, OwnedTrickle};
use ferry_nbd::{NbdClient, BASE_ALLOCATION};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&ctl, server)) = data.split_first() else {
        return;
    };
    let chunk = match ctl {
        0 => usize::MAX,
        n => n as usize,
    };
    block_on(async {
        let stream = OwnedTrickle::new(server.to_vec(), chunk);
        let Ok(mut nbd) = NbdClient::connect(stream, "drive0", &[BASE_ALLOCATION]).await else {
            return;
        };
        let size = nbd.size();
        let max = nbd.max_payload();
        assert!(max > 0);
        match nbd.map(BASE_ALLOCATION).await {
            Ok(extents) => {
                // A map covers the disk exactly, in order.
                let mut at = 0;
                for e in &extents {
                    assert_eq!(e.offset, at, "{extents:?}");
                    at = e.end();
                }
                assert_eq!(at, size, "{extents:?}");
            }
            Err(e) if e.is_fatal() => return,
            Err(_) => {}
        }
        let len = size.min(8192) as usize;
        let mut buf = vec![0u8; len];
        if nbd.read(0, &mut buf).await.is_err() {
            return;
        }
        if !nbd.read_only() {
            let _ = nbd.write(0, &buf).await;
            let _ = nbd.write_zeroes(0, len as u64).await;
            let _ = nbd.trim(0, len as u64).await;
        }
        let _ = nbd.flush().await;
        let _ = nbd.disconnect().await;
    });
});
