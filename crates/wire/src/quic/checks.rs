//! The properties of the QUIC Initial reader that the `quic_initial` fuzz
//! target checks on every input, and that `make test` checks on every file
//! of the committed corpus (tests/fuzz_corpus.rs). Both call [`check`] (the
//! `testing` feature).
//!
//! An input is a list of datagrams ([`split`]): one raw datagram if its
//! first byte has the high bit set (a long header: the captured datagrams
//! are seeds as they are), else datagrams each prefixed by a 16-bit
//! big-endian length ([`join`] writes them). The list is read twice:
//!
//! - **Raw**: the datagrams fed to one reader in order. Beyond "never
//!   panics": a `Done` or a rejection is repeated for every later datagram;
//!   a `Skipped` datagram gets the same answer from a fresh reader and
//!   leaves the reader as it was; if every datagram but the last needs more
//!   (or is skipped), feeding them in reverse and in a hash-chosen order
//!   gives the same answer once all are in: a `Done` (perhaps earlier,
//!   with the same fields), need-more, or a rejection — which may name
//!   another of the problems the datagrams hold, or be a `Done` when some
//!   datagrams hold a whole hello and come before those at odds with them;
//!   a truncated or altered last datagram never gives another SNI.
//! - **Plaintext**: each datagram taken as the frames of one Initial,
//!   encrypted by [`build::Client`] (v1 and v2, a
//!   hash-chosen DCID and SCID), so that the fuzzer reaches the frames,
//!   the reassembly and the ClientHello behind the AEAD. v1 and v2 answer
//!   alike; the same packets coalesced in one datagram answer as one
//!   datagram each did, and in other orders as above.
//!
//! Whenever the input gives a ClientHello (either way), its message is
//! re-encrypted differently — cut into CRYPTO frames of hash-chosen sizes,
//! some sent twice, shuffled, with PING, PADDING and ACK frames between,
//! over several packets and datagrams with 0-RTT packets and zero padding
//! beside them, in a shuffled datagram order — and must give the same SNI
//! and ALPN.

use super::build::{self, Client, PADDING, PING};
use super::{peek, InitialHello, InitialReader, PacketKind, Parse, Peek, Reject, Version};
use crate::hello::checks::rng_for;

/// At most this many datagrams are read from one input.
pub const MAX_DATAGRAMS: usize = 16;

pub fn check(data: &[u8]) {
    let datagrams = split(data);
    check_raw(&datagrams, data);
    check_plaintext(&datagrams, data);
}

/// The datagrams of an input (see the module documentation).
pub fn split(data: &[u8]) -> Vec<&[u8]> {
    if data.first().is_some_and(|&first| first & 0x80 != 0) {
        return vec![data];
    }
    let mut datagrams = Vec::new();
    let mut rest = data;
    while !rest.is_empty() && datagrams.len() < MAX_DATAGRAMS {
        let Some((len, body)) = rest.split_first_chunk::<2>() else {
            datagrams.push(rest);
            break;
        };
        let len = usize::from(u16::from_be_bytes(*len)).min(body.len());
        datagrams.push(&body[..len]);
        rest = &body[len..];
    }
    datagrams
}

/// An input of length-prefixed datagrams, each under 32 KiB (so the first
/// byte has its high bit clear).
pub fn join(datagrams: &[&[u8]]) -> Vec<u8> {
    let mut data = Vec::new();
    for datagram in datagrams {
        let len = u16::try_from(datagram.len()).expect("a datagram under 32 KiB");
        assert!(len < 0x8000, "a datagram under 32 KiB");
        data.extend_from_slice(&len.to_be_bytes());
        data.extend_from_slice(datagram);
    }
    data
}

type Answer = Result<Parse, Reject>;

fn below(rng: &mut impl FnMut() -> u64, n: usize) -> usize {
    (rng() % n.max(1) as u64) as usize
}

fn shuffle<T>(items: &mut [T], rng: &mut impl FnMut() -> u64) {
    for i in (1..items.len()).rev() {
        items.swap(i, below(rng, i + 1));
    }
}

/// True for the answers that leave a flow pending.
fn pending(answer: &Answer) -> bool {
    matches!(answer, Ok(Parse::NeedMore | Parse::Skipped(_)))
}

/// Feeds `datagrams` to one reader in order; every answer, and the reader.
fn feed(datagrams: &[&[u8]]) -> (Vec<Answer>, InitialReader) {
    let mut reader = InitialReader::new();
    let mut scratch = Vec::new();
    let answers = datagrams
        .iter()
        .map(|datagram| reader.read(datagram, &mut scratch))
        .collect();
    (answers, reader)
}

/// The first answer that is not pending (NeedMore if none).
fn outcome(answers: &[Answer]) -> Answer {
    answers
        .iter()
        .find(|answer| !pending(answer))
        .cloned()
        .unwrap_or(Ok(Parse::NeedMore))
}

/// Feeds `datagrams` in order, checking what holds in any order; the
/// answers and the reader.
fn feed_checked(datagrams: &[&[u8]]) -> (Vec<Answer>, InitialReader) {
    let mut reader = InitialReader::new();
    let mut scratch = Vec::new();
    let mut answers: Vec<Answer> = Vec::with_capacity(datagrams.len());
    for datagram in datagrams {
        let before = (
            reader.dcid(),
            reader.version(),
            reader.crypto_prefix().len(),
        );
        let answer = reader.read(datagram, &mut scratch);
        if let Some(first) = answers.iter().find(|answer| !pending(answer)) {
            assert_eq!(&answer, first, "a known answer is repeated");
        } else if let Ok(Parse::Skipped(skip)) = &answer {
            let after = (
                reader.dcid(),
                reader.version(),
                reader.crypto_prefix().len(),
            );
            assert_eq!(before, after, "a skipped datagram changed the reader");
            assert_eq!(
                InitialReader::new().read(datagram, &mut scratch),
                Ok(Parse::Skipped(*skip)),
                "skipped only after other datagrams"
            );
            if let Peek::Skipped(peeked) = peek(datagram) {
                assert_eq!(peeked, *skip);
            }
        } else if let Ok(Parse::Done(hello)) = &answer {
            assert_eq!(reader.dcid(), Some(hello.dcid));
            assert_eq!(reader.version(), Some(hello.version));
            assert!(hello.dcid.len() >= super::MIN_INITIAL_DCID_LEN);
            assert!(reader.buffered() <= super::MAX_CRYPTO_LEN + super::MAX_CRYPTO_LEN / 8);
        }
        answers.push(answer);
    }
    (answers, reader)
}

/// If every datagram but the last left the flow pending, other orders give
/// the same outcome once all are in.
fn check_orders(datagrams: &[&[u8]], answers: &[Answer], data: &[u8]) {
    let Some((last, before)) = answers.split_last() else {
        return;
    };
    if !before.iter().all(pending) {
        return;
    }
    let mut reversed = datagrams.to_vec();
    reversed.reverse();
    let mut shuffled = datagrams.to_vec();
    shuffle(&mut shuffled, &mut rng_for(data, 1));
    for order in [reversed, shuffled] {
        let again = outcome(&feed(&order).0);
        match (last, &again) {
            // Which problem is met first may depend on the order (a
            // datagram whose CRYPTO bytes conflict with another's and that
            // also holds a forbidden frame), and a hello may be whole
            // before the datagram at odds with it comes (a whole flight,
            // then an Initial of another DCID).
            (Err(_), Err(_) | Ok(Parse::Done(_))) => {}
            (last, _) if pending(last) => {
                assert_eq!(again, Ok(Parse::NeedMore), "another order of the datagrams")
            }
            _ => assert_eq!(&again, last, "another order of the datagrams"),
        }
    }
}

/// Raw datagrams (see the module documentation).
fn check_raw(datagrams: &[&[u8]], data: &[u8]) {
    let (answers, reader) = feed_checked(datagrams);
    check_orders(datagrams, &answers, data);
    let Some(Ok(Parse::Done(hello))) = answers.last() else {
        return;
    };
    if answers.len() >= 2 && !pending(&answers[answers.len() - 2]) {
        return;
    }
    // The last datagram completed the hello: cut or altered, it never
    // gives another one.
    let last = datagrams[datagrams.len() - 1];
    let mut rng = rng_for(data, 2);
    let mut altered = last.to_vec();
    if !altered.is_empty() {
        let at = below(&mut rng, altered.len());
        altered[at] ^= 1 << below(&mut rng, 8);
    }
    for changed in [
        &last[..last.len().saturating_sub(1)],
        &last[..below(&mut rng, last.len())],
        &altered[..],
    ] {
        let mut changed_datagrams = datagrams.to_vec();
        *changed_datagrams.last_mut().expect("not empty") = changed;
        if let Ok(Parse::Done(other)) = outcome(&feed(&changed_datagrams).0) {
            assert_eq!((&other.sni, &other.alpn), (&hello.sni, &hello.alpn));
        }
    }
    check_reencrypted(message(reader.crypto_prefix()), hello, data);
}

/// The ClientHello message at the start of a CRYPTO stream prefix that
/// holds it whole.
fn message(prefix: &[u8]) -> &[u8] {
    let len = prefix.get(1..4).map_or(0, |len| {
        usize::from(len[0]) << 16 | usize::from(len[1]) << 8 | usize::from(len[2])
    });
    &prefix[..(4 + len).min(prefix.len())]
}

/// A DCID (8 to 20 bytes) and SCID (0 to 20) chosen by the input.
fn connection_ids(rng: &mut impl FnMut() -> u64) -> (Vec<u8>, Vec<u8>) {
    let dcid_len = 8 + below(rng, 13);
    let scid_len = below(rng, 21);
    let dcid = (0..dcid_len).map(|_| rng() as u8).collect();
    let scid = (0..scid_len).map(|_| rng() as u8).collect();
    (dcid, scid)
}

/// Plaintext payloads (see the module documentation).
fn check_plaintext(payloads: &[&[u8]], data: &[u8]) {
    if payloads.is_empty() {
        return;
    }
    let mut rng = rng_for(data, 3);
    let (dcid, scid) = connection_ids(&mut rng);
    let pn_len = 1 + below(&mut rng, 4);
    let mut outcomes = Vec::new();
    for version in [Version::V1, Version::V2] {
        let client = Client::new(version, &dcid, &scid);
        let packets: Vec<Vec<u8>> = payloads
            .iter()
            .enumerate()
            .map(|(pn, payload)| client.initial_with(pn as u64, pn_len, payload))
            .collect();
        let datagrams: Vec<&[u8]> = packets.iter().map(Vec::as_slice).collect();
        let (answers, reader) = feed_checked(&datagrams);
        check_orders(&datagrams, &answers, data);
        let whole = outcome(&answers);
        if answers[..answers.len() - 1].iter().all(pending) {
            let coalesced = packets.concat();
            let (one, _) = feed(&[&coalesced]);
            assert_eq!(outcome(&one), whole, "the same packets in one datagram");
        }
        if let Ok(Parse::Done(hello)) = &whole {
            assert_eq!(hello.version, version);
            assert_eq!((&hello.dcid[..], &hello.scid[..]), (&dcid[..], &scid[..]));
            check_reencrypted(message(reader.crypto_prefix()), hello, data);
        }
        outcomes.push(whole.map(|parse| match parse {
            Parse::Done(hello) => Parse::Done(InitialHello {
                version: Version::V1,
                ..hello
            }),
            other => other,
        }));
    }
    assert_eq!(outcomes[0], outcomes[1], "v1 and v2 answer alike");
}

/// Re-encrypts a ClientHello message differently and checks it reads the
/// same (see the module documentation).
fn check_reencrypted(message: &[u8], hello: &InitialHello, data: &[u8]) {
    let mut rng = rng_for(data, 4);
    for version in [Version::V1, Version::V2] {
        let (dcid, scid) = connection_ids(&mut rng);
        let client = Client::new(version, &dcid, &scid);
        let scale = [8, 300, 1200][below(&mut rng, 3)];

        // CRYPTO frames of chosen sizes, about one in eight sent twice.
        let mut frames = Vec::new();
        let mut offset = 0;
        while offset < message.len() {
            let len = (1 + below(&mut rng, scale)).min(message.len() - offset);
            let frame = build::crypto(offset as u64, &message[offset..offset + len]);
            if below(&mut rng, 8) == 0 {
                frames.push(frame.clone());
            }
            frames.push(frame);
            offset += len;
        }
        shuffle(&mut frames, &mut rng);

        // Packets of up to 1,100 bytes of frames, with other frames between.
        let mut payloads = vec![Vec::new()];
        for frame in frames {
            let payload = payloads.last_mut().expect("not empty");
            if !payload.is_empty() && payload.len() + frame.len() > 1100 {
                payloads.push(Vec::new());
            }
            let payload = payloads.last_mut().expect("not empty");
            match below(&mut rng, 6) {
                0 => payload.push(PING),
                1 => payload.extend(std::iter::repeat_n(PADDING, below(&mut rng, 40))),
                2 => payload.extend(build::ack(3, 1, &[(0, 0)], Some([1, 0, 0]))),
                _ => {}
            }
            payload.extend(frame);
        }

        // Datagrams of one to three packets, some with a 0-RTT packet and
        // zero padding after them, in a shuffled order. Packet numbers in
        // the fewest bytes a client may use, which the reader decodes in
        // any order up to 64 packets; beyond, in 4 bytes.
        let pn_len = if payloads.len() <= 64 { 1 } else { 4 };
        let mut datagrams = Vec::new();
        let mut packet_number = 0;
        let mut payloads = payloads.into_iter().peekable();
        while payloads.peek().is_some() {
            let mut datagram = Vec::new();
            for payload in payloads.by_ref().take(1 + below(&mut rng, 3)) {
                datagram.extend(client.initial_with(packet_number, pn_len, &payload));
                packet_number += 1;
            }
            if below(&mut rng, 4) == 0 {
                let zero_rtt =
                    build::long_packet(version, PacketKind::ZeroRtt, &dcid, &scid, &[0x5a; 40]);
                datagram.extend(zero_rtt);
            }
            datagram.resize(datagram.len() + below(&mut rng, 3) * 100, 0);
            datagrams.push(datagram);
        }
        shuffle(&mut datagrams, &mut rng);

        let datagrams: Vec<&[u8]> = datagrams.iter().map(Vec::as_slice).collect();
        let (answers, _) = feed_checked(&datagrams);
        match outcome(&answers) {
            Ok(Parse::Done(again)) => {
                assert_eq!((&again.sni, &again.alpn), (&hello.sni, &hello.alpn));
                assert_eq!(again.version, version);
                assert_eq!((&again.dcid[..], &again.scid[..]), (&dcid[..], &scid[..]));
            }
            other => panic!("re-encrypted hello gave {other:?}"),
        }
    }
}
