//! Running the external tools (mkfs, blkid, resize2fs, btrfs...): bounded messages from
//! what they say, and a tool that dies with the server.

use std::io;
use std::process::Command;

use crate::host_error::{HostError, Result};

/// What a failed tool said, for a status message: its first non-empty line (stderr first,
/// else stdout), bounded; never its whole usage text.
pub fn tool_says(out: &std::process::Output) -> String {
    let first = |bytes: &[u8]| {
        String::from_utf8_lossy(bytes)
            .lines()
            .map(str::trim)
            .find(|l| !l.is_empty())
            .map(str::to_owned)
    };
    let line = first(&out.stderr)
        .or_else(|| first(&out.stdout))
        .unwrap_or_else(|| format!("exited with {}", out.status));
    crate::validate::bounded(&line, 200)
}

/// How much of what a failed tool wrote is kept for classifying its failure.
const MAX_OUTPUT: usize = 4096;

/// A tool that ran and failed, as the host reports it.
pub fn failed(tool: &str, target: impl std::fmt::Display, out: &std::process::Output) -> HostError {
    let mut output = String::from_utf8_lossy(&out.stderr).into_owned();
    output.push('\n');
    output.push_str(&String::from_utf8_lossy(&out.stdout));
    let mut end = output.len().min(MAX_OUTPUT);
    while !output.is_char_boundary(end) {
        end -= 1;
    }
    output.truncate(end);
    HostError::Tool {
        tool: tool.to_owned(),
        target: target.to_string(),
        code: out.status.code(),
        said: tool_says(out),
        output,
    }
}

/// Runs a tool to completion. The tool dies with the server (`PR_SET_PDEATHSIG`), so a
/// killed server never leaves an mkfs or a resize2fs behind holding a device.
pub fn run(cmd: &mut Command) -> Result<std::process::Output> {
    use std::os::unix::process::CommandExt;
    let program = cmd.get_program().to_string_lossy().into_owned();
    // SAFETY: getpid has no preconditions.
    let parent = unsafe { libc::getpid() };
    // SAFETY: the closure runs in the child between fork and exec and calls only
    // async-signal-safe functions (prctl, getppid).
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(
                libc::PR_SET_PDEATHSIG,
                libc::SIGKILL as libc::c_ulong,
                0,
                0,
                0,
            ) != 0
            {
                return Err(io::Error::last_os_error());
            }
            // The server died before the signal was armed: do not start at all.
            if libc::getppid() != parent {
                return Err(io::Error::from_raw_os_error(libc::ESRCH));
            }
            Ok(())
        })
    };
    cmd.stdin(std::process::Stdio::null());
    cmd.output().map_err(|e| {
        if e.kind() == io::ErrorKind::NotFound {
            HostError::Missing {
                tool: program.to_string(),
            }
        } else {
            HostError::io(format!("run {program}"), e)
        }
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_tools_usage_text_never_reaches_a_message() {
        use std::os::unix::process::ExitStatusExt;
        let out = std::process::Output {
            status: std::process::ExitStatus::from_raw(1 << 8),
            stdout: b"".to_vec(),
            stderr: b"\nFilesystem must be larger than 300MB.\nUsage: mkfs.xfs\n/* blocksize */ [-b size=num]\n".to_vec(),
        };
        assert_eq!(
            super::tool_says(&out),
            "Filesystem must be larger than 300MB."
        );
        let silent = std::process::Output {
            status: std::process::ExitStatus::from_raw(2 << 8),
            stdout: vec![],
            stderr: vec![],
        };
        assert!(super::tool_says(&silent).contains("exit"));
    }
}
