//! The operator's printing commands as users pipe them.

use std::io::Read;
use std::process::{Command, Stdio};

/// `eventworker-operator crd | head`: the reader goes away early; the command ends quietly
/// (exit 0, nothing on stderr) instead of panicking on the closed pipe.
#[test]
fn a_closed_pipe_ends_printing_quietly() {
    for args in [&["crd"][..], &["prometheus-rules"][..]] {
        let mut child = Command::new(env!("CARGO_BIN_EXE_eventworker-operator"))
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut head = [0u8; 64];
        child.stdout.take().unwrap().read_exact(&mut head).unwrap();
        // stdout is closed here, long before the command has written everything.
        let out = child.wait_with_output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{args:?}: {:?} {err}", out.status);
        assert!(!err.contains("panicked"), "{args:?}: {err}");
    }
}
