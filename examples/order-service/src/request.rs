//! Request bodies read field by field, so that every refusal is a problem with
//! a clear detail that names the field and the rule — and never quotes what
//! the client sent (a 10 MB string comes back as a one-line refusal).

use axum::http::StatusCode;
use serde_json::{Map, Value};

use crate::payments::PaymentRequest;
use crate::{CreateOrderRequest, MAX_ID_CHARS};

/// Why a body was refused: 400 (not a JSON object) or 422 (a field breaks a
/// rule), with the problem's type and detail.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// 400 or 422.
    pub status: StatusCode,
    /// The problem type's last part: `malformed-body` or `invalid-field`.
    pub kind: &'static str,
    /// What is wrong, without the client's values.
    pub detail: String,
}

fn invalid(detail: String) -> Refusal {
    Refusal {
        status: StatusCode::UNPROCESSABLE_ENTITY,
        kind: "invalid-field",
        detail,
    }
}

/// A JSON object's fields.
struct Fields(Map<String, Value>);

impl Fields {
    fn parse(body: &[u8]) -> Result<Fields, Refusal> {
        match serde_json::from_slice::<Value>(body) {
            Ok(Value::Object(map)) => Ok(Fields(map)),
            Ok(_) => Err(Refusal {
                status: StatusCode::BAD_REQUEST,
                kind: "malformed-body",
                detail: "the body must be a JSON object".into(),
            }),
            Err(e) => Err(Refusal {
                status: StatusCode::BAD_REQUEST,
                kind: "malformed-body",
                detail: format!(
                    "the body is not valid JSON (line {}, column {})",
                    e.line(),
                    e.column()
                ),
            }),
        }
    }

    /// A required string of 1 to `max` characters.
    fn string(&self, name: &str, max: usize) -> Result<String, Refusal> {
        match self.0.get(name) {
            Some(Value::String(s)) if (1..=max).contains(&s.chars().count()) => Ok(s.clone()),
            Some(Value::String(_)) => Err(invalid(format!(
                "{name} must be a string of 1 to {max} characters"
            ))),
            None | Some(Value::Null) => Err(invalid(format!("{name} is required"))),
            Some(_) => Err(invalid(format!(
                "{name} must be a string of 1 to {max} characters"
            ))),
        }
    }

    /// An optional string (absent or `null`: empty).
    fn optional_string(&self, name: &str) -> Result<String, Refusal> {
        match self.0.get(name) {
            None | Some(Value::Null) => Ok(String::new()),
            Some(Value::String(s)) => Ok(s.clone()),
            Some(_) => Err(invalid(format!("{name} must be a string"))),
        }
    }

    /// A required whole number from `min` to `max`.
    fn integer(&self, name: &str, min: i64, max: i64) -> Result<i64, Refusal> {
        let rule = || invalid(format!("{name} must be a whole number from {min} to {max}"));
        match self.0.get(name) {
            None | Some(Value::Null) => Err(invalid(format!("{name} is required"))),
            Some(Value::Number(n)) => n
                .as_i64()
                .filter(|v| (min..=max).contains(v))
                .ok_or_else(rule),
            Some(_) => Err(rule()),
        }
    }
}

/// `POST /orders`: `{"user_id": "...", "product_id": "...", "quantity": n}`,
/// and optionally `"ship_to"`. Further rules (lengths) are the request's own
/// ([`CreateOrderRequest::validate`]).
pub fn order(body: &[u8]) -> Result<CreateOrderRequest, Refusal> {
    order_fields(&Fields::parse(body)?)
}

/// An order's fields, checked.
fn order_fields(fields: &Fields) -> Result<CreateOrderRequest, Refusal> {
    let req = CreateOrderRequest {
        user_id: fields.string("user_id", MAX_ID_CHARS)?,
        product_id: fields.string("product_id", MAX_ID_CHARS)?,
        quantity: fields.integer("quantity", 1, i64::from(crate::MAX_QUANTITY))? as u32,
        ship_to: fields.optional_string("ship_to")?,
    };
    req.validate().map_err(|e| invalid(e.to_string()))?;
    Ok(req)
}

/// `POST /checkout`: an order's fields and `"card": "..."`.
pub fn checkout(body: &[u8]) -> Result<crate::checkout::CheckoutRequest, Refusal> {
    let fields = Fields::parse(body)?;
    Ok(crate::checkout::CheckoutRequest {
        order: order_fields(&fields)?,
        card: fields.string("card", 64)?,
    })
}

/// `POST /payments`: `{"order_id": n, "amount_cents": n, "card": "..."}`, with
/// `order_id` exactly as `POST /orders` returned it.
pub fn payment(body: &[u8]) -> Result<PaymentRequest, Refusal> {
    let fields = Fields::parse(body)?;
    Ok(PaymentRequest {
        order_id: fields.integer("order_id", 1, i64::MAX)?,
        amount_cents: fields.integer("amount_cents", 1, 100_000_000)?,
        card: fields.string("card", 64)?,
    })
    .and_then(|p| {
        if p.card.chars().any(char::is_control) {
            Err(invalid("card must not contain control characters".into()))
        } else {
            Ok(p)
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refused(body: &str) -> Refusal {
        order(body.as_bytes()).unwrap_err()
    }

    #[test]
    fn the_original_request_shape_is_accepted() {
        let req = order(br#"{"user_id":"u-1","product_id":"SKU-0001","quantity":2}"#).unwrap();
        assert_eq!(req.user_id, "u-1");
        assert_eq!(req.product_id, "SKU-0001");
        assert_eq!(req.quantity, 2);
        assert_eq!(req.ship_to, "");
    }

    #[test]
    fn every_refusal_names_the_field_and_quotes_nothing() {
        let long = "x".repeat(256);
        for (body, status, field) in [
            ("not json".to_owned(), 400, "JSON"),
            ("[1]".to_owned(), 400, "object"),
            (
                r#"{"user_id":1,"product_id":"p","quantity":1}"#.to_owned(),
                422,
                "user_id",
            ),
            (
                r#"{"product_id":"p","quantity":1}"#.to_owned(),
                422,
                "user_id",
            ),
            (
                r#"{"user_id":"","product_id":"p","quantity":1}"#.to_owned(),
                422,
                "user_id",
            ),
            (
                format!(r#"{{"user_id":"{long}","product_id":"p","quantity":1}}"#),
                422,
                "user_id",
            ),
            (
                r#"{"user_id":"u","product_id":7,"quantity":1}"#.to_owned(),
                422,
                "product_id",
            ),
            (
                r#"{"user_id":"u","product_id":"p","quantity":0}"#.to_owned(),
                422,
                "quantity",
            ),
            (
                r#"{"user_id":"u","product_id":"p","quantity":-1}"#.to_owned(),
                422,
                "quantity",
            ),
            (
                r#"{"user_id":"u","product_id":"p","quantity":1.5}"#.to_owned(),
                422,
                "quantity",
            ),
            (
                r#"{"user_id":"u","product_id":"p","quantity":"1"}"#.to_owned(),
                422,
                "quantity",
            ),
            (
                r#"{"user_id":"u","product_id":"p","quantity":99999999999999999999}"#.to_owned(),
                422,
                "quantity",
            ),
            (
                r#"{"user_id":"u","product_id":"p","quantity":1,"ship_to":5}"#.to_owned(),
                422,
                "ship_to",
            ),
        ] {
            let r = refused(&body);
            assert_eq!(r.status.as_u16(), status, "{body}");
            assert!(r.detail.contains(field), "{body}: {}", r.detail);
            assert!(!r.detail.contains("xxxx"), "{}", r.detail);
        }
    }

    #[test]
    fn ids_are_counted_in_characters() {
        let id = "é".repeat(255);
        let body = format!(r#"{{"user_id":"{id}","product_id":"p","quantity":1}}"#);
        assert_eq!(order(body.as_bytes()).unwrap().user_id, id);
    }

    #[test]
    fn a_payment_takes_the_order_id_as_returned() {
        let p =
            payment(br#"{"order_id":17,"amount_cents":1999,"card":"4242424242424242"}"#).unwrap();
        assert_eq!(p.order_id, 17);
        let r = payment(br#"{"order_id":"17","amount_cents":1999,"card":"4242"}"#).unwrap_err();
        assert!(r.detail.contains("order_id"), "{}", r.detail);
    }
}
