//! Files the agent writes in directories other users may write to (issue 13, item 5): the
//! Prometheus text file's temporary name cannot be planted as a symlink.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::time::{Duration, SystemTime};

use common::{Agent, AgentOptions, wait_until};

#[test]
fn the_metrics_text_file_never_writes_through_a_planted_symlink() {
    let opts = AgentOptions {
        extra_toml: "[telemetry]\ninterval = \"1s\"\ntextfile = \"prom/edgesync.prom\"\n"
            .to_owned(),
        ..AgentOptions::default()
    };
    let mut agent = Agent::prepare(opts);
    let prom = agent.dir().join("prom");
    fs::create_dir_all(&prom).unwrap();
    // A file the agent may write (it runs as the same user here) but must never touch.
    let victim = agent.dir().join("victim");
    fs::write(&victim, "secret\n").unwrap();
    fs::set_permissions(&victim, fs::Permissions::from_mode(0o600)).unwrap();
    agent.launch();
    // The temporary name the old code used, planted by someone who can write the directory.
    let planted = prom.join(format!(".edgesync.prom.tmp-{}", agent.pid()));
    std::os::unix::fs::symlink(&victim, &planted).unwrap();
    let target = prom.join("edgesync.prom");
    let since = SystemTime::now();
    // Two rewrites after the plant.
    let mut seen = 0;
    let mut last = None;
    wait_until("two text file rewrites", Duration::from_secs(30), || {
        let m = fs::metadata(&target).and_then(|m| m.modified()).ok();
        if m.is_some_and(|t| t > since) && m != last {
            seen += 1;
            last = m;
        }
        seen >= 2
    });
    assert_eq!(fs::read_to_string(&victim).unwrap(), "secret\n");
    let mode = fs::metadata(&victim).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "the victim's mode changed");
    let meta = fs::symlink_metadata(&target).unwrap();
    assert!(meta.file_type().is_file(), "{meta:?}");
    assert_eq!(meta.permissions().mode() & 0o777, 0o644);
    assert!(fs::read_to_string(&target).unwrap().contains("edgesync_"));
    // The plant is left alone (the agent never opens what it did not create).
    assert!(
        fs::symlink_metadata(&planted)
            .unwrap()
            .file_type()
            .is_symlink()
    );
    agent.stop();
}
