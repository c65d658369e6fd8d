//! The GeoIP country database: a MaxMind DB (`.mmdb`) file read whole into
//! memory.
//!
//! Owns: opening and validating the file, and address → country. Both
//! MaxMind Country and City databases work (and GeoIP2 Enterprise, DB-IP's
//! look-alikes): every one of them stores `country.iso_code` and
//! `registered_country.iso_code` the same way, and only those two fields are
//! decoded. Never panics on a corrupt file: a file is checked before the
//! reader touches its search tree (see `check_layout`).

use std::fs::{File, Metadata};
use std::io::Read;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use maxminddb::{MaxMindDbError, Reader};
use serde::Deserialize;

use wire::rule::CountryCode;

/// Why a GeoIP database was refused. Every message names the file.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum GeoIpError {
    /// The file could not be opened or read.
    #[error("cannot read GeoIP database {}: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The file was read but is not a usable MaxMind DB (empty, truncated,
    /// corrupt, or not an mmdb at all).
    #[error("GeoIP database {} is not a valid MaxMind DB file: {reason}", path.display())]
    Invalid {
        path: PathBuf,
        reason: InvalidReason,
    },
}

/// Why a file that was read is not a usable MaxMind DB.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum InvalidReason {
    /// A directory, a device, a FIFO...
    #[error("not a regular file")]
    NotAFile,
    /// Over the size limit (2 GiB).
    #[error("larger than {MAX_FILE_SIZE} bytes")]
    TooLarge,
    /// The layout check before the reader is trusted with the file.
    #[error(transparent)]
    Layout(#[from] LayoutError),
    /// The reader refused the file.
    #[error("{0}")]
    Reader(#[source] MaxMindDbError),
    /// A probe address's record cannot be looked up or decoded.
    #[error("record for {ip}: {source}")]
    Record { ip: IpAddr, source: MaxMindDbError },
}

/// Why `check_layout` refused a file (before `maxminddb` may index it).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LayoutError {
    /// No metadata marker anywhere in the file.
    #[error("no MaxMind DB metadata found in {len} bytes (empty, truncated, or not an mmdb file)")]
    NoMetadata { len: usize },
    /// The metadata does not decode.
    #[error("bad metadata: {0}")]
    Metadata(#[source] MaxMindDbError),
    /// An IP version other than 4 or 6.
    #[error("bad metadata: ip_version {0}")]
    IpVersion(u16),
    /// A search tree of no nodes.
    #[error("bad metadata: node_count 0")]
    NoNodes,
    /// The search tree the metadata describes does not fit before it.
    #[error("search tree of {nodes} nodes needs {needs} bytes before the metadata, the file has {has} (truncated?)")]
    TreeTooLong {
        nodes: u32,
        needs: usize,
        has: usize,
    },
    /// The 16 zero bytes after the search tree are not zero.
    #[error("no data section separator after the search tree")]
    NoSeparator,
}

/// Identity of a file's contents on disk, as far as `stat` tells: a change
/// in any field means the file was rewritten or replaced (a rename puts a
/// new inode at the path).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct FileStamp {
    dev: u64,
    ino: u64,
    size: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
}

impl FileStamp {
    pub(crate) fn of(meta: &Metadata) -> FileStamp {
        FileStamp {
            dev: meta.dev(),
            ino: meta.ino(),
            size: meta.size(),
            mtime: (meta.mtime(), meta.mtime_nsec()),
            ctime: (meta.ctime(), meta.ctime_nsec()),
        }
    }

    /// The stamp of whatever is at `path` now (following symlinks).
    pub(crate) fn at(path: &Path) -> std::io::Result<FileStamp> {
        std::fs::metadata(path).map(|meta| FileStamp::of(&meta))
    }
}

/// An open GeoIP database.
pub struct GeoIp {
    reader: Reader<Vec<u8>>,
    /// The file as it was when read, so a watcher can tell when it changes.
    stamp: FileStamp,
}

impl std::fmt::Debug for GeoIp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GeoIp")
            .field("database_type", &self.reader.metadata.database_type)
            .field("build_epoch", &self.reader.metadata.build_epoch)
            .finish_non_exhaustive()
    }
}

/// The only fields of a Country or City record we read; serde skips the rest
/// (names, continent, location, subdivisions) without decoding it.
#[derive(Deserialize)]
struct CountryFields<'a> {
    #[serde(borrow, default)]
    country: Option<IsoCode<'a>>,
    #[serde(borrow, default)]
    registered_country: Option<IsoCode<'a>>,
}

#[derive(Deserialize)]
struct IsoCode<'a> {
    #[serde(borrow, default)]
    iso_code: Option<&'a str>,
}

impl IsoCode<'_> {
    fn code(&self) -> Option<CountryCode> {
        CountryCode::parse(self.iso_code?).ok()
    }
}

/// Refuse files larger than this (the biggest MaxMind City/Enterprise files
/// are a few hundred MB), rather than read without end.
const MAX_FILE_SIZE: u64 = 2 << 30;

/// Addresses looked up once when a file is opened, to prove the search tree
/// and data section can be walked and decoded.
const PROBE_V4: IpAddr = IpAddr::V4(Ipv4Addr::new(1, 1, 1, 1));
const PROBE_V6: IpAddr = IpAddr::V6(Ipv6Addr::new(0x2001, 0x4860, 0, 0, 0, 0, 0, 0x8888));

impl GeoIp {
    /// Reads and validates the whole file. A file that is empty, truncated,
    /// corrupt or not an mmdb is refused.
    pub fn open(path: &Path) -> Result<GeoIp, GeoIpError> {
        let read_error = |source| GeoIpError::Read {
            path: path.to_path_buf(),
            source,
        };
        let invalid = |reason: InvalidReason| GeoIpError::Invalid {
            path: path.to_path_buf(),
            reason,
        };

        // Stat the open file, not the path, so the stamp describes the bytes
        // read even if the path is replaced meanwhile.
        let file = File::open(path).map_err(read_error)?;
        let meta = file.metadata().map_err(read_error)?;
        if !meta.is_file() {
            return Err(invalid(InvalidReason::NotAFile));
        }
        let stamp = FileStamp::of(&meta);
        let mut bytes = Vec::with_capacity(usize::try_from(stamp.size).unwrap_or(0));
        file.take(MAX_FILE_SIZE + 1)
            .read_to_end(&mut bytes)
            .map_err(read_error)?;
        if bytes.len() as u64 > MAX_FILE_SIZE {
            return Err(invalid(InvalidReason::TooLarge));
        }

        check_layout(&bytes).map_err(|e| invalid(e.into()))?;
        let reader = Reader::from_source(bytes).map_err(|e| invalid(InvalidReason::Reader(e)))?;
        let mut probes = vec![PROBE_V4];
        if reader.metadata.ip_version == 6 {
            probes.push(PROBE_V6);
        }
        for ip in probes {
            let found = reader
                .lookup(ip)
                .map_err(|e| invalid(InvalidReason::Reader(e)))?;
            found
                .decode::<CountryFields>()
                .map_err(|source| invalid(InvalidReason::Record { ip, source }))?;
        }

        let kind = &reader.metadata.database_type;
        if !["Country", "City", "Enterprise"]
            .iter()
            .any(|k| kind.contains(k))
        {
            tracing::warn!(
                path = %path.display(),
                database_type = %kind,
                "GeoIP database is not a Country or City database; addresses may have no country"
            );
        }
        Ok(GeoIp { reader, stamp })
    }

    /// The country of `ip`: the record's `country.iso_code`, else its
    /// `registered_country.iso_code`. `None` when the address is not in the
    /// database, the record has neither, or it cannot be decoded.
    /// IPv4-mapped IPv6 addresses are looked up as IPv4.
    pub fn country(&self, ip: IpAddr) -> Option<CountryCode> {
        let found = self.reader.lookup(ip.to_canonical()).ok()?;
        let fields: CountryFields = found.decode().ok()??;
        fields
            .country
            .as_ref()
            .and_then(IsoCode::code)
            .or_else(|| fields.registered_country.as_ref().and_then(IsoCode::code))
    }

    /// `database_type` from the file's metadata (`GeoLite2-Country`, ...).
    pub fn database_type(&self) -> &str {
        &self.reader.metadata.database_type
    }

    /// When the database was built, in seconds since the Unix epoch.
    pub fn build_epoch(&self) -> u64 {
        self.reader.metadata.build_epoch
    }

    pub(crate) fn stamp(&self) -> FileStamp {
        self.stamp
    }
}

/// Marks the start of the metadata section, which ends the file.
const METADATA_MARKER: &[u8] = b"\xab\xcd\xefMaxMind.com";
/// Zero bytes between the search tree and the data section.
const DATA_SECTION_SEPARATOR: usize = 16;

/// Checks that the search tree the metadata describes fits in the file.
///
/// `maxminddb` indexes the search tree without bounds checks (already while
/// opening, to find the IPv4 subtree), trusting the metadata's node count, so
/// a file whose tree was cut short but whose metadata survived would panic
/// it, killing the thread that opens it (a GeoIP reload, or the start). The metadata is therefore
/// decoded first on its own, behind a dummy one-node tree of zeros that any
/// walk stays inside, and the real file is only handed over once its tree is
/// known to fit.
fn check_layout(bytes: &[u8]) -> Result<(), LayoutError> {
    let marker_at = bytes
        .windows(METADATA_MARKER.len())
        .rposition(|w| w == METADATA_MARKER)
        .ok_or(LayoutError::NoMetadata { len: bytes.len() })?;
    let mut metadata_only = vec![0u8; 64];
    metadata_only.extend_from_slice(&bytes[marker_at..]);
    let metadata = Reader::from_source(metadata_only)
        .map_err(LayoutError::Metadata)?
        .metadata;

    if metadata.ip_version != 4 && metadata.ip_version != 6 {
        return Err(LayoutError::IpVersion(metadata.ip_version));
    }
    if metadata.node_count == 0 {
        return Err(LayoutError::NoNodes);
    }
    // `from_source` accepted record_size, so it is 24, 28 or 32.
    let tree_size =
        (metadata.node_count as usize).saturating_mul(usize::from(metadata.record_size)) / 4;
    let data_start = tree_size.saturating_add(DATA_SECTION_SEPARATOR);
    if data_start > marker_at {
        return Err(LayoutError::TreeTooLong {
            nodes: metadata.node_count,
            needs: data_start,
            has: marker_at,
        });
    }
    if bytes[tree_size..data_start].iter().any(|&b| b != 0) {
        return Err(LayoutError::NoSeparator);
    }
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use ipnet::IpNet;
    use mmdb_writer::{Value, Writer};

    pub(crate) const GEOLITE2: &str = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/data/geoip/GeoLite2-Country-Test.mmdb"
    );
    pub(crate) const GEOIP2: &str = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/data/geoip/GeoIP2-Country-Test.mmdb"
    );

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    fn cc(text: &str) -> Option<CountryCode> {
        Some(CountryCode::parse(text).unwrap())
    }

    fn country_map(iso: &str) -> Value {
        Value::map([
            ("geoname_id", Value::from(2_921_044_u32)),
            ("iso_code", Value::from(iso)),
            (
                "names",
                Value::map([("en", Value::from(iso)), ("de", Value::from(iso))]),
            ),
        ])
    }

    /// A City-shaped database (city, location, postal, subdivisions around
    /// the country fields), plus records with only a registered country and
    /// with no country at all.
    pub(crate) fn city_db() -> Vec<u8> {
        let mut writer = Writer::new("GeoLite2-City");
        let city = Value::map([
            (
                "city",
                Value::map([
                    ("geoname_id", Value::from(2_950_159_u32)),
                    ("names", Value::map([("en", Value::from("Berlin"))])),
                ]),
            ),
            (
                "continent",
                Value::map([
                    ("code", Value::from("EU")),
                    ("geoname_id", Value::from(6_255_148_u32)),
                ]),
            ),
            ("country", country_map("DE")),
            (
                "location",
                Value::map([
                    ("accuracy_radius", Value::from(100_u16)),
                    ("latitude", Value::from(52.52_f64)),
                    ("longitude", Value::from(13.40_f64)),
                    ("time_zone", Value::from("Europe/Berlin")),
                ]),
            ),
            ("postal", Value::map([("code", Value::from("10115"))])),
            ("registered_country", country_map("NL")),
            (
                "subdivisions",
                Value::array([Value::map([
                    ("iso_code", Value::from("BE")),
                    ("names", Value::map([("en", Value::from("Land Berlin"))])),
                ])]),
            ),
        ]);
        let registered_only = Value::map([
            ("continent", Value::map([("code", Value::from("EU"))])),
            ("registered_country", country_map("FR")),
        ]);
        let nothing = Value::map([("continent", Value::map([("code", Value::from("EU"))]))]);
        for (net, value) in [
            ("192.0.2.0/24", city),
            ("198.51.100.0/24", registered_only.clone()),
            ("2001:db8:1::/48", registered_only),
            ("203.0.113.0/24", nothing),
        ] {
            writer
                .insert_value(net.parse::<IpNet>().unwrap(), value)
                .unwrap();
        }
        writer.to_bytes().unwrap()
    }

    fn open_bytes(bytes: &[u8]) -> Result<GeoIp, GeoIpError> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db.mmdb");
        std::fs::write(&path, bytes).unwrap();
        GeoIp::open(&path)
    }

    #[test]
    fn geolite2_country_test_database() {
        let db = GeoIp::open(Path::new(GEOLITE2)).unwrap();
        assert_eq!(db.database_type(), "GeoLite2-Country");
        assert_eq!(db.country(ip("81.2.69.142")), cc("GB"));
        // Its registered country is FR: the located country wins.
        assert_eq!(db.country(ip("2.125.160.216")), cc("GB"));
        assert_eq!(db.country(ip("216.160.83.56")), cc("US"));
        assert_eq!(db.country(ip("89.160.20.112")), cc("SE"));
        assert_eq!(db.country(ip("2001:218::1")), cc("JP"));
        assert_eq!(db.country(ip("::ffff:81.2.69.142")), cc("GB"));
        for absent in ["127.0.0.1", "10.0.0.1", "1.1.1.1", "::1", "2001:db8::1"] {
            assert_eq!(db.country(ip(absent)), None, "{absent}");
        }
    }

    #[test]
    fn geoip2_country_test_database() {
        let db = GeoIp::open(Path::new(GEOIP2)).unwrap();
        assert_eq!(db.country(ip("81.2.69.142")), cc("GB"));
        // In this file only: a record with neither country nor registered
        // country.
        assert_eq!(db.country(ip("214.1.1.1")), None);
        assert_eq!(db.country(ip("175.16.199.1")), cc("CN"));
    }

    #[test]
    fn city_database_and_registered_country_fallback() {
        let db = open_bytes(&city_db()).unwrap();
        assert_eq!(db.database_type(), "GeoLite2-City");
        // City record: its country, not its registered country.
        assert_eq!(db.country(ip("192.0.2.77")), cc("DE"));
        // No `country`: fall back to `registered_country`.
        assert_eq!(db.country(ip("198.51.100.1")), cc("FR"));
        assert_eq!(db.country(ip("2001:db8:1::5")), cc("FR"));
        assert_eq!(db.country(ip("203.0.113.9")), None);
        assert_eq!(db.country(ip("192.0.3.1")), None);
        // The same record through maxminddb's own City and Country types.
        let reader = Reader::from_source(city_db()).unwrap();
        let found = reader.lookup(ip("192.0.2.77")).unwrap();
        let full: maxminddb::geoip2::City = found.decode().unwrap().unwrap();
        assert_eq!(full.country.iso_code, Some("DE"));
        let country: maxminddb::geoip2::Country = found.decode().unwrap().unwrap();
        assert_eq!(country.country.iso_code, Some("DE"));
    }

    #[test]
    fn missing_file_is_a_read_error_naming_it() {
        let err = GeoIp::open(Path::new("/nonexistent/GeoLite2-Country.mmdb")).unwrap_err();
        assert!(matches!(err, GeoIpError::Read { .. }), "{err:?}");
        assert!(
            err.to_string()
                .contains("/nonexistent/GeoLite2-Country.mmdb"),
            "{err}"
        );
    }

    /// Damaged copies of a good file. Each must be refused, never panic.
    pub(crate) fn corrupt_variants() -> Vec<(&'static str, Vec<u8>)> {
        let good = std::fs::read(GEOLITE2).unwrap();
        let marker_at = good
            .windows(METADATA_MARKER.len())
            .rposition(|w| w == METADATA_MARKER)
            .unwrap();
        let mut rng = 0x2545_f491_4f6c_dd1d_u64;
        let random: Vec<u8> = (0..good.len())
            .map(|_| {
                rng ^= rng << 13;
                rng ^= rng >> 7;
                rng ^= rng << 17;
                rng as u8
            })
            .collect();
        let mut no_separator = good.clone();
        let meta = Reader::from_source(good.clone()).unwrap().metadata;
        let tree = meta.node_count as usize * usize::from(meta.record_size) / 4;
        no_separator[tree + 3] = 0x55;
        vec![
            ("empty", Vec::new()),
            ("first half", good[..good.len() / 2].to_vec()),
            ("last byte cut", good[..good.len() - 1].to_vec()),
            ("random bytes", random),
            // The metadata survived but the tree before it is gone: would
            // panic maxminddb without `check_layout`.
            ("metadata only", good[marker_at..].to_vec()),
            (
                "tree cut short",
                [&good[..100], &good[marker_at..]].concat(),
            ),
            ("no separator", no_separator),
        ]
    }

    #[test]
    fn a_directory_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let err = GeoIp::open(dir.path()).unwrap_err();
        assert!(
            err.to_string().contains(&*dir.path().to_string_lossy()),
            "{err}"
        );
    }

    #[test]
    fn corrupt_files_are_refused() {
        for (what, bytes) in corrupt_variants() {
            match open_bytes(&bytes) {
                Err(GeoIpError::Invalid { path, reason }) => {
                    assert!(path.ends_with("db.mmdb"), "{what}");
                    assert!(!reason.to_string().is_empty(), "{what}");
                    // Every variant but the last byte cut stops at the
                    // layout check, before the reader sees the file.
                    let expected = match what {
                        "empty" | "first half" | "random bytes" => {
                            matches!(
                                reason,
                                InvalidReason::Layout(LayoutError::NoMetadata { .. })
                            )
                        }
                        "last byte cut" => {
                            matches!(reason, InvalidReason::Layout(LayoutError::Metadata(_)))
                        }
                        "metadata only" | "tree cut short" => matches!(
                            reason,
                            InvalidReason::Layout(LayoutError::TreeTooLong { nodes: 1505, .. })
                        ),
                        "no separator" => {
                            matches!(reason, InvalidReason::Layout(LayoutError::NoSeparator))
                        }
                        _ => false,
                    };
                    assert!(expected, "{what}: {reason:?}");
                }
                other => panic!("{what}: {other:?}"),
            }
        }
    }
}
