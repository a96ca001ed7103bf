//! Values between driftless and PostgreSQL, bit-exact: INTEGER is `bigint` (every i64), REAL
//! is `double precision` sent and read in binary (so -0.0 and every NaN payload survive),
//! TEXT is `text` (UTF-8; the schema refuses NUL, which PostgreSQL cannot hold), BLOB is
//! `bytea`.

use std::error::Error as StdError;

use driftless_core::{ColumnType, Value};
use postgres::types::{FromSql, IsNull, ToSql, Type, to_sql_checked};

/// The PostgreSQL type of a declared column type.
pub(super) fn type_name(ty: ColumnType) -> &'static str {
    match ty {
        ColumnType::Integer => "bigint",
        ColumnType::Real => "double precision",
        ColumnType::Text => "text",
        ColumnType::Blob => "bytea",
        // A type a later version adds maps to bytes until this store knows it.
        _ => "bytea",
    }
}

/// A value as a PostgreSQL literal (for DEFAULT clauses).
pub(super) fn literal(v: &Value) -> String {
    match v {
        Value::Null => "NULL".into(),
        Value::Integer(i) => format!("{i}::bigint"),
        // The exact bits, whatever the value (an `f64` has no literal for every payload).
        Value::Real(r) => format!("'{}'::float8", float_text(*r)),
        Value::Text(t) => format!("'{}'::text", t.replace('\'', "''")),
        Value::Blob(b) | Value::RawText(b) => {
            format!("'\\x{}'::bytea", b.iter().map(|x| format!("{x:02x}")).collect::<String>())
        }
        _ => "NULL".into(),
    }
}

/// A double as PostgreSQL reads it back to the same bits (Rust's shortest round-trip form).
fn float_text(r: f64) -> String {
    if r.is_nan() {
        "NaN".into()
    } else if r.is_infinite() {
        if r > 0.0 { "Infinity".into() } else { "-Infinity".into() }
    } else {
        format!("{r:?}")
    }
}

/// A parameter bound from a [`Value`].
#[derive(Debug)]
pub(super) struct Param<'a>(pub &'a Value);

impl ToSql for Param<'_> {
    fn to_sql(&self, ty: &Type, out: &mut bytes::BytesMut) -> Result<IsNull, Box<dyn StdError + Sync + Send>> {
        match self.0 {
            Value::Null => Ok(IsNull::Yes),
            Value::Integer(i) => i.to_sql(ty, out),
            Value::Real(r) => r.to_sql(ty, out),
            Value::Text(t) => t.as_str().to_sql(ty, out),
            Value::Blob(b) => b.as_slice().to_sql(ty, out),
            Value::RawText(_) => Err("text that is not UTF-8 cannot be stored in PostgreSQL".into()),
            _ => Err("a value of a kind this store does not know".into()),
        }
    }

    fn accepts(_: &Type) -> bool {
        // Checked per value in `to_sql`: the column's declared type decides.
        true
    }

    to_sql_checked!();
}

/// A value read from a column of any declared type.
#[derive(Debug)]
pub(crate) struct Read(pub Value);

impl<'a> FromSql<'a> for Read {
    fn from_sql(ty: &Type, raw: &'a [u8]) -> Result<Self, Box<dyn StdError + Sync + Send>> {
        Ok(Read(match *ty {
            Type::INT8 => Value::Integer(i64::from_sql(ty, raw)?),
            Type::INT4 => Value::Integer(i32::from_sql(ty, raw)?.into()),
            Type::INT2 => Value::Integer(i16::from_sql(ty, raw)?.into()),
            Type::FLOAT8 => Value::Real(f64::from_sql(ty, raw)?),
            Type::FLOAT4 => Value::Real(f32::from_sql(ty, raw)?.into()),
            Type::BYTEA => Value::Blob(raw.to_vec()),
            _ => Value::Text(String::from_sql(ty, raw)?),
        }))
    }

    fn from_sql_null(_: &Type) -> Result<Self, Box<dyn StdError + Sync + Send>> {
        Ok(Read(Value::Null))
    }

    fn accepts(ty: &Type) -> bool {
        matches!(*ty, Type::INT8 | Type::INT4 | Type::INT2 | Type::FLOAT8 | Type::FLOAT4 | Type::BYTEA)
            || <String as FromSql>::accepts(ty)
    }
}

/// Parameters for a statement from values.
pub(super) fn params(values: &[Value]) -> Vec<Param<'_>> {
    values.iter().map(Param).collect()
}

/// The same, as the slice the client takes.
pub(super) fn refs<'a>(params: &'a [Param<'a>]) -> Vec<&'a (dyn ToSql + Sync)> {
    params.iter().map(|p| p as &(dyn ToSql + Sync)).collect()
}
