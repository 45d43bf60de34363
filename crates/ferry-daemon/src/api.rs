//! The HTTP API: one router, served on the admin unix socket as is and on the TLS port
//! behind bearer-token authorization. Handlers only translate HTTP to [`VmManager`] calls.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{Path, Query, Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use ferry_api_types::cluster::{
    AgentReply, AgentRequest, BrokerSetRequest, BrokerStatus, ClusterCreateRequest,
    ClusterJoinRequest, ClusterReply, ClusterStatus, HaRequest, IncomingReply, IncomingRequest,
    MigrateReply, MigrateRequest,
};
use ferry_api_types::{
    ActionReply, ConsoleLog, EnableReplicationRequest, EventInfo, ExecReply, ExecRequest,
    ImportRequest, RecoveryPointInfo, ReplicaServerInfo, ReplicaServerSetRequest,
    ReplicationHealthInfo, ReplicationInfo, ServerInfo, ShutdownRequest, VmCreateRequest, VmInfo,
    VmSetRequest, CONSOLE_UPGRADE,
};
use hyper_util::rt::TokioIo;
use serde::Deserialize;
use tracing::warn;

use crate::checkpoints::Checkpoints;
use crate::cluster;
use crate::error::ApiFailure;
use crate::replication;
use crate::vms::{VmManager, DEFAULT_SHUTDOWN_TIMEOUT};

/// What handlers share.
pub struct AppState {
    /// The VM manager.
    pub vms: Arc<VmManager>,
    /// Checkpoint operations.
    pub checkpoints: Arc<Checkpoints>,
    /// What `GET /v1/server` returns (minus the VM count).
    pub server: ServerInfo,
    /// The bearer tokens the TLS API accepts.
    pub tokens: Arc<crate::identity::ApiTokens>,
    /// The replication engine.
    pub replication: Arc<replication::Shared>,
    /// Asks ferryd to restart itself (a committed certificate rotation).
    pub restart: Arc<tokio::sync::Notify>,
}

type Shared = Arc<AppState>;
type ApiResult<T> = Result<Json<T>, ApiFailure>;

/// The API router.
pub fn router(state: Shared) -> Router {
    Router::new()
        .route("/v1/server", get(server_info))
        .route("/v1/server/rotate-token", post(rotate_token))
        .route("/v1/server/certificate", post(rotate_certificate))
        .route("/v1/vms", get(list_vms).post(create_vm))
        .route("/v1/import", post(import_vm))
        .route("/v1/vms/{name}", get(show_vm).delete(delete_vm))
        .route(
            "/v1/vms/{name}/checkpoints",
            get(list_checkpoints).post(create_checkpoint),
        )
        .route(
            "/v1/vms/{name}/checkpoints/{cp}",
            axum::routing::delete(delete_checkpoint),
        )
        .route(
            "/v1/vms/{name}/checkpoints/{cp}/{action}",
            post(checkpoint_action),
        )
        .route("/v1/vms/{name}/start", post(start_vm))
        .route("/v1/vms/{name}/set", post(set_vm))
        .route("/v1/vms/{name}/exec", post(exec_vm))
        .route("/v1/vms/{name}/shutdown", post(shutdown_vm))
        .route("/v1/vms/{name}/stop", post(stop_vm))
        .route("/v1/vms/{name}/pause", post(pause_vm))
        .route("/v1/vms/{name}/resume", post(resume_vm))
        .route("/v1/vms/{name}/console/log", get(console_log))
        .route("/v1/vms/{name}/console", get(console))
        .route("/v1/vms/{name}/screenshot", get(screenshot))
        .route("/v1/vms/{name}/vnc", get(vnc))
        .route(
            "/v1/replica-server",
            get(replica_server).post(set_replica_server),
        )
        .route("/v1/replication", get(list_replication))
        .route(
            "/v1/vms/{name}/replication",
            get(replication_status)
                .post(enable_replication)
                .delete(remove_replication),
        )
        .route("/v1/vms/{name}/replication/points", get(recovery_points))
        .route("/v1/vms/{name}/replication/health", get(replication_health))
        .route(
            "/v1/vms/{name}/replication/test-failover",
            post(start_test_failover).delete(stop_test_failover),
        )
        .route("/v1/vms/{name}/failover", post(start_failover))
        .route("/v1/vms/{name}/failover/cancel", post(cancel_failover))
        .route("/v1/vms/{name}/failover/planned", post(planned_failover))
        .route(
            "/v1/vms/{name}/replication/reverse",
            post(reverse_replication),
        )
        .route("/v1/vms/{name}/failover/complete", post(complete_failover))
        .route(
            "/v1/vms/{name}/replication/health/reset",
            post(reset_replication_health),
        )
        .route("/v1/replication/health", get(all_replication_health))
        .route("/v1/events", get(list_events))
        .route("/metrics", get(metrics))
        .route(
            "/v1/vms/{name}/replication/import",
            post(import_replication),
        )
        .route(
            "/v1/vms/{name}/replication/{action}",
            post(replication_request),
        )
        .route("/v1/cluster", get(cluster_status).post(cluster_create))
        .route("/v1/cluster/join", post(cluster_join))
        .route("/v1/cluster/leave", post(cluster_leave))
        .route("/v1/cluster/agent", post(cluster_agent))
        .route("/v1/vms/{name}/ha", post(vm_ha))
        .route("/v1/vms/{name}/migrate", post(vm_migrate))
        .route("/v1/cluster/incoming", post(cluster_incoming))
        .route("/v1/cluster/broker", get(broker_show).post(broker_set))
        .fallback(|| async { ApiFailure::not_found("no such API endpoint".to_owned()) })
        .layer(axum::extract::DefaultBodyLimit::max(
            crate::limits::MAX_BODY,
        ))
        .with_state(state)
}

/// The router for the TLS port: every request needs `Authorization: Bearer <token>`.
pub fn tls_router(state: Shared) -> Router {
    let tokens = state.tokens.clone();
    let engine = state.replication.clone();
    router(state).layer(axum::middleware::from_fn(move |req: Request, next: Next| {
        let tokens = tokens.clone();
        let engine = engine.clone();
        async move {
            let given = req
                .headers()
                .get(header::AUTHORIZATION)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.strip_prefix("Bearer "));
            // Cluster nodes call each other's node-to-node endpoint with the cluster's
            // node token, which grants nothing else.
            let ok = given.is_some_and(|given| {
                tokens.accepts(given, replication::now_unix())
                    || (req.uri().path() == "/v1/cluster/incoming"
                        && cluster::is_node_token(&engine, given))
            });
            if ok {
                next.run(req).await
            } else {
                ApiFailure {
                    status: 401,
                    code: "unauthorized",
                    message: "missing or wrong API token; use the token in the host's data dir (api.token)".to_owned(),
                }
                .into_response()
            }
        }
    }))
}

/// `POST /v1/server/certificate` body.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RotateCertificateRequest {
    /// `prepare` or `commit`.
    action: String,
    /// With `prepare`: the successor's certificate chain and key (PEM); absent, a new
    /// self-signed pair with a new key is made.
    #[serde(default)]
    cert: Option<String>,
    #[serde(default)]
    key: Option<String>,
    /// With `commit`: even if some partner has not learnt the successor yet.
    #[serde(default)]
    force: bool,
}

async fn rotate_certificate(
    State(s): State<Shared>,
    Json(req): Json<RotateCertificateRequest>,
) -> ApiResult<serde_json::Value> {
    use crate::replication::rotation::PREPARED_AT_KEY;
    let store = &s.replication.store;
    let identity = &s.replication.identity;
    match req.action.as_str() {
        "prepare" => {
            let given = match (&req.cert, &req.key) {
                (Some(c), Some(k)) => Some((c.as_str(), k.as_str())),
                (None, None) => None,
                _ => {
                    return Err(ApiFailure::invalid(
                        "give both --cert and --key, or neither (a new self-signed pair)".into(),
                    ))
                }
            };
            let fp = identity
                .prepare_rotation(&s.server.name, given)
                .map_err(|e| ApiFailure::invalid(format!("{e}")))?;
            store.set_setting(PREPARED_AT_KEY, &replication::now_unix().to_string())?;
            tracing::info!(next = %fp, "certificate rotation prepared");
            Ok(Json(serde_json::json!({
                "fingerprint": identity.fingerprint,
                "next_fingerprint": fp,
                "message": "announced to every replication partner at its next session; commit once each has had one (`ferry server rotate-certificate --commit`)",
            })))
        }
        "commit" => {
            let Some(next) = identity.next() else {
                return Err(ApiFailure::conflict(
                    "no certificate rotation is prepared: run `ferry server rotate-certificate` first".into(),
                ));
            };
            let mut lagging = Vec::new();
            for rel in store.list_replications()? {
                if !replication::rotation::was_told(store, rel.vm_id, &next) {
                    let vm = store
                        .vm_by_id(rel.vm_id)?
                        .map(|v| v.spec.name.to_string())
                        .unwrap_or_default();
                    lagging.push(format!("{vm} (partner {})", rel.partner_name));
                }
            }
            if !lagging.is_empty() && !req.force {
                return Err(ApiFailure::conflict(format!(
                    "not every replication partner has learnt the next certificate yet: {} had no session since the rotation was prepared; wait for their next cycle (`ferry replication now VM`), or --force (they will then refuse this host until re-paired)",
                    lagging.join(", ")
                )));
            }
            identity
                .commit_rotation()
                .map_err(|e| ApiFailure::internal(format!("{e}")))?;
            store.delete_setting(PREPARED_AT_KEY)?;
            tracing::info!(fingerprint = %next, "certificate rotation committed; restarting");
            let restart = s.restart.clone();
            tokio::spawn(async move {
                // The reply goes out first.
                tokio::time::sleep(std::time::Duration::from_millis(300)).await;
                restart.notify_one();
            });
            Ok(Json(serde_json::json!({
                "fingerprint": next,
                "message": "ferryd restarts with the new certificate; VMs keep running and replication resumes; re-pin it in `ferry host add` entries and the console",
            })))
        }
        other => Err(ApiFailure::invalid(format!(
            "unknown certificate action {other:?}: use prepare or commit"
        ))),
    }
}

/// `POST /v1/server/rotate-token` body.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RotateTokenRequest {
    /// How long the current token stays valid, in seconds (default an hour, at most a week).
    #[serde(default)]
    grace_s: Option<u64>,
}

async fn rotate_token(
    State(s): State<Shared>,
    Json(req): Json<RotateTokenRequest>,
) -> ApiResult<serde_json::Value> {
    let grace = req.grace_s.unwrap_or(3600);
    if grace > 7 * 86_400 {
        return Err(ApiFailure::invalid(format!(
            "a grace period of {grace} s is too long: at most a week (604800 s)"
        )));
    }
    let until = replication::now_unix() + grace as i64;
    let (token, record) = s
        .tokens
        .rotate(until)
        .map_err(|e| ApiFailure::internal(format!("{e}")))?;
    s.replication
        .store
        .set_setting(crate::identity::PREVIOUS_TOKEN_KEY, &record)?;
    tracing::info!(previous_valid_until = until, "API token rotated");
    Ok(Json(serde_json::json!({
        "token": token,
        "token_file": s.server.token_file,
        "previous_valid_until": until,
    })))
}

async fn server_info(State(s): State<Shared>) -> ApiResult<ServerInfo> {
    let mut info = s.server.clone();
    info.vm_count = s.vms.count();
    info.replication_bandwidth_limit = s.replication.host_limiter.as_ref().and_then(|l| l.rate());
    Ok(Json(info))
}

async fn list_vms(State(s): State<Shared>) -> ApiResult<Vec<VmInfo>> {
    Ok(Json(s.vms.list()?))
}

async fn create_vm(
    State(s): State<Shared>,
    body: Result<Json<VmCreateRequest>, axum::extract::rejection::JsonRejection>,
) -> Result<(StatusCode, Json<VmInfo>), ApiFailure> {
    let Json(req) = body.map_err(|e| ApiFailure::invalid(e.body_text()))?;
    let name = req.name.clone();
    let info = s.vms.create(req).await?;
    cluster::record_vm(&s.replication, &name);
    Ok((StatusCode::CREATED, Json(info)))
}

async fn show_vm(State(s): State<Shared>, Path(name): Path<String>) -> ApiResult<VmInfo> {
    Ok(Json(s.vms.show(&name).await?))
}

async fn set_vm(
    State(s): State<Shared>,
    Path(name): Path<String>,
    body: Result<Json<VmSetRequest>, axum::extract::rejection::JsonRejection>,
) -> ApiResult<VmInfo> {
    let Json(req) = body.map_err(|e| ApiFailure::invalid(e.body_text()))?;
    cluster::before_local_op(&s.replication, &name, "change")?;
    let info = s.vms.set(&name, req).await?;
    cluster::record_vm(&s.replication, &name);
    Ok(Json(info))
}

async fn exec_vm(
    State(s): State<Shared>,
    Path(name): Path<String>,
    body: Result<Json<ExecRequest>, axum::extract::rejection::JsonRejection>,
) -> ApiResult<ExecReply> {
    let Json(req) = body.map_err(|e| ApiFailure::invalid(e.body_text()))?;
    Ok(Json(s.vms.exec(&name, req).await?))
}

async fn delete_vm(State(s): State<Shared>, Path(name): Path<String>) -> ApiResult<ActionReply> {
    cluster::refuse_if_ha(&s.replication, &name, "deleted")?;
    cluster::before_local_op(&s.replication, &name, "delete")?;
    Ok(Json(s.vms.delete(&name).await?))
}

async fn start_vm(State(s): State<Shared>, Path(name): Path<String>) -> ApiResult<ActionReply> {
    cluster::refuse_if_ha(&s.replication, &name, "started")?;
    cluster::before_local_op(&s.replication, &name, "start")?;
    let reply = match s.vms.start(&name).await {
        Ok(r) => r,
        Err(e) => {
            cluster::after_local_stop(&s.replication, &name);
            return Err(e);
        }
    };
    replication::reip::on_start(&s.replication, &name);
    Ok(Json(reply))
}

async fn shutdown_vm(
    State(s): State<Shared>,
    Path(name): Path<String>,
    body: Option<Json<ShutdownRequest>>,
) -> ApiResult<ActionReply> {
    cluster::refuse_if_ha(&s.replication, &name, "shut down")?;
    cluster::before_local_op(&s.replication, &name, "shut down")?;
    let timeout = body
        .and_then(|Json(b)| b.timeout_s)
        .map(Duration::from_secs)
        .unwrap_or(DEFAULT_SHUTDOWN_TIMEOUT);
    let reply = s.vms.shutdown(&name, timeout).await?;
    cluster::after_local_stop(&s.replication, &name);
    Ok(Json(reply))
}

async fn stop_vm(State(s): State<Shared>, Path(name): Path<String>) -> ApiResult<ActionReply> {
    cluster::refuse_if_ha(&s.replication, &name, "stopped")?;
    cluster::before_local_op(&s.replication, &name, "stop")?;
    let reply = s.vms.stop(&name).await?;
    cluster::after_local_stop(&s.replication, &name);
    Ok(Json(reply))
}

async fn pause_vm(State(s): State<Shared>, Path(name): Path<String>) -> ApiResult<ActionReply> {
    Ok(Json(s.vms.pause(&name).await?))
}

async fn resume_vm(State(s): State<Shared>, Path(name): Path<String>) -> ApiResult<ActionReply> {
    Ok(Json(s.vms.resume(&name).await?))
}

#[derive(Deserialize)]
struct LogQuery {
    #[serde(default)]
    offset: u64,
}

async fn console_log(
    State(s): State<Shared>,
    Path(name): Path<String>,
    Query(q): Query<LogQuery>,
) -> ApiResult<ConsoleLog> {
    Ok(Json(s.vms.console_log(&name, q.offset).await?))
}

/// Upgrades the connection to a raw byte stream joined to the VM's serial console.
async fn console(
    State(s): State<Shared>,
    Path(name): Path<String>,
    mut req: Request,
) -> Result<Response, ApiFailure> {
    let wants_upgrade = req
        .headers()
        .get(header::UPGRADE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case(CONSOLE_UPGRADE));
    if !wants_upgrade {
        return Err(ApiFailure::invalid(format!(
            "the console needs `Upgrade: {CONSOLE_UPGRADE}`; use `ferry vm console`"
        )));
    }
    let path = s.vms.console_socket(&name)?;
    let mut serial = tokio::net::UnixStream::connect(&path)
        .await
        .map_err(|e| ApiFailure::qemu(format!("cannot open the serial console: {e}")))?;
    let on_upgrade = hyper::upgrade::on(&mut req);
    tokio::spawn(async move {
        match on_upgrade.await {
            Ok(upgraded) => {
                let mut client = TokioIo::new(upgraded);
                let _ = tokio::io::copy_bidirectional(&mut client, &mut serial).await;
            }
            Err(e) => warn!(error = %e, "console upgrade failed"),
        }
    });
    let mut resp = Response::new(Body::empty());
    *resp.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    resp.headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    resp.headers_mut()
        .insert(header::UPGRADE, HeaderValue::from_static(CONSOLE_UPGRADE));
    Ok(resp)
}

/// A PNG of the VM's display.
async fn screenshot(
    State(s): State<Shared>,
    Path(name): Path<String>,
) -> Result<Response, ApiFailure> {
    let png = s.vms.screenshot(&name).await?;
    Ok((
        [
            (header::CONTENT_TYPE, "image/png"),
            (header::CACHE_CONTROL, "no-store"),
        ],
        png,
    )
        .into_response())
}

/// Upgrades to a websocket joined to the VM's VNC server: each binary message carries RFB
/// bytes, as noVNC (and websockify) speak it. The socket is opened before the upgrade is
/// accepted, so a VM that is off or has no display is refused with a JSON error instead.
async fn vnc(
    State(s): State<Shared>,
    Path(name): Path<String>,
    ws: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Result<Response, ApiFailure> {
    let ws = ws.map_err(|e| {
        ApiFailure::invalid(format!(
            "the VNC endpoint takes a websocket upgrade: {}",
            e.body_text()
        ))
    })?;
    let path = s.vms.vnc_socket(&name)?;
    let vnc = tokio::net::UnixStream::connect(&path)
        .await
        .map_err(|e| ApiFailure::qemu(format!("cannot open the VM's VNC socket: {e}")))?;
    // noVNC before 1.2 asks for the `binary` subprotocol; later ones ask for none.
    Ok(ws
        .protocols(["binary"])
        .on_upgrade(move |socket| bridge_vnc(socket, vnc)))
}

/// Copies RFB bytes between the websocket and QEMU until either side closes.
async fn bridge_vnc(socket: WebSocket, vnc: tokio::net::UnixStream) {
    use futures_util::{SinkExt, StreamExt};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (mut ws_tx, mut ws_rx) = socket.split();
    let (mut vnc_rx, mut vnc_tx) = vnc.into_split();
    let to_vnc = async {
        while let Some(Ok(msg)) = ws_rx.next().await {
            let bytes = match msg {
                Message::Binary(b) => b,
                Message::Close(_) => break,
                // Pings are answered by the library; text is not RFB.
                _ => continue,
            };
            if vnc_tx.write_all(&bytes).await.is_err() {
                break;
            }
        }
    };
    let from_vnc = async {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match vnc_rx.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    let msg = Message::Binary(bytes::Bytes::copy_from_slice(&buf[..n]));
                    if ws_tx.send(msg).await.is_err() {
                        break;
                    }
                }
            }
        }
        let _ = ws_tx.close().await;
    };
    // Either direction ending ends the session: QEMU sees its client go away.
    tokio::select! {
        _ = to_vnc => {}
        _ = from_vnc => {}
    }
}

// ---- replication ------------------------------------------------------------------------

async fn replica_server(State(s): State<Shared>) -> ApiResult<ReplicaServerInfo> {
    Ok(Json(replication::replica_server_info(&s.replication)))
}

async fn set_replica_server(
    State(s): State<Shared>,
    Json(req): Json<ReplicaServerSetRequest>,
) -> ApiResult<ReplicaServerInfo> {
    Ok(Json(
        replication::replica_server_set(&s.replication, req).await?,
    ))
}

async fn list_replication(State(s): State<Shared>) -> ApiResult<Vec<ReplicationInfo>> {
    Ok(Json(replication::list(&s.replication)?))
}

async fn replication_status(
    State(s): State<Shared>,
    Path(name): Path<String>,
) -> ApiResult<ReplicationInfo> {
    Ok(Json(replication::status(&s.replication, &name)?))
}

async fn enable_replication(
    State(s): State<Shared>,
    Path(name): Path<String>,
    Json(req): Json<EnableReplicationRequest>,
) -> ApiResult<ReplicationInfo> {
    Ok(Json(replication::enable(&s.replication, &name, req).await?))
}

async fn remove_replication(
    State(s): State<Shared>,
    Path(name): Path<String>,
) -> ApiResult<ActionReply> {
    Ok(Json(replication::remove(&s.replication, &name).await?))
}

async fn recovery_points(
    State(s): State<Shared>,
    Path(name): Path<String>,
) -> ApiResult<Vec<RecoveryPointInfo>> {
    Ok(Json(replication::points(&s.replication, &name)?))
}

/// `POST /v1/vms/{name}/replication/test-failover` body.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TestFailoverRequest {
    point: Option<i64>,
    /// A bridge for the test VM's NICs (an isolated test network); none: no NICs.
    network: Option<String>,
}

/// `POST /v1/vms/{name}/failover` body.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FailoverRequest {
    point: Option<i64>,
    #[serde(default)]
    start: bool,
    #[serde(default)]
    force: bool,
}

async fn start_failover(
    State(s): State<Shared>,
    Path(name): Path<String>,
    Json(req): Json<FailoverRequest>,
) -> ApiResult<ActionReply> {
    Ok(Json(
        replication::failover::start(&s.replication, &name, req.point, req.start, req.force)
            .await?,
    ))
}

/// `POST /v1/vms/{name}/failover/planned` body.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PlannedFailoverRequest {
    #[serde(default)]
    start: bool,
    #[serde(default)]
    reverse: bool,
}

async fn planned_failover(
    State(s): State<Shared>,
    Path(name): Path<String>,
    Json(req): Json<PlannedFailoverRequest>,
) -> ApiResult<ActionReply> {
    Ok(Json(
        replication::failover::planned(&s.replication, &name, req.start, req.reverse).await?,
    ))
}

/// `POST /v1/vms/{name}/replication/reverse` body: the old primary, as `replication enable`
/// names a replica server.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ReverseRequest {
    replica_name: String,
    replica_addr: String,
    replica_fingerprint: String,
    #[serde(default)]
    resync: bool,
}

async fn reverse_replication(
    State(s): State<Shared>,
    Path(name): Path<String>,
    Json(req): Json<ReverseRequest>,
) -> ApiResult<ReplicationInfo> {
    Ok(Json(
        replication::failover::reverse(
            &s.replication,
            &name,
            &req.replica_name,
            &req.replica_addr,
            &req.replica_fingerprint,
            req.resync,
        )
        .await?,
    ))
}

async fn cancel_failover(
    State(s): State<Shared>,
    Path(name): Path<String>,
) -> ApiResult<ActionReply> {
    Ok(Json(
        replication::failover::cancel(&s.replication, &name).await?,
    ))
}

async fn complete_failover(
    State(s): State<Shared>,
    Path(name): Path<String>,
) -> ApiResult<ActionReply> {
    Ok(Json(
        replication::failover::complete(&s.replication, &name).await?,
    ))
}

async fn start_test_failover(
    State(s): State<Shared>,
    Path(name): Path<String>,
    Json(req): Json<TestFailoverRequest>,
) -> ApiResult<ActionReply> {
    Ok(Json(
        replication::test_failover::start(&s.replication, &name, req.point, req.network.as_deref())
            .await?,
    ))
}

async fn stop_test_failover(
    State(s): State<Shared>,
    Path(name): Path<String>,
) -> ApiResult<ActionReply> {
    Ok(Json(
        replication::test_failover::stop(&s.replication, &name).await?,
    ))
}

async fn replication_health(
    State(s): State<Shared>,
    Path(name): Path<String>,
) -> ApiResult<ReplicationHealthInfo> {
    Ok(Json(replication::health_of(&s.replication, &name)?))
}

async fn reset_replication_health(
    State(s): State<Shared>,
    Path(name): Path<String>,
) -> ApiResult<ReplicationHealthInfo> {
    Ok(Json(replication::reset_health(&s.replication, &name)?))
}

async fn all_replication_health(State(s): State<Shared>) -> ApiResult<Vec<ReplicationHealthInfo>> {
    Ok(Json(
        replication::health::all(&s.replication)
            .map_err(|e| ApiFailure::internal(format!("{e:#}")))?,
    ))
}

/// `GET /v1/events?vm=NAME&after=SEQ&limit=N`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct EventsQuery {
    vm: Option<String>,
    after: Option<i64>,
    limit: Option<u32>,
}

async fn list_events(
    State(s): State<Shared>,
    Query(q): Query<EventsQuery>,
) -> ApiResult<Vec<EventInfo>> {
    let rows = s.replication.store.list_events(
        q.vm.as_deref(),
        q.after.unwrap_or(0),
        q.limit.unwrap_or(1000).min(10_000),
    )?;
    Ok(Json(
        rows.into_iter()
            .map(|e| EventInfo {
                id: e.id,
                at_ms: e.at_ms,
                vm: e.vm,
                code: e.code,
                kind: e.kind,
                severity: e.severity,
                message: e.message,
            })
            .collect(),
    ))
}

/// The Prometheus exposition (OpenMetrics text).
async fn metrics(State(s): State<Shared>) -> Result<Response, ApiFailure> {
    let body = replication::metrics::metrics_text(&s.replication, s.vms.count())
        .map_err(|e| ApiFailure::internal(format!("{e:#}")))?;
    Ok((
        [(header::CONTENT_TYPE, replication::metrics::CONTENT_TYPE)],
        body,
    )
        .into_response())
}

async fn import_replication(
    State(s): State<Shared>,
    Path(name): Path<String>,
    Json(req): Json<ImportRequest>,
) -> ApiResult<ReplicationInfo> {
    Ok(Json(
        replication::import(&s.replication, &name, &req.dir).await?,
    ))
}

async fn replication_request(
    State(s): State<Shared>,
    Path((name, action)): Path<(String, String)>,
) -> ApiResult<ReplicationInfo> {
    Ok(Json(replication::request(&s.replication, &name, &action)?))
}

/// The span of a checkpoint operation on `vm`: its log lines carry the VM, the operation
/// and the checkpoint (as the user named it).
fn cp_span(vm: &str, op: &str, checkpoint: Option<&str>) -> tracing::Span {
    tracing::info_span!("checkpoint", vm = %vm, op = %op, checkpoint)
}

type JsonBody<T> = Result<Json<T>, axum::extract::rejection::JsonRejection>;

/// Runs a checkpoint operation to its end even if the client goes away: hyper drops a
/// handler's future when its connection closes, which would stop an apply between two
/// disks (or kill qemu-img mid-revert).
///
/// Every log line of the operation carries `span`'s fields (the VM and checkpoint).
async fn detached<T: Send + 'static>(
    span: tracing::Span,
    op: impl std::future::Future<Output = Result<T, ApiFailure>> + Send + 'static,
) -> Result<T, ApiFailure> {
    tokio::spawn(tracing::Instrument::instrument(op, span))
        .await
        .map_err(|e| ApiFailure::internal(format!("the checkpoint operation failed: {e}")))?
}

fn body<T>(b: JsonBody<T>) -> Result<T, ApiFailure> {
    b.map(|Json(v)| v)
        .map_err(|e| ApiFailure::invalid(e.body_text()))
}

async fn import_vm(
    State(s): State<Shared>,
    req: JsonBody<ferry_api_types::VmImportRequest>,
) -> Result<(StatusCode, Json<VmInfo>), ApiFailure> {
    Ok((
        StatusCode::CREATED,
        Json({
            let (c, req) = (s.checkpoints.clone(), body(req)?);
            detached(
                tracing::info_span!("checkpoint", op = "import"),
                async move { c.import(req).await },
            )
            .await?
        }),
    ))
}

async fn list_checkpoints(
    State(s): State<Shared>,
    Path(name): Path<String>,
) -> ApiResult<ferry_api_types::CheckpointList> {
    Ok(Json(s.checkpoints.list(&name)?))
}

async fn create_checkpoint(
    State(s): State<Shared>,
    Path(name): Path<String>,
    req: JsonBody<ferry_api_types::CheckpointCreateRequest>,
) -> Result<(StatusCode, Json<ferry_api_types::CheckpointCreated>), ApiFailure> {
    let (c, req) = (s.checkpoints.clone(), body(req)?);
    let (checkpoint, message) = detached(cp_span(&name, "create", None), async move {
        c.create(&name, req).await
    })
    .await?;
    Ok((
        StatusCode::CREATED,
        Json(ferry_api_types::CheckpointCreated {
            checkpoint,
            message,
        }),
    ))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DeleteCheckpointQuery {
    #[serde(default)]
    subtree: bool,
}

async fn delete_checkpoint(
    State(s): State<Shared>,
    Path((name, cp)): Path<(String, String)>,
    q: Result<Query<DeleteCheckpointQuery>, axum::extract::rejection::QueryRejection>,
) -> ApiResult<ActionReply> {
    let Query(q) = q.map_err(|e| ApiFailure::invalid(e.body_text()))?;
    let c = s.checkpoints.clone();
    Ok(Json(
        detached(cp_span(&name, "delete", Some(&cp)), async move {
            c.delete(&name, &cp, q.subtree).await
        })
        .await?,
    ))
}

async fn checkpoint_action(
    State(s): State<Shared>,
    Path((name, cp, action)): Path<(String, String, String)>,
    raw: axum::body::Bytes,
) -> Result<Response, ApiFailure> {
    fn parse<T: serde::de::DeserializeOwned + Default>(raw: &[u8]) -> Result<T, ApiFailure> {
        if raw.iter().all(u8::is_ascii_whitespace) {
            return Ok(T::default());
        }
        serde_json::from_slice(raw)
            .map_err(|e| ApiFailure::invalid(format!("bad request body: {e}")))
    }
    fn parse_required<T: serde::de::DeserializeOwned>(raw: &[u8]) -> Result<T, ApiFailure> {
        serde_json::from_slice(raw)
            .map_err(|e| ApiFailure::invalid(format!("bad request body: {e}")))
    }
    Ok(match action.as_str() {
        "apply" => {
            let req: ferry_api_types::CheckpointApplyRequest = parse(&raw)?;
            let c = s.checkpoints.clone();
            Json(
                detached(cp_span(&name, "apply", Some(&cp)), async move {
                    c.apply(&name, &cp, req.checkpoint_first).await
                })
                .await?,
            )
            .into_response()
        }
        "rename" => {
            let req: ferry_api_types::CheckpointRenameRequest = parse_required(&raw)?;
            Json(s.checkpoints.rename(&name, &cp, &req.name).await?).into_response()
        }
        "export" => {
            let req: ferry_api_types::CheckpointExportRequest = parse_required(&raw)?;
            let c = s.checkpoints.clone();
            Json(
                detached(cp_span(&name, "export", Some(&cp)), async move {
                    c.export(&name, &cp, &req.dir).await
                })
                .await?,
            )
            .into_response()
        }
        other => {
            return Err(ApiFailure::not_found(format!(
                "no checkpoint action {other:?}; use apply, rename or export"
            )))
        }
    })
}

async fn cluster_status(State(s): State<Shared>) -> ApiResult<ClusterStatus> {
    Ok(Json(cluster::status(&s.replication).await?))
}

async fn cluster_create(
    State(s): State<Shared>,
    body: Result<Json<ClusterCreateRequest>, axum::extract::rejection::JsonRejection>,
) -> ApiResult<ClusterStatus> {
    let Json(req) = body.map_err(|e| ApiFailure::invalid(e.body_text()))?;
    Ok(Json(cluster::create(&s.replication, req).await?))
}

async fn cluster_join(
    State(s): State<Shared>,
    body: Result<Json<ClusterJoinRequest>, axum::extract::rejection::JsonRejection>,
) -> ApiResult<ClusterStatus> {
    let Json(req) = body.map_err(|e| ApiFailure::invalid(e.body_text()))?;
    Ok(Json(cluster::join(&s.replication, req).await?))
}

async fn cluster_leave(State(s): State<Shared>) -> ApiResult<ClusterReply> {
    Ok(Json(cluster::leave(&s.replication).await?))
}

async fn cluster_agent(
    State(s): State<Shared>,
    body: Result<Json<AgentRequest>, axum::extract::rejection::JsonRejection>,
) -> ApiResult<AgentReply> {
    let Json(req) = body.map_err(|e| ApiFailure::invalid(e.body_text()))?;
    Ok(Json(cluster::agent(&s.replication, req).await))
}

async fn vm_ha(
    State(s): State<Shared>,
    Path(name): Path<String>,
    body: Result<Json<HaRequest>, axum::extract::rejection::JsonRejection>,
) -> ApiResult<ClusterReply> {
    let Json(req) = body.map_err(|e| ApiFailure::invalid(e.body_text()))?;
    Ok(Json(
        cluster::set_ha(&s.replication, &name, req.enabled).await?,
    ))
}

async fn vm_migrate(
    State(s): State<Shared>,
    Path(name): Path<String>,
    body: Result<Json<MigrateRequest>, axum::extract::rejection::JsonRejection>,
) -> ApiResult<MigrateReply> {
    let Json(req) = body.map_err(|e| ApiFailure::invalid(e.body_text()))?;
    Ok(Json(
        cluster::migrate(&s.replication, &name, &req.to).await?,
    ))
}

async fn cluster_incoming(
    State(s): State<Shared>,
    body: Result<Json<IncomingRequest>, axum::extract::rejection::JsonRejection>,
) -> ApiResult<IncomingReply> {
    let Json(req) = body.map_err(|e| ApiFailure::invalid(e.body_text()))?;
    Ok(Json(cluster::incoming(&s.replication, req).await?))
}

async fn broker_show(State(s): State<Shared>) -> ApiResult<BrokerStatus> {
    Ok(Json(cluster::broker(&s.replication).await?))
}

async fn broker_set(
    State(s): State<Shared>,
    body: Result<Json<BrokerSetRequest>, axum::extract::rejection::JsonRejection>,
) -> ApiResult<BrokerStatus> {
    let Json(req) = body.map_err(|e| ApiFailure::invalid(e.body_text()))?;
    Ok(Json(cluster::set_broker(&s.replication, req).await?))
}
