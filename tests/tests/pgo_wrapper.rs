//! The workspace's rustc wrapper (`scripts/rustc-pgo`, pgo/README.md): optimised compiles get
//! the recorded profile, everything else reaches rustc unchanged. Run against a stand-in rustc
//! that prints its arguments, from a copy of the wrapper beside a profile of the test's own.

use std::path::Path;
use std::path::PathBuf;
use std::process::Command;

use anyhow::Context;
use anyhow::Result;

/// A workspace-like directory: `scripts/rustc-pgo`, `pgo/llvm-major` = 22 and, unless
/// `profile` is false, `pgo/fetcd.profdata`; and a stand-in rustc reporting LLVM `llvm`.
struct Sandbox {
    dir: tempfile::TempDir,
}

impl Sandbox {
    fn new(profile: bool, llvm: u32) -> Result<Self> {
        let dir = tempfile::tempdir()?;
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        std::fs::create_dir_all(dir.path().join("scripts"))?;
        std::fs::create_dir_all(dir.path().join("pgo"))?;
        let wrapper = dir.path().join("scripts/rustc-pgo");
        std::fs::copy(root.join("scripts/rustc-pgo"), &wrapper).context("copy the wrapper")?;
        std::fs::write(dir.path().join("pgo/llvm-major"), "22\n")?;
        if profile {
            std::fs::write(dir.path().join("pgo/fetcd.profdata"), b"counts")?;
        }
        let rustc = dir.path().join("rustc");
        std::fs::write(
            &rustc,
            format!(
                "#!/usr/bin/env bash\nenv | grep '^CARGO_BIN_EXE_' | sed 's/^/env:/'\nif [ \"$1\" = -vV ]; then echo 'rustc 1.0.0'; echo 'LLVM version: {llvm}.1.2'; exit 0; fi\nfor a in \"$@\"; do echo \"$a\"; done\n"
            ),
        )?;
        set_executable(&rustc)?;
        set_executable(&wrapper)?;
        Ok(Sandbox { dir })
    }

    fn profile(&self) -> PathBuf {
        self.dir.path().join("pgo/fetcd.profdata")
    }

    /// The arguments the stand-in rustc received when cargo ran the wrapper with `args`.
    /// Also checks that the environment reached it whole: cargo names variables such as
    /// `CARGO_BIN_EXE_fetcd-floor` with characters a POSIX shell may drop (dash does).
    fn run(&self, pgo: Option<&str>, args: &[&str]) -> Result<Vec<String>> {
        let mut cmd = Command::new(self.dir.path().join("scripts/rustc-pgo"));
        cmd.arg(self.dir.path().join("rustc")).args(args);
        cmd.env("CARGO_BIN_EXE_fetcd-floor", "/bin/floor");
        cmd.env_remove("FETCD_PGO");
        if let Some(v) = pgo {
            cmd.env("FETCD_PGO", v);
        }
        let out = cmd.output().context("run the wrapper")?;
        anyhow::ensure!(
            out.status.success(),
            "wrapper failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let out = String::from_utf8(out.stdout)?;
        let (env, args): (Vec<&str>, Vec<&str>) = out.lines().partition(|l| l.starts_with("env:"));
        anyhow::ensure!(
            env == ["env:CARGO_BIN_EXE_fetcd-floor=/bin/floor"],
            "cargo's environment did not reach rustc: {env:?}"
        );
        Ok(args.into_iter().map(str::to_owned).collect())
    }
}

fn set_executable(path: &Path) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let mut p = std::fs::metadata(path)?.permissions();
    p.set_mode(0o755);
    std::fs::set_permissions(path, p)?;
    Ok(())
}

const RELEASE: &[&str] = &["--crate-name", "fetcd", "-C", "opt-level=3", "-C", "lto"];
const DEV: &[&str] = &["--crate-name", "fetcd", "-C", "debuginfo=2"];

fn owned(args: &[&str]) -> Vec<String> {
    args.iter().map(|a| (*a).to_owned()).collect()
}

#[test]
fn optimised_compiles_get_the_profile_and_nothing_else_changes() -> Result<()> {
    let s = Sandbox::new(true, 22)?;
    let mut want = owned(RELEASE);
    want.push(format!("-Cprofile-use={}", s.profile().display()));
    assert_eq!(s.run(None, RELEASE)?, want);
    assert_eq!(s.run(Some("use"), RELEASE)?, want);
    // A newer LLVM reads older profiles.
    let newer = Sandbox::new(true, 23)?;
    let mut want_newer = owned(RELEASE);
    want_newer.push(format!("-Cprofile-use={}", newer.profile().display()));
    assert_eq!(newer.run(None, RELEASE)?, want_newer);

    assert_eq!(s.run(None, DEV)?, owned(DEV), "a debug compile was changed");
    assert_eq!(
        s.run(None, &["-vV"])?,
        ["rustc 1.0.0", "LLVM version: 22.1.2"],
        "cargo's version query was changed"
    );
    Ok(())
}

#[test]
fn the_profile_is_left_out_when_off_missing_or_too_new_for_this_rustc() -> Result<()> {
    assert_eq!(
        Sandbox::new(true, 22)?.run(Some("off"), RELEASE)?,
        owned(RELEASE)
    );
    assert_eq!(Sandbox::new(false, 22)?.run(None, RELEASE)?, owned(RELEASE));
    assert_eq!(Sandbox::new(true, 21)?.run(None, RELEASE)?, owned(RELEASE));
    Ok(())
}

#[test]
fn recording_builds_instrument_optimised_compiles_only() -> Result<()> {
    let s = Sandbox::new(true, 22)?;
    let mut want = owned(RELEASE);
    want.push("-Cprofile-generate=/tmp/counts".to_owned());
    assert_eq!(s.run(Some("generate:/tmp/counts"), RELEASE)?, want);
    assert_eq!(s.run(Some("generate:/tmp/counts"), DEV)?, owned(DEV));
    Ok(())
}
