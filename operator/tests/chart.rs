//! Checks on the Helm chart that need no Kubernetes: the Grafana dashboard plots the agent metrics
//! named in the contract, and the chart's RBAC covers what the operator calls.
//! (`helm lint` and `helm template | kubeconform -strict` run in the e2e crate / CI.)

use std::path::PathBuf;

fn chart() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../charts/lockstep")
}

#[test]
fn dashboard_plots_the_contract_metrics() {
    let text = std::fs::read_to_string(chart().join("dashboards/lockstep.json")).unwrap();
    let d: serde_json::Value = serde_json::from_str(&text).expect("dashboard is valid JSON");
    let exprs: Vec<String> = d["panels"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|p| p["targets"].as_array().unwrap().iter().map(|t| t["expr"].as_str().unwrap().to_owned()))
        .collect();
    let has = |needles: &[&str]| exprs.iter().any(|e| needles.iter().all(|n| e.contains(n)));
    assert!(
        has(&["rate(lockstep_log_bytes_sent_total", "[30s]", "* 8", "vm_id"]),
        "log bandwidth in bits/s per VM: {exprs:?}"
    );
    assert!(has(&["lockstep_execution_lag_seconds"]), "execution lag: {exprs:?}");
    assert!(
        has(&["histogram_quantile(0.99", "rate(lockstep_output_hold_seconds_bucket", "[1m]"]),
        "output hold p99: {exprs:?}"
    );
    assert!(has(&["increase(lockstep_failovers_total", "[1h]"]), "failovers: {exprs:?}");
}

#[test]
fn rbac_covers_every_resource_the_operator_touches() {
    let rbac = std::fs::read_to_string(chart().join("templates/rbac.yaml")).unwrap();
    for needle in [
        "\"ftvirtualmachines\"",
        "\"ftvirtualmachines/status\"",
        "\"ftvirtualmachines/finalizers\"",
        "\"pods\"",
        "\"services\"",
        "\"leases\"",
        "\"nodes\"",
        "\"events\"",
        "\"serviceaccounts\"",
        "\"rolebindings\"",
        "\"networkpolicies\"",
        "[\"bind\"]",
    ] {
        assert!(rbac.contains(needle), "charts/lockstep/templates/rbac.yaml lacks {needle}");
    }
    assert!(!rbac.contains("\"*\""), "no wildcards in RBAC");
    // Secrets: written blind everywhere, read only by name (its CA) in its own namespace.
    let docs: Vec<serde_json::Value> = rbac
        .split("\n---")
        .filter(|d| d.contains("rules:"))
        .map(|d| {
            // The templates are valid YAML once the Helm expressions are blanked.
            let plain: String = d
                .lines()
                .map(|l| {
                    let mut out = String::new();
                    let mut rest = l;
                    while let Some(i) = rest.find("{{") {
                        out.push_str(&rest[..i]);
                        out.push('x');
                        rest = rest[i..].find("}}").map_or("", |j| &rest[i + j + 2..]);
                    }
                    out + rest
                })
                .collect::<Vec<_>>()
                .join("\n");
            serde_saphyr::from_str(&plain).unwrap_or_else(|e| panic!("{e}: {plain}"))
        })
        .collect();
    let mut secret_rules = 0;
    for doc in &docs {
        for rule in doc["rules"].as_array().unwrap() {
            if !rule["resources"].as_array().unwrap().iter().any(|r| r == "secrets") {
                continue;
            }
            secret_rules += 1;
            let verbs: Vec<&str> = rule["verbs"].as_array().unwrap().iter().filter_map(|v| v.as_str()).collect();
            let named = rule.get("resourceNames").is_some();
            for v in &verbs {
                assert!(!["list", "watch", "delete", "deletecollection"].contains(v), "secrets: {v} is never needed");
                if *v == "get" || *v == "update" {
                    assert!(named, "secrets: {v} only on the CA Secret by name: {rule}");
                    assert_eq!(doc["kind"], "Role", "reading a Secret only in the operator's own namespace");
                }
            }
        }
    }
    assert_eq!(secret_rules, 3, "the CA (get/update by name, create) and FTVM credentials (create/patch)");
}
