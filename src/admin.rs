//! The admin API: HTTP JSON under `/api/v1`, authorized by an access token
//! (`Authorization: Bearer <token>`) whose grants say what it may do.
//!
//! | request | grant |
//! | --- | --- |
//! | `GET /api/v1/rooms` | `roomList` |
//! | `POST /api/v1/rooms` | `roomCreate` |
//! | `GET /api/v1/rooms/{room}` | `roomAdmin` for it, or `roomList` |
//! | `DELETE /api/v1/rooms/{room}` | `roomAdmin` for it |
//! | `DELETE /api/v1/rooms/{room}/participants/{id}` | `roomAdmin` for it |
//! | `POST /api/v1/rooms/{room}/participants/{id}/mute` | `roomAdmin` for it |
//! | `POST /api/v1/rooms/{room}/send` | `roomAdmin` for it |
//!
//! `roomAdmin` is scoped by `video.room`; without one it covers every room.
//! Errors are `{"error": code, "message": text}`. With auth off the whole
//! API answers 403 saying how to turn it on.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::json;

use crate::auth::{unix_now, VideoGrant};
use crate::hub::{AdminError, CreateRoom, Hub};
use crate::sfu::MediaKind;

/// Largest request body.
const MAX_BODY: usize = 64 * 1024;

/// An admin API refusal: status, code, message.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
}

impl ApiError {
    fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            code,
            message: message.into(),
        }
    }
}

impl From<AdminError> for ApiError {
    fn from(e: AdminError) -> ApiError {
        let (status, code) = match &e {
            AdminError::NoRoom(_) | AdminError::NoParticipant(_) => {
                (StatusCode::NOT_FOUND, "not-found")
            }
            AdminError::Exists(_) => (StatusCode::CONFLICT, "exists"),
            AdminError::TooManyRooms | AdminError::Draining => {
                (StatusCode::CONFLICT, "unavailable")
            }
            AdminError::Media(_) => (StatusCode::SERVICE_UNAVAILABLE, "unavailable"),
        };
        ApiError::new(status, code, e.to_string())
    }
}

type ApiResult = Result<Response, ApiError>;

/// The `/api/v1` routes.
pub fn router(hub: Arc<Hub>) -> Router {
    Router::new()
        .route("/api/v1/rooms", get(list_rooms).post(create_room))
        .route("/api/v1/rooms/{room}", get(room_info).delete(close_room))
        .route(
            "/api/v1/rooms/{room}/participants/{id}",
            delete(remove_participant),
        )
        .route("/api/v1/rooms/{room}/participants/{id}/mute", post(mute))
        .route("/api/v1/rooms/{room}/send", post(send))
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .with_state(hub)
}

/// Turns a handler's result into the response, counting it.
fn finish(hub: &Hub, r: ApiResult) -> Response {
    match r {
        Ok(resp) => {
            hub.metrics().admin_request("ok");
            resp
        }
        Err(e) => {
            hub.metrics()
                .admin_request(if e.status == StatusCode::UNAUTHORIZED {
                    "unauthorized"
                } else {
                    "client-error"
                });
            (
                e.status,
                Json(json!({"error": e.code, "message": e.message})),
            )
                .into_response()
        }
    }
}

/// The grant of the request's bearer token.
fn grant(hub: &Hub, headers: &HeaderMap) -> Result<VideoGrant, ApiError> {
    let keys = &hub.config().keys;
    if keys.is_empty() {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            "the admin API is off because auth is off: configure an API key \
             (--api-key/--api-secret or --keys-file) and use a token with admin grants \
             (switchboard token --admin)",
        ));
    }
    let token = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .ok_or_else(|| {
            ApiError::new(
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "send Authorization: Bearer <token>",
            )
        })?;
    keys.verify(token, unix_now())
        .map(|c| c.video)
        .map_err(|e| ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", e.to_string()))
}

fn need(ok: bool, what: &str) -> Result<(), ApiError> {
    if ok {
        Ok(())
    } else {
        Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            format!("the token does not grant {what}"),
        ))
    }
}

/// `roomAdmin` for `room`: unscoped, or scoped to it.
fn admin_of(g: &VideoGrant, room: &str) -> bool {
    g.room_admin && g.room.as_deref().is_none_or(|r| r.is_empty() || r == room)
}

fn parse_body<T: for<'de> Deserialize<'de>>(body: &Bytes) -> Result<T, ApiError> {
    serde_json::from_slice(body).map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "bad-request",
            format!("bad JSON body: {e}"),
        )
    })
}

async fn list_rooms(State(hub): State<Arc<Hub>>, headers: HeaderMap) -> Response {
    let r = (|| {
        let g = grant(&hub, &headers)?;
        need(g.room_list, "roomList")?;
        Ok(Json(json!({"rooms": hub.list_rooms()})).into_response())
    })();
    finish(&hub, r)
}

async fn create_room(State(hub): State<Arc<Hub>>, headers: HeaderMap, body: Bytes) -> Response {
    let r = (|| {
        let g = grant(&hub, &headers)?;
        need(g.room_create, "roomCreate")?;
        let req: CreateRoom = parse_body(&body)?;
        let view = hub.create_room(req)?;
        Ok((StatusCode::CREATED, Json(view)).into_response())
    })();
    finish(&hub, r)
}

async fn room_info(
    State(hub): State<Arc<Hub>>,
    headers: HeaderMap,
    Path(room): Path<String>,
) -> Response {
    let r = (|| {
        let g = grant(&hub, &headers)?;
        need(
            admin_of(&g, &room) || g.room_list,
            "roomAdmin for this room, or roomList",
        )?;
        let (view, members) = hub.room_info(&room)?;
        let mut body = serde_json::to_value(view).unwrap_or_default();
        body["participants"] = serde_json::to_value(members).unwrap_or_default();
        Ok(Json(body).into_response())
    })();
    finish(&hub, r)
}

async fn close_room(
    State(hub): State<Arc<Hub>>,
    headers: HeaderMap,
    Path(room): Path<String>,
) -> Response {
    let r = (|| {
        let g = grant(&hub, &headers)?;
        need(admin_of(&g, &room), "roomAdmin for this room")?;
        hub.close_room(&room)?;
        Ok(StatusCode::NO_CONTENT.into_response())
    })();
    finish(&hub, r)
}

async fn remove_participant(
    State(hub): State<Arc<Hub>>,
    headers: HeaderMap,
    Path((room, id)): Path<(String, String)>,
) -> Response {
    let r = (|| {
        let g = grant(&hub, &headers)?;
        need(admin_of(&g, &room), "roomAdmin for this room")?;
        hub.remove_participant(&room, &id)?;
        Ok(StatusCode::NO_CONTENT.into_response())
    })();
    finish(&hub, r)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct MuteBody {
    kind: MediaKind,
    muted: bool,
}

async fn mute(
    State(hub): State<Arc<Hub>>,
    headers: HeaderMap,
    Path((room, id)): Path<(String, String)>,
    body: Bytes,
) -> Response {
    let r = (|| {
        let g = grant(&hub, &headers)?;
        need(admin_of(&g, &room), "roomAdmin for this room")?;
        let req: MuteBody = parse_body(&body)?;
        hub.mute(&room, &id, req.kind, req.muted)?;
        Ok(Json(json!({"kind": req.kind, "muted": req.muted})).into_response())
    })();
    finish(&hub, r)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SendBody {
    data: serde_json::Value,
    #[serde(default)]
    to: Option<Vec<String>>,
}

async fn send(
    State(hub): State<Arc<Hub>>,
    headers: HeaderMap,
    Path(room): Path<String>,
    body: Bytes,
) -> Response {
    let r = (|| {
        let g = grant(&hub, &headers)?;
        need(admin_of(&g, &room), "roomAdmin for this room")?;
        let req: SendBody = parse_body(&body)?;
        if req.data.is_null() {
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                "bad-request",
                "data is required",
            ));
        }
        hub.send_data(&room, req.data, req.to)?;
        Ok(Json(json!({})).into_response())
    })();
    finish(&hub, r)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn room_admin_is_scoped_by_the_grant_room() {
        let scoped = VideoGrant {
            room_admin: true,
            room: Some("a".into()),
            ..Default::default()
        };
        assert!(admin_of(&scoped, "a"));
        assert!(!admin_of(&scoped, "b"));
        let global = VideoGrant {
            room_admin: true,
            ..Default::default()
        };
        assert!(admin_of(&global, "b"));
        assert!(!admin_of(&VideoGrant::default(), "a"));
    }
}
