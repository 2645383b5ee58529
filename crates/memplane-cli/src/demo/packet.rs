//! The demo's packet: Ethernet + IPv4 + UDP carrying a sequence number and
//! a payload pattern derived from it, with real IPv4 and UDP checksums.
//!
//! The primary fills a packet (`fill`), the secondary checks and rewrites
//! it (`check_and_rewrite`: addresses swapped, payload inverted, checksums
//! recomputed), and the primary checks the rewritten packet
//! (`check_returned`). Every byte is accounted for: a packet that comes back
//! with one flipped bit, from the wrong sequence slot or unrewritten, fails.

use std::fmt;

/// Ethernet (14) + IPv4 (20) + UDP (8).
pub const HEADERS: usize = 14 + 20 + 8;
/// Demo header inside the UDP payload: magic (4), stage (4), sequence (8).
const DEMO_HEADER: usize = 16;
/// Smallest packet: the headers, the demo header and nothing else.
pub const MIN_PACKET: usize = HEADERS + DEMO_HEADER;
/// Largest packet the demo builds (one Ethernet frame without FCS).
pub const MAX_PACKET: usize = 1514;

const MAGIC: u32 = 0x6d70_6c6e; // "mpln"
const STAGE_SENT: u32 = 1;
const STAGE_RETURNED: u32 = 2;

const MAC_PRIMARY: [u8; 6] = [0x02, 0x6d, 0x70, 0x00, 0x00, 0x01];
const MAC_SECONDARY: [u8; 6] = [0x02, 0x6d, 0x70, 0x00, 0x00, 0x02];
const IP_PRIMARY: [u8; 4] = [10, 0, 0, 1];
const IP_SECONDARY: [u8; 4] = [10, 0, 0, 2];
const PORT_PRIMARY: u16 = 4791;
const PORT_SECONDARY: u16 = 9;

const ETH: usize = 0;
const IP: usize = 14;
const UDP: usize = 34;
const DEMO: usize = HEADERS;
const PAYLOAD: usize = HEADERS + DEMO_HEADER;

/// Why a packet failed its check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Bad {
    /// Shorter than the headers, or its lengths disagree with the buffer.
    Length { got: usize, ip_says: usize },
    /// Not our magic number.
    Magic(u32),
    /// In the wrong stage (not rewritten, or rewritten twice).
    Stage { want: u32, got: u32 },
    /// Out of sequence (the rings keep order, so this is loss or duplication).
    Sequence { want: u64, got: u64 },
    /// Addresses or ports not as sent / rewritten.
    Addresses,
    /// IPv4 header checksum wrong.
    IpChecksum,
    /// UDP checksum wrong.
    UdpChecksum,
    /// A payload byte differs from the pattern.
    Payload { offset: usize, want: u8, got: u8 },
}

impl fmt::Display for Bad {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Bad::Length { got, ip_says } => {
                write!(f, "length {got} but the IPv4 header says {ip_says}")
            }
            Bad::Magic(m) => write!(f, "magic {m:#x} is not the demo's"),
            Bad::Stage { want, got } => write!(f, "stage {got}, expected {want}"),
            Bad::Sequence { want, got } => write!(f, "sequence {got}, expected {want}"),
            Bad::Addresses => f.write_str("addresses or ports not as expected"),
            Bad::IpChecksum => f.write_str("IPv4 header checksum wrong"),
            Bad::UdpChecksum => f.write_str("UDP checksum wrong"),
            Bad::Payload { offset, want, got } => {
                write!(
                    f,
                    "payload byte {offset} is {got:#04x}, expected {want:#04x}"
                )
            }
        }
    }
}

/// Payload byte `i` of packet `seq` as sent; the secondary inverts it.
#[inline]
fn pattern(seq: u64, i: usize) -> u8 {
    (seq as u8).wrapping_mul(31).wrapping_add(i as u8)
}

/// One's-complement sum of `bytes` as big-endian 16-bit words, unfolded.
/// Summed as 32-bit words (RFC 1071: any word size folds to the same
/// 16-bit sum), two adds per 8 bytes.
#[inline]
fn sum16(bytes: &[u8], mut acc: u64) -> u64 {
    let mut chunks = bytes.chunks_exact(8);
    for c in &mut chunks {
        let w = u64::from_be_bytes(c.try_into().expect("8 bytes"));
        acc += (w >> 32) + (w & 0xffff_ffff);
    }
    let mut rest = chunks.remainder().chunks_exact(2);
    for c in &mut rest {
        acc += u64::from(u16::from_be_bytes([c[0], c[1]]));
    }
    if let [last] = rest.remainder() {
        acc += u64::from(*last) << 8;
    }
    acc
}

fn fold(mut acc: u64) -> u16 {
    while acc > 0xffff {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    !(acc as u16)
}

fn ip_checksum(p: &[u8]) -> u16 {
    fold(sum16(&p[IP..IP + 20], 0))
}

/// One's-complement sum of the UDP pseudo-header and datagram, checksum
/// field included as it is.
fn udp_sum(p: &[u8]) -> u64 {
    let udp_len = (p.len() - UDP) as u64;
    // Source and destination addresses, protocol, UDP length.
    let pseudo = sum16(&p[IP + 12..IP + 20], 17 + udp_len);
    sum16(&p[UDP..], pseudo)
}

/// UDP checksum (computed with the field at 0; 0 is sent as 0xffff).
fn udp_checksum(p: &[u8]) -> u16 {
    match fold(udp_sum(p)) {
        0 => 0xffff,
        c => c,
    }
}

fn put16(p: &mut [u8], at: usize, v: u16) {
    p[at..at + 2].copy_from_slice(&v.to_be_bytes());
}

fn get16(p: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([p[at], p[at + 1]])
}

fn get32(p: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(p[at..at + 4].try_into().expect("4 bytes"))
}

fn seal(p: &mut [u8]) {
    put16(p, IP + 10, 0);
    let c = ip_checksum(p);
    put16(p, IP + 10, c);
    put16(p, UDP + 6, 0);
    let c = udp_checksum(p);
    put16(p, UDP + 6, c);
}

/// Writes packet `seq` into `p` (its whole length, `MIN_PACKET ..=
/// MAX_PACKET` bytes), as the primary sends it.
pub fn fill(p: &mut [u8], seq: u64) {
    debug_assert!((MIN_PACKET..=MAX_PACKET).contains(&p.len()));
    let len = p.len();
    p[ETH..ETH + 6].copy_from_slice(&MAC_SECONDARY);
    p[ETH + 6..ETH + 12].copy_from_slice(&MAC_PRIMARY);
    put16(p, ETH + 12, 0x0800);
    p[IP] = 0x45;
    p[IP + 1] = 0;
    put16(p, IP + 2, (len - IP) as u16);
    put16(p, IP + 4, seq as u16); // identification
    put16(p, IP + 6, 0x4000); // don't fragment
    p[IP + 8] = 64;
    p[IP + 9] = 17;
    p[IP + 12..IP + 16].copy_from_slice(&IP_PRIMARY);
    p[IP + 16..IP + 20].copy_from_slice(&IP_SECONDARY);
    put16(p, UDP, PORT_PRIMARY);
    put16(p, UDP + 2, PORT_SECONDARY);
    put16(p, UDP + 4, (len - UDP) as u16);
    p[DEMO..DEMO + 4].copy_from_slice(&MAGIC.to_le_bytes());
    p[DEMO + 4..DEMO + 8].copy_from_slice(&STAGE_SENT.to_le_bytes());
    p[DEMO + 8..DEMO + 16].copy_from_slice(&seq.to_le_bytes());
    for (i, b) in p[PAYLOAD..].iter_mut().enumerate() {
        *b = pattern(seq, i);
    }
    seal(p);
}

/// Checks the framing common to both directions; returns the sequence.
fn check_common(p: &[u8], stage: u32) -> Result<u64, Bad> {
    if p.len() < MIN_PACKET {
        return Err(Bad::Length {
            got: p.len(),
            ip_says: 0,
        });
    }
    let ip_len = usize::from(get16(p, IP + 2));
    if ip_len + IP != p.len() || usize::from(get16(p, UDP + 4)) + UDP != p.len() {
        return Err(Bad::Length {
            got: p.len(),
            ip_says: ip_len + IP,
        });
    }
    if get16(p, ETH + 12) != 0x0800 {
        return Err(Bad::Addresses);
    }
    if ip_checksum(p) != 0 {
        return Err(Bad::IpChecksum);
    }
    if get16(p, UDP + 6) == 0 || fold(udp_sum(p)) != 0 {
        return Err(Bad::UdpChecksum);
    }
    let magic = get32(p, DEMO);
    if magic != MAGIC {
        return Err(Bad::Magic(magic));
    }
    let got = get32(p, DEMO + 4);
    if got != stage {
        return Err(Bad::Stage { want: stage, got });
    }
    Ok(u64::from_le_bytes(
        p[DEMO + 8..DEMO + 16].try_into().expect("8 bytes"),
    ))
}

fn check_payload(p: &[u8], seq: u64, invert: u8) -> Result<(), Bad> {
    let payload = &p[PAYLOAD..];
    // Branch-free over the whole payload (vectorizes); the first differing
    // byte is looked for only when there is one.
    let diff = payload
        .iter()
        .enumerate()
        .fold(0u8, |acc, (i, &b)| acc | (b ^ pattern(seq, i) ^ invert));
    if diff == 0 {
        return Ok(());
    }
    let (i, &got) = payload
        .iter()
        .enumerate()
        .find(|&(i, &b)| b != pattern(seq, i) ^ invert)
        .expect("a byte differs");
    Err(Bad::Payload {
        offset: PAYLOAD + i,
        want: pattern(seq, i) ^ invert,
        got,
    })
}

/// The secondary's work: checks a packet as the primary sent it, then
/// rewrites it in place as a reply (addresses and ports swapped, payload
/// inverted, stage advanced, checksums recomputed). Returns the sequence.
pub fn check_and_rewrite(p: &mut [u8]) -> Result<u64, Bad> {
    let seq = check_common(p, STAGE_SENT)?;
    if p[ETH..ETH + 6] != MAC_SECONDARY
        || p[ETH + 6..ETH + 12] != MAC_PRIMARY
        || p[IP + 16..IP + 20] != IP_SECONDARY
        || get16(p, UDP + 2) != PORT_SECONDARY
    {
        return Err(Bad::Addresses);
    }
    check_payload(p, seq, 0)?;
    p[ETH..ETH + 6].copy_from_slice(&MAC_PRIMARY);
    p[ETH + 6..ETH + 12].copy_from_slice(&MAC_SECONDARY);
    p[IP + 12..IP + 16].copy_from_slice(&IP_SECONDARY);
    p[IP + 16..IP + 20].copy_from_slice(&IP_PRIMARY);
    put16(p, UDP, PORT_SECONDARY);
    put16(p, UDP + 2, PORT_PRIMARY);
    p[DEMO + 4..DEMO + 8].copy_from_slice(&STAGE_RETURNED.to_le_bytes());
    for b in &mut p[PAYLOAD..] {
        *b = !*b;
    }
    seal(p);
    Ok(seq)
}

/// The primary's check of a returned packet: rewritten exactly once, in
/// sequence, every byte as expected.
pub fn check_returned(p: &[u8], want_seq: u64, want_len: usize) -> Result<(), Bad> {
    if p.len() != want_len {
        return Err(Bad::Length {
            got: p.len(),
            ip_says: want_len,
        });
    }
    let seq = check_common(p, STAGE_RETURNED)?;
    if seq != want_seq {
        return Err(Bad::Sequence {
            want: want_seq,
            got: seq,
        });
    }
    if p[ETH..ETH + 6] != MAC_PRIMARY
        || p[ETH + 6..ETH + 12] != MAC_SECONDARY
        || p[IP + 12..IP + 16] != IP_SECONDARY
        || p[IP + 16..IP + 20] != IP_PRIMARY
        || get16(p, UDP) != PORT_SECONDARY
        || get16(p, UDP + 2) != PORT_PRIMARY
    {
        return Err(Bad::Addresses);
    }
    check_payload(p, seq, 0xff)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_passes_every_check() {
        for len in [MIN_PACKET, 64, 65, 128, 1000, MAX_PACKET] {
            let mut p = vec![0u8; len];
            fill(&mut p, 77);
            assert_eq!(check_and_rewrite(&mut p), Ok(77), "len {len}");
            check_returned(&p, 77, len).unwrap();
        }
    }

    #[test]
    fn checksums_match_an_independent_computation() {
        let mut p = vec![0u8; 64];
        fill(&mut p, 1);
        // RFC 1071: summing a header including its checksum gives 0xffff.
        let mut s: u32 = 0;
        for w in p[IP..IP + 20].chunks(2) {
            s += u32::from(u16::from_be_bytes([w[0], w[1]]));
        }
        while s > 0xffff {
            s = (s & 0xffff) + (s >> 16);
        }
        assert_eq!(s, 0xffff);
    }

    #[test]
    fn every_single_bit_flip_is_caught() {
        let mut sent = vec![0u8; 80];
        fill(&mut sent, 5);
        let mut back = sent.clone();
        check_and_rewrite(&mut back).unwrap();
        for byte in 0..sent.len() {
            for bit in 0..8 {
                let mut s = sent.clone();
                s[byte] ^= 1 << bit;
                assert!(check_and_rewrite(&mut s).is_err(), "sent {byte}.{bit}");
                let mut b = back.clone();
                b[byte] ^= 1 << bit;
                assert!(check_returned(&b, 5, 80).is_err(), "back {byte}.{bit}");
            }
        }
    }

    #[test]
    fn unrewritten_duplicated_or_reordered_packets_are_caught() {
        let mut p = vec![0u8; 64];
        fill(&mut p, 9);
        assert!(matches!(check_returned(&p, 9, 64), Err(Bad::Stage { .. })));
        check_and_rewrite(&mut p).unwrap();
        assert!(matches!(check_and_rewrite(&mut p), Err(Bad::Stage { .. })));
        assert_eq!(
            check_returned(&p, 10, 64),
            Err(Bad::Sequence { want: 10, got: 9 })
        );
        assert!(check_returned(&p, 9, 65).is_err());
    }
}
