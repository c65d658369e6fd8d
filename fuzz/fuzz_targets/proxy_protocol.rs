//! Fuzzes the PROXY protocol header reader. Beyond "never panics", it checks
//! the promises the connection pipeline relies on: a finished header's
//! answer does not depend on the bytes after it and every strict prefix of it
//! needs more; a buffer that needs more is a prefix of something (so reading
//! it all never eats into the ClientHello); a rejection stays a rejection
//! whatever follows; and the addresses of a parsed header survive a round
//! trip through `encode_v2`.
#![no_main]

use libfuzzer_sys::fuzz_target;
use wire::proxy_protocol::{encode_v2, parse, Addresses, Parse, V1_MAX_LEN, V2_MAX_LEN};

fuzz_target!(|data: &[u8]| {
    let result = parse(data);
    match &result {
        Ok(Parse::Done(header)) => {
            assert!(header.len <= data.len());
            assert!(header.len <= V1_MAX_LEN.max(V2_MAX_LEN));
            let exact = &data[..header.len];
            assert_eq!(parse(exact), result, "bytes after the header matter");
            for cut in [0, 1, 6, 12, 13, 15, 16, exact.len() / 2, exact.len() - 1] {
                if cut < exact.len() {
                    assert_eq!(parse(&exact[..cut]), Ok(Parse::NeedMore), "prefix {cut}");
                }
            }
            if let Addresses::Tcp {
                source,
                destination,
            } = header.addresses
            {
                let mut encoded = Vec::new();
                let len = encode_v2(source, destination, &mut encoded);
                assert_eq!(len, encoded.len());
                match parse(&encoded) {
                    Ok(Parse::Done(again)) => {
                        assert_eq!(again.len, encoded.len());
                        let Addresses::Tcp {
                            source: s,
                            destination: d,
                        } = again.addresses
                        else {
                            panic!("re-encoded header lost its addresses");
                        };
                        assert_eq!(s.ip().to_canonical(), source.ip().to_canonical());
                        assert_eq!(d.ip().to_canonical(), destination.ip().to_canonical());
                        assert_eq!((s.port(), d.port()), (source.port(), destination.port()));
                    }
                    other => panic!("re-encoded header gave {other:?}"),
                }
            }
        }
        Ok(Parse::NeedMore) => {
            // Any prefix of a valid prefix is a valid prefix.
            assert_eq!(parse(&data[..data.len() / 2]), Ok(Parse::NeedMore));
            assert!(data.len() < V1_MAX_LEN.max(V2_MAX_LEN));
        }
        Err(reject) => {
            // A rejection depends only on bytes already seen.
            let mut longer = data.to_vec();
            longer.extend_from_slice(b" 1\r\n\x16\x03\x01");
            assert_eq!(parse(&longer), Err(*reject), "rejection changed with more bytes");
        }
    }
});
