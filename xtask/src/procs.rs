//! Child processes on Unix and Windows alike: started apart from xtask's own terminal
//! group (a Ctrl-C reaches xtask, which stops them), stopped with what they started, and
//! looked up by PID.

use std::process::Command;

/// Starts the child in a group of its own: a process group on Unix, a new process group
/// on Windows (Ctrl-C events are not passed to it).
pub fn detach(cmd: &mut Command) -> &mut Command {
    #[cfg(unix)]
    {
        use std::os::unix::process::CommandExt as _;
        cmd.process_group(0)
    }
    #[cfg(windows)]
    {
        use std::os::windows::process::CommandExt as _;
        const CREATE_NEW_PROCESS_GROUP: u32 = 0x0000_0200;
        cmd.creation_flags(CREATE_NEW_PROCESS_GROUP)
    }
}

/// Asks the process to stop (SIGTERM; on Windows, `taskkill` without `/F`).
pub fn terminate(pid: u32) {
    #[cfg(unix)]
    signal(pid as i32, libc::SIGTERM);
    #[cfg(windows)]
    taskkill(pid, &[]);
}

/// Kills the process (SIGKILL; on Windows, `taskkill /F`).
pub fn kill(pid: u32) {
    #[cfg(unix)]
    signal(pid as i32, libc::SIGKILL);
    #[cfg(windows)]
    taskkill(pid, &["/F"]);
}

/// Kills a group started with [`detach`]: the process and everything it started.
pub fn kill_group(pid: u32) {
    #[cfg(unix)]
    signal(-(pid as i32), libc::SIGKILL);
    #[cfg(windows)]
    taskkill(pid, &["/F", "/T"]);
}

#[cfg(unix)]
fn signal(pid: i32, signal: libc::c_int) {
    // SAFETY: kill(2) has no memory-safety preconditions.
    unsafe { libc::kill(pid, signal) };
}

#[cfg(windows)]
fn taskkill(pid: u32, flags: &[&str]) {
    let _ = Command::new("taskkill")
        .args(flags)
        .args(["/PID", &pid.to_string()])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status();
}

/// Whether `pid` runs (a zombie does not count) and its command line contains `name`.
pub fn runs(pid: u32, name: &str) -> bool {
    #[cfg(unix)]
    {
        let alive = std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
            !s.rsplit(')')
                .next()
                .unwrap_or("")
                .trim_start()
                .starts_with('Z')
        });
        alive
            && std::fs::read(format!("/proc/{pid}/cmdline"))
                .is_ok_and(|c| String::from_utf8_lossy(&c).contains(name))
    }
    #[cfg(windows)]
    {
        Command::new("tasklist")
            .args(["/FI", &format!("PID eq {pid}"), "/NH", "/FO", "CSV"])
            .output()
            .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains(name))
    }
}
