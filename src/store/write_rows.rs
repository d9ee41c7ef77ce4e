//! Rows a writer reads in its turn ([`super::WriteTx::query`]): from sqlx on Postgres, from the
//! synchronous writer connection on SQLite (see [`super::sqlite_writer`]).
//!
//! Columns are read by position. A whole entity's row (`Entity::find()`, whose columns come in
//! the entity's column order) becomes its sea-orm model with [`Row::model`].

use super::sqlite_writer::SqliteRow;
use crate::error::AppError;
use rusqlite::types::Value as SqlValue;
use sea_orm::sea_query::ColumnType;
use sea_orm::{
    ActiveModelTrait, ColumnTrait, EntityTrait, FromQueryResult, IdenStatic, Iterable, QueryResult,
    TryGetable, TryIntoModel, Value,
};

/// One row a writer read.
pub(crate) enum Row {
    Postgres(QueryResult),
    Sqlite(SqliteRow),
}

impl Row {
    /// The value of column `index`.
    pub(crate) fn get<T: Column>(&self, index: usize) -> Result<T, AppError> {
        match self {
            Row::Postgres(r) => Ok(r.try_get_by_index::<T>(index)?),
            Row::Sqlite(values) => {
                let value = values.get(index).ok_or_else(|| {
                    AppError::internal(anyhow::anyhow!("no column {index} in a row read"))
                })?;
                T::from_sqlite(value).ok_or_else(|| {
                    AppError::internal(anyhow::anyhow!(
                        "column {index} of a row read holds {value:?}, not a {}",
                        std::any::type_name::<T>()
                    ))
                })
            }
        }
    }

    /// The row as `E`'s model: every column of `E`, in its column order.
    pub(crate) fn model<E>(&self) -> Result<E::Model, AppError>
    where
        E: EntityTrait,
        E::ActiveModel: TryIntoModel<E::Model>,
    {
        let values = match self {
            Row::Postgres(r) => return Ok(E::Model::from_query_result(r, "")?),
            Row::Sqlite(values) => values,
        };
        let columns = E::Column::iter().count();
        if values.len() != columns {
            return Err(AppError::internal(anyhow::anyhow!(
                "a row of {} columns read for {}, which has {columns}",
                values.len(),
                E::default().table_name()
            )));
        }
        let mut active = <E::ActiveModel as ActiveModelTrait>::default();
        for (column, value) in E::Column::iter().zip(values) {
            let typed = typed(column.def().get_column_type(), value).ok_or_else(|| {
                AppError::internal(anyhow::anyhow!(
                    "column {} of {} holds {value:?}",
                    column.as_str(),
                    E::default().table_name()
                ))
            })?;
            active.try_set(column, typed)?;
        }
        Ok(active.try_into_model()?)
    }
}

/// A SQLite value as the sea-orm value of a column of type `ty`.
fn typed(ty: &ColumnType, value: &SqlValue) -> Option<Value> {
    Some(match (ty, value) {
        (ColumnType::BigInteger, SqlValue::Integer(n)) => Value::BigInt(Some(*n)),
        (ColumnType::BigInteger, SqlValue::Null) => Value::BigInt(None),
        (ColumnType::Integer, SqlValue::Integer(n)) => Value::Int(Some(i32::try_from(*n).ok()?)),
        (ColumnType::Integer, SqlValue::Null) => Value::Int(None),
        (ColumnType::Boolean, SqlValue::Integer(n)) => Value::Bool(Some(*n != 0)),
        (ColumnType::Boolean, SqlValue::Null) => Value::Bool(None),
        (ColumnType::Double, SqlValue::Real(f)) => Value::Double(Some(*f)),
        (ColumnType::Double, SqlValue::Integer(n)) => Value::Double(Some(*n as f64)),
        (ColumnType::Double, SqlValue::Null) => Value::Double(None),
        (ColumnType::String(_) | ColumnType::Text, SqlValue::Text(s)) => {
            Value::String(Some(s.clone()))
        }
        (ColumnType::String(_) | ColumnType::Text, SqlValue::Null) => Value::String(None),
        _ => return None,
    })
}

/// A column type a writer reads by position.
pub(crate) trait Column: TryGetable + Sized {
    fn from_sqlite(value: &SqlValue) -> Option<Self>;
}

impl Column for i64 {
    fn from_sqlite(value: &SqlValue) -> Option<Self> {
        match value {
            SqlValue::Integer(n) => Some(*n),
            _ => None,
        }
    }
}

impl Column for String {
    fn from_sqlite(value: &SqlValue) -> Option<Self> {
        match value {
            SqlValue::Text(s) => Some(s.clone()),
            _ => None,
        }
    }
}

impl<T: Column> Column for Option<T> {
    fn from_sqlite(value: &SqlValue) -> Option<Self> {
        match value {
            SqlValue::Null => Some(None),
            v => T::from_sqlite(v).map(Some),
        }
    }
}

/// The first column of the first row, if there is a row (a single value read or returned).
pub(crate) fn first_value<T: Column>(rows: &[Row]) -> Result<Option<T>, AppError> {
    rows.first().map(|r| r.get::<T>(0)).transpose()
}
