//! `mlxd service install | uninstall | status`: run the daemon at login, as a systemd user unit
//! on Linux or a launchd LaunchAgent on macOS. The templates live in `packaging/`.

use std::path::{Path, PathBuf};
use std::process::Command;

const SYSTEMD_TEMPLATE: &str = include_str!("../../../../packaging/systemd/mlxd.service");
const LAUNCHD_TEMPLATE: &str = include_str!("../../../../packaging/launchd/dev.mlxd.daemon.plist");
const LAUNCHD_LABEL: &str = "dev.mlxd.daemon";

/// Values substituted into a template.
pub struct Fields {
    /// Absolute path of the `mlxd` binary.
    pub bin: PathBuf,
    /// Config file the service runs with.
    pub config: PathBuf,
    /// Log file (launchd only).
    pub log: PathBuf,
    /// Documentation path.
    pub docs: PathBuf,
}

/// Fills in a template; refuses values that would break the file's syntax.
pub fn render(template: &str, f: &Fields) -> Result<String, String> {
    let mut out = template.to_string();
    for (key, value) in [("@BIN@", &f.bin), ("@CONFIG@", &f.config), ("@LOG@", &f.log), ("@DOCS@", &f.docs)] {
        let v = value.to_str().ok_or_else(|| format!("{} is not valid UTF-8", value.display()))?;
        if v.chars().any(|c| c.is_control() || "<>&\"'".contains(c)) || (key != "@DOCS@" && v.contains(' ') && template.contains("ExecStart")) {
            return Err(format!("the path {v:?} contains characters the service file cannot hold; move it"));
        }
        out = out.replace(key, v);
    }
    Ok(out)
}

fn home() -> PathBuf {
    std::env::var_os("HOME").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("."))
}

fn unit_path() -> PathBuf {
    if cfg!(target_os = "macos") {
        home().join("Library/LaunchAgents").join(format!("{LAUNCHD_LABEL}.plist"))
    } else {
        let base = std::env::var_os("XDG_CONFIG_HOME").map(PathBuf::from).unwrap_or_else(|| home().join(".config"));
        base.join("systemd/user/mlxd.service")
    }
}

fn config_path() -> PathBuf {
    let base = std::env::var_os("XDG_CONFIG_HOME").map(PathBuf::from).unwrap_or_else(|| home().join(".config"));
    base.join("mlxd/config.toml")
}

fn run(cmd: &str, args: &[&str]) -> Result<(), String> {
    let status = Command::new(cmd).args(args).status().map_err(|e| format!("running {cmd}: {e}"))?;
    if status.success() { Ok(()) } else { Err(format!("`{cmd} {}` failed ({status})", args.join(" "))) }
}

/// Runs a `service` subcommand; returns the exit code.
pub fn main(args: &[String]) -> i32 {
    let result = match args.first().map(String::as_str) {
        Some("install") => install(),
        Some("uninstall") => uninstall(),
        Some("status") => status(),
        _ => Err("usage: mlxd service install | uninstall | status".to_string()),
    };
    match result {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("mlxd service: {e}");
            1
        }
    }
}

fn install() -> Result<(), String> {
    let bin = std::env::current_exe().map_err(|e| format!("cannot locate the mlxd binary: {e}"))?;
    let config = config_path();
    if !config.exists() {
        // A service needs a config it can find on its own; start from the documented defaults.
        std::fs::create_dir_all(config.parent().expect("has a parent")).map_err(|e| e.to_string())?;
        std::fs::write(&config, include_str!("../../../../config.toml")).map_err(|e| format!("{}: {e}", config.display()))?;
        println!("wrote the default configuration to {}", config.display());
    }
    let state = mlxd_client::endpoint::default_state_dir();
    let fields = Fields { bin, config, log: state.join("mlxd.log"), docs: PathBuf::from("README.md") };
    let (template, path) = if cfg!(target_os = "macos") { (LAUNCHD_TEMPLATE, unit_path()) } else { (SYSTEMD_TEMPLATE, unit_path()) };
    let text = render(template, &fields)?;
    write_file(&path, &text)?;
    std::fs::create_dir_all(&state).map_err(|e| e.to_string())?;
    println!("wrote {}", path.display());
    if cfg!(target_os = "macos") {
        let _ = run("launchctl", &["unload", &path.to_string_lossy()]);
        run("launchctl", &["load", "-w", &path.to_string_lossy()])
    } else {
        match run("systemctl", &["--user", "daemon-reload"]) {
            Ok(()) => run("systemctl", &["--user", "enable", "--now", "mlxd.service"]),
            Err(e) => Err(format!("{e}; the unit is installed, start it with `systemctl --user enable --now mlxd` once a user session bus is available")),
        }
    }
}

fn write_file(path: &Path, text: &str) -> Result<(), String> {
    std::fs::create_dir_all(path.parent().expect("has a parent")).map_err(|e| e.to_string())?;
    std::fs::write(path, text).map_err(|e| format!("{}: {e}", path.display()))
}

fn uninstall() -> Result<(), String> {
    let path = unit_path();
    if cfg!(target_os = "macos") {
        let _ = run("launchctl", &["unload", "-w", &path.to_string_lossy()]);
    } else {
        let _ = run("systemctl", &["--user", "disable", "--now", "mlxd.service"]);
    }
    match std::fs::remove_file(&path) {
        Ok(()) => {
            println!("removed {}", path.display());
            if !cfg!(target_os = "macos") {
                let _ = run("systemctl", &["--user", "daemon-reload"]);
            }
            Ok(())
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(format!("no service installed at {}", path.display())),
        Err(e) => Err(format!("{}: {e}", path.display())),
    }
}

fn status() -> Result<(), String> {
    let path = unit_path();
    if !path.exists() {
        return Err(format!("not installed ({} does not exist); run `mlxd service install`", path.display()));
    }
    println!("installed: {}", path.display());
    if cfg!(target_os = "macos") {
        run("launchctl", &["list", LAUNCHD_LABEL])
    } else {
        run("systemctl", &["--user", "--no-pager", "status", "mlxd.service"])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fields() -> Fields {
        Fields {
            bin: "/opt/mlxd/bin/mlxd".into(),
            config: "/home/u/.config/mlxd/config.toml".into(),
            log: "/home/u/.local/state/mlxd/mlxd.log".into(),
            docs: "README.md".into(),
        }
    }

    #[test]
    fn systemd_unit_renders_with_every_field() {
        let unit = render(SYSTEMD_TEMPLATE, &fields()).unwrap();
        assert!(!unit.contains('@'), "all placeholders filled:\n{unit}");
        assert!(unit.contains("ExecStart=/opt/mlxd/bin/mlxd serve --config /home/u/.config/mlxd/config.toml"));
        assert!(unit.contains("KillSignal=SIGTERM"));
        assert!(unit.contains("WantedBy=default.target"));
        for section in ["[Unit]", "[Service]", "[Install]"] {
            assert!(unit.contains(section));
        }
    }

    #[test]
    fn launchd_plist_renders_and_stays_balanced() {
        let plist = render(LAUNCHD_TEMPLATE, &fields()).unwrap();
        assert!(!plist.contains("@BIN@") && !plist.contains("@CONFIG@") && !plist.contains("@LOG@"));
        assert!(plist.contains("<string>/opt/mlxd/bin/mlxd</string>"));
        assert!(plist.contains("<string>dev.mlxd.daemon</string>"));
        for tag in ["dict", "array", "plist"] {
            assert_eq!(plist.matches(&format!("<{tag}>")).count() + plist.matches(&format!("<{tag} ")).count(), plist.matches(&format!("</{tag}>")).count(), "<{tag}> balanced");
        }
    }

    #[test]
    fn hostile_paths_are_refused() {
        let mut f = fields();
        f.bin = "/tmp/a\nExecStartPre=/bin/evil".into();
        assert!(render(SYSTEMD_TEMPLATE, &f).is_err());
        let mut f = fields();
        f.config = "/tmp/<x>.toml".into();
        assert!(render(LAUNCHD_TEMPLATE, &f).is_err());
    }
}
