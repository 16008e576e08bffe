//! Broker restarts through the `scripts/services` that runs the broker, and only for a broker
//! it runs at the very address this run uses.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::procs::signal;
use crate::{BoxResult, log};

/// Restarts the broker through the `scripts/services` that runs it.
pub(crate) struct BrokerControl {
    script: PathBuf,
}

impl BrokerControl {
    /// Accepts only a broker the script runs itself (not one it calls external), at the very
    /// address the run uses.
    pub(crate) fn resolve(script: Option<&Path>, bootstrap: &str) -> Result<BrokerControl, String> {
        let script = script.ok_or(
            "no broker control: set KOURIER_FAULT_BROKER_CONTROL (or --broker-control) to the \
             scripts/services that runs this broker (scripts/test does for a broker it started)",
        )?;
        let control = BrokerControl {
            script: script.to_owned(),
        };
        let (pid, address) = control.status()?;
        if address != bootstrap {
            return Err(format!(
                "{} runs the broker at {address}, but this run uses {bootstrap}",
                script.display()
            ));
        }
        log(format!(
            "broker control: {} (broker pid {pid} at {address})",
            script.display()
        ));
        Ok(control)
    }

    fn command(&self, arg: &str) -> Command {
        let mut c = Command::new(&self.script);
        // Never let a restart wipe the broker's data.
        c.arg(arg).env_remove("KOURIER_KAFKA_FRESH");
        c
    }

    /// `(pid, address)` from `scripts/services status kafka`: "kafka: running, pid N, ADDR, ...".
    fn status(&self) -> Result<(u32, String), String> {
        let out = self
            .command("status")
            .arg("kafka")
            .stderr(Stdio::null())
            .output()
            .map_err(|e| format!("cannot run {}: {e}", self.script.display()))?;
        let text = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        let fields: Vec<&str> = text.split(", ").collect();
        match fields.as_slice() {
            ["kafka: running", pid, address, ..] => {
                let pid = pid
                    .strip_prefix("pid ")
                    .and_then(|p| p.parse().ok())
                    .ok_or_else(|| format!("unexpected status line {text:?}"))?;
                Ok((pid, (*address).to_owned()))
            }
            _ => Err(format!(
                "{} does not run this broker (status: {text:?}); a broker it calls external is \
                 never restarted",
                self.script.display()
            )),
        }
    }

    /// SIGKILLs the broker, waits `down`, starts it again; returns how long it was gone.
    pub(crate) fn kill_and_restart(&self, down: Duration) -> BoxResult<Duration> {
        let started = Instant::now();
        let (pid, _) = self.status()?;
        signal(pid, "KILL")?;
        let proc_dir = PathBuf::from(format!("/proc/{pid}"));
        while proc_dir.exists() && started.elapsed() < Duration::from_secs(30) {
            std::thread::sleep(Duration::from_millis(50));
        }
        log(format!("broker pid {pid} killed; down for {down:?}"));
        std::thread::sleep(down);
        let out = self.command("kafka-start").output()?;
        if !out.status.success() {
            return Err(format!(
                "`{} kafka-start` failed: {}",
                self.script.display(),
                String::from_utf8_lossy(&out.stderr)
            )
            .into());
        }
        for line in String::from_utf8_lossy(&out.stderr).lines() {
            log(format!("  {line}"));
        }
        Ok(started.elapsed())
    }
}
