//! The demo's packet buffers, as the two processes pass them: raw buffer
//! addresses (the same in both processes) through rings.
//!
//! Interim layout until the mbuf crate lands: a 64-byte header holding the
//! data length, then the data room, in a mempool.

// Interim code, replaced by the mbuf crate.
#![allow(clippy::cast_ptr_alignment, clippy::unused_self, clippy::mut_from_ref)]

use std::fmt::Write as _;

use memplane::{Error, Memory};
use memplane_mempool::{Mempool, MempoolConfig};

/// Bytes before the data.
const HEADROOM: usize = 64;
/// Data room per buffer.
const DATA_ROOM: usize = 2048;

/// The packet pool.
pub(crate) struct PacketPool<'m> {
    pool: Mempool<'m>,
}

fn err(what: &str, e: impl std::fmt::Display) -> Error {
    Error::System(format!("{what}: {e}"))
}

impl<'m> PacketPool<'m> {
    /// Bytes of memory a pool of `n` buffers takes.
    pub(crate) fn footprint(n: u32) -> usize {
        memplane_mempool::required_memory(
            n,
            (HEADROOM + DATA_ROOM) as u32,
            memplane_mempool::MempoolFlags::NONE,
        )
        .unwrap_or(n as usize * (HEADROOM + DATA_ROOM + 128))
    }

    pub(crate) fn create(mem: &'m Memory, name: &str, n: u32, cache: u32) -> Result<Self, Error> {
        let cfg = MempoolConfig::new(n, (HEADROOM + DATA_ROOM) as u32).cache_size(cache);
        let pool =
            Mempool::create(mem, name, &cfg).map_err(|e| err("creating the packet pool", e))?;
        Ok(PacketPool { pool })
    }

    pub(crate) fn lookup(mem: &'m Memory, name: &str) -> Result<Self, Error> {
        let pool = Mempool::lookup(mem, name).map_err(|e| err("looking up the packet pool", e))?;
        Ok(PacketPool { pool })
    }

    /// Appends `n` buffers with `len` bytes of data each to `out`, or
    /// nothing when the pool has fewer than `n` free.
    pub(crate) fn alloc_bulk(&self, out: &mut Vec<usize>, n: usize, len: usize) -> bool {
        let mut objs = [std::ptr::null_mut(); 512];
        if self.pool.get_bulk(&mut objs[..n]).is_err() {
            return false;
        }
        for &o in &objs[..n] {
            // SAFETY: a buffer of this pool, just taken: ours alone.
            unsafe { o.cast::<u32>().write(len as u32) };
            out.push(o as usize);
        }
        true
    }

    /// The data of buffer `m`.
    ///
    /// # Safety
    /// `m` is a buffer of this pool that the caller holds (taken from the
    /// pool or handed over through a ring) and no one else touches now.
    pub(crate) unsafe fn data_mut(&self, m: usize) -> &mut [u8] {
        // SAFETY: per the contract, the header and data room are ours.
        unsafe {
            let len = (m as *const u32).read() as usize;
            std::slice::from_raw_parts_mut((m + HEADROOM) as *mut u8, len.min(DATA_ROOM))
        }
    }

    /// Returns buffers to the pool.
    pub(crate) fn free_bulk(&self, ms: &[usize]) {
        let mut objs = [std::ptr::null_mut(); 512];
        for chunk in ms.chunks(512) {
            for (o, &m) in objs.iter_mut().zip(chunk) {
                *o = m as *mut u8;
            }
            if let Err(e) = self.pool.put_bulk(&objs[..chunk.len()]) {
                tracing::error!("returning packet buffers: {e}");
            }
        }
    }

    pub(crate) fn flush_cache(&self) -> Result<(), Error> {
        self.pool
            .cache_flush()
            .map_err(|e| err("flushing the pool cache", e))
    }

    pub(crate) fn in_use(&self) -> u32 {
        self.pool.in_use_count()
    }

    pub(crate) fn size(&self) -> u32 {
        self.pool.size()
    }

    /// One line about the pool.
    pub(crate) fn describe(&self) -> String {
        let mut o = String::new();
        let bytes: usize = self.pool.chunks().iter().map(|c| c.len).sum();
        let _ = write!(
            o,
            "pool '{}': {} buffers of {} bytes ({} data room), cache {} per lcore, handler {}, {} of objects",
            self.pool.name(),
            self.pool.size(),
            self.pool.elt_size(),
            DATA_ROOM,
            self.pool.cache_size(),
            self.pool.handler(),
            memplane::units::format_size(bytes as u64)
        );
        o
    }
}
