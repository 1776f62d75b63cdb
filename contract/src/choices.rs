//! The settings with a fixed set of values that the EmailPipeline CRD, the operator's
//! environment for the worker and the worker's own flags all carry: each is defined once,
//! here, with its wire name (`as_str`, serde, the CRD schema with feature `schema`, the
//! command line with feature `cli`), so the three can never map them differently.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// How the worker talks TLS to the SMTP server.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[cfg_attr(feature = "cli", derive(clap::ValueEnum))]
#[serde(rename_all = "lowercase")]
pub enum TlsMode {
    /// A plain connection upgraded with STARTTLS, which is required (usually port 587).
    #[default]
    Starttls,
    /// TLS from the first byte (SMTPS, usually port 465).
    Tls,
    /// No encryption at all; only when asked for explicitly.
    None,
}

impl TlsMode {
    /// The name in the CRD, the environment and on the command line.
    pub fn as_str(self) -> &'static str {
        match self {
            TlsMode::Starttls => "starttls",
            TlsMode::Tls => "tls",
            TlsMode::None => "none",
        }
    }
}

/// What the worker does while Redis (the deduplication store) cannot be reached.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[cfg_attr(feature = "cli", derive(clap::ValueEnum))]
#[serde(rename_all = "lowercase")]
pub enum OnRedisUnavailable {
    /// Stop sending until Redis answers again (nothing is sent twice); readiness is false
    /// meanwhile.
    #[default]
    Pause,
    /// Keep sending without deduplication (a redelivered job may be sent twice).
    Send,
}

impl OnRedisUnavailable {
    /// The name in the CRD, the environment and on the command line.
    pub fn as_str(self) -> &'static str {
        match self {
            OnRedisUnavailable::Pause => "pause",
            OnRedisUnavailable::Send => "send",
        }
    }
}

/// How the worker and the operator log in to Kafka with SASL (the names are librdkafka's
/// `sasl.mechanism` values).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[cfg_attr(feature = "cli", derive(clap::ValueEnum))]
pub enum SaslMechanism {
    /// PLAIN (over TLS).
    #[serde(rename = "PLAIN")]
    #[cfg_attr(feature = "cli", value(name = "PLAIN"))]
    Plain,
    /// SCRAM-SHA-256.
    #[default]
    #[serde(rename = "SCRAM-SHA-256")]
    #[cfg_attr(feature = "cli", value(name = "SCRAM-SHA-256"))]
    ScramSha256,
    /// SCRAM-SHA-512.
    #[serde(rename = "SCRAM-SHA-512")]
    #[cfg_attr(feature = "cli", value(name = "SCRAM-SHA-512"))]
    ScramSha512,
}

impl SaslMechanism {
    /// The name in the CRD, the environment, on the command line and to librdkafka.
    pub fn as_str(self) -> &'static str {
        match self {
            SaslMechanism::Plain => "PLAIN",
            SaslMechanism::ScramSha256 => "SCRAM-SHA-256",
            SaslMechanism::ScramSha512 => "SCRAM-SHA-512",
        }
    }
}

/// `FromStr` and `Display` by `as_str` for an enum of unit variants.
macro_rules! from_str_by_name {
    ($ty:ty, $what:literal, [$($variant:expr),+]) => {
        impl FromStr for $ty {
            type Err = String;
            fn from_str(s: &str) -> Result<Self, String> {
                [$($variant),+]
                    .into_iter()
                    .find(|v| v.as_str() == s)
                    .ok_or_else(|| {
                        let names: Vec<&str> = [$($variant.as_str()),+].to_vec();
                        format!("unknown {} {s:?}, expected one of {}", $what, names.join(", "))
                    })
            }
        }
        impl fmt::Display for $ty {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }
    };
}
pub(crate) use from_str_by_name;

from_str_by_name!(
    TlsMode,
    "TLS mode",
    [TlsMode::Starttls, TlsMode::Tls, TlsMode::None]
);
from_str_by_name!(
    SaslMechanism,
    "SASL mechanism",
    [
        SaslMechanism::Plain,
        SaslMechanism::ScramSha256,
        SaslMechanism::ScramSha512
    ]
);
from_str_by_name!(
    OnRedisUnavailable,
    "Redis policy",
    [OnRedisUnavailable::Pause, OnRedisUnavailable::Send]
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_choice_reads_back_from_its_wire_name_and_serde_agrees() {
        for tls in [TlsMode::Starttls, TlsMode::Tls, TlsMode::None] {
            assert_eq!(tls.as_str().parse::<TlsMode>(), Ok(tls));
            assert_eq!(serde_json::to_value(tls).unwrap(), tls.as_str());
        }
        for policy in [OnRedisUnavailable::Pause, OnRedisUnavailable::Send] {
            assert_eq!(policy.as_str().parse::<OnRedisUnavailable>(), Ok(policy));
            assert_eq!(serde_json::to_value(policy).unwrap(), policy.as_str());
        }
        for sasl in [
            SaslMechanism::Plain,
            SaslMechanism::ScramSha256,
            SaslMechanism::ScramSha512,
        ] {
            assert_eq!(sasl.as_str().parse::<SaslMechanism>(), Ok(sasl));
            assert_eq!(serde_json::to_value(sasl).unwrap(), sasl.as_str());
        }
        assert!("STARTTLS".parse::<TlsMode>().is_err());
    }
}
