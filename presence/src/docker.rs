//! The Docker engine through bollard: connecting (with API version negotiation), the event
//! stream, listing and inspecting containers, turned into presence's own types.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::time::Duration;

use bollard::models::{ContainerInspectResponse, EventMessageTypeEnum, HealthStatusEnum};
use bollard::query_parameters::{EventsOptionsBuilder, ListContainersOptionsBuilder};
use bollard::Docker;
use flotilla_registry::backoff::Backoff;
use flotilla_registry::retry::Retry;
use flotilla_registry::Proto;
use futures::StreamExt;
use tracing::info;

use crate::events::{ContainerEvent, EventSource};
use crate::spec::{ContainerInfo, HealthState, PortBindings};

/// Seconds bollard waits for a response header (not for a whole event stream).
const REQUEST_TIMEOUT_SECS: u64 = 30;

/// How a request to the Docker engine failed, by what it means to the caller: every kind is
/// retried (the loops list again with backoff) and reported on `/healthz`; the message names
/// the request.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DockerError {
    /// No answer within the caller's bound ([`DOCKER_TIMEOUT`], or the full list's).
    #[error("{what}: no answer from the Docker engine within {}", humantime::format_duration(*.after))]
    Timeout {
        /// The request, as a log line names it.
        what: String,
        /// The bound that passed.
        after: Duration,
    },
    /// The engine could not be reached, or the connection or stream broke.
    #[error("{what}: Docker engine unreachable: {detail}")]
    Unreachable {
        /// The request, as a log line names it.
        what: String,
        /// bollard's error, one line.
        detail: String,
    },
    /// The engine answered with an error status.
    #[error("{what}: the Docker engine answered {status}: {message}")]
    Refused {
        /// The request, as a log line names it.
        what: String,
        /// The HTTP status.
        status: u16,
        /// The engine's message.
        message: String,
    },
    /// Anything else: a setting presence cannot use (an unsupported `--docker-host` scheme), an
    /// answer presence could not read.
    #[error("{what}: {detail}")]
    Failed {
        /// The request, as a log line names it.
        what: String,
        /// What went wrong, one line.
        detail: String,
    },
}

impl DockerError {
    /// Classifies bollard's error of the request `what`.
    pub fn from_bollard(what: impl Into<String>, e: bollard::errors::Error) -> DockerError {
        use bollard::errors::Error as E;
        let what = what.into();
        match e {
            E::DockerResponseServerError {
                status_code,
                message,
            } => DockerError::Refused {
                what,
                status: status_code,
                message,
            },
            E::RequestTimeoutError => DockerError::Timeout {
                what,
                after: Duration::from_secs(REQUEST_TIMEOUT_SECS),
            },
            e @ (E::IOError { .. }
            | E::HyperResponseError { .. }
            | E::HyperLegacyError { .. }
            | E::SocketNotFoundError(_)) => DockerError::Unreachable {
                what,
                detail: e.to_string(),
            },
            e => DockerError::Failed {
                what,
                detail: e.to_string(),
            },
        }
    }
}

/// What the reconciler needs from Docker. The real one is [`Engine`].
pub trait DockerApi: Send + Sync + 'static {
    /// Ids of the running (and paused) containers that match the label filters.
    fn list(&self) -> impl Future<Output = Result<Vec<String>, DockerError>> + Send;
    /// The container, or `None` if it no longer exists.
    fn inspect(
        &self,
        id: &str,
    ) -> impl Future<Output = Result<Option<ContainerInfo>, DockerError>> + Send;
}

/// A connection to the Docker engine.
#[derive(Clone)]
pub struct Engine {
    docker: Docker,
    label_filter: Vec<String>,
}

fn connect_once(host: &str) -> Result<Docker, DockerError> {
    let client_version = bollard::API_DEFAULT_VERSION;
    if let Some(path) = host.strip_prefix("unix://") {
        Docker::connect_with_unix(path, REQUEST_TIMEOUT_SECS, client_version)
            .map_err(|e| DockerError::from_bollard(host, e))
    } else if let Some(addr) = host.strip_prefix("tcp://") {
        Docker::connect_with_http(
            &format!("http://{addr}"),
            REQUEST_TIMEOUT_SECS,
            client_version,
        )
        .map_err(|e| DockerError::from_bollard(host, e))
    } else {
        Err(DockerError::Failed {
            what: host.to_owned(),
            detail: "unsupported scheme (unix:// or tcp://)".into(),
        })
    }
}

impl Engine {
    /// Connects and negotiates the API version, retrying with backoff until the engine answers
    /// (a daemon started before Docker must wait for it, not exit).
    pub async fn connect(host: &str, label_filter: Vec<String>) -> Engine {
        let mut retry = Retry::new(
            "the Docker engine",
            Backoff::new(
                Duration::from_millis(100),
                Duration::from_secs(2),
                Duration::from_secs(10),
            ),
        );
        loop {
            let attempt = async {
                let docker = connect_once(host)?;
                docker
                    .negotiate_version()
                    .await
                    .map_err(|e| DockerError::from_bollard(host, e))
            };
            match attempt.await {
                Ok(docker) => {
                    retry.succeeded();
                    let v = docker.client_version();
                    info!(docker_host = %host, api_version = %format!("{}.{}", v.major_version, v.minor_version), "connected to the Docker engine");
                    return Engine {
                        docker,
                        label_filter,
                    };
                }
                Err(e) => retry.failed_then_wait(&e).await,
            }
        }
    }

    fn label_filters(&self) -> HashMap<String, Vec<String>> {
        let mut filters = HashMap::new();
        if !self.label_filter.is_empty() {
            filters.insert("label".to_owned(), self.label_filter.clone());
        }
        filters
    }
}

/// The longest presence waits for one Docker API answer (ping, list, inspect). A wedged engine
/// is then an error the loops retry and `/healthz` reports, not a loop stuck on a socket
/// (bollard's own limit is 120 s).
pub const DOCKER_TIMEOUT: Duration = Duration::from_secs(10);

/// `fut`, or [`DockerError::Timeout`] naming `what` after [`DOCKER_TIMEOUT`].
pub async fn bounded<T>(
    what: impl Into<String>,
    fut: impl Future<Output = Result<T, DockerError>>,
) -> Result<T, DockerError> {
    match tokio::time::timeout(DOCKER_TIMEOUT, fut).await {
        Ok(r) => r,
        Err(_) => Err(DockerError::Timeout {
            what: what.into(),
            after: DOCKER_TIMEOUT,
        }),
    }
}

impl DockerApi for Engine {
    fn list(&self) -> impl Future<Output = Result<Vec<String>, DockerError>> + Send {
        let docker = self.docker.clone();
        let filters = self.label_filters();
        bounded("listing containers", async move {
            let opts = ListContainersOptionsBuilder::default()
                .all(false)
                .filters(&filters)
                .build();
            let list = docker
                .list_containers(Some(opts))
                .await
                .map_err(|e| DockerError::from_bollard("listing containers", e))?;
            Ok(list.into_iter().filter_map(|c| c.id).collect())
        })
    }

    fn inspect(
        &self,
        id: &str,
    ) -> impl Future<Output = Result<Option<ContainerInfo>, DockerError>> + Send {
        let docker = self.docker.clone();
        let id = id.to_owned();
        bounded(format!("inspecting container {id}"), async move {
            match docker.inspect_container(&id, None).await {
                Ok(resp) => Ok(Some(container_info(resp))),
                Err(bollard::errors::Error::DockerResponseServerError {
                    status_code: 404, ..
                }) => Ok(None),
                Err(e) => Err(DockerError::from_bollard(
                    format!("inspecting container {id}"),
                    e,
                )),
            }
        })
    }
}

impl EventSource for Engine {
    type Stream = futures::stream::BoxStream<'static, Result<ContainerEvent, DockerError>>;

    fn ping(&self) -> impl Future<Output = Result<(), DockerError>> + Send {
        let docker = self.docker.clone();
        async move {
            docker
                .ping()
                .await
                .map(|_| ())
                .map_err(|e| DockerError::from_bollard("ping", e))
        }
    }

    fn subscribe(&self, since_nano: i64) -> Self::Stream {
        let mut filters = self.label_filters();
        filters.insert("type".to_owned(), vec!["container".to_owned()]);
        let since = format!(
            "{}.{:09}",
            since_nano.div_euclid(1_000_000_000),
            since_nano.rem_euclid(1_000_000_000)
        );
        let opts = EventsOptionsBuilder::default()
            .since(&since)
            .filters(&filters)
            .build();
        self.docker
            .events(Some(opts))
            .filter_map(|item| async move {
                match item {
                    Ok(msg) => {
                        if msg.typ != Some(EventMessageTypeEnum::CONTAINER) {
                            return None;
                        }
                        let actor = msg.actor?;
                        let id = actor.id?;
                        let time_nano = msg
                            .time_nano
                            .or(msg.time.map(|t| t * 1_000_000_000))
                            .unwrap_or(0);
                        Some(Ok(ContainerEvent {
                            id,
                            action: msg.action.unwrap_or_default(),
                            time_nano,
                            attributes: actor.attributes.unwrap_or_default(),
                        }))
                    }
                    Err(e) => Some(Err(DockerError::from_bollard("event stream", e))),
                }
            })
            .boxed()
    }
}

fn parse_port_key(key: &str) -> Option<(u16, Proto)> {
    let (port, proto) = key.split_once('/').unwrap_or((key, Proto::Tcp.as_str()));
    // sctp cannot be represented in a record.
    let proto = Proto::parse(proto)?;
    Some((port.parse().ok()?, proto))
}

/// Converts bollard's inspect response into presence's view of a container.
pub fn container_info(r: ContainerInspectResponse) -> ContainerInfo {
    let config = r.config.unwrap_or_default();
    let state = r.state.unwrap_or_default();
    let net = r.network_settings.unwrap_or_default();
    let health = state.health.as_ref().and_then(|h| match h.status {
        Some(HealthStatusEnum::STARTING) => Some(HealthState::Starting),
        Some(HealthStatusEnum::HEALTHY) => Some(HealthState::Healthy),
        Some(HealthStatusEnum::UNHEALTHY) => Some(HealthState::Unhealthy),
        _ => None,
    });
    let mut ports: Vec<PortBindings> = net
        .ports
        .unwrap_or_default()
        .into_iter()
        .filter_map(|(key, bindings)| {
            let (port, proto) = parse_port_key(&key)?;
            let bindings = bindings
                .unwrap_or_default()
                .into_iter()
                .filter_map(|b| {
                    let host_port = b.host_port?.parse::<u16>().ok()?;
                    Some((b.host_ip.unwrap_or_default(), host_port))
                })
                .collect();
            Some(PortBindings {
                port,
                proto,
                bindings,
            })
        })
        .collect();
    ports.sort_by_key(|p| (p.port, p.proto));
    let mut exposed: Vec<(u16, Proto)> = config
        .exposed_ports
        .unwrap_or_default()
        .iter()
        .filter_map(|k| parse_port_key(k))
        .collect();
    exposed.sort();
    let networks: BTreeMap<String, String> = net
        .networks
        .unwrap_or_default()
        .into_iter()
        .map(|(name, ep)| (name, ep.ip_address.unwrap_or_default()))
        .collect();
    ContainerInfo {
        id: r.id.unwrap_or_default(),
        name: r
            .name
            .unwrap_or_default()
            .trim_start_matches('/')
            .to_owned(),
        image: config.image.unwrap_or_default(),
        labels: config.labels.unwrap_or_default(),
        env: config.env.unwrap_or_default(),
        running: state.running.unwrap_or(false),
        paused: state.paused.unwrap_or(false),
        health,
        network_mode: r
            .host_config
            .and_then(|h| h.network_mode)
            .unwrap_or_default(),
        ports,
        exposed,
        networks,
        stop_signal: config.stop_signal,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bollard::errors::Error as E;

    #[test]
    fn docker_errors_are_classified_by_bollard_variant_and_name_the_request() {
        let refused = DockerError::from_bollard(
            "inspecting container abc",
            E::DockerResponseServerError {
                status_code: 500,
                message: "driver failed".into(),
            },
        );
        assert_eq!(
            refused,
            DockerError::Refused {
                what: "inspecting container abc".into(),
                status: 500,
                message: "driver failed".into(),
            }
        );
        assert_eq!(
            refused.to_string(),
            "inspecting container abc: the Docker engine answered 500: driver failed"
        );
        let io = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "refused");
        assert!(matches!(
            DockerError::from_bollard("ping", E::from(io)),
            DockerError::Unreachable { ref what, .. } if what == "ping"
        ));
        assert!(matches!(
            DockerError::from_bollard("ping", E::SocketNotFoundError("/x.sock".into())),
            DockerError::Unreachable { .. }
        ));
        assert!(matches!(
            DockerError::from_bollard("listing containers", E::RequestTimeoutError),
            DockerError::Timeout { .. }
        ));
        let t = DockerError::Timeout {
            what: "listing containers".into(),
            after: DOCKER_TIMEOUT,
        };
        assert_eq!(
            t.to_string(),
            "listing containers: no answer from the Docker engine within 10s"
        );
        assert!(connect_once("ssh://host").is_err_and(|e| matches!(e, DockerError::Failed { .. })));
    }
}
