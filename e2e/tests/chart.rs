//! `helm lint` and `helm template | kubeconform -strict` on charts/lockstep, offline: kubeconform
//! validates against schemas generated from k8s-openapi (see `write_kubeconform_schemas`).
//! Needs helm and kubeconform from the test bed (e2e/cluster/build; `eval "$(e2e/cluster/env)"`).

use std::process::Command;

use lockstep_e2e::{repo_root, run_tool, write_kubeconform_schemas};

fn chart() -> String {
    repo_root().join("charts/lockstep").display().to_string()
}

#[test]
fn helm_lint_passes() {
    let (ok, out) = run_tool(Command::new("helm").args(["lint", "--strict", &chart()]), None);
    assert!(ok, "helm lint failed:\n{out}");
    // Guards against a stand-in `helm` on PATH that exits 0 without linting.
    assert!(out.contains("1 chart(s) linted, 0 chart(s) failed"), "unexpected helm lint output:\n{out}");
}

#[test]
fn rendered_chart_passes_kubeconform_strict() {
    let dir = std::env::temp_dir().join(format!("lockstep-kubeconform-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    write_kubeconform_schemas(&dir).unwrap();
    let location = format!("{}/{{{{ .ResourceKind }}}}{{{{ .KindSuffix }}}}.json", dir.display());
    for extra in [&[][..], &["--set", "serviceMonitor.enabled=true", "--set", "watchNamespace=apps"][..]] {
        let mut helm = Command::new("helm");
        helm.args(["template", "lockstep", &chart(), "--namespace", "lockstep-system", "--include-crds"]).args(extra);
        let (ok, rendered) = run_tool(&mut helm, None);
        assert!(ok, "helm template failed:\n{rendered}");
        assert!(rendered.contains("kind: CustomResourceDefinition"));
        assert!(rendered.contains("--agent-cluster-role=lockstep-agent"));
        let mut kc = Command::new("kubeconform");
        // ServiceMonitor/PodMonitor are Prometheus Operator CRDs: no schema here, validated by name only.
        kc.args(["-strict", "-summary", "-skip", "ServiceMonitor,PodMonitor", "-schema-location", &location]);
        let (ok, out) = run_tool(&mut kc, Some(&rendered));
        assert!(ok, "kubeconform -strict failed ({extra:?}):\n{out}");
        assert!(out.contains("Invalid: 0") && out.contains("Errors: 0"), "{out}");
    }
    // The schemas really are strict: a misspelt field is refused.
    let bad = "apiVersion: v1\nkind: Service\nmetadata: {name: x}\nspec: {selectr: {a: b}}\n";
    let (ok, out) = run_tool(Command::new("kubeconform").args(["-strict", "-schema-location", &location]), Some(bad));
    assert!(!ok, "kubeconform accepted a misspelt field: {out}");
    std::fs::remove_dir_all(&dir).ok();
}
