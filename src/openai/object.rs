//! Request objects read member by member: the members a type names go
//! straight into its fields and the rest into its `extra` map. This is what
//! `#[serde(flatten)]` gives, without it first copying every member into a
//! buffer of its own, which was half the CPU of reading a chat request.

use std::borrow::Cow;
use std::fmt;
use std::marker::PhantomData;

use serde::de::{self, Deserialize, Deserializer, MapAccess, Visitor};
use serde_json::{Map, Value};

/// A JSON object type with named fields and an `extra` map for the rest.
pub trait Members: Sized {
    /// The named fields while they are being read.
    type Fields: Default;
    /// What a value of the wrong type is told it should have been.
    const EXPECTING: &'static str;

    /// Reads the value of member `name` into `fields` if the type names it;
    /// `Ok(false)` leaves the value unread, for `extra`.
    fn member<'de, A: MapAccess<'de>>(
        fields: &mut Self::Fields,
        name: &str,
        members: &mut A,
    ) -> Result<bool, A::Error>;

    /// The object, or the error for a required member that was missing.
    fn build<E: de::Error>(fields: Self::Fields, extra: Map<String, Value>) -> Result<Self, E>;
}

/// Deserializes a [`Members`] type; its `Deserialize` impl calls this.
pub fn deserialize<'de, T: Members, D: Deserializer<'de>>(deserializer: D) -> Result<T, D::Error> {
    deserializer.deserialize_map(ObjectVisitor(PhantomData))
}

/// Reads the value of a named member into `slot`: `Ok(true)`, or the
/// error for a member sent twice.
pub fn once<'de, T: Deserialize<'de>, A: MapAccess<'de>>(
    slot: &mut Option<T>,
    name: &'static str,
    members: &mut A,
) -> Result<bool, A::Error> {
    if slot.is_some() {
        return Err(de::Error::duplicate_field(name));
    }
    *slot = Some(members.next_value()?);
    Ok(true)
}

/// A required member's value, or the error saying it is missing.
pub fn required<T, E: de::Error>(slot: Option<T>, name: &'static str) -> Result<T, E> {
    slot.ok_or_else(|| E::missing_field(name))
}

struct ObjectVisitor<T>(PhantomData<T>);

impl<'de, T: Members> Visitor<'de> for ObjectVisitor<T> {
    type Value = T;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(T::EXPECTING)
    }

    fn visit_map<A: MapAccess<'de>>(self, mut members: A) -> Result<T, A::Error> {
        let mut fields = T::Fields::default();
        let mut extra = Map::new();
        while let Some(name) = members.next_key::<MemberName<'de>>()? {
            if !T::member(&mut fields, &name.0, &mut members)? {
                extra.insert(name.0.into_owned(), members.next_value()?);
            }
        }
        T::build(fields, extra)
    }
}

/// A member's name, borrowed unless it had escapes.
pub struct MemberName<'de>(pub Cow<'de, str>);

impl<'de> Deserialize<'de> for MemberName<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Name;
        impl<'de> Visitor<'de> for Name {
            type Value = MemberName<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a member name")
            }
            fn visit_borrowed_str<E: de::Error>(self, name: &'de str) -> Result<Self::Value, E> {
                Ok(MemberName(Cow::Borrowed(name)))
            }
            fn visit_str<E: de::Error>(self, name: &str) -> Result<Self::Value, E> {
                Ok(MemberName(Cow::Owned(name.to_owned())))
            }
            fn visit_string<E: de::Error>(self, name: String) -> Result<Self::Value, E> {
                Ok(MemberName(Cow::Owned(name)))
            }
        }
        deserializer.deserialize_str(Name)
    }
}
