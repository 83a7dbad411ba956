//! Talking to systemd: over its D-Bus API (`org.freedesktop.systemd1.Manager`, with `zbus`), or
//! through `systemctl` where no bus can be reached. Both do the same few things `unitgen apply`
//! needs, and every job (start, stop, restart) is waited for, with a deadline.

use std::process::Command;
use std::time::{Duration, Instant};

use zbus::proxy::CacheProperties;
use zbus::zvariant::OwnedObjectPath;

/// A systemd call that failed, naming the unit and the call.
#[derive(Debug, thiserror::Error)]
pub enum SystemdError {
    /// The bus could not be reached.
    #[error("cannot reach systemd over D-Bus at {address}: {detail} (is this a systemd host? `--systemctl` uses systemctl instead)")]
    Connect {
        /// The bus address tried.
        address: String,
        /// The error.
        detail: String,
    },
    /// A call failed.
    #[error("systemd {call} {unit}: {detail}")]
    Call {
        /// The method (`StartUnit`, `daemon-reload`, …).
        call: String,
        /// The unit, or empty.
        unit: String,
        /// systemd's message.
        detail: String,
    },
    /// A job did not finish in time.
    #[error("systemd {call} {unit}: the job did not finish within {timeout:?} (unit is {state})")]
    Timeout {
        /// The method.
        call: String,
        /// The unit.
        unit: String,
        /// How long we waited.
        timeout: Duration,
        /// The unit's state when we gave up.
        state: String,
    },
}

/// A unit's state as systemd reports it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct UnitState {
    /// `loaded`, `not-found`, …
    pub load: String,
    /// `active`, `inactive`, `failed`, `activating`, …
    pub active: String,
    /// `running`, `dead`, `exited`, …
    pub sub: String,
}

impl std::fmt::Display for UnitState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {} ({})", self.load, self.active, self.sub)
    }
}

#[zbus::proxy(
    interface = "org.freedesktop.systemd1.Manager",
    default_service = "org.freedesktop.systemd1",
    default_path = "/org/freedesktop/systemd1"
)]
trait Manager {
    fn reload(&self) -> zbus::Result<()>;
    fn start_unit(&self, name: &str, mode: &str) -> zbus::Result<OwnedObjectPath>;
    fn stop_unit(&self, name: &str, mode: &str) -> zbus::Result<OwnedObjectPath>;
    fn restart_unit(&self, name: &str, mode: &str) -> zbus::Result<OwnedObjectPath>;
    fn load_unit(&self, name: &str) -> zbus::Result<OwnedObjectPath>;
    fn reset_failed_unit(&self, name: &str) -> zbus::Result<()>;
    #[allow(clippy::type_complexity)]
    fn enable_unit_files(
        &self,
        files: &[&str],
        runtime: bool,
        force: bool,
    ) -> zbus::Result<(bool, Vec<(String, String, String)>)>;
    fn disable_unit_files(
        &self,
        files: &[&str],
        runtime: bool,
    ) -> zbus::Result<Vec<(String, String, String)>>;
}

#[zbus::proxy(
    interface = "org.freedesktop.systemd1.Unit",
    default_service = "org.freedesktop.systemd1"
)]
trait Unit {
    #[zbus(property)]
    fn active_state(&self) -> zbus::Result<String>;
    #[zbus(property)]
    fn sub_state(&self) -> zbus::Result<String>;
    #[zbus(property)]
    fn load_state(&self) -> zbus::Result<String>;
}

#[zbus::proxy(
    interface = "org.freedesktop.systemd1.Job",
    default_service = "org.freedesktop.systemd1"
)]
trait Job {
    #[zbus(property)]
    fn state(&self) -> zbus::Result<String>;
}

/// How to reach systemd.
pub enum Systemd {
    /// The D-Bus API.
    Dbus {
        /// The connection.
        conn: zbus::Connection,
        /// The address it was made to, for messages.
        address: String,
    },
    /// The `systemctl` command (which itself talks D-Bus to systemd).
    Systemctl {
        /// Path of systemctl.
        program: String,
    },
}

fn call_err(call: &str, unit: &str, e: impl std::fmt::Display) -> SystemdError {
    SystemdError::Call {
        call: call.into(),
        unit: unit.into(),
        detail: e.to_string(),
    }
}

/// The system bus address: `DBUS_SYSTEM_BUS_ADDRESS` or the well-known socket.
pub fn default_address() -> String {
    std::env::var("DBUS_SYSTEM_BUS_ADDRESS")
        .ok()
        .filter(|a| !a.is_empty())
        .unwrap_or_else(|| "unix:path=/run/dbus/system_bus_socket".into())
}

impl Systemd {
    /// Connects to systemd over D-Bus at `address`.
    pub async fn dbus(address: &str) -> Result<Systemd, SystemdError> {
        let connect = async { zbus::connection::Builder::address(address)?.build().await };
        let conn = tokio::time::timeout(Duration::from_secs(10), connect)
            .await
            .map_err(|_| SystemdError::Connect {
                address: address.into(),
                detail: "timed out after 10s".into(),
            })?
            .map_err(|e| SystemdError::Connect {
                address: address.into(),
                detail: e.to_string(),
            })?;
        Ok(Systemd::Dbus {
            conn,
            address: address.into(),
        })
    }

    /// Uses `systemctl` instead of D-Bus.
    pub fn systemctl(program: &str) -> Systemd {
        Systemd::Systemctl {
            program: program.into(),
        }
    }

    /// How this talks to systemd, for reports.
    pub fn describe(&self) -> String {
        match self {
            Systemd::Dbus { address, .. } => format!("D-Bus {address}"),
            Systemd::Systemctl { program } => program.clone(),
        }
    }

    async fn manager(&self) -> Result<ManagerProxy<'_>, SystemdError> {
        match self {
            Systemd::Dbus { conn, address } => {
                ManagerProxy::new(conn)
                    .await
                    .map_err(|e| SystemdError::Connect {
                        address: address.clone(),
                        detail: e.to_string(),
                    })
            }
            Systemd::Systemctl { .. } => unreachable!("manager() is only called for D-Bus"),
        }
    }

    async fn systemctl_run(program: &str, args: &[&str]) -> Result<String, SystemdError> {
        let mut cmd = Command::new(program);
        cmd.args(args);
        let shown = format!("{program} {}", args.join(" "));
        let out = tokio::task::spawn_blocking(move || cmd.output())
            .await
            .map_err(|e| call_err(&shown, "", e))?
            .map_err(|e| call_err(&shown, "", e))?;
        if !out.status.success() {
            return Err(call_err(
                &shown,
                "",
                format!(
                    "{}: {}",
                    out.status,
                    String::from_utf8_lossy(&out.stderr).trim()
                ),
            ));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// `daemon-reload`: systemd re-reads unit files (the call returns once it has).
    pub async fn reload(&self) -> Result<(), SystemdError> {
        match self {
            Systemd::Dbus { .. } => self
                .manager()
                .await?
                .reload()
                .await
                .map_err(|e| call_err("Reload", "", e)),
            Systemd::Systemctl { program } => {
                Self::systemctl_run(program, &["daemon-reload"]).await?;
                Ok(())
            }
        }
    }

    /// Enables units (their `[Install]` section: `WantedBy=multi-user.target`).
    pub async fn enable(&self, units: &[String]) -> Result<(), SystemdError> {
        self.unit_files(units, true).await
    }

    /// Disables units (removes their `[Install]` symlinks).
    pub async fn disable(&self, units: &[String]) -> Result<(), SystemdError> {
        self.unit_files(units, false).await
    }

    /// Enables (`enable`) or disables unit files, without a daemon reload.
    async fn unit_files(&self, units: &[String], enable: bool) -> Result<(), SystemdError> {
        if units.is_empty() {
            return Ok(());
        }
        let names: Vec<&str> = units.iter().map(String::as_str).collect();
        match self {
            Systemd::Dbus { .. } => {
                let manager = self.manager().await?;
                let (call, result) = if enable {
                    let r = manager.enable_unit_files(&names, false, true).await;
                    ("EnableUnitFiles", r.map(drop))
                } else {
                    let r = manager.disable_unit_files(&names, false).await;
                    ("DisableUnitFiles", r.map(drop))
                };
                result.map_err(|e| call_err(call, &names.join(" "), e))
            }
            Systemd::Systemctl { program } => {
                let verb = if enable { "enable" } else { "disable" };
                let mut args = vec![verb, "--no-reload"];
                args.extend(&names);
                Self::systemctl_run(program, &args).await?;
                Ok(())
            }
        }
    }

    /// A unit's load, active and sub state.
    pub async fn state(&self, unit: &str) -> Result<UnitState, SystemdError> {
        match self {
            Systemd::Dbus { conn, .. } => {
                let path = self
                    .manager()
                    .await?
                    .load_unit(unit)
                    .await
                    .map_err(|e| call_err("LoadUnit", unit, e))?;
                let proxy = UnitProxy::builder(conn)
                    .path(path)
                    .map_err(|e| call_err("Unit", unit, e))?
                    .cache_properties(CacheProperties::No)
                    .build()
                    .await
                    .map_err(|e| call_err("Unit", unit, e))?;
                let get = |r: zbus::Result<String>| r.map_err(|e| call_err("Get", unit, e));
                Ok(UnitState {
                    load: get(proxy.load_state().await)?,
                    active: get(proxy.active_state().await)?,
                    sub: get(proxy.sub_state().await)?,
                })
            }
            Systemd::Systemctl { program } => {
                let out = Self::systemctl_run(
                    program,
                    &["show", "-p", "LoadState,ActiveState,SubState", unit],
                )
                .await?;
                let field = |k: &str| {
                    out.lines()
                        .find_map(|l| l.strip_prefix(k).and_then(|r| r.strip_prefix('=')))
                        .unwrap_or("")
                        .to_string()
                };
                Ok(UnitState {
                    load: field("LoadState"),
                    active: field("ActiveState"),
                    sub: field("SubState"),
                })
            }
        }
    }

    /// Runs a job (`start`, `stop` or `restart`, mode `replace`) and waits until it is done,
    /// then returns the unit's state.
    pub async fn job(
        &self,
        verb: Verb,
        unit: &str,
        timeout: Duration,
    ) -> Result<UnitState, SystemdError> {
        let deadline = Instant::now() + timeout;
        match self {
            Systemd::Dbus { conn, .. } => {
                let m = self.manager().await?;
                if verb != Verb::Stop {
                    // A unit that failed before would refuse to start again after many tries.
                    let _ = m.reset_failed_unit(unit).await;
                }
                let job = match verb {
                    Verb::Start => m.start_unit(unit, "replace").await,
                    Verb::Stop => m.stop_unit(unit, "replace").await,
                    Verb::Restart => m.restart_unit(unit, "replace").await,
                }
                .map_err(|e| call_err(verb.method(), unit, e))?;
                // The job object exists until the job is done.
                loop {
                    let proxy = JobProxy::builder(conn)
                        .path(job.clone())
                        .map_err(|e| call_err(verb.method(), unit, e))?
                        .cache_properties(CacheProperties::No)
                        .build()
                        .await
                        .map_err(|e| call_err(verb.method(), unit, e))?;
                    if proxy.state().await.is_err() {
                        break;
                    }
                    if Instant::now() >= deadline {
                        let state = self
                            .state(unit)
                            .await
                            .map(|s| s.to_string())
                            .unwrap_or_default();
                        return Err(SystemdError::Timeout {
                            call: verb.method().into(),
                            unit: unit.into(),
                            timeout,
                            state,
                        });
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                self.state(unit).await
            }
            Systemd::Systemctl { program } => {
                if verb != Verb::Stop {
                    let _ = Self::systemctl_run(program, &["reset-failed", unit]).await;
                }
                let secs = timeout.as_secs().max(1).to_string();
                let args = [verb.systemctl(), unit];
                let run = Self::systemctl_run(program, &args);
                match tokio::time::timeout(timeout, run).await {
                    Ok(r) => {
                        r?;
                    }
                    Err(_) => {
                        return Err(SystemdError::Timeout {
                            call: format!("systemctl {} (timeout {secs}s)", verb.systemctl()),
                            unit: unit.into(),
                            timeout,
                            state: self
                                .state(unit)
                                .await
                                .map(|s| s.to_string())
                                .unwrap_or_default(),
                        })
                    }
                }
                self.state(unit).await
            }
        }
    }
}

/// A job kind.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verb {
    /// `StartUnit`
    Start,
    /// `StopUnit`
    Stop,
    /// `RestartUnit`
    Restart,
}

impl Verb {
    fn method(self) -> &'static str {
        match self {
            Verb::Start => "StartUnit",
            Verb::Stop => "StopUnit",
            Verb::Restart => "RestartUnit",
        }
    }
    fn systemctl(self) -> &'static str {
        match self {
            Verb::Start => "start",
            Verb::Stop => "stop",
            Verb::Restart => "restart",
        }
    }
}
