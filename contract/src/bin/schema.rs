//! Prints the JSON Schema of the email job v1 (committed as `contract/schema/email-job.v1.json`).
#![forbid(unsafe_code)]

fn main() {
    let mut schema = schemars::schema_for!(mailpipe_contract::EmailJob);
    schema.insert(
        "$id".into(),
        "https://mailpipe.dev/contract/schema/email-job.v1.json".into(),
    );
    let text = serde_json::to_string_pretty(&schema).expect("a schema serializes");
    println!("{text}");
}
