//! The Strimzi topic resources committed under deploy/k8s/strimzi are what
//! `flywheel topics strimzi` makes from deploy/topics.toml, so the topic map,
//! `flywheel topics create` and the Kubernetes resources cannot drift apart.
//! (The rest of the deployment is checked by `make deploy-check`.)

use std::path::Path;

use flywheel_core::topics::TopicsConfig;

#[test]
fn the_committed_strimzi_topics_equal_what_the_command_generates_from_the_topic_map() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("the workspace root");
    let committed = std::fs::read_to_string(root.join("deploy/k8s/strimzi/kafkatopics.yaml")).unwrap();
    let topics = TopicsConfig::load(&root.join("deploy/topics.toml")).unwrap();
    let generated =
        flywheel_cli::strimzi_topics(&topics, Some("deploy/topics.toml"), "flywheel", Some("kafka")).unwrap();
    assert!(
        committed == generated,
        "deploy/k8s/strimzi/kafkatopics.yaml is stale: run\n  {}\nfrom the repository root",
        generated.lines().next().unwrap_or_default()
    );
    // Every topic of the map is there, with the layout file's partitions.
    for spec in topics.specs() {
        assert!(
            generated.contains(&format!("topicName: \"{}\"\n  partitions: {}\n", spec.name, spec.partitions)),
            "{} missing or with other partitions",
            spec.name
        );
    }
}

#[test]
fn strimzi_names_are_kubernetes_names_and_bad_ones_are_refused() {
    let topics: TopicsConfig = toml_layout("prefix = \"Prod_EU.\"\n");
    let out = flywheel_cli::strimzi_topics(&topics, None, "kafka-one", None).unwrap();
    assert!(out.contains("  name: prod-eu.interactions\n"), "{out}");
    assert!(out.contains("topicName: \"Prod_EU.interactions\""), "the exact topic name is kept");
    assert!(!out.contains("namespace:"), "no namespace unless asked for");
    assert!(flywheel_cli::strimzi_topics(&topics, None, "Kafka", None).is_err(), "upper-case cluster name");
    assert!(flywheel_cli::strimzi_topics(&topics, None, "k", Some("a_b")).is_err(), "bad namespace");
    let odd: TopicsConfig = toml_layout("prefix = \"-x.\"\n");
    assert!(flywheel_cli::strimzi_topics(&odd, None, "k", None).is_err(), "a name starting with '-'");
}

fn toml_layout(text: &str) -> TopicsConfig {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("topics.toml");
    std::fs::write(&path, text).unwrap();
    TopicsConfig::load(&path).unwrap()
}
