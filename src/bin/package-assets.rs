//! Writes what the Debian package installs beside the binaries: a manual
//! page and bash, zsh and fish completions for each, made from the command
//! lines themselves so that they cannot drift from them, under the names
//! the package installs (`peerchat-registry`, `peerchat`).
//!
//! `package-assets OUT_DIR` writes `OUT_DIR/man/NAME.1` and
//! `OUT_DIR/completions/{bash/NAME, zsh/_NAME, fish/NAME.fish}`.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Command, CommandFactory};
use clap_complete::Shell;

/// The installed names: `/usr/bin/registry` and `/usr/bin/peer` would
/// clash with other packages.
const INSTALLED: [&str; 2] = ["peerchat-registry", "peerchat"];

fn commands() -> [Command; 2] {
    [
        peerchat_registry::args::Args::command(),
        peerchat_peer::args::Args::command(),
    ]
}

fn write(path: &Path, bytes: &[u8]) -> Result<(), String> {
    if let Some(dir) = path.parent() {
        fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    }
    fs::write(path, bytes).map_err(|e| format!("{}: {e}", path.display()))
}

fn generate(out: &Path) -> Result<(), String> {
    for (command, name) in commands().into_iter().zip(INSTALLED) {
        let mut command = command.name(name).bin_name(name);
        command.build();
        let mut page = Vec::new();
        clap_mangen::Man::new(command.clone())
            .render(&mut page)
            .map_err(|e| format!("the manual page of {name}: {e}"))?;
        write(&out.join(format!("man/{name}.1")), &page)?;
        for (shell, file) in [
            (Shell::Bash, format!("bash/{name}")),
            (Shell::Zsh, format!("zsh/_{name}")),
            (Shell::Fish, format!("fish/{name}.fish")),
        ] {
            let mut script = Vec::new();
            clap_complete::generate(shell, &mut command, name, &mut script);
            write(&out.join("completions").join(file), &script)?;
        }
    }
    Ok(())
}

fn main() -> ExitCode {
    let mut args = std::env::args_os().skip(1);
    let (Some(out), None) = (args.next(), args.next()) else {
        eprintln!("usage: package-assets OUT_DIR");
        return ExitCode::from(2);
    };
    match generate(&PathBuf::from(out)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("package-assets: {e}");
            ExitCode::FAILURE
        }
    }
}
