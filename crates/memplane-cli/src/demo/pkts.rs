//! The demo's packet buffers: memplane mbufs (DPDK's `rte_mbuf` layout) in
//! an mbuf pool. The two processes pass them as raw header addresses (the
//! same in both) through rings and work on the headers directly, as DPDK
//! code does with `rte_mbuf *`, without wrapping them in
//! [`Mbuf`](memplane_mbuf::Mbuf) handles:
//! [`MbufPool::alloc_bulk_raw`] allocates, the header's buffer address and
//! data offset locate the data, and [`memplane_mbuf::free_bulk_raw`]
//! frees.

use memplane::{Error, MemOptions, Memory};
use memplane_mbuf::{MbufHeader, MbufPool, MbufPoolConfig, DEFAULT_BUF_SIZE, MBUF_HEADER_SIZE};

/// The packet pool.
pub(crate) struct PacketPool<'m> {
    pool: MbufPool<'m>,
}

fn err(what: &str, e: impl std::fmt::Display) -> Error {
    Error::System(format!("{what}: {e}"))
}

impl<'m> PacketPool<'m> {
    /// Bytes of memory a pool of `n` default mbufs takes in an instance
    /// started with `eal` (the mempool's own calculator, before creation,
    /// with the `-n`/`-r` given there).
    pub(crate) fn footprint(n: u32, eal: &[String]) -> usize {
        let elt = (MBUF_HEADER_SIZE + usize::from(DEFAULT_BUF_SIZE)) as u32;
        let cxr =
            MemOptions::parse_args(eal).map_or(0, |o| memplane_mempool::channels_x_ranks_of(&o));
        memplane_mempool::required_memory_for(n, elt, memplane_mempool::MempoolFlags::NONE, cxr)
            .unwrap_or(n as usize * (elt as usize + 256))
    }

    /// Creates the pool: `n` mbufs with the default data room, a per-lcore
    /// cache of `cache`.
    pub(crate) fn create(mem: &'m Memory, name: &str, n: u32, cache: u32) -> Result<Self, Error> {
        let pool = MbufPool::create(mem, name, &MbufPoolConfig::new(n).cache_size(cache))
            .map_err(|e| err("creating the mbuf pool", e))?;
        Ok(PacketPool { pool })
    }

    /// Opens the pool another process created.
    pub(crate) fn lookup(mem: &'m Memory, name: &str) -> Result<Self, Error> {
        let pool = MbufPool::lookup(mem, name).map_err(|e| err("looking up the mbuf pool", e))?;
        Ok(PacketPool { pool })
    }

    /// Appends `n` mbufs holding `len` bytes of
    /// (unwritten) data each to `out`, or nothing when the pool has fewer
    /// than `n` free (`rte_pktmbuf_alloc_bulk` + `rte_pktmbuf_append`).
    pub(crate) fn alloc_bulk(&self, out: &mut Vec<usize>, n: usize, len: usize) -> bool {
        out.reserve(n);
        let start = out.len();
        // Null first, so the slots are initialised pointers (no zeroed
        // staging array: the mbufs land in `out` directly).
        out.resize(start + n, 0);
        // SAFETY: usize and *mut MbufHeader have the same size and
        // alignment, and the n slots are initialised.
        let raw = unsafe {
            std::slice::from_raw_parts_mut(out.as_mut_ptr().add(start).cast::<*mut MbufHeader>(), n)
        };
        // SAFETY: the mbufs become ours; each stays in `out` and is freed
        // exactly once, by this or the other process, via `free_bulk`.
        if unsafe { self.pool.alloc_bulk_raw(raw) }.is_err() {
            out.truncate(start);
            return false;
        }
        for &m in raw.iter() {
            // SAFETY: fresh mbufs of our pool (one segment, reset: data_off
            // at the headroom, no data), ours alone: `rte_pktmbuf_append`
            // on a fresh mbuf is these two stores once the room is checked.
            unsafe {
                let h = &mut *m;
                assert!(
                    usize::from(h.buf_len - h.data_off) >= len,
                    "--packet-size is checked against the data room"
                );
                h.data_len = len as u16;
                h.pkt_len = len as u32;
            }
        }
        true
    }

    /// The data of mbuf `m` (one segment).
    ///
    /// # Safety
    /// `m` is an mbuf of this pool that the caller holds (allocated here,
    /// or handed over through a ring) and no one else touches now; the
    /// slice is not used after the mbuf is passed on or freed.
    #[allow(clippy::mut_from_ref)] // exclusive by the contract above
    #[allow(clippy::unused_self)] // the handle proves the pool is mapped
    pub(crate) unsafe fn data_mut(&self, m: usize) -> &mut [u8] {
        // SAFETY: per the contract, the header is live and ours; the data
        // lies inside the buffer at data_off, data_len bytes.
        unsafe {
            let h = &*(m as *const MbufHeader);
            std::slice::from_raw_parts_mut(
                h.buf_addr.add(usize::from(h.data_off)),
                usize::from(h.data_len),
            )
        }
    }

    /// Frees mbufs (`rte_pktmbuf_free_bulk`).
    #[allow(clippy::unused_self)] // the handle keeps the pool open here
    pub(crate) fn free_bulk(&self, ms: &[usize]) {
        // SAFETY: usize and *mut MbufHeader have the same layout; the
        // caller holds these mbufs (from `alloc_bulk`, through the rings)
        // and frees each once; their pool is open (self).
        unsafe {
            memplane_mbuf::free_bulk_raw(std::slice::from_raw_parts(
                ms.as_ptr().cast::<*mut MbufHeader>(),
                ms.len(),
            ));
        }
    }

    /// Returns the calling thread's cached mbufs to the pool.
    pub(crate) fn flush_cache(&self) -> Result<(), Error> {
        self.pool
            .cache_flush()
            .map_err(|e| err("flushing the pool cache", e))
    }

    /// Mbufs out of the pool (exact when every cache is flushed).
    pub(crate) fn in_use(&self) -> u32 {
        self.pool.in_use_count()
    }

    /// Mbufs in the pool.
    pub(crate) fn size(&self) -> u32 {
        self.pool.size()
    }

    /// One line about the pool.
    pub(crate) fn describe(&self) -> String {
        let mp = self.pool.mempool();
        let bytes: usize = mp.chunks().iter().map(|c| c.len).sum();
        format!(
            "mbuf pool '{}': {} mbufs of {} bytes ({}-byte header, {} data room incl. {} headroom), cache {} per lcore, handler {}, {} of objects",
            self.pool.name(),
            self.pool.size(),
            mp.elt_size(),
            MBUF_HEADER_SIZE,
            self.pool.data_room(),
            memplane_mbuf::HEADROOM,
            mp.cache_size(),
            mp.handler(),
            memplane::units::format_size(bytes as u64)
        )
    }
}

#[cfg(test)]
mod tests {
    use super::PacketPool;

    /// The demo sizes its pool with the instance's `-n`/`-r`: a default
    /// mbuf is 37 cache lines with its header, so 37 channels push it to
    /// 38 lines, while the default 4 x 1 leaves it at 37.
    #[test]
    fn the_footprint_follows_memory_channels() {
        let args = |a: &[&str]| a.iter().map(|s| (*s).to_string()).collect::<Vec<_>>();
        let plain = PacketPool::footprint(1000, &args(&[]));
        let spread = PacketPool::footprint(1000, &args(&["-n", "37"]));
        assert_eq!(
            plain,
            PacketPool::footprint(1000, &args(&["-n", "4", "-r", "1"]))
        );
        assert_eq!(spread - plain, 1000 * 64, "{plain} {spread}");
    }
}
