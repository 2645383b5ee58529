//! `bytes::Buf` over a chain's data and `BufMut` over the tailroom.

use std::marker::PhantomData;

use bytes::buf::UninitSlice;
use bytes::{Buf, BufMut};

use crate::layout::MbufHeader;
use crate::Mbuf;

/// Reads a chain's data, segment by segment, as a [`bytes::Buf`] (from
/// [`Mbuf::reader`]).
///
/// ```no_run
/// # fn f(m: &memplane_mbuf::Mbuf<'_>) {
/// use bytes::Buf;
/// let mut r = m.reader();
/// let ethertype = { r.advance(12); r.get_u16() };
/// # let _ = ethertype; }
/// ```
pub struct MbufReader<'a> {
    seg: *const MbufHeader,
    off: usize,
    remaining: usize,
    _m: PhantomData<&'a MbufHeader>,
}

// SAFETY: a shared view of an Mbuf, which is Sync.
unsafe impl Send for MbufReader<'_> {}
// SAFETY: as above.
unsafe impl Sync for MbufReader<'_> {}

impl MbufReader<'_> {
    /// The current segment's unread bytes.
    fn seg_data(&self) -> &[u8] {
        // SAFETY: `seg` is a segment of the borrowed chain (or null).
        let Some(h) = (unsafe { self.seg.as_ref() }) else {
            return &[];
        };
        // SAFETY: [data_off, data_off + data_len) lies in the buffer; off <= data_len.
        unsafe {
            std::slice::from_raw_parts(
                h.buf_addr.add(h.data_off as usize + self.off),
                h.data_len as usize - self.off,
            )
        }
    }
    /// Moves past exhausted (or empty) segments.
    fn settle(&mut self) {
        while self.remaining > 0 && self.seg_data().is_empty() {
            // SAFETY: a segment of the borrowed chain.
            self.seg = unsafe { (*self.seg).next };
            self.off = 0;
        }
    }
}

impl Buf for MbufReader<'_> {
    fn remaining(&self) -> usize {
        self.remaining
    }
    fn chunk(&self) -> &[u8] {
        let d = self.seg_data();
        &d[..d.len().min(self.remaining)]
    }
    fn advance(&mut self, mut cnt: usize) {
        assert!(cnt <= self.remaining, "advance past the end of the packet");
        while cnt > 0 {
            self.settle();
            let n = self.seg_data().len().min(cnt);
            self.off += n;
            self.remaining -= n;
            cnt -= n;
        }
        self.settle();
    }
}

/// Appends to a chain's last segment as a [`bytes::BufMut`] (from
/// [`Mbuf::writer`]); `remaining_mut` is the tailroom (0 when the buffer is
/// shared).
pub struct MbufWriter<'a, 'p> {
    m: &'a mut Mbuf<'p>,
}

// SAFETY: the BufMut contract: chunk_mut returns the tailroom, which
// advance_mut turns into data with `append`.
unsafe impl BufMut for MbufWriter<'_, '_> {
    fn remaining_mut(&self) -> usize {
        if self.m.append_check(0).is_err() {
            return 0;
        }
        self.m.tailroom() as usize
    }
    unsafe fn advance_mut(&mut self, cnt: usize) {
        if let Err(e) = self.m.append(cnt) {
            panic!("advance_mut past the tailroom: {e}");
        }
    }
    fn chunk_mut(&mut self) -> &mut UninitSlice {
        let (p, n) = self.m.tail_ptr();
        // SAFETY: the tailroom of our own, unshared last segment (or an
        // empty slice).
        unsafe { UninitSlice::from_raw_parts_mut(p, n) }
    }
}

impl<'p> Mbuf<'p> {
    /// The chain's data as a [`bytes::Buf`].
    pub fn reader(&self) -> MbufReader<'_> {
        let mut r = MbufReader {
            seg: self.as_ptr(),
            off: 0,
            remaining: self.pkt_len() as usize,
            _m: PhantomData,
        };
        r.settle();
        r
    }

    /// The last segment's tailroom as a [`bytes::BufMut`].
    ///
    /// ```no_run
    /// # fn f(m: &mut memplane_mbuf::Mbuf<'_>) {
    /// use bytes::BufMut;
    /// let mut w = m.writer();
    /// w.put_u16(0x0800);
    /// w.put_slice(b"payload");
    /// # }
    /// ```
    pub fn writer<'a>(&'a mut self) -> MbufWriter<'a, 'p> {
        MbufWriter { m: self }
    }
}
