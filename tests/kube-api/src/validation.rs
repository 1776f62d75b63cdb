//! Validation of custom resources against their CRD's structural schema, with the real
//! server's messages: the checks themselves are the operator's `admission` module (local
//! mode runs them where no API server does); the warnings a CRD write gets for formats the
//! server does not know are the test server's own.

pub use mailpipe_operator::admission::{prune, strip_envelope, validate, Violation};
use serde_json::Value;

/// Formats the API server knows (kube-openapi's registry and the ones it adds); a CRD
/// schema naming another gets an `unrecognized format` warning, one per format.
const KNOWN_FORMATS: &[&str] = &[
    "bsonobjectid",
    "uri",
    "email",
    "hostname",
    "ipv4",
    "ipv6",
    "cidr",
    "mac",
    "uuid",
    "uuid3",
    "uuid4",
    "uuid5",
    "isbn",
    "isbn10",
    "isbn13",
    "creditcard",
    "ssn",
    "hexcolor",
    "rgbcolor",
    "byte",
    "password",
    "date",
    "duration",
    "datetime",
    "date-time",
    "int32",
    "int64",
    "float",
    "double",
    "k8s-short-name",
    "k8s-long-name",
];

fn formats(node: &Value, out: &mut std::collections::BTreeSet<String>) {
    match node {
        Value::Object(map) => {
            if let Some(Value::String(format)) = map.get("format") {
                out.insert(format.clone());
            }
            map.values().for_each(|v| formats(v, out));
        }
        Value::Array(items) => items.iter().for_each(|v| formats(v, out)),
        _ => {}
    }
}

/// The warnings a CRD write gets for formats the server does not know: all of them on a
/// create (before the existence check, so a 409 carries them too), on an update only those
/// the stored CRD did not have already (recordings 148-150).
pub fn crd_format_warnings(crd: &Value, old: Option<&Value>) -> Vec<String> {
    let mut new = std::collections::BTreeSet::new();
    formats(&crd["spec"]["versions"], &mut new);
    let mut before = std::collections::BTreeSet::new();
    if let Some(old) = old {
        formats(&old["spec"]["versions"], &mut before);
    }
    new.iter()
        .filter(|f| !KNOWN_FORMATS.contains(&f.as_str()) && !before.contains(*f))
        .map(|f| format!("unrecognized format \"{f}\""))
        .collect()
}
