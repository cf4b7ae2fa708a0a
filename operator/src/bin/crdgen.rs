//! Prints the FTVirtualMachine CRD as YAML, or with `--write` updates the committed copies
//! (`crds/ftvirtualmachine.yaml` and `charts/lockstep/crds/ftvirtualmachine.yaml`). A test fails
//! when the committed files differ from what this prints.

use std::path::PathBuf;
use std::process::ExitCode;

fn main() -> ExitCode {
    let yaml = match lockstep_operator::crd::crd_yaml() {
        Ok(y) => y,
        Err(e) => {
            eprintln!("crdgen: cannot serialise the CRD: {e}");
            return ExitCode::FAILURE;
        }
    };
    if std::env::args().nth(1).as_deref() != Some("--write") {
        print!("{yaml}");
        return ExitCode::SUCCESS;
    }
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    for rel in lockstep_operator::crd::CRD_PATHS {
        let path = root.join(rel);
        if let Err(e) =
            std::fs::create_dir_all(path.parent().unwrap_or(&root)).and_then(|_| std::fs::write(&path, &yaml))
        {
            eprintln!("crdgen: cannot write {}: {e}", path.display());
            return ExitCode::FAILURE;
        }
        eprintln!("wrote {rel}");
    }
    ExitCode::SUCCESS
}
