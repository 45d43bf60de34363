//! API failures: a stable code, the HTTP status chosen from it, and a one-line message
//! that says what to do.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use ferry_api_types::ApiError;
use ferry_store::StoreError;

/// A failed API request.
#[derive(Debug)]
pub struct ApiFailure {
    /// HTTP status.
    pub status: u16,
    /// Stable code.
    pub code: &'static str,
    /// One line for the user.
    pub message: String,
}

impl ApiFailure {
    /// Bad input (400).
    pub fn invalid(message: String) -> Self {
        Self {
            status: 400,
            code: "invalid",
            message,
        }
    }
    /// Not allowed in the current state (409).
    pub fn conflict(message: String) -> Self {
        Self {
            status: 409,
            code: "conflict",
            message,
        }
    }
    /// Not found (404).
    pub fn not_found(message: String) -> Self {
        Self {
            status: 404,
            code: "not_found",
            message,
        }
    }
    /// QEMU or qemu-img failed (502: the daemon is fine, its backend is not).
    pub fn qemu(message: String) -> Self {
        Self {
            status: 502,
            code: "qemu",
            message,
        }
    }
    /// Anything else (500).
    pub fn internal(message: String) -> Self {
        Self {
            status: 500,
            code: "internal",
            message,
        }
    }
}

impl From<StoreError> for ApiFailure {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::NotFound(name) => Self::not_found(format!(
                "no VM named {name:?} on this host; `ferry vm list` shows the VMs"
            )),
            StoreError::Duplicate(name) => {
                Self::conflict(format!("a VM named {name:?} already exists"))
            }
            other => Self::internal(error_chain(&other)),
        }
    }
}

/// An error and its sources on one line: `a: b: c`.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(cause) = src {
        s.push_str(": ");
        s.push_str(&cause.to_string());
        src = cause.source();
    }
    s
}

impl IntoResponse for ApiFailure {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        (
            status,
            Json(ApiError {
                code: self.code.to_owned(),
                message: self.message,
            }),
        )
            .into_response()
    }
}
