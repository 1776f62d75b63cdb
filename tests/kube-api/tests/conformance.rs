//! Conformance: replays the exchanges recorded from a real kube-apiserver
//! (`fixtures/`, copied from the project's recordings) against this server, in order, and
//! compares status codes and bodies after normalising what differs by nature (uids,
//! resourceVersions, timestamps).
//!
//! Every recording has an expectation in [`expectation`]: compared in full, by status and
//! reason, as a discovery subset, or pending with the stage that implements it and why.
//! Recordings of the same state are replayed in order, and recorded resourceVersions and
//! uids in requests are mapped to the ones this server gave out.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Duration;

use mailpipe_kube_api::KubeApiServer;
use serde_json::{json, Value};

/// How a recording is checked.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Expect {
    /// Status code and normalised body equal.
    Body,
    /// Status code equal; for a `Status` body, reason and details too.
    Code,
    /// Status code and `managedFields` (without their times) equal: who owns which fields.
    Fields,
    /// Status code and `spec` equal: the rest (status, the revision annotation) is written
    /// by the Deployment controller, which does not run here.
    Spec,
    /// Every resource this server lists is listed the same by the real server.
    DiscoverySubset,
    /// Aggregated discovery: every resource this server lists in a group is listed the same
    /// by the real server, but for subresources this server does not serve (a namespace's
    /// `finalize`, a Service's `proxy`); recordings were trimmed to a few groups and
    /// resources.
    AggregatedSubset,
    /// A watch: the same events (type, object name) in the same order.
    Watch,
    /// A Table: the same columns and cells (ages aside); the row objects also carry what
    /// the Deployment controller wrote, which does not run here.
    Cells,
    /// OpenAPI v3 (recordings trimmed): every path this server lists is listed by the real
    /// server with the same operations, and every schema both carry is the same.
    OpenApi,
    /// A YAML body: equal once both are read as data (YAML writers differ in quoting).
    Yaml,
    /// Like `Body`, once the controllers settled (retried for a few seconds, as the
    /// recorder waited for them).
    Settled,
    /// Sent (later exchanges depend on it) but not compared, for the reason given.
    Replay(&'static str),
    /// Not replayed yet: the stage that brings it, and why.
    Pending(&'static str),
}

const CONTROLLERS: &str =
    "deliberate: no controller manager (deployment, namespace and root-CA controllers) runs here";
const UNRECORDED: &str = "deliberate: the writes during this watch were not recorded, so they cannot be replayed; own watch tests cover it";

fn expectation(number: &str) -> Expect {
    use Expect::*;
    match number {
        "001" => Code,
        "002" => Code,
        "003" | "005" | "009" => DiscoverySubset,
        "004" => Code,
        "006" => Code,
        "007" => Body,
        "008" => Body,
        "010" | "011" => AggregatedSubset,
        "012" | "013" => OpenApi,
        "014" | "015" => Pending("deliberate: OpenAPI v2 is not served; kubectl (apply, explain) and kube-rs use v3"),
        "016" => Body,
        "017" => Body,
        "018" | "019" | "020" => Body,
        "117" => Pending("deliberate: for wrongly typed fields the real server adds CEL accessor errors (\"3 is of the type string, expected int64\") that this server does not reproduce; the type errors themselves are checked in unit tests"),
        "021" | "022" => Body,
        "023" | "024" | "025" | "026" | "027" | "028" => Body,
        "029" | "030" => Body,
        "037" | "038" => Cells,
        "031" | "032" | "033" => Body,
        "034" => Body,
        "035" | "036" => Spec,
        "039" | "041" | "045" | "129" | "144" => Fields,
        "040" | "042" | "043" | "044" => Body,
        "049" => Body,
        "145" => Code,
        "046" | "050" | "051" | "053" => Body,
        // status.replicas and the revision annotation come from the deployment controller.
        "047" | "048" => Code,
        "052" => Body,
        "054" => Replay(CONTROLLERS),
        "055" => Watch,
        "056" | "057" | "058" => Body,
        "059" => Pending(CONTROLLERS),
        "060" => Watch,
        "061" => Body,
        "062" => Watch,
        "063" | "064" => Body,
        "065" | "066" | "130" | "147" => Pending(UNRECORDED),
        "067" | "068" | "069" | "070" | "071" | "072" | "073" => Body,
        "074" | "075" | "076" | "077" | "078" | "079" | "080" | "132" => Body,
        "081" | "082" | "083" | "084" => Pending(CONTROLLERS),
        "085" | "086" | "087" => Body,
        "088" | "089" | "090" => Body,
        "091" | "092" => Pending(CONTROLLERS),
        "093" | "094" | "095" | "096" | "097" | "098" | "099" => Code,
        "100" => Body,
        "101" | "102" | "103" | "104" | "105" => Body,
        // 106 lists the root-CA controller's ConfigMap (no controller manager here) and a
        // generated name: compared by status; 107 in full.
        "106" => Code,
        "107" => Body,
        "108" => Yaml,
        "109" | "110" => Code,
        "111" => Pending("deliberate: the real server answers 500 to a create carrying a resourceVersion; this server refuses it as 400... once written"),
        "112" | "113" | "114" | "115" | "116" => Code,
        "118" => Watch,
        "119" | "120" | "121" | "122" | "123" | "124" | "125" | "126" | "127" => Code,
        "128" => Body,
        "131" => Watch,
        "133" | "134" | "135" => Body,
        "136" => Settled,
        "137" | "138" | "139" => Code,
        "140" => Code,
        "141" | "142" => Pending("deliberate: authentication and authorization reviews (kubectl auth) are outside the kinds served; the test server authenticates nobody"),
        "143" | "146" => Code,
        // The second batch: the project's own CRD and the cases the first batch missed.
        // The create answers before the establishing controller writes status (as 006).
        "148" => Spec,
        "149" => Body,
        // The CRD on the recording server was created by `kubectl apply`, here by 148's POST:
        // the managers differ; the status and the (absent) warnings are what count.
        "150" => Code,
        "151" | "152" => DiscoverySubset,
        "153" | "154" => AggregatedSubset,
        "155" => Body,
        "156" | "171" | "172" => Cells,
        "157" | "158" | "159" | "160" | "161" => Body,
        "162" | "163" | "164" | "165" | "166" | "167" | "168" => Body,
        "169" | "170" => Body,
        "173" | "174" | "175" | "176" | "177" | "178" => Body,
        "179" | "180" | "181" | "182" | "183" | "184" | "185" | "186" => Body,
        "187" | "188" | "189" => Body,
        "190" | "191" | "192" | "193" => Body,
        // The namespace controller acts about 5 s after the DELETE.
        "194" | "196" => Settled,
        "195" => Body,
        "197" | "198" => Settled,
        _ => Pending("no expectation written yet"),
    }
}

/// Writes the recorder made without recording them, made here before the recording that
/// first relies on them (their content comes from later recordings): (method, path, body,
/// the uid the recordings know the object by).
fn seeds(number: &str) -> Vec<(&'static str, &'static str, Value, Option<&'static str>)> {
    let cm = |name: &str, w: &str| json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": name, "labels": {"w": w}}, "data": {"k": "v"}});
    let ep = |name: &str, labels: Value| {
        json!({"apiVersion": "mailpipe.dev/v1alpha1", "kind": "EmailPipeline",
               "metadata": {"name": name, "labels": labels},
               "spec": {"source": {"rabbitmq": {"queue": "inbox"}}, "destination": {"mailbox": "ops@example.com"}}})
    };
    let configmaps = "/api/v1/namespaces/rec/configmaps";
    let pipelines = "/apis/mailpipe.dev/v1alpha1/namespaces/rec/emailpipelines";
    let owner = |name: &str| json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": name}, "data": {"k": "v"}});
    match number {
        "074" => vec![(
            "POST",
            configmaps,
            owner("owner-foreground"),
            Some("de8d8f26-b1ed-4444-a8b2-ef308ca7c7a0"),
        )],
        "076" => vec![(
            "POST",
            configmaps,
            owner("owner-background"),
            Some("a660f7ea-5645-4da7-b39e-2de0f659b9ff"),
        )],
        "078" => vec![(
            "POST",
            configmaps,
            owner("owner-orphan"),
            Some("723cdb14-d681-45e4-85bc-3c67dbbf77c3"),
        )],
        "132" => vec![
            (
                "POST",
                configmaps,
                owner("owner-fg-blocked"),
                Some("2871aaa3-3bdd-4bb7-8a0e-1e809c518e3e"),
            ),
            (
                "POST",
                configmaps,
                json!({"apiVersion": "v1", "kind": "ConfigMap",
                "metadata": {"name": "dep-fg-blocked", "finalizers": ["mailpipe.dev/hold"], "ownerReferences": [
                    {"apiVersion": "v1", "kind": "ConfigMap", "name": "owner-fg-blocked",
                     "uid": "2871aaa3-3bdd-4bb7-8a0e-1e809c518e3e", "controller": true, "blockOwnerDeletion": true}]},
                "data": {"k": "v"}}),
                None,
            ),
        ],
        "054" => vec![
            ("POST", configmaps, cm("pre-a", "yes"), None),
            ("POST", configmaps, cm("pre-b", "no"), None),
        ],
        "102" => vec![("POST", pipelines, ep("ep2", json!({"team": "ops"})), None)],
        // 133 deletes a namespace holding a ConfigMap and an EmailPipeline.
        "133" => {
            let mut e1 = ep("e1", json!({}));
            e1["metadata"]["namespace"] = json!("rec-del");
            vec![
                (
                    "POST",
                    "/api/v1/namespaces",
                    json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "rec-del"}}),
                    None,
                ),
                (
                    "POST",
                    "/api/v1/namespaces/rec-del/configmaps",
                    cm("c1", "x"),
                    None,
                ),
                (
                    "POST",
                    "/apis/mailpipe.dev/v1alpha1/namespaces/rec-del/emailpipelines",
                    e1,
                    None,
                ),
            ]
        }
        // pre-a changed after 121 (143 then patches with 121's, now stale, resourceVersion).
        "143" => vec![(
            "PATCH",
            "/api/v1/namespaces/rec/configmaps/pre-a",
            json!({"metadata": {"annotations": {"touched": "yes"}}}),
            None,
        )],
        _ => Vec::new(),
    }
}

fn fixtures() -> Vec<(String, Value)> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fixtures");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .expect("fixtures")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .filter(|p| {
            !p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("00-"))
        })
        .collect();
    files.sort();
    files
        .into_iter()
        .map(|p| {
            let number = p.file_name().unwrap().to_string_lossy()[..3].to_string();
            let value = serde_json::from_slice(&std::fs::read(&p).expect("read")).expect("JSON");
            (number, value)
        })
        .collect()
}

/// Drops what differs by nature between two servers.
fn normalise(value: &mut Value) {
    match value {
        Value::Object(map) => {
            if let Some(Value::Object(meta)) = map.get_mut("metadata") {
                for field in [
                    "uid",
                    "resourceVersion",
                    "creationTimestamp",
                    "deletionTimestamp",
                    "continue",
                    "selfLink",
                ] {
                    meta.remove(field);
                }
                if let Some(Value::Array(entries)) = meta.get_mut("managedFields") {
                    for entry in entries.iter_mut().filter_map(Value::as_object_mut) {
                        entry.remove("time");
                    }
                    // Entries are ordered by operation, then time, then manager, version and
                    // subresource. The recordings' writes fall within one second, a replay's
                    // may straddle two (a loaded machine): without the time, compare them in
                    // the order the rest of the key gives.
                    let key = |e: &Value| {
                        ["operation", "manager", "apiVersion", "subresource"]
                            .map(|f| e[f].as_str().unwrap_or("").to_string())
                    };
                    entries.sort_by_key(key);
                }
            }
            if let Some(Value::Object(details)) = map.get_mut("details") {
                details.remove("uid");
                // The real validator reports causes in its own traversal order.
                if let Some(Value::Array(causes)) = details.get_mut("causes") {
                    causes.sort_by_key(|c| c.to_string());
                }
            }
            if let Some(Value::String(message)) = map.get_mut("message") {
                if let Some((head, list)) = message.split_once(" is invalid: [") {
                    let mut parts: Vec<&str> = list.trim_end_matches(']').split(", ").collect();
                    parts.sort();
                    *message = format!("{head} is invalid: [{}]", parts.join(", "));
                }
            }
            map.remove("lastTransitionTime");
            for child in map.values_mut() {
                normalise(child);
            }
        }
        Value::Array(items) => items.iter_mut().for_each(normalise),
        _ => {}
    }
}

/// Maps recorded resourceVersions and uids to this server's, learnt from responses.
#[derive(Default, Clone)]
struct Ids {
    known: HashMap<String, String>,
    newest_recorded: u64,
}

impl Ids {
    fn learn(&mut self, recorded: &Value, ours: &Value) {
        for field in ["resourceVersion", "uid"] {
            if let (Some(r), Some(o)) = (
                recorded["metadata"][field].as_str(),
                ours["metadata"][field].as_str(),
            ) {
                self.known.insert(r.to_string(), o.to_string());
                if let Ok(r) = r.parse::<u64>() {
                    self.newest_recorded = self.newest_recorded.max(r);
                }
            }
        }
        if let (Some(r), Some(o)) = (recorded["items"].as_array(), ours["items"].as_array()) {
            for (r, o) in r.iter().zip(o) {
                self.learn(r, o);
            }
        }
    }

    fn map(&self, text: &str) -> String {
        self.known
            .get(text)
            .cloned()
            .unwrap_or_else(|| text.to_string())
    }

    /// Whether `rv` is a resourceVersion no recorded response carried (the controller
    /// manager's writes were not recorded).
    fn is_unrecorded(&self, rv: &str) -> bool {
        !self.known.contains_key(rv) && rv.parse::<u64>().is_ok()
    }

    /// The recorded resourceVersion that maps to `ours`.
    fn recorded_of(&self, ours: &str) -> Option<u64> {
        self.known
            .iter()
            .filter(|(_, o)| o.as_str() == ours)
            .find_map(|(r, _)| r.parse().ok())
    }

    /// A watch's starting resourceVersion: a known one maps; one not seen yet but at most a
    /// little past the newest seen means "now" (a state the recorder reached through
    /// unrecorded steps); anything else (too old, far future) is kept as recorded.
    fn watch_start(&self, text: &str, now: u64) -> String {
        if let Some(ours) = self.known.get(text) {
            return ours.clone();
        }
        match text.parse::<u64>() {
            Ok(rv) if rv >= self.newest_recorded && rv <= self.newest_recorded + 100 => {
                now.to_string()
            }
            _ => text.to_string(),
        }
    }
    fn rewrite(&self, value: &mut Value) {
        match value {
            Value::Object(map) => {
                for (key, child) in map.iter_mut() {
                    match (key.as_str(), child.as_str()) {
                        ("resourceVersion" | "uid", Some(text)) => *child = json!(self.map(text)),
                        _ => self.rewrite(child),
                    }
                }
            }
            Value::Array(items) => items.iter_mut().for_each(|i| self.rewrite(i)),
            _ => {}
        }
    }
}

/// What this server answered: status, body, and its `Warning` headers.
struct Answer(u16, Value, Vec<String>);

/// The recordings made with kubectl's User-Agent (their notes say so): the field manager
/// of a non-apply write is named after it.
fn with_user_agent(number: &str, request: &Value) -> Value {
    let mut request = request.clone();
    if matches!(number, "156" | "180" | "184") {
        request["headers"]["User-Agent"] =
            json!("kubectl/v1.32.4 (linux/amd64) kubernetes/4cb5f07");
    }
    request
}

/// The same `Warning` headers as the real server, as a set: their order is not stable
/// there (see the recordings' README).
fn check_warnings(recorded: &Value, ours: &[String]) -> Result<(), String> {
    let mut theirs: Vec<String> = match &recorded["headers"]["Warning"] {
        Value::String(one) => vec![one.clone()],
        Value::Array(many) => many
            .iter()
            .filter_map(|w| w.as_str().map(str::to_string))
            .collect(),
        _ => Vec::new(),
    };
    let mut ours = ours.to_vec();
    theirs.sort();
    ours.sort();
    if theirs == ours {
        Ok(())
    } else {
        Err(format!(
            "Warning headers differ: ours {ours:?} recorded {theirs:?}"
        ))
    }
}

async fn send(client: &reqwest::Client, base: &str, ids: &Ids, request: &Value) -> Answer {
    let mut query: Vec<(String, String)> = request["query"]
        .as_object()
        .map(|q| {
            q.iter()
                .map(|(k, v)| (k.clone(), v.as_str().unwrap_or("").to_string()))
                .collect()
        })
        .unwrap_or_default();
    let watching = request["query"]["watch"].is_string();
    for (key, value) in query.iter_mut() {
        if key == "resourceVersion" {
            *value = if watching {
                let now: Value = client
                    .get(format!("{base}/api/v1/namespaces"))
                    .send()
                    .await
                    .expect("list namespaces")
                    .json()
                    .await
                    .expect("a list");
                let now = now["metadata"]["resourceVersion"]
                    .as_str()
                    .unwrap_or("0")
                    .parse()
                    .unwrap_or(0);
                ids.watch_start(value, now)
            } else {
                ids.map(value)
            };
        }
    }
    let method =
        reqwest::Method::from_bytes(request["method"].as_str().unwrap().as_bytes()).unwrap();
    let mut builder = client
        .request(
            method,
            format!("{base}{}", request["path"].as_str().unwrap()),
        )
        .query(&query);
    for (name, value) in request["headers"].as_object().into_iter().flatten() {
        builder = builder.header(name, value.as_str().unwrap_or(""));
    }
    let body = &request["body"];
    if !body.is_null() {
        let text = match body {
            Value::String(text) => text.clone(),
            other => {
                let mut other = other.clone();
                ids.rewrite(&mut other);
                // A replace of an object the controller manager wrote to after its last
                // recorded response carries a resourceVersion nobody here knows, newer
                // than the object's last known one: it stands for the object's now.
                let rv = other["metadata"]["resourceVersion"]
                    .as_str()
                    .unwrap_or("")
                    .to_string();
                if request["method"] == "PUT" && ids.is_unrecorded(&rv) {
                    let path = request["path"].as_str().unwrap();
                    let live: Value = client
                        .get(format!("{base}{path}"))
                        .send()
                        .await
                        .expect("get")
                        .json()
                        .await
                        .expect("an object");
                    let live_rv = live["metadata"]["resourceVersion"].as_str().unwrap_or("");
                    if ids
                        .recorded_of(live_rv)
                        .is_some_and(|last| rv.parse::<u64>().is_ok_and(|rv| rv > last))
                    {
                        other["metadata"]["resourceVersion"] = json!(live_rv);
                    }
                }
                other.to_string()
            }
        };
        builder = builder.body(text);
    }
    let response = builder.send().await.expect("the server answers");
    let status = response.status().as_u16();
    let warnings: Vec<String> = response
        .headers()
        .get_all("warning")
        .iter()
        .filter_map(|w| w.to_str().ok().map(str::to_string))
        .collect();
    let text = response.text().await.expect("a body");
    let body = if request["query"]["watch"].is_string() {
        Value::Array(
            text.lines()
                .filter(|l| !l.trim().is_empty())
                .map(|l| json!({"event": serde_json::from_str::<Value>(l).expect("watch line")}))
                .collect(),
        )
    } else {
        serde_json::from_str(&text).unwrap_or(Value::String(text))
    };
    Answer(status, body, warnings)
}

fn events(body: &Value) -> Vec<(String, String)> {
    body.as_array()
        .into_iter()
        .flatten()
        .map(|e| {
            let event = &e["event"];
            (
                event["type"].as_str().unwrap_or("").to_string(),
                event["object"]["metadata"]["name"]
                    .as_str()
                    .unwrap_or("")
                    .to_string(),
            )
        })
        .collect()
}

fn compare(
    expect: Expect,
    recorded: &Value,
    status: u16,
    ours: &Value,
    ids: &Ids,
) -> Result<(), String> {
    let recorded_status = recorded["status"].as_u64().unwrap() as u16;
    if status != recorded_status {
        return Err(format!(
            "status {status}, recorded {recorded_status}: {ours}"
        ));
    }
    let mut theirs = recorded["body"].clone();
    // Our uids inside values and field-set keys (ownerReferences) read as the recorded ones.
    let mut text = ours.to_string();
    for (recorded_id, our_id) in &ids.known {
        if our_id.len() == 36 && our_id.contains('-') {
            text = text.replace(our_id.as_str(), recorded_id);
        }
    }
    let mut mine: Value = serde_json::from_str(&text).expect("JSON stays JSON");
    normalise(&mut theirs);
    normalise(&mut mine);
    match expect {
        Expect::Body | Expect::Settled if theirs != mine => Err(format!(
            "body differs:\n  ours     {mine}\n  recorded {theirs}"
        )),
        Expect::Code if theirs["kind"] == "Status" => {
            for field in ["reason", "code", "status"] {
                if theirs[field] != mine[field] {
                    return Err(format!(
                        "{field} differs: ours {} recorded {}",
                        mine[field], theirs[field]
                    ));
                }
            }
            Ok(())
        }
        Expect::DiscoverySubset => {
            let recorded_resources = theirs["resources"].as_array().cloned().unwrap_or_default();
            let mut matched = 0;
            for resource in mine["resources"].as_array().into_iter().flatten() {
                // Some recordings list only part of the real answer (their note says so).
                let Some(twin) = recorded_resources
                    .iter()
                    .find(|r| r["name"] == resource["name"])
                else {
                    continue;
                };
                matched += 1;
                let mut twin = twin.clone();
                twin.as_object_mut().unwrap().remove("storageVersionHash");
                if &twin != resource {
                    return Err(format!(
                        "resource differs:\n  ours     {resource}\n  recorded {twin}"
                    ));
                }
            }
            if matched == 0 {
                return Err("no resource of this server is in the recording".into());
            }
            Ok(())
        }
        Expect::Replay(_) => Ok(()),
        Expect::OpenApi => {
            let mut matched = 0;
            for (path, item) in mine["paths"].as_object().into_iter().flatten() {
                let Some(twin) = theirs["paths"].get(path) else {
                    return Err(format!("path {path} is not served by the real server"));
                };
                matched += 1;
                // The recorder kept operation names only (the index: a URL per document).
                if let Some(operations) = twin.as_array() {
                    let mut ours: Vec<&String> = item
                        .as_object()
                        .map(|o| o.keys().collect())
                        .unwrap_or_default();
                    ours.sort();
                    let theirs: Vec<&str> = operations.iter().filter_map(Value::as_str).collect();
                    if ours != theirs {
                        return Err(format!(
                            "operations of {path} differ: ours {ours:?} recorded {theirs:?}"
                        ));
                    }
                }
            }
            for (name, schema) in theirs["components"]["schemas"]
                .as_object()
                .into_iter()
                .flatten()
            {
                matched += 1;
                if mine["components"]["schemas"].get(name) != Some(schema) {
                    return Err(format!(
                        "schema {name} differs:\n  ours     {}\n  recorded {schema}",
                        mine["components"]["schemas"][name]
                    ));
                }
            }
            if matched == 0 {
                return Err("nothing of this server is in the recording".into());
            }
            Ok(())
        }
        Expect::Yaml => {
            let data = |v: &Value| -> Value {
                let mut data: Value =
                    serde_yaml_ng::from_str(v.as_str().unwrap_or("")).unwrap_or(Value::Null);
                normalise(&mut data);
                data
            };
            if data(&theirs) == data(&mine) {
                Ok(())
            } else {
                Err(format!(
                    "YAML differs:\n  ours     {}\n  recorded {}",
                    data(&mine),
                    data(&theirs)
                ))
            }
        }
        Expect::AggregatedSubset => {
            let key = |item: &Value| item["metadata"]["name"].as_str().unwrap_or("").to_string();
            let mut matched = 0;
            for item in mine["items"].as_array().into_iter().flatten() {
                let Some(twin) = theirs["items"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .find(|t| key(t) == key(item))
                else {
                    continue;
                };
                for (version, twin_version) in item["versions"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .zip(twin["versions"].as_array().into_iter().flatten())
                {
                    if version["version"] != twin_version["version"]
                        || version["freshness"] != twin_version["freshness"]
                    {
                        return Err(format!(
                            "versions differ: ours {version} recorded {twin_version}"
                        ));
                    }
                    for resource in version["resources"].as_array().into_iter().flatten() {
                        let Some(twin_resource) = twin_version["resources"]
                            .as_array()
                            .into_iter()
                            .flatten()
                            .find(|r| r["resource"] == resource["resource"])
                        else {
                            continue;
                        };
                        matched += 1;
                        let mut twin_resource = twin_resource.clone();
                        if let Some(subresources) = twin_resource
                            .get_mut("subresources")
                            .and_then(Value::as_array_mut)
                        {
                            subresources.retain(|s| {
                                s["subresource"] != "finalize" && s["subresource"] != "proxy"
                            });
                        }
                        if &twin_resource != resource {
                            return Err(format!("resource differs:\n  ours     {resource}\n  recorded {twin_resource}"));
                        }
                    }
                }
            }
            if matched == 0 {
                return Err("no resource of this server is in the recording".into());
            }
            Ok(())
        }
        Expect::Cells => {
            let cells = |t: &Value| -> Value {
                let rows = t["rows"].as_array().cloned().unwrap_or_default();
                let age = t["columnDefinitions"]
                    .as_array()
                    .and_then(|c| c.iter().position(|c| c["name"] == "Age"));
                let cells: Vec<Value> = rows
                    .iter()
                    .map(|r| {
                        let mut cells = r["cells"].clone();
                        // Age depends on when the replay runs; it reads as the real
                        // server writes it, relative ("2s", "3m").
                        if let Some(cell) = age.and_then(|i| cells.get_mut(i)) {
                            if is_relative_age(cell) {
                                *cell = json!("<age>");
                            }
                        }
                        cells
                    })
                    .collect();
                json!({"columns": t["columnDefinitions"], "cells": cells})
            };
            if cells(&theirs) == cells(&mine) {
                Ok(())
            } else {
                Err(format!(
                    "table differs:\n  ours     {}\n  recorded {}",
                    cells(&mine),
                    cells(&theirs)
                ))
            }
        }
        Expect::Spec if theirs["spec"] != mine["spec"] => Err(format!(
            "spec differs:\n  ours     {}\n  recorded {}",
            mine["spec"], theirs["spec"]
        )),
        Expect::Fields => {
            let fields = |v: &Value| v["metadata"]["managedFields"].clone();
            if fields(&theirs) != fields(&mine) {
                return Err(format!(
                    "managedFields differ:\n  ours     {}\n  recorded {}",
                    fields(&mine),
                    fields(&theirs)
                ));
            }
            Ok(())
        }
        Expect::Watch if events(&theirs) != events(&mine) => Err(format!(
            "events differ: ours {:?}, recorded {:?}",
            events(&mine),
            events(&theirs)
        )),
        _ => Ok(()),
    }
}

/// `2s`, `5m30s`, `3h`, `2d4h`: an age as the real server's tables print it.
fn is_relative_age(cell: &Value) -> bool {
    let text = cell.as_str().unwrap_or("");
    !text.is_empty()
        && text.starts_with(|c: char| c.is_ascii_digit())
        && text
            .chars()
            .all(|c| c.is_ascii_digit() || "smhdy".contains(c))
        && text.ends_with(|c: char| "smhdy".contains(c))
}

/// The dependent a garbage-collection recording watched, by recording.
fn dependent_of(number: &str) -> Option<&'static str> {
    match number {
        "075" => Some("dep-foreground"),
        "077" => Some("dep-background"),
        "079" => Some("dep-orphan"),
        "132" => Some("dep-fg-blocked"),
        _ => None,
    }
}

/// For recordings with a timeline (owner and dependent after a delete): performs the
/// recorder's own steps and checks the final state the real controller manager reached.
/// The paths a deletion timeline polled, by the names the recorder gave them.
fn polled_paths(number: &str) -> &'static [(&'static str, &'static str)] {
    match number {
        "133" => &[
            ("namespace", "/api/v1/namespaces/rec-del"),
            ("configmap_c1", "/api/v1/namespaces/rec-del/configmaps/c1"),
            ("emailpipeline_e1", "/apis/mailpipe.dev/v1alpha1/namespaces/rec-del/emailpipelines/e1"),
        ],
        "193" | "197" => &[
            ("namespace", "/api/v1/namespaces/rec2-del"),
            ("secret_amqp", "/api/v1/namespaces/rec2-del/secrets/amqp"),
            ("emailpipeline_held", "/apis/mailpipe.dev/v1alpha1/namespaces/rec2-del/emailpipelines/held"),
        ],
        "135" => &[
            ("crd", "/apis/apiextensions.k8s.io/v1/customresourcedefinitions/emailpipelines.mailpipe.dev"),
            ("list_emailpipelines", "/apis/mailpipe.dev/v1alpha1/namespaces/rec/emailpipelines"),
            ("discovery_group_version", "/apis/mailpipe.dev/v1alpha1"),
        ],
        _ => &[],
    }
}

/// Recording 193: the namespace controller deletes the Secret before it marks the
/// pipeline, so a pipeline's cleanup never finds the Secret it names. Polled until the
/// pipeline is marked, reading the pipeline first: once it shows a deletionTimestamp, the
/// Secret read after it must be gone already.
async fn check_namespace_order(client: &reqwest::Client, base: &str) -> Result<(), String> {
    let pipeline =
        format!("{base}/apis/mailpipe.dev/v1alpha1/namespaces/rec2-del/emailpipelines/held");
    let secret = format!("{base}/api/v1/namespaces/rec2-del/secrets/amqp");
    for _ in 0..200 {
        let held: Value = client
            .get(&pipeline)
            .send()
            .await
            .map_err(|e| e.to_string())?
            .json()
            .await
            .map_err(|e| e.to_string())?;
        let secret_status = client
            .get(&secret)
            .send()
            .await
            .map_err(|e| e.to_string())?
            .status()
            .as_u16();
        if held["metadata"]["deletionTimestamp"].is_string() {
            return if secret_status == 404 {
                Ok(())
            } else {
                Err("the pipeline was marked while its Secret still existed".into())
            };
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Err("the pipeline was never marked for deletion".into())
}

/// For a deletion whose recording polled until its controllers finished: the same final
/// status codes are reached here, and in the same first state on the way.
async fn check_final_state(
    client: &reqwest::Client,
    base: &str,
    number: &str,
    exchange: &Value,
) -> Result<(), String> {
    let paths = polled_paths(number);
    let Some(timeline) = exchange["timeline"]
        .as_array()
        .filter(|_| !paths.is_empty())
    else {
        return Ok(());
    };
    let last = timeline
        .iter()
        .find(|s| s["final"] == true)
        .ok_or("no final state recorded")?;
    let code = |v: &Value| v.as_u64().or_else(|| v["status"].as_u64()).unwrap_or(0) as u16;
    let expected: Vec<u16> = paths.iter().map(|(name, _)| code(&last[*name])).collect();
    let mut observed = Vec::new();
    for _ in 0..100 {
        observed.clear();
        for (_, path) in paths {
            let status = client
                .get(format!("{base}{path}"))
                .send()
                .await
                .map(|r| r.status().as_u16());
            observed.push(status.unwrap_or(0));
        }
        if observed == expected {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Err(format!(
        "the polled paths answer {observed:?}, the real ones reached {expected:?}"
    ))
}

async fn check_timeline(
    client: &reqwest::Client,
    base: &str,
    number: &str,
    exchange: &Value,
) -> Result<(), String> {
    let (Some(timeline), Some(dependent)) = (exchange["timeline"].as_array(), dependent_of(number))
    else {
        return Ok(());
    };
    let owner_path = exchange["request"]["path"]
        .as_str()
        .unwrap_or("")
        .to_string();
    let dependent_path = format!(
        "{}/{dependent}",
        owner_path.rsplit_once('/').map(|(p, _)| p).unwrap_or("")
    );
    let status = |path: String| async move {
        client
            .get(format!("{base}{path}"))
            .send()
            .await
            .map(|r| r.status().as_u16())
            .unwrap_or(0)
    };
    for step in timeline {
        if step["step"]
            .as_str()
            .is_some_and(|s| s.contains("removed the dependent's finalizer"))
        {
            // While the dependent holds its finalizer, the owner must still be waiting.
            tokio::time::sleep(Duration::from_millis(300)).await;
            if status(owner_path.clone()).await != 200 {
                return Err("the owner went before its blocking dependent".into());
            }
            client
                .patch(format!("{base}{dependent_path}"))
                .header("Content-Type", "application/merge-patch+json")
                .body(r#"{"metadata":{"finalizers":null}}"#)
                .send()
                .await
                .map_err(|e| e.to_string())?;
        }
    }
    let last = timeline
        .iter()
        .find(|s| s["final"] == true)
        .ok_or("no final state recorded")?;
    let expected = (
        last["owner"]["status"].as_u64().unwrap_or(0) as u16,
        last["dependent"]["status"].as_u64().unwrap_or(0) as u16,
    );
    let mut observed = (0, 0);
    for _ in 0..40 {
        observed = (
            status(owner_path.clone()).await,
            status(dependent_path.clone()).await,
        );
        if observed == expected {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Err(format!(
        "owner and dependent answer {observed:?}, the real ones reached {expected:?}"
    ))
}

#[tokio::test]
async fn recorded_exchanges_replay_against_the_test_server() {
    let server = KubeApiServer::start().await.expect("server starts");
    let base = server.url();
    // The recorder's User-Agent: the real server named its Update entries after it.
    let client = reqwest::Client::builder()
        .user_agent("kube-recorder/1.0")
        .build()
        .unwrap();
    let mut ids = Ids::default();
    let fixtures = fixtures();
    let mut failures = Vec::new();
    let (mut checked, mut pending) = (0, 0);
    let mut index = 0;
    let mut deferred: Option<(String, Value)> = None;
    while index < fixtures.len() {
        let (number, exchange) = &fixtures[index];
        index += 1;
        let expect = expectation(number);
        for (method, path, mut object, recorded_uid) in seeds(number) {
            ids.rewrite(&mut object);
            let response = client
                .request(
                    reqwest::Method::from_bytes(method.as_bytes()).unwrap(),
                    format!("{base}{path}"),
                )
                .header(
                    "Content-Type",
                    if method == "PATCH" {
                        "application/merge-patch+json"
                    } else {
                        "application/json"
                    },
                )
                .body(object.to_string())
                .send()
                .await
                .expect("seed");
            assert!(
                response.status().is_success(),
                "seeding before {number}: {}",
                response.status()
            );
            let created: Value = response.json().await.expect("a seeded object");
            if let (Some(recorded), Some(ours)) =
                (recorded_uid, created["metadata"]["uid"].as_str())
            {
                ids.known.insert(recorded.to_string(), ours.to_string());
            }
        }
        if let Expect::Pending(why) = expect {
            pending += 1;
            println!("{number} pending ({why})");
            continue;
        }
        let request = with_user_agent(number, &exchange["request"]);
        let Answer(status, body, warnings) = if expect == Expect::Settled {
            let mut answer = send(&client, &base, &ids, &request).await;
            for _ in 0..100 {
                if compare(
                    Expect::Body,
                    &exchange["response"],
                    answer.0,
                    &answer.1,
                    &ids,
                )
                .is_ok()
                {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
                answer = send(&client, &base, &ids, &request).await;
            }
            answer
        } else if expect == Expect::Watch {
            // Start the watch, replay the writes recorded during it, then read it out.
            let request = request.clone();
            let watch = {
                let (client, base) = (client.clone(), base.clone());
                let ids_now = ids.clone();
                tokio::spawn(async move { send(&client, &base, &ids_now, &request).await })
            };
            tokio::time::sleep(Duration::from_millis(300)).await;
            while index < fixtures.len()
                && fixtures[index].1["purpose"]
                    .as_str()
                    .unwrap_or("")
                    .starts_with("(during")
            {
                let (during_number, during) = &fixtures[index];
                let Answer(status, body, warnings) = send(
                    &client,
                    &base,
                    &ids,
                    &with_user_agent(during_number, &during["request"]),
                )
                .await;
                if let Err(why) = compare(
                    expectation(during_number),
                    &during["response"],
                    status,
                    &body,
                    &ids,
                )
                .and_then(|()| check_warnings(&during["response"], &warnings))
                {
                    failures.push(format!("{during_number}: {why}"));
                }
                ids.learn(&during["response"]["body"], &body);
                checked += 1;
                index += 1;
            }
            watch.await.expect("watch task")
        } else {
            send(&client, &base, &ids, &request).await
        };
        let warned = match expect {
            Expect::Replay(_) => Ok(()),
            _ => check_warnings(&exchange["response"], &warnings),
        };
        if let Err(why) = compare(expect, &exchange["response"], status, &body, &ids).and(warned) {
            failures.push(format!("{number}: {why}"));
        }
        ids.learn(&exchange["response"]["body"], &body);
        checked += 1;
        if let Err(why) = check_timeline(&client, &base, number, exchange).await {
            failures.push(format!("{number} (timeline): {why}"));
        }
        if number == "193" {
            if let Err(why) = check_namespace_order(&client, &base).await {
                failures.push(format!("{number} (order): {why}"));
            }
        }
        // A deletion's final state is checked after the next exchange, which the recorder
        // made while the deletion was still under way.
        if let Some((earlier, recorded)) = deferred.take() {
            if let Err(why) = check_final_state(&client, &base, &earlier, &recorded).await {
                failures.push(format!("{earlier} (final state): {why}"));
            }
        }
        if !polled_paths(number).is_empty() {
            deferred = Some((number.clone(), exchange.clone()));
        }
    }
    if let Some((earlier, recorded)) = deferred.take() {
        if let Err(why) = check_final_state(&client, &base, &earlier, &recorded).await {
            failures.push(format!("{earlier} (final state): {why}"));
        }
    }
    println!(
        "{checked} recordings checked, {pending} pending, {} failed",
        failures.len()
    );
    assert!(
        failures.is_empty(),
        "{} recordings differ:\n{}",
        failures.len(),
        failures.join("\n")
    );
}
