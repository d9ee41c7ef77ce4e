//! One error type for the whole application, and the one place that decides what a client may see.

use async_graphql::ErrorExtensions;

/// Deliberately not `Display`: the only way to a client is through [`AppError::client_message`],
/// and the only way into GraphQL is the `From` impl below, which adds `extensions.code`.
#[derive(Debug)]
pub enum AppError {
    NotFound(String),
    Validation(String),
    Conflict(String),
    InvalidTransition(String),
    IdempotencyKeyReused,
    Internal(anyhow::Error),
}

pub type AppResult<T> = Result<T, AppError>;

impl AppError {
    pub fn code(&self) -> &'static str {
        match self {
            AppError::NotFound(_) => "NOT_FOUND",
            AppError::Validation(_) => "VALIDATION",
            AppError::Conflict(_) => "CONFLICT",
            AppError::InvalidTransition(_) => "INVALID_TRANSITION",
            AppError::IdempotencyKeyReused => "IDEMPOTENCY_KEY_REUSED",
            AppError::Internal(_) => "INTERNAL",
        }
    }

    /// The message a client may see (never internal details).
    pub fn client_message(&self) -> String {
        match self {
            AppError::NotFound(m)
            | AppError::Validation(m)
            | AppError::Conflict(m)
            | AppError::InvalidTransition(m) => m.clone(),
            AppError::IdempotencyKeyReused => {
                "idempotency key was already used with a different input".into()
            }
            AppError::Internal(_) => "internal error".into(),
        }
    }

    /// For command-line use: the full error, internal details included.
    pub fn into_anyhow(self) -> anyhow::Error {
        match self {
            AppError::Internal(e) => e,
            other => anyhow::anyhow!("{}: {}", other.code(), other.client_message()),
        }
    }

    pub fn internal(err: impl Into<anyhow::Error>) -> Self {
        AppError::Internal(err.into())
    }

    pub fn validation(msg: impl Into<String>) -> Self {
        AppError::Validation(msg.into())
    }

    pub fn not_found(entity: &str, id: &str) -> Self {
        AppError::NotFound(format!("{entity} not found: {id}"))
    }
}

impl From<serde_json::Error> for AppError {
    fn from(err: serde_json::Error) -> Self {
        AppError::internal(err)
    }
}

impl From<std::io::Error> for AppError {
    fn from(err: std::io::Error) -> Self {
        AppError::internal(err)
    }
}

/// Client-facing conversion: internal details are logged, never sent.
impl ErrorExtensions for AppError {
    fn extend(&self) -> async_graphql::Error {
        if let AppError::Internal(source) = self {
            tracing::error!(error = ?source, "internal error");
        }
        let message = self.client_message();
        async_graphql::Error::new(message).extend_with(|_, ext| ext.set("code", self.code()))
    }
}

impl From<AppError> for async_graphql::Error {
    fn from(err: AppError) -> Self {
        err.extend()
    }
}
