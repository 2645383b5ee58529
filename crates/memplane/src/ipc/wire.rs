//! The datagram format.
//!
//! ```text
//! offset size  field
//!      0    4  magic "MPIP" (0x4d 0x50 0x49 0x50)
//!      4    2  format version (1), little endian
//!      6    1  kind: 1 one-way, 2 request, 3 reply, 4 no handler,
//!              5 no reply, 6 busy
//!      7    1  flags (must be 0)
//!      8    8  request id, little endian (0 for one-way, non-zero otherwise)
//!     16    2  name length (1..=63)
//!     18    2  fd count (0..=253), must equal the SCM_RIGHTS fds received
//!     20    4  payload length (0..=32768)
//!     24       name (UTF-8, no control characters), then payload
//! ```
//!
//! The datagram must be exactly `24 + name length + payload length` bytes.
//! Answers without a body (no handler, no reply, busy) carry no payload and
//! no fds.

use super::{MAX_FDS, MAX_NAME, MAX_PAYLOAD};

/// "MPIP" in the first four bytes.
pub(crate) const MAGIC: [u8; 4] = *b"MPIP";
/// Bumped on any incompatible change.
pub(crate) const VERSION: u16 = 1;
/// Size of the fixed header.
pub(crate) const HEADER_LEN: usize = 24;
/// The largest valid datagram.
pub(crate) const MAX_DATAGRAM: usize = HEADER_LEN + MAX_NAME + MAX_PAYLOAD;

/// What a datagram is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    /// One-way message, no answer expected.
    OneWay = 1,
    /// Request: exactly one answer (reply, no handler, no reply, busy).
    Request = 2,
    /// Reply to a request, with a body.
    Reply = 3,
    /// Answer: the peer has no action for this name (DPDK's IGN).
    NoHandler = 4,
    /// Answer: the handler finished without replying.
    NoReply = 5,
    /// Answer: the peer's handler queue is full.
    Busy = 6,
}

impl Kind {
    fn from_u8(v: u8) -> Option<Kind> {
        Some(match v {
            1 => Kind::OneWay,
            2 => Kind::Request,
            3 => Kind::Reply,
            4 => Kind::NoHandler,
            5 => Kind::NoReply,
            6 => Kind::Busy,
            _ => return None,
        })
    }

    /// An answer to a request (routed by request id).
    pub(crate) fn is_answer(self) -> bool {
        !matches!(self, Kind::OneWay | Kind::Request)
    }

    /// An answer that carries no body.
    fn is_bodiless(self) -> bool {
        matches!(self, Kind::NoHandler | Kind::NoReply | Kind::Busy)
    }
}

/// Why a datagram was rejected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Reject {
    Short { len: usize },
    BadMagic,
    BadVersion { version: u16 },
    BadKind { kind: u8 },
    BadFlags { flags: u8 },
    BadId { kind: Kind, id: u64 },
    NameLength { len: usize },
    PayloadLength { len: usize },
    LengthMismatch { announced: usize, got: usize },
    NameNotUtf8,
    BadNameChar,
    FdCount { announced: usize, got: usize },
    BodyOnAnswer { kind: Kind },
}

impl std::fmt::Display for Reject {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Reject::Short { len } => write!(f, "{len} bytes, shorter than the header"),
            Reject::BadMagic => f.write_str("bad magic"),
            Reject::BadVersion { version } => {
                write!(f, "format version {version}, expected {VERSION}")
            }
            Reject::BadKind { kind } => write!(f, "unknown kind {kind}"),
            Reject::BadFlags { flags } => write!(f, "unknown flags {flags:#x}"),
            Reject::BadId { kind, id } => write!(f, "request id {id} on a {kind:?}"),
            Reject::NameLength { len } => {
                write!(f, "name length {len} (must be 1..={MAX_NAME})")
            }
            Reject::PayloadLength { len } => {
                write!(f, "payload length {len} (at most {MAX_PAYLOAD})")
            }
            Reject::LengthMismatch { announced, got } => {
                write!(f, "header announces {announced} bytes, datagram has {got}")
            }
            Reject::NameNotUtf8 => f.write_str("name is not UTF-8"),
            Reject::BadNameChar => f.write_str("name has control characters"),
            Reject::FdCount { announced, got } => {
                write!(f, "header announces {announced} fds, {got} arrived")
            }
            Reject::BodyOnAnswer { kind } => write!(f, "{kind:?} answer with a body"),
        }
    }
}

/// A decoded datagram, borrowing the receive buffer.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Decoded<'a> {
    pub kind: Kind,
    pub id: u64,
    pub name: &'a str,
    pub payload: &'a [u8],
}

/// Checks a message name: 1..=63 bytes, no control characters.
pub(crate) fn check_name(name: &str) -> Result<(), &'static str> {
    if name.is_empty() {
        Err("it is empty")
    } else if name.len() > MAX_NAME {
        Err("it is longer than 63 bytes")
    } else if name.chars().any(char::is_control) {
        Err("it contains control characters")
    } else {
        Ok(())
    }
}

/// Builds the header. The caller has checked the limits.
pub(crate) fn header(
    kind: Kind,
    id: u64,
    name_len: usize,
    payload_len: usize,
    fds: usize,
) -> [u8; HEADER_LEN] {
    debug_assert!(name_len <= MAX_NAME && payload_len <= MAX_PAYLOAD && fds <= MAX_FDS);
    let mut h = [0u8; HEADER_LEN];
    h[0..4].copy_from_slice(&MAGIC);
    h[4..6].copy_from_slice(&VERSION.to_le_bytes());
    h[6] = kind as u8;
    h[7] = 0;
    h[8..16].copy_from_slice(&id.to_le_bytes());
    h[16..18].copy_from_slice(&(name_len as u16).to_le_bytes());
    h[18..20].copy_from_slice(&(fds as u16).to_le_bytes());
    h[20..24].copy_from_slice(&(payload_len as u32).to_le_bytes());
    h
}

/// Decodes and validates one datagram that arrived with `fds` descriptors.
pub(crate) fn decode(d: &[u8], fds: usize) -> Result<Decoded<'_>, Reject> {
    let Some(h) = d.get(..HEADER_LEN) else {
        return Err(Reject::Short { len: d.len() });
    };
    let u16_at = |i: usize| u16::from_le_bytes([h[i], h[i + 1]]);
    if h[0..4] != MAGIC {
        return Err(Reject::BadMagic);
    }
    let version = u16_at(4);
    if version != VERSION {
        return Err(Reject::BadVersion { version });
    }
    let kind = Kind::from_u8(h[6]).ok_or(Reject::BadKind { kind: h[6] })?;
    if h[7] != 0 {
        return Err(Reject::BadFlags { flags: h[7] });
    }
    let mut id = [0u8; 8];
    id.copy_from_slice(&h[8..16]);
    let id = u64::from_le_bytes(id);
    if (kind == Kind::OneWay) != (id == 0) {
        return Err(Reject::BadId { kind, id });
    }
    let name_len = usize::from(u16_at(16));
    let announced_fds = usize::from(u16_at(18));
    let payload_len = u32::from_le_bytes([h[20], h[21], h[22], h[23]]) as usize;
    if name_len == 0 || name_len > MAX_NAME {
        return Err(Reject::NameLength { len: name_len });
    }
    if payload_len > MAX_PAYLOAD {
        return Err(Reject::PayloadLength { len: payload_len });
    }
    let announced = HEADER_LEN + name_len + payload_len;
    if announced != d.len() {
        return Err(Reject::LengthMismatch {
            announced,
            got: d.len(),
        });
    }
    if announced_fds != fds {
        return Err(Reject::FdCount {
            announced: announced_fds,
            got: fds,
        });
    }
    if kind.is_bodiless() && (payload_len != 0 || fds != 0) {
        return Err(Reject::BodyOnAnswer { kind });
    }
    let name = std::str::from_utf8(&d[HEADER_LEN..HEADER_LEN + name_len])
        .map_err(|_| Reject::NameNotUtf8)?;
    if check_name(name).is_err() {
        return Err(Reject::BadNameChar);
    }
    Ok(Decoded {
        kind,
        id,
        name,
        payload: &d[HEADER_LEN + name_len..],
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn encode(kind: Kind, id: u64, name: &str, payload: &[u8], fds: usize) -> Vec<u8> {
        let mut v = header(kind, id, name.len(), payload.len(), fds).to_vec();
        v.extend_from_slice(name.as_bytes());
        v.extend_from_slice(payload);
        v
    }

    #[test]
    fn round_trip_every_kind() {
        let cases = [
            (Kind::OneWay, 0, "mp_malloc_sync", &b"abc"[..], 0),
            (Kind::Request, 1, "r", &[][..], 3),
            (Kind::Reply, u64::MAX, "n\u{e9}e", &[0u8; 100][..], MAX_FDS),
            (Kind::NoHandler, 7, "x", &[][..], 0),
            (Kind::NoReply, 8, "x", &[][..], 0),
            (Kind::Busy, 9, "x", &[][..], 0),
        ];
        for (kind, id, name, payload, fds) in cases {
            let d = encode(kind, id, name, payload, fds);
            assert_eq!(
                decode(&d, fds),
                Ok(Decoded {
                    kind,
                    id,
                    name,
                    payload
                })
            );
        }
    }

    #[test]
    fn largest_datagram_round_trips() {
        let name = "n".repeat(MAX_NAME);
        let payload = vec![0xa5; MAX_PAYLOAD];
        let d = encode(Kind::Request, 42, &name, &payload, MAX_FDS);
        assert_eq!(d.len(), MAX_DATAGRAM);
        let got = decode(&d, MAX_FDS).unwrap();
        assert_eq!(got.name, name);
        assert_eq!(got.payload, &payload[..]);
    }

    #[test]
    fn malformed_datagrams_are_rejected() {
        let good = encode(Kind::Request, 5, "name", b"payload", 2);
        assert!(decode(&good, 2).is_ok());
        let with = |f: &dyn Fn(&mut Vec<u8>)| {
            let mut d = good.clone();
            f(&mut d);
            d
        };
        let cases: Vec<(Vec<u8>, usize, Reject)> = vec![
            (vec![], 2, Reject::Short { len: 0 }),
            (good[..23].to_vec(), 2, Reject::Short { len: 23 }),
            (with(&|d| d[0] = b'X'), 2, Reject::BadMagic),
            (with(&|d| d[4] = 2), 2, Reject::BadVersion { version: 2 }),
            (with(&|d| d[6] = 0), 2, Reject::BadKind { kind: 0 }),
            (with(&|d| d[6] = 7), 2, Reject::BadKind { kind: 7 }),
            (with(&|d| d[7] = 1), 2, Reject::BadFlags { flags: 1 }),
            (
                with(&|d| d[8..16].fill(0)),
                2,
                Reject::BadId {
                    kind: Kind::Request,
                    id: 0,
                },
            ),
            (
                with(&|d| d[6] = Kind::OneWay as u8),
                2,
                Reject::BadId {
                    kind: Kind::OneWay,
                    id: 5,
                },
            ),
            (
                with(&|d| d[16..18].fill(0)),
                2,
                Reject::NameLength { len: 0 },
            ),
            (
                with(&|d| d[16..18].copy_from_slice(&64u16.to_le_bytes())),
                2,
                Reject::NameLength { len: 64 },
            ),
            (
                with(&|d| d[20..24].copy_from_slice(&u32::MAX.to_le_bytes())),
                2,
                Reject::PayloadLength {
                    len: u32::MAX as usize,
                },
            ),
            (
                with(&|d| d[20..24].copy_from_slice(&((MAX_PAYLOAD + 1) as u32).to_le_bytes())),
                2,
                Reject::PayloadLength {
                    len: MAX_PAYLOAD + 1,
                },
            ),
            // Lengths that lie: payload longer than announced, shorter, name
            // length eating into the payload.
            (
                with(&|d| d.push(0)),
                2,
                Reject::LengthMismatch {
                    announced: 35,
                    got: 36,
                },
            ),
            (
                with(&|d| {
                    d.pop();
                }),
                2,
                Reject::LengthMismatch {
                    announced: 35,
                    got: 34,
                },
            ),
            (
                with(&|d| d[20..24].copy_from_slice(&100u32.to_le_bytes())),
                2,
                Reject::LengthMismatch {
                    announced: 128,
                    got: 35,
                },
            ),
            // More fds than announced, fewer than announced.
            (
                good.clone(),
                3,
                Reject::FdCount {
                    announced: 2,
                    got: 3,
                },
            ),
            (
                good.clone(),
                0,
                Reject::FdCount {
                    announced: 2,
                    got: 0,
                },
            ),
            (with(&|d| d[24] = 0xff), 2, Reject::NameNotUtf8),
            (with(&|d| d[24] = b'\n'), 2, Reject::BadNameChar),
            (with(&|d| d[24] = 0), 2, Reject::BadNameChar),
        ];
        for (i, (d, fds, want)) in cases.into_iter().enumerate() {
            assert_eq!(decode(&d, fds), Err(want), "case {i}");
        }
        // Bodiless answers with a body or fds.
        let d = encode(Kind::NoHandler, 5, "x", b"p", 0);
        assert_eq!(
            decode(&d, 0),
            Err(Reject::BodyOnAnswer {
                kind: Kind::NoHandler
            })
        );
        let d = encode(Kind::Busy, 5, "x", b"", 1);
        assert_eq!(
            decode(&d, 1),
            Err(Reject::BodyOnAnswer { kind: Kind::Busy })
        );
    }

    #[test]
    fn every_short_prefix_and_random_bytes_are_rejected_without_panic() {
        let good = encode(Kind::Reply, 9, "abc", &[1, 2, 3, 4], 0);
        for n in 0..good.len() {
            assert!(decode(&good[..n], 0).is_err(), "prefix {n}");
        }
        // Cheap xorshift noise: must never panic, and almost never decode.
        let mut x = 0x1234_5678_9abc_def0u64;
        let mut buf = [0u8; 96];
        for _ in 0..20_000 {
            for b in &mut buf {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                *b = x as u8;
            }
            let len = (x % 97) as usize;
            assert!(decode(&buf[..len], (x >> 40) as usize % 4).is_err());
        }
    }

    #[test]
    fn names() {
        assert!(check_name("mp_malloc_request").is_ok());
        assert!(check_name(&"a".repeat(63)).is_ok());
        assert!(check_name("").is_err());
        assert!(check_name(&"a".repeat(64)).is_err());
        assert!(check_name("a\0b").is_err());
        assert!(check_name("a\tb").is_err());
    }
}
