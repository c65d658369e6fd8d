use super::build::{self, Client, PADDING, PING};
use super::*;
use crate::hello::build::hello_message;
use crate::hello::checks::XorShift;

thread_local! {
    /// What [`work`] counted on this thread.
    pub(super) static WORK: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// The datagrams of tests/data/quic/ (see its README).
const AIOQUIC: &[u8] = include_bytes!("../../../../tests/data/quic/aioquic-h3-aioquic.test.1.bin");
const CHROMIUM_1: &[u8] =
    include_bytes!("../../../../tests/data/quic/chromium156-h3-chromium.test.1.bin");
const CHROMIUM_2: &[u8] =
    include_bytes!("../../../../tests/data/quic/chromium156-h3-chromium.test.2.bin");
/// RFC 9001 Appendix A.2 and RFC 9369 Appendix A.2: the protected client
/// Initial.
const RFC9001_A2: &[u8] =
    include_bytes!("../../../../tests/data/quic/rfc9001-a2-client-initial.bin");
const RFC9369_A2: &[u8] =
    include_bytes!("../../../../tests/data/quic/rfc9369-a2-client-initial.bin");

/// The appendices' DCID, and the start of their Initial's payload (one
/// CRYPTO frame with a ClientHello for example.com), which 917 zero bytes
/// of PADDING follow.
const RFC_DCID: &str = "8394c8f03e515708";
const RFC_PAYLOAD: &str = "\
    060040f1010000ed0303ebf8fa56f12939b9584a3896472ec40bb863cfd3e868\
    04fe3a47f06a2b69484c00000413011302010000c000000010000e00000b6578\
    616d706c652e636f6dff01000100000a00080006001d00170018001000070005\
    04616c706e000500050100000000003300260024001d00209370b2c9caa47fba\
    baf4559fedba753de171fa71f50f1ce15d43e994ec74d748002b000302030400\
    0d0010000e0403050306030203080408050806002d00020101001c0002400100\
    3900320408ffffffffffffffff05048000ffff07048000ffff08011001048000\
    75300901100f088394c8f03e51570806048000ffff";

fn hex(text: &str) -> Vec<u8> {
    let digits: Vec<u8> = text.bytes().filter(u8::is_ascii_hexdigit).collect();
    digits
        .chunks(2)
        .map(|pair| u8::from_str_radix(std::str::from_utf8(pair).unwrap(), 16).unwrap())
        .collect()
}

fn rfc_payload() -> Vec<u8> {
    let mut payload = hex(RFC_PAYLOAD);
    payload.resize(payload.len() + 917, 0);
    payload
}

fn done(answer: Result<Parse, Reject>) -> InitialHello {
    match answer {
        Ok(Parse::Done(hello)) => hello,
        other => panic!("expected Done, got {other:?}"),
    }
}

fn read_all(datagrams: &[&[u8]]) -> Vec<Result<Parse, Reject>> {
    let mut reader = InitialReader::new();
    let mut scratch = Vec::new();
    datagrams
        .iter()
        .map(|datagram| reader.read(datagram, &mut scratch))
        .collect()
}

/// The answer after the last datagram.
fn read_last(datagrams: &[&[u8]]) -> Result<Parse, Reject> {
    read_all(datagrams).pop().expect("a datagram")
}

const DCID: &[u8] = &[0xd1, 0xc1, 0xd0, 1, 2, 3, 4, 5];
const SCID: &[u8] = &[0x5c, 0x1d, 9];

fn client(version: Version) -> Client {
    Client::new(version, DCID, SCID)
}

/// A small hello for `sni` with ALPN h3, as a handshake message.
fn message(sni: &str, padding: usize) -> Vec<u8> {
    // hello::build's message has no ALPN: splice one in before its
    // extensions end, fixing the lengths.
    let mut message = hello_message(Some(sni), padding);
    let alpn = [0x00, 0x10, 0x00, 0x05, 0x00, 0x03, 0x02, b'h', b'3'];
    message.extend_from_slice(&alpn);
    let body_len = message.len() - 4;
    message[1..4].copy_from_slice(&(body_len as u32).to_be_bytes()[1..]);
    // The extensions block length sits after the 2+32+33+4+2 fixed bytes.
    let at = 4 + 2 + 32 + 33 + 4 + 2;
    let extensions_len = u16::from_be_bytes([message[at], message[at + 1]]) + alpn.len() as u16;
    message[at..at + 2].copy_from_slice(&extensions_len.to_be_bytes());
    message
}

// ---- RFC 9001 / RFC 9369 Appendix A --------------------------------------

#[test]
fn rfc9001_client_initial_keys() {
    let material = keys::Material::client(Version::V1, &hex(RFC_DCID));
    assert_eq!(
        material.client_initial_secret[..],
        hex("c00cf151ca5be075ed0ebfb5c80323c42d6b7db67881289af4008f1f6c357aea")
    );
    assert_eq!(material.key[..], hex("1f369613dd76d5467730efcbe3b1a22d"));
    assert_eq!(material.iv[..], hex("fa044b2f42a3fd3b46fb255c"));
    assert_eq!(material.hp[..], hex("9f50449e04a0e810283a1e9933adedd2"));
}

#[test]
fn rfc9369_client_initial_keys() {
    let material = keys::Material::client(Version::V2, &hex(RFC_DCID));
    assert_eq!(
        material.client_initial_secret[..],
        hex("14ec9d6eb9fd7af83bf5a668bc17a7e283766aade7ecd0891f70f9ff7f4bf47b")
    );
    assert_eq!(material.key[..], hex("8b1a0bc121284290a29e0971b5cd045d"));
    assert_eq!(material.iv[..], hex("91f73e2351d8fa91660e909f"));
    assert_eq!(material.hp[..], hex("45b95e15235d6f45a6b19cbcb0294ba9"));
}

/// The appendix's sample, mask, unprotected header and payload, all seen in
/// the scratch buffer the packet was decrypted in.
fn check_rfc_packet(version: Version, packet: &[u8], sample: &str, mask: &str, header: &str) {
    let keys = keys::Keys::client(version, &hex(RFC_DCID));
    let sample: [u8; 16] = hex(sample).try_into().unwrap();
    assert_eq!(packet[22..38], sample);
    assert_eq!(keys.mask(&sample)[..], hex(mask));

    let mut reader = InitialReader::new();
    let mut scratch = Vec::new();
    let hello = done(reader.read(packet, &mut scratch));
    assert_eq!(hello.sni.as_deref(), Some("example.com"));
    assert_eq!(hello.alpn, ["alpn"]);
    assert_eq!(hello.version, version);
    assert_eq!(hello.dcid.as_bytes(), hex(RFC_DCID));
    assert!(hello.scid.is_empty());
    assert_eq!(reader.dcid(), Some(hello.dcid));
    assert_eq!(scratch[..22], hex(header));
    assert_eq!(scratch[22..22 + 1162], rfc_payload());
    assert_eq!(reader.largest_pn, Some(2));
}

#[test]
fn rfc9001_client_initial_decrypts() {
    check_rfc_packet(
        Version::V1,
        RFC9001_A2,
        "d1b1c98dd7689fb8ec11d242b123dc9b",
        "437b9aec36",
        "c300000001088394c8f03e5157080000449e00000002",
    );
}

#[test]
fn rfc9369_client_initial_decrypts() {
    check_rfc_packet(
        Version::V2,
        RFC9369_A2,
        "ffe67b6abcdb4298b485dd04de806071",
        "94a0c95e80",
        "d36b3343cf088394c8f03e5157080000449e00000002",
    );
}

#[test]
fn the_builder_reproduces_the_rfc_packets() {
    for (version, packet) in [(Version::V1, RFC9001_A2), (Version::V2, RFC9369_A2)] {
        let client = Client::new(version, &hex(RFC_DCID), &[]);
        assert_eq!(
            client.initial_with(2, 4, &rfc_payload()),
            packet,
            "{version}"
        );
    }
}

#[test]
fn peek_reads_the_first_header_without_keys() {
    let Peek::Long(header) = peek(RFC9369_A2) else {
        panic!("{:?}", peek(RFC9369_A2));
    };
    assert_eq!(header.version, Version::V2);
    assert_eq!(header.kind, PacketKind::Initial);
    assert_eq!(header.dcid.as_bytes(), hex(RFC_DCID));
    assert_eq!(peek(&[]), Peek::Skipped(Skip::Empty));
    assert_eq!(peek(&[0x40, 1, 2]), Peek::Skipped(Skip::ShortHeader));
    assert_eq!(
        peek(&[0xc0, 0, 0, 0, 0, 0, 0]),
        Peek::Skipped(Skip::UnsupportedVersion(0))
    );
    assert_eq!(
        peek(&[0xc0, 0, 0, 0, 1, 21]),
        Peek::Rejected(Reject::Malformed("destination connection id"))
    );
}

// ---- captured clients ------------------------------------------------------

#[test]
fn aioquic_single_datagram_is_done() {
    let hello = done(parse(AIOQUIC));
    assert_eq!(hello.sni.as_deref(), Some("h3-aioquic.test"));
    assert_eq!(hello.alpn, ["h3"]);
    assert_eq!(hello.version, Version::V1);
    assert_eq!(hello.dcid.to_string(), "a35ca5d2774d2d77");
    assert_eq!(hello.scid.len(), 8);
}

#[test]
fn chromium_needs_both_datagrams_in_either_order() {
    for order in [[CHROMIUM_1, CHROMIUM_2], [CHROMIUM_2, CHROMIUM_1]] {
        let answers = read_all(&order);
        assert_eq!(answers[0], Ok(Parse::NeedMore));
        let hello = done(answers[1].clone());
        assert_eq!(hello.sni.as_deref(), Some("h3-chromium.test"));
        assert_eq!(hello.alpn, ["h3"]);
        assert_eq!(hello.version, Version::V1);
        assert_eq!(hello.dcid.to_string(), "56552906b91aee02");
        assert!(hello.scid.is_empty());
    }
}

#[test]
fn chromium_datagrams_repeated_or_skipped_between_change_nothing() {
    let short_header = [0x40u8; 30];
    let zero_rtt = build::long_packet(
        Version::V1,
        PacketKind::ZeroRtt,
        &hex("56552906b91aee02"),
        &[],
        &[7; 50],
    );
    let answers = read_all(&[
        CHROMIUM_1,
        CHROMIUM_1,
        &short_header,
        &zero_rtt,
        &[],
        CHROMIUM_1,
        CHROMIUM_2,
    ]);
    assert_eq!(answers[1], Ok(Parse::NeedMore));
    assert_eq!(answers[2], Ok(Parse::Skipped(Skip::ShortHeader)));
    assert_eq!(answers[3], Ok(Parse::Skipped(Skip::NoInitial)));
    assert_eq!(answers[4], Ok(Parse::Skipped(Skip::Empty)));
    assert_eq!(
        done(answers[6].clone()).sni.as_deref(),
        Some("h3-chromium.test")
    );
}

#[test]
fn every_truncation_of_the_captured_datagrams_never_gives_a_wrong_sni() {
    // aioquic's packet ends at 524; zero padding follows it to 1,200.
    for len in 0..AIOQUIC.len() {
        match parse(&AIOQUIC[..len]) {
            Ok(Parse::Done(hello)) => {
                assert!(len >= 524, "{len}");
                assert_eq!(hello.sni.as_deref(), Some("h3-aioquic.test"));
            }
            Ok(Parse::Skipped(Skip::Empty)) => assert_eq!(len, 0),
            Err(_) => assert!(len < 524, "{len}"),
            other => panic!("{len}: {other:?}"),
        }
    }
    for (whole, other) in [(CHROMIUM_1, CHROMIUM_2), (CHROMIUM_2, CHROMIUM_1)] {
        for len in 0..whole.len() {
            let cut = &whole[..len];
            for order in [[cut, other], [other, cut]] {
                match read_last(&order) {
                    Ok(Parse::Done(hello)) => panic!("{len}: {hello:?}"),
                    // An empty datagram, first or last.
                    Ok(Parse::NeedMore | Parse::Skipped(Skip::Empty)) => assert_eq!(len, 0),
                    Ok(Parse::Skipped(skip)) => panic!("{len}: {skip:?}"),
                    Err(_) => {}
                }
            }
        }
    }
}

#[test]
fn a_flipped_byte_in_the_protected_payload_fails_to_decrypt() {
    for (datagram, packet_end) in [
        (AIOQUIC, 524),
        (CHROMIUM_1, 1250),
        (CHROMIUM_2, 1250),
        (RFC9001_A2, 1200),
    ] {
        let Peek::Long(header) = peek(datagram) else {
            panic!()
        };
        // The packet number starts after the token length (0) and a
        // 2-byte Length.
        let pn_offset = 7 + header.dcid.len() + header.scid.len() + 1 + 2;
        let mut flipped = datagram.to_vec();
        for at in pn_offset + 4..packet_end {
            flipped[at] ^= 0x20;
            assert_eq!(parse(&flipped), Err(Reject::Decrypt), "byte {at}");
            flipped[at] ^= 0x20;
        }
    }
}

#[test]
fn every_flipped_byte_never_gives_a_wrong_sni() {
    let mut flipped = AIOQUIC.to_vec();
    for at in 0..flipped.len() {
        for bit in [0x01, 0x80] {
            flipped[at] ^= bit;
            if let Ok(Parse::Done(hello)) = parse(&flipped) {
                assert!(at >= 524, "{at}");
                assert_eq!(hello.sni.as_deref(), Some("h3-aioquic.test"));
            }
            flipped[at] ^= bit;
        }
    }
}

#[test]
fn the_fuzz_checks_hold_for_the_captured_and_rfc_datagrams() {
    for datagram in [AIOQUIC, CHROMIUM_1, CHROMIUM_2, RFC9001_A2, RFC9369_A2] {
        checks::check(datagram);
    }
    checks::check(&checks::join(&[CHROMIUM_1, CHROMIUM_2]));
    checks::check(&checks::join(&[CHROMIUM_2, AIOQUIC, CHROMIUM_1]));
}

// ---- building Initials -----------------------------------------------------

#[test]
fn a_built_initial_in_each_version_is_done() {
    for version in [Version::V1, Version::V2] {
        let hello = done(parse(&client(version).datagram(&message("built.test", 0))));
        assert_eq!(hello.sni.as_deref(), Some("built.test"));
        assert_eq!(hello.alpn, ["h3"]);
        assert_eq!(hello.version, version);
        assert_eq!((hello.dcid.as_bytes(), hello.scid.as_bytes()), (DCID, SCID));
    }
}

#[test]
fn a_hello_split_into_frames_of_random_sizes_orders_packets_and_datagrams_reads_the_same() {
    let mut rng = XorShift(0x5eed_0fc0_ffee);
    for round in 0..300 {
        let version = if round % 2 == 0 {
            Version::V1
        } else {
            Version::V2
        };
        let client = client(version);
        let message = message("split.test", rng.below(3000));
        let max_frame = [1, 7, 100, 1000][rng.below(4)];
        let mut frames = Vec::new();
        let mut offset = 0;
        while offset < message.len() {
            let len = (1 + rng.below(max_frame)).min(message.len() - offset);
            frames.push(build::crypto(offset as u64, &message[offset..offset + len]));
            offset += len;
        }
        rng.shuffle(&mut frames);
        let mut datagrams = Vec::new();
        let mut pn = 0;
        let mut frames = frames.into_iter().peekable();
        while frames.peek().is_some() {
            let mut datagram = Vec::new();
            for _ in 0..1 + rng.below(3) {
                let mut payload = Vec::new();
                while payload.len() < 400 {
                    let Some(frame) = frames.next() else { break };
                    if rng.below(4) == 0 {
                        payload.push(PING);
                    }
                    payload.extend(frame);
                }
                if !payload.is_empty() {
                    datagram.extend(client.initial(pn, &payload));
                    pn += 1;
                }
            }
            datagrams.push(datagram);
        }
        rng.shuffle(&mut datagrams);
        let refs: Vec<&[u8]> = datagrams.iter().map(Vec::as_slice).collect();
        let answers = read_all(&refs);
        let (last, before) = answers.split_last().unwrap();
        assert!(
            before.iter().all(|answer| *answer == Ok(Parse::NeedMore)),
            "round {round}"
        );
        let hello = done(last.clone());
        assert_eq!(hello.sni.as_deref(), Some("split.test"), "round {round}");
        assert_eq!(hello.alpn, ["h3"]);
    }
}

#[test]
fn fuzz_checks_hold_for_plaintext_inputs() {
    let message = message("plain.test", 500);
    let first = build::crypto(0, &message[..300]);
    let mut second = vec![PING];
    second.extend(build::ack(5, 2, &[(1, 1)], None));
    second.extend(build::crypto(300, &message[300..]));
    second.extend([PADDING; 10]);
    checks::check(&checks::join(&[&first, &second]));
    checks::check(&checks::join(&[&second, &first]));
    checks::check(&checks::join(&[&build::crypto(0, &message)]));
}

// ---- what is skipped -------------------------------------------------------

#[test]
fn datagrams_without_a_client_initial_are_skipped() {
    assert_eq!(parse(&[]), Ok(Parse::Skipped(Skip::Empty)));
    assert_eq!(parse(&[0x00; 1200]), Ok(Parse::Skipped(Skip::ShortHeader)));
    assert_eq!(
        parse(&[0x41, 1, 2, 3]),
        Ok(Parse::Skipped(Skip::ShortHeader))
    );
    let mut other_version = client(Version::V1).datagram(&message("x.test", 0));
    other_version[1..5].copy_from_slice(&0xff00_001du32.to_be_bytes());
    assert_eq!(
        parse(&other_version),
        Ok(Parse::Skipped(Skip::UnsupportedVersion(0xff00_001d)))
    );
    let version_negotiation = [0x80, 0, 0, 0, 0, 8, 1, 2, 3, 4, 5, 6, 7, 8, 0, 0, 0, 0, 1];
    assert_eq!(
        parse(&version_negotiation),
        Ok(Parse::Skipped(Skip::UnsupportedVersion(0)))
    );
    for version in [Version::V1, Version::V2] {
        let mut datagram = build::long_packet(version, PacketKind::ZeroRtt, DCID, SCID, &[1; 100]);
        datagram.extend(build::long_packet(
            version,
            PacketKind::Handshake,
            DCID,
            SCID,
            &[2; 100],
        ));
        assert_eq!(parse(&datagram), Ok(Parse::Skipped(Skip::NoInitial)));
        let retry = build::long_packet(version, PacketKind::Retry, DCID, SCID, &[3; 30]);
        assert_eq!(parse(&retry), Ok(Parse::Skipped(Skip::NoInitial)));
    }
}

#[test]
fn zero_rtt_and_handshake_packets_beside_the_initial_are_stepped_over() {
    for version in [Version::V1, Version::V2] {
        let client = client(version);
        let mut datagram = build::long_packet(version, PacketKind::ZeroRtt, DCID, SCID, &[]);
        datagram.extend(client.initial(0, &build::crypto(0, &message("coalesced.test", 0))));
        datagram.extend(build::long_packet(
            version,
            PacketKind::ZeroRtt,
            DCID,
            SCID,
            &[9; 300],
        ));
        datagram.extend(build::long_packet(
            version,
            PacketKind::Handshake,
            DCID,
            SCID,
            &[8; 20],
        ));
        // A short-header packet runs to the end of the datagram.
        datagram.extend([0x40; 100]);
        let hello = done(parse(&datagram));
        assert_eq!(hello.sni.as_deref(), Some("coalesced.test"));
    }
}

#[test]
fn packets_after_the_first_of_another_dcid_or_version_are_ignored() {
    let message = message("first.test", 0);
    let mut datagram = client(Version::V1).initial(0, &build::crypto(0, &message));
    // A conflicting hello to another DCID, then one in v2: never read.
    let other = Client::new(Version::V1, &[7; 8], SCID);
    datagram.extend(other.initial(0, &build::crypto(0, &self::message("other.test", 0))));
    datagram.extend(client(Version::V2).initial(1, &[0x08, 0, 0]));
    datagram.extend(build::long_packet(
        Version::V1,
        PacketKind::Handshake,
        &[7; 8],
        SCID,
        &[0; 3],
    ));
    assert_eq!(done(parse(&datagram)).sni.as_deref(), Some("first.test"));
}

#[test]
fn trailing_bytes_after_the_packets() {
    let packet = client(Version::V1).initial(0, &build::crypto(0, &message("tail.test", 0)));
    let with = |tail: &[u8]| {
        let mut datagram = packet.clone();
        datagram.extend_from_slice(tail);
        parse(&datagram)
    };
    assert!(matches!(with(&[0; 700]), Ok(Parse::Done(_))));
    assert!(matches!(with(&[0x5f; 40]), Ok(Parse::Done(_))));
    // Another version, even cut short, is not ours to read.
    assert!(matches!(
        with(&[0xc0, 0xff, 0, 0, 0x1d, 30]),
        Ok(Parse::Done(_))
    ));
    // A long header of the flow's version that is cut short is malformed.
    assert_eq!(with(&[0xc0]), Err(Reject::Malformed("long header version")));
    assert_eq!(
        with(&[0xc0, 0, 0, 0, 1, 8, 1]),
        Err(Reject::Malformed("destination connection id"))
    );
}

// ---- hostile input ---------------------------------------------------------

#[test]
fn crypto_data_past_64_kib_is_rejected() {
    let client = client(Version::V1);
    let at_cap = client.initial(0, &build::crypto((MAX_CRYPTO_LEN - 6) as u64, &[1; 6]));
    assert_eq!(parse(&at_cap), Ok(Parse::NeedMore));
    let past = client.initial(0, &build::crypto((MAX_CRYPTO_LEN - 6) as u64, &[1; 7]));
    assert_eq!(parse(&past), Err(Reject::CryptoTooLarge));
    let empty_far = client.initial(0, &build::crypto(MAX_CRYPTO_LEN as u64 + 1, &[]));
    assert_eq!(parse(&empty_far), Err(Reject::CryptoTooLarge));
    let largest = client.initial(0, &build::crypto((1 << 62) - 1, &[1]));
    assert_eq!(parse(&largest), Err(Reject::CryptoTooLarge));
    // A hello declared longer than the buffer can hold, known from its header.
    let header = client.initial(0, &build::crypto(0, &[1, 0, 0xff, 0xfd]));
    assert_eq!(parse(&header), Err(Reject::CryptoTooLarge));
    let header = client.initial(0, &build::crypto(0, &[1, 1, 0, 1]));
    assert_eq!(parse(&header), Err(Reject::Hello(hello::Reject::TooLarge)));
}

#[test]
fn the_crypto_buffer_stays_within_its_bound() {
    let client = client(Version::V1);
    let mut reader = InitialReader::new();
    let mut scratch = Vec::new();
    assert_eq!(reader.buffered(), 0);
    // Growing one frame at a time up to the cap, from the far end.
    for (pn, start) in (0..MAX_CRYPTO_LEN).step_by(1000).rev().enumerate() {
        let end = (start + 1000).min(MAX_CRYPTO_LEN);
        let frame = build::crypto(start as u64, &vec![0x01; end - start]);
        let answer = reader.read(&client.initial(pn as u64, &frame), &mut scratch);
        assert!(
            reader.buffered() <= MAX_CRYPTO_LEN + MAX_CRYPTO_LEN / 8,
            "{}",
            reader.buffered()
        );
        if start > 0 {
            assert_eq!(answer, Ok(Parse::NeedMore));
        } else {
            // The stream now starts 01 01 01 01: a hello of 65,793 bytes.
            assert_eq!(answer, Err(Reject::Hello(hello::Reject::TooLarge)));
        }
    }
    let size = std::mem::size_of::<InitialReader>();
    assert!(size <= 1280, "{size}");
}

#[test]
fn a_hello_near_the_cap_over_many_datagrams_is_done() {
    let message = message("big.test", 60_000);
    assert!(message.len() > 60_000 && message.len() < MAX_CRYPTO_LEN);
    let client = client(Version::V2);
    let mut datagrams: Vec<Vec<u8>> = message
        .chunks(1100)
        .enumerate()
        .map(|(i, chunk)| client.initial(i as u64, &build::crypto((i * 1100) as u64, chunk)))
        .collect();
    datagrams.reverse();
    let refs: Vec<&[u8]> = datagrams.iter().map(Vec::as_slice).collect();
    assert_eq!(done(read_last(&refs)).sni.as_deref(), Some("big.test"));
}

#[test]
fn overlapping_crypto_ranges_must_agree() {
    let client = client(Version::V1);
    let message = message("overlap.test", 100);
    // Retransmitted and overlapping ranges with the same bytes are fine.
    let mut payload = build::crypto(10, &message[10..80]);
    payload.extend(build::crypto(0, &message[..50]));
    payload.extend(build::crypto(40, &message[40..]));
    payload.extend(build::crypto(0, &message));
    assert_eq!(
        done(parse(&client.initial(0, &payload))).sni.as_deref(),
        Some("overlap.test")
    );
    // Different bytes at an offset already received are not.
    let mut changed = message[20..30].to_vec();
    changed[9] ^= 1;
    for order in [[0, 1], [1, 0]] {
        let datagrams = [
            client.initial(0, &build::crypto(0, &message[..40])),
            client.initial(1, &build::crypto(20, &changed)),
        ];
        let answers = read_all(&[&datagrams[order[0]], &datagrams[order[1]]]);
        assert_eq!(answers[0], Ok(Parse::NeedMore));
        assert_eq!(answers[1], Err(Reject::CryptoConflict));
    }
}

/// The `quic_initial` fuzz target's first finding: the checks demanded the
/// same rejection in every order, but a datagram can hold two problems.
#[test]
fn a_rejection_may_name_another_problem_in_another_order() {
    let client = client(Version::V1);
    let first = client.initial(0, &build::crypto(0, &[1, 0, 0, 9]));
    let mut second = build::crypto(2, &[1]);
    second.push(0x22);
    let second = client.initial(1, &second);
    assert_eq!(read_last(&[&first, &second]), Err(Reject::CryptoConflict));
    assert_eq!(
        read_last(&[&second, &first]),
        Err(Reject::ForbiddenFrame(0x22))
    );
    checks::check(&checks::join(&[&build::crypto(0, &[1, 0, 0, 9]), &{
        let mut second = build::crypto(2, &[1]);
        second.push(0x22);
        second
    }]));
}

/// The second finding: after a datagram holding a whole hello, one at odds
/// with it is never read; before it, it rejects the flow.
#[test]
fn a_whole_hello_first_is_done_before_a_datagram_at_odds_with_it() {
    assert_eq!(read_last(&[CHROMIUM_1, AIOQUIC]), Err(Reject::OtherFlow));
    let hello = done(read_all(&[AIOQUIC, CHROMIUM_1]).remove(0));
    assert_eq!(hello.sni.as_deref(), Some("h3-aioquic.test"));
    checks::check(&checks::join(&[CHROMIUM_1, AIOQUIC]));
}

#[test]
fn frames_not_allowed_in_an_initial_are_rejected() {
    let client = client(Version::V1);
    let mut start = build::crypto(0, &[1, 0]);
    start.push(PING);
    for (frames, reject) in [
        (vec![0x08, 0x00, 0x00], Reject::ForbiddenFrame(0x08)),
        (vec![0x04, 0x00, 0x00, 0x00], Reject::ForbiddenFrame(0x04)),
        (vec![0x1e], Reject::ForbiddenFrame(0x1e)),
        (vec![0x1d, 0x00, 0x00], Reject::ForbiddenFrame(0x1d)),
        (vec![0x1c, 0x00, 0x00, 0x00], Reject::ConnectionClose),
        // CRYPTO's type in two bytes.
        (vec![0x40, 0x06, 0x00, 0x00], Reject::ForbiddenFrame(0x06)),
        (vec![0x80, 0x00, 0x00, 0x01], Reject::ForbiddenFrame(0x01)),
    ] {
        let mut payload = start.clone();
        payload.extend(&frames);
        assert_eq!(
            parse(&client.initial(0, &payload)),
            Err(reject),
            "{frames:02x?}"
        );
    }
}

#[test]
fn ack_frames_are_skipped_with_their_ranges_and_ecn_counts() {
    let client = client(Version::V1);
    let message = message("ack.test", 0);
    let mut payload = build::ack(100, 3, &[(2, 5), (0, 1), (1000, 70_000)], None);
    payload.extend(build::ack(1 << 40, 0, &[(7, 7)], Some([1, 2, 1 << 30])));
    payload.extend(build::crypto(0, &message));
    payload.extend(build::ack(0, 0, &[], Some([0, 0, 0])));
    assert_eq!(
        done(parse(&client.initial(0, &payload))).sni.as_deref(),
        Some("ack.test")
    );
}

#[test]
fn varints_and_lengths_that_overrun_are_malformed() {
    let client = client(Version::V1);
    for (payload, what) in [
        (vec![0x06, 0x80], "crypto offset"),
        (vec![0x06, 0x00], "crypto data past the packet end"),
        (
            vec![0x06, 0x00, 0x05, 1, 0, 0],
            "crypto data past the packet end",
        ),
        (
            vec![0x06, 0x00, 0x7f, 0xff, 1],
            "crypto data past the packet end",
        ),
        (
            vec![0x06, 0x00, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff],
            "crypto data past the packet end",
        ),
        (vec![0x02, 0x00, 0x00, 0x01, 0x00], "ack gap"),
        (
            vec![0x02, 0x00, 0x00, 0xbf, 0xff, 0xff, 0xff, 0x00, 0x00],
            "ack range length",
        ),
        (
            vec![
                0x02, 0x00, 0x00, 0xc0, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x00,
            ],
            "ack gap",
        ),
        (
            vec![0x03, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00],
            "ack ecn-ce count",
        ),
        (vec![0x02, 0x40], "ack largest acknowledged"),
        (vec![], "packet without frames"),
    ] {
        assert_eq!(
            parse(&client.initial(0, &payload)),
            Err(Reject::Malformed(what)),
            "{payload:02x?}"
        );
    }
}

#[test]
fn long_headers_that_overrun_are_malformed() {
    let packet = client(Version::V1).initial(0, &build::crypto(0, &message("h.test", 0)));
    // 1 + 4, DCID length at 5, SCID length at 14, token length at 18, Length at 19.
    assert_eq!(packet[5], 8);
    assert_eq!(packet[14], 3);
    let with = |at: usize, bytes: &[u8]| {
        let mut datagram = packet.clone();
        datagram.splice(at..at + 1, bytes.iter().copied());
        parse(&datagram)
    };
    assert_eq!(
        with(5, &[21]),
        Err(Reject::Malformed("destination connection id"))
    );
    assert_eq!(
        with(14, &[21]),
        Err(Reject::Malformed("source connection id"))
    );
    assert_eq!(
        with(18, &[0x7f, 0xff]),
        Err(Reject::Malformed("token length"))
    );
    assert_eq!(
        with(18, &[0x44, 0x00]),
        Err(Reject::Malformed("token length"))
    );
    assert_eq!(with(18, &[0xc0]), Err(Reject::Malformed("token length")));
    assert_eq!(
        with(19, &[0x7f]),
        Err(Reject::Malformed("packet length past the datagram end"))
    );
    let mut length_past_end = packet.clone();
    length_past_end.truncate(packet.len() - 1);
    assert_eq!(
        parse(&length_past_end),
        Err(Reject::Malformed("packet length past the datagram end"))
    );
    for len in 0..packet.len() {
        assert!(parse(&packet[..len]).is_err() || len == 0, "{len}");
    }
}

#[test]
fn a_token_is_read_past() {
    let mut client = client(Version::V2);
    client.token = vec![0xab; 70];
    let hello = done(parse(&client.datagram(&message("token.test", 0))));
    assert_eq!(hello.sni.as_deref(), Some("token.test"));
}

#[test]
fn a_client_dcid_shorter_than_8_is_rejected() {
    for len in [0, 1, 7] {
        let client = Client::new(Version::V1, &DCID[..len], SCID);
        assert_eq!(
            parse(&client.datagram(&message("s.test", 0))),
            Err(Reject::ShortDcid)
        );
    }
    let client = Client::new(Version::V1, &[3; 20], &[4; 20]);
    assert!(matches!(
        parse(&client.datagram(&message("s.test", 0))),
        Ok(Parse::Done(_))
    ));
}

#[test]
fn initials_of_another_dcid_scid_or_version_reject_the_flow_in_any_order() {
    let message = message("flow.test", 0);
    let first = client(Version::V1).initial(0, &build::crypto(0, &message[..20]));
    for other in [
        Client::new(Version::V1, &[7; 8], SCID),
        Client::new(Version::V1, DCID, &[7; 3]),
        Client::new(Version::V2, DCID, SCID),
    ] {
        let second = other.initial(1, &build::crypto(20, &message[20..]));
        assert_eq!(read_last(&[&first, &second]), Err(Reject::OtherFlow));
        assert_eq!(read_last(&[&second, &first]), Err(Reject::OtherFlow));
    }
}

#[test]
fn zero_length_packets() {
    let client = client(Version::V1);
    let message = message("zero.test", 0);
    // An Initial whose Length is 0 has no room for the sample.
    let mut empty_initial = build::long_packet(Version::V1, PacketKind::Initial, DCID, SCID, &[]);
    empty_initial.insert(empty_initial.len() - 2, 0); // the token length
    assert_eq!(
        parse(&empty_initial),
        Err(Reject::Malformed(
            "packet too short for the header protection sample"
        ))
    );
    // One whose payload decrypts to nothing has no frames.
    assert_eq!(
        parse(&client.initial(0, &[])),
        Err(Reject::Malformed("packet without frames"))
    );
    // Zero-length 0-RTT packets are stepped over.
    let mut datagram = Vec::new();
    for _ in 0..5 {
        datagram.extend(build::long_packet(
            Version::V1,
            PacketKind::ZeroRtt,
            DCID,
            SCID,
            &[],
        ));
    }
    datagram.extend(client.initial(0, &build::crypto(0, &message)));
    assert_eq!(done(parse(&datagram)).sni.as_deref(), Some("zero.test"));
}

#[test]
fn reserved_bits_must_be_zero() {
    let mut client = client(Version::V2);
    client.reserved_bits = 0x04;
    assert_eq!(
        parse(&client.datagram(&message("r.test", 0))),
        Err(Reject::ReservedBits)
    );
}

#[test]
fn a_stream_that_is_not_a_client_hello_is_rejected_early() {
    let client = client(Version::V1);
    // A ServerHello type byte is known at once, the rest missing.
    let answers = read_all(&[
        &client.initial(0, &build::crypto(0, &[2])),
        &client.initial(1, &build::crypto(1, &[0, 0, 50])),
    ]);
    assert_eq!(
        answers[0],
        Err(Reject::Hello(hello::Reject::NotClientHello))
    );
    // A malformed body, once the message is whole.
    let mut message = message("bad.test", 0);
    message[4] = 2;
    let answers = read_all(&[
        &client.initial(0, &build::crypto(0, &message[..30])),
        &client.initial(1, &build::crypto(30, &message[30..])),
    ]);
    assert_eq!(answers[0], Ok(Parse::NeedMore));
    assert_eq!(
        answers[1],
        Err(Reject::Hello(hello::Reject::BadHelloVersion))
    );
}

#[test]
fn a_known_answer_is_repeated() {
    let mut reader = InitialReader::new();
    let mut scratch = Vec::new();
    let hello = done(reader.read(AIOQUIC, &mut scratch));
    assert_eq!(
        reader.read(&[], &mut scratch),
        Ok(Parse::Done(hello.clone()))
    );
    assert_eq!(
        reader.read(CHROMIUM_1, &mut scratch),
        Ok(Parse::Done(hello))
    );
    let mut reader = InitialReader::new();
    assert_eq!(
        reader.read(&[0xc0], &mut scratch),
        Err(Reject::Malformed("long header version"))
    );
    assert_eq!(
        reader.read(AIOQUIC, &mut scratch),
        Err(Reject::Malformed("long header version"))
    );
}

#[test]
fn packet_numbers_decode_against_the_largest_seen() {
    // RFC 9000 Appendix A.3's example.
    assert_eq!(
        packet::decode_packet_number(Some(0xa82f_30ea), 0x9b32, 16),
        0xa82f_9b32
    );
    assert_eq!(packet::decode_packet_number(None, 0x7f, 8), 0x7f);
    assert_eq!(packet::decode_packet_number(Some(0xff), 0x00, 8), 0x100);
    // Initials sent with long and short packet numbers, some reordered
    // (within what the window of each encoding recovers).
    let client = client(Version::V1);
    let message = message("pn.test", 0);
    let datagrams = [
        client.initial_with(100, 1, &build::crypto(60, &message[60..])),
        client.initial_with(5, 1, &build::crypto(0, &message[..10])),
        client.initial_with(300, 2, &build::crypto(10, &message[10..30])),
        client.initial_with(200, 2, &[PING]),
        client.initial_with(70_000, 4, &build::crypto(30, &message[30..60])),
    ];
    let refs: Vec<&[u8]> = datagrams.iter().map(Vec::as_slice).collect();
    assert_eq!(done(read_last(&refs)).sni.as_deref(), Some("pn.test"));
}

// ---- cost ------------------------------------------------------------------

/// The work counted while reading `datagram` once.
fn work_of(datagram: &[u8]) -> usize {
    WORK.with(|work| work.set(0));
    let _ = parse(datagram);
    WORK.with(std::cell::Cell::get)
}

#[test]
fn coalesced_tiny_packets_cost_linear_work() {
    let client = client(Version::V1);
    let coalesced = |count: usize| {
        let mut datagram = Vec::new();
        for pn in 0..count {
            datagram.extend(client.initial(pn as u64, &[PING]));
            datagram.extend(build::long_packet(
                Version::V1,
                PacketKind::ZeroRtt,
                DCID,
                SCID,
                &[],
            ));
        }
        datagram
    };
    let small = coalesced(1000);
    let large = coalesced(2000);
    assert_eq!(parse(&small), Ok(Parse::NeedMore));
    let (small_work, large_work) = (work_of(&small), work_of(&large));
    assert!(
        small_work <= 4 * small.len(),
        "{small_work} for {} bytes",
        small.len()
    );
    assert!(
        large_work <= small_work * 2 + 100,
        "{small_work} then {large_work}"
    );
}

#[test]
fn one_byte_crypto_frames_out_of_order_cost_linear_work() {
    let client = client(Version::V1);
    let message = message("bytes.test", 4000);
    let datagram = |count: usize| {
        // Every other byte first, then the rest, in reverse: the prefix
        // stays short until the last frame.
        let offsets: Vec<usize> = (0..count)
            .step_by(2)
            .rev()
            .chain((1..count).step_by(2).rev())
            .collect();
        let mut datagram = Vec::new();
        for (pn, chunk) in offsets.chunks(300).enumerate() {
            let payload: Vec<u8> = chunk
                .iter()
                .flat_map(|&at| build::crypto(at as u64, &message[at..at + 1]))
                .collect();
            datagram.extend(client.initial(pn as u64, &payload));
        }
        datagram
    };
    let small = datagram(message.len() / 2);
    let whole = datagram(message.len());
    assert_eq!(done(parse(&whole)).sni.as_deref(), Some("bytes.test"));
    let (small_work, whole_work) = (work_of(&small), work_of(&whole));
    assert!(
        whole_work <= small_work * 2 + message.len(),
        "{small_work} then {whole_work}"
    );
    assert!(
        whole_work <= 8 * whole.len(),
        "{whole_work} for {} bytes",
        whole.len()
    );
}

#[test]
fn huge_ack_range_counts_cost_only_the_bytes_there() {
    let client = client(Version::V1);
    // Largest 0, delay 0, 2^30 - 1 ranges, first range 0.
    let mut payload = vec![0x02, 0x00, 0x00, 0xbf, 0xff, 0xff, 0xff, 0x00];
    payload.extend([0x00; 1000]);
    let packet = client.initial(0, &payload);
    // 500 (gap, length) pairs of zeros, then the payload runs out.
    assert_eq!(parse(&packet), Err(Reject::Malformed("ack gap")));
    assert!(work_of(&packet) < 4 * packet.len());
}

#[test]
fn display_names_the_reason() {
    assert_eq!(Reject::Decrypt.to_string(), "decrypt_failed");
    assert_eq!(
        Reject::ForbiddenFrame(0x08).to_string(),
        "forbidden_frame 0x8"
    );
    assert_eq!(
        Reject::Hello(hello::Reject::NotClientHello).to_string(),
        "hello: not_client_hello"
    );
    assert_eq!(
        Skip::UnsupportedVersion(0).to_string(),
        "unsupported_version 0x00000000"
    );
    assert_eq!(ConnectionId::new(&[0xab, 1]).unwrap().to_string(), "ab01");
    assert_eq!(ConnectionId::new(&[0; 21]), None);
}

// ---- the fuzz seed corpus --------------------------------------------------

/// Writes the `quic_initial` fuzz target's seeds into `$QUIC_SEED_DIR`
/// (run by hand: `QUIC_SEED_DIR=fuzz/corpus/quic_initial cargo test -p
/// mc-proxy-wire --lib write_fuzz_seeds -- --ignored`): the datagrams of
/// tests/data/quic/ as they are, Chromium's pair as one input, built
/// Initials, and plaintext inputs (frames the checks encrypt; see
/// `quic::checks`).
#[test]
#[ignore]
fn write_fuzz_seeds() {
    let dir = std::path::PathBuf::from(std::env::var("QUIC_SEED_DIR").expect("QUIC_SEED_DIR"));
    std::fs::create_dir_all(&dir).unwrap();
    let message = message("seed.test", 0);
    let v2 = client(Version::V2);
    let mut coalesced = build::long_packet(Version::V2, PacketKind::ZeroRtt, DCID, SCID, &[1; 20]);
    coalesced.extend(v2.initial(0, &build::crypto(40, &message[40..])));
    coalesced.extend(build::long_packet(
        Version::V2,
        PacketKind::Handshake,
        DCID,
        SCID,
        &[2; 20],
    ));
    coalesced.extend([0; 64]);
    let mut first = build::crypto(0, &message[..40]);
    first.extend(build::ack(2, 0, &[], Some([1, 0, 0])));
    let small: Vec<u8> = (0..message.len())
        .rev()
        .flat_map(|at| build::crypto(at as u64, &message[at..at + 1]))
        .collect();
    let mut split_payload = vec![PING];
    split_payload.extend(build::crypto(60, &message[60..]));
    split_payload.extend([PADDING; 8]);
    split_payload.extend(build::crypto(0, &message[..70]));
    let seeds: Vec<(&str, Vec<u8>)> = vec![
        ("aioquic", AIOQUIC.to_vec()),
        ("chromium-1", CHROMIUM_1.to_vec()),
        ("chromium-2", CHROMIUM_2.to_vec()),
        ("chromium-pair", checks::join(&[CHROMIUM_1, CHROMIUM_2])),
        ("rfc9001-a2", RFC9001_A2.to_vec()),
        ("rfc9369-a2", RFC9369_A2.to_vec()),
        ("built-v1", client(Version::V1).datagram(&message)),
        (
            "built-v2-coalesced",
            checks::join(&[&coalesced, &v2.initial(1, &first)]),
        ),
        (
            "plain-one-frame",
            checks::join(&[&build::crypto(0, &message)]),
        ),
        ("plain-two-packets", checks::join(&[&split_payload, &first])),
        ("plain-one-byte-frames", checks::join(&[&small])),
        (
            "plain-forbidden",
            checks::join(&[&[0x06, 0x00, 0x01, 0x01, 0x1c, 0x00, 0x00, 0x00]]),
        ),
    ];
    for (name, data) in seeds {
        checks::check(&data);
        std::fs::write(dir.join(name), data).unwrap();
    }
}
