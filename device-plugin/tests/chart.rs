//! The chart's DaemonSet and the binary agree: every flag the template passes exists, and every
//! `devicePlugin` value the template reads has a default in values.yaml. (`helm lint` and
//! `kubeconform -strict` on the rendered chart run in the e2e crate.)

use std::path::PathBuf;

use clap::CommandFactory;
use lockstep_device_plugin::config::Cli;

fn chart_file(path: &str) -> String {
    let file = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../charts/lockstep").join(path);
    std::fs::read_to_string(&file).unwrap_or_else(|e| panic!("{}: {e}", file.display()))
}

#[test]
fn the_daemonset_passes_only_flags_the_binary_has() {
    let template = chart_file("templates/device-plugin.yaml");
    let flags: Vec<&str> = template
        .lines()
        .filter_map(|line| line.trim().strip_prefix("- --"))
        .map(|arg| arg.split('=').next().unwrap_or(arg))
        .collect();
    for expected in ["plugin-dir", "resource-name", "slots", "device-path", "host-device-path"] {
        assert!(flags.contains(&expected), "the DaemonSet passes --{expected}: {flags:?}");
    }
    let cli = Cli::command();
    for flag in &flags {
        assert!(cli.get_arguments().any(|a| a.get_long() == Some(flag)), "lockstep-device-plugin has no --{flag}");
    }
    assert!(
        template.contains("--resource-name={{ .Values.kvmResourceName }}"),
        "the advertised resource is the chart-wide kvmResourceName"
    );
}

#[test]
fn every_value_the_template_reads_has_a_default() {
    let template = chart_file("templates/device-plugin.yaml");
    let values = chart_file("values.yaml");
    let section = values.split("\ndevicePlugin:\n").nth(1).expect("values.yaml has a devicePlugin section");
    // The section's lines, each starting with a newline so that `\n  key:` finds top-level keys.
    let section: String =
        section.lines().take_while(|l| l.is_empty() || l.starts_with(' ')).map(|l| format!("\n{l}")).collect();
    let read: Vec<String> = template
        .split("$dp.")
        .skip(1)
        .map(|piece| piece.chars().take_while(|c| c.is_ascii_alphanumeric()).collect())
        .collect();
    assert!(read.len() >= 8, "{read:?}");
    for key in &read {
        assert!(section.contains(&format!("\n  {key}:")), "values.yaml devicePlugin lacks {key}");
    }
    assert!(values.contains("\nkvmResourceName: devices.lockstep.dev/kvm\n"));
}
