//! The OpenAI wire format: the canonical format inside the gateway and the
//! one clients speak. Providers translate to and from these types.

mod error;
mod request;
mod response;

pub use error::{ErrorBody, ErrorObject, UpstreamErrorParts};
pub use request::*;
pub use response::*;
