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
    /// sha256 of the input as canonical JSON; empty without a key, when nothing is looked up
    /// or recorded (hashing every mutation's input was ~20 K instructions of a start's ~760 K).
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
        let request_hash = match key {
            Some(_) => {
                let canonical = serde_json::to_value(input)?.to_string();
                hex::encode(Sha256::digest(canonical.as_bytes()))
            }
            None => String::new(),
        };
        Ok(Idempotency {
            mutation,
            key,
            request_hash,
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

#[cfg(test)]
mod tests {
    use super::Idempotency;

    #[test]
    fn the_input_is_hashed_only_under_a_key() {
        let keyed = |input: &str| {
            Idempotency::new("m", Some("k".into()), &input)
                .expect("valid")
                .request_hash
        };
        assert_eq!(keyed("a").len(), 64);
        assert_eq!(keyed("a"), keyed("a"));
        assert_ne!(keyed("a"), keyed("b"));
        let unkeyed = Idempotency::new("m", None, &"a").expect("valid");
        assert_eq!(unkeyed.request_hash, "");
        assert!(Idempotency::new("m", Some(String::new()), &"a").is_err());
    }
}
