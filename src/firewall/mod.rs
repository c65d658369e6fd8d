//! The global firewall.
pub mod rule;
