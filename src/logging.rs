//! Log output: journald with structured fields when running under systemd
//! with journald (`JOURNAL_STREAM` set), otherwise a human format on stderr.
//! `RUST_LOG` overrides the config's level.

use std::io::IsTerminal;

use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::EnvFilter;

/// Where log lines go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sink {
    Journald,
    Stderr,
}

pub fn init(level: &str) -> Sink {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        // Our crate at the configured level; dependencies one step quieter
        // unless asked for (h2 and hyper are chatty at debug).
        let deps = match level {
            "trace" | "debug" => "info",
            other => other,
        };
        EnvFilter::new(format!("{deps},mc_proxy={level}"))
    });
    let registry = tracing_subscriber::registry().with(filter);
    if std::env::var_os("JOURNAL_STREAM").is_some() {
        if let Ok(journald) = tracing_journald::layer() {
            let _ = registry
                .with(journald.with_syslog_identifier("mc-proxy".into()))
                .try_init();
            return Sink::Journald;
        }
    }
    let _ = registry
        .with(
            tracing_subscriber::fmt::layer()
                .with_writer(std::io::stderr)
                .with_ansi(std::io::stderr().is_terminal())
                .with_target(true),
        )
        .try_init();
    Sink::Stderr
}
