//! Unit tests of the store's semantics.

use super::*;

#[test]
fn schema_defaults_fill_absent_fields_of_present_objects() {
    let schema = json!({"type": "object", "properties": {"spec": {"type": "object", "properties": {
        "replicas": {"type": "integer", "default": 1},
        "scaling": {"type": "object", "properties": {"min": {"type": "integer", "default": 1}}},
        "absent": {"type": "object", "properties": {"x": {"type": "integer", "default": 3}}}
    }}}});
    let mut object = json!({"spec": {"scaling": {}}});
    apply_defaults(&mut object, &schema);
    assert_eq!(
        object,
        json!({"spec": {"replicas": 1, "scaling": {"min": 1}}})
    );
}

#[test]
fn generation_moves_with_spec_changes_only() {
    let mut store = Store::new();
    let crd = json!({"apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
        "metadata": {"name": "things.example.com"},
        "spec": {"group": "example.com", "scope": "Namespaced",
            "names": {"kind": "Thing", "plural": "things"},
            "versions": [{"name": "v1", "served": true, "storage": true,
                "subresources": {"status": {}},
                "schema": {"openAPIV3Schema": {"type": "object", "x-kubernetes-preserve-unknown-fields": true}}}]}});
    let crds = store
        .kind("apiextensions.k8s.io", "v1", "customresourcedefinitions")
        .unwrap();
    store
        .create(&crds, "", crd, false, Writer::Update("test".into()))
        .unwrap();
    let things = store.kind("example.com", "v1", "things").unwrap();
    let thing = json!({"apiVersion": "example.com/v1", "kind": "Thing", "metadata": {"name": "a"}, "spec": {"n": 1}});
    let created = store
        .create(
            &things,
            "default",
            thing,
            false,
            Writer::Update("test".into()),
        )
        .unwrap();
    assert_eq!(created["metadata"]["generation"], 1);
    let relabelled = store
        .patch(
            &things,
            "default",
            "a",
            Part::Main,
            Writer::Update("test".into()),
            |o| {
                o["metadata"]["labels"] = json!({"x": "y"});
                Ok(())
            },
        )
        .unwrap();
    assert_eq!(relabelled["metadata"]["generation"], 1);
    let status = store
        .patch(
            &things,
            "default",
            "a",
            Part::Status,
            Writer::Update("test".into()),
            |o| {
                o["status"] = json!({"ready": true});
                o["spec"] = json!({"n": 99});
                Ok(())
            },
        )
        .unwrap();
    assert_eq!(
        status["spec"]["n"], 1,
        "spec changes through /status are ignored"
    );
    assert_eq!(status["metadata"]["generation"], 1);
    let respec = store
        .patch(
            &things,
            "default",
            "a",
            Part::Main,
            Writer::Update("test".into()),
            |o| {
                o["spec"]["n"] = json!(2);
                o["status"] = json!({"ready": false});
                Ok(())
            },
        )
        .unwrap();
    assert_eq!(respec["metadata"]["generation"], 2);
    assert_eq!(
        respec["status"]["ready"], true,
        "status changes through the main resource are ignored"
    );
}

#[test]
fn finalizers_hold_a_deleted_object_until_they_are_removed() {
    let mut store = Store::new();
    let cms = store.kind("", "v1", "configmaps").unwrap();
    let cm = json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "a", "finalizers": ["x/y"]}});
    store
        .create(&cms, "default", cm, false, Writer::Update("test".into()))
        .unwrap();
    let Deleted::Marked(marked) = store
        .delete(&cms, "default", "a", None, None, Propagation::Background)
        .unwrap()
    else {
        panic!("finalizers hold the object");
    };
    assert!(marked["metadata"]["deletionTimestamp"].is_string());
    let refused = store.patch(
        &cms,
        "default",
        "a",
        Part::Main,
        Writer::Update("test".into()),
        |o| {
            o["metadata"]["finalizers"] = json!(["x/y", "x/z"]);
            Ok(())
        },
    );
    assert_eq!(refused.unwrap_err().code, 422);
    store
        .patch(
            &cms,
            "default",
            "a",
            Part::Main,
            Writer::Update("test".into()),
            |o| {
                o["metadata"]["finalizers"] = json!([]);
                Ok(())
            },
        )
        .unwrap();
    assert_eq!(store.get(&cms, "default", "a").unwrap_err().code, 404);
}
