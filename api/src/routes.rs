//! The REST routes: JSON in and out, everything under `/v1` behind the bearer
//! token, `/healthz` open.
//!
//! | method | path | body → answer |
//! |---|---|---|
//! | GET | `/healthz` | → `ok` (no token needed) |
//! | GET | `/v1/zone` | → `Zone` |
//! | GET | `/v1/hosts` | → `[Host]` |
//! | GET | `/v1/nodes` | → `[NodeStatus]` |
//! | POST | `/v1/nodes` | `RegisterNode` → `Registered` |
//! | POST | `/v1/nodes/{uuid}/heartbeat` | `Heartbeat` → `HeartbeatReply` |
//! | GET | `/v1/disks` | → `[Disk]` |
//! | GET | `/v1/datastores` | → `[Datastore]` |
//! | POST | `/v1/datastores` | `CreateDatastore` → 201 `Datastore` |
//! | GET | `/v1/datastores/{name}` | → `Datastore` |
//! | DELETE | `/v1/datastores/{name}` | → 204 |
//! | POST | `/v1/datastores/{name}/disks` | `DatastoreDisk` → `Datastore` (rebalance onto it) |
//! | DELETE | `/v1/datastores/{name}/disks/{disk}` | → `Datastore` (its copies drain) |
//! | DELETE | `/v1/nodes/{uuid}[?force=true]` | → `[disk uuid]` (its disks leave every datastore) |
//! | GET | `/v1/vdisks[?datastore=X]` | → `[VdiskView]` |
//! | POST | `/v1/vdisks` | `CreateVdisk` → 201 `Vdisk` |
//! | GET | `/v1/vdisks/{ds}/{name}` | → `VdiskView` |
//! | DELETE | `/v1/vdisks/{ds}/{name}[?force=true]` | → 204 |
//! | POST | `/v1/vdisks/{ds}/{name}/resize` | `ResizeVdisk` → `Vdisk` |
//! | POST | `/v1/vdisks/{ds}/{name}/open` | `OpenVdisk` → `Opened` |
//! | POST | `/v1/vdisks/{ds}/{name}/renew` | `SessionRef` → `Renewed` |
//! | POST | `/v1/vdisks/{ds}/{name}/stale` | `MarkStale` → `Vdisk` |
//! | POST | `/v1/vdisks/{ds}/{name}/clean` | `MarkClean` → `Vdisk` |
//! | POST | `/v1/vdisks/{ds}/{name}/activity` | `MarkActive` → `Vdisk` |
//! | POST | `/v1/vdisks/{ds}/{name}/close` | `SessionRef` → 204 |
//!
//! Errors are `{"error": "...", "code": "..."}` on one line (status: code):
//! 400 `invalid` (malformed request: bad JSON, wrong types, unknown fields,
//! missing content type, bad path or query; or out-of-range values), 401
//! `unauthorized` (missing or wrong token), 404 `no_route` or `not_found`
//! (unknown object), 405 `method_not_allowed`, 409 `already_exists`,
//! `conflict`, `unsatisfiable`, `lease_lost` (the session does not hold the
//! vDisk's lease: the writer is fenced), `still_dirty` (a copy completed
//! while it still misses chunks), 413 `too_large` (body over 1 MiB), 503
//! `contention` (an update gave up under concurrent updates and wrote
//! nothing: send it again) and `store_unavailable`, 500 `record_unreadable`.

use std::sync::Arc;

use axum::extract::{DefaultBodyLimit, State};
use axum::http::StatusCode;
use axum::middleware::from_fn_with_state;
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use serde::Deserialize;
use uuid::Uuid;

use tessera_zone::records::{Datastore, Disk, Host, NodeStatus, Vdisk, Zone};
use tessera_zone::service::{
    CreateDatastore, CreateVdisk, CreatedVdisk, DatastoreDisk, DatastoreView, Heartbeat,
    HeartbeatReply, MarkActive, MarkClean, MarkStale, OpenVdisk, Opened, RegisterNode, Registered,
    Renewed, ResizeVdisk, SessionRef, VdiskView, ZoneService,
};

use crate::auth::require_token;
use crate::error::HttpError;
use crate::extract::{Body, Params, QueryParams};

/// Largest request body accepted, in bytes.
pub const MAX_BODY: usize = 1 << 20;

type Answer<T> = Result<Json<T>, HttpError>;

/// The application: every route, the token check, the JSON fallbacks.
pub fn router(service: ZoneService, token: Arc<str>) -> Router {
    let v1 = Router::new()
        .route("/v1/zone", get(zone))
        .route("/v1/hosts", get(hosts))
        .route("/v1/nodes", get(nodes).post(register_node))
        .route("/v1/nodes/{uuid}", delete(remove_node))
        .route("/v1/nodes/{uuid}/heartbeat", post(heartbeat))
        .route("/v1/disks", get(disks))
        .route("/v1/datastores", get(datastores).post(create_datastore))
        .route(
            "/v1/datastores/{name}",
            get(datastore).delete(delete_datastore),
        )
        .route("/v1/datastores/{name}/disks", post(add_datastore_disk))
        .route(
            "/v1/datastores/{name}/disks/{disk}",
            delete(remove_datastore_disk),
        )
        .route("/v1/vdisks", get(vdisks).post(create_vdisk))
        .route("/v1/vdisks/{ds}/{name}", get(vdisk).delete(delete_vdisk))
        .route("/v1/vdisks/{ds}/{name}/resize", post(resize_vdisk))
        .route("/v1/vdisks/{ds}/{name}/open", post(open_vdisk))
        .route("/v1/vdisks/{ds}/{name}/renew", post(renew_vdisk))
        .route("/v1/vdisks/{ds}/{name}/stale", post(mark_stale))
        .route("/v1/vdisks/{ds}/{name}/clean", post(mark_clean))
        .route("/v1/vdisks/{ds}/{name}/activity", post(mark_active))
        .route("/v1/vdisks/{ds}/{name}/close", post(close_vdisk))
        .method_not_allowed_fallback(method_not_allowed)
        .route_layer(from_fn_with_state(token, require_token))
        .with_state(service);
    Router::new()
        .route("/healthz", get(healthz))
        .method_not_allowed_fallback(method_not_allowed)
        .merge(v1)
        .fallback(not_found)
        .layer(DefaultBodyLimit::max(MAX_BODY))
}

async fn healthz() -> &'static str {
    "ok"
}

async fn not_found() -> HttpError {
    HttpError::not_found()
}

async fn method_not_allowed() -> HttpError {
    HttpError::method_not_allowed()
}

async fn zone(State(svc): State<ZoneService>) -> Answer<Zone> {
    Ok(Json(svc.zone().await?))
}

async fn hosts(State(svc): State<ZoneService>) -> Answer<Vec<Host>> {
    Ok(Json(svc.hosts().await?))
}

async fn nodes(State(svc): State<ZoneService>) -> Answer<Vec<NodeStatus>> {
    Ok(Json(svc.nodes().await?))
}

async fn register_node(
    State(svc): State<ZoneService>,
    Body(req): Body<RegisterNode>,
) -> Answer<Registered> {
    Ok(Json(svc.register_node(req).await?))
}

async fn heartbeat(
    State(svc): State<ZoneService>,
    Params(node): Params<Uuid>,
    Body(req): Body<Heartbeat>,
) -> Answer<HeartbeatReply> {
    Ok(Json(svc.heartbeat(node, req).await?))
}

async fn disks(State(svc): State<ZoneService>) -> Answer<Vec<Disk>> {
    Ok(Json(svc.disks().await?))
}

async fn datastores(State(svc): State<ZoneService>) -> Answer<Vec<DatastoreView>> {
    Ok(Json(svc.datastore_views().await?))
}

async fn create_datastore(
    State(svc): State<ZoneService>,
    Body(req): Body<CreateDatastore>,
) -> Result<(StatusCode, Json<Datastore>), HttpError> {
    Ok((StatusCode::CREATED, Json(svc.create_datastore(req).await?)))
}

async fn datastore(
    State(svc): State<ZoneService>,
    Params(name): Params<String>,
) -> Answer<DatastoreView> {
    Ok(Json(svc.datastore_view(&name).await?))
}

async fn delete_datastore(
    State(svc): State<ZoneService>,
    Params(name): Params<String>,
) -> Result<StatusCode, HttpError> {
    svc.delete_datastore(&name).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn add_datastore_disk(
    State(svc): State<ZoneService>,
    Params(name): Params<String>,
    Body(req): Body<DatastoreDisk>,
) -> Answer<Datastore> {
    Ok(Json(svc.add_datastore_disk(&name, req.disk).await?))
}

async fn remove_datastore_disk(
    State(svc): State<ZoneService>,
    Params((name, disk)): Params<(String, Uuid)>,
) -> Answer<Datastore> {
    Ok(Json(svc.remove_datastore_disk(&name, disk).await?))
}

async fn remove_node(
    State(svc): State<ZoneService>,
    Params(node): Params<Uuid>,
    QueryParams(q): QueryParams<DeleteQuery>,
) -> Answer<Vec<Uuid>> {
    Ok(Json(svc.remove_node(node, q.force).await?))
}

/// Query of `GET /v1/vdisks`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct VdisksQuery {
    datastore: Option<String>,
}

async fn vdisks(
    State(svc): State<ZoneService>,
    QueryParams(q): QueryParams<VdisksQuery>,
) -> Answer<Vec<VdiskView>> {
    Ok(Json(svc.vdisks(q.datastore.as_deref()).await?))
}

async fn create_vdisk(
    State(svc): State<ZoneService>,
    Body(req): Body<CreateVdisk>,
) -> Result<(StatusCode, Json<CreatedVdisk>), HttpError> {
    Ok((
        StatusCode::CREATED,
        Json(svc.create_vdisk_noted(req).await?),
    ))
}

async fn vdisk(
    State(svc): State<ZoneService>,
    Params((ds, name)): Params<(String, String)>,
) -> Answer<VdiskView> {
    Ok(Json(svc.vdisk(&ds, &name).await?))
}

/// Query of `DELETE /v1/vdisks/{ds}/{name}`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct DeleteQuery {
    #[serde(default)]
    force: bool,
}

async fn delete_vdisk(
    State(svc): State<ZoneService>,
    Params((ds, name)): Params<(String, String)>,
    QueryParams(q): QueryParams<DeleteQuery>,
) -> Result<StatusCode, HttpError> {
    svc.delete_vdisk(&ds, &name, q.force).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn resize_vdisk(
    State(svc): State<ZoneService>,
    Params((ds, name)): Params<(String, String)>,
    Body(req): Body<ResizeVdisk>,
) -> Answer<Vdisk> {
    Ok(Json(svc.resize_vdisk(&ds, &name, req.size).await?))
}

async fn open_vdisk(
    State(svc): State<ZoneService>,
    Params((ds, name)): Params<(String, String)>,
    Body(req): Body<OpenVdisk>,
) -> Answer<Opened> {
    Ok(Json(svc.open_vdisk(&ds, &name, req).await?))
}

async fn renew_vdisk(
    State(svc): State<ZoneService>,
    Params((ds, name)): Params<(String, String)>,
    Body(req): Body<SessionRef>,
) -> Answer<Renewed> {
    Ok(Json(svc.renew_vdisk(&ds, &name, req).await?))
}

async fn mark_stale(
    State(svc): State<ZoneService>,
    Params((ds, name)): Params<(String, String)>,
    Body(req): Body<MarkStale>,
) -> Answer<Vdisk> {
    Ok(Json(svc.mark_stale(&ds, &name, req).await?))
}

async fn mark_clean(
    State(svc): State<ZoneService>,
    Params((ds, name)): Params<(String, String)>,
    Body(req): Body<MarkClean>,
) -> Answer<Vdisk> {
    Ok(Json(svc.mark_clean(&ds, &name, req).await?))
}

async fn mark_active(
    State(svc): State<ZoneService>,
    Params((ds, name)): Params<(String, String)>,
    Body(req): Body<MarkActive>,
) -> Answer<Vdisk> {
    Ok(Json(svc.mark_active(&ds, &name, req).await?))
}

async fn close_vdisk(
    State(svc): State<ZoneService>,
    Params((ds, name)): Params<(String, String)>,
    Body(req): Body<SessionRef>,
) -> Result<StatusCode, HttpError> {
    svc.close_vdisk(&ds, &name, req).await?;
    Ok(StatusCode::NO_CONTENT)
}
