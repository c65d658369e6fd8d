//! PROXY protocol (HAProxy's, versions 1 and 2): bytes in, Need/Done/Reject
//! out, and the v2 header we send to backends. No I/O. Never blocks, never
//! panics on input, never reads past what it is given, and depends on
//! nothing but `std`.
//!
//! [`parse`] is handed everything read from an upstream so far and answers:
//!
//! - `Ok(Parse::NeedMore)`: the bytes are a valid prefix of a PROXY header;
//!   read more and call again with the whole buffer. Every byte of a buffer
//!   that needs more belongs to the header, so the caller may consume it all
//!   without eating into the ClientHello behind it.
//! - `Ok(Parse::Done(header))`: a whole header is in hand;
//!   [`Header::len`] bytes of the buffer are the header, the rest is the
//!   client's stream.
//! - `Err(reject)`: these bytes cannot begin a PROXY header. Rejection is
//!   early: the first byte that is neither `P` (v1) nor `\r` (v2) is
//!   rejected at once, a wrong signature byte as soon as it is in.
//!
//! # What is accepted
//!
//! - v1 (text): `PROXY TCP4 SRC DST SPORT DPORT\r\n` or the same with `TCP6`,
//!   single spaces, addresses of the named family, decimal ports 0–65535
//!   without leading zeros; the whole line at most 107 bytes
//!   ([`V1_MAX_LEN`]). `PROXY UNKNOWN` followed by anything up to `\r\n` is
//!   accepted with no addresses (the receiver must ignore what follows).
//! - v2 (binary): the 12-byte signature, version 2, command `LOCAL` (no
//!   addresses: the connection is the upstream's own, e.g. a health check)
//!   or `PROXY`; family `AF_INET`/`AF_INET6` over `STREAM` gives addresses,
//!   `AF_UNSPEC` and `AF_UNIX` stream give none. Datagram transports, an
//!   unknown family, version or command, or an address block shorter than
//!   its family needs are rejected. What follows the addresses must be
//!   well-formed TLVs (type, 16-bit length, value); they are skipped, never
//!   interpreted. The declared length is at most 65535, so a header is at
//!   most 65551 bytes.
//!
//! "No addresses" is [`Addresses::Local`]: the caller uses the socket's own
//! peer address.
//!
//! Only enable PROXY protocol on a listener whose every upstream is trusted:
//! whoever can connect to it can claim any client address.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// Longest v1 header, `\r\n` included (the spec's 107 bytes).
pub const V1_MAX_LEN: usize = 107;

/// The v2 signature: `\r\n\r\n\0\r\nQUIT\n`.
pub const V2_SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";

/// Fixed part of a v2 header: signature, version/command, family, length.
pub const V2_HEADER_LEN: usize = 16;

/// Longest v2 header: the fixed part plus a 16-bit declared length.
pub const V2_MAX_LEN: usize = V2_HEADER_LEN + u16::MAX as usize;

const V1_PREFIX: &[u8] = b"PROXY ";
const V2_VERSION: u8 = 0x2;
const V2_COMMAND_LOCAL: u8 = 0x0;
const V2_COMMAND_PROXY: u8 = 0x1;
const V2_FAMILY_UNSPEC: u8 = 0x00;
const V2_TCP4: u8 = 0x11;
const V2_UDP4: u8 = 0x12;
const V2_TCP6: u8 = 0x21;
const V2_UDP6: u8 = 0x22;
const V2_UNIX_STREAM: u8 = 0x31;
const V2_UNIX_DGRAM: u8 = 0x32;
const V2_TCP4_ADDR_LEN: usize = 12;
const V2_TCP6_ADDR_LEN: usize = 36;
const V2_UNIX_ADDR_LEN: usize = 216;
const TLV_HEADER_LEN: usize = 3;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Parse {
    /// A valid prefix of a header: every byte so far is header; read more.
    NeedMore,
    /// A whole header is in hand.
    Done(Header),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub version: Version,
    /// Bytes of the input that make up the header.
    pub len: usize,
    pub addresses: Addresses,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Version {
    V1,
    V2,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Addresses {
    /// No client address carried (v1 `UNKNOWN`, v2 `LOCAL`, `AF_UNSPEC` or
    /// `AF_UNIX`): use the socket's own peer.
    Local,
    /// The client (`source`) and the address it connected to (`destination`).
    Tcp {
        source: SocketAddr,
        destination: SocketAddr,
    },
}

/// Why the bytes cannot be a PROXY header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Reject {
    /// Neither the v1 `PROXY ` prefix nor the v2 signature.
    NotProxy,
    /// No `\r\n` within [`V1_MAX_LEN`] bytes, or a bare `\n`.
    V1LineTooLong,
    /// A v1 line that is not `PROXY TCP4|TCP6|UNKNOWN ...` with the right fields.
    V1Malformed,
    /// A v1 address that is not an address of the named family.
    V1BadAddress,
    /// A v1 port that is not a decimal number 0–65535 without leading zeros.
    V1BadPort,
    /// A v2 version nibble other than 2.
    V2BadVersion,
    /// A v2 command other than `LOCAL` or `PROXY`.
    V2BadCommand,
    /// A v2 address family or transport we do not carry (datagram, unknown).
    V2BadFamily,
    /// A v2 address block shorter than its family needs.
    V2ShortAddresses,
    /// TLVs after the addresses that overrun the header.
    V2BadTlv,
}

impl fmt::Display for Reject {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Reject::NotProxy => "not a PROXY protocol header",
            Reject::V1LineTooLong => "PROXY v1 line has no CRLF within 107 bytes (or a bare LF)",
            Reject::V1Malformed => "PROXY v1 line is malformed",
            Reject::V1BadAddress => "PROXY v1 address is not valid for its protocol",
            Reject::V1BadPort => "PROXY v1 port is not a number from 0 to 65535",
            Reject::V2BadVersion => "PROXY v2 version is not 2",
            Reject::V2BadCommand => "PROXY v2 command is neither LOCAL nor PROXY",
            Reject::V2BadFamily => {
                "PROXY v2 family/transport is not TCP over IPv4/IPv6, UNIX stream or UNSPEC"
            }
            Reject::V2ShortAddresses => "PROXY v2 address block is too short for its family",
            Reject::V2BadTlv => "PROXY v2 TLVs overrun the header",
        })
    }
}

impl std::error::Error for Reject {}

/// Parses the PROXY header at the start of `input` (see the module doc).
pub fn parse(input: &[u8]) -> Result<Parse, Reject> {
    match input.first() {
        None => Ok(Parse::NeedMore),
        Some(b'P') => parse_v1(input),
        Some(b'\r') => parse_v2(input),
        Some(_) => Err(Reject::NotProxy),
    }
}

fn parse_v1(input: &[u8]) -> Result<Parse, Reject> {
    let prefix = input.len().min(V1_PREFIX.len());
    if input[..prefix] != V1_PREFIX[..prefix] {
        return Err(Reject::NotProxy);
    }
    let window = &input[..input.len().min(V1_MAX_LEN)];
    let Some(newline) = window.iter().position(|&b| b == b'\n') else {
        return if input.len() >= V1_MAX_LEN {
            Err(Reject::V1LineTooLong)
        } else {
            Ok(Parse::NeedMore)
        };
    };
    if newline == 0 || window[newline - 1] != b'\r' {
        return Err(Reject::V1LineTooLong);
    }
    let line = &window[V1_PREFIX.len().min(newline - 1)..newline - 1];
    let addresses = parse_v1_fields(line)?;
    Ok(Parse::Done(Header {
        version: Version::V1,
        len: newline + 1,
        addresses,
    }))
}

/// `TCP4 SRC DST SPORT DPORT`, `TCP6 ...` or `UNKNOWN[ anything]`.
fn parse_v1_fields(line: &[u8]) -> Result<Addresses, Reject> {
    if line == b"UNKNOWN" || line.starts_with(b"UNKNOWN ") {
        return Ok(Addresses::Local);
    }
    let mut fields = line.split(|&b| b == b' ');
    let protocol = fields.next().ok_or(Reject::V1Malformed)?;
    let (Some(src), Some(dst), Some(sport), Some(dport), None) = (
        fields.next(),
        fields.next(),
        fields.next(),
        fields.next(),
        fields.next(),
    ) else {
        return Err(Reject::V1Malformed);
    };
    let (source, destination) = match protocol {
        b"TCP4" => (IpAddr::V4(v1_address(src)?), IpAddr::V4(v1_address(dst)?)),
        b"TCP6" => (IpAddr::V6(v1_address(src)?), IpAddr::V6(v1_address(dst)?)),
        _ => return Err(Reject::V1Malformed),
    };
    Ok(Addresses::Tcp {
        source: SocketAddr::new(source, v1_port(sport)?),
        destination: SocketAddr::new(destination, v1_port(dport)?),
    })
}

fn v1_address<A: std::str::FromStr>(field: &[u8]) -> Result<A, Reject> {
    std::str::from_utf8(field)
        .ok()
        .and_then(|text| text.parse().ok())
        .ok_or(Reject::V1BadAddress)
}

fn v1_port(field: &[u8]) -> Result<u16, Reject> {
    let valid = !field.is_empty()
        && field.len() <= 5
        && field.iter().all(u8::is_ascii_digit)
        && (field.len() == 1 || field[0] != b'0');
    if !valid {
        return Err(Reject::V1BadPort);
    }
    let value = field
        .iter()
        .fold(0u32, |n, &d| n * 10 + u32::from(d - b'0'));
    u16::try_from(value).map_err(|_| Reject::V1BadPort)
}

fn parse_v2(input: &[u8]) -> Result<Parse, Reject> {
    let prefix = input.len().min(V2_SIGNATURE.len());
    if input[..prefix] != V2_SIGNATURE[..prefix] {
        return Err(Reject::NotProxy);
    }
    // Judge the version, command and family as soon as their bytes are in.
    let command = match input.get(12) {
        None => return Ok(Parse::NeedMore),
        Some(&byte) => {
            if byte >> 4 != V2_VERSION {
                return Err(Reject::V2BadVersion);
            }
            match byte & 0x0f {
                V2_COMMAND_LOCAL => V2_COMMAND_LOCAL,
                V2_COMMAND_PROXY => V2_COMMAND_PROXY,
                _ => return Err(Reject::V2BadCommand),
            }
        }
    };
    let family = match input.get(13) {
        None => return Ok(Parse::NeedMore),
        Some(&family) => family,
    };
    if command == V2_COMMAND_PROXY {
        match family {
            V2_FAMILY_UNSPEC | V2_TCP4 | V2_TCP6 | V2_UNIX_STREAM => {}
            V2_UDP4 | V2_UDP6 | V2_UNIX_DGRAM => return Err(Reject::V2BadFamily),
            _ => return Err(Reject::V2BadFamily),
        }
    }
    if input.len() < V2_HEADER_LEN {
        return Ok(Parse::NeedMore);
    }
    let declared = usize::from(u16::from_be_bytes([input[14], input[15]]));
    let needed = match family {
        V2_TCP4 => V2_TCP4_ADDR_LEN,
        V2_TCP6 => V2_TCP6_ADDR_LEN,
        V2_UNIX_STREAM => V2_UNIX_ADDR_LEN,
        _ => 0,
    };
    // LOCAL ignores the family and whatever the block holds.
    if command == V2_COMMAND_PROXY && declared < needed {
        return Err(Reject::V2ShortAddresses);
    }
    let total = V2_HEADER_LEN + declared;
    let Some(block) = input.get(V2_HEADER_LEN..total) else {
        return Ok(Parse::NeedMore);
    };
    let header = |addresses| {
        Ok(Parse::Done(Header {
            version: Version::V2,
            len: total,
            addresses,
        }))
    };
    if command == V2_COMMAND_LOCAL {
        return header(Addresses::Local);
    }
    check_tlvs(&block[needed..])?;
    let addresses = match family {
        V2_TCP4 => {
            let ip =
                |at: usize| Ipv4Addr::new(block[at], block[at + 1], block[at + 2], block[at + 3]);
            Addresses::Tcp {
                source: SocketAddr::new(IpAddr::V4(ip(0)), port_at(block, 8)),
                destination: SocketAddr::new(IpAddr::V4(ip(4)), port_at(block, 10)),
            }
        }
        V2_TCP6 => {
            let ip = |at: usize| {
                let mut octets = [0u8; 16];
                octets.copy_from_slice(&block[at..at + 16]);
                Ipv6Addr::from(octets)
            };
            Addresses::Tcp {
                source: SocketAddr::new(IpAddr::V6(ip(0)), port_at(block, 32)),
                destination: SocketAddr::new(IpAddr::V6(ip(16)), port_at(block, 34)),
            }
        }
        _ => Addresses::Local,
    };
    header(addresses)
}

fn port_at(block: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([block[at], block[at + 1]])
}

/// Checks that `tlvs` is a sequence of whole type-length-value entries.
fn check_tlvs(mut tlvs: &[u8]) -> Result<(), Reject> {
    while !tlvs.is_empty() {
        if tlvs.len() < TLV_HEADER_LEN {
            return Err(Reject::V2BadTlv);
        }
        let len = usize::from(u16::from_be_bytes([tlvs[1], tlvs[2]]));
        tlvs = tlvs.get(TLV_HEADER_LEN + len..).ok_or(Reject::V2BadTlv)?;
    }
    Ok(())
}

/// Appends a v2 `PROXY` header for a TCP connection from `source` to
/// `destination` to `out`: `TCP4` when both are IPv4 (IPv4-mapped IPv6
/// counts as IPv4), `TCP6` otherwise (an IPv4 side is written mapped). No
/// TLVs. Returns the number of bytes appended (28 or 52).
pub fn encode_v2(source: SocketAddr, destination: SocketAddr, out: &mut Vec<u8>) -> usize {
    let start = out.len();
    out.extend_from_slice(&V2_SIGNATURE);
    out.push(V2_VERSION << 4 | V2_COMMAND_PROXY);
    match (source.ip().to_canonical(), destination.ip().to_canonical()) {
        (IpAddr::V4(src), IpAddr::V4(dst)) => {
            out.push(V2_TCP4);
            out.extend_from_slice(&(V2_TCP4_ADDR_LEN as u16).to_be_bytes());
            out.extend_from_slice(&src.octets());
            out.extend_from_slice(&dst.octets());
        }
        (src, dst) => {
            let v6 = |ip: IpAddr| match ip {
                IpAddr::V4(v4) => v4.to_ipv6_mapped(),
                IpAddr::V6(v6) => v6,
            };
            out.push(V2_TCP6);
            out.extend_from_slice(&(V2_TCP6_ADDR_LEN as u16).to_be_bytes());
            out.extend_from_slice(&v6(src).octets());
            out.extend_from_slice(&v6(dst).octets());
        }
    }
    out.extend_from_slice(&source.port().to_be_bytes());
    out.extend_from_slice(&destination.port().to_be_bytes());
    out.len() - start
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sa(text: &str) -> SocketAddr {
        text.parse().unwrap()
    }

    fn done(input: &[u8]) -> Header {
        match parse(input) {
            Ok(Parse::Done(header)) => header,
            other => panic!("{input:?} gave {other:?}"),
        }
    }

    /// Every strict prefix of a complete header needs more; the whole header
    /// is done; bytes after it change nothing.
    fn check_all_prefixes(header: &[u8]) -> Header {
        for cut in 0..header.len() {
            assert_eq!(
                parse(&header[..cut]),
                Ok(Parse::NeedMore),
                "prefix of {cut} bytes"
            );
        }
        let found = done(header);
        assert_eq!(found.len, header.len());
        let mut longer = header.to_vec();
        longer.extend_from_slice(&[0x16, 0x03, 0x01, 0x00, 0x05, b'\r', b'\n']);
        assert_eq!(done(&longer), found);
        found
    }

    fn v2(command: u8, family: u8, block: &[u8]) -> Vec<u8> {
        let mut out = V2_SIGNATURE.to_vec();
        out.push(0x20 | command);
        out.push(family);
        out.extend_from_slice(&(block.len() as u16).to_be_bytes());
        out.extend_from_slice(block);
        out
    }

    fn tcp4_block(tlvs: &[u8]) -> Vec<u8> {
        let mut block = vec![81, 2, 69, 142, 10, 0, 0, 1];
        block.extend_from_slice(&51234u16.to_be_bytes());
        block.extend_from_slice(&443u16.to_be_bytes());
        block.extend_from_slice(tlvs);
        block
    }

    #[test]
    fn v1_tcp4_tcp6_and_unknown() {
        let header = check_all_prefixes(b"PROXY TCP4 81.2.69.142 10.0.0.1 51234 443\r\n");
        assert_eq!(header.version, Version::V1);
        assert_eq!(
            header.addresses,
            Addresses::Tcp {
                source: sa("81.2.69.142:51234"),
                destination: sa("10.0.0.1:443")
            }
        );
        let header = check_all_prefixes(b"PROXY TCP6 2001:db8::1 ::1 65535 0\r\n");
        assert_eq!(
            header.addresses,
            Addresses::Tcp {
                source: sa("[2001:db8::1]:65535"),
                destination: sa("[::1]:0")
            }
        );
        assert_eq!(
            check_all_prefixes(b"PROXY UNKNOWN\r\n").addresses,
            Addresses::Local
        );
        assert_eq!(
            check_all_prefixes(b"PROXY UNKNOWN ffff::1 whatever 1 2\r\n").addresses,
            Addresses::Local
        );
    }

    #[test]
    fn longest_v1_line_is_accepted() {
        let line = b"PROXY TCP6 ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff 65535 65535\r\n";
        assert_eq!(line.len(), 104);
        check_all_prefixes(line);
        let mut unknown = b"PROXY UNKNOWN ".to_vec();
        unknown.resize(V1_MAX_LEN - 2, b'x');
        unknown.extend_from_slice(b"\r\n");
        assert_eq!(check_all_prefixes(&unknown).len, V1_MAX_LEN);
        let mut too_long = b"PROXY UNKNOWN ".to_vec();
        too_long.resize(V1_MAX_LEN - 1, b'x');
        too_long.extend_from_slice(b"\r\n");
        assert_eq!(parse(&too_long), Err(Reject::V1LineTooLong));
    }

    #[test]
    fn bad_v1_lines_are_rejected() {
        for (line, reject) in [
            (
                &b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n"[..],
                Reject::V1LineTooLong,
            ),
            (b"PROXY TCP4 1.2.3.4 5.6.7.8 1\r\n", Reject::V1Malformed),
            (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 3\r\n", Reject::V1Malformed),
            (b"PROXY TCP4  1.2.3.4 5.6.7.8 1 2\r\n", Reject::V1Malformed),
            (b"PROXY TCP5 1.2.3.4 5.6.7.8 1 2\r\n", Reject::V1Malformed),
            (b"PROXY tcp4 1.2.3.4 5.6.7.8 1 2\r\n", Reject::V1Malformed),
            (b"PROXY \r\n", Reject::V1Malformed),
            (b"PROXY TCP4 ::1 5.6.7.8 1 2\r\n", Reject::V1BadAddress),
            (b"PROXY TCP6 1.2.3.4 ::1 1 2\r\n", Reject::V1BadAddress),
            (b"PROXY TCP4 1.2.3.4 5.6.7.08 1 2\r\n", Reject::V1BadAddress),
            (b"PROXY TCP4 1.2.3.4 5.6.7.8 65536 2\r\n", Reject::V1BadPort),
            (b"PROXY TCP4 1.2.3.4 5.6.7.8 01 2\r\n", Reject::V1BadPort),
            (b"PROXY TCP4 1.2.3.4 5.6.7.8 +1 2\r\n", Reject::V1BadPort),
            (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 \r\n", Reject::V1BadPort),
            (
                b"PROXY TCP4 1.2.3.4 5.6.7.8 1 99999999999\r\n",
                Reject::V1BadPort,
            ),
            (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 \r\n", Reject::V1Malformed),
            (b"PROXY\r\n", Reject::NotProxy),
            (b"PROXZ", Reject::NotProxy),
            (b"\x16\x03\x01\x02\x00", Reject::NotProxy),
            (b"GET / HTTP/1.1\r\n", Reject::NotProxy),
        ] {
            assert_eq!(
                parse(line),
                Err(reject),
                "{:?}",
                String::from_utf8_lossy(line)
            );
        }
        // No CRLF within 107 bytes.
        assert_eq!(
            parse(&[b"PROXY ".as_slice(), &[b'1'; 200]].concat()),
            Err(Reject::V1LineTooLong)
        );
        assert_eq!(
            parse(&[b"PROXY ".as_slice(), &[b'1'; 100]].concat()),
            Ok(Parse::NeedMore)
        );
    }

    #[test]
    fn garbage_is_rejected_at_the_first_wrong_byte() {
        assert_eq!(parse(b"\x16"), Err(Reject::NotProxy));
        assert_eq!(parse(b"PR0"), Err(Reject::NotProxy));
        assert_eq!(parse(b"\r\n\r\n\0\r\nQUIT!"), Err(Reject::NotProxy));
        assert_eq!(parse(b"\r\r"), Err(Reject::NotProxy));
        let mut version1 = V2_SIGNATURE.to_vec();
        version1.push(0x11);
        assert_eq!(parse(&version1), Err(Reject::V2BadVersion));
        let mut bad_command = V2_SIGNATURE.to_vec();
        bad_command.push(0x22);
        assert_eq!(parse(&bad_command), Err(Reject::V2BadCommand));
        let mut udp = V2_SIGNATURE.to_vec();
        udp.extend_from_slice(&[0x21, V2_UDP4]);
        assert_eq!(parse(&udp), Err(Reject::V2BadFamily));
        let mut unknown_family = V2_SIGNATURE.to_vec();
        unknown_family.extend_from_slice(&[0x21, 0x41]);
        assert_eq!(parse(&unknown_family), Err(Reject::V2BadFamily));
    }

    #[test]
    fn v2_tcp4_with_tlvs_and_tcp6() {
        let tlvs = [
            0x04, 0x00, 0x00, // NOOP, empty
            0x01, 0x00, 0x02, b'h', b'2', // ALPN
            0x20, 0x00, 0x05, 0x01, 0x00, 0x00, 0x00, 0x00, // SSL
        ];
        let header = check_all_prefixes(&v2(1, V2_TCP4, &tcp4_block(&tlvs)));
        assert_eq!(header.version, Version::V2);
        assert_eq!(
            header.addresses,
            Addresses::Tcp {
                source: sa("81.2.69.142:51234"),
                destination: sa("10.0.0.1:443")
            }
        );
        let mut block = Vec::new();
        block.extend_from_slice(&"2001:db8::7".parse::<Ipv6Addr>().unwrap().octets());
        block.extend_from_slice(&Ipv6Addr::LOCALHOST.octets());
        block.extend_from_slice(&[0x01, 0x02, 0x01, 0xbb]);
        let header = check_all_prefixes(&v2(1, V2_TCP6, &block));
        assert_eq!(
            header.addresses,
            Addresses::Tcp {
                source: sa("[2001:db8::7]:258"),
                destination: sa("[::1]:443")
            }
        );
    }

    #[test]
    fn v2_local_unspec_and_unix_carry_no_address() {
        // LOCAL ignores family and block, whatever they are.
        assert_eq!(
            check_all_prefixes(&v2(0, 0, &[])).addresses,
            Addresses::Local
        );
        assert_eq!(
            check_all_prefixes(&v2(0, V2_UDP6, &[1, 2, 3])).addresses,
            Addresses::Local
        );
        assert_eq!(
            check_all_prefixes(&v2(0, V2_TCP4, &[])).addresses,
            Addresses::Local
        );
        assert_eq!(
            check_all_prefixes(&v2(1, V2_FAMILY_UNSPEC, &[])).addresses,
            Addresses::Local
        );
        assert_eq!(
            check_all_prefixes(&v2(1, V2_UNIX_STREAM, &[0u8; 216])).addresses,
            Addresses::Local
        );
    }

    #[test]
    fn bad_v2_blocks_are_rejected() {
        assert_eq!(
            parse(&v2(1, V2_TCP4, &[0u8; 11])),
            Err(Reject::V2ShortAddresses)
        );
        assert_eq!(
            parse(&v2(1, V2_TCP6, &[0u8; 35])),
            Err(Reject::V2ShortAddresses)
        );
        assert_eq!(
            parse(&v2(1, V2_UNIX_STREAM, &[0u8; 100])),
            Err(Reject::V2ShortAddresses)
        );
        // The short block is judged from the fixed part alone.
        assert_eq!(
            parse(&v2(1, V2_TCP4, &[0u8; 11])[..V2_HEADER_LEN]),
            Err(Reject::V2ShortAddresses)
        );
        for tlvs in [&[0x04][..], &[0x04, 0x00], &[0x01, 0x00, 0x03, b'h', b'2']] {
            assert_eq!(
                parse(&v2(1, V2_TCP4, &tcp4_block(tlvs))),
                Err(Reject::V2BadTlv),
                "{tlvs:?}"
            );
        }
    }

    #[test]
    fn v2_largest_declared_length() {
        let mut tlvs = vec![0x04];
        let value = u16::MAX as usize - V2_TCP4_ADDR_LEN - TLV_HEADER_LEN;
        tlvs.extend_from_slice(&(value as u16).to_be_bytes());
        tlvs.resize(tlvs.len() + value, 0);
        let header = v2(1, V2_TCP4, &tcp4_block(&tlvs));
        assert_eq!(header.len(), V2_MAX_LEN);
        assert_eq!(parse(&header[..V2_MAX_LEN - 1]), Ok(Parse::NeedMore));
        assert_eq!(done(&header).len, V2_MAX_LEN);
    }

    #[test]
    fn encode_v2_round_trips() {
        for (source, destination, len) in [
            ("81.2.69.142:51234", "127.0.0.1:443", 28),
            ("[::ffff:81.2.69.142]:1", "[::ffff:127.0.0.1]:2", 28),
            ("[2001:db8::1]:1", "[::1]:443", 52),
            ("81.2.69.142:7", "[::1]:443", 52),
        ] {
            let mut out = vec![0xaa];
            assert_eq!(encode_v2(sa(source), sa(destination), &mut out), len);
            assert_eq!(out.len(), len + 1);
            let header = check_all_prefixes(&out[1..]);
            let Addresses::Tcp {
                source: got_source,
                destination: got_destination,
            } = header.addresses
            else {
                panic!("no addresses");
            };
            assert_eq!(
                got_source.ip().to_canonical(),
                sa(source).ip().to_canonical()
            );
            assert_eq!(got_source.port(), sa(source).port());
            assert_eq!(
                got_destination.ip().to_canonical(),
                sa(destination).ip().to_canonical()
            );
            assert_eq!(got_destination.port(), sa(destination).port());
        }
    }

    /// The promises the fuzz target checks, for one input.
    fn check_promises(data: &[u8]) {
        match parse(data) {
            Ok(Parse::Done(header)) => {
                assert!(header.len <= data.len());
                assert_eq!(check_all_prefixes(&data[..header.len]), header);
            }
            Ok(Parse::NeedMore) => {
                assert!(data.len() < V2_MAX_LEN);
                for cut in 0..data.len() {
                    assert_eq!(parse(&data[..cut]), Ok(Parse::NeedMore));
                }
            }
            Err(reject) => {
                let longer = [data, b" 1\r\n\x16\x03\x01"].concat();
                assert_eq!(parse(&longer), Err(reject));
            }
        }
    }

    #[test]
    fn fuzz_corpus_replays_keep_the_promises() {
        let dir = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../fuzz/corpus/proxy_protocol"
        );
        let mut count = 0;
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            check_promises(&std::fs::read(&path).unwrap());
            count += 1;
        }
        assert!(count >= 10, "only {count} corpus files in {dir}");
    }

    #[test]
    fn encode_v2_matches_the_spec_example_bytes() {
        let mut out = Vec::new();
        encode_v2(sa("192.0.2.1:4660"), sa("198.51.100.2:443"), &mut out);
        assert_eq!(
            out,
            [
                0x0d, 0x0a, 0x0d, 0x0a, 0x00, 0x0d, 0x0a, 0x51, 0x55, 0x49, 0x54,
                0x0a, // signature
                0x21, 0x11, 0x00, 0x0c, // v2 PROXY, TCP4, 12 bytes
                192, 0, 2, 1, 198, 51, 100, 2, // addresses
                0x12, 0x34, 0x01, 0xbb, // ports
            ]
        );
    }
}
