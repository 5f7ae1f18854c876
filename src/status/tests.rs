//! The status channel's unit tests.

use super::safe_io::write_through;
use super::*;

/// A fresh directory under the target dir, with a victim file in it.
fn planted(name: &str) -> (PathBuf, PathBuf) {
    let dir = std::env::temp_dir().join(format!(
        "copyover-status-{name}-{}-{:x}",
        std::process::id(),
        crate::sys::monotonic_ns()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let victim = dir.join("victim");
    std::fs::write(&victim, "precious").unwrap();
    (dir, victim)
}

#[test]
fn outcomes_say_what_they_are() {
    let complete = Outcome::Complete {
        from: "v1".into(),
        to: "v2".into(),
        generation: 1,
        blackout_ms: 1.0,
        phases: Phases::default(),
    };
    let refused = Outcome::Refused {
        reason: "no".into(),
    };
    assert!(complete.ends_an_upgrade() && complete.is_complete());
    assert!(refused.ends_an_upgrade() && !refused.is_complete());
    assert!(!Outcome::Started.ends_an_upgrade() && !Outcome::Started.is_complete());
    assert_eq!(complete.to_string(), "complete");
    assert_eq!(refused.to_string(), "refused");
    assert!(complete == "complete" && complete != "refused");
    assert_eq!((complete.reason(), refused.reason()), (None, Some("no")));
    assert_eq!(
        status_path(Path::new("/run/x"), 42),
        Path::new("/run/x/42.status")
    );
}

#[test]
fn a_long_status_file_is_read_up_to_its_cap() {
    let (dir, _) = planted("long");
    let path = dir.join("1.status");
    let status = Status {
        pid: 1,
        app: "a".into(),
        outcome: Outcome::Refused {
            reason: "r".repeat(4000),
        },
        ..Default::default()
    };
    std::fs::write(&path, status.render()).unwrap();
    assert_eq!(Status::read(&path).unwrap(), status);
    std::fs::write(&path, "x".repeat(MAX_LEN as usize + 1)).unwrap();
    assert!(Status::read(&path).is_err());
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn publishing_continues_the_sequence_of_the_same_process_only() {
    let (dir, _) = planted("publish");
    let pid = std::process::id();
    let path = status_path(&dir, pid);
    let fresh = || Status {
        pid,
        app: "a".into(),
        ..Default::default()
    };
    fresh().try_publish(&dir, &path).unwrap();
    let first = Status::read(&path).unwrap();
    assert_eq!(first.seq, 1);
    assert_eq!(first.start_ticks, start_ticks(pid).unwrap());
    assert!(first.started_at > 1_600_000_000 && first.updated_at >= first.started_at);
    fresh().try_publish(&dir, &path).unwrap();
    let second = Status::read(&path).unwrap();
    assert_eq!((second.seq, second.started_at), (2, first.started_at));
    // A file another process of this PID left (another start time):
    // the sequence starts again.
    let stale = Status {
        start_ticks: first.start_ticks + 1,
        seq: 9,
        started_at: 5,
        ..second.clone()
    };
    std::fs::write(&path, stale.render()).unwrap();
    fresh().try_publish(&dir, &path).unwrap();
    let third = Status::read(&path).unwrap();
    assert_eq!(third.seq, 1);
    assert_ne!(third.started_at, 5);
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn root_writes_under_run_unless_told_otherwise() {
    // The other branches depend on the environment the tests run in.
    if std::env::var_os(STATUS_DIR_VAR).is_none() && crate::sys::real_uid() == 0 {
        assert_eq!(status_dir(), Path::new("/run/copyover"));
    }
}

#[test]
fn a_symlink_at_the_temporary_name_is_not_followed() {
    let (dir, victim) = planted("tmp-link");
    let (tmp, path) = (dir.join(".s.tmp"), dir.join("s"));
    std::os::unix::fs::symlink(&victim, &tmp).unwrap();
    assert!(write_through(&tmp, &path, b"new", false).is_err());
    assert_eq!(std::fs::read_to_string(&victim).unwrap(), "precious");
    assert!(!path.exists());
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn a_file_at_the_temporary_name_is_not_reused() {
    // Planted by somebody else, it would become the status file, theirs
    // to change.
    let (dir, _) = planted("tmp-file");
    let (tmp, path) = (dir.join(".s.tmp"), dir.join("s"));
    std::fs::write(&tmp, "planted").unwrap();
    let err = write_through(&tmp, &path, b"new", false).unwrap_err();
    assert_eq!(err.kind(), io::ErrorKind::AlreadyExists);
    assert!(!path.exists());
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn a_symlink_at_the_final_name_is_replaced_not_followed() {
    let (dir, victim) = planted("final-link");
    let path = dir.join("s");
    std::os::unix::fs::symlink(&victim, &path).unwrap();
    write_replacing(&dir, &path, b"new", false).unwrap();
    assert_eq!(std::fs::read_to_string(&victim).unwrap(), "precious");
    let meta = std::fs::symlink_metadata(&path).unwrap();
    assert!(meta.is_file() && meta.mode() & 0o777 == 0o600);
    assert_eq!(std::fs::read_to_string(&path).unwrap(), "new");
    std::fs::remove_dir_all(dir).unwrap();
}

fn status(outcome: Outcome) -> Status {
    Status {
        pid: 7,
        app: "a".into(),
        version: "v2".into(),
        generation: 3,
        started_at: 10,
        start_ticks: 99,
        seq: 4,
        outcome,
        updated_at: 11,
    }
}

#[test]
fn every_outcome_round_trips() {
    let complete = Outcome::Complete {
        from: "v1".into(),
        to: "v2".into(),
        generation: 3,
        blackout_ms: 1.5,
        phases: Phases {
            total_ms: Some(200.0),
            exec_ms: Some(0.5),
            restore_ms: Some(0.25),
            adopt_ms: Some(0.75),
            unheld_ms: Some(0.125),
        },
    };
    for outcome in [
        Outcome::Started,
        complete,
        Outcome::Refused {
            reason: "the probe said no".into(),
        },
        Outcome::RolledBack {
            reason: "the new image panicked".into(),
        },
    ] {
        let s = status(outcome);
        assert_eq!(Status::parse(&s.render()).unwrap(), s);
    }
}

#[test]
fn a_reason_stays_on_one_line() {
    let s = status(Outcome::Refused {
        reason: "two\nlines".into(),
    });
    let back = Status::parse(&s.render()).unwrap();
    assert_eq!(back.outcome.reason(), Some("two lines"));
    assert_eq!(back.outcome, "refused");
}

#[test]
fn the_first_form_of_format_1_still_reads() {
    // As the first runtimes wrote it: no phase keys.
    let old = "format=1\npid=7\napp=a\nversion=v2\ngeneration=3\nstarted_at=10\nstart_ticks=99\nseq=4\noutcome=complete\nfrom_version=v1\nblackout_ms=1.020\nreason=\nupdated_at=11\n";
    let s = Status::parse(old).unwrap();
    assert_eq!(
        s.outcome,
        Outcome::Complete {
            from: "v1".into(),
            to: "v2".into(),
            generation: 3,
            blackout_ms: 1.02,
            phases: Phases::default(),
        }
    );
    let old = old.replace("outcome=complete", "outcome=rolled back");
    let old = old.replace("reason=\n", "reason=it crashed\n");
    assert_eq!(
        Status::parse(&old).unwrap().outcome,
        Outcome::RolledBack {
            reason: "it crashed".into()
        }
    );
}

#[test]
fn other_files_and_formats_are_refused() {
    for text in [
        "hello=1\n",
        "format=2\noutcome=started\n",
        "format=1\noutcome=exploded\n",
    ] {
        assert_eq!(
            Status::parse(text).unwrap_err().kind(),
            io::ErrorKind::InvalidData,
            "{text}"
        );
    }
}

#[test]
fn a_status_file_is_read_from_disk() {
    let s = status(Outcome::Started);
    let dir = std::env::temp_dir().join(format!("copyover-status-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("7.status");
    std::fs::write(&path, s.render()).unwrap();
    assert_eq!(Status::read(&path).unwrap(), s);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_process_that_is_not_the_one_that_wrote_the_status_is_never_signalled() {
    // SIGHUP's default action would kill it: a reused PID, or a status
    // without a start time, is refused before any signal.
    let mut child = std::process::Command::new("sleep")
        .arg("30")
        .spawn()
        .unwrap();
    let pid = child.id();
    let actual = start_ticks(pid).unwrap();
    for ticks in [actual + 1, 0] {
        let mut wrote = status(Outcome::Started);
        (wrote.pid, wrote.start_ticks) = (pid, ticks);
        let err = request_upgrade(&wrote).unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::InvalidData, "{err}");
    }
    assert!(
        child.try_wait().unwrap().is_none(),
        "the process was signalled"
    );
    child.kill().unwrap();
    child.wait().unwrap();
}

#[test]
fn a_file_where_the_status_directory_should_be_is_refused_as_such() {
    let (dir, victim) = planted("notadir");
    let err = super::safe_io::check_dir(&victim).unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::PermissionDenied, "{err}");
    assert!(err.to_string().contains("is not a directory"), "{err}");
    assert_eq!(std::fs::read_to_string(&victim).unwrap(), "precious");
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn only_a_status_file_that_is_there_is_read_again() {
    use std::io::{Error, ErrorKind};
    assert!(!super::file::read_again(&Error::from(ErrorKind::NotFound)));
    for kind in [
        ErrorKind::InvalidData,
        ErrorKind::Interrupted,
        ErrorKind::Other,
    ] {
        assert!(super::file::read_again(&Error::from(kind)), "{kind:?}");
    }
}

/// Set in the re-executed test binary that reads its own status by PID.
const READ_BY_PID: &str = "COPYOVER_TEST_READ_BY_PID";

#[test]
fn read_by_pid_looks_in_the_status_directory() {
    let me = "status::tests::read_by_pid_looks_in_the_status_directory";
    if std::env::var_os(READ_BY_PID).is_some() {
        // The child: its status directory comes from the environment.
        let mut s = status(Outcome::Refused {
            reason: "by pid".into(),
        });
        s.pid = std::process::id();
        let path = status_path(&status_dir(), s.pid);
        std::fs::write(&path, s.render()).unwrap();
        assert_eq!(read(s.pid).unwrap(), s);
        return;
    }
    let (dir, _) = planted("bypid");
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--exact", me, "--test-threads=1"])
        .env(READ_BY_PID, "1")
        .env(STATUS_DIR_VAR, &dir)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    // It wrote and read in the directory it was given, and nowhere else.
    let written: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().ends_with(".status"))
        .collect();
    assert_eq!(written.len(), 1, "{written:?}");
    std::fs::remove_dir_all(dir).unwrap();
}
