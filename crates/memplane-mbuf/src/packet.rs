//! Typed packet views in the smoltcp style: `Packet<T: AsRef<[u8]>>`
//! wrappers that read header fields in place, write them when
//! `T: AsMut<[u8]>`, and refuse short buffers in `new_checked`.
//!
//! ```
//! use memplane_mbuf::packet::{EthernetFrame, Ipv4Packet, UdpPacket, ETHERTYPE_IPV4};
//!
//! let mut bytes = [0u8; 14 + 20 + 8];
//! let mut eth = EthernetFrame::new_checked(&mut bytes[..])?;
//! eth.set_ethertype(ETHERTYPE_IPV4);
//! let mut ip = Ipv4Packet::new_unchecked(eth.payload_mut());
//! ip.set_version_ihl(4, 5);
//! ip.set_total_len(28);
//! ip.set_protocol(17);
//! let mut udp = UdpPacket::new_checked(ip.payload_mut())?;
//! udp.set_dst_port(53);
//! let eth = EthernetFrame::new_checked(&bytes[..])?;
//! let ip = Ipv4Packet::new_checked(eth.payload())?;
//! assert_eq!(UdpPacket::new_checked(ip.payload())?.dst_port(), 53);
//! # Ok::<(), memplane_mbuf::MbufError>(())
//! ```

use crate::MbufError;

/// EtherType of IPv4.
pub const ETHERTYPE_IPV4: u16 = 0x0800;
/// IP protocol number of UDP.
pub const IPPROTO_UDP: u8 = 17;

fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}
fn put16(b: &mut [u8], at: usize, v: u16) {
    b[at..at + 2].copy_from_slice(&v.to_be_bytes());
}
fn short(need: usize, have: usize) -> MbufError {
    MbufError::ShortBuffer { need, have }
}

/// An Ethernet II frame: destination, source, EtherType, payload.
#[derive(Debug, Clone)]
pub struct EthernetFrame<T: AsRef<[u8]>> {
    buffer: T,
}

impl<T: AsRef<[u8]>> EthernetFrame<T> {
    /// Header bytes.
    pub const HEADER_LEN: usize = 14;
    /// Wraps without checking the length (accessors may panic on a short
    /// buffer).
    pub fn new_unchecked(buffer: T) -> Self {
        Self { buffer }
    }
    /// Wraps, refusing a buffer shorter than the header.
    pub fn new_checked(buffer: T) -> Result<Self, MbufError> {
        let have = buffer.as_ref().len();
        if have < Self::HEADER_LEN {
            return Err(short(Self::HEADER_LEN, have));
        }
        Ok(Self { buffer })
    }
    /// The wrapped buffer.
    pub fn into_inner(self) -> T {
        self.buffer
    }
    /// Destination MAC.
    pub fn dst_addr(&self) -> [u8; 6] {
        self.buffer.as_ref()[0..6].try_into().unwrap_or_default()
    }
    /// Source MAC.
    pub fn src_addr(&self) -> [u8; 6] {
        self.buffer.as_ref()[6..12].try_into().unwrap_or_default()
    }
    /// EtherType.
    pub fn ethertype(&self) -> u16 {
        be16(self.buffer.as_ref(), 12)
    }
    /// Bytes after the header.
    pub fn payload(&self) -> &[u8] {
        &self.buffer.as_ref()[Self::HEADER_LEN..]
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> EthernetFrame<T> {
    /// Sets the destination MAC.
    pub fn set_dst_addr(&mut self, a: [u8; 6]) {
        self.buffer.as_mut()[0..6].copy_from_slice(&a);
    }
    /// Sets the source MAC.
    pub fn set_src_addr(&mut self, a: [u8; 6]) {
        self.buffer.as_mut()[6..12].copy_from_slice(&a);
    }
    /// Sets the EtherType.
    pub fn set_ethertype(&mut self, t: u16) {
        put16(self.buffer.as_mut(), 12, t);
    }
    /// Bytes after the header, writable.
    pub fn payload_mut(&mut self) -> &mut [u8] {
        &mut self.buffer.as_mut()[Self::HEADER_LEN..]
    }
}

/// An IPv4 packet (header fields in place).
#[derive(Debug, Clone)]
pub struct Ipv4Packet<T: AsRef<[u8]>> {
    buffer: T,
}

impl<T: AsRef<[u8]>> Ipv4Packet<T> {
    /// Bytes of a header without options.
    pub const MIN_HEADER_LEN: usize = 20;
    /// Wraps without checking.
    pub fn new_unchecked(buffer: T) -> Self {
        Self { buffer }
    }
    /// Wraps, refusing a buffer shorter than the header (its IHL), a
    /// version other than 4, an IHL below 5, or a total length that
    /// exceeds the buffer or is shorter than the header.
    pub fn new_checked(buffer: T) -> Result<Self, MbufError> {
        let b = buffer.as_ref();
        if b.len() < Self::MIN_HEADER_LEN {
            return Err(short(Self::MIN_HEADER_LEN, b.len()));
        }
        let p = Self { buffer };
        let bad = |why| MbufError::BadPacket { what: "IPv4", why };
        if p.version() != 4 {
            return Err(bad("version is not 4"));
        }
        let hl = p.header_len();
        if hl < Self::MIN_HEADER_LEN {
            return Err(bad("IHL below 5"));
        }
        let have = p.buffer.as_ref().len();
        if have < hl {
            return Err(short(hl, have));
        }
        let tl = p.total_len() as usize;
        if tl < hl {
            return Err(bad("total length shorter than the header"));
        }
        if tl > have {
            return Err(short(tl, have));
        }
        Ok(p)
    }
    /// The wrapped buffer.
    pub fn into_inner(self) -> T {
        self.buffer
    }
    /// Version (4).
    pub fn version(&self) -> u8 {
        self.buffer.as_ref()[0] >> 4
    }
    /// Header bytes (IHL x 4).
    pub fn header_len(&self) -> usize {
        (self.buffer.as_ref()[0] & 0x0f) as usize * 4
    }
    /// DSCP/ECN byte.
    pub fn tos(&self) -> u8 {
        self.buffer.as_ref()[1]
    }
    /// Total length.
    pub fn total_len(&self) -> u16 {
        be16(self.buffer.as_ref(), 2)
    }
    /// Identification.
    pub fn ident(&self) -> u16 {
        be16(self.buffer.as_ref(), 4)
    }
    /// Time to live.
    pub fn ttl(&self) -> u8 {
        self.buffer.as_ref()[8]
    }
    /// Protocol.
    pub fn protocol(&self) -> u8 {
        self.buffer.as_ref()[9]
    }
    /// Header checksum.
    pub fn checksum(&self) -> u16 {
        be16(self.buffer.as_ref(), 10)
    }
    /// Source address.
    pub fn src_addr(&self) -> [u8; 4] {
        self.buffer.as_ref()[12..16].try_into().unwrap_or_default()
    }
    /// Destination address.
    pub fn dst_addr(&self) -> [u8; 4] {
        self.buffer.as_ref()[16..20].try_into().unwrap_or_default()
    }
    /// The header's one's-complement checksum over its bytes is valid.
    pub fn verify_checksum(&self) -> bool {
        checksum(&self.buffer.as_ref()[..self.header_len()]) == 0
    }
    /// Bytes after the header, up to the total length.
    pub fn payload(&self) -> &[u8] {
        let b = self.buffer.as_ref();
        let end = (self.total_len() as usize).min(b.len());
        &b[self.header_len().min(end)..end]
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> Ipv4Packet<T> {
    /// Sets version and IHL (header words).
    pub fn set_version_ihl(&mut self, version: u8, ihl: u8) {
        self.buffer.as_mut()[0] = (version << 4) | (ihl & 0x0f);
    }
    /// Sets the total length.
    pub fn set_total_len(&mut self, v: u16) {
        put16(self.buffer.as_mut(), 2, v);
    }
    /// Sets the identification.
    pub fn set_ident(&mut self, v: u16) {
        put16(self.buffer.as_mut(), 4, v);
    }
    /// Sets the TTL.
    pub fn set_ttl(&mut self, v: u8) {
        self.buffer.as_mut()[8] = v;
    }
    /// Sets the protocol.
    pub fn set_protocol(&mut self, v: u8) {
        self.buffer.as_mut()[9] = v;
    }
    /// Sets the source address.
    pub fn set_src_addr(&mut self, a: [u8; 4]) {
        self.buffer.as_mut()[12..16].copy_from_slice(&a);
    }
    /// Sets the destination address.
    pub fn set_dst_addr(&mut self, a: [u8; 4]) {
        self.buffer.as_mut()[16..20].copy_from_slice(&a);
    }
    /// Computes and stores the header checksum.
    pub fn fill_checksum(&mut self) {
        put16(self.buffer.as_mut(), 10, 0);
        let hl = self.header_len();
        let c = checksum(&self.buffer.as_ref()[..hl]);
        put16(self.buffer.as_mut(), 10, c);
    }
    /// Bytes after the header, up to the total length, writable.
    pub fn payload_mut(&mut self) -> &mut [u8] {
        let (hl, tl) = (self.header_len(), self.total_len() as usize);
        let b = self.buffer.as_mut();
        let end = tl.min(b.len());
        &mut b[hl.min(end)..end]
    }
}

/// The Internet checksum (RFC 1071) of `data`, complemented.
pub fn checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = 0;
    let mut it = data.chunks_exact(2);
    for w in &mut it {
        sum += u32::from(u16::from_be_bytes([w[0], w[1]]));
    }
    if let [b] = it.remainder() {
        sum += u32::from(*b) << 8;
    }
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// A UDP datagram (header fields in place).
#[derive(Debug, Clone)]
pub struct UdpPacket<T: AsRef<[u8]>> {
    buffer: T,
}

impl<T: AsRef<[u8]>> UdpPacket<T> {
    /// Header bytes.
    pub const HEADER_LEN: usize = 8;
    /// Wraps without checking.
    pub fn new_unchecked(buffer: T) -> Self {
        Self { buffer }
    }
    /// Wraps, refusing a buffer shorter than the header.
    pub fn new_checked(buffer: T) -> Result<Self, MbufError> {
        let have = buffer.as_ref().len();
        if have < Self::HEADER_LEN {
            return Err(short(Self::HEADER_LEN, have));
        }
        Ok(Self { buffer })
    }
    /// The wrapped buffer.
    pub fn into_inner(self) -> T {
        self.buffer
    }
    /// Source port.
    pub fn src_port(&self) -> u16 {
        be16(self.buffer.as_ref(), 0)
    }
    /// Destination port.
    pub fn dst_port(&self) -> u16 {
        be16(self.buffer.as_ref(), 2)
    }
    /// Length field (header + payload).
    pub fn len(&self) -> u16 {
        be16(self.buffer.as_ref(), 4)
    }
    /// Whether the length field says no payload.
    pub fn is_empty(&self) -> bool {
        self.len() as usize <= Self::HEADER_LEN
    }
    /// Checksum field.
    pub fn checksum(&self) -> u16 {
        be16(self.buffer.as_ref(), 6)
    }
    /// Bytes after the header.
    pub fn payload(&self) -> &[u8] {
        &self.buffer.as_ref()[Self::HEADER_LEN..]
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> UdpPacket<T> {
    /// Sets the source port.
    pub fn set_src_port(&mut self, v: u16) {
        put16(self.buffer.as_mut(), 0, v);
    }
    /// Sets the destination port.
    pub fn set_dst_port(&mut self, v: u16) {
        put16(self.buffer.as_mut(), 2, v);
    }
    /// Sets the length field.
    pub fn set_len(&mut self, v: u16) {
        put16(self.buffer.as_mut(), 4, v);
    }
    /// Sets the checksum field.
    pub fn set_checksum(&mut self, v: u16) {
        put16(self.buffer.as_mut(), 6, v);
    }
    /// Bytes after the header, writable.
    pub fn payload_mut(&mut self) -> &mut [u8] {
        &mut self.buffer.as_mut()[Self::HEADER_LEN..]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checked_constructors_refuse_short_or_malformed_headers() {
        assert!(matches!(
            EthernetFrame::new_checked(&[0u8; 13][..]),
            Err(MbufError::ShortBuffer { need: 14, have: 13 })
        ));
        assert!(matches!(
            UdpPacket::new_checked(&[0u8; 7][..]),
            Err(MbufError::ShortBuffer { need: 8, have: 7 })
        ));
        assert!(matches!(
            Ipv4Packet::new_checked(&[0x45u8; 19][..]),
            Err(MbufError::ShortBuffer { need: 20, have: 19 })
        ));
        let mut b = [0u8; 20];
        b[0] = 0x65;
        assert!(matches!(
            Ipv4Packet::new_checked(&b[..]),
            Err(MbufError::BadPacket { .. })
        ));
        b[0] = 0x44;
        assert!(matches!(
            Ipv4Packet::new_checked(&b[..]),
            Err(MbufError::BadPacket { .. })
        ));
        b[0] = 0x46; // 24-byte header in 20 bytes
        assert!(matches!(
            Ipv4Packet::new_checked(&b[..]),
            Err(MbufError::ShortBuffer { need: 24, have: 20 })
        ));
        b[0] = 0x45;
        b[3] = 21; // total length past the buffer
        assert!(matches!(
            Ipv4Packet::new_checked(&b[..]),
            Err(MbufError::ShortBuffer { need: 21, have: 20 })
        ));
    }

    #[test]
    fn setters_write_the_fields_getters_read_and_checksums_verify() {
        let mut b = vec![0u8; 14 + 20 + 8 + 4];
        let mut e = EthernetFrame::new_checked(&mut b[..]).unwrap();
        e.set_dst_addr([1, 2, 3, 4, 5, 6]);
        e.set_src_addr([7, 8, 9, 10, 11, 12]);
        e.set_ethertype(ETHERTYPE_IPV4);
        let mut ip = Ipv4Packet::new_unchecked(e.payload_mut());
        ip.set_version_ihl(4, 5);
        ip.set_total_len(32);
        ip.set_ttl(64);
        ip.set_protocol(IPPROTO_UDP);
        ip.set_src_addr([10, 0, 0, 1]);
        ip.set_dst_addr([10, 0, 0, 2]);
        ip.set_ident(0x1234);
        ip.fill_checksum();
        let mut u = UdpPacket::new_checked(ip.payload_mut()).unwrap();
        u.set_src_port(1000);
        u.set_dst_port(2000);
        u.set_len(12);
        u.payload_mut().copy_from_slice(b"abcd");
        assert_eq!(&b[0..6], &[1, 2, 3, 4, 5, 6]);
        assert_eq!(&b[12..14], &[0x08, 0x00]);
        let e = EthernetFrame::new_checked(&b[..]).unwrap();
        assert_eq!(e.src_addr(), [7, 8, 9, 10, 11, 12]);
        let ip = Ipv4Packet::new_checked(e.payload()).unwrap();
        assert!(ip.verify_checksum());
        assert_eq!((ip.ttl(), ip.protocol(), ip.ident()), (64, 17, 0x1234));
        assert_eq!(ip.dst_addr(), [10, 0, 0, 2]);
        let u = UdpPacket::new_checked(ip.payload()).unwrap();
        assert_eq!((u.src_port(), u.dst_port(), u.len()), (1000, 2000, 12));
        assert_eq!(u.payload(), b"abcd");
        let mut bad = b.clone();
        bad[14 + 8] ^= 1; // flip a TTL bit
        let e = EthernetFrame::new_checked(&bad[..]).unwrap();
        assert!(!Ipv4Packet::new_checked(e.payload())
            .unwrap()
            .verify_checksum());
    }
}
