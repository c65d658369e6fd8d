//! The client's Initial keys (RFC 9001 §5.2, RFC 9369 §3.3): derived from
//! the version's public salt and the Destination Connection ID of the
//! client's first Initial, so anyone on the path can compute them. AES-128-GCM
//! packet protection and AES-128 header protection (RFC 9001 §5.3, §5.4.3),
//! through ring.

use ring::aead::{self, quic::HeaderProtectionKey};
use ring::hkdf;

use super::{Reject, Version};

/// AES-128 key, GCM nonce and header protection key lengths.
const KEY_LEN: usize = 16;
const IV_LEN: usize = 12;
/// The header protection sample: 16 bytes from 4 bytes after the start of
/// the packet number (RFC 9001 §5.4.2).
pub(super) const SAMPLE_LEN: usize = 16;
pub(super) const SAMPLE_OFFSET: usize = 4;
/// The AES-GCM tag at the end of every protected payload (ring checks it;
/// the builder makes room for it).
#[cfg(any(test, feature = "testing"))]
pub(super) const TAG_LEN: usize = 16;

/// The bytes of the client's Initial keys, as RFC 9001 Appendix A lists
/// them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Material {
    pub(crate) client_initial_secret: [u8; 32],
    pub(crate) key: [u8; KEY_LEN],
    pub(crate) iv: [u8; IV_LEN],
    pub(crate) hp: [u8; KEY_LEN],
}

impl Material {
    /// HKDF-Extract(salt, client DCID), then HKDF-Expand-Label "client in",
    /// then the version's key, iv and hp labels.
    pub(crate) fn client(version: Version, dcid: &[u8]) -> Material {
        let initial_secret =
            hkdf::Salt::new(hkdf::HKDF_SHA256, version.initial_salt()).extract(dcid);
        let mut client_initial_secret = [0; 32];
        expand_label(&initial_secret, b"client in", &mut client_initial_secret);
        let client = hkdf::Prk::new_less_safe(hkdf::HKDF_SHA256, &client_initial_secret);
        let [key_label, iv_label, hp_label] = version.key_labels();
        let mut material = Material {
            client_initial_secret,
            key: [0; KEY_LEN],
            iv: [0; IV_LEN],
            hp: [0; KEY_LEN],
        };
        expand_label(&client, key_label, &mut material.key);
        expand_label(&client, iv_label, &mut material.iv);
        expand_label(&client, hp_label, &mut material.hp);
        material
    }
}

/// The requested output length, for ring's HKDF.
struct Len(usize);

impl hkdf::KeyType for Len {
    fn len(&self) -> usize {
        self.0
    }
}

/// HKDF-Expand-Label (RFC 8446 §7.1) with an empty context, into `out`
/// (at most 32 bytes here).
fn expand_label(secret: &hkdf::Prk, label: &[u8], out: &mut [u8]) {
    // Lengths of constants: out is 12 to 32 bytes, labels are at most
    // "quicv2 key", so neither cast truncates.
    let out_len = (out.len() as u16).to_be_bytes();
    let label_len = [(b"tls13 ".len() + label.len()) as u8];
    let info: [&[u8]; 5] = [&out_len, &label_len, b"tls13 ", label, &[0]];
    secret
        .expand(&info, Len(out.len()))
        .and_then(|okm| okm.fill(out))
        .expect("HKDF-SHA256 expands to at most 8160 bytes; these are 32 or fewer");
}

/// One flow's client Initial keys, ready to use.
pub(super) struct Keys {
    packet: aead::LessSafeKey,
    iv: [u8; IV_LEN],
    header: HeaderProtectionKey,
}

impl Keys {
    pub(super) fn client(version: Version, dcid: &[u8]) -> Keys {
        let material = Material::client(version, dcid);
        let packet = aead::UnboundKey::new(&aead::AES_128_GCM, &material.key)
            .expect("an AES-128 key is 16 bytes");
        let header = HeaderProtectionKey::new(&aead::quic::AES_128, &material.hp)
            .expect("an AES-128 header protection key is 16 bytes");
        Keys {
            packet: aead::LessSafeKey::new(packet),
            iv: material.iv,
            header,
        }
    }

    /// The 5-byte header protection mask for a 16-byte sample.
    pub(super) fn mask(&self, sample: &[u8; SAMPLE_LEN]) -> [u8; 5] {
        self.header
            .new_mask(sample)
            .expect("the AES header protection sample is 16 bytes")
    }

    /// The nonce: the IV with the packet number XORed into its last bytes.
    fn nonce(&self, packet_number: u64) -> aead::Nonce {
        let mut nonce = self.iv;
        for (byte, pn) in nonce[IV_LEN - 8..]
            .iter_mut()
            .zip(packet_number.to_be_bytes())
        {
            *byte ^= pn;
        }
        aead::Nonce::assume_unique_for_key(nonce)
    }

    /// Decrypts `payload` (ciphertext and tag) in place with the unprotected
    /// `header` as associated data; the plaintext is the front of `payload`.
    pub(super) fn open<'p>(
        &self,
        packet_number: u64,
        header: &[u8],
        payload: &'p mut [u8],
    ) -> Result<&'p mut [u8], Reject> {
        self.packet
            .open_in_place(self.nonce(packet_number), aead::Aad::from(header), payload)
            .map_err(|_| Reject::Decrypt)
    }

    /// Encrypts `payload` in place and appends the tag (the test builder).
    #[cfg(any(test, feature = "testing"))]
    pub(super) fn seal(&self, packet_number: u64, header: &[u8], payload: &mut Vec<u8>) {
        self.packet
            .seal_in_place_append_tag(self.nonce(packet_number), aead::Aad::from(header), payload)
            .expect("an Initial is far below AES-GCM's length limit");
    }
}
