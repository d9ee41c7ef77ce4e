//! Idempotency records: (mutation, key) → hash of the input and the first answer.

use super::entities::idempotency_key;
use super::WriteTx;
use crate::domain::time;
use crate::error::AppError;
use sea_orm::{EntityTrait, QueryTrait, Set};
use serde::Serialize;
use sha2::{Digest, Sha256};

/// The idempotency part of one mutation call.
#[derive(Debug, Clone)]
pub struct Idempotency {
    pub mutation: &'static str,
    pub key: Option<String>,
    pub request_hash: String,
}

impl Idempotency {
    /// `input` is everything the mutation acts on except the key itself.
    pub fn new(
        mutation: &'static str,
        key: Option<String>,
        input: &impl Serialize,
    ) -> Result<Self, AppError> {
        if let Some(k) = &key {
            if k.is_empty() || k.len() > 128 {
                return Err(AppError::validation(
                    "idempotencyKey must be 1 to 128 characters",
                ));
            }
        }
        let canonical = serde_json::to_value(input)?.to_string();
        Ok(Idempotency {
            mutation,
            key,
            request_hash: hex::encode(Sha256::digest(canonical.as_bytes())),
        })
    }
}

impl WriteTx {
    /// The stored answer for a replay, or `IDEMPOTENCY_KEY_REUSED` for a different input.
    pub async fn replayed<T: serde::de::DeserializeOwned>(
        &self,
        idem: &Idempotency,
    ) -> Result<Option<T>, AppError> {
        let Some(key) = &idem.key else {
            return Ok(None);
        };
        let read = idempotency_key::Entity::find_by_id((idem.mutation.to_string(), key.clone()))
            .build(self.backend());
        let found = match self.query(read).await?.first() {
            Some(row) => Some(row.model::<idempotency_key::Entity>()?),
            None => None,
        };
        match found {
            None => Ok(None),
            Some(row) if row.request_hash == idem.request_hash => {
                Ok(Some(serde_json::from_str(&row.response)?))
            }
            Some(_) => Err(AppError::IdempotencyKeyReused),
        }
    }

    pub async fn remember(
        &self,
        idem: &Idempotency,
        response: &impl Serialize,
    ) -> Result<(), AppError> {
        let Some(key) = &idem.key else {
            return Ok(());
        };
        let row = idempotency_key::ActiveModel {
            mutation: Set(idem.mutation.to_string()),
            key: Set(key.clone()),
            request_hash: Set(idem.request_hash.clone()),
            response: Set(serde_json::to_string(response)?),
            created_at: Set(time::now()),
        };
        self.exec(&idempotency_key::Entity::insert(row).into_query())
            .await?;
        Ok(())
    }
}
